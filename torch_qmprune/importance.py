"""Torch-Pruning ``Importance`` subclasses that score channel groups by spectral redundancy.

One class, :class:`SpectralImportance`, several criteria (each one parameterized function):

* ``"qm"`` (default, data-aware): how far a channel's *activation state* lies from the span of
  its siblings' states. With the consumer's input Gram G (the unnormalized activation density
  matrix ρ of paper §3.2), the squared sine of the Fubini–Study distance between channel i's
  activation vector and the span of its siblings is ``1 / (G_ii [G⁻¹]_ii)``, so
  ``G_ii sin² d_FS = 1/[G⁻¹]_ii`` is the part of channel i that no sibling can reproduce. Times
  the energy of the consumer weights that read it, this is exactly the output error left after
  the channel is *merged into its siblings* by least squares (what :func:`~torch_qmprune.prune`
  does with ``compensate=True``). Channels are removed greedily, one at a time, with the
  inverse Gram and the consumer weights downdated after each removal (so that two copies of the
  same channel are never both removed: the survivor is no longer redundant).
* ``"literal"``: the paper's criterion (§3.1): Fubini–Study (or W₂) distance of a filter's
  weight spectral state (§2.1) to its nearest surviving sibling (filter spectra from the
  eigenvalues of each filter's k² × k² float64 Gram; the greedy order read off the distance
  matrix without simulating the removals). SCIENCE.md measured it: it
  loses to random at 50 % sparsity and beyond; it is here for comparison.
* ``"loo"``: leave-one-out spectral shift: d_FS between the producer layer's weight state with
  and without the channel (exact; one Gram eigendecomposition per layer, then the spectrum
  without each channel from a secular equation: O(r²) per channel, not an SVD each).
* ``"hybrid"``: §6's "guided by magnitude but weighted by the quantum geometric redundancy
  profile": L2 magnitude × (ε + normalized literal distance).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from ._threads import single_thread as _single_thread
from .calibration import CalibrationStats
from .methods import _greedy_sibling_order, _leave_one_out_shifts, _pairwise
from .spectral.states import _gram_spectral_states

__all__ = ["SpectralImportance", "CRITERIA", "greedy_merge_costs"]

CRITERIA = ("qm", "literal", "loo", "hybrid")
_CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)


def _is_arange(idxs: Sequence[int], size: int) -> bool:
    """Whether ``idxs`` is ``[0, 1, ..., size - 1]`` (checked without building a tensor)."""
    return (
        len(idxs) == size
        and (size == 0 or idxs[-1] == size - 1)
        and list(idxs) == list(range(size))
    )


def _is_out(dep) -> bool:
    return "out" in getattr(dep.pruning_fn, "__name__", str(dep.pruning_fn))


def _as_rows(weight: torch.Tensor) -> torch.Tensor:
    """Consumer weight as ``(out·taps, in)`` so every row is one linear read of the inputs."""
    if weight.dim() == 2:
        return weight
    return weight.movedim(1, -1).reshape(-1, weight.shape[1])


@torch.no_grad()
def greedy_merge_costs(
    consumers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_roots: int,
    *,
    damping: float = 1e-4,
    max_steps: int | None = None,
    max_downdates: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy removal order of ``n_roots`` channels and the relative output error of each step.

    Args:
        consumers: ``(rows, gram, blocks)`` per consumer layer: ``rows`` the consumer weight as
            ``(R, D)`` (:func:`_as_rows`), ``gram`` its input Gram ``(D+1, D+1)`` whose last
            index is the constant feature, ``blocks`` a ``(n_roots, s)`` long tensor mapping each
            root channel to the ``s`` consumer inputs it feeds (s > 1 after a flatten).
        n_roots: number of channels in the group.
        damping: ridge added to the Gram, relative to its mean diagonal.
        max_steps: stop the greedy after this many removals; the channels still alive are
            then ordered by their next-step cost (exact for the first ``max_steps``).
        max_downdates: at most this many inverse-Gram downdates over the whole order: the
            ``ceil(n_roots / max_downdates)`` cheapest channels leave together at each step.
            Default: 256 (one at a time up to 256 channels) when every consumer has at most
            1,024 inputs, 16 when one is larger (a flatten into a Linear).

    Returns:
        ``(order, cost)``: channels in removal order, and the marginal increase of the
        consumers' output error (relative to their output energy) at each removal:
        ``ΔE_c(r) = Σ_rows w_rᵀ ([G⁻¹]_rr)⁻¹ w_r`` — the Optimal-Brain-Surgeon cost of merging
        block r into the survivors, summed over consumers.
    """
    with _single_thread():
        return _greedy_merge_costs(consumers, n_roots, damping, max_steps, max_downdates)


