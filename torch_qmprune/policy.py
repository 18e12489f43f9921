"""Budget-conditioned quantum policy gate for per-layer pruning ratios (arXiv 2512.00880 §4).

The paper's §4 gates the pruning of each operator with a parameterized unitary
``U(θ) = Π_t U_t(θ_t)`` conditioned on a resource budget, and learns its parameters from the
Lagrangian of Eq. (8)::

    L(θ) = Accuracy(θ) + λ₁·Resource(θ) + λ₂·Σ_layers d_FS(Φ_pruned, Φ_original)

by a quantum natural policy gradient (Fisher–Rao metric). This module makes that concrete.

**The gate** (:class:`QuantumPolicyGate`). One real register of dimension ``K = n_levels`` per
prunable layer (a qudit; ``⌈log₂ K⌉`` qubits); the joint state is the product ``|ψ(θ, b)⟩ = ⊗_l
U_l(θ_l, b)|0⟩``. Each ``U_l = U_{l,D} ⋯ U_{l,1}`` is a product of ``D = depth`` ladders of
Givens rotations ``G_{j,j+1}(φ)`` on adjacent basis states (``U_{l,1}``, ``U_{l,3}``, … run j =
0 → K−2, the others in reverse); one forward ladder from ``|0⟩`` already reaches every real unit
vector (hyperspherical coordinates), extra ladders over-parameterize. The budget enters as a
token ``τ = b − ½`` shifting every angle: ``φ = θ + w·τ`` (``budget_embedding="linear"``;
``"none"`` drops it). Measuring register ``l`` in the computational basis gives outcome ``k``
with the Born probability ``p_l(k) = |⟨k|ψ_l⟩|²``, i.e. keep level ``v_k`` (a fraction of the
layer's channels). Real amplitudes are a deliberate choice: for a real normalized state ``⟨ψ|∂ψ⟩
= 0``, so the quantum Fisher information ``4·Re(⟨∂ψ|∂ψ⟩ − ⟨∂ψ|ψ⟩⟨ψ|∂ψ⟩)`` (four times the
Fubini–Study metric of the state) *equals* the classical Fisher–Rao information of the Born
distribution, ``F = Σ_k p_k ∇log p_k ∇log p_kᵀ = 4 J_ψᵀ J_ψ``: the quantum natural gradient and
the Fisher–Rao natural policy gradient are the same object here. The product structure makes
``F`` block-diagonal (one ``P × P`` block per layer), computed exactly.

**The Lagrangian** (:class:`PolicyProblem`, :func:`build_policy_problem`). For layer ``l`` at
keep level ``k``:

* accuracy term ``A[l, k]``: the relative output error of the layer's consumers when its
  channels are merged into their siblings (least squares, as :func:`~torch_qmprune.prune` does)
  in the greedy order of :func:`~torch_qmprune.greedy_merge_costs` (the ``"qm"`` criterion's
  order), from calibration input Grams only (no forward pass per level). By default the merge
  is fitted on one half of the calibration data and its error measured on the other half
  (``accuracy_proxy="heldout"``); the in-sample cumulative greedy cost
  (``accuracy_proxy="greedy"``) is near zero wherever a consumer has about as many inputs as
  there are calibration samples (a Linear after a flatten) and misled the allocation there;
* drift term ``D[l, k]``: the Fubini–Study distance between the spectral state of the layer's
  weight matrix and that of the same matrix with the removed channels' rows cut (§2.1, §2.3;
  ``spectral_state(W, augment=False)``), averaged over the group's producers;
* resource ``R(q)``: the MACs (or parameter) fraction kept, as a function of per-layer keep
  fractions ``q``; measured with Torch-Pruning's counter by pruning each layer alone once and
  reading every module's cost ratio (``cost_m ∝ Π_l q_l^{e_ml}``, exact for convolutions,
  linears and BatchNorms; its expectation under the product distribution is exact too).

The per-outcome Lagrangian at budget ``b`` (normalized by the uniform allocation's values
``A_u(b)``, ``D_u(b)`` so that step sizes do not depend on the network)::

    L(k; b) = Σ_l A[l,k_l]/A_u(b) + ψ_ρ((R(k) − b)/b; λ₁) + ψ_ρ(Σ_l D[l,k_l]/D_u(b) − s; λ₂)

with ``ψ_ρ(v; λ) = λv + ρv²/2`` where ``λ + ρv ≥ 0`` and ``−λ²/2ρ`` otherwise (the augmented
Lagrangian of an inequality constraint ``v ≤ 0``, slope ``(λ + ρv)₊``; ``ρ = 0`` gives the
plain ``λ·v`` of Eq. (8)), multipliers ``λ₁, λ₂ ≥ 0`` updated by projected dual ascent
``λ ← (λ + η·E[v])₊``, and ``s`` the drift slack (1 = no more total drift than uniform
pruning at the same budget).

**The update** (:func:`train_policy`). Policy gradient of ``E_{k∼p}[L]``: either the
score-function (REINFORCE) estimator ``g = E[(L − baseline)·∇log p(k)]`` from ``samples``
Born samples with a leave-one-out baseline (``estimator="score"``), or its exact value
(``estimator="exact"``; the product distribution makes ``E[L]`` closed-form, differentiated by
autograd). Natural step: ``Δθ = −η (F/4 + εI)⁻¹ g`` per layer block (``F/4`` is the
Fubini–Study metric tensor, the metric of the quantum natural gradient; the constant only
rescales ``η`` so that natural and plain steps agree on a single rotation); plain step
``Δθ = −η g`` (``natural=False``). Steps are clipped to ``max_step`` (norm per layer). The
natural step is invariant to how the budget weights ``w`` are scaled: ``∂φ/∂w = τ`` is small,
so the plain gradient learns the budget dependence slowly (see the tests' two-budget toy).

**The allocation** (:func:`policy_allocation`): expected keep fractions of the trained gate,
then a common scale factor (bisection) and single-channel corrections until the resource of
the actually pruned copy is within ``tolerance`` of the budget; returns ``{layer: ratio}`` for
:func:`~torch_qmprune.prune` ``(layer_ratios=...)``. :func:`uniform_allocation` is the same
with one keep fraction for every layer (the fair baseline).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from ._validation import check_budget
from .calibration import CalibrationStats, InputGram, collect_input_grams, iter_calibration
from .importance import _as_rows, _is_out, greedy_merge_costs
from .spectral import fubini_study
from .structural import register_allocation

__all__ = [
    "QuantumPolicyGate",
    "ResourceModel",
    "PolicyProblem",
    "PolicyTraining",
    "PolicyReport",
    "build_policy_problem",
    "train_policy",
    "lagrangian_gradient",
    "policy_allocation",
    "uniform_allocation",
    "measure_resource",
    "ratio_for_keep",
]

_CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
EMBEDDINGS = ("linear", "none")
ESTIMATORS = ("score", "exact")
RESOURCES = ("macs", "params")


# ------------------------------------------------------------------------------------------
# The gate
# ------------------------------------------------------------------------------------------
def _ladders(psi: Tensor, angles: Tensor) -> Tensor:
    """Apply ``depth`` Givens ladders to real states ``psi (..., K)``; ``angles (..., D, K-1)``.

    Ladder ``t`` (0-based) rotates pairs (0,1), (1,2), ... for even ``t`` and in reverse order
    for odd ``t``: ``[x_j, x_{j+1}] ← [c x_j − s x_{j+1}, s x_j + c x_{j+1}]``.
    """
    k = psi.shape[-1]
    cols = list(psi.unbind(-1))
    cos, sin = torch.cos(angles), torch.sin(angles)
    for t in range(angles.shape[-2]):
        order = range(k - 1) if t % 2 == 0 else range(k - 2, -1, -1)
        for j in order:
            c, s = cos[..., t, j], sin[..., t, j]
            a, b = cols[j], cols[j + 1]
            cols[j], cols[j + 1] = c * a - s * b, s * a + c * b
    return torch.stack(cols, -1)


class QuantumPolicyGate(nn.Module):
    """Budget-conditioned product of parameterized unitaries, one register per layer (§4).

    ``|ψ(θ, b)⟩ = ⊗_l U_l(θ_l + w_l·τ)|0⟩`` with ``τ = b − ½``; each ``U_l`` is ``depth``
    ladders of real Givens rotations on a register of dimension ``n_levels`` (see the module
    docstring). Born probabilities over the register's basis are the distribution of the
    layer's keep level.

    Args:
        n_layers: number of prunable layers (registers).
        n_levels: register dimension ``K`` = number of keep levels.
        depth: number of rotation ladders ``U_t`` per register (1 is already state-universal).
        budget_embedding: ``"linear"`` (angles ``θ + w·τ``) or ``"none"`` (unconditioned).
        levels: the ``K`` keep fractions, ascending in (0, 1]; default ``k/K`` for k = 1..K.
        init: ``"uniform"`` (first ladder prepares the uniform superposition) or ``"zero"``
            (all angles 0: the state is ``|0⟩``, the lowest keep level, with certainty).
        init_noise: standard deviation of seeded noise added to the initial angles.
        seed: seed of the initial noise (and of ``w``).

    Example:
        >>> gate = QuantumPolicyGate(n_layers=3, n_levels=4, seed=0)
        >>> p = gate.probabilities(0.5)
        >>> p.shape, bool(torch.allclose(p.sum(-1), torch.ones(3, dtype=p.dtype)))
        (torch.Size([3, 4]), True)
        >>> gate.keep_ratios(0.5).shape
        torch.Size([3])
    """

    def __init__(
        self,
        n_layers: int,
        n_levels: int = 8,
        *,
        depth: int = 2,
        budget_embedding: str = "linear",
        levels: Sequence[float] | Tensor | None = None,
        init: str = "uniform",
        init_noise: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if int(n_layers) < 1 or int(n_levels) < 2 or int(depth) < 1:
            raise ValueError(f"need n_layers >= 1, n_levels >= 2, depth >= 1; got {n_layers}, "
                             f"{n_levels}, {depth}")
        if budget_embedding not in EMBEDDINGS:
            raise ValueError(f"budget_embedding must be one of {EMBEDDINGS}, got "
                             f"{budget_embedding!r}")
        if init not in ("uniform", "zero"):
            raise ValueError(f"init must be 'uniform' or 'zero', got {init!r}")
        n_layers, n_levels, depth = int(n_layers), int(n_levels), int(depth)
        if levels is None:
            lv = torch.arange(1, n_levels + 1, dtype=torch.float64) / n_levels
        else:
            lv = torch.as_tensor(levels, dtype=torch.float64).flatten()
            if lv.numel() != n_levels:
                raise ValueError(f"levels has {lv.numel()} entries, expected n_levels={n_levels}")
            if bool((lv <= 0).any() or (lv > 1).any() or (lv.diff() <= 0).any()):
                raise ValueError("levels must be ascending fractions in (0, 1]")
        self.n_layers, self.n_levels, self.depth = n_layers, n_levels, depth
        self.budget_embedding = budget_embedding
        self.register_buffer("levels", lv)
        gen = torch.Generator().manual_seed(int(seed))
        theta = torch.zeros(n_layers, depth, n_levels - 1, dtype=torch.float64)
        if init == "uniform":
            j = torch.arange(n_levels - 1, dtype=torch.float64)
            theta[:, 0] = torch.arccos(torch.sqrt(1.0 / (n_levels - j)))
        theta += init_noise * torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        self.theta = nn.Parameter(theta)
        w = init_noise * torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        if budget_embedding == "none":
            w.zero_()
        self.weight = nn.Parameter(w, requires_grad=budget_embedding != "none")

    # -- parameterization ---------------------------------------------------------------------
    @property
    def n_qubits(self) -> int:
        """Qubits per register, ``⌈log₂ n_levels⌉`` (the register is a ``K``-level qudit)."""
        return max(1, math.ceil(math.log2(self.n_levels)))

    @property
    def params_per_layer(self) -> int:
        """``P``: angles (and budget weights) of one register, the size of a Fisher block."""
        n = self.depth * (self.n_levels - 1)
        return 2 * n if self.budget_embedding == "linear" else n

    @staticmethod
    def token(budget: float) -> float:
        """Budget token ``τ = b − ½`` entering the angles."""
        return float(budget) - 0.5

    def flat_parameters(self) -> Tensor:
        """Trainable parameters as ``(n_layers, P)``: ``[θ_l, w_l]`` flattened per layer."""
        th = self.theta.reshape(self.n_layers, -1)
        if self.budget_embedding == "linear":
            return torch.cat([th, self.weight.reshape(self.n_layers, -1)], 1)
        return th

    @torch.no_grad()
    def set_flat_parameters(self, flat: Tensor) -> None:
        """Inverse of :meth:`flat_parameters` (in place)."""
        n = self.depth * (self.n_levels - 1)
        self.theta.copy_(flat[:, :n].reshape(self.theta.shape))
        if self.budget_embedding == "linear":
            self.weight.copy_(flat[:, n:].reshape(self.weight.shape))

    def _angles_from(self, flat: Tensor, budget: float) -> Tensor:
        n = self.depth * (self.n_levels - 1)
        lead = flat.shape[:-1]
        angles = flat[..., :n]
        if self.budget_embedding == "linear":
            angles = angles + flat[..., n:] * self.token(budget)
        return angles.reshape(*lead, self.depth, self.n_levels - 1)

    def _amplitudes_from(self, flat: Tensor, budget: float) -> Tensor:
        angles = self._angles_from(flat, budget)
        psi0 = torch.zeros(*angles.shape[:-2], self.n_levels, dtype=angles.dtype,
                           device=angles.device)
        psi0[..., 0] = 1.0
        return _ladders(psi0, angles)

    # -- states and distributions ---------------------------------------------------------------
    def amplitudes(self, budget: float) -> Tensor:
        """Real amplitudes ``ψ_l = U_l|0⟩`` of every register, ``(n_layers, K)``, unit rows."""
        return self._amplitudes_from(self.flat_parameters(), budget)

    def unitaries(self, budget: float) -> Tensor:
        """The matrices ``U_l`` themselves, ``(n_layers, K, K)`` (orthogonal: ``UᵀU = I``)."""
        angles = self._angles_from(self.flat_parameters(), budget)
        eye = torch.eye(self.n_levels, dtype=angles.dtype).expand(self.n_layers, -1, -1)
        # column k of U is U e_k: rotate the K basis vectors (batched)
        cols = _ladders(eye.transpose(1, 2), angles[:, None].expand(-1, self.n_levels, -1, -1))
        return cols.transpose(1, 2)

    def probabilities(self, budget: float) -> Tensor:
        """Born probabilities ``p_l(k) = |⟨k|ψ_l⟩|²``, ``(n_layers, K)``, rows sum to 1."""
        return self.amplitudes(budget) ** 2

    def joint_state(self, budget: float, max_dim: int = 1 << 16) -> Tensor:
        """The full product state ``⊗_l ψ_l`` (length ``K^L``; only for small gates)."""
        if self.n_levels ** self.n_layers > max_dim:
            raise ValueError(f"joint state has {self.n_levels}^{self.n_layers} entries "
                             f"(> max_dim={max_dim})")
        amps = self.amplitudes(budget)
        out = amps[0]
        for a in amps[1:]:
            out = torch.kron(out, a)
        return out

    @torch.no_grad()
    def keep_ratios(self, budget: float, mode: str = "expected",
                    values: Tensor | None = None) -> Tensor:
        """Per-layer keep fraction at ``budget``: ``"expected"`` ``Σ_k p_l(k)·v_k`` or
        ``"mode"`` (the most probable level). ``values`` ``(n_layers, K)`` overrides the
        nominal levels (e.g. the integer-rounded levels of :class:`PolicyProblem`)."""
        p = self.probabilities(budget)
        v = self.levels.expand_as(p) if values is None else values.to(p.dtype)
        if mode == "expected":
            return (p * v).sum(-1)
        if mode == "mode":
            return v.gather(1, p.argmax(1, keepdim=True)).squeeze(1)
        raise ValueError(f"mode must be 'expected' or 'mode', got {mode!r}")

    @torch.no_grad()
    def sample(self, budget: float, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` joint Born samples: level indices ``(n, n_layers)``."""
        p = self.probabilities(budget).clamp_min(0)
        return torch.multinomial(p, int(n), replacement=True, generator=generator).T

    # -- geometry ------------------------------------------------------------------------------
    def amplitude_jacobian(self, budget: float, method: str = "analytic") -> Tensor:
        """``J_l = ∂ψ_l/∂[θ_l, w_l]``, shape ``(n_layers, K, P)``.

        ``"analytic"``: hand-written forward mode through the ladders (each Givens rotation
        maps the tangents of earlier angles and emits its own, ``∂G/∂φ``); ``∂ψ/∂w = τ·∂ψ/∂θ``.
        ``"autograd"``: reverse-mode autograd per layer (slower; the reference for the tests).
        """
        flat = self.flat_parameters().detach()
        if method == "autograd":
            def single(f: Tensor) -> Tensor:
                return self._amplitudes_from(f, budget)

            return torch.stack([torch.autograd.functional.jacobian(single, f) for f in flat])
        if method != "analytic":
            raise ValueError(f"method must be 'analytic' or 'autograd', got {method!r}")
        angles = self._angles_from(flat, budget)                          # (L, D, K-1)
        n_layers, depth, k1 = angles.shape
        x = torch.zeros(n_layers, k1 + 1, dtype=angles.dtype)
        x[:, 0] = 1.0
        tang = torch.zeros(n_layers, k1 + 1, depth * k1, dtype=angles.dtype)
        cos, sin = torch.cos(angles), torch.sin(angles)
        for t in range(depth):
            order = range(k1) if t % 2 == 0 else range(k1 - 1, -1, -1)
            for j in order:
                c, s = cos[:, t, j], sin[:, t, j]
                a, b = x[:, j].clone(), x[:, j + 1].clone()
                ta, tb = tang[:, j].clone(), tang[:, j + 1].clone()
                tang[:, j] = c[:, None] * ta - s[:, None] * tb
                tang[:, j + 1] = s[:, None] * ta + c[:, None] * tb
                r = t * k1 + j
                tang[:, j, r] = -s * a - c * b
                tang[:, j + 1, r] = c * a - s * b
                x[:, j], x[:, j + 1] = c * a - s * b, s * a + c * b
        if self.budget_embedding == "linear":
            tang = torch.cat([tang, self.token(budget) * tang], -1)
        return tang

    def fisher(self, budget: float, method: str = "quantum") -> Tensor:
        """Fisher–Rao information of the Born distribution, one ``P × P`` block per layer.

        ``method="quantum"``: ``4 J_ψᵀ J_ψ`` (the quantum Fisher information of the real state,
        equal to the classical one); ``"born"``: ``Σ_k p_k ∇log p_k ∇log p_kᵀ`` computed from
        the probabilities (outcomes with ``p_k < 1e-12`` skipped). Shape ``(n_layers, P, P)``.

        Example:
            >>> gate = QuantumPolicyGate(1, 2, depth=1, budget_embedding="none", init_noise=0)
            >>> gate.fisher(0.5)  # one rotation: p = (cos²θ, sin²θ), F = 4 for every θ
            tensor([[[4.]]], dtype=torch.float64)
        """
        jac = self.amplitude_jacobian(budget)
        if method == "quantum":
            return 4.0 * jac.transpose(1, 2) @ jac
        if method != "born":
            raise ValueError(f"method must be 'quantum' or 'born', got {method!r}")
        psi = self.amplitudes(budget).detach()
        p = psi ** 2
        dp = 2.0 * psi[..., None] * jac                                   # (L, K, P)
        mask = (p > 1e-12).to(p.dtype)
        w = mask / p.clamp_min(1e-12)
        return torch.einsum("lk,lki,lkj->lij", w, dp, dp)

    def log_prob_jacobian(self, budget: float) -> Tensor:
        """``∇_[θ,w] log p_l(k) = 2 ∂ψ_lk/ψ_lk``, shape ``(n_layers, K, P)``."""
        jac = self.amplitude_jacobian(budget)
        psi = self.amplitudes(budget).detach()
        safe = torch.where(psi.abs() < 1e-12, torch.full_like(psi, 1e-12), psi)
        return 2.0 * jac / safe[..., None]


