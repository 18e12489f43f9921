"""Drop-in ``torch.nn.utils.prune`` layer: spectral pruning methods (arXiv 2512.00880 §2.1, §2.3,
§3.1) plus torch's own methods behind wrappers that fix its traps.

Everything here speaks torch's dialect: the same ``weight_orig`` / ``weight_mask``
reparametrization, forward pre-hooks and :class:`PruningContainer` composition, so a module
pruned here is indistinguishable from one pruned by torch. On top of that:

* :class:`SpectralStructured` removes the channels whose spectral state (paper §2.1) is most
  redundant with a sibling's (§3.1, Fubini–Study distance §2.3), or whose removal moves the
  layer's spectral state least; :class:`SpectralUnstructured` weights magnitude by the
  first-order Fubini–Study shift an element's removal causes.
* :func:`global_unstructured` accepts :class:`SpectralUnstructured`; :func:`global_structured`
  (torch has none) compares channels of many layers against one threshold.
* Traps fixed: amounts such as ``True``, NaN or inf are rejected; a failed call leaves the
  module exactly as it was; pruned modules can be deep-copied; a pruned ``state_dict`` loads
  into a fresh model (:func:`load_pruned_state_dict`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import prune as _torch_prune
from torch.nn.utils.prune import (
    BasePruningMethod,
    CustomFromMask,
    Identity,
    L1Unstructured,
    LnStructured,
    PruningContainer,
    RandomStructured,
    RandomUnstructured,
)

from torch_qmprune._threads import single_thread
from torch_qmprune._transaction import atomic
from torch_qmprune._validation import check_amount, check_finite
from torch_qmprune.spectral.secular import downdated_eigvalsh
from torch_qmprune.spectral import (
    operator_matrix,
    pad_states,
    pairwise_fubini_study,
    pairwise_wasserstein2,
    spectral_states,
)

__all__ = [
    "BasePruningMethod",
    "CustomFromMask",
    "Identity",
    "L1Unstructured",
    "LnStructured",
    "PruningContainer",
    "RandomStructured",
    "RandomUnstructured",
    "SpectralStructured",
    "SpectralUnstructured",
    "custom_from_mask",
    "global_structured",
    "global_unstructured",
    "identity",
    "is_pruned",
    "l1_unstructured",
    "ln_structured",
    "load_pruned_state_dict",
    "make_deepcopyable",
    "random_structured",
    "random_unstructured",
    "remove",
    "spectral_structured",
    "spectral_unstructured",
]

_METRICS = ("fs", "w2")
_AGGREGATIONS = ("nearest", "mean")
_SCORES = ("auto", "sibling", "leave_one_out")
_LOO_CHUNK_ELEMENTS = 1 << 25  # leave-one-out batch size cap (elements of the stacked tensors)


# ---------------------------------------------------------------------------------------------
# small private helpers
# ---------------------------------------------------------------------------------------------


def _nparams_toprune(amount: float, size: int) -> int:
    """Number of units to prune, exactly as torch's ``_compute_nparams_toprune``."""
    if isinstance(amount, numbers.Integral):
        return int(amount)
    return round(amount * size)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for everything else (fp16 / bf16 are upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_dim(dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {dim!r} of type {type(dim).__name__}")
    return int(dim)


def _resolve_dim(t: Tensor, dim: int) -> int:
    """Validate ``dim`` against ``t`` (at least 2-D, like torch's structured methods)."""
    if t.dim() <= 1:
        raise ValueError(
            "Structured pruning can only be applied to multidimensional tensors; found a tensor "
            f"of shape {tuple(t.shape)} with {t.dim()} dims"
        )
    if not -t.dim() <= dim < t.dim():
        raise IndexError(f"Invalid index dim={dim} for tensor of size {tuple(t.shape)}")
    return dim % t.dim()


def _alive_channels(mask: Tensor, dim: int) -> Tensor:
    """Bool ``(n_channels,)``: channels along ``dim`` not already fully zeroed by ``mask``."""
    other = [d for d in range(mask.dim()) if d != dim]
    return mask.ne(0).any(dim=other) if other else mask.ne(0)


def _pruning_hooks(module: nn.Module) -> list[BasePruningMethod]:
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, BasePruningMethod)]


def _hook_for(module: nn.Module, name: str) -> BasePruningMethod | None:
    for hook in _pruning_hooks(module):
        if hook._tensor_name == name:
            return hook
    return None


def _check_scores_shape(module: nn.Module, name: str, scores: Tensor | None) -> None:
    if scores is None:
        return
    param = getattr(module, name + "_orig", None)
    if param is None:
        param = getattr(module, name)
    if not isinstance(scores, Tensor) or scores.shape != param.shape:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"importance_scores for parameter {name!r} of {type(module).__name__} must have "
            f"shape {tuple(param.shape)}, got {got}"
        )


def _effective(module: nn.Module, name: str, scores: Tensor | None = None) -> Tensor:
    """The tensor a pruning step sees: ``scores`` or the parameter, times the current mask."""
    if _hook_for(module, name) is None:
        base = scores if scores is not None else getattr(module, name)
        return base.detach()
    base = scores if scores is not None else getattr(module, name + "_orig")
    mask = getattr(module, name + "_mask")
    return base.detach() * mask.to(dtype=base.dtype)