def _greedy_merge_costs(consumers, n_roots, damping, max_steps, max_downdates,
                        weight_form: bool | None = None):
    state = []
    for rows, gram, blocks in consumers:
        g = gram.double().clone()
        d = g.shape[0]
        mean_diag = float(g.diagonal()[:-1].mean()) if d > 1 else 1.0
        g += torch.eye(d, dtype=g.dtype, device=g.device) * damping * max(mean_diag, 1e-12)
        chol, info = torch.linalg.cholesky_ex(g)  # SPD (Gram + ridge): half the work of LU
        ginv = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.inv(g)
        w = rows.double().to(g.device)
        w_aug = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)], 1)
        energy = float(torch.einsum("rd,de,re->", w, gram[:-1, :-1].double(), w))
        # Only M = WᵀW enters the costs. With more rows than inputs (R > D+1, a conv's
        # out·taps) the (D+1)² matrix M stands in for the weights, so a downdate costs O(D²·|b|)
        # whatever R; with fewer rows (a flatten into a Linear, a 1×1 conv reading a wide
        # residual stream) the (R, D+1) weights themselves are downdated, O(R·D·|b|) instead of
        # the three O(D²·|b|) products that keep M current. Both give the same costs.
        use_rows = weight_form if weight_form is not None else w_aug.shape[0] < w_aug.shape[1]
        mat = w_aug.clone() if use_rows else w_aug.T @ w_aug
        state.append([ginv, mat, blocks.to(g.device), max(energy, 1e-30), use_rows])
    alive = torch.ones(n_roots, dtype=torch.bool)
    order, costs = [], []
    steps = n_roots if max_steps is None else max(1, min(n_roots, int(max_steps)))
    if max_downdates is None:
        max_downdates = 16 if max(entry[0].shape[0] for entry in state) > 1025 else 256
    downdates = max(1, int(max_downdates))
    while bool(alive.any()):
        live = torch.nonzero(alive).view(-1)
        total = torch.full((n_roots,), math.inf, dtype=torch.float64)
        total[live] = 0.0
        for ginv, mm, blocks, energy, use_rows in state:
            blk = blocks[live.to(blocks.device)]
            if blk.shape[1] == 1:
                cols = blk[:, 0]
                diag = mm[:, cols].square().sum(0) if use_rows else mm.diagonal()[cols]
                cost = diag / ginv.diagonal()[cols].clamp_min(1e-30)
            else:
                gb = ginv[blk[:, :, None], blk[:, None, :]]  # (n, s, s)
                if use_rows:
                    wb = mm[:, blk]  # (R, n, s)
                    mb = torch.einsum("rns,rnt->nst", wb, wb)
                else:
                    mb = mm[blk[:, :, None], blk[:, None, :]]  # (n, s, s)
                inv_b = torch.cholesky_inverse(torch.linalg.cholesky(gb))  # (n, s, s)
                cost = torch.einsum("nst,nts->n", inv_b, mb)  # tr(G_bb⁻¹ W_bᵀW_b)
            total[live] += cost.cpu() / energy
        if len(order) >= steps - 1 and steps < n_roots:
            rest = live[torch.argsort(total[live])]
            order.extend(int(r) for r in rest)
            costs.extend(float(total[r]) for r in rest)
            break
        # Remove the cheapest channel, or the k cheapest at once for big problems (each
        # downdate costs O(D²·s); batching bounds the number of downdates, see max_downdates).
        n_live = int(live.numel())
        k = 1 if n_live <= 1 else min(n_live - 1, max(1, math.ceil(n_roots / downdates)))
        picks = live[torch.argsort(total[live])[:k]].tolist()
        for i in picks:
            order.append(int(i))
            costs.append(float(total[i]))
            alive[i] = False
        if len(order) >= n_roots:
            break
        for ginv, mm, blocks, _, use_rows in state:
            # in-place OBS downdate: removing inputs b with optimal least-squares compensation,
            # W ← W − W_b C with C = [G⁻¹]_bb⁻¹ [G⁻¹]_b: (their rows/columns become ~0 and are
            # never read again); M = WᵀW follows without forming W.
            b = blocks[picks].reshape(-1)
            g_b = ginv[b, :]  # (|b|, D+1)
            coupling = torch.linalg.inv(ginv[b][:, b]) @ g_b
            if use_rows:
                mm.sub_(mm[:, b] @ coupling)
            else:
                m_b = mm[b, :]  # (|b|, D+1)
                mm.sub_(coupling.T @ m_b)
                mm.sub_(m_b.T @ coupling)
                mm.add_(coupling.T @ (m_b[:, b] @ coupling))
            ginv.sub_(ginv[:, b] @ coupling)
    if len(order) < n_roots:  # the last survivor
        rest = torch.nonzero(alive).view(-1).tolist()
        order.extend(rest)
        costs.extend([max(costs) if costs else 1.0] * len(rest))
    return torch.tensor(order), torch.tensor(costs, dtype=torch.float64)