# ------------------------------------------------------------------------------------------
# The problem: accuracy, drift and resource tables
# ------------------------------------------------------------------------------------------
@dataclass
class ResourceModel:
    """``R(q) = Σ_t base_t Π_l q_l^{E_tl} / total``: a module's cost scales as a product of
    powers of the keep fractions of the layers (channel groups) it touches.

    Attributes:
        base: ``(T,)`` cost of each module in the unpruned network.
        exponents: ``(T, L)`` power of layer ``l``'s keep fraction in module ``t``'s cost
            (1 for a convolution's input and output groups, 1 for a BatchNorm, 0 otherwise).
        total: the network's total cost (``Σ base``).
        names: module names (for reports).

    Example:
        >>> rm = ResourceModel(torch.tensor([6.0, 4.0]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        >>> float(rm.fraction(torch.tensor([0.5, 0.5])))
        0.35
    """

    base: Tensor
    exponents: Tensor
    total: float | None = None
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base = torch.as_tensor(self.base, dtype=torch.float64)
        self.exponents = torch.as_tensor(self.exponents, dtype=torch.float64)
        if self.total is None:
            self.total = float(self.base.sum())

    def fraction(self, keep: Tensor) -> Tensor:
        """Resource fraction kept for keep fractions ``keep (..., L)``; returns ``(...)``."""
        q = keep.to(torch.float64).clamp_min(1e-12)
        terms = (q[..., None, :] ** self.exponents).prod(-1)              # (..., T)
        return terms @ self.base / self.total

    def expected_fraction(self, probs: Tensor, values: Tensor) -> Tensor:
        """``E[R]`` under independent per-layer distributions ``probs (L, K)`` over keep
        ``values (L, K)``: ``Σ_t base_t Π_l E[q_l^{E_tl}]`` (exact for a product state)."""
        powers = values.to(probs.dtype).clamp_min(1e-12)[None] ** self.exponents[..., None]
        moments = (powers * probs[None]).sum(-1)                          # (T, L)
        return moments.prod(-1) @ self.base / self.total


