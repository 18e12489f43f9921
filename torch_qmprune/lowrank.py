"""Controllable quantum kernel approximation (arXiv 2512.00880 §3.2, Eq. (5)): each Linear/Conv
becomes two thin layers from a truncated eigenbasis, with the rank chosen so that S(ρ_q ‖ ρ) ≤ δ.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._transaction import atomic
from .calibration import InputGram, _forward, iter_calibration, recalibrate_batchnorm
from .spectral.states import _weight_and_bias, operator_matrix

__all__ = ["LayerLowRank", "LowRankReport", "factorize_layer", "jensen_shannon_truncation",
           "kept_mass_divergence", "lowrank_compress", "select_rank"]

#: eigenvalues of a trace-one ρ at or below this count as zero (as in quantum_relative_entropy).
_EPS = 1e-12
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TYPES = (nn.Linear, *_CONV_TYPES)


# ---------------------------------------------------------------------------------------------
# closed forms on the spectrum of ρ
# ---------------------------------------------------------------------------------------------


def _check_delta(delta: object, name: str = "delta") -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {delta!r} "
                        f"of type {type(delta).__name__}")
    value = float(delta)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (nats), got {delta!r}")
    return value


def _normalized_spectrum(values: Tensor, what: str) -> Tensor:
    """Eigenvalues of a PSD matrix → float64, clamped at 0, descending, summing to one."""
    lam = values.detach().to(torch.float64).flatten().clamp(min=0.0)
    lam = torch.sort(lam, descending=True).values
    total = lam.sum()
    if not torch.isfinite(total) or not total > 0:
        raise ValueError(f"{what} has no positive eigenvalue (trace {float(total):.3g}); "
                         "expected a non-zero operator or Gram matrix")
    return lam / total


def kept_mass_divergence(lam: Tensor) -> Tensor:
    """S(ρ_q ‖ ρ) = −log Λ_q for q = 1..n, from ρ's eigenvalues ``lam`` (paper §3.2).

    ``lam``: eigenvalues of a trace-one ρ (any order). Entry ``q−1`` of the result is the
    forward relative entropy of the rank-q truncation; the tail mass ``1 − Λ_q`` is summed from
    the small end so that δ down to ~1e-15 is resolved.

    Example:
        >>> kept_mass_divergence(torch.tensor([0.5, 0.5], dtype=torch.float64))
        tensor([0.6931, 0.0000], dtype=torch.float64)
    """
    p = _normalized_spectrum(lam, "rho")
    tail = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])  # tail[i] = Σ_{j≥i} p_j
    tail = torch.cat([tail[1:], tail.new_zeros(1)])               # mass beyond the first q
    return -torch.log1p(-tail.clamp(max=1.0 - 1e-300))


def jensen_shannon_truncation(lam: Tensor) -> Tensor:
    """Quantum Jensen–Shannon divergence JS(ρ_q, ρ) for q = 1..n, closed form (paper §3.2).

    JS(ρ, σ) = S((ρ+σ)/2) − (S(ρ) + S(σ))/2 (von Neumann entropies S). ρ_q and ρ share an
    eigenbasis, so JS is the classical Jensen–Shannon divergence of the eigenvalue vectors
    p and p_q = (p₁, …, p_q, 0, …)/Λ_q. Always finite, in [0, log 2], symmetric.

    Example:
        >>> js = jensen_shannon_truncation(torch.tensor([0.5, 0.5], dtype=torch.float64))
        >>> [round(float(v), 4) for v in js]
        [0.2158, 0.0]
    """
    p = _normalized_spectrum(lam, "rho")
    n = p.shape[0]

    def entropy(x: Tensor) -> Tensor:
        safe = torch.where(x > 0, x, torch.ones_like(x))
        return -(x * torch.log(safe)).sum(-1)

    kept = torch.cumsum(p, 0)                                    # Λ_q
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))        # row q−1: entries i < q
    pq = torch.where(mask, p.expand(n, n) / kept[:, None], torch.zeros((), dtype=p.dtype))
    m = (pq + p.expand(n, n)) / 2
    js = entropy(m) - (entropy(pq) + entropy(p)) / 2
    return js.clamp(min=0.0)


def _rank_from_spectrum(lam: Tensor, delta: float, *, reverse: bool = False,
                        symmetric: bool = False) -> int:
    p = _normalized_spectrum(lam, "rho")
    n = p.shape[0]
    if reverse:
        rank = int((p > _EPS).sum())
        if rank >= n:
            raise ValueError(
                f"reverse=True: S(ρ ‖ ρ_q) = +inf for every q < {n} because ρ has full rank "
                f"{n} (the truncation ρ_q puts zero weight where ρ does not); the reverse form "
                "only allows q = rank ρ, i.e. no compression. Use reverse=False (forward, "
                "S(ρ_q ‖ ρ) = −log of the kept mass) or symmetric=True (quantum Jensen–Shannon)")
        return rank
    curve = jensen_shannon_truncation(p) if symmetric else kept_mass_divergence(p)
    ok = torch.nonzero(curve <= delta + 1e-12)
    return int(ok[0]) + 1 if len(ok) else n


def _centered_output_gram(weight2d: Tensor, gram: InputGram) -> Tensor:
    """W Σ Wᵀ with Σ the centered input covariance from an augmented input Gram [X, 1]ᵀ[X, 1]."""
    g = gram.gram.detach().to(torch.float64)
    d = g.shape[0] - 1
    if d != weight2d.shape[1]:
        raise ValueError(
            f"gram is an input Gram over {d} features but the operator reads "
            f"{weight2d.shape[1]} (a convolution needs the Gram of unfolded C_in·k^d patches, "
            "which collect_input_grams does not gather); pass the layer's output Gram "
            f"({weight2d.shape[0]}x{weight2d.shape[0]}) instead")
    n = g[-1, -1].clamp_min(1.0)
    s = g[:-1, -1]
    cov = g[:-1, :-1] - torch.outer(s, s) / n
    w = weight2d.to(torch.float64)
    return w @ cov @ w.T


def _spectrum_of(module_or_matrix: Any, basis: str, gram: Any, augment: bool) -> Tensor:
    """Eigenvalues of the density matrix ρ that :func:`select_rank` truncates."""
    if basis not in ("weight", "activation"):
        raise ValueError(f"basis must be 'weight' or 'activation', got {basis!r}")
    if basis == "activation" and gram is None:
        g = module_or_matrix
        if not isinstance(g, Tensor) or g.ndim != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(
                "basis='activation' without gram= needs module_or_matrix to be a square Gram "
                f"matrix; got {type(g).__name__} "
                f"{tuple(g.shape) if isinstance(g, Tensor) else ''}; or pass gram=")
        g = g.detach().to(torch.float64)
        return torch.linalg.eigvalsh((g + g.T) / 2)
    weight, bias = _weight_and_bias(module_or_matrix, "module_or_matrix")
    w = operator_matrix(weight).detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("module_or_matrix has non-finite weights; expected finite values")
    if basis == "weight":
        if augment:
            from .spectral.states import augment as _augment

            b = None if bias is None else bias.detach().to(torch.float64).reshape(-1)
            w = _augment(w, b)
        return torch.linalg.svdvals(w) ** 2
    if isinstance(gram, InputGram):
        c = _centered_output_gram(w, gram)
    elif isinstance(gram, Tensor):
        if gram.shape != (w.shape[0], w.shape[0]):
            raise ValueError(
                f"gram must be the layer's output Gram of shape ({w.shape[0]}, {w.shape[0]}) "
                f"(or an InputGram from collect_input_grams), got {tuple(gram.shape)}")
        c = gram.detach().to(torch.float64)
    else:
        raise TypeError(f"gram must be a Tensor (output Gram) or an InputGram, got "
                        f"{type(gram).__name__}")
    return torch.linalg.eigvalsh((c + c.T) / 2)


def select_rank(
    module_or_matrix: nn.Module | Tensor | tuple[Tensor, Tensor | None],
    delta: float,
    *,
    basis: str = "weight",
    gram: Tensor | InputGram | None = None,
    reverse: bool = False,
    symmetric: bool = False,
    augment: bool = False,
) -> int:
    """Smallest rank q whose truncation ρ_q of the layer's density matrix has S(ρ_q ‖ ρ) ≤ δ.

    Paper §3.2 (Eq. (5), "cluster ≈ V Σ_q V†"). The density matrix ρ:

    - ``basis="weight"``: ρ = W Wᵀ / tr(W Wᵀ) with W the operator matrix (a conv as
      ``C_out x C_in·k^d``); its eigenvalues are σᵢ²/Σσ² (σ: singular values of W).
      ``augment=True`` uses the paper's Ŵ = [[W, b], [0, 1]] instead; the default is the plain W
      because the factorization truncates W only (the bias is kept exactly), and the constant
      1 of Ŵ is not on W's scale.
    - ``basis="activation"``: ρ = C / tr C with C the layer's *output* Gram on real data
      (``gram``: the ``(out, out)`` matrix Σ (y − b − ȳ)(y − b − ȳ)ᵀ that
      :func:`lowrank_compress` collects, or an :class:`~torch_qmprune.calibration.InputGram`
      of a Linear from ``collect_input_grams``, turned into W Σ Wᵀ with the centered input
      covariance Σ). Without ``gram``, ``module_or_matrix`` itself is taken as the Gram.

    Closed form. With ρ = Σᵢ λᵢ uᵢuᵢᵀ (λ descending, Σλ = 1), Λ_q = Σ_{i≤q} λᵢ and
    ρ_q = Σ_{i≤q} (λᵢ/Λ_q) uᵢuᵢᵀ (same eigenbasis),

        S(ρ_q ‖ ρ) = Σ_{i≤q} (λᵢ/Λ_q)·(log(λᵢ/Λ_q) − log λᵢ) = −log Λ_q,

    so q is the smallest rank keeping a mass Λ_q ≥ e^{−δ}. In the weight basis the tail mass
    1 − Λ_q is ‖W − W_q‖²_F / ‖W‖²_F (Eckart–Young), in the activation basis it is the
    fraction of the (centered) output energy on the data that the rank-q layer loses: the
    relative error is exactly sqrt(1 − e^{−δ_achieved}) ≤ sqrt(1 − e^{−δ}).

    The reverse direction S(ρ ‖ ρ_q) is +∞ for every q < rank ρ (ρ has weight where ρ_q has
    none) and 0 from q = rank ρ on: ``reverse=True`` returns the numerical rank (eigenvalues
    > 1e-12) when ρ is rank-deficient and raises ``ValueError`` when it has full rank (every
    truncation is infinitely far). The Jeffreys symmetrization S(ρ_q‖ρ) + S(ρ‖ρ_q) has the
    same infinities; ``symmetric=True`` uses the finite symmetric form instead, the quantum
    Jensen–Shannon divergence (:func:`jensen_shannon_truncation`, at most log 2).

    Args:
        module_or_matrix: a Linear/ConvNd module, a weight tensor, a ``(weight, bias)`` pair,
            or (``basis="activation"`` without ``gram``) a square Gram matrix.
        delta: budget δ ≥ 0 in nats. δ = 0 keeps the full (numerical) rank.
        basis: ``"weight"`` or ``"activation"``.
        gram: output Gram or ``InputGram`` for ``basis="activation"``.
        reverse: use S(ρ ‖ ρ_q) (see above).
        symmetric: use the quantum Jensen–Shannon divergence.
        augment: weight basis on the bias-augmented Ŵ.

    Returns:
        q in [1, n] (n = size of ρ).

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 2.0, 1.0]))      # λ = (9, 4, 1) / 14
        >>> select_rank(w, 0.05), select_rank(w, 0.1), select_rank(w, 0.5), select_rank(w, 0.0)
        (3, 2, 1, 3)
    """
    delta = _check_delta(delta)
    if reverse and symmetric:
        raise ValueError("pass reverse=True or symmetric=True, not both")
    lam = _spectrum_of(module_or_matrix, basis, gram, augment)
    return _rank_from_spectrum(lam, delta, reverse=reverse, symmetric=symmetric)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerLowRank:
    """One layer's decision in :func:`lowrank_compress`.

    ``delta``: S(ρ_q ‖ ρ) achieved (−log of the kept mass) in the basis used;
    ``predicted_error``: sqrt(1 − e^{−δ}), the relative error that basis guarantees (weights:
    ‖W − W_q‖_F/‖W‖_F; activations: lost fraction of the centered output energy);
    ``output_error``: measured ‖y − y_q‖/‖y‖ of the layer's output on the calibration data
    (the layer alone, fed its original inputs), ``None`` without calibration.
    """

    name: str
    kind: str
    rank: int
    full_rank: int
    delta: float
    predicted_error: float
    basis: str
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    output_error: float | None = None
    replaced: bool = False
    reason: str = ""
    shared_with: list[str] = field(default_factory=list)


@dataclass
class LowRankReport:
    """What :func:`lowrank_compress` did. ``model`` is the compressed model (the same object as
    the input for a container, a new ``nn.Sequential`` when a bare layer was passed)."""

    delta: float | None
    basis: str
    layers: dict[str, LayerLowRank] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    output_error: float | None = None
    bn_recalibrated: int = 0
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def replaced(self) -> list[str]:
        return [n for n, layer in self.layers.items() if layer.replaced]

    @property
    def param_ratio(self) -> float:
        """params_after / params_before."""
        return self.params_after / max(1, self.params_before)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("model", None)
        d["param_ratio"] = self.param_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        macs = ("" if self.macs_before is None else
                f", MACs {self.macs_before:,} -> {self.macs_after:,}")
        err = "" if self.output_error is None else f", output error {self.output_error:.4f}"
        return (f"LowRankReport(delta={self.delta}, basis={self.basis!r}, "
                f"{len(self.replaced)}/{len(self.layers)} layers factorized, params "
                f"{self.params_before:,} -> {self.params_after:,}{macs}{err}, "
                f"{self.seconds:.2f}s)")


# ---------------------------------------------------------------------------------------------
# statistics on calibration data
# ---------------------------------------------------------------------------------------------


def _out_features(module: nn.Module, y: Tensor) -> Tensor:
    """Rows = samples (positions count as samples), columns = output channels, bias removed."""
    if isinstance(module, _CONV_TYPES):
        if module.bias is not None:
            y = y - module.bias.view(1, -1, *([1] * (y.ndim - 2)))
        return y.movedim(1, -1).reshape(-1, y.shape[1])
    if module.bias is not None:
        y = y - module.bias
    return y.reshape(-1, y.shape[-1])


def _positions(module: nn.Module, y: Tensor) -> int:
    """Output positions per sample (pixels of a conv map, tokens of a Linear)."""
    if isinstance(module, _CONV_TYPES):
        return int(y[0, 0].numel()) if y.ndim > 2 else 1
    return int(y.numel() // (y.shape[0] * y.shape[-1])) if y.ndim > 1 else 1


@dataclass
class _OutStats:
    gram: Tensor
    total: Tensor
    count: int
    positions: int


@torch.no_grad()
def _collect_output_stats(model: nn.Module, targets: Mapping[str, nn.Module], batches: list[Any],
                          grams: bool) -> dict[str, _OutStats]:
    stats: dict[str, _OutStats] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not torch.is_tensor(output):
                return
            y = output.detach()
            entry = stats.get(name)
            if not grams:
                if entry is None:
                    stats[name] = _OutStats(torch.zeros(0), torch.zeros(0), 0,
                                            _positions(module, y))
                return
            f = _out_features(module, y).to(torch.float64)
            g, s = f.T @ f, f.sum(0)
            if entry is None:
                stats[name] = _OutStats(g, s, f.shape[0], _positions(module, y))
            else:
                entry.gram += g
                entry.total += s
                entry.count += f.shape[0]
        return hook

    for name, m in targets.items():
        handles.append(m.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


# ---------------------------------------------------------------------------------------------
# factorization
# ---------------------------------------------------------------------------------------------


def _kind(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "conv"


def _n_in(module: nn.Module) -> int:
    return int(module.weight[0].numel())


def _n_out(module: nn.Module) -> int:
    return int(module.weight.shape[0])


def _factor_params(module: nn.Module, q: int, bias: bool) -> int:
    return q * _n_in(module) + _n_out(module) * q + (_n_out(module) if bias else 0)


def _layer_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _build_pair(module: nn.Module, first: Tensor | nn.Module, second: Tensor,
                bias: Tensor | None) -> nn.Sequential:
    """``Sequential(first, second)``: first = the q-row projection (or a shared module)."""
    w = module.weight
    factory = dict(device=w.device, dtype=w.dtype)
    out, q = second.shape
    if isinstance(first, nn.Module):
        head = first
    elif isinstance(module, nn.Linear):
        head = nn.Linear(module.in_features, q, bias=False, **factory)
        head.weight.data.copy_(first.reshape(q, -1))
    else:
        conv = type(module)
        head = conv(module.in_channels, q, module.kernel_size, stride=module.stride,
                    padding=module.padding, dilation=module.dilation, groups=1, bias=False,
                    padding_mode=module.padding_mode, **factory)
        head.weight.data.copy_(first.reshape(q, *module.weight.shape[1:]))
    if isinstance(module, nn.Linear):
        tail = nn.Linear(q, out, bias=bias is not None, **factory)
        tail.weight.data.copy_(second)
    else:
        conv = type(module)
        tail = conv(q, out, 1, bias=bias is not None, **factory)
        tail.weight.data.copy_(second.reshape(out, q, *([1] * (w.ndim - 2))))
    if bias is not None:
        tail.bias.data.copy_(bias)
    pair = nn.Sequential(head, tail)
    pair.train(module.training)
    return pair


def _balanced(w_q: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """Split a rank-≤q matrix into B (out x q) · A (q x n) with equal singular values on both."""
    u, s, vh = torch.linalg.svd(w_q, full_matrices=False)
    root = s[:q].sqrt()
    return u[:, :q] * root, root[:, None] * vh[:q]


def _plan_layer(module: nn.Module, q: int | None, delta: float | None, stats: _OutStats | None,
                basis: str) -> dict[str, Any]:
    """Rank, factors and bias of one layer (float64 math)."""
    w = operator_matrix(module.weight).detach().to(torch.float64).cpu()
    out, n_in = w.shape
    full = min(out, n_in)
    b = None if module.bias is None else module.bias.detach().to(torch.float64).cpu()
    if basis == "activation":
        n = max(stats.count, 1)
        mean = stats.total.cpu() / n
        cov = stats.gram.cpu() - n * torch.outer(mean, mean)
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order].clamp(min=0.0), evecs[:, order]
        if not evals.sum() > 0:   # constant outputs: nothing to measure on, fall back
            basis = "weight"
    if basis == "weight":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        evals = s ** 2
    curve = kept_mass_divergence(evals[: max(1, len(evals))])
    if q is None:
        ok = torch.nonzero(curve <= delta + 1e-12)
        q = int(ok[0]) + 1 if len(ok) else len(curve)
    q = max(1, min(int(q), full))
    achieved = float(curve[q - 1])
    if basis == "weight":
        root = s[:q].sqrt()
        second, first = u[:, :q] * root, root[:, None] * vh[:q]
        new_bias = b
    else:
        p = evecs[:, :q]
        second, first = _balanced(p @ (p.T @ w), q)
        # y = W x + b ≈ P W (x − μ) + W μ + b: the lost mean (I − P) m goes into the bias
        m = mean
        shift = m - p @ (p.T @ m)
        new_bias = shift if b is None else b + shift
    return dict(q=q, full=full, delta=achieved, first=first, second=second, bias=new_bias,
                basis=basis, predicted=math.sqrt(max(0.0, -math.expm1(-achieved))))


def _resolve_rank(spec: Any, module: nn.Module, name: str) -> int:
    full = min(_n_out(module), _n_in(module))
    if isinstance(spec, bool) or not isinstance(spec, numbers.Real):
        raise TypeError(f"ranks[{name!r}] must be an int rank >= 1 or a float fraction in (0, 1],"
                        f" got {spec!r}")
    if isinstance(spec, numbers.Integral):
        if spec < 1:
            raise ValueError(f"ranks[{name!r}] must be an int rank >= 1, got {spec!r}")
        return min(int(spec), full)
    value = float(spec)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"ranks[{name!r}] must be a float fraction in (0, 1] of the full rank "
                         f"{full}, got {spec!r}")
    return max(1, min(full, int(round(value * full))))


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _targets(model: nn.Module, ignored: set[int], skipped: dict[str, str]) -> dict[str, nn.Module]:
    """Layers that can be factorized: exactly Linear / Conv1-3d, ungrouped, not inside torch's
    attention / transformer layers."""
    found: dict[str, nn.Module] = {}
    inside_mha: set[int] = set()
    for m in model.modules():
        # these read their Linear children's .weight directly (fused / fast paths)
        if isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                          nn.TransformerDecoderLayer)):
            inside_mha.update(id(c) for c in m.modules() if c is not m)
    for name, m in model.named_modules():
        if not isinstance(m, _TYPES):
            continue
        label = name or type(m).__name__
        if id(m) in ignored:
            skipped[label] = "ignored_layers"
        elif type(m) not in _TYPES:
            skipped[label] = f"subclass {type(m).__name__} (its forward may differ)"
        elif id(m) in inside_mha:
            skipped[label] = ("inside nn.MultiheadAttention / nn.Transformer*Layer (their "
                              "fast paths read .weight directly)")
        elif isinstance(m, _CONV_TYPES) and m.groups != 1:
            skipped[label] = f"grouped convolution (groups={m.groups})"
        else:
            found[name] = m
    return found


def _shared_clusters(model: nn.Module, targets: dict[str, nn.Module],
                     share: bool | int) -> list[list[str]]:
    """QM-FRG (layer level, §3.1) clusters of the targets, split into groups of equal config."""
    from .graph import redundancy_graph

    names = set(targets)
    graph = redundancy_graph(model, level="layer", module_filter=lambda n, m: n in names)
    if len(graph) < 2:
        return []
    k = None if isinstance(share, bool) else min(int(share), len(graph))
    clusters = graph.cluster(n_clusters=k)
    out = []
    for cluster in clusters:
        by_config: dict[tuple, list[str]] = {}
        for i in cluster:
            name = graph.names[i]
            if name not in targets:
                continue
            m = targets[name]
            key = (type(m), tuple(m.weight.shape), getattr(m, "stride", None),
                   getattr(m, "padding", None), getattr(m, "dilation", None),
                   getattr(m, "padding_mode", None), m.weight.dtype, m.weight.device)
            by_config.setdefault(key, []).append(name)
        out.extend(group for group in by_config.values() if len(group) > 1)
    return out


def _plan_shared(modules: list[nn.Module], q: int | None, delta: float | None) -> dict[str, Any]:
    """One input basis V_q for a cluster: ρ = mean_i WᵢᵀWᵢ/‖Wᵢ‖² ≈ V Σ_q Vᵀ (Eq. (5))."""
    mats = [operator_matrix(m.weight).detach().to(torch.float64).cpu() for m in modules]
    stacked = torch.cat([w / w.norm().clamp_min(1e-300) for w in mats], 0)
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    curve = kept_mass_divergence(s ** 2)
    if q is None:
        ok = torch.nonzero(curve <= delta + 1e-12)
        q = int(ok[0]) + 1 if len(ok) else len(curve)
    q = max(1, min(int(q), len(curve)))
    v = vh[:q].T                                                   # (n_in, q)
    seconds = [w @ v for w in mats]
    predicted = [float((w - w @ v @ v.T).norm() / w.norm().clamp_min(1e-300)) for w in mats]
    return dict(q=q, delta=float(curve[q - 1]), first=v.T, seconds=seconds,
                predicted=predicted)


# ---------------------------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def factorize_layer(module: nn.Module, rank: int | float | None = None, *,
                    delta: float | None = None) -> nn.Sequential:
    """The rank-q factor pair of one Linear/ConvNd from its truncated SVD (§3.2, Eq. (5)).

    W ≈ U_q Σ_q V_qᵀ split as ``Sequential(first, second)`` with first = Σ_q^{1/2} V_qᵀ (a
    Linear / ConvNd with the layer's kernel, stride, padding, dilation, no bias) and
    second = U_q Σ_q^{1/2} (a Linear / 1×1 ConvNd with the layer's bias). Unlike
    :func:`lowrank_compress` it is returned even when it does not save parameters, so at full
    rank it reproduces the layer exactly (up to float rounding).

    Args:
        module: an ungrouped ``nn.Linear`` / ``nn.Conv1d/2d/3d``.
        rank: int rank or float fraction of the full rank min(out, in·∏k).
        delta: relative-entropy budget instead of ``rank`` (:func:`select_rank`).

    Example:
        >>> lin = nn.Linear(6, 4)
        >>> pair = factorize_layer(lin, rank=4)
        >>> x = torch.randn(3, 6)
        >>> torch.allclose(pair(x), lin(x), atol=1e-5), pair[0].out_features
        (True, 4)
    """
    if type(module) not in _TYPES or (isinstance(module, _CONV_TYPES) and module.groups != 1):
        raise TypeError(f"module must be an ungrouped nn.Linear or nn.Conv1d/2d/3d, got "
                        f"{module!r}")
    if (rank is None) == (delta is None):
        raise ValueError(f"pass exactly one of rank and delta, got rank={rank!r}, "
                         f"delta={delta!r}")
    q = None if rank is None else _resolve_rank(rank, module, "rank")
    d = None if delta is None else _check_delta(delta)
    plan = _plan_layer(module, q, d, None, "weight")
    return _build_pair(module, plan["first"], plan["second"], plan["bias"])


def _check_args(delta: Any, ranks: Any, basis: str | None, calibration: Any,
                min_params_saving: Any, share_clusters: Any) -> float | None:
    if delta is None and ranks is None:
        raise ValueError("pass delta (relative-entropy budget, nats) or ranks")
    delta = None if delta is None else _check_delta(delta)
    if basis not in (None, "weight", "activation"):
        raise ValueError(f"basis must be None, 'weight' or 'activation', got {basis!r}")
    if basis == "activation" and calibration is None:
        raise ValueError("basis='activation' needs calibration data: pass calibration=<tensor "
                         "or iterable of batches>")
    if (isinstance(min_params_saving, bool) or not isinstance(min_params_saving, numbers.Real)
            or not 0.0 <= float(min_params_saving) < 1.0):
        raise ValueError(f"min_params_saving must be a float in [0, 1), got {min_params_saving!r}")
    if not (isinstance(share_clusters, bool)
            or (isinstance(share_clusters, numbers.Integral) and share_clusters >= 2)):
        raise ValueError(f"share_clusters must be a bool or an int number of clusters >= 2, "
                         f"got {share_clusters!r}")
    return delta


def _count_macs(model: nn.Module, example: Any) -> int | None:
    if example is None:
        return None
    from .structural import count_params_and_macs

    was_training = model.training
    model.eval()
    try:
        return count_params_and_macs(model, example)[1]
    finally:
        model.train(was_training)


@torch.no_grad()
def lowrank_compress(
    model_or_module: nn.Module,
    delta: float | None = 0.01,
    *,
    ranks: int | float | Mapping[str | nn.Module, int | float] | None = None,
    calibration: Any = None,
    basis: str | None = None,
    share_clusters: bool | int = False,
    min_params_saving: float = 0.0,
    ignored_layers: Iterable[nn.Module | str] | None = None,
    example_inputs: Any = None,
    max_calibration_batches: int | None = None,
    recalibrate_bn: bool = False,
    measure_error: bool = True,
) -> LowRankReport:
    """Replace Linear/Conv layers by rank-q factor pairs, q from S(ρ_q ‖ ρ) ≤ δ (§3.2, Eq. (5)).

    Each ``Linear(in, out)`` becomes ``Sequential(Linear(in, q, bias=False), Linear(q, out))``
    and each ``ConvNd(in, out, k, stride, padding, dilation)`` becomes
    ``Sequential(ConvNd(in, q, k, stride, padding, dilation, bias=False), ConvNd(q, out, 1))``,
    from a truncated eigenbasis of the layer's density matrix ρ; only where that saves
    parameters (``q·(n_in + out) (+ out) < out·n_in (+ out)``, n_in = in·∏k, and the saving is
    at least ``min_params_saving``). The plain ``nn.Sequential`` pairs run, train, save and load
    like any module (``torch.save(model)`` / ``torch.load(..., weights_only=False)``).

    Two bases (the rank rule is :func:`select_rank`'s, δ in nats):

    - ``"weight"`` (default without calibration): the truncated SVD W ≈ U_q Σ_q V_qᵀ, split
      as (U_q Σ_q^{1/2})·(Σ_q^{1/2} V_qᵀ); relative weight error sqrt(1 − e^{−δ_q}).
    - ``"activation"`` (default with ``calibration``): the top-q eigenvectors P of the
      layer's centered output Gram C = Σ (Wx − m)(Wx − m)ᵀ on the calibration data (m: mean
      output); the layer becomes P Pᵀ W with the lost mean (I − P Pᵀ) m folded into the bias.
      P Pᵀ W x is the best rank-q approximation of the layer's outputs on that data
      (Eckart–Young applied to W X), so the error is measured where the network lives: the
      lost fraction of centered output energy is exactly 1 − e^{−δ_q}.

    With ``share_clusters`` the layers are clustered on the QM-FRG (layer level, Fubini–Study
    distances, spectral clustering; ``True``: eigengap k, an int: k clusters) and layers of one
    cluster with equal configuration share one input basis: ρ_cluster = mean_i WᵢᵀWᵢ/‖Wᵢ‖²
    ≈ V Σ_q Vᵀ, the first factor is one module object reused by every member (its parameters
    count once), the second is Wᵢ V_q per layer. Shared bases are weight-based.

    Args:
        model_or_module: a model (changed in place) or a bare Linear/ConvNd (the compressed
            ``Sequential`` is ``report.model``).
        delta: relative-entropy budget δ ≥ 0 (nats); 0.01 keeps 99 % of the mass.
        ranks: explicit ranks instead of δ: an int (same rank everywhere), a float in (0, 1]
            (fraction of each layer's full rank min(out, n_in)), or ``{layer or name: int or
            float}`` (unlisted layers use δ).
        calibration: tensor or iterable of batches (``(x, y)`` pairs allowed) for the output
            Grams, the measured errors and (``recalibrate_bn``) BatchNorm statistics.
        basis: ``"weight"`` or ``"activation"`` (default: activation iff calibration given).
        share_clusters: share one basis per QM-FRG cluster of equal-shape layers.
        min_params_saving: only factorize a layer saving at least this fraction of its params.
        ignored_layers: modules or names never factorized.
        example_inputs: one input for counting MACs (default: the first calibration sample).
        max_calibration_batches: cap on the calibration batches used.
        recalibrate_bn: re-estimate BatchNorm running statistics on the calibration data after.
        measure_error: measure per-layer and end-to-end errors on the calibration data (two
            extra forward passes; ``False`` leaves them ``None``).

    Returns:
        :class:`LowRankReport`: per layer q, δ achieved, predicted and measured errors,
        params/MACs before and after; model totals; end-to-end relative output error on the
        calibration data.

    Raises:
        ValueError / TypeError: bad arguments (named in the message). On any error the model
            is restored exactly (atomic).

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> report = lowrank_compress(net, ranks=8)
        >>> [layer.rank for layer in report.layers.values()], net(torch.randn(2, 64)).shape
        ([8, 8], torch.Size([2, 10]))
    """
    start = time.perf_counter()
    if not isinstance(model_or_module, nn.Module):
        raise TypeError(f"model_or_module must be a torch.nn.Module, got "
                        f"{type(model_or_module).__name__}")
    delta = _check_args(delta, ranks, basis, calibration, min_params_saving, share_clusters)
    if basis is None:
        basis = "activation" if calibration is not None else "weight"
    model = model_or_module
    bare = isinstance(model, _TYPES) and not list(model.children())
    if bare:
        model = nn.Sequential(model_or_module)
    names_of = {id(m): n for n, m in model.named_modules()}
    ignored: set[int] = set()
    for item in ignored_layers or []:
        if isinstance(item, str):
            try:
                ignored.add(id(model.get_submodule(item)))
            except AttributeError as exc:
                raise ValueError(f"ignored_layers names {item!r}, which is not a submodule") \
                    from exc
        elif isinstance(item, nn.Module):
            if id(item) not in names_of:
                raise ValueError(f"ignored layer {type(item).__name__} is not a submodule")
            ignored.add(id(item))
        else:
            raise TypeError(f"ignored_layers entries must be modules or names, got {item!r}")

    batches = list(iter_calibration(calibration, max_calibration_batches))
    if calibration is not None and not batches:
        raise ValueError("calibration yielded no batches; pass a tensor or an iterable of batches")
    if example_inputs is None and batches and torch.is_tensor(batches[0]):
        example_inputs = batches[0][:1]

    report = LowRankReport(delta=delta, basis=basis)
    with atomic(model_or_module):
        skipped: dict[str, str] = {}
        targets = _targets(model, ignored, skipped)
        if not targets:
            raise ValueError(f"no Linear/ConvNd layer to factorize in "
                             f"{type(model_or_module).__name__} (skipped: {skipped})")
        per_layer_rank: dict[str, int | None] = {}
        for name, m in targets.items():
            spec = None
            if isinstance(ranks, Mapping):
                spec = ranks.get(name, ranks.get(m)) if not bare else ranks.get(m, ranks.get(""))
            elif ranks is not None:
                spec = ranks
            if spec is None and delta is None:
                raise ValueError(f"layer {name!r} has no entry in ranks and delta is None")
            per_layer_rank[name] = None if spec is None else _resolve_rank(spec, m, name)
        if isinstance(ranks, Mapping):
            known = set(targets) | {id(m) for m in targets.values()}
            for key in ranks:
                if (key if isinstance(key, str) else id(key)) not in known:
                    raise ValueError(f"ranks names {key if isinstance(key, str) else type(key)}"
                                     f", which is not a factorizable layer; expected some of "
                                     f"{sorted(targets)}")

        model_params_before = sum(p.numel() for p in model.parameters())
        macs_before = _count_macs(model, example_inputs)
        stats: dict[str, _OutStats] = {}
        if batches:
            stats = _collect_output_stats(model, targets, batches, grams=basis == "activation")
        elif example_inputs is not None:
            stats = _collect_output_stats(model, targets, [example_inputs], grams=False)

        replacements: dict[str, nn.Module] = {}
        shared_done: set[str] = set()
        if share_clusters:
            for group in _shared_clusters(model, targets, share_clusters):
                mods = [targets[n] for n in group]
                qs = [per_layer_rank[n] for n in group if per_layer_rank[n] is not None]
                plan = _plan_shared(mods, min(qs) if qs else None, delta)
                q = plan["q"]
                before = sum(_layer_params(m) for m in mods)
                after = q * _n_in(mods[0]) + sum(_n_out(m) * q + (0 if m.bias is None else
                                                                   _n_out(m)) for m in mods)
                saves = after < before * (1.0 - float(min_params_saving)) and after < before
                first = _build_pair(mods[0], plan["first"], plan["first"].new_zeros(1, q),
                                    None)[0]
                for name, m, second, pred in zip(group, mods, plan["seconds"],
                                                 plan["predicted"]):
                    entry = _layer_entry(name, m, q, plan["delta"], pred, "shared-weight",
                                         stats.get(name))
                    entry.shared_with = [n for n in group if n != name]
                    if saves:
                        own = _n_out(m) * q + (0 if m.bias is None else _n_out(m))
                        # the shared first factor is counted once, at the cluster's first member
                        entry.params_after = own + (q * _n_in(m) if name == group[0] else 0)
                        entry.macs_after = _pair_macs(m, q, stats.get(name))
                        b = None if m.bias is None else m.bias.detach().to(torch.float64)
                        replacements[name] = _build_pair(m, first, second, b)
                        entry.replaced = True
                        entry.reason = f"shares its basis with {entry.shared_with}"
                    else:
                        entry.reason = "shared factorization would not save parameters"
                    report.layers[name or type(m).__name__] = entry
                    shared_done.add(name)

        for name, m in targets.items():
            if name in shared_done:
                continue
            plan = _plan_layer(m, per_layer_rank[name], delta, stats.get(name), basis)
            q = plan["q"]
            entry = _layer_entry(name, m, q, plan["delta"], plan["predicted"], plan["basis"],
                                 stats.get(name))
            before = _layer_params(m)
            after = _factor_params(m, q, plan["bias"] is not None)
            entry.params_before = before
            saving = 1.0 - after / before
            if after < before and saving >= float(min_params_saving):
                replacements[name] = _build_pair(m, plan["first"], plan["second"], plan["bias"])
                entry.params_after = after
                entry.macs_after = _pair_macs(m, q, stats.get(name))
                entry.replaced = True
            else:
                entry.params_after = before
                entry.reason = (f"rank {q} of {plan['full']} saves no parameters "
                                f"({after:,} >= {before:,})" if after >= before else
                                f"saving {saving:.3f} < min_params_saving {min_params_saving}")
            report.layers[name or type(m).__name__] = entry
        reference: list[Any] = []
        if batches and measure_error:
            reference = _measure_errors(model, targets, replacements, batches, report)
        for name, new in replacements.items():
            parent, attr = _parent_and_attr(model, name)
            setattr(parent, attr, new)
        if bare:
            model = model[0]
        if batches and reference:
            report.output_error = _model_error(model, batches, reference)
        if recalibrate_bn and batches:
            report.bn_recalibrated = recalibrate_batchnorm(model, batches)
        report.params_before = model_params_before
        report.params_after = sum(p.numel() for p in model.parameters())
        report.macs_before = macs_before
        report.macs_after = _count_macs(model, example_inputs)
        for label, reason in skipped.items():
            report.layers.setdefault(label, LayerLowRank(
                name=label, kind="-", rank=0, full_rank=0, delta=0.0, predicted_error=0.0,
                basis="-", params_before=0, params_after=0, reason=reason))
    report.model = model
    report.seconds = time.perf_counter() - start
    return report


def _pair_macs(m: nn.Module, q: int, stats: _OutStats | None) -> int | None:
    return None if stats is None else stats.positions * q * (_n_in(m) + _n_out(m))


def _layer_entry(name: str, m: nn.Module, q: int, achieved: float, predicted: float,
                 basis: str, stats: _OutStats | None) -> LayerLowRank:
    macs = None if stats is None else stats.positions * _n_out(m) * _n_in(m)
    return LayerLowRank(name=name or type(m).__name__, kind=_kind(m), rank=q,
                        full_rank=min(_n_out(m), _n_in(m)), delta=achieved,
                        predicted_error=predicted, basis=basis, params_before=_layer_params(m),
                        params_after=_layer_params(m), macs_before=macs, macs_after=macs)


@torch.no_grad()
def _measure_errors(model: nn.Module, targets: dict[str, nn.Module],
                    replacements: dict[str, nn.Module], batches: list[Any],
                    report: LowRankReport) -> list[Any]:
    """One pass: each replaced layer's ‖y − y_q‖/‖y‖ on its real inputs; the model's outputs."""
    sums = {name: [0.0, 0.0] for name in replacements}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not args or not torch.is_tensor(output):
                return
            approx = replacements[name](*args)
            sums[name][0] += float((output.double() - approx.double()).pow(2).sum())
            sums[name][1] += float(output.double().pow(2).sum())
        return hook

    for name in replacements:
        handles.append(targets[name].register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    outputs: list[Any] = []
    try:
        for batch in batches:
            out = _forward(model, batch)
            outputs.append(out.detach().clone() if torch.is_tensor(out) else None)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, (err, ref) in sums.items():
        label = name or type(targets[name]).__name__
        report.layers[label].output_error = math.sqrt(err / ref) if ref > 0 else 0.0
    return outputs if all(o is not None for o in outputs) else []


@torch.no_grad()
def _model_error(model: nn.Module, batches: list[Any], reference: Sequence[Tensor]) -> float:
    was_training = model.training
    model.eval()
    err = ref = 0.0
    try:
        for batch, target in zip(batches, reference):
            out = _forward(model, batch)
            err += float((out.double() - target.double()).pow(2).sum())
            ref += float(target.double().pow(2).sum())
    finally:
        model.train(was_training)
    return math.sqrt(err / ref) if ref > 0 else 0.0