def _order_to_scores(order: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Scores that rank channels in greedy order and compare across groups (cumulative max)."""
    cm = np.maximum.accumulate(costs.detach().cpu().numpy())
    tiny = 1e-9 * max(abs(float(cm[-1])), 1e-30) if len(cm) else 0.0
    scores = np.empty_like(cm)
    scores[order.cpu().numpy()] = cm + tiny * np.arange(len(cm), dtype=cm.dtype)
    return torch.from_numpy(scores).float().to(costs.device)


class SpectralImportance(tp.importance.Importance):
    """Spectral redundancy importance for any ``tp.pruner.BasePruner`` (local, global,
    isomorphic, iterative, ``round_to``, channel groups): higher score = keep.

    Args:
        criterion: ``"qm"`` (default; needs ``stats``), ``"literal"``, ``"loo"`` or ``"hybrid"``
            (see the module docstring for the formulas).
        stats: calibration input Grams from :func:`~torch_qmprune.collect_input_grams`; needed by
            ``"qm"`` (falls back to ``"hybrid"`` for groups with no calibrated consumer).
        metric: ``"fs"`` (Fubini–Study, §2.3) or ``"w2"`` (2-Wasserstein of majorization
            profiles, Thm 2.1) for the weight-state criteria.
        aggregation: ``"nearest"`` or ``"mean"`` sibling distance.
        damping: ridge for the Gram inverses (relative to the mean diagonal).
        greedy_fraction: for ``"qm"``, run the exact greedy only over this fraction of each
            group's channels (enough for local pruning at that ratio; faster); ``None`` = all.

    Example:
        >>> import torch_pruning as tp
        >>> nn = torch.nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> imp = SpectralImportance(criterion="literal")
        >>> dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 8, 8))
        >>> group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(8)))
        >>> imp(group).shape
        torch.Size([8])
    """

    def __init__(
        self,
        criterion: str = "qm",
        *,
        stats: CalibrationStats | None = None,
        metric: str = "fs",
        aggregation: str = "nearest",
        damping: float = 1e-4,
        greedy_fraction: float | None = None,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if criterion == "qm" and stats is None:
            raise ValueError(
                "criterion 'qm' is data-aware: pass stats=collect_input_grams(model, "
                "calibration_batches)"
            )
        if metric not in ("fs", "w2"):
            raise ValueError(f"metric must be 'fs' or 'w2', got {metric!r}")
        self.criterion = criterion
        self.stats = stats
        self.metric = metric
        self.aggregation = aggregation
        self.damping = damping
        self.greedy_fraction = greedy_fraction

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _n_roots(group) -> int:
        return len(group[0].idxs) if hasattr(group[0], "idxs") else len(group[0][1])

    def _producers(self, group):
        """(layer, idxs, root_idxs) for each Conv/Linear whose outputs are pruned."""
        out = []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if isinstance(layer, _CONV_LINEAR) and _is_out(dep):
                if getattr(layer, "transposed", False):
                    continue
                out.append((layer, list(idxs), list(group[i].root_idxs)))
        return out

    def _consumers(self, group):
        out = []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if isinstance(layer, _CONV_LINEAR) and not _is_out(dep):
                out.append((layer, list(idxs), list(group[i].root_idxs)))
        return out

    # -- criteria ----------------------------------------------------------------------------
    def _weight_scores(self, group, n: int, mode: str) -> torch.Tensor | None:
        acc = torch.zeros(n, dtype=torch.float64)
        hits = torch.zeros(n, dtype=torch.float64)
        for layer, idxs, roots in self._producers(group):
            if None in roots:
                continue
            weight = layer.weight.detach()
            # a whole-layer group (every channel, in order) needs no gather copy
            w = weight if _is_arange(idxs, weight.shape[0]) else weight[idxs]
            w = w.float()
            if mode == "magnitude":
                s = w.flatten(1).norm(dim=1).double()
            elif mode in ("literal", "hybrid"):
                mats = w.reshape(w.shape[0], w.shape[1], -1) if w.dim() > 2 else w.unsqueeze(1)
                # Eq. §2.1 states from the float64 Gram of each filter (C_in x k² → k² x k²)
                states = _gram_spectral_states(mats, augment=w.dim() <= 2)
                s = self._sibling_scores(states).double()
                if mode == "hybrid":
                    mag = w.flatten(1).norm(dim=1).double()
                    s = mag / mag.mean().clamp_min(1e-30) * (0.1 + s / s.max().clamp_min(1e-30))
            else:  # loo
                full = weight.float()
                s = _leave_one_out_shifts(full, 0, torch.tensor(idxs), self.metric).double()
            s = s / s.mean().clamp_min(1e-30)
            roots_t = torch.tensor(roots)
            acc.scatter_add_(0, roots_t, s)
            hits.scatter_add_(0, roots_t, torch.ones_like(s))
        if hits.sum() == 0:
            return None
        return (acc / hits.clamp_min(1)).float()

    def _sibling_scores(self, states: torch.Tensor) -> torch.Tensor:
        """§3.1 sibling distance at greedy removal time (the drop-in method's order), made
        monotone along that order so that thresholds cut a prefix and layers compare."""
        n = states.shape[0]
        if n < 2:
            return torch.ones(n)
        if self.metric == "fs" and bool((states == states[:1]).all()):
            # identical states (e.g. every 1x1 conv filter, whose state is [1]): every
            # Fubini–Study distance is exactly 0 (Eq. §2.3), so the greedy removes channels in
            # index order, each at distance 0 (the last at inf): no distance matrix needed
            order = torch.arange(n)
            at = torch.zeros(n, dtype=torch.float64)
            at[-1] = math.inf
        else:
            dist = _pairwise(states, self.metric)
            if self.aggregation != "nearest":  # means are summed in float64
                dist = dist.double()
            # "nearest" only compares and returns distances: float32 as computed is the same;
            # Fubini–Study distances of one set come out exactly symmetric
            order, at = _greedy_sibling_order(dist, self.aggregation, symmetric=self.metric == "fs")
        at = at.double()
        finite = at[torch.isfinite(at)]
        at[~torch.isfinite(at)] = (finite.max() if finite.numel() else 1.0) + 1e-6
        return _order_to_scores(order.cpu(), at.cpu())

    def _qm_scores(self, group, n: int) -> torch.Tensor | None:
        consumers = []
        for layer, idxs, roots in self._consumers(group):
            entry = self.stats.get(layer) if self.stats is not None else None
            if entry is None or any(r is None for r in roots):
                continue
            roots_t = torch.tensor(roots)
            idxs_t = torch.tensor(idxs)
            counts = torch.bincount(roots_t, minlength=n)
            if counts.min() == 0 or not bool((counts == counts[0]).all()):
                continue
            order = torch.argsort(roots_t, stable=True)
            blocks = idxs_t[order].reshape(n, int(counts[0]))
            rows = _as_rows(layer.weight.detach())
            consumers.append((rows, entry.gram, blocks))
        if not consumers:
            return None
        steps = None if self.greedy_fraction is None else math.ceil(self.greedy_fraction * n) + 1
        order, costs = greedy_merge_costs(consumers, n, damping=self.damping, max_steps=steps)
        return _order_to_scores(order, costs)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        n = self._n_roots(group)
        if self.criterion == "qm":
            scores = self._qm_scores(group, n)
            if scores is None:
                scores = self._weight_scores(group, n, "hybrid")
            return scores
        return self._weight_scores(group, n, self.criterion)