def _interp_row(values: Tensor, table: Tensor, keep: float) -> Tensor:
    """Piecewise-linear ``table(keep)`` through the points ``(values, table)``, constant below
    the lowest level and above the highest (levels may repeat after integer rounding)."""
    i = int(torch.searchsorted(values, torch.tensor([float(keep)], dtype=values.dtype)))
    if i == 0:
        return table[0]
    if i >= len(values):
        return table[-1]
    gap = float(values[i] - values[i - 1])
    t = 0.0 if gap <= 0 else (float(keep) - float(values[i - 1])) / gap
    return table[i - 1] + t * (table[i] - table[i - 1])


@dataclass
class PolicyProblem:
    """Per-(layer, level) tables of the Eq. (8) Lagrangian and the resource model.

    Attributes:
        values: ``(L, K)`` keep fraction of each level per layer (integer channel counts / n).
        accuracy: ``(L, K)`` accuracy proxy (cumulative relative merge error of the consumers).
        drift: ``(L, K)`` Fubini–Study drift of the layer's weight state.
        resource: the :class:`ResourceModel` (``None``: unconstrained problem).
        names: layer (group root) names; ``modules``: the root modules (keys for ``prune``).
        channels: channels per layer; ``curves``: full cumulative in-sample accuracy curves
            ``(n_l+1,)`` (``"greedy"`` proxy only); ``orders``: channel removal order per layer.

    Example (a toy problem from tables alone):
        >>> prob = PolicyProblem.from_tables(torch.tensor([[3.0, 1.0, 2.0]]))
        >>> prob.n_layers, prob.n_levels
        (1, 3)
    """

    values: Tensor
    accuracy: Tensor
    drift: Tensor
    resource: ResourceModel | None = None
    names: list[str] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    curves: list[Tensor] = field(default_factory=list)
    orders: list[Tensor] = field(default_factory=list)
    resource_kind: str | None = None
    seconds: float = 0.0

    @classmethod
    def from_tables(cls, accuracy: Tensor, *, drift: Tensor | None = None,
                    values: Tensor | None = None,
                    resource: ResourceModel | None = None) -> PolicyProblem:
        """A problem given directly by its tables (tests, toy problems, custom proxies)."""
        acc = torch.as_tensor(accuracy, dtype=torch.float64)
        n_layers, n_levels = acc.shape
        if values is None:
            values = (torch.arange(1, n_levels + 1, dtype=torch.float64) / n_levels).expand(
                n_layers, -1).clone()
        dr = torch.zeros_like(acc) if drift is None else torch.as_tensor(drift, dtype=torch.float64)
        return cls(values=torch.as_tensor(values, dtype=torch.float64), accuracy=acc, drift=dr,
                   resource=resource, names=[f"layer{i}" for i in range(n_layers)])

    @property
    def n_layers(self) -> int:
        return int(self.accuracy.shape[0])

    @property
    def n_levels(self) -> int:
        return int(self.accuracy.shape[1])

    def _interp(self, table: Tensor, keep: float) -> Tensor:
        return torch.stack([_interp_row(v, t, keep) for v, t in zip(self.values, table)])

    def uniform_keep(self, budget: float) -> float:
        """The common keep fraction ``u`` with ``R(u, …, u) = budget`` (continuous)."""
        if self.resource is None:
            return float(budget)
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            r = float(self.resource.fraction(torch.full((self.n_layers,), mid)))
            lo, hi = (mid, hi) if r < budget else (lo, mid)
        return hi

    def reference(self, budget: float) -> tuple[float, float]:
        """``(A_u, D_u)``: accuracy and drift totals of the uniform allocation at ``budget``
        (the normalizers of the Lagrangian), floored away from zero."""
        u = self.uniform_keep(budget)
        if self.curves:
            acc = sum(float(c[min(n, max(0, n - max(1, round(u * n))))])
                      for c, n in zip(self.curves, self.channels))
        else:
            acc = float(self._interp(self.accuracy, u).sum())
        drift = float(self._interp(self.drift, u).sum())
        acc_floor = 1e-3 * float(self.accuracy.max(1).values.sum().clamp_min(1e-12))
        drift_floor = 1e-3 * float(self.drift.max(1).values.sum().clamp_min(1e-12))
        return max(acc, acc_floor, 1e-12), max(drift, drift_floor, 1e-12)