# ---------------------------------------------------------------------------------------------
# trap (b): transactions — a failed call leaves every module exactly as it was
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _transaction(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Snapshot ``modules`` (parameters, buffers, forward pre-hooks, ``__dict__``, the contents
    of existing pruning containers) and restore them all if the body raises.

    torch's ``BasePruningMethod.apply`` moves ``name`` to ``name + '_orig'`` and detaches the old
    hook before ``compute_mask`` can fail; its own rollback re-registers the parameter at the end
    (so ``state_dict`` order changes) and forgets the hook it detached. This puts back the same
    objects in the same order (:class:`~torch_qmprune._transaction.ModelSnapshot`, without
    tensor values: masking never edits them in place).
    """
    with atomic(list(modules), values=False):
        yield


# ---------------------------------------------------------------------------------------------
# trap (c): deepcopy of pruned modules
# ---------------------------------------------------------------------------------------------


def _pruned_attribute_names(module: nn.Module) -> list[str]:
    """Names of recomputed pruned tensors (``module.weight`` = mask * orig) in ``__dict__``."""
    names = []
    for hook in _pruning_hooks(module):
        name = hook._tensor_name
        if isinstance(module.__dict__.get(name), Tensor):
            names.append(name)
    return names


def _refresh_pruned(module: nn.Module) -> None:
    """Recompute ``module.name = mask * orig`` for every pruning hook (as its forward would)."""
    for hook in _pruning_hooks(module):
        name = hook._tensor_name
        if name + "_orig" in module._parameters and name + "_mask" in module._buffers:
            setattr(module, name, hook.apply_mask(module))


class _DeepcopyPruned:
    """Instance-level ``__deepcopy__`` of a pruned module.

    torch (2.14) stores the pruned tensor ``module.weight = weight_mask * weight_orig`` as a plain
    attribute; while gradients are enabled it is a non-leaf tensor, which ``copy.deepcopy``
    refuses ("Only Tensors created explicitly by the user (graph leaves) support the deepcopy
    protocol"). This drops those recomputed attributes, deep-copies, puts them back, and
    recomputes them on the copy from its own ``_orig`` and ``_mask``.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __reduce__(self) -> tuple[type, tuple[nn.Module]]:
        return (_DeepcopyPruned, (self.module,))

    def __call__(self, memo: dict[int, Any]) -> nn.Module:
        module = self.module
        saved = {name: module.__dict__.pop(name) for name in _pruned_attribute_names(module)}
        own = module.__dict__.pop("__deepcopy__", None)
        try:
            clone = copy.deepcopy(module, memo)
        finally:
            module.__dict__.update(saved)
            if own is not None:
                module.__dict__["__deepcopy__"] = own
        _refresh_pruned(clone)
        _install_deepcopy(clone)
        return clone


def _install_deepcopy(module: nn.Module) -> None:
    """Give ``module`` the deepcopy fix if it is pruned, drop it if it no longer is."""
    current = module.__dict__.get("__deepcopy__")
    if _pruning_hooks(module):
        if not isinstance(current, _DeepcopyPruned) or current.module is not module:
            module.__dict__["__deepcopy__"] = _DeepcopyPruned(module)
    elif isinstance(current, _DeepcopyPruned):
        del module.__dict__["__deepcopy__"]


def make_deepcopyable(model: nn.Module) -> nn.Module:
    """Make ``copy.deepcopy`` work on a model pruned by ``torch.nn.utils.prune`` directly.

    torch 2.14 cannot deep-copy a pruned module while gradients are enabled (the recomputed
    ``module.weight`` is not a graph leaf). Modules pruned through this module's functions are
    already fixed; call this once on a model pruned by torch itself. Idempotent.

    Args:
        model: any module; every submodule carrying a pruning hook is fixed in place.

    Returns:
        ``model`` itself.

    Example:
        >>> import copy
        >>> from torch.nn.utils import prune as torch_prune
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> _ = torch_prune.l1_unstructured(net[0], "weight", amount=0.5)
        >>> clone = copy.deepcopy(make_deepcopyable(net))
        >>> bool(torch.equal(clone[0].weight_mask, net[0].weight_mask))
        True
    """
    for module in model.modules():
        _install_deepcopy(module)
    return model


# ---------------------------------------------------------------------------------------------
# spectral channel scores (paper §2.1, §2.3, §3.1)
# ---------------------------------------------------------------------------------------------


def _channel_matrices(t: Tensor, dim: int) -> Tensor:
    """``(n, a, b)``: every slice of ``t`` along ``dim`` viewed as its operator matrix (a conv
    filter ``(C_in, k, k)`` becomes ``C_in x k²``), like ``operator_matrix`` per slice."""
    slices = t.movedim(dim, 0)
    return slices.reshape(slices.shape[0], slices.shape[1], -1)


def _pairwise(states: Tensor, metric: str) -> Tensor:
    if metric == "fs":
        return pairwise_fubini_study(states)  # Eq. §2.3: d_FS = arccos |<ψ_i, ψ_j>|
    return pairwise_wasserstein2(states, kind="profile")


def _greedy_sibling_order(
    distances: Tensor, aggregation: str, *, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    """Greedy redundancy order (see :func:`_greedy_sibling_order_impl`), single-threaded."""
    with single_thread():
        return _greedy_sibling_order_impl(distances, aggregation, symmetric=symmetric)


def _greedy_sibling_order_impl(
    distances: Tensor, aggregation: str, *, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    """Greedy redundancy order of §3.1 sibling distances.

    Repeatedly remove the surviving channel whose distance to its nearest surviving sibling
    (``"nearest"``) or whose mean distance to the surviving siblings (``"mean"``) is smallest,
    ties to the lower index, recomputing against survivors only: of two identical channels the
    first goes at distance 0, after which the second's nearest sibling is someone else.

    ``"nearest"`` is computed without simulating the removals (:func:`_nearest_death_times`),
    in one pass of two NumPy calls per channel; ``"mean"`` runs the removals in NumPy.

    ``symmetric=True`` promises that ``distances`` is exactly symmetric (as
    :func:`~torch_qmprune.spectral.pairwise_fubini_study` of one set is), so that the
    symmetrization ``(d + dᵀ) / 2``, which would return it unchanged, is skipped.

    Returns:
        ``(order, at)``: positions in removal order (all ``n``) and the aggregated distance each
        had when removed (``inf`` for the last one, which has no sibling left).
    """
    n = distances.shape[0]
    dev, dtype = distances.device, distances.dtype
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=dev), torch.empty(0, dtype=dtype, device=dev)
    # float32 / float64 distances are used as they are (NumPy computes the same IEEE results);
    # other dtypes are read in float32
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    x = distances.detach().to("cpu", work).numpy()
    if symmetric and aggregation == "nearest":  # read only: no copy needed
        d = x
    else:
        d = x.T.copy()  # a contiguous transpose, then (a + b) / 2 exactly: exact symmetry
        d += x  # makes ties deterministic
        d *= 0.5
    if aggregation == "nearest":
        death = _nearest_death_times(d)
        order_np = np.argsort(death, kind="stable")  # ties to the lower index
        order = torch.from_numpy(order_np).to(dev)
        at = torch.from_numpy(death[order_np]).to(device=dev, dtype=dtype)
        return order, at
    np.fill_diagonal(d, 0.0)
    sums = torch.from_numpy(d).sum(dim=1).numpy()  # torch's summation order, as before
    alive = np.ones(n, dtype=bool)
    order_l: list[int] = []
    at_l: list[float] = []
    with np.errstate(invalid="ignore"):  # inf - inf = nan, as in torch
        _greedy_mean(d, sums, alive, order_l, at_l)
    return (
        torch.tensor(order_l, dtype=torch.long, device=dev),
        torch.tensor(at_l, dtype=torch.float64).to(device=dev, dtype=dtype),
    )


def _greedy_mean(
    d: np.ndarray, sums: np.ndarray, alive: np.ndarray, order_l: list[int], at_l: list[float]
) -> None:
    """The ``"mean"`` greedy of :func:`_greedy_sibling_order_impl`, step by step."""
    n = d.shape[0]
    for step in range(n):
        count = n - step - 1
        means = sums / count if count > 0 else np.full_like(sums, math.inf)
        candidates = np.where(alive, means, math.inf)
        i = int(candidates.argmin())
        if not alive[i]:  # only inf left: take the first survivor
            i = int(np.flatnonzero(alive)[0])
        order_l.append(i)
        at_l.append(float(candidates[i]) if count > 0 else math.inf)
        alive[i] = False
        sums -= d[:, i]


def _nearest_death_times(d: np.ndarray) -> np.ndarray:
    """Distance at which each channel leaves the ``"nearest"`` greedy (§3.1), without running it.

    The greedy removes, at each step, the lowest-index channel among those whose nearest
    surviving sibling is closest, i.e. the *lower* end ``v`` of the closest surviving pair
    ``(v, u)``, ``v < u`` (of the pairs at that distance, the one with the lowest ``v``). So
    channel ``v`` leaves through a pair with a higher-index sibling ``u``, namely the closest
    one still present then: ``u`` leaves after that pair's turn iff ``D(u) ≥ d(v, u)`` (at
    equal distance the lower index goes first). Hence the recursion, from the last channel
    (``D = inf``: it is never the lower end, so it is the last survivor) down::

        D(v) = min { d(v, u) : u > v, D(u) ≥ d(v, u) }

    and the removal order is the ``(D(v), v)`` order, each channel removed at distance ``D(v)``
    (its nearest-survivor distance at that step). Only the upper triangle of ``d`` is read.
    """
    n = d.shape[0]
    death = np.full(n, math.inf, dtype=d.dtype)
    if n < 2:
        return death
    # Usually D(v) is the distance to v's nearest higher-index sibling u* (when u* leaves no
    # earlier than that): take it from one vectorized row minimum and check it with scalar
    # Python; the masked scan runs only for the channels where the check fails.
    idx = np.arange(n)
    upper = np.where(idx[:, None] >= idx[None, :], d.dtype.type(math.inf), d)  # u > v only
    nearest = upper.argmin(axis=1).tolist()
    closest = upper[np.arange(n), nearest].tolist()
    mask = np.empty(n, dtype=bool)
    reduce, less_equal = np.minimum.reduce, np.less_equal
    for v in range(n - 2, -1, -1):
        value = closest[v]
        if death[nearest[v]] >= value:
            death[v] = value
            continue
        row = d[v, v + 1 :]
        ok = less_equal(row, death[v + 1 :], out=mask[: n - 1 - v])
        death[v] = reduce(row, where=ok, initial=math.inf)
    return death


def _leave_one_out_shifts(t: Tensor, dim: int, alive_idx: Tensor, metric: str) -> Tensor:
    """Distance between the spectral state (§2.1) of the whole tensor and that of the tensor
    with one channel zeroed (equivalently removed: a zero row/column only adds a zero singular
    value), for every channel in ``alive_idx``.

    When a channel is one row of the operator matrix (``dim=0``, or ``dim=1`` of a 2-D weight,
    a column), the spectra come from secular equations (:func:`_row_downdate_states`): O(r²)
    per channel instead of an SVD each. Otherwise (input channels of a conv, k² columns each)
    one batched ``svdvals`` per memory-sized chunk.
    """
    cdtype = t.dtype
    if dim == 0 or t.dim() == 2:
        mat = operator_matrix(t) if dim == 0 else t.T
        full, loo = _row_downdate_states(mat, alive_idx)
        if metric == "fs":
            shifts = pairwise_fubini_study(loo, full)[:, 0]
        else:
            shifts = pairwise_wasserstein2(torch.cat(pad_states(full, loo)), kind="profile")[0, 1:]
        return shifts.to(cdtype)
    n_channels = t.shape[dim]
    rows = t.shape[0]
    full = spectral_states(operator_matrix(t).unsqueeze(0), dtype=cdtype)
    view = [1] * (t.dim() + 1)
    view[dim + 1] = n_channels
    chunk = max(1, _LOO_CHUNK_ELEMENTS // max(t.numel(), 1))
    pieces = []
    for idx in alive_idx.split(chunk):
        keep = torch.ones(idx.numel(), n_channels, dtype=cdtype, device=t.device)
        keep[torch.arange(idx.numel(), device=t.device), idx] = 0
        batch = t.unsqueeze(0) * keep.view(idx.numel(), *view[1:])
        pieces.append(spectral_states(batch.reshape(idx.numel(), rows, -1), dtype=cdtype))
    loo = torch.cat(pieces)
    if metric == "fs":
        return pairwise_fubini_study(loo, full)[:, 0]
    return pairwise_wasserstein2(torch.cat([full, loo]), kind="profile")[0, 1:]


def _row_downdate_states(mat: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Augmented spectral states (§2.1, zero bias: the singular values of ``mat`` and a 1) of
    ``mat`` and of ``mat`` without each row in ``rows``, in float64: ``(full (1, r+1),
    loo (len(rows), r+1))``, ``r = min(m, n)``.

    One eigendecomposition of the smaller Gram, then per row the squared singular values of
    the rest are the eigenvalues of the rank-one downdate ``diag(λ) − z zᵀ`` (the row's
    coordinates in the eigenbasis: ``z = Vᵀ m_c`` with ``MᵀM = V diag(λ) Vᵀ``, or
    ``z_j = √λ_j U_cj`` with ``MMᵀ = U diag(λ) Uᵀ`` for a wide matrix, whose downdate has the
    eigenvalue 0 from the rank drop), roots of a secular equation. Same spectra as an
    ``eigvalsh`` of every downdated Gram (to a few ulps of the largest eigenvalue).
    """
    check_finite(mat, "weight matrices")
    m = mat.detach().double()
    peak = float(m.abs().max()) if m.numel() else 0.0
    # a power-of-two scale keeps the Gram in range; the augmentation's 1 is scaled with it
    scale = math.ldexp(1.0, math.frexp(peak)[1]) if peak > 0 else 1.0
    m = m / scale
    n, k = m.shape
    idx = rows.to(m.device)
    with single_thread():  # small LAPACK problems and loops of vector operations
        if n <= k:
            lam, vecs = torch.linalg.eigh(m @ m.T)
            lam = lam.clamp_min(0.0)
            weights = lam * vecs[idx].square()
        else:
            lam, vecs = torch.linalg.eigh(m.T @ m)
            lam = lam.clamp_min(0.0)
            weights = (m[idx] @ vecs).square()
        mu = downdated_eigvalsh(lam, weights, zero_first=n <= k)
    one = torch.full((1,), 1.0 / scale, dtype=m.dtype, device=m.device)
    full = torch.cat([lam.sqrt(), one]).sort(descending=True).values.unsqueeze(0)
    loo = torch.cat([mu.sqrt(), one.expand(mu.shape[0], 1)], dim=1)
    loo = loo.sort(dim=1, descending=True).values
    full = full / torch.linalg.vector_norm(full, dim=1, keepdim=True)
    loo = loo / torch.linalg.vector_norm(loo, dim=1, keepdim=True)
    return full, loo


# ---------------------------------------------------------------------------------------------
# the two spectral pruning methods
# ---------------------------------------------------------------------------------------------


class SpectralStructured(BasePruningMethod):
    r"""Prune whole channels whose spectral state is redundant (paper §2.1, §2.3, §3.1).

    Channels are the slices of the tensor along ``dim``; only channels not already fully
    zeroed by the incoming mask take part ("survivors"), and the spectral scores are computed
    on the tensor times that mask (the operator that actually runs). States are the paper's
    §2.1 states ψ = s/‖s‖ of the augmented slice [[W_c, 0], [0, 1]] (a channel slice carries no
    bias of its own, so b = 0); the augmentation keeps ψ defined for all-zero slices and makes
    it sensitive to the slice's scale relative to 1.

    ``score="sibling"`` (§3.1): D[i, j] = d_FS(ψ_i, ψ_j) (§2.3) or the W₂ distance of the
    majorization profiles (``metric="w2"``) between survivors' states; greedily remove the
    survivor whose distance to its nearest surviving sibling (``aggregation="nearest"``) or
    mean distance to the surviving siblings (``"mean"``) is smallest, recomputing against the
    survivors after each removal — two identical filters never both go unless nothing else is
    as redundant. Needs matrix slices (tensors of 3+ dims: a conv filter ``(C_in, k, k)`` is
    read as ``C_in x k²``).

    ``score="leave_one_out"``: the distance between ψ of the whole tensor (as
    ``operator_matrix``, augmented with b = 0 too) and ψ with the channel zeroed; the smallest
    shift is pruned first. This ranking is one-shot, not greedy: two duplicated rows have equal
    shifts and can both go. All leave-one-out matrices go through one batched ``svdvals``
    (chunked only when they would exceed 2**25 elements).

    ``score="auto"``: ``"sibling"`` when slices are matrices (``t.dim() >= 3``),
    ``"leave_one_out"`` when they are vectors. A vector slice (a Linear row) is a 1 x n matrix
    with a single singular value, so ψ = [1] for every row and all sibling distances are 0 —
    the degenerate unit of SCIENCE.md §2; ``score="sibling"`` on a 2-D tensor raises.

    The amount counts survivors: a float is a fraction of them, rounded like torch
    (``round(amount * n)``); an int is a count. Ties go to the lower index; the result is
    deterministic. Math runs in float32 (float64 for float64 tensors); the mask has ``t``'s
    dtype and device.

    Args:
        amount: fraction in [0, 1] or non-negative count of channels to prune.
        dim: dimension indexing channels (default 0: output channels / rows).
        metric: ``"fs"`` (Fubini–Study, §2.3) or ``"w2"`` (Wasserstein-2 of profiles, Thm 2.1).
        aggregation: ``"nearest"`` or ``"mean"`` (sibling score only).
        score: ``"auto"``, ``"sibling"`` or ``"leave_one_out"``.

    Example:
        >>> w = torch.randn(4, 2, 3, 3)
        >>> w[3] = w[1]  # channels 1 and 3 are identical
        >>> mask = SpectralStructured(amount=1).compute_mask(w, torch.ones_like(w))
        >>> [int(c) for c in mask.flatten(1).any(1).logical_not().nonzero()]
        [1]
    """

    PRUNING_TYPE = "structured"

    def __init__(
        self,
        amount: float,
        dim: int = 0,
        metric: str = "fs",
        aggregation: str = "nearest",
        score: str = "auto",
    ) -> None:
        self.amount = check_amount(amount, "amount")
        self.dim = _check_dim(dim)
        self.metric = _check_choice(metric, "metric", _METRICS)
        self.aggregation = _check_choice(aggregation, "aggregation", _AGGREGATIONS)
        self.score = _check_choice(score, "score", _SCORES)

    def _mode(self, t: Tensor) -> str:
        if self.score == "auto":
            return "sibling" if t.dim() >= 3 else "leave_one_out"
        if self.score == "sibling" and t.dim() < 3:
            raise ValueError(
                f"score='sibling' needs matrix channel slices, but a tensor of shape "
                f"{tuple(t.shape)} has vector slices: a 1 x n slice has one singular value, so "
                "its spectral state is always [1] and every sibling distance is 0. Use "
                "score='leave_one_out' (or 'auto')."
            )
        return self.score

    def _removal_order(self, t: Tensor, dim: int, alive: Tensor) -> tuple[Tensor, Tensor]:
        """Channel indices of the survivors in pruning order, and the score each is pruned at.

        Sibling scores are the greedy removal distances made non-decreasing (running max), so
        thresholding them prunes a prefix of the greedy order; the last survivor scores inf.
        Leave-one-out scores are the shifts themselves.
        """
        mode = self._mode(t)
        alive_idx = torch.nonzero(alive).flatten()
        if alive_idx.numel() == 0:
            empty = torch.empty(0, dtype=t.dtype, device=t.device)
            return alive_idx, empty
        if mode == "sibling":
            mats = _channel_matrices(t, dim)[alive_idx]
            states = spectral_states(mats, dtype=t.dtype)
            order, at = _greedy_sibling_order(_pairwise(states, self.metric), self.aggregation)
            return alive_idx[order], torch.cummax(at, dim=0).values
        shifts = _leave_one_out_shifts(t, dim, alive_idx, self.metric)
        order = torch.sort(shifts, stable=True).indices
        return alive_idx[order], shifts[order]

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        """Mask of ``t``'s shape, dtype and device: ``default_mask`` with the pruned channels
        zeroed.

        Args:
            t: tensor (or importance scores) to prune, at least 2-D.
            default_mask: mask from previous pruning steps, same shape as ``t``.

        Returns:
            The new mask.

        Example:
            >>> w = torch.zeros(3, 4)
            >>> w[0, 0], w[1, 1], w[2, 2] = 3.0, 2.0, 0.1
            >>> SpectralStructured(1).compute_mask(w, torch.ones_like(w)).sum(1)
            tensor([4., 4., 0.])
        """
        dim = _resolve_dim(t, self.dim)
        self._mode(t)  # reject vector slices before anything else
        if default_mask.shape != t.shape:
            raise ValueError(
                f"default_mask has shape {tuple(default_mask.shape)}, expected {tuple(t.shape)}"
            )
        with torch.no_grad():
            dm = default_mask.to(device=t.device)
            alive = _alive_channels(dm, dim)
            n_alive = int(alive.sum())
            k = _nparams_toprune(self.amount, n_alive)
            if k > n_alive:
                raise ValueError(
                    f"amount={self.amount!r} asks to prune {k} channels along dim {dim}, but "
                    f"only {n_alive} of {t.shape[dim]} channels are unpruned"
                )
            mask = dm.to(dtype=t.dtype).clone(memory_format=torch.contiguous_format)
            if k == 0:
                return mask
            cdtype = _compute_dtype(t)
            effective = t.detach().to(cdtype) * dm.to(cdtype)
            check_finite(effective, "tensor to prune")
            order, _ = self._removal_order(effective, dim, alive)
            mask.index_fill_(dim, order[:k], 0)
        return mask

    @classmethod
    def apply(  # type: ignore[override]
        cls,
        module: nn.Module,
        name: str,
        amount: float,
        dim: int = 0,
        metric: str = "fs",
        aggregation: str = "nearest",
        score: str = "auto",
        importance_scores: Tensor | None = None,
    ) -> BasePruningMethod:
        """Reparametrize ``module.name`` and prune it (transactional: a failure changes nothing).

        Args:
            module: module holding the tensor.
            name: parameter name, e.g. ``"weight"``.
            amount, dim, metric, aggregation, score: see the class.
            importance_scores: tensor of the parameter's shape used in place of it.

        Returns:
            The pruning method (or container) now hooked on the module.

        Example:
            >>> conv = nn.Conv2d(2, 4, 3)
            >>> _ = SpectralStructured.apply(conv, "weight", amount=2)
            >>> int((conv.weight_mask.flatten(1).sum(1) == 0).sum())
            2
        """
        with _transaction([module]):
            method = super().apply(
                module,
                name,
                amount=amount,
                dim=dim,
                metric=metric,
                aggregation=aggregation,
                score=score,
                importance_scores=importance_scores,
            )
        _install_deepcopy(module)
        return method


class SpectralUnstructured(BasePruningMethod):
    r"""Prune single weights by magnitude times their first-order spectral shift (§2.1, §2.3).

    Element score ``|w_ij| · (1 + α · g_ij / mean(g))``, lowest pruned first (ties as
    ``torch.topk``), where ``g_ij`` is the first-order Fubini–Study shift of the operator's
    non-augmented spectral state per unit ``|w_ij|`` when ``w_ij`` is zeroed.

    Derivation. Let W = operator_matrix(t) = U Σ Vᵀ (thin SVD), s = diag Σ, ψ = s/‖s‖.
    Zeroing w_ij is dW = −w_ij e_i e_jᵀ; for simple singular values
    dσ_k = u_kᵀ dW v_k = −w_ij U_ik V_jk, i.e. dσ = −w_ij x_ij with x_ij = (U_ik V_jk)_k.
    The state moves by dψ = (I − ψψᵀ) dσ / ‖s‖, and for unit vectors d_FS(ψ, ψ + dψ) = ‖dψ‖ to
    first order, so d_FS ≈ |w_ij| · g_ij with

        g_ij = sqrt(max(‖x_ij‖² − (ψ·x_ij)², 0)) / ‖s‖.

    Both terms are matmuls: ‖x_ij‖² = Σ_k U_ik² V_jk² = ((U∘U)(V∘V)ᵀ)_ij and
    ψ·x_ij = Σ_k ψ_k U_ik V_jk = (U diag(ψ) Vᵀ)_ij. Dividing by mean(g) makes the factor
    scale-free (g scales like 1/‖W‖). With repeated singular values the split of ‖x‖² inside
    the degenerate block depends on the SVD's basis: the score is a heuristic there.

    1-D tensors (biases, or the flattened vector that global pruning and pruning containers
    hand to ``compute_mask``) fall back to ``|t|``: ψ of a single row is trivially [1] and α has
    no effect. ``α = 0`` is exactly :class:`L1Unstructured` (bit-identical masks).
    :func:`spectral_unstructured` and :func:`global_unstructured` therefore compute the scores
    on the full tensors first (see :meth:`scores`).

    Args:
        amount: fraction in [0, 1] or non-negative count of entries to prune.
        alpha: weight of the spectral term, a finite float >= 0.

    Example:
        >>> w = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
        >>> SpectralUnstructured(amount=2).compute_mask(w, torch.ones_like(w))
        tensor([[1., 0.],
                [0., 1.]])
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float, alpha: float = 1.0) -> None:
        self.amount = check_amount(amount, "amount")
        self.alpha = self._check_alpha(alpha)

    @staticmethod
    def _check_alpha(alpha: object) -> float:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"alpha must be a finite float >= 0, got {alpha!r}")
        value = float(alpha)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"alpha must be a finite float >= 0, got {alpha!r}")
        return value

    @staticmethod
    def scores(t: Tensor, alpha: float = 1.0) -> Tensor:
        """Element scores ``|w_ij| · (1 + α · g_ij / mean(g))`` (see the class docstring).

        Args:
            t: weight (or importance scores) of any shape; 1-D tensors give ``|t|``.
            alpha: weight of the spectral term (finite, >= 0).

        Returns:
            Tensor of ``t``'s shape: ``|t|`` in ``t``'s dtype when ``alpha == 0`` or ``t`` is
            1-D, otherwise float32 (float64 for float64 ``t``).

        Example:
            >>> s = SpectralUnstructured.scores(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
            >>> s.shape, bool(s[0, 0] > s[1, 1])
            (torch.Size([2, 2]), True)
        """
        alpha = SpectralUnstructured._check_alpha(alpha)
        with torch.no_grad():
            magnitude = t.detach().abs()
            if alpha == 0 or t.dim() <= 1 or t.numel() == 0:
                return magnitude
            check_finite(t, "tensor to prune")
            cdtype = _compute_dtype(t)
            w = operator_matrix(t.detach()).to(cdtype)
            scale = w.abs().max()
            if float(scale) == 0.0:
                return magnitude.to(cdtype)
            u, s, vh = torch.linalg.svd(w / scale, full_matrices=False)
            v = vh.mT
            norm = torch.linalg.vector_norm(s)
            psi = s / norm
            sq = (u * u) @ (v * v).mT  # ‖x_ij‖²
            proj = (u * psi) @ v.mT  # ψ·x_ij
            g = torch.sqrt((sq - proj * proj).clamp(min=0.0)) / norm
            mean = g.mean()
            if not float(mean) > 0.0:
                return magnitude.to(cdtype)
            factor = 1.0 + alpha * (g / mean)
            return magnitude.to(cdtype) * factor.reshape(t.shape)

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        """Mask zeroing the ``amount`` lowest-scoring entries of ``t`` (over all of ``t``, like
        :class:`L1Unstructured`).

        Args:
            t: tensor (or importance scores) to prune.
            default_mask: mask from previous pruning steps, same shape as ``t``.

        Returns:
            ``default_mask`` (cloned, same dtype) with the pruned entries zeroed.

        Example:
            >>> SpectralUnstructured(1).compute_mask(torch.tensor([3.0, -1.0]), torch.ones(2))
            tensor([1., 0.])
        """
        size = t.nelement()
        k = _nparams_toprune(self.amount, size)
        if k > size:
            raise ValueError(
                f"amount={self.amount!r} asks to prune {k} entries but the tensor has {size}"
            )
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if k != 0:
            scores = self.scores(t, self.alpha)
            topk = torch.topk(scores.reshape(-1), k=k, largest=False)
            mask.view(-1)[topk.indices] = 0
        return mask

    @classmethod
    def apply(  # type: ignore[override]
        cls,
        module: nn.Module,
        name: str,
        amount: float,
        alpha: float = 1.0,
        importance_scores: Tensor | None = None,
    ) -> BasePruningMethod:
        """Reparametrize ``module.name`` and prune it (transactional: a failure changes nothing).

        When the tensor is already pruned, torch's container hands ``compute_mask`` only the
        flattened surviving entries; the scores are then computed here on the whole masked
        tensor and passed on as importance scores, so the spectral term is not lost.

        Args:
            module: module holding the tensor.
            name: parameter name.
            amount, alpha: see the class.
            importance_scores: tensor of the parameter's shape used in place of it.

        Returns:
            The pruning method (or container) now hooked on the module.

        Example:
            >>> lin = nn.Linear(4, 3)
            >>> _ = SpectralUnstructured.apply(lin, "weight", amount=5)
            >>> int((lin.weight_mask == 0).sum())
            5
        """
        alpha = cls._check_alpha(alpha)
        check_amount(amount, "amount")
        with _transaction([module]):
            if _hook_for(module, name) is not None and alpha != 0:
                _check_scores_shape(module, name, importance_scores)
                importance_scores = cls.scores(_effective(module, name, importance_scores), alpha)
            method = super().apply(
                module, name, amount=amount, alpha=alpha, importance_scores=importance_scores
            )
        _install_deepcopy(module)
        return method


# ---------------------------------------------------------------------------------------------
# functional API: spectral methods
# ---------------------------------------------------------------------------------------------


def spectral_structured(
    module: nn.Module,
    name: str,
    amount: float,
    dim: int = 0,
    metric: str = "fs",
    aggregation: str = "nearest",
    score: str = "auto",
    importance_scores: Tensor | None = None,
) -> nn.Module:
    """Prune channels of ``module.name`` with :class:`SpectralStructured` (§2.1, §2.3, §3.1).

    Same reparametrization as torch's ``ln_structured``; composes with earlier pruning through
    a :class:`PruningContainer`. A failure leaves the module untouched.

    Args:
        module: module holding the tensor.
        name: parameter name, e.g. ``"weight"``.
        amount: fraction in [0, 1] or non-negative count of (unpruned) channels to prune.
        dim: channel dimension (default 0).
        metric: ``"fs"`` or ``"w2"``.
        aggregation: ``"nearest"`` or ``"mean"``.
        score: ``"auto"``, ``"sibling"`` or ``"leave_one_out"``.
        importance_scores: tensor of the parameter's shape used in place of it.

    Returns:
        ``module``, pruned.

    Example:
        >>> conv = spectral_structured(nn.Conv2d(3, 8, 3), "weight", amount=0.25)
        >>> int((conv.weight_mask.flatten(1).sum(1) == 0).sum())
        2
    """
    SpectralStructured.apply(
        module,
        name,
        amount,
        dim=dim,
        metric=metric,
        aggregation=aggregation,
        score=score,
        importance_scores=importance_scores,
    )
    return module


def spectral_unstructured(
    module: nn.Module,
    name: str,
    amount: float,
    alpha: float = 1.0,
    importance_scores: Tensor | None = None,
) -> nn.Module:
    """Prune entries of ``module.name`` with :class:`SpectralUnstructured` (§2.1, §2.3).

    Args:
        module: module holding the tensor.
        name: parameter name.
        amount: fraction in [0, 1] or non-negative count of entries to prune.
        alpha: weight of the spectral term (0 gives exactly ``l1_unstructured``).
        importance_scores: tensor of the parameter's shape used in place of it.

    Returns:
        ``module``, pruned.

    Example:
        >>> lin = spectral_unstructured(nn.Linear(10, 4), "weight", amount=0.5)
        >>> int((lin.weight_mask == 0).sum())
        20
    """
    SpectralUnstructured.apply(
        module, name, amount, alpha=alpha, importance_scores=importance_scores
    )
    return module


def _check_parameters(parameters: object, caller: str) -> list[tuple[nn.Module, str]]:
    if not isinstance(parameters, Iterable):
        raise TypeError(f"{caller}(): parameters must be an iterable of (module, name) pairs")
    params = list(parameters)
    for i, pair in enumerate(params):
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not isinstance(pair[0], nn.Module)
            or not isinstance(pair[1], str)
        ):
            raise TypeError(
                f"{caller}(): parameters[{i}] must be a (module, name) pair, got {pair!r}"
            )
    return params


def global_unstructured(
    parameters: Iterable[tuple[nn.Module, str]],
    pruning_method: type[BasePruningMethod],
    importance_scores: Mapping[tuple[nn.Module, str], Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Prune entries of many tensors against one global threshold (torch's signature).

    For torch's methods this is exactly ``torch.nn.utils.prune.global_unstructured`` (same
    masks, bit for bit), made transactional and with ``amount`` validated. For
    :class:`SpectralUnstructured` each tensor's scores are first computed by
    :meth:`SpectralUnstructured.scores` in the tensor's own shape (on the tensor times its
    current mask; user ``importance_scores`` win), then torch's global thresholding runs on
    them. 1-D tensors (biases) score ``|b|``, whose factor is 1 where weights average 1 + α.

    Args:
        parameters: ``(module, name)`` pairs.
        pruning_method: an unstructured pruning class (``L1Unstructured``,
            ``SpectralUnstructured``, ...).
        importance_scores: optional ``{(module, name): tensor}``.
        **kwargs: the method's arguments, e.g. ``amount=0.5`` (and ``alpha``).

    Returns:
        None (modules are pruned in place, as in torch).

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 1))
        >>> global_unstructured([(net[0], "weight"), (net[1], "weight")],
        ...                     pruning_method=SpectralUnstructured, amount=10)
        >>> int((net[0].weight_mask == 0).sum() + (net[1].weight_mask == 0).sum())
        10
    """
    params = _check_parameters(parameters, "global_unstructured")
    if "amount" in kwargs:
        check_amount(kwargs["amount"], "amount")
    if importance_scores is not None and not isinstance(importance_scores, Mapping):
        raise TypeError("global_unstructured(): importance_scores must be a dict")
    scores = dict(importance_scores or {})
    if isinstance(pruning_method, type) and issubclass(pruning_method, SpectralUnstructured):
        alpha = pruning_method._check_alpha(kwargs.get("alpha", 1.0))
        for module, name in params:
            if (module, name) not in scores:
                scores[(module, name)] = pruning_method.scores(_effective(module, name), alpha)
    modules = [module for module, _ in params]
    with _transaction(modules):
        _torch_prune.global_unstructured(
            params, pruning_method, importance_scores=scores or None, **kwargs
        )
    for module in modules:
        _install_deepcopy(module)


def _layer_channel_scores(
    method: BasePruningMethod, t: Tensor, dim: int, alive: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-layer channel scores on a scale shared by all layers (for :func:`global_structured`).

    Returns ``(channels, scores)`` over the surviving channels, in tie-break order.
    """
    cdtype = _compute_dtype(t)
    alive_idx = torch.nonzero(alive).flatten()
    if isinstance(method, SpectralStructured):
        check_finite(t, "tensor to prune")
        return method._removal_order(t.to(cdtype), dim, alive)
    if isinstance(method, LnStructured):
        norms = _torch_prune._compute_norm(t.to(cdtype), method.n, dim)[alive_idx]
        mean = norms.mean()
        scores = norms / mean if float(mean) > 0 else torch.zeros_like(norms)
        return alive_idx, scores
    if isinstance(method, RandomStructured):
        return alive_idx, torch.rand(alive_idx.numel(), device=t.device, dtype=cdtype)
    raise TypeError(
        "global_structured(): pruning_method must be SpectralStructured, LnStructured or "
        f"RandomStructured, got {type(method).__name__}"
    )


