"""Time-varying redundancy (arXiv 2512.00880 §3.3): spectral tracking of activations over time and
a Lindblad predictor of how the activation density matrix drifts.

Three pieces:

* :class:`SpectralTracker` — forward hooks that stream the Gram matrix ``G = XᵀX`` of each tracked
  module's *output* activations (channels as features, pixels/tokens as samples; the activations
  themselves are never stored) and, every ``window`` forward calls, emit a :class:`WindowRecord`:
  the density matrix ρ_t = G / tr G, its spectral state, the Fubini–Study distance d_FS,t to the
  previous window and to a reference window, and per-channel redundancy scores. By default one
  call in four is processed, at most 512 rows per call (an unbiased subsample), in float32, and
  the derived quantities are computed when first read — see the class docstring for the cost
  model and the exact setting.
* :class:`LindbladPredictor` — a learned open-quantum-system model of the trajectory ρ_0, ρ_1, …:

      dρ/dt = −i[H(t), ρ] + Σ_k ( L_k ρ L_k† − ½{L_k†L_k, ρ} ),   H(t) = H_0 (+ t·H_1),

  fitted by gradient descent, then used to forecast future density matrices and their d_FS to a
  reference window. The paper's Eq. (7) writes the dissipator as ``Σ_k L_k ρ L_k†`` only, dropping
  the anticommutator ``−½{L_k†L_k, ρ}``; that generator does *not* preserve the trace
  (d tr ρ/dt = Σ_k tr(L_k†L_k ρ) > 0), so ρ stops being a density matrix. Here the full GKSL
  (Lindblad) form is used; :func:`liouvillian` and :func:`lindblad_rhs` take
  ``anticommutator=False`` to reproduce the paper's form for comparison.
* :func:`forecast_density_matrix` / :func:`forecast_channel_redundancy` — predictive pruning:
  the density matrix forecast ``horizon`` windows ahead and its per-channel redundancy scores;
  :class:`TrackedImportance` feeds such scores (current or forecast) to Torch-Pruning's pruners,
  so forecast-redundant channels are removed through the same machinery as current ones.

Conventions
-----------
*Spectral state of a window.* ψ_t = sqrt(λ(ρ_t)) sorted descending, i.e. the square roots of the
eigenvalues of ρ_t. With X the (samples × channels) activation matrix, the eigenvalues of
XᵀX / ‖X‖_F² are σ_i(X)² / Σ σ_j², so ψ_t = σ(X) / ‖σ(X)‖₂ is exactly the normalized
singular-value spectrum of the activation matrix — the §2.1 spectral state of the operator
"activations of this window", and d_FS,t = arccos⟨ψ_t, ψ_s⟩ is the §2.3 distance between them.
ψ only sees the spectrum; a rotation of the activation basis leaves it unchanged, so records also
carry the Bures angle arccos tr|√ρ √σ| (which equals d_FS for pure states) as a basis-aware
companion.

*Channel redundancy.* ``r_i = 1 / ([G⁻¹]_ii · G_ii) ∈ [0, 1]`` is sin² of the Fubini–Study angle
between channel i's activation vector and the span of its siblings' (``1/[G⁻¹]_ii`` is the squared
residual of regressing channel i on the others). 0: the channel is a linear combination of the
others (fully redundant, or dead); 1: orthogonal to all of them.

*Reduced basis.* Activation density matrices are 32–512 dimensional; the Liouvillian of a d-level
system is d² × d², so the predictor works in a reduced basis: the top-r eigenvectors V of the mean
ρ over the fitted windows (r = ``dim`` ≤ 16, 8 by default in the helpers). Each ρ is projected to
ρ_r = VᵀρV / tr(VᵀρV) and evolved there; a forecast is lifted back by replacing the span(V) block
of the last observed ρ with the evolved block (same mass), holding the rest — the complement block
and the cross terms — at its last observed value. The lift keeps trace one and reproduces the
observed state exactly at horizon 0.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn

from torch_qmprune.calibration import _features
from torch_qmprune.importance import _is_out
from torch_qmprune.spectral import fubini_study

__all__ = [
    "WindowRecord",
    "SpectralTracker",
    "tracker_overhead",
    "channel_redundancy",
    "spectral_state_of_density",
    "bures_angle",
    "liouvillian",
    "lindblad_rhs",
    "LindbladPredictor",
    "forecast_channel_redundancy",
    "forecast_density_matrix",
    "channel_residual_energy",
    "TrackedImportance",
]

_F64 = torch.float64
_C128 = torch.complex128


# =============================================================================================
# density-matrix helpers
# =============================================================================================


def _sym(x: Tensor) -> Tensor:
    return (x + x.transpose(-2, -1).conj()) / 2


def spectral_state_of_density(rho: Tensor) -> Tensor:
    """Spectral state ψ = sqrt(λ(ρ)) of a density matrix, descending, unit norm (§2.1).

    For ρ = XᵀX / ‖X‖_F² this is the normalized singular-value spectrum of X. Negative
    eigenvalues (round-off, or an approximate forecast) are clamped to zero. Works on real
    symmetric or complex Hermitian input; returns float64.

    Example:
        >>> spectral_state_of_density(torch.diag(torch.tensor([0.64, 0.36], dtype=torch.float64)))
        tensor([0.8000, 0.6000], dtype=torch.float64)
    """
    lam = torch.linalg.eigvalsh(_sym(rho.to(_C128 if rho.is_complex() else _F64)))
    lam = torch.flip(lam.clamp(min=0.0), dims=[-1])
    psi = lam.sqrt()
    return psi / torch.linalg.vector_norm(psi, dim=-1, keepdim=True).clamp_min(1e-300)


def _psd_sqrt(rho: Tensor) -> Tensor:
    w, u = torch.linalg.eigh(_sym(rho))
    return (u * w.clamp(min=0.0).sqrt().to(u.dtype).unsqueeze(-2)) @ u.transpose(-2, -1).conj()


def bures_angle(rho: Tensor, sigma: Tensor) -> float:
    """Bures angle arccos tr|√ρ √σ| ∈ [0, π/2] between two density matrices.

    For pure states |ψ⟩⟨ψ| and |φ⟩⟨φ| it is the Fubini–Study distance arccos|⟨ψ, φ⟩| (§2.3);
    unlike d_FS of the spectral states it also sees rotations of the eigenbasis.

    Example:
        >>> e = torch.eye(2, dtype=torch.float64)
        >>> round(bures_angle(e[:, :1] @ e[:1], e[:, 1:] @ e[1:]), 4)  # orthogonal pure states
        1.5708
    """
    dtype = _C128 if (rho.is_complex() or sigma.is_complex()) else _F64
    a, b = rho.to(dtype), sigma.to(dtype)
    a, b = a / torch.trace(a).real, b / torch.trace(b).real
    return _bures_from_roots(_psd_sqrt(a), _psd_sqrt(b))


def _bures_from_roots(sqrt_a: Tensor, sqrt_b: Tensor) -> float:
    root_fid = torch.linalg.svdvals(sqrt_a @ sqrt_b).sum()
    return float(torch.arccos(root_fid.clamp(0.0, 1.0)))


def channel_redundancy(gram: Tensor, *, eps: float = 1e-10) -> Tensor:
    """Per-channel redundancy ``1 / ([G⁻¹]_ii · G_ii)`` = sin² of the FS angle between channel
    i and the span of the other channels (§3.3 redundancy; lower = more redundant).

    Scale invariant, so a density matrix ρ = G / tr G gives the same scores. The inverse is taken
    through ``eigh`` with eigenvalues floored at ``eps·tr G / d``; an all-zero (dead) channel
    scores 0.

    Args:
        gram: symmetric PSD ``(d, d)`` matrix (real or complex Hermitian; the real part is used).
        eps: relative eigenvalue floor.

    Returns:
        ``(d,)`` float64 tensor in [0, 1].

    Example:
        >>> x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
        >>> channel_redundancy(x.T @ x)  # column 3 = column 1 + column 2: all three dependent
        tensor([0., 0., 0.], dtype=torch.float64)
        >>> channel_redundancy(torch.eye(3))
        tensor([1., 1., 1.], dtype=torch.float64)
    """
    g = gram.real if gram.is_complex() else gram
    g = _sym(g.detach().to(_F64))
    w, u = torch.linalg.eigh(g)
    return _redundancy_from_eigh(w, u, g.diagonal(), eps)


def _redundancy_from_eigh(w: Tensor, u: Tensor, diag: Tensor, eps: float = 1e-10) -> Tensor:
    """channel_redundancy from the eigendecomposition ``G = U diag(w) Uᵀ`` and ``diag(G)``."""
    d = diag.shape[0]
    floor = eps * float(diag.sum().clamp_min(0.0)) / max(d, 1)
    w = w.clamp(min=floor if floor > 0 else 1e-300)
    inv_diag = (u * u / w.unsqueeze(0)).sum(dim=1)
    score = 1.0 / (inv_diag * diag)
    score = torch.where(diag > 0, score, torch.zeros_like(score))
    score = score.clamp(0.0, 1.0)
    return torch.where(score < 1e3 * eps, torch.zeros_like(score), score)


# =============================================================================================
# SpectralTracker
# =============================================================================================


class WindowRecord:
    """What a :class:`SpectralTracker` emits for one module at the end of one window (§3.3).

    Closing a window only hands the running Gram over (no copy, no device synchronization);
    everything derived from it is computed the first time it is read and then cached, so a
    tracker that is only *recording* costs the hook's matrix product and nothing else. Reading
    ``d_fs_*`` costs one ``eigvalsh`` per record; ``redundancy`` and ``bures_*`` one ``eigh``
    (plus one SVD per Bures pair). :meth:`finalize` computes everything at once.

    Attributes:
        index: window number (0-based) for this module.
        calls: hooked forward calls the window spans (``window``, fewer for a flushed window).
        batches: calls whose activations entered the Gram (one in ``every``).
        samples: activation rows of those calls (batch × pixels for convolutions): the rows
            ``gram`` stands for.
        rows: rows actually multiplied (``samples`` unless rows were subsampled, ``max_rows``).
        gram: ``XᵀX`` of the window's processed output activations, ``(d, d)`` float64 (an
            unbiased estimate of it when rows were subsampled; every tensor of a record is on
            the CPU).
        mean: per-channel mean activation, ``(d,)`` float64.
        rho: density matrix ρ_t = G / tr G.
        eigenvalues: eigenvalues of ρ_t, descending, clamped ≥ 0.
        state: spectral state ψ_t = sqrt(eigenvalues) (the normalized singular-value spectrum of
            the activation matrix, §2.1).
        d_fs_prev: d_FS(ψ_t, ψ_{t−1}) (§2.3; None for the first window).
        d_fs_ref: d_FS(ψ_t, ψ_ref) to the reference window (None without a reference).
        bures_prev / bures_ref: Bures angles between the density matrices, same pairs.
        redundancy: per-channel scores 1/([G⁻¹]_ii G_ii) (lower = more redundant).
        previous / reference: the records these distances are measured to (or None).
        seconds: wall time the hook spent closing the window.
    """

    def __init__(
        self,
        index: int,
        batches: int,
        samples: int,
        gram: Tensor,
        colsum: Tensor,
        *,
        calls: int | None = None,
        rows: int | None = None,
        previous: WindowRecord | None = None,
        reference: WindowRecord | Literal["self"] | None = None,
        seconds: float = 0.0,
        event: Any = None,
    ) -> None:
        self.index = index
        self.batches = batches
        self.samples = samples
        self.calls = batches if calls is None else calls
        self.rows = samples if rows is None else rows
        self.previous = previous
        self.reference = self if reference == "self" else reference
        self.seconds = seconds
        self._raw_gram, self._raw_colsum, self._event = gram, colsum, event

    def _raw(self) -> tuple[Tensor, Tensor]:
        if self._event is not None:  # asynchronous device-to-host copy still in flight
            self._event.synchronize()
            self._event = None
        return self._raw_gram, self._raw_colsum

    @cached_property
    def gram(self) -> Tensor:
        return _sym(self._raw()[0].to("cpu", _F64))

    @cached_property
    def mean(self) -> Tensor:
        return self._raw()[1].to("cpu", _F64) / max(self.samples, 1)

    @cached_property
    def rho(self) -> Tensor:
        gram = self.gram
        trace = gram.diagonal().sum()
        if trace > 0:
            return gram / trace
        # all-zero activations: maximally mixed by convention
        return torch.eye(gram.shape[0], dtype=_F64) / gram.shape[0]

    @cached_property
    def _eigh(self) -> tuple[Tensor, Tensor]:
        return torch.linalg.eigh(self.rho)

    @cached_property
    def eigenvalues(self) -> Tensor:
        w = self._eigh[0] if "_eigh" in self.__dict__ else torch.linalg.eigvalsh(self.rho)
        return torch.flip(w.clamp(min=0.0), dims=[0])

    @cached_property
    def state(self) -> Tensor:
        psi = self.eigenvalues.sqrt()
        return psi / torch.linalg.vector_norm(psi).clamp_min(1e-300)

    @cached_property
    def _root(self) -> Tensor:
        w, u = self._eigh
        return (u * w.clamp(min=0.0).sqrt().unsqueeze(0)) @ u.T

    @cached_property
    def redundancy(self) -> Tensor:
        w, u = self._eigh
        return _redundancy_from_eigh(w, u, self.rho.diagonal())

    def _fs(self, other: WindowRecord | None) -> float | None:
        if other is None:
            return None
        return 0.0 if other is self else float(fubini_study(self.state, other.state))

    def _bures(self, other: WindowRecord | None) -> float | None:
        if other is None:
            return None
        return 0.0 if other is self else _bures_from_roots(self._root, other._root)

    @cached_property
    def d_fs_prev(self) -> float | None:
        return self._fs(self.previous)

    @cached_property
    def d_fs_ref(self) -> float | None:
        return self._fs(self.reference)

    @cached_property
    def bures_prev(self) -> float | None:
        return self._bures(self.previous)

    @cached_property
    def bures_ref(self) -> float | None:
        return self._bures(self.reference)

    def finalize(self) -> WindowRecord:
        """Compute every derived quantity now (they are cached); returns ``self``."""
        for name in ("gram", "mean", "rho", "state", "redundancy", "d_fs_prev", "d_fs_ref",
                     "bures_prev", "bures_ref"):
            getattr(self, name)
        return self

    def __repr__(self) -> str:
        return (f"WindowRecord(index={self.index}, calls={self.calls}, batches={self.batches}, "
                f"samples={self.samples}, rows={self.rows}, dim={self._raw_gram.shape[0]})")


@dataclass
class _Accumulator:
    gram: Tensor | None = None  # running Σ scale·XᵀX, product dtype, on the activations' device
    colsum: Tensor | None = None
    samples: int = 0
    rows: int = 0
    batches: int = 0
    calls: int = 0


@dataclass
class _ModuleState:
    name: str
    acc: _Accumulator = field(default_factory=_Accumulator)
    reference: WindowRecord | None = None
    previous: WindowRecord | None = None


def _output_features(module: nn.Module, y: Tensor) -> Tensor | None:
    """Rows = samples, columns = output channels. Conv/Linear go through
    :func:`torch_qmprune.calibration._features` (dim 1 = channels for convolutions, last dim for
    Linear); other modules (or grouped / transposed convolutions, whose *outputs* still carry
    channels in dim 1): last dim for 2-D outputs, dim 1 otherwise."""
    feats = _features(module, y)
    if feats is not None:
        return feats
    if y.ndim == 0:
        return None
    if y.ndim <= 2:
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def _unwrap_compiled(model: nn.Module) -> tuple[nn.Module, bool]:
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        return orig, True
    return model, False


class SpectralTracker:
    """Stream activation density matrices of a model's layers, window by window (paper §3.3).

    Forward hooks on the tracked modules add ``XᵀX`` of each output activation X (rows = samples,
    pixels of a convolution included; columns = channels) to a running Gram. A window is
    ``window`` consecutive hooked calls of a module; of those, calls 0, ``every``, 2·``every``, …
    are processed (the others only bump a counter); when the window's last call returns, a
    :class:`WindowRecord` is appended to ``tracker.history[name]`` carrying ρ_t = G / tr G, its
    spectral state ψ_t, d_FS,t to the previous and the reference window (Eq. 6 of the paper's
    time-varying distance) and per-channel redundancy. Activations are never stored.

    Nothing else about the model changes: outputs, gradients and the global RNG are untouched
    (row sampling uses the tracker's own generator), and :meth:`remove` (or leaving the ``with``
    block) removes exactly the hooks it added. Works in train or eval mode, under
    ``torch.no_grad``, on CPU or CUDA (running Grams live on the activations' device unless
    ``device`` is given; records hand them to the CPU asynchronously and their tensors are
    always on the CPU). For ``torch.compile``: the hook body is excluded from tracing
    (``torch.compiler.disable``), so hooks may be registered on the eager model before or after
    compiling, or on the compiled wrapper itself (its ``_orig_mod`` is hooked; names drop the
    ``_orig_mod.`` prefix). Expect a graph break per tracked module.

    Cost, and why the defaults are what they are: a processed call costs one
    ``rows × d × d`` product (one ``addmm`` into the running buffer, no float64 copy of the
    activations); closing a window costs nothing more (derived quantities are computed when
    read, see :class:`WindowRecord`). Measured on ResNet-18 (CPU, every Conv/Linear tracked) the
    defaults keep throughput within the 10 % target — numbers and command in
    ``docs/results/dynamics.md``; ``every=1, max_rows=None, product_dtype=torch.float64`` is the
    exact (and expensive) setting.

    Row subsampling (``max_rows``): a call with n > ``max_rows`` activation rows multiplies
    R ≤ ``max_rows`` of them and scales the product so that it is an unbiased estimator of the
    call's ``XᵀX``; ρ = G / tr G is normalized by the trace anyway. Rows of a (N, C, pixels)
    output are stratified by sample — k = ⌊max_rows / N⌋ uniformly drawn pixel positions in
    every sample, scale pixels / k (or, when N > max_rows, one position in each of max_rows
    samples drawn without replacement, scale N·pixels / max_rows) — since pixels of one image are
    strongly correlated and images differ; 2-D outputs (Linear, tokens) draw rows uniformly with
    replacement, scale n / R. Either way E[scale · Σ_j x_{i_j} x_{i_j}ᵀ] = XᵀX. The price is
    sampling noise in ρ, which sets a noise floor under d_FS,t (measured: ~0.01 on ResNet-18, see
    ``docs/results/dynamics.md``); raise ``max_rows`` or ``window``, or use the exact setting,
    to resolve smaller drifts.

    Args:
        model: the network (or a ``torch.compile`` wrapper of it).
        modules: names or modules to track; default every Conv and Linear.
        window: hooked calls per window (the time axis of the drift: one window spans the same
            stretch of the stream whatever ``every`` is).
        every: process one call in ``every`` within each window (the first call of a window is
            always processed, so every window holds ceil(window / every) batches).
        reference: ``"first"`` — distances to the module's first window; ``None`` — none.
        device: where the Grams are accumulated (default: the activation's device).
        feature_fn: optional ``f(module, output) -> (samples, channels)`` override.
        max_dim: modules with more output channels are skipped (with a warning).
        max_rows: rows multiplied per processed call (subsampled above it; ``None`` = all).
        product_dtype: dtype of the products and of the running window sum (float32 default;
            float64 for exact sums). Records are float64 either way.
        eager: compute every record's derived quantities when its window closes (the old,
            costlier behaviour) instead of on first read.
        seed: seed of the row-sampling generator.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with SpectralTracker(net, window=2) as tr:
        ...     for _ in range(4):
        ...         _ = net(torch.randn(8, 4))
        >>> len(tr.history["0"]), tr.trajectory("2").shape
        (2, torch.Size([2, 2, 2]))
        >>> tr.history["0"][1].d_fs_ref is not None and net._forward_hooks == {}
        True
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[nn.Module | str] | None = None,
        *,
        window: int = 8,
        every: int = 4,
        reference: Literal["first"] | None = "first",
        device: torch.device | str | None = None,
        feature_fn: Callable[[nn.Module, Tensor], Tensor | None] | None = None,
        max_dim: int = 4096,
        max_rows: int | None = 512,
        product_dtype: torch.dtype = torch.float32,
        eager: bool = False,
        seed: int = 0,
    ) -> None:
        for arg, value in (("window", window), ("every", every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                     or max_rows < 1):
            raise ValueError(f"max_rows must be None or an int >= 1, got {max_rows!r}")
        if reference not in ("first", None):
            raise ValueError(f"reference must be 'first' or None, got {reference!r}")
        if product_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"product_dtype must be float32 or float64, got {product_dtype}")
        base, self.compiled = _unwrap_compiled(model)
        self.model = model
        self.window = window
        self.every = every
        self.reference = reference
        self.device = torch.device(device) if device is not None else None
        self.feature_fn = feature_fn
        self.max_dim = max_dim
        self.max_rows = max_rows
        self.product_dtype = product_dtype
        self.eager = eager
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        names = {m: n for n, m in base.named_modules()}
        if modules is None:
            targets = [m for m in base.modules()
                       if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
        else:
            targets = []
            lookup = dict(base.named_modules())
            for m in modules:
                if isinstance(m, str):
                    key = m[len("_orig_mod."):] if m.startswith("_orig_mod.") else m
                    if key not in lookup:
                        raise KeyError(f"no submodule named {m!r} in {type(base).__name__}")
                    targets.append(lookup[key])
                elif isinstance(m, nn.Module):
                    if m not in names:
                        raise ValueError(f"module {type(m).__name__} is not part of the model")
                    targets.append(m)
                else:
                    raise TypeError(f"modules must hold nn.Module or str, got {type(m).__name__}")
        if not targets:
            raise ValueError("no module to track (the model has no Conv/Linear layer)")
        self._states: dict[nn.Module, _ModuleState] = {}
        for m in targets:
            if m not in self._states:
                self._states[m] = _ModuleState(name=names[m])
        self.history: dict[str, list[WindowRecord]] = {s.name: [] for s in self._states.values()}
        self.skipped: dict[str, str] = {}
        self._handles: list[Any] = []
        hook = torch.compiler.disable(self._hook)
        for m in self._states:
            self._handles.append(m.register_forward_hook(hook))

    # -- hook ---------------------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._states.get(module)
        if state is None or state.name in self.skipped or not torch.is_tensor(output):
            return
        acc = state.acc
        position = acc.calls
        acc.calls += 1
        if position % self.every == 0:
            with torch.no_grad():
                self._accumulate(state, module, output.detach())
        if acc.calls >= self.window and state.name not in self.skipped:
            self._emit(state)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    def _sample(self, n: int, device: torch.device) -> Tensor | None:
        """Row indices to multiply (uniform with replacement), or None for all ``n`` rows."""
        if self.max_rows is None or n <= self.max_rows:
            return None
        return torch.randint(n, (self.max_rows,), generator=self._generator(device),
                             device=device)

    def _rows(self, module: nn.Module, y: Tensor) -> tuple[Tensor, int] | None:
        """(rows to multiply, rows they stand for): ``(r, d)`` and n ≥ r."""
        if self.feature_fn is not None:
            feats = self.feature_fn(module, y)
            if feats is None:
                return None
            idx = self._sample(feats.shape[0], feats.device)
            return (feats if idx is None else feats[idx]), feats.shape[0]
        if y.ndim == 0:
            return None
        if isinstance(module, nn.Linear) or y.ndim <= 2:
            flat = y.reshape(-1, y.shape[-1])
            idx = self._sample(flat.shape[0], flat.device)
            return (flat if idx is None else flat[idx]), flat.shape[0]
        # channels in dim 1 (convolutions, norms, activations): (N, C, P) without a copy where
        # the layout allows; gather only the sampled (n, p) rows
        y3 = y.flatten(2)
        images, pixels = y3.shape[0], y3.shape[2]
        n = images * pixels
        if self.max_rows is None or n <= self.max_rows:
            return y3.transpose(1, 2).reshape(n, y3.shape[1]), n
        # stratified by sample: k uniform positions in every image (all images weigh the same,
        # which removes the between-image part of the sampling variance), or one position in
        # each of max_rows images drawn without replacement when the batch is larger
        gen = self._generator(y3.device)
        k = self.max_rows // images
        if k >= 1:
            img = torch.arange(images, device=y3.device).repeat_interleave(k)
        else:
            img = torch.randperm(images, generator=gen, device=y3.device)[:self.max_rows]
        pos = torch.randint(pixels, (img.shape[0],), generator=gen, device=y3.device)
        return y3[img, :, pos], n

    def _accumulate(self, state: _ModuleState, module: nn.Module, y: Tensor) -> None:
        got = self._rows(module, y)
        if got is None:
            self.skipped[state.name] = "no channel layout for this output"
            return
        x, n = got
        if x.ndim != 2:
            raise ValueError(f"SpectralTracker: features of {state.name!r} must be 2-D "
                             f"(samples, channels), got {tuple(x.shape)}")
        if x.shape[1] > self.max_dim:
            self.skipped[state.name] = f"{x.shape[1]} channels > max_dim={self.max_dim}"
            warnings.warn(f"SpectralTracker: skipping {state.name!r}: "
                          f"{self.skipped[state.name]}", stacklevel=3)
            return
        if self.device is not None:
            x = x.to(self.device)
        x = x.to(self.product_dtype)
        scale = n / x.shape[0] if x.shape[0] else 1.0
        acc = state.acc
        if acc.gram is None:
            acc.gram = x.T @ x
            acc.colsum = x.sum(dim=0)
            if scale != 1.0:
                acc.gram.mul_(scale)
                acc.colsum.mul_(scale)
        else:
            acc.gram.addmm_(x.T, x, alpha=scale)
            acc.colsum.add_(x.sum(dim=0), alpha=scale)
        acc.samples += n
        acc.rows += x.shape[0]
        acc.batches += 1

    def _emit(self, state: _ModuleState) -> WindowRecord | None:
        acc = state.acc
        if acc.gram is None or acc.batches == 0:
            return None
        start = time.perf_counter()
        gram, colsum, event = acc.gram, acc.colsum, None
        if gram.device.type == "cuda":
            # window statistics are d × d: analysis runs on the CPU (an eigendecomposition there
            # beats a cuSOLVER call plus its synchronizations); start the copy, do not wait
            gram = gram.to("cpu", non_blocking=True)
            colsum = colsum.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        ref = state.reference
        if self.reference == "first" and ref is None:
            ref = "self"
        rec = WindowRecord(len(self.history[state.name]), acc.batches, acc.samples, gram,
                           colsum, calls=acc.calls, rows=acc.rows, previous=state.previous,
                           reference=ref, event=event)
        if ref == "self":
            state.reference = rec
        state.previous = rec
        state.acc = _Accumulator()
        if self.eager:
            rec.finalize()
        rec.seconds = time.perf_counter() - start
        self.history[state.name].append(rec)
        return rec

    # -- public API ---------------------------------------------------------------------------

    @property
    def module_names(self) -> list[str]:
        """Names of the tracked modules, in registration order."""
        return [s.name for s in self._states.values()]

    def flush(self) -> dict[str, WindowRecord]:
        """Close every partial window now (modules with at least one batch pending)."""
        out = {}
        for state in self._states.values():
            rec = self._emit(state)
            if rec is not None:
                out[state.name] = rec
        return out

    def trajectory(self, module_name: str) -> Tensor:
        """Density matrices of every emitted window of one module, ``(T, d, d)`` float64."""
        recs = self._records(module_name)
        return torch.stack([r.rho for r in recs])

    def distances(self, module_name: str, *, bures: bool = True) -> dict[str, Tensor]:
        """d_FS and Bures angles per window: keys ``"prev"``, ``"ref"``, ``"bures_prev"``,
        ``"bures_ref"``; ``(T,)`` float64 tensors, NaN where undefined. ``bures=False`` skips
        the (costlier) Bures angles and their keys."""
        recs = self._records(module_name)

        def col(attr: str) -> Tensor:
            return torch.tensor([math.nan if getattr(r, attr) is None else getattr(r, attr)
                                 for r in recs], dtype=_F64)

        out = {"prev": col("d_fs_prev"), "ref": col("d_fs_ref")}
        if bures:
            out.update(bures_prev=col("bures_prev"), bures_ref=col("bures_ref"))
        return out

    def redundancy(self, module_name: str) -> Tensor:
        """Per-channel redundancy of every window, ``(T, d)`` float64."""
        return torch.stack([r.redundancy for r in self._records(module_name)])

    def _records(self, module_name: str) -> list[WindowRecord]:
        if module_name.startswith("_orig_mod."):
            module_name = module_name[len("_orig_mod."):]
        if module_name not in self.history:
            raise KeyError(f"{module_name!r} is not tracked; tracked: {self.module_names}")
        recs = self.history[module_name]
        if not recs:
            raise ValueError(f"no complete window for {module_name!r} yet (window={self.window})")
        return recs

    def remove(self) -> None:
        """Remove every hook this tracker added; the model is left exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def __enter__(self) -> SpectralTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        counts = {n: len(v) for n, v in self.history.items()}
        return (f"SpectralTracker(window={self.window}, every={self.every}, "
                f"max_rows={self.max_rows}, reference={self.reference!r}, windows={counts}, "
                f"active={self.active})")


def tracker_overhead(
    model: nn.Module, batch: Tensor, iters: int = 10, *, repeats: int = 3, **tracker_kwargs: Any
) -> float:
    """Throughput ratio tracked / untracked (≤ 1; 1 = free) of ``model(batch)`` under no_grad.

    ``repeats`` rounds, each timing ``iters`` calls without and then with a fresh
    :class:`SpectralTracker` (``tracker_kwargs`` are passed on; hooks removed after each round),
    after one warm-up call each; the ratio of the median round times is returned. Interleaving
    keeps a drifting machine load from favouring one side. Wall-clock, so noisy on shared
    machines: ``benchmarks/tracker_overhead.py`` is the careful version.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> 0 < tracker_overhead(net, torch.randn(256, 64), iters=3) < 10
        True
    """
    if iters < 1 or repeats < 1:
        raise ValueError(f"iters and repeats must be >= 1, got {iters}, {repeats}")
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)

    def timed() -> float:
        with torch.no_grad():
            model(batch)
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                model(batch)
            sync()
            return time.perf_counter() - t0

    base, tracked = [], []
    for _ in range(repeats):
        base.append(timed())
        with SpectralTracker(model, **tracker_kwargs):
            tracked.append(timed())
    return statistics.median(base) / statistics.median(tracked)


# =============================================================================================
# Lindblad dynamics
# =============================================================================================


def _as_c128(x: Tensor) -> Tensor:
    return x.to(_C128) if torch.is_tensor(x) else torch.as_tensor(x, dtype=_C128)


def _kron(a: Tensor, b: Tensor) -> Tensor:
    return torch.kron(a.resolve_conj().contiguous(), b.resolve_conj().contiguous())


def liouvillian(H: Tensor, jumps: Tensor | Iterable[Tensor], *,
                anticommutator: bool = True) -> Tensor:
    """Superoperator 𝓛 of dρ/dt = −i[H, ρ] + Σ_k (L_k ρ L_k† − ½{L_k†L_k, ρ}) (row-major vec).

    ``vec(ρ)[i·d + j] = ρ[i, j]`` and ``vec(AρB) = (A ⊗ Bᵀ) vec(ρ)``, so

        𝓛 = −i(H ⊗ I − I ⊗ Hᵀ) + Σ_k [ L_k ⊗ L̄_k − ½ (L_k†L_k ⊗ I) − ½ (I ⊗ (L_k†L_k)ᵀ) ].

    ``anticommutator=False`` drops the ``−½{L†L, ρ}`` terms: the paper's Eq. (7), which does not
    preserve the trace. Complex128, differentiable.

    Args:
        H: ``(d, d)`` Hermitian.
        jumps: ``(K, d, d)`` tensor or iterable of ``(d, d)`` jump operators (K may be 0).

    Returns:
        ``(d², d²)`` complex128.

    Example:
        >>> L = liouvillian(torch.zeros(2, 2), torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]))
        >>> rho = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.complex128)  # excited
        >>> (L @ rho.reshape(-1)).reshape(2, 2).real  # decays into the ground state
        tensor([[ 1.,  0.],
                [ 0., -1.]], dtype=torch.float64)
    """
    H = _as_c128(H)
    d = H.shape[-1]
    eye = torch.eye(d, dtype=_C128, device=H.device)
    out = -1j * (_kron(H, eye) - _kron(eye, H.transpose(-2, -1)))
    if not torch.is_tensor(jumps):
        jumps = list(jumps)
        jumps = (torch.stack([_as_c128(j) for j in jumps]) if jumps
                 else torch.zeros(0, d, d, dtype=_C128, device=H.device))
    for L in _as_c128(jumps):
        out = out + _kron(L, L.conj())
        if anticommutator:
            LdL = L.conj().transpose(-2, -1) @ L
            out = out - 0.5 * (_kron(LdL, eye) + _kron(eye, LdL.transpose(-2, -1)))
    return out


def lindblad_rhs(rho: Tensor, H: Tensor, jumps: Tensor | Iterable[Tensor], *,
                 anticommutator: bool = True) -> Tensor:
    """dρ/dt = −i[H, ρ] + Σ_k (L_k ρ L_k† − ½{L_k†L_k, ρ}) in matrix form (complex128).

    ``anticommutator=False`` is the paper's Eq. (7): ``−i[H, ρ] + Σ_k L_k ρ L_k†``, whose trace
    derivative Σ_k tr(L_k†L_k ρ) is positive for any non-zero L_k.

    Example:
        >>> rho = torch.eye(2, dtype=torch.complex128) / 2
        >>> L = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
        >>> torch.trace(lindblad_rhs(rho, torch.zeros(2, 2), L)).real.item()
        0.0
        >>> torch.trace(lindblad_rhs(rho, torch.zeros(2, 2), L, anticommutator=False)).real.item()
        0.5
    """
    rho, H = _as_c128(rho), _as_c128(H)
    out = -1j * (H @ rho - rho @ H)
    for L in (_as_c128(j) for j in (jumps if not torch.is_tensor(jumps) else jumps)):
        Ld = L.conj().transpose(-2, -1)
        out = out + L @ rho @ Ld
        if anticommutator:
            LdL = Ld @ L
            out = out - 0.5 * (LdL @ rho + rho @ LdL)
    return out


def _rk4_step_matrix(A0: Tensor, Ah: Tensor, A1: Tensor, h: float | Tensor) -> Tensor:
    """One classical RK4 step of x' = A(t)x as a matrix: A0 = A(t), Ah = A(t+h/2), A1 = A(t+h)
    (batched over leading dims; ``h`` a number or a broadcastable tensor)."""
    eye = torch.eye(A0.shape[-1], dtype=A0.dtype, device=A0.device)
    k1 = A0
    k2 = Ah @ (eye + (h / 2) * k1)
    k3 = Ah @ (eye + (h / 2) * k2)
    k4 = A1 @ (eye + h * k3)
    return eye + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


class LindbladPredictor:
    """Learned Lindblad (GKSL) dynamics of a density-matrix trajectory, for forecasting §3.3.

    Model: dρ/dt = −i[H(t), ρ] + Σ_{k<n_jump} (L_k ρ L_k† − ½{L_k†L_k, ρ}), with
    H(t) = H_0 (``time_dependent=False``) or H_0 + t·H_1 (``"linear"``); or, with
    ``time_dependent="ramp"``, a dissipation that grows linearly in time,
    𝓛(t) = 𝓛[H_0; L_k] + t·D[M_k]: a second set of n_jump jump operators M_k whose rates grow
    with t, as under a corruption whose severity ramps up (D[M] maps ρ to Σ_k M_k ρ M_k† −
    ½{M_k†M_k, ρ}; a sum of GKSL generators with non-negative weights is GKSL, so every 𝓛(t)
    with t ≥ 0 is a valid Lindbladian, and negative times are refused; :meth:`fit`'s default
    times start at 0). ``"linear"`` alone cannot move a spectrum — a unitary keeps the
    eigenvalues — ``"ramp"`` can: the share of a state relaxing at a rate γ_1·t that has relaxed
    by time t is 1 − exp(−γ_1 t²/2), the slow start and the saturation of a ramped corruption,
    which a single constant relaxation channel (a pure exponential, fastest at t = 0) cannot
    produce. H is complex Hermitian, parameterized as S + iA (S real symmetric, A real
    antisymmetric); L_k are complex d × d.
    Everything runs in complex128. For real density matrices note that the −i[S, ρ] part makes
    ρ complex (still Hermitian); only H = iA (and real L_k) keeps a real ρ real —
    ``real=True`` restricts the model to that case. The real part of a Hermitian density matrix
    is itself a density matrix (it is (ρ + ρᵀ)/2), which is what the forecasting helpers use.

    The paper's Eq. (7) omits the −½{L_k†L_k, ρ} term. Without it the trace is not preserved
    (d tr ρ/dt = Σ_k tr(L_k†L_k ρ) > 0): see :func:`lindblad_rhs`. With it the flow is
    completely positive and trace preserving, so every prediction is a density matrix.

    Integration: ``integrator="expm"`` uses the exact propagator exp(Δt·𝓛) of the d² × d²
    Liouvillian (:func:`liouvillian`) — for a time-dependent generator (``"linear"`` or
    ``"ramp"``) one exponential per sub-step of length ≤ ``dt`` at the sub-step's midpoint (each
    factor is itself CPTP — for the ramp because the midpoints are ≥ 0 — so trace and
    positivity hold exactly; second order in ``dt``); ``integrator="rk4"`` uses classical
    Runge–Kutta 4 with sub-steps ≤ ``dt`` (trace preserved exactly, positivity up to O(dt⁵)).
    d ≤ 16 keeps the superoperator small.

    Measured (docs/results/dynamics.md): on activation drift under ramped corruptions,
    ``LindbladPredictor(8, time_dependent="ramp", objective="one_step", dt=1.0)`` fitted on the
    whole history beats "last value" and linear extrapolation of d_FS at horizons of 4–6 windows
    (held-out run: MAE 0.0047–0.0060 vs 0.0052–0.0080 for linear), and loses to linear
    extrapolation one window ahead; the class defaults (constant generator, ``"rollout"``) are
    the worst there.

    Fitting (:meth:`fit`): Adam, then an L-BFGS polish, on the sum over observed windows of
    ‖ρ̂_t − ρ_t‖_F² (the best iterate is kept).
    ``objective="rollout"`` (default) predicts every window from ρ_0 alone — the model must
    explain the whole drift, and window-to-window sampling noise is averaged rather than chased;
    ``objective="one_step"`` (multiple shooting) predicts each window from the previous observed
    one, which is easier to optimize but optimizes one-step error only. A trajectory of a higher
    dimension D > ``dim`` is reduced to the top-``dim`` eigenvectors V of its mean density matrix
    (ρ_r = VᵀρV / tr VᵀρV); predictions are lifted back by replacing the span(V) block of the
    starting state with the evolved block (see the module docstring).

    Args:
        dim: dimension d the dynamics live in (≤ 16 is practical).
        n_jump: number of jump operators K (0: unitary dynamics).
        time_dependent: ``False``, ``"linear"`` (H(t) = H_0 + t·H_1) or ``"ramp"``
            (𝓛(t) = 𝓛[H_0; L] + t·D[M], t ≥ 0).
        lr, steps: Adam learning rate (cosine-annealed to 5 %) and iterations.
        polish_steps: L-BFGS iterations (strong Wolfe line search) after Adam, 0 to skip. Adam
            alone stalls at relative losses around 1e-4 on this problem; the quasi-Newton polish
            takes a noise-free trajectory of a 3-level system to 1e-17 (see the tests).
        seed: initialization seed.
        objective: ``"rollout"`` or ``"one_step"``.
        integrator: ``"expm"`` or ``"rk4"``.
        dt: largest integration sub-step (time units; windows are 1 apart unless ``times``).
        init_scale: standard deviation of the initial parameters.
        real: restrict to real dynamics (H = iA, real L_k).

    Example:
        >>> H = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.complex128)
        >>> L = 0.3 * torch.tensor([[[0.0, 1.0], [0.0, 0.0]]], dtype=torch.complex128)
        >>> truth = LindbladPredictor.from_operators(H, L)
        >>> rho0 = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.complex128)
        >>> traj = torch.cat([rho0[None], truth.predict(rho0, 9)])      # 10 windows
        >>> model = LindbladPredictor(2, n_jump=1, steps=400, lr=0.05).fit(traj[:6])
        >>> err = (model.predict(traj[5], 4) - traj[6:]).abs().amax().item()
        >>> err < 0.02
        True
    """

    def __init__(
        self,
        dim: int,
        n_jump: int = 2,
        time_dependent: Literal[False, "linear", "ramp"] = False,
        *,
        lr: float = 0.03,
        steps: int = 300,
        polish_steps: int = 200,
        seed: int = 0,
        objective: Literal["rollout", "one_step"] = "rollout",
        integrator: Literal["expm", "rk4"] = "expm",
        dt: float = 0.25,
        init_scale: float = 1e-3,
        real: bool = False,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if dim > 32:
            raise ValueError(f"dim={dim}: the Liouvillian is dim² × dim²; reduce to dim ≤ 16")
        if isinstance(n_jump, bool) or not isinstance(n_jump, int) or n_jump < 0:
            raise ValueError(f"n_jump must be an int >= 0, got {n_jump!r}")
        if time_dependent not in (False, None, "linear", "ramp"):
            raise ValueError(f"time_dependent must be False, 'linear' or 'ramp', "
                             f"got {time_dependent!r}")
        if objective not in ("rollout", "one_step"):
            raise ValueError(f"objective must be 'rollout' or 'one_step', got {objective!r}")
        if integrator not in ("expm", "rk4"):
            raise ValueError(f"integrator must be 'expm' or 'rk4', got {integrator!r}")
        if not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt!r}")
        self.dim, self.n_jump = dim, n_jump
        self.time_dependent = time_dependent or False
        self.lr, self.steps, self.polish_steps, self.seed = lr, steps, polish_steps, seed
        self.objective, self.integrator, self.dt = objective, integrator, dt
        self.real = real
        gen = torch.Generator().manual_seed(seed)

        def param(*shape: int, scale: float = init_scale) -> Tensor:
            return (scale * torch.randn(*shape, generator=gen, dtype=_F64)).requires_grad_()

        d = dim
        self.params: dict[str, Tensor] = {"h0_im": param(d, d), "l_re": param(n_jump, d, d)}
        if not real:
            self.params["h0_re"] = param(d, d)
            self.params["l_im"] = param(n_jump, d, d)
        if self.time_dependent == "linear":
            self.params["h1_im"] = param(d, d, scale=0.0)
            if not real:
                self.params["h1_re"] = param(d, d, scale=0.0)
        if self.time_dependent == "ramp":
            if n_jump < 1:
                raise ValueError("time_dependent='ramp' needs n_jump >= 1 (the ramp's jump "
                                 "operators M_k are n_jump too), got n_jump=0")
            self.params["m_re"] = param(n_jump, d, d)
            if not real:
                self.params["m_im"] = param(n_jump, d, d)
        self.basis: Tensor | None = None
        self.step: float = 1.0
        self.t_last: float = 0.0
        self.loss_history: list[float] = []
        self.fit_loss: float | None = None

    # -- construction from known operators ----------------------------------------------------

    @classmethod
    def from_operators(cls, H: Tensor, jumps: Tensor, H1: Tensor | None = None,
                       ramp_jumps: Tensor | None = None, **kwargs: Any) -> LindbladPredictor:
        """A predictor with the given H_0, jump operators (``(K, d, d)``), and either H_1
        (``time_dependent="linear"``) or ramp jump operators M_k (``(K, d, d)``, same K;
        ``"ramp"``), e.g. to simulate a known system. H must be Hermitian (its Hermitian part
        is used)."""
        H = _sym(_as_c128(H))
        jumps = _as_c128(jumps)
        if jumps.ndim == 2:
            jumps = jumps[None]
        d = H.shape[0]
        if ramp_jumps is not None:
            if H1 is not None:
                raise ValueError("pass H1 (time_dependent='linear') or ramp_jumps ('ramp'), "
                                 "not both")
            ramp_jumps = _as_c128(ramp_jumps)
            if ramp_jumps.ndim == 2:
                ramp_jumps = ramp_jumps[None]
            if ramp_jumps.shape != jumps.shape:
                raise ValueError(f"ramp_jumps must have the shape of jumps {tuple(jumps.shape)}, "
                                 f"got {tuple(ramp_jumps.shape)}")
        mode = "ramp" if ramp_jumps is not None else "linear" if H1 is not None else False
        model = cls(d, n_jump=jumps.shape[0], time_dependent=mode, **kwargs)
        with torch.no_grad():
            p = model.params
            # H = S + iA with S = sym(h_re) and A = antisym(h_im): store S and A directly
            if "h0_re" in p:
                p["h0_re"].copy_(H.real)
            p["h0_im"].copy_(H.imag)
            p["l_re"].copy_(jumps.real)
            if "l_im" in p:
                p["l_im"].copy_(jumps.imag)
            if H1 is not None:
                H1 = _sym(_as_c128(H1))
                if "h1_re" in p:
                    p["h1_re"].copy_(H1.real)
                p["h1_im"].copy_(H1.imag)
            if ramp_jumps is not None:
                p["m_re"].copy_(ramp_jumps.real)
                if "m_im" in p:
                    p["m_im"].copy_(ramp_jumps.imag)
        return model

    # -- operators ----------------------------------------------------------------------------

    def _herm(self, re: str, im: str) -> Tensor:
        p = self.params
        a = p[im]
        out = (1j * (a - a.T) / 2).to(_C128)
        if re in p:
            s = p[re]
            out = out + ((s + s.T) / 2).to(_C128)
        return out

    def hamiltonian(self, t: float = 0.0) -> Tensor:
        """H(t) = H_0 (+ t·H_1 for ``"linear"``), ``(d, d)`` complex128 Hermitian."""
        H = self._herm("h0_re", "h0_im")
        if self.time_dependent == "linear":
            H = H + t * self._herm("h1_re", "h1_im")
        return H

    def _complex(self, re: str, im: str) -> Tensor:
        p = self.params
        out = p[re].to(_C128)
        if im in p:
            out = out + 1j * p[im].to(_C128)
        return out

    @property
    def jump_operators(self) -> Tensor:
        """The L_k, ``(K, d, d)`` complex128."""
        return self._complex("l_re", "l_im")

    @property
    def ramp_jump_operators(self) -> Tensor | None:
        """The M_k of ``time_dependent="ramp"`` (rates growing with t), ``(K, d, d)`` complex128;
        ``None`` for the other modes."""
        return self._complex("m_re", "m_im") if self.time_dependent == "ramp" else None

    def liouvillian(self, t: float = 0.0) -> Tensor:
        """𝓛(t), ``(d², d²)`` complex128 (see :func:`liouvillian`)."""
        G0, G1 = self._generators()
        return G0 if G1 is None else G0 + t * G1

    def _generators(self) -> tuple[Tensor, Tensor | None]:
        """𝓛(t) = G0 + t·G1 (the Liouvillian is affine in H; ``"ramp"``: G1 = D[M])."""
        G0 = liouvillian(self._herm("h0_re", "h0_im"), self.jump_operators)
        if not self.time_dependent:
            return G0, None
        d = self.dim
        if self.time_dependent == "ramp":
            return G0, liouvillian(torch.zeros(d, d, dtype=_C128), self.ramp_jump_operators)
        H1 = self._herm("h1_re", "h1_im")
        eye = torch.eye(d, dtype=_C128)
        G1 = -1j * (_kron(H1, eye) - _kron(eye, H1.T))
        return G0, G1

    def _transitions(self, G0: Tensor, G1: Tensor | None, times: list[float]) -> list[Tensor]:
        """Propagators (d², d²) over each consecutive interval of ``times``.

        Time-independent + expm: one exponential per distinct gap. Otherwise every sub-step
        (≤ ``dt``) of every interval is built in one batch: exp(h·𝓛(t + h/2)) or the RK4 step
        matrix; each interval's propagator is the ordered product of its sub-steps.
        """
        gaps = [b - a for a, b in zip(times[:-1], times[1:])]
        if G1 is None and self.integrator == "expm":
            cache: dict[float, Tensor] = {}
            out = []
            for gap in gaps:
                key = round(gap, 12)
                if key not in cache:
                    cache[key] = torch.linalg.matrix_exp(gap * G0)
                out.append(cache[key])
            return out
        starts, steps, owner = [], [], []
        for i, (a, gap) in enumerate(zip(times[:-1], gaps)):
            n = max(1, math.ceil(abs(gap) / self.dt - 1e-9))
            for j in range(n):
                starts.append(a + j * gap / n)
                steps.append(gap / n)
                owner.append(i)
        t = torch.tensor(starts, dtype=_F64).to(_C128)[:, None, None]
        h = torch.tensor(steps, dtype=_F64).to(_C128)[:, None, None]

        def gen(at: Tensor) -> Tensor:
            return G0.expand(at.shape[0], -1, -1) if G1 is None else G0 + at * G1

        if self.integrator == "expm":
            sub = torch.linalg.matrix_exp(h * gen(t + h / 2))
        else:
            sub = _rk4_step_matrix(gen(t), gen(t + h / 2), gen(t + h), h)
        out: list[Tensor | None] = [None] * len(gaps)
        for k, i in enumerate(owner):
            prev = out[i]
            out[i] = sub[k] if prev is None else sub[k] @ prev
        return out  # type: ignore[return-value]

    def _evolve(self, rho0: Tensor, times: list[float]) -> Tensor:
        """States at ``times[1:]`` starting from ``rho0`` at ``times[0]`` (d-dimensional)."""
        G0, G1 = self._generators()
        v = _as_c128(rho0).reshape(-1)
        out = []
        for P in self._transitions(G0, G1, times):
            v = P @ v
            out.append(v)
        d = self.dim
        return torch.stack(out).reshape(-1, d, d)

    # -- reduction ----------------------------------------------------------------------------

    def _reduce(self, rho: Tensor) -> tuple[Tensor, Tensor]:
        """(ρ_r, mass) of ``(..., D, D)`` states in the fitted basis (identity if none)."""
        rho = _as_c128(rho)
        if self.basis is None:
            if rho.shape[-1] != self.dim:
                raise ValueError(f"expected ({self.dim}, {self.dim}) states, got "
                                 f"{tuple(rho.shape[-2:])}; fit on the full trajectory first")
            tr = torch.diagonal(rho, dim1=-2, dim2=-1).sum(-1).real
            return rho, tr
        V = self.basis
        if rho.shape[-1] != V.shape[0]:
            raise ValueError(f"states are {rho.shape[-1]}-dimensional but the predictor was "
                             f"fitted on {V.shape[0]}-dimensional ones")
        red = V.conj().T @ rho @ V
        mass = torch.diagonal(red, dim1=-2, dim2=-1).sum(-1).real
        return red / mass[..., None, None].clamp_min(1e-300), mass

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, trajectory: Tensor, times: Tensor | None = None, *,
            num_threads: int | None = 1) -> LindbladPredictor:
        """Fit H (and H_1, or the M_k for ``"ramp"``) and the L_k to an observed trajectory
        ``(T, D, D)`` of density matrices at ``times`` (default 0, 1, …, T−1). D > ``dim``:
        reduced basis (see class docstring). Returns ``self``; ``loss_history`` and ``fit_loss``
        (sum of squared Frobenius errors of the best iterate, in the reduced space) are kept.

        ``num_threads``: intra-op threads while fitting (restored after). The d² × d² matrices
        are far too small for parallel kernels; on a loaded machine the default of 1 thread was
        10× faster than 2. ``None`` leaves torch's setting alone.
        """
        previous = torch.get_num_threads()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            return self._fit(trajectory, times)
        finally:
            if num_threads is not None:
                torch.set_num_threads(previous)

    def _fit(self, trajectory: Tensor, times: Tensor | None) -> LindbladPredictor:
        traj = trajectory.detach()
        if traj.ndim != 3 or traj.shape[-1] != traj.shape[-2] or traj.shape[0] < 2:
            raise ValueError(f"trajectory must be (T >= 2, D, D), got {tuple(traj.shape)}")
        T, D = traj.shape[0], traj.shape[-1]
        if self.dim > D:
            raise ValueError(f"trajectory is {D}-dimensional < dim={self.dim}")
        if times is None:
            tlist = [float(i) for i in range(T)]
        else:
            tlist = [float(t) for t in torch.as_tensor(times, dtype=_F64).reshape(-1)]
            if len(tlist) != T or any(b <= a for a, b in zip(tlist[:-1], tlist[1:])):
                raise ValueError("times must be strictly increasing with one entry per window")
        if self.time_dependent == "ramp" and tlist[0] < 0:
            raise ValueError(f"time_dependent='ramp' needs times >= 0 (the ramp adds t·D[M], a "
                             f"valid dissipator only for t >= 0), got times[0]={tlist[0]}")
        self.step = (tlist[-1] - tlist[0]) / (T - 1)
        self.t_last = tlist[-1]
        self.t_first = tlist[0]
        if self.dim < D:
            mean = _sym(_as_c128(traj).mean(0))
            _, U = torch.linalg.eigh(mean)
            V = U[:, -self.dim:].flip(-1)
            if not traj.is_complex():
                V = V.real.to(_C128)
            self.basis = V
        else:
            self.basis = None
        target, _ = self._reduce(traj)
        target = _sym(target)
        scale = float(((target - target.mean(0)).abs() ** 2).sum().clamp_min(1e-30))
        params = list(self.params.values())
        opt = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.steps, 1),
                                                           eta_min=0.05 * self.lr)
        best = (math.inf, [p.detach().clone() for p in params])
        self.loss_history = []
        for _ in range(self.steps):
            opt.zero_grad()
            loss = self._loss(target, tlist)
            value = float(loss.detach())
            self.loss_history.append(value)
            if value < best[0]:
                best = (value, [p.detach().clone() for p in params])
            (loss / scale).backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            final = float(self._loss(target, tlist))
            if final < best[0]:
                best = (final, [p.detach().clone() for p in params])
            for p, b in zip(params, best[1]):
                p.copy_(b)
        if self.polish_steps > 0:
            lbfgs = torch.optim.LBFGS(params, lr=1.0, max_iter=self.polish_steps,
                                      history_size=50, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-12, tolerance_change=1e-16)

            def closure() -> Tensor:
                lbfgs.zero_grad()
                value = self._loss(target, tlist) / scale
                value.backward()
                return value

            # a non-finite matrix exponential in the line search ends the polish early
            with contextlib.suppress(RuntimeError):
                lbfgs.step(closure)
            with torch.no_grad():
                final = float(self._loss(target, tlist))
                if math.isfinite(final) and final < best[0]:
                    best = (final, [p.detach().clone() for p in params])
                for p, b in zip(params, best[1]):
                    p.copy_(b)
        self.fit_loss = best[0]
        return self

    def _loss(self, target: Tensor, tlist: list[float]) -> Tensor:
        if self.objective == "rollout":
            pred = self._evolve(target[0], tlist)
            return (pred - target[1:]).abs().pow(2).sum()
        G0, G1 = self._generators()
        d = self.dim
        props = torch.stack(self._transitions(G0, G1, tlist))
        pred = (props @ target[:-1].reshape(-1, d * d, 1)).reshape(-1, d, d)
        return (pred - target[1:]).abs().pow(2).sum()

    # -- prediction ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, rho0: Tensor, horizon_steps: int, *, t0: float | None = None,
                step: float | None = None) -> Tensor:
        """Evolve ``rho0`` (``(D, D)``) for ``horizon_steps`` steps of length ``step`` (default:
        the fitted window spacing, 1 before fitting) starting at time ``t0`` (default: the time
        of the last fitted window, 0 before fitting — a forecast that continues the fitted
        trajectory; pass ``t0`` to evolve another window's state). Only a time-dependent
        generator depends on ``t0``; ``"ramp"`` needs t0 ≥ 0.

        Returns:
            ``(horizon_steps, D, D)`` complex128: the states after 1, …, h steps. With a reduced
            basis, the span(V) block of ``rho0`` is evolved and the rest held (module docstring).
        """
        if isinstance(horizon_steps, bool) or not isinstance(horizon_steps, int) \
                or horizon_steps < 1:
            raise ValueError(f"horizon_steps must be an int >= 1, got {horizon_steps!r}")
        step = self.step if step is None else float(step)
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"step must be a finite number > 0, got {step!r}")
        t0 = self.t_last if t0 is None else float(t0)
        if self.time_dependent == "ramp" and t0 < 0:
            raise ValueError(f"time_dependent='ramp' needs t0 >= 0, got {t0}")
        rho0 = _as_c128(rho0)
        red, mass = self._reduce(rho0)
        times = [t0 + i * step for i in range(horizon_steps + 1)]
        evolved = self._evolve(red, times)
        if self.basis is None:
            return evolved * mass if float(abs(mass - 1)) > 1e-12 else evolved
        V = self.basis
        delta = V @ (evolved - red) @ V.conj().T
        return rho0 + mass * delta

    @torch.no_grad()
    def forecast_distance(self, trajectory: Tensor, horizon: int,
                          reference: Tensor | None = None, *,
                          metric: Literal["fs", "bures"] = "fs",
                          t0: float | None = None) -> Tensor:
        """Forecast the distance of the next ``horizon`` windows to ``reference``.

        Starts from ``trajectory[-1]`` (``(T, D, D)``, or a single ``(D, D)`` state) at time
        ``t0`` (default: the trajectory is assumed to start where the fitted one started, with
        the fitted spacing). ``metric="fs"``: d_FS between spectral states ψ = sqrt(λ(ρ)) (the
        tracker's ``d_fs_ref``); ``"bures"``: Bures angle. ``reference`` defaults to
        ``trajectory[0]``. Forecasts are projected to real density matrices (real part, negative
        eigenvalues clipped) before measuring.

        Returns:
            ``(horizon,)`` float64.
        """
        traj = trajectory if trajectory.ndim == 3 else trajectory[None]
        if reference is None:
            reference = traj[0]
        if t0 is None:
            t0 = getattr(self, "t_first", 0.0) + (traj.shape[0] - 1) * self.step
        preds = self.predict(traj[-1], horizon, t0=t0)
        out = []
        for p in preds:
            rho = _clip_density(p if reference.is_complex() else p.real)
            if metric == "fs":
                out.append(float(fubini_study(spectral_state_of_density(rho),
                                              spectral_state_of_density(reference))))
            elif metric == "bures":
                out.append(bures_angle(rho, reference))
            else:
                raise ValueError(f"metric must be 'fs' or 'bures', got {metric!r}")
        return torch.tensor(out, dtype=_F64)


def _clip_density(rho: Tensor) -> Tensor:
    """Nearest-ish density matrix: Hermitian part, eigenvalues clipped at 0, trace one."""
    w, u = torch.linalg.eigh(_sym(rho))
    w = w.clamp(min=0.0)
    out = (u * w.to(u.dtype).unsqueeze(-2)) @ u.transpose(-2, -1).conj()
    return out / torch.trace(out).real


# =============================================================================================
# predictive pruning
# =============================================================================================


def forecast_density_matrix(
    trajectory: Tensor,
    horizon: int = 1,
    *,
    rank: int = 8,
    windows: int | None = None,
    predictor: LindbladPredictor | None = None,
    **predictor_kwargs: Any,
) -> Tensor:
    """Density matrix forecast ``horizon`` windows after the last one of ``trajectory`` (§3.3,
    Eq. 7 in its trace-preserving GKSL form).

    A :class:`LindbladPredictor` of dimension ``min(rank, d)`` is fitted on the last ``windows``
    (default all) density matrices of the ``(T, d, d)`` trajectory, in the reduced basis of their
    mean; the last observed ρ is evolved ``horizon`` windows, lifted back to the channel basis
    (the span(V) block replaced by the forecast, the rest held) and projected to a real density
    matrix (Hermitian part, eigenvalues clipped at 0, trace one). Pass an already fitted
    ``predictor`` to skip fitting.

    Returns:
        ``(d, d)`` float64, trace one.

    Example:
        >>> traj = torch.stack([torch.diag(torch.tensor([0.5 + 0.05 * t, 0.5 - 0.05 * t],
        ...                                               dtype=torch.float64)) for t in range(5)])
        >>> rho = forecast_density_matrix(traj, 2, rank=2, steps=60, polish_steps=20)
        >>> rho.shape, round(float(torch.trace(rho)), 6)
        (torch.Size([2, 2]), 1.0)
    """
    traj = trajectory.detach()
    if traj.ndim != 3 or traj.shape[-1] != traj.shape[-2]:
        raise ValueError(f"trajectory must be (T, d, d), got {tuple(traj.shape)}")
    if windows is not None:
        traj = traj[-windows:]
    if traj.shape[0] < 2:
        raise ValueError(f"need at least 2 windows, have {traj.shape[0]}")
    if predictor is None:
        predictor = LindbladPredictor(min(rank, traj.shape[-1]), **predictor_kwargs).fit(traj)
    t0 = getattr(predictor, "t_first", 0.0) + (traj.shape[0] - 1) * predictor.step
    rho = predictor.predict(traj[-1], horizon, t0=t0)[-1].real
    return _clip_density(rho)


def forecast_channel_redundancy(
    tracker: SpectralTracker,
    module_name: str,
    horizon: int = 1,
    *,
    rank: int = 8,
    windows: int | None = None,
    predictor: LindbladPredictor | None = None,
    **predictor_kwargs: Any,
) -> Tensor:
    """Per-channel redundancy of ``module_name`` forecast ``horizon`` windows ahead (§3.3,
    predictive pruning). Lower = more redundant, so the result is usable as an importance
    (keep high scores).

    :func:`channel_redundancy` of :func:`forecast_density_matrix` on the module's trajectory
    (``rank``, ``windows``, ``predictor`` and ``predictor_kwargs`` are passed on).

    Returns:
        ``(d,)`` float64 in [0, 1].

    Example:
        >>> net = nn.Sequential(nn.Linear(6, 5))
        >>> with SpectralTracker(net, window=1) as tr:
        ...     for t in range(6):
        ...         _ = net(torch.randn(64, 6) * (1 + 0.2 * t))
        >>> forecast_channel_redundancy(tr, "0", 2, rank=3, steps=30).shape
        torch.Size([5])
    """
    traj = tracker.trajectory(module_name)
    if windows is not None:
        traj = traj[-windows:]
    if traj.shape[0] < 2:
        raise ValueError(f"need at least 2 windows of {module_name!r}, have {traj.shape[0]}")
    return channel_redundancy(forecast_density_matrix(traj, horizon, rank=rank,
                                                      predictor=predictor, **predictor_kwargs))


def channel_residual_energy(rho: Tensor, *, eps: float = 1e-10) -> Tensor:
    """Energy of each channel's activation left after regressing it on its siblings,
    ``1 / [ρ⁻¹]_ii`` = redundancy_i · ρ_ii (the squared FS-distance-weighted norm of the
    channel's state off the span of the others; 0 = a linear combination of the others).

    Unlike :func:`channel_redundancy` it is not scale invariant: a weak channel scores low even
    when it is independent, which is what a pruning importance wants (keep high scores).

    Example:
        >>> channel_residual_energy(torch.diag(torch.tensor([0.75, 0.25], dtype=torch.float64)))
        tensor([0.7500, 0.2500], dtype=torch.float64)
    """
    g = rho.real if rho.is_complex() else rho
    g = _sym(g.detach().to(_F64))
    return channel_redundancy(g, eps=eps) * g.diagonal().clamp_min(0.0)


class TrackedImportance(tp.importance.Importance):
    """Torch-Pruning importance from given per-channel scores (higher = keep), so that scores
    from a :class:`SpectralTracker` — current or forecast (§3.3 predictive pruning) — drive any
    ``tp.pruner.BasePruner``, the machinery :func:`torch_qmprune.prune` runs on.

    Args:
        scores: ``{module: (channels,) scores}`` for the modules whose *output* channels the
            scores describe (a Conv/Linear, or its BatchNorm/activation). In a group every
            member found in ``scores`` contributes (averaged over members, mapped through the
            group's root indices); Conv/Linear only count where their outputs are pruned.
        fallback: importance used for groups with no scored member (default: skip the group,
            i.e. Torch-Pruning leaves it unpruned).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
        >>> imp = TrackedImportance({net[0]: torch.tensor([0.1, 3.0, 2.0, 0.2])})
        >>> pruner = tp.pruner.BasePruner(net, torch.randn(1, 1, 8, 8), importance=imp,
        ...                               pruning_ratio=0.5, ignored_layers=[net[2]])
        >>> pruner.step()
        >>> net[0].out_channels
        2
    """

    def __init__(self, scores: dict[nn.Module, Tensor],
                 fallback: tp.importance.Importance | None = None) -> None:
        self.scores = {m: torch.as_tensor(s, dtype=_F64).reshape(-1) for m, s in scores.items()}
        self.fallback = fallback

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        n = len(group[0][1])
        acc = torch.zeros(n, dtype=_F64)
        hits = torch.zeros(n, dtype=_F64)
        for i, (dep, idxs) in enumerate(group):
            module = dep.target.module
            if module not in self.scores:
                continue
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not _is_out(dep):
                continue
            roots = group[i].root_idxs
            if any(r is None for r in roots):
                continue
            s = self.scores[module]
            if max(idxs) >= s.numel():
                raise ValueError(f"TrackedImportance: {s.numel()} scores for a module with "
                                 f"channel index {max(idxs)}")
            acc.scatter_add_(0, torch.tensor(list(roots)), s[list(idxs)])
            hits.scatter_add_(0, torch.tensor(list(roots)), torch.ones(len(idxs), dtype=_F64))
        if hits.sum() == 0:
            return self.fallback(group) if self.fallback is not None else None
        return (acc / hits.clamp_min(1)).float()