def ratio_for_keep(keep: int, channels: int) -> float:
    """The channel ratio that makes Torch-Pruning keep exactly ``keep`` of ``channels``.

    Torch-Pruning keeps ``int(n·(1 − r))`` channels; ``r = 1 − (keep + ½)/n`` is exact under
    floating point (and 0 when nothing is removed).

    Example:
        >>> r = ratio_for_keep(7, 10); int(10 * (1 - r))
        7
    """
    keep, channels = int(keep), int(channels)
    if not 1 <= keep <= channels:
        raise ValueError(f"keep must be in [1, {channels}], got {keep}")
    return 0.0 if keep == channels else 1.0 - (keep + 0.5) / channels


def _default_ignored(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _groups(model: nn.Module, example_inputs: Any, ignored: Sequence[nn.Module]):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    groups = []
    for group in dg.get_all_groups(ignored_layers=list(ignored),
                                   root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
        n = len(group[0][1])
        if n >= 2:
            groups.append((group[0][0].target.module, n, group))
    return dg, groups


def _group_consumers(group, n: int, stats: CalibrationStats):
    """``(layer, rows, gram, blocks)`` for every calibrated consumer (as the "qm" criterion)."""
    out = []
    for i, (dep, idxs) in enumerate(group):
        layer = dep.layer
        if not isinstance(layer, _CONV_LINEAR) or _is_out(dep):
            continue
        entry = stats.get(layer)
        roots = list(group[i].root_idxs)
        if entry is None or any(r is None for r in roots):
            continue
        roots_t, idxs_t = torch.tensor(roots), torch.tensor(list(idxs))
        counts = torch.bincount(roots_t, minlength=n)
        if counts.min() == 0 or not bool((counts == counts[0]).all()):
            continue
        order = torch.argsort(roots_t, stable=True)
        blocks = idxs_t[order].reshape(n, int(counts[0]))
        out.append((layer, _as_rows(layer.weight.detach()), entry.gram, blocks))
    return out


def _group_producers(group):
    out = []
    for i, (dep, idxs) in enumerate(group):
        layer = dep.layer
        if isinstance(layer, _CONV_LINEAR) and _is_out(dep) and not getattr(layer, "transposed",
                                                                               False):
            roots = list(group[i].root_idxs)
            if any(r is None for r in roots):
                continue
            w = layer.weight.detach()[list(idxs)].double()
            out.append((w.reshape(w.shape[0], -1), torch.tensor(roots)))
    return out


def _state_from_gram(gram: Tensor) -> Tensor:
    """Spectral state (singular values of W, normalized, descending) from ``W Wᵀ``."""
    ev = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
    norm = torch.linalg.vector_norm(ev)
    return ev / norm if float(norm) > 0 else torch.ones(1, dtype=gram.dtype)


def _count_layerwise(model: nn.Module, example_inputs: Any, resource: str) -> dict[str, float]:
    flops, params, lf, lp = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    table = lf if resource == "macs" else lp
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for m, v in table.items():
        if v is None or len(list(m.children())) > 0:
            continue
        out[names.get(m, str(id(m)))] = float(v)
    out["__total__"] = float(flops if resource == "macs" else params)
    return out


def _prune_copy(model: nn.Module, example_inputs: Any, ignored: Sequence[nn.Module],
                keep: dict[nn.Module, tuple[int, int]]) -> nn.Module:
    """A deep copy with exactly ``keep[root] = (kept, channels)`` channels per layer (L1 order,
    no merging: only the shape matters)."""
    trial = copy.deepcopy(model)
    mapping = dict(zip(model.modules(), trial.modules()))
    ratios = {mapping[m]: ratio_for_keep(k, n) for m, (k, n) in keep.items() if k < n}
    if ratios:
        pruner = tp.pruner.BasePruner(
            trial, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=0.0, pruning_ratio_dict=ratios,
            ignored_layers=[mapping[m] for m in ignored])
        pruner.step()
    return trial


def measure_resource(model: nn.Module, example_inputs: Any,
                     layer_ratios: dict[nn.Module, float], *, resource: str = "macs",
                     ignored_layers: Sequence[nn.Module] | None = None) -> float:
    """Fraction of MACs (or parameters) left after pruning a deep copy with ``layer_ratios``
    (Torch-Pruning's counter; the model itself is untouched).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> round(measure_resource(net, torch.randn(1, 1, 8, 8), {net[0]: 0.5}), 2)
        0.5
    """
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
    ignored = _default_ignored(model) if ignored_layers is None else list(ignored_layers)
    trial = copy.deepcopy(model)
    mapping = dict(zip(model.modules(), trial.modules()))
    ratios = {mapping[m]: float(r) for m, r in layer_ratios.items() if r > 0}
    idx = 0 if resource == "macs" else 1  # tp returns (MACs, params)
    before = tp.utils.count_ops_and_params(model, example_inputs)[idx]
    if ratios:
        pruner = tp.pruner.BasePruner(
            trial, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=0.0, pruning_ratio_dict=ratios,
            ignored_layers=[mapping[m] for m in ignored])
        pruner.step()
    after = tp.utils.count_ops_and_params(trial, example_inputs)[idx]
    return float(after) / max(1.0, float(before))


def _resource_model(model: nn.Module, example_inputs: Any, roots: list[nn.Module],
                    channels: list[int], ignored: Sequence[nn.Module],
                    resource: str) -> ResourceModel:
    base = _count_layerwise(model, example_inputs, resource)
    total = base.pop("__total__")
    names = [n for n, v in base.items() if v > 0]
    exps = torch.zeros(len(names), len(roots), dtype=torch.float64)
    for j, (root, n) in enumerate(zip(roots, channels)):
        keep = max(1, n // 2)
        q = keep / n
        trial = _prune_copy(model, example_inputs, ignored, {root: (keep, n)})
        after = _count_layerwise(trial, example_inputs, resource)
        for t, name in enumerate(names):
            r = after.get(name, base[name]) / base[name]
            if abs(r - 1.0) > 1e-9 and r > 0:
                exps[t, j] = math.log(r) / math.log(q)
    base_t = torch.tensor([base[n] for n in names], dtype=torch.float64)
    rest = total - float(base_t.sum())
    if abs(rest) > 0.5:   # cost the counter attributes to no leaf module: constant
        base_t = torch.cat([base_t, torch.tensor([rest], dtype=torch.float64)])
        exps = torch.cat([exps, torch.zeros(1, len(roots), dtype=torch.float64)])
        names.append("__other__")
    return ResourceModel(base_t, exps, total=total, names=names)


def _split_calibration(calibration: Any, max_batches: int | None) -> tuple[list, list]:
    """Two disjoint halves of the calibration inputs (alternate batches, or rows of one)."""
    batches = list(iter_calibration(calibration, max_batches))
    if len(batches) == 1 and torch.is_tensor(batches[0]) and batches[0].shape[0] >= 2:
        half = batches[0].shape[0] // 2
        return [batches[0][:half]], [batches[0][half:]]
    if len(batches) < 2:
        raise ValueError("a held-out accuracy proxy needs at least two calibration inputs")
    return batches[0::2], batches[1::2]


def _merged_stats(a: CalibrationStats, b: CalibrationStats) -> CalibrationStats:
    grams = {m: InputGram(gram=a.grams[m].gram + b.grams[m].gram,
                          count=a.grams[m].count + b.grams[m].count)
             for m in a.grams if m in b.grams}
    return CalibrationStats(grams=grams, names=dict(a.names), n_samples=a.n_samples + b.n_samples,
                            n_batches=a.n_batches + b.n_batches, seconds=a.seconds + b.seconds)


@torch.no_grad()
def _heldout_costs(consumers: list, order: Tensor, counts: Sequence[int], n: int,
                   fit: CalibrationStats, held: CalibrationStats, damping: float) -> Tensor:
    """Relative output error of the consumers, on held-out activations, after merging the
    first ``n − c`` channels of ``order`` into the rest by ridge least squares fitted on the
    other half — one value per kept count ``c``.

    Features are ordered [constant, features of no channel, channels in reverse removal order]
    so that every kept set is a leading block: one Cholesky factor of the fitted Gram serves
    every level. With ``W_P`` the consumer weights reading the removed features and
    ``B = G_A[K,K]⁻¹ G_A[K,P]``, the held-out error is
    ``tr(W_P (G_B[P,P] − Bᵀ G_B[K,P] − G_B[P,K] B + Bᵀ G_B[K,K] B) W_Pᵀ)``, divided by the
    held-out output energy ``tr(W G_B W_ᵀ)``.
    """
    total = torch.zeros(len(counts), dtype=torch.float64)
    for layer, rows, _, blocks in consumers:
        ga, gb = fit.get(layer), held.get(layer)
        if ga is None or gb is None:
            continue
        d = ga.dim
        s = blocks.shape[1]
        in_blocks = torch.zeros(d, dtype=torch.bool)
        in_blocks[blocks.flatten()] = True
        other = torch.nonzero(~in_blocks).view(-1)
        chan = torch.cat([blocks[int(r)] for r in order.flip(0)])
        perm = torch.cat([torch.tensor([d]), other, chan])
        g_a = ga.gram.double()[perm][:, perm]
        g_b = gb.gram.double()[perm][:, perm]
        ridge = damping * float(g_a.diagonal()[1:].mean().clamp_min(1e-12))
        g_a = g_a + ridge * torch.eye(d + 1, dtype=torch.float64)
        chol = torch.linalg.cholesky(g_a)
        w = rows.double()
        w = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype)], 1)[:, perm]   # const last
        energy = float(torch.einsum("rd,de,re->", w[:, 1:], g_b[1:, 1:], w[:, 1:]))
        if energy <= 0:
            continue
        lead0 = 1 + len(other)
        for i, c in enumerate(counts):
            k = lead0 + int(c) * s
            if k >= d + 1:
                continue
            w_p = w[:, k:]                                                   # (R, |P|)
            g_pp, g_kp, g_kk = g_b[k:, k:], g_b[:k, k:], g_b[:k, :k]
            if w_p.shape[0] <= w_p.shape[1]:       # carry the R rows
                y = torch.cholesky_solve(g_a[:k, k:] @ w_p.T, chol[:k, :k])   # B W_Pᵀ (k, R)
                err = (float(((w_p @ g_pp) * w_p).sum()) - 2 * float((y * (g_kp @ w_p.T)).sum())
                       + float((y * (g_kk @ y)).sum()))
            else:                                  # carry the |P| removed features
                b = torch.cholesky_solve(g_a[:k, k:], chol[:k, :k])          # (k, |P|)
                m = w_p.T @ w_p
                sres = g_pp - b.T @ g_kp - g_kp.T @ b + b.T @ g_kk @ b
                err = float((sres * m).sum())
            total[i] += max(err, 0.0) / energy
    return total