def global_structured(
    parameters: Iterable[tuple[nn.Module, str]],
    amount: float,
    dim: int = 0,
    pruning_method: type[BasePruningMethod] = SpectralStructured,
    importance_scores: Mapping[tuple[nn.Module, str], Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Prune channels of many layers against ONE global threshold (torch has no such function).

    Each layer's surviving channels get a score on a scale shared by all layers, the
    ``amount`` lowest scores over all layers are pruned (ties: earlier layer, then the layer's
    own order), and the masks are applied like ``custom_from_mask`` (composing with earlier
    pruning). Normalization:

    * :class:`SpectralStructured`, sibling score: the aggregated sibling distance at which the
      greedy order (§3.1) removes the channel, made non-decreasing along the order (running
      max). Fubini–Study distances are angles in [0, π/2] for every layer, so they are compared
      as they are; a global threshold prunes a prefix of each layer's greedy order.
    * :class:`SpectralStructured`, leave-one-out score: the FS shift of the layer's state, an
      angle, compared as it is.
    * :class:`LnStructured`: the channel's Ln norm divided by the mean norm of the layer's
      surviving channels (a plain norm would favour pruning layers with small weights).
    * :class:`RandomStructured`: uniform random scores.

    Every layer keeps at least one channel: its highest-scoring survivor (for the sibling score
    the last of the greedy order) is never a candidate, and an amount that would need it
    raises ``ValueError``. The amount counts surviving channels over all layers.

    Args:
        parameters: ``(module, name)`` pairs of tensors with at least 2 dims.
        amount: fraction in [0, 1] or non-negative count of channels to prune in total.
        dim: channel dimension, the same for every tensor (default 0).
        pruning_method: ``SpectralStructured`` (default), ``LnStructured`` or
            ``RandomStructured``.
        importance_scores: optional ``{(module, name): tensor}`` used in place of the tensors.
        **kwargs: the method's own arguments (``metric``/``aggregation``/``score``, or ``n``).

    Returns:
        None (modules are pruned in place).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
        >>> global_structured([(net[0], "weight"), (net[1], "weight")], amount=6)
        >>> sum(int((m.weight_mask.flatten(1).sum(1) == 0).sum()) for m in net)
        6
    """
    params = _check_parameters(parameters, "global_structured")
    amount = check_amount(amount, "amount")
    dim = _check_dim(dim)
    if not (isinstance(pruning_method, type) and issubclass(pruning_method, BasePruningMethod)):
        raise TypeError(f"pruning_method must be a pruning class, got {pruning_method!r}")
    method = pruning_method(amount=0, dim=dim, **kwargs)
    if getattr(method, "PRUNING_TYPE", None) != "structured":
        raise TypeError(
            f"global_structured(): pruning_method must be structured, got "
            f"{pruning_method.__name__} of type {getattr(method, 'PRUNING_TYPE', None)!r}"
        )
    if importance_scores is not None and not isinstance(importance_scores, Mapping):
        raise TypeError("global_structured(): importance_scores must be a dict")
    importance_scores = importance_scores or {}

    layers = []  # (module, name, resolved dim, channels in order, scores)
    with torch.no_grad():
        for module, name in params:
            given = importance_scores.get((module, name))
            _check_scores_shape(module, name, given)
            t = _effective(module, name, given)
            d = _resolve_dim(t, dim)
            param_mask = getattr(module, name + "_mask", None)
            if param_mask is None:
                alive = torch.ones(t.shape[d], dtype=torch.bool, device=t.device)
            else:
                alive = _alive_channels(param_mask.to(t.device), d)
            channels, scores = _layer_channel_scores(method, t, d, alive)
            layers.append((module, name, d, channels, scores))

        total = sum(int(ch.numel()) for *_, ch, _ in layers)
        k = _nparams_toprune(amount, total)
        candidates = []  # (score, layer, channel), protected channel left out
        for li, (*_, channels, scores) in enumerate(layers):
            if channels.numel() == 0:
                continue
            # the protected survivor: the last of the greedy order (score inf), else the best
            infinite = torch.nonzero(torch.isinf(scores)).flatten()
            keep = int(infinite[-1]) if infinite.numel() else int(torch.argmax(scores))
            for pos, (score, channel) in enumerate(zip(scores.tolist(), channels.tolist())):
                if pos != keep:
                    candidates.append((score, li, channel))
        if k > len(candidates):
            raise ValueError(
                f"amount={amount!r} asks to prune {k} of {total} channels, but at most "
                f"{len(candidates)} can go while every layer keeps at least one channel"
            )
        # Python's sort is stable: equal scores keep (layer, own order)
        chosen = sorted(range(len(candidates)), key=lambda i: candidates[i][0])[:k]
        pruned: dict[int, list[int]] = {}
        for i in chosen:
            _, li, channel = candidates[i]
            pruned.setdefault(li, []).append(channel)

    modules = [module for module, _ in params]
    with _transaction(modules):
        for li, (module, name, d, _, _) in enumerate(layers):
            shape_src = getattr(module, name + "_orig", None)
            if shape_src is None:
                shape_src = getattr(module, name)
            mask = torch.ones_like(shape_src, dtype=shape_src.dtype)
            if pruned.get(li):
                idx = torch.tensor(sorted(pruned[li]), dtype=torch.long, device=mask.device)
                mask.index_fill_(d, idx, 0)
            _torch_prune.custom_from_mask(module, name, mask=mask)
    for module in modules:
        _install_deepcopy(module)


# ---------------------------------------------------------------------------------------------
# torch's own functions, validated and transactional
# ---------------------------------------------------------------------------------------------


def _run(module: nn.Module, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    with _transaction([module]):
        fn(module, *args, **kwargs)
    _install_deepcopy(module)
    return module


def identity(module: nn.Module, name: str) -> nn.Module:
    """torch's ``identity`` (mask of ones), transactional and deep-copyable.

    Args:
        module: module holding the tensor.
        name: parameter name.

    Returns:
        ``module`` with the pruning reparametrization.

    Example:
        >>> identity(nn.Linear(2, 3), "bias").bias_mask
        tensor([1., 1., 1.])
    """
    return _run(module, _torch_prune.identity, name)


def random_unstructured(module: nn.Module, name: str, amount: float) -> nn.Module:
    """torch's ``random_unstructured`` with ``amount`` validated first.

    Args:
        module: module holding the tensor.
        name: parameter name.
        amount: fraction in [0, 1] or non-negative count (``True``, NaN, inf rejected).

    Returns:
        ``module``, pruned.

    Example:
        >>> int((random_unstructured(nn.Linear(2, 3), "weight", 1).weight_mask == 0).sum())
        1
    """
    check_amount(amount, "amount")
    return _run(module, _torch_prune.random_unstructured, name, amount)


def l1_unstructured(
    module: nn.Module,
    name: str,
    amount: float,
    importance_scores: Tensor | None = None,
) -> nn.Module:
    """torch's ``l1_unstructured`` with ``amount`` validated first.

    Args:
        module: module holding the tensor.
        name: parameter name.
        amount: fraction in [0, 1] or non-negative count (``True``, NaN, inf rejected).
        importance_scores: tensor of the parameter's shape used in place of it.

    Returns:
        ``module``, pruned.

    Example:
        >>> list(l1_unstructured(nn.Linear(2, 3), "weight", 0.2).state_dict())
        ['bias', 'weight_orig', 'weight_mask']
    """
    check_amount(amount, "amount")
    return _run(
        module, _torch_prune.l1_unstructured, name, amount, importance_scores=importance_scores
    )


def random_structured(module: nn.Module, name: str, amount: float, dim: int) -> nn.Module:
    """torch's ``random_structured`` with ``amount`` validated first.

    Args:
        module: module holding the tensor.
        name: parameter name.
        amount: fraction in [0, 1] or non-negative count of channels.
        dim: channel dimension.

    Returns:
        ``module``, pruned.

    Example:
        >>> m = random_structured(nn.Linear(5, 3), "weight", amount=3, dim=1)
        >>> int((m.weight_mask.sum(0) == 0).sum())
        3
    """
    check_amount(amount, "amount")
    return _run(module, _torch_prune.random_structured, name, amount, dim)


def ln_structured(
    module: nn.Module,
    name: str,
    amount: float,
    n: float | str,
    dim: int,
    importance_scores: Tensor | None = None,
) -> nn.Module:
    """torch's ``ln_structured`` with ``amount`` validated first.

    Args:
        module: module holding the tensor.
        name: parameter name.
        amount: fraction in [0, 1] or non-negative count of channels.
        n: norm order, as in ``torch.norm``.
        dim: channel dimension.
        importance_scores: tensor of the parameter's shape used in place of it.

    Returns:
        ``module``, pruned.

    Example:
        >>> m = ln_structured(nn.Conv2d(5, 3, 2), "weight", amount=1, n=2, dim=0)
        >>> int((m.weight_mask.flatten(1).sum(1) == 0).sum())
        1
    """
    check_amount(amount, "amount")
    return _run(
        module,
        _torch_prune.ln_structured,
        name,
        amount,
        n,
        dim,
        importance_scores=importance_scores,
    )


def custom_from_mask(module: nn.Module, name: str, mask: Tensor) -> nn.Module:
    """torch's ``custom_from_mask``, transactional and deep-copyable.

    Args:
        module: module holding the tensor.
        name: parameter name.
        mask: binary mask of the parameter's shape.

    Returns:
        ``module``, pruned.

    Example:
        >>> custom_from_mask(nn.Linear(5, 3), "bias", torch.tensor([0, 1, 0])).bias_mask
        tensor([0., 1., 0.])
    """
    return _run(module, _torch_prune.custom_from_mask, name, mask)


def remove(module: nn.Module, name: str) -> nn.Module:
    """torch's ``remove``: make pruning of ``module.name`` permanent, drop the reparametrization.

    Args:
        module: pruned module.
        name: parameter name.

    Returns:
        ``module`` with a plain parameter ``name`` (pruned entries stay zero).

    Example:
        >>> m = remove(l1_unstructured(nn.Linear(5, 7), "weight", amount=0.2), "weight")
        >>> is_pruned(m), int((m.weight == 0).sum())
        (False, 7)
    """
    return _run(module, _torch_prune.remove, name)


def is_pruned(module: nn.Module) -> bool:
    """torch's ``is_pruned``: whether any submodule carries a pruning pre-hook.

    Args:
        module: any module.

    Returns:
        True if pruned.

    Example:
        >>> is_pruned(nn.Linear(5, 7))
        False
    """
    return _torch_prune.is_pruned(module)


# ---------------------------------------------------------------------------------------------
# trap (d): loading a pruned state_dict into a fresh model
# ---------------------------------------------------------------------------------------------


def load_pruned_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> Any:
    """Load a pruned model's ``state_dict`` (``x_orig`` / ``x_mask`` keys) into ``model``.

    For every ``prefix.x_mask`` key whose module has a plain parameter ``x``, the pruning
    reparametrization is recreated with ``custom_from_mask``; then ``load_state_dict`` runs and
    the pruned tensors are recomputed. All keys and shapes are validated before anything is
    changed: a mismatch raises naming the key and the expected and received shapes, and the
    model is left as it was. ``model`` may be fresh or already (partly) pruned the same way.

    Args:
        model: module of the same architecture as the one that produced ``state_dict``.
        state_dict: the pruned model's ``state_dict()``.
        strict: as in ``load_state_dict``: missing or unexpected keys raise.

    Returns:
        ``load_state_dict``'s named tuple of missing and unexpected keys.

    Raises:
        ValueError: a shape mismatch (the message names the key, expected and got shapes).
        RuntimeError: with ``strict``, missing or unexpected keys (all of them are listed).

    Example:
        >>> pruned = l1_unstructured(nn.Linear(4, 3), "weight", amount=6)
        >>> fresh = nn.Linear(4, 3)
        >>> _ = load_pruned_state_dict(fresh, pruned.state_dict())
        >>> bool(torch.equal(fresh.weight, pruned.weight))
        True
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    modules = dict(model.named_modules())
    plan: list[tuple[nn.Module, str, Tensor]] = []
    reparam: dict[str, torch.Size] = {}  # full key of x -> shape, for x that get reparametrized
    for key, value in state_dict.items():
        if not key.endswith("_mask"):
            continue
        prefix, _, leaf = key.rpartition(".")
        pname = leaf[: -len("_mask")]
        module = modules.get(prefix)
        if module is None or not pname:
            continue
        param = module._parameters.get(pname)
        if param is None or _hook_for(module, pname) is not None:
            continue  # not a pruning mask of a plain parameter (or already reparametrized)
        if not isinstance(value, Tensor) or value.shape != param.shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"state_dict key {key!r}: expected shape {tuple(param.shape)}, got {got}"
            )
        full = f"{prefix}.{pname}" if prefix else pname
        reparam[full] = param.shape
        plan.append((module, pname, value))

    expected: dict[str, torch.Size] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in reparam:
            expected[key + "_orig"] = value.shape
            expected[key + "_mask"] = value.shape
        else:
            expected[key] = value.shape
    for key, value in state_dict.items():
        if key in expected and isinstance(value, Tensor) and value.shape != expected[key]:
            raise ValueError(
                f"state_dict key {key!r}: expected shape {tuple(expected[key])}, "
                f"got {tuple(value.shape)}"
            )
    if strict:
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            raise RuntimeError(
                f"state_dict does not match the model: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )

    with _transaction(modules.values()):
        for module, pname, mask in plan:
            device = module._parameters[pname].device
            _torch_prune.custom_from_mask(module, pname, mask=mask.detach().to(device))
        result = model.load_state_dict(state_dict, strict=strict)
        for module in modules.values():
            _refresh_pruned(module)
    for module in modules.values():
        _install_deepcopy(module)
    return result