def build_policy_problem(
    model: nn.Module,
    example_inputs: Any,
    *,
    calibration: Any = None,
    stats: CalibrationStats | None = None,
    resource: str = "macs",
    n_levels: int = 8,
    levels: Sequence[float] | None = None,
    ignored_layers: Sequence[nn.Module] | None = None,
    damping: float = 1e-4,
    accuracy_proxy: str = "heldout",
    max_calibration_batches: int | None = None,
    device: str | torch.device | None = None,
) -> PolicyProblem:
    """Tables of the Eq. (8) Lagrangian for every prunable layer (Torch-Pruning group) of
    ``model``: accuracy proxy and spectral drift per keep level, and the resource model.

    Args:
        model: the network (not modified).
        example_inputs: input for tracing and counting.
        calibration: batches for the input Grams (or pass ``stats``); without either, the
            accuracy proxy falls back to the relative weight energy of the removed rows.
        stats: precomputed :func:`~torch_qmprune.collect_input_grams` statistics.
        resource: ``"macs"`` or ``"params"``.
        n_levels, levels: keep levels (default ``k/n_levels``); rounded per layer to whole
            channels (at least one).
        ignored_layers: layers whose outputs are never pruned (default: the last Linear, as
            :func:`~torch_qmprune.prune`).
        damping: ridge of the merge-cost Gram inverses.
        accuracy_proxy: ``"heldout"`` (default with ``calibration``): the greedy merge order
            from all calibration Grams, but the error of each level measured on the half of the
            calibration data the merge was *not* fitted on (merges fitted on one half). This
            matters where a consumer's input dimension approaches the number of calibration
            samples (a Linear after a flatten): in-sample merge errors are then near zero and
            badly optimistic. ``"greedy"``: the in-sample cumulative greedy merge costs
            (cheapest; what the "qm" criterion ranks by). Without calibration data: relative
            weight energy of the removed rows.
        max_calibration_batches, device: passed to the Gram collection.

    Returns:
        :class:`PolicyProblem` (layers in Torch-Pruning's group order).
    """
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
    start = time.perf_counter()
    ignored = _default_ignored(model) if ignored_layers is None else list(ignored_layers)
    was_training = model.training
    model.eval()
    if accuracy_proxy not in ("heldout", "greedy"):
        raise ValueError(f"accuracy_proxy must be 'heldout' or 'greedy', got {accuracy_proxy!r}")
    dev = torch.device(device) if device is not None else None
    fit = held = None
    if stats is None and calibration is not None:
        if accuracy_proxy == "heldout":
            half_a, half_b = _split_calibration(calibration, max_calibration_batches)
            fit = collect_input_grams(model, half_a, device=dev)
            held = collect_input_grams(model, half_b, device=dev)
            stats = _merged_stats(fit, held)
        else:
            stats = collect_input_grams(model, calibration, max_batches=max_calibration_batches,
                                        device=dev)
    _, groups = _groups(model, example_inputs, ignored)
    if not groups:
        raise ValueError("no prunable channel group found (every layer ignored?)")
    lv = (torch.arange(1, n_levels + 1, dtype=torch.float64) / n_levels if levels is None
          else torch.as_tensor(levels, dtype=torch.float64))
    names_of = {m: n for n, m in model.named_modules()}
    values, acc_rows, drift_rows, curves, orders = [], [], [], [], []
    roots, channels = [], []
    for root, n, group in groups:
        counts = (lv * n).round().clamp(1, n).long()
        max_removed = n - int(counts.min())
        consumers = _group_consumers(group, n, stats) if stats is not None else []
        producers = _group_producers(group)
        if consumers:
            order, costs = greedy_merge_costs([c[1:] for c in consumers], n, damping=damping,
                                              max_steps=min(n, max_removed + 1))
        else:   # weight-only fallback: relative energy of the rows removed, smallest first
            energy = torch.zeros(n, dtype=torch.float64)
            for w, r in producers:
                energy.scatter_add_(0, r, (w ** 2).sum(1))
            energy = energy / energy.sum().clamp_min(1e-30)
            order = torch.argsort(energy)
            costs = energy[order]
        curve = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(costs.double(), 0)])
        rank = torch.empty(n, dtype=torch.long)
        rank[order] = torch.arange(n)
        drifts = torch.zeros(len(counts), dtype=torch.float64)
        for w, r in producers:
            gram = w @ w.T
            full = _state_from_gram(gram)
            for i, c in enumerate(counts.tolist()):
                kept = rank[r] >= n - c
                if bool(kept.all()):
                    continue
                sub = gram[kept][:, kept]
                drifts[i] += float(fubini_study(full, _state_from_gram(sub)))
        if producers:
            drifts /= len(producers)
        values.append(counts.double() / n)
        if consumers and fit is not None:
            acc_rows.append(_heldout_costs(consumers, order, counts.tolist(), n, fit, held,
                                           damping))
        else:
            acc_rows.append(curve[n - counts])
        drift_rows.append(drifts)
        curves.append(curve)
        orders.append(order)
        roots.append(root)
        channels.append(n)
    rmodel = _resource_model(model, example_inputs, roots, channels, ignored, resource)
    model.train(was_training)
    return PolicyProblem(values=torch.stack(values), accuracy=torch.stack(acc_rows),
                         drift=torch.stack(drift_rows), resource=rmodel,
                         names=[names_of.get(m, "") for m in roots], modules=roots,
                         channels=channels, curves=curves if fit is None else [], orders=orders,
                         resource_kind=resource,
                         seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------
# Training: natural policy gradient + dual ascent
# ------------------------------------------------------------------------------------------
def _constraint_term(v: Tensor, lam: float, rho: float) -> Tensor:
    """Augmented-Lagrangian term of the inequality constraint ``v ≤ 0`` (method of multipliers):
    ``λv + ρv²/2`` where ``λ + ρv ≥ 0``, else ``−λ²/(2ρ)``; its slope is ``(λ + ρv)₊``.
    ``ρ = 0`` gives the plain Lagrangian term ``λv``."""
    if rho <= 0:
        return lam * v
    active = lam + rho * v >= 0
    return torch.where(active, lam * v + 0.5 * rho * v * v,
                       torch.full_like(v, -lam * lam / (2 * rho)))


@dataclass
class PolicyTraining:
    """What :func:`train_policy` did: per-step history, final multipliers, steps run."""

    history: list[dict[str, float]] = field(default_factory=list)
    lambdas: dict[float, list[float]] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    natural: bool = True
    estimator: str = "score"


def _expected_terms(gate: QuantumPolicyGate, problem: PolicyProblem, budget: float,
                    flat: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """Exact ``E[A]``, ``E[R]`` and ``E[D]`` (unnormalized) at parameters ``flat``."""
    p = gate._amplitudes_from(flat, budget) ** 2
    acc = (p * problem.accuracy).sum()
    drift = (p * problem.drift).sum()
    res = (problem.resource.expected_fraction(p, problem.values)
           if problem.resource is not None else None)
    return acc, res, drift


def lagrangian_gradient(
    gate: QuantumPolicyGate,
    problem: PolicyProblem,
    budget: float,
    *,
    lambdas: Sequence[float] = (0.0, 0.0),
    estimator: str = "score",
    samples: int = 64,
    penalty: float = 1.0,
    drift_slack: float = 1.0,
    use_drift: bool = True,
    generator: torch.Generator | None = None,
    reference: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Policy gradient of the expected Eq. (8) Lagrangian at one budget.

    ``estimator="score"``: REINFORCE, ``g = (1/S) Σ_s (L_s − β_s) ∇log p(k_s)`` with
    ``∇log p_l(k) = 2 ∂ψ_lk/ψ_lk`` and the leave-one-out baseline ``β_s`` (unbiased);
    ``"exact"``: autograd of the closed-form ``E[L]`` (the product state makes every
    expectation exact), i.e. the score-function gradient with the sum over outcomes done exactly.

    Returns:
        ``(g, J, terms)``: the gradient ``(L, P)``, the amplitude Jacobian ``(L, K, P)`` (for the
        Fisher blocks) and the exact expectations (``accuracy``, ``resource``, ``drift``,
        normalized; ``resource_violation`` = (E[R] − b)/b; ``drift_violation``;
        ``lagrangian``).

    Example:
        >>> prob = PolicyProblem.from_tables(torch.tensor([[1.0, 0.0]]))
        >>> gate = QuantumPolicyGate(1, 2, depth=1, budget_embedding="none", init_noise=0)
        >>> g, _, _ = lagrangian_gradient(gate, prob, 0.5, estimator="exact")
        >>> float(g[0, 0]) < 0   # raising θ moves mass to the cheaper outcome 1
        True
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    b = float(budget)
    l1, l2 = (float(v) for v in lambdas)
    a_ref, d_ref = problem.reference(b) if reference is None else reference
    has_res = problem.resource is not None
    has_drift = use_drift and float(problem.drift.abs().sum()) > 0
    n_layers = gate.n_layers
    flat = gate.flat_parameters().detach()
    with torch.no_grad():
        jac = gate.amplitude_jacobian(b)                                  # (L, K, P)
        acc, res, drift = _expected_terms(gate, problem, b, flat)
    if estimator == "exact":
        f = flat.clone().requires_grad_(True)
        e_acc, e_res, e_drift = _expected_terms(gate, problem, b, f)
        lag = e_acc / a_ref
        if has_res:
            lag = lag + _constraint_term((e_res - b) / b, l1, penalty)
        if has_drift:
            lag = lag + _constraint_term(e_drift / d_ref - drift_slack, l2, penalty)
        (g,) = torch.autograd.grad(lag, f)
    else:
        with torch.no_grad():
            psi = gate._amplitudes_from(flat, b)
            p = (psi ** 2).clamp_min(0)
            ks = torch.multinomial(p, samples, replacement=True, generator=generator)  # (L, S)
            rows = torch.arange(n_layers)[:, None]
            lag_s = problem.accuracy[rows, ks].sum(0) / a_ref                  # (S,)
            if has_res:
                q = problem.values[rows, ks].T                                 # (S, L)
                lag_s = lag_s + _constraint_term((problem.resource.fraction(q) - b) / b, l1,
                                                 penalty)
            if has_drift:
                lag_s = lag_s + _constraint_term(
                    problem.drift[rows, ks].sum(0) / d_ref - drift_slack, l2, penalty)
            base = (lag_s.sum() - lag_s) / max(1, samples - 1)
            adv = lag_s - base                                                 # (S,)
            safe = torch.where(psi.abs() < 1e-12, torch.full_like(psi, 1e-12), psi)
            score = 2.0 * jac / safe[..., None]                                # (L, K, P)
            g = (adv[None, :, None] * score[rows, ks]).mean(1)
    res_v = float(res - b) / b if has_res else 0.0
    drift_v = float(drift) / d_ref - drift_slack if has_drift else 0.0
    lag_val = float(acc) / a_ref
    if has_res:
        lag_val += float(_constraint_term(torch.tensor(res_v), l1, penalty))
    if has_drift:
        lag_val += float(_constraint_term(torch.tensor(drift_v), l2, penalty))
    terms = {"accuracy": float(acc) / a_ref, "resource": float(res) if has_res else float("nan"),
             "drift": float(drift) / d_ref, "resource_violation": res_v,
             "drift_violation": drift_v, "lagrangian": lag_val}
    return g, jac, terms


def train_policy(
    gate: QuantumPolicyGate,
    problem: PolicyProblem,
    budgets: float | Sequence[float] = 0.5,
    *,
    steps: int = 300,
    lr: float = 0.2,
    natural: bool = True,
    estimator: str = "score",
    samples: int = 64,
    damping: float = 1e-2,
    dual_lr: float = 0.5,
    penalty: float = 1.0,
    drift_slack: float = 1.0,
    use_drift: bool = True,
    max_step: float = 0.5,
    lambdas: dict[float, Sequence[float]] | None = None,
    seed: int = 0,
    until: Callable[[QuantumPolicyGate], bool] | None = None,
    log_every: int = 1,
) -> PolicyTraining:
    """Learn the gate by natural policy gradient on the Eq. (8) Lagrangian, with dual ascent.

    Each step, for every training budget ``b``: the gradient ``g_b`` of ``E_{k∼p(·|b)}[L(k; b)]``
    (score-function estimate from ``samples`` Born samples with a leave-one-out baseline, or
    exact), the Fisher blocks ``F_b = 4 J_ψᵀ J_ψ``; then per layer
    ``Δ = −lr·(F̄/4 + damping·I)⁻¹ ḡ`` (natural: ``F/4`` is the Fubini–Study metric tensor of
    the state, the quantum natural gradient's metric, equal to the Fisher–Rao metric up to the
    constant 4 for real states) or ``Δ = −lr·ḡ`` (plain), bars = mean over budgets, clipped to
    ``max_step`` (Euclidean norm per layer), and ``λ₁ ← (λ₁ + dual_lr·(E[R] − b)/b)₊``,
    ``λ₂ ← (λ₂ + dual_lr·(E[D]/D_u − drift_slack))₊``. The constraint terms are augmented
    (method of multipliers, :func:`_constraint_term`, ``penalty = ρ``) to damp the primal–dual
    oscillation; the score-function estimator applies them per sample.

    Args:
        gate: the :class:`QuantumPolicyGate` (updated in place); ``n_layers`` and
            ``n_levels`` must match the problem.
        problem: the :class:`PolicyProblem` (``resource=None``: no λ₁ term; all-zero drift or
            ``use_drift=False``: no λ₂ term).
        budgets: one budget or several (the gate is conditioned on each; amortized training).
        steps: number of updates.
        lr: step size.
        natural: natural gradient (Fisher–Rao preconditioning) or plain gradient.
        estimator: ``"score"`` (REINFORCE) or ``"exact"``.
        samples: Born samples per budget and step for ``"score"``.
        damping: Tikhonov damping ``ε`` of the Fisher blocks.
        dual_lr: dual ascent step of the multipliers.
        penalty: ``ρ`` of the augmented constraint terms (0: plain Lagrangian ``λ·v``).
        drift_slack: allowed total drift, relative to the uniform allocation's.
        use_drift: include the λ₂ drift constraint.
        max_step: cap on the per-layer parameter step norm (radians).
        lambdas: initial ``{budget: [λ₁, λ₂]}`` (default zeros).
        seed: seed of the Born sampling.
        until: stop early once ``until(gate)`` is true (checked before every step).
        log_every: record the history every this many steps.

    Returns:
        :class:`PolicyTraining`.

    Example:
        >>> prob = PolicyProblem.from_tables(torch.tensor([[3.0, 0.0, 2.0, 5.0]]))
        >>> gate = QuantumPolicyGate(1, 4, seed=0)
        >>> _ = train_policy(gate, prob, 0.5, steps=60, estimator="exact")
        >>> int(gate.probabilities(0.5).argmax())
        1
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if gate.n_layers != problem.n_layers or gate.n_levels != problem.n_levels:
        raise ValueError(f"gate is {gate.n_layers}×{gate.n_levels} but the problem is "
                         f"{problem.n_layers}×{problem.n_levels}")
    start = time.perf_counter()
    budgets = [float(budgets)] if isinstance(budgets, (int, float)) else [float(b) for b in budgets]
    lam = {b: [float(x) for x in (lambdas or {}).get(b, (0.0, 0.0))] for b in budgets}
    refs = {b: problem.reference(b) for b in budgets}
    has_res = problem.resource is not None
    has_drift = use_drift and float(problem.drift.abs().sum()) > 0
    gen = torch.Generator().manual_seed(int(seed))
    out = PolicyTraining(natural=natural, estimator=estimator)
    n_layers, n_params = gate.n_layers, gate.params_per_layer
    for step in range(int(steps)):
        if until is not None and until(gate):
            break
        flat = gate.flat_parameters().detach()
        grad = torch.zeros(n_layers, n_params, dtype=torch.float64)
        fisher = torch.zeros(n_layers, n_params, n_params, dtype=torch.float64)
        record: dict[str, float] = {"step": float(step)}
        violations = {}
        for b in budgets:
            l1, l2 = lam[b]
            g, jac, terms = lagrangian_gradient(
                gate, problem, b, lambdas=(l1, l2), estimator=estimator, samples=samples,
                penalty=penalty, drift_slack=drift_slack, use_drift=use_drift, generator=gen,
                reference=refs[b])
            grad += g
            fisher += 4.0 * jac.transpose(1, 2) @ jac
            violations[b] = (terms["resource_violation"], terms["drift_violation"])
            if step % log_every == 0:
                tag = f"@{b:g}"
                record.update({f"lagrangian{tag}": terms["lagrangian"],
                               f"accuracy{tag}": terms["accuracy"],
                               f"resource{tag}": terms["resource"],
                               f"drift{tag}": terms["drift"], f"lambda1{tag}": l1,
                               f"lambda2{tag}": l2})
        grad /= len(budgets)
        fisher /= len(budgets)
        if natural:
            eye = torch.eye(n_params, dtype=torch.float64)
            metric = 0.25 * fisher   # Fubini–Study metric tensor = Fisher–Rao / 4 (real state)
            delta = torch.linalg.solve(metric + damping * eye, grad.unsqueeze(-1)).squeeze(-1)
        else:
            delta = grad
        step_vec = lr * delta
        if max_step is not None:
            norm = torch.linalg.vector_norm(step_vec, dim=1, keepdim=True)
            step_vec = step_vec * torch.clamp(max_step / norm.clamp_min(1e-30), max=1.0)
        gate.set_flat_parameters(flat - step_vec)
        for b in budgets:
            if has_res:
                lam[b][0] = max(0.0, lam[b][0] + dual_lr * violations[b][0])
            if has_drift:
                lam[b][1] = max(0.0, lam[b][1] + dual_lr * violations[b][1])
        if step % log_every == 0:
            out.history.append(record)
        out.steps = step + 1
    out.lambdas = lam
    out.seconds = time.perf_counter() - start
    return out


# ------------------------------------------------------------------------------------------
# Allocation: meet the budget exactly, verify on a pruned copy
# ------------------------------------------------------------------------------------------
@dataclass
class PolicyReport:
    """What :func:`policy_allocation` (or :func:`uniform_allocation`) produced."""

    method: str
    budget: float
    resource: str
    achieved: float
    achieved_model: float
    scale: float
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    lambdas: list[float] = field(default_factory=list)
    expected_resource: float = float("nan")
    accuracy_proxy: float = float("nan")
    drift_proxy: float = float("nan")
    uniform_accuracy_proxy: float = float("nan")
    uniform_drift_proxy: float = float("nan")
    natural: bool = True
    estimator: str = "score"
    steps: int = 0
    problem_seconds: float = 0.0
    train_seconds: float = 0.0
    correction_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        """``achieved / budget − 1``."""
        return self.achieved / self.budget - 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_error"] = self.relative_error
        return d

    def __str__(self) -> str:
        return (f"PolicyReport({self.method}, {self.resource} budget {self.budget:.3f} -> "
                f"{self.achieved:.4f} ({100 * self.relative_error:+.2f}%), "
                f"{len(self.layers)} layers)")


def _meet_budget(model: nn.Module, example_inputs: Any, problem: PolicyProblem,
                 keep: Tensor, budget: float, *, ignored: Sequence[nn.Module],
                 tolerance: float, max_rounds: int = 5,
                 measure: bool = True) -> tuple[list[int], float, float, float]:
    """Integer channel counts close to ``s·keep`` whose *measured* resource is within
    ``tolerance`` (relative) of ``budget``.

    Each round works on the resource model plus an offset (what the model missed at the last
    measurement): bisection on the common scale ``s``, then, if the rounding step is still too
    coarse, single-channel moves (the one that lands closest to the budget, ties to the layer
    with the smaller accuracy cost); then one pruned copy is counted and the offset updated.

    ``measure=False`` stops after the first round on the model alone (no pruned copy).

    Returns ``(counts, scale, measured_fraction, model_fraction)`` (measured = model fraction
    when ``measure=False``).
    """
    rm = problem.resource
    n = torch.tensor(problem.channels, dtype=torch.float64)
    keep = keep.double().clamp(1e-3, 1.0)
    idx = 0 if problem.resource_kind == "macs" else 1  # tp: (MACs, params)
    before = float(tp.utils.count_ops_and_params(model, example_inputs)[idx]) if measure else 1.0

    def counts_at(s: float) -> Tensor:
        return (s * keep * n).round().clamp(torch.ones_like(n), n)

    def model_frac(c: Tensor) -> float:
        return float(rm.fraction(c / n))

    def count(c: Tensor) -> float:
        keep_map = {m: (int(k), int(nn_)) for m, k, nn_ in zip(problem.modules, c.tolist(),
                                                              n.tolist())}
        trial = _prune_copy(model, example_inputs, ignored, keep_map)
        return float(tp.utils.count_ops_and_params(trial, example_inputs)[idx]) / before

    def cost_of(c: Tensor) -> float:
        return _proxies(problem, [int(k) for k in c.tolist()])[0]

    offset, scale = 0.0, 1.0
    best: tuple[float, Tensor, float, float] | None = None
    for _ in range(max_rounds):
        target = budget - offset
        lo, hi = 0.0, float(1.0 / keep.min())
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if model_frac(counts_at(mid)) < target else (lo, mid)
        c_lo, c_hi = counts_at(lo), counts_at(hi)
        use_lo = abs(model_frac(c_lo) - target) <= abs(model_frac(c_hi) - target)
        c, scale = (c_lo, lo) if use_lo else (c_hi, hi)
        err_model = abs((model_frac(c) + offset) / budget - 1.0)
        for _ in range(4 * len(problem.channels)):
            if err_model <= 0.25 * tolerance:
                break
            cands = []
            for i in range(len(c)):
                for d in (-1, 1):
                    k = float(c[i]) + d
                    if 1 <= k <= n[i]:
                        c2 = c.clone()
                        c2[i] = k
                        e = abs((model_frac(c2) + offset) / budget - 1.0)
                        cands.append((round(e, 6), cost_of(c2), i, c2))
            cands.sort(key=lambda t: (t[0], t[1]))
            if not cands or cands[0][0] >= err_model:
                break
            err_model, c = cands[0][0], cands[0][3]
        if not measure:
            return [int(k) for k in c.tolist()], scale, model_frac(c), model_frac(c)
        got = count(c)
        err = abs(got / budget - 1.0)
        if best is None or err < best[0]:
            best = (err, c, got, scale)
        if err <= 0.5 * tolerance:
            break
        offset = got - model_frac(c)
    err, c, got, scale = best
    if err > tolerance:
        warnings.warn(f"{problem.resource_kind} budget {budget:.4f} met only within "
                      f"{100 * err:.2f}% ({got:.4f}); channel counts are too coarse for "
                      f"tolerance={tolerance}", stacklevel=3)
    return [int(k) for k in c.tolist()], scale, got, model_frac(c)


def _report_layers(problem: PolicyProblem, counts: list[int],
                   policy_keep: Tensor | None) -> dict[str, dict[str, float]]:
    layers = {}
    for i, (name, n, k) in enumerate(zip(problem.names, problem.channels, counts)):
        entry = {"channels": n, "kept": k, "keep": k / n, "ratio": ratio_for_keep(k, n)}
        if policy_keep is not None:
            entry["policy_keep"] = float(policy_keep[i])
        layers[name] = entry
    return layers


def _proxies(problem: PolicyProblem, counts: list[int]) -> tuple[float, float]:
    """Accuracy proxy (exact from the full greedy curves, else interpolated between levels)
    and drift (interpolated)
    of an allocation given as channel counts."""
    if problem.curves:
        acc = sum(float(c[n - k]) for c, n, k in zip(problem.curves, problem.channels, counts))
    else:
        acc = sum(float(_interp_row(v, a, k / n)) for v, a, k, n in
                  zip(problem.values, problem.accuracy, counts, problem.channels))
    drift = sum(float(_interp_row(v, d, k / n))
                for v, d, k, n in zip(problem.values, problem.drift, counts, problem.channels))
    return acc, drift


def _check_inputs(model: nn.Module, budget: float, resource: str) -> float:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
    return check_budget(budget, resource)


def policy_allocation(
    model: nn.Module,
    example_inputs: Any,
    budget: float,
    *,
    calibration: Any = None,
    resource: str = "macs",
    steps: int = 300,
    seed: int = 0,
    natural: bool = True,
    estimator: str = "score",
    samples: int = 64,
    lr: float = 0.2,
    damping: float = 1e-2,
    dual_lr: float = 0.5,
    penalty: float = 1.0,
    drift_slack: float = 1.0,
    use_drift: bool = True,
    n_levels: int = 8,
    depth: int = 2,
    keep_mode: str = "expected",
    tolerance: float = 0.02,
    ignored_layers: Sequence[nn.Module] | None = None,
    problem: PolicyProblem | None = None,
    gate: QuantumPolicyGate | None = None,
    train_budgets: Sequence[float] | None = None,
    max_calibration_batches: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[dict[nn.Module, float], PolicyReport]:
    """Per-layer channel ratios from the quantum policy gate (§4), meeting a resource budget.

    Builds the Lagrangian tables (:func:`build_policy_problem`), trains a
    :class:`QuantumPolicyGate` conditioned on ``budget`` (:func:`train_policy`), reads its
    expected keep fractions, and rescales them by a common factor (then single channels)
    until a pruned copy keeps ``budget`` of the resource within ``tolerance`` (relative).

    Args:
        model: the network (not modified).
        example_inputs: input for tracing and counting.
        budget: fraction of the resource to keep (0.5 = half the MACs).
        calibration: batches for the input Grams of the accuracy proxy.
        resource: ``"macs"`` or ``"params"``.
        steps, seed, natural, estimator, samples, lr, damping, dual_lr, penalty,
            drift_slack, use_drift: training options (see :func:`train_policy`).
        n_levels, depth: gate size (keep levels per layer, rotation ladders).
        keep_mode: ``"expected"`` or ``"mode"`` keep fraction read from the gate.
        tolerance: allowed relative budget error of the measured resource.
        ignored_layers: layers never pruned (default: the last Linear, as ``prune``).
        problem, gate: reuse a built problem / a (trained) gate; a given gate is trained
            further only if ``steps > 0``.
        train_budgets: budgets to condition on while training (default: ``[budget]``).
        max_calibration_batches, device: Gram collection options.

    Returns:
        ``(layer_ratios, report)``: ``{root module: channel ratio}`` for
        ``prune(model, x, 0.0, layer_ratios=layer_ratios, ...)`` and a :class:`PolicyReport`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        ...                     nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(32 * 8 * 8, 3))
        >>> x = torch.randn(64, 1, 8, 8)
        >>> ratios, rep = policy_allocation(net, x[:1], 0.5, calibration=x, steps=20)
        >>> abs(rep.achieved / 0.5 - 1) <= 0.02
        True
    """
    budget = _check_inputs(model, budget, resource)
    ignored = _default_ignored(model) if ignored_layers is None else list(ignored_layers)
    if problem is None:
        problem = build_policy_problem(model, example_inputs, calibration=calibration,
                                       resource=resource, n_levels=n_levels,
                                       ignored_layers=ignored,
                                       max_calibration_batches=max_calibration_batches,
                                       device=device)
    elif problem.resource_kind != resource:
        raise ValueError(f"problem measures {problem.resource_kind!r}, not {resource!r}")
    if gate is None:
        gate = QuantumPolicyGate(problem.n_layers, problem.n_levels, depth=depth, seed=seed)
    training = PolicyTraining(natural=natural, estimator=estimator)
    if steps > 0:
        training = train_policy(gate, problem, list(train_budgets or [budget]), steps=steps,
                                lr=lr, natural=natural, estimator=estimator, samples=samples,
                                damping=damping, dual_lr=dual_lr, penalty=penalty,
                                drift_slack=drift_slack,
                                use_drift=use_drift, seed=seed, log_every=max(1, steps // 50))
    t0 = time.perf_counter()
    with torch.no_grad():
        keep = gate.keep_ratios(budget, keep_mode, values=problem.values)
        p = gate.probabilities(budget)
        exp_res = float(problem.resource.expected_fraction(p, problem.values))
    counts, scale, got, got_model = _meet_budget(model, example_inputs, problem, keep, budget,
                                                 ignored=ignored, tolerance=tolerance)
    acc, drift = _proxies(problem, counts)
    u_counts, _, _, _ = _meet_budget(model, example_inputs, problem,
                                     torch.full((problem.n_layers,), problem.uniform_keep(budget)),
                                     budget, ignored=ignored, tolerance=tolerance, measure=False)
    u_acc, u_drift = _proxies(problem, u_counts)
    report = PolicyReport(
        method="policy", budget=budget, resource=resource, achieved=got, achieved_model=got_model,
        scale=scale, layers=_report_layers(problem, counts, keep),
        lambdas=list(training.lambdas.get(budget, [float("nan"), float("nan")])),
        expected_resource=exp_res, accuracy_proxy=acc, drift_proxy=drift,
        uniform_accuracy_proxy=u_acc, uniform_drift_proxy=u_drift, natural=natural,
        estimator=estimator, steps=training.steps, problem_seconds=problem.seconds,
        train_seconds=training.seconds, correction_seconds=time.perf_counter() - t0,
        history=training.history)
    ratios = {m: ratio_for_keep(k, n) for m, k, n in zip(problem.modules, counts, problem.channels)}
    return ratios, report


def uniform_allocation(
    model: nn.Module,
    example_inputs: Any,
    budget: float,
    *,
    resource: str = "macs",
    tolerance: float = 0.02,
    ignored_layers: Sequence[nn.Module] | None = None,
    problem: PolicyProblem | None = None,
) -> tuple[dict[nn.Module, float], PolicyReport]:
    """One keep fraction for every layer, corrected to the budget exactly like
    :func:`policy_allocation` (the fair baseline: same layers, same rounding, same counter).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(32 * 4 * 4, 3))
        >>> ratios, rep = uniform_allocation(net, torch.randn(1, 1, 8, 8), 0.5)
        >>> abs(rep.achieved / 0.5 - 1) <= 0.02, len(ratios)
        (True, 2)
    """
    budget = _check_inputs(model, budget, resource)
    ignored = _default_ignored(model) if ignored_layers is None else list(ignored_layers)
    if problem is None:
        problem = build_policy_problem(model, example_inputs, resource=resource,
                                       ignored_layers=ignored)
    t0 = time.perf_counter()
    u = problem.uniform_keep(budget)
    keep = torch.full((problem.n_layers,), u, dtype=torch.float64)
    counts, scale, got, got_model = _meet_budget(model, example_inputs, problem, keep, budget,
                                                 ignored=ignored, tolerance=tolerance)
    acc, drift = _proxies(problem, counts)
    report = PolicyReport(
        method="uniform", budget=budget, resource=resource, achieved=got,
        achieved_model=got_model, scale=scale * u, layers=_report_layers(problem, counts, None),
        accuracy_proxy=acc, drift_proxy=drift, uniform_accuracy_proxy=acc,
        uniform_drift_proxy=drift, steps=0, problem_seconds=problem.seconds,
        correction_seconds=time.perf_counter() - t0)
    ratios = {m: ratio_for_keep(k, n) for m, k, n in zip(problem.modules, counts, problem.channels)}
    return ratios, report


def _policy_allocator(model: nn.Module, example_inputs: Any, *, ratio: float, target: str,
                      calibration: Any, ignored_layers: Sequence[nn.Module] | None,
                      device: Any, budget: float | None, **kwargs: Any
                      ) -> tuple[dict[nn.Module, float], dict[str, Any]]:
    """``prune(..., allocation="policy", budget=...)``: :func:`policy_allocation` with
    ``budget = 1 - ratio`` of ``target`` ("macs" or "params"; "channels" is read as MACs)."""
    for unused in ("device_profile", "round_to"):
        kwargs.pop(unused, None)
    resource = "macs" if target == "channels" else target
    if resource not in RESOURCES:
        raise ValueError(f"allocation='policy' budgets one of {RESOURCES}, got target="
                         f"{target!r}")
    ratios, report = policy_allocation(model, example_inputs, 1.0 - ratio, calibration=calibration,
                                       resource=resource, ignored_layers=ignored_layers,
                                       device=device, **kwargs)
    info = report.to_dict()
    info.pop("history", None)
    return ratios, info


register_allocation("policy", _policy_allocator, overwrite=True)
