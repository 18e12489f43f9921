"""Density matrices of operators and the quantum relative entropy used to pick the rank of the
kernel approximation (paper §3.2): the smallest q with S(ρ_q ‖ ρ) ≤ δ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torch_qmprune._validation import check_finite
from torch_qmprune.spectral.states import (
    _augment,
    _bias_vector,
    _check_tensor,
    _weight_and_bias,
    operator_matrix,
)

__all__ = [
    "density_matrix",
    "quantum_relative_entropy",
    "relative_entropy_rank",
    "truncate_density",
]

_TRACE_ATOL = 1e-5  # |tr ρ − 1| allowed for inputs of the entropy functions


def density_matrix(
    x: Tensor | nn.Module,
    *,
    kind: str = "operator",
    augment: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Density matrix ρ of an operator or a Gram matrix (paper §3.2), trace one, PSD.

    ``kind="operator"``: ρ = Ŵ Ŵᵀ / tr(Ŵ Ŵᵀ) with Ŵ = [[W, b], [0, 1]] (§2.1) for a weight
    tensor, ``(weight, bias)`` pair or module; ``augment=False`` uses the matrix W as given
    (any ``(m, n)`` matrix). Its eigenvalues are ψ², the squared spectral state.
    ``kind="gram"``: ``x`` is a symmetric PSD Gram matrix G (e.g. a kernel matrix of a
    cluster), ρ = G / tr G (symmetrized).

    Args:
        x: see above.
        kind: ``"operator"`` or ``"gram"``.
        augment: bias augmentation for ``kind="operator"``.
        dtype: float64 (default) or float32.

    Raises:
        ValueError: zero (or non-positive) trace, non-square Gram, non-finite entries.

    Example:
        >>> density_matrix(torch.diag(torch.tensor([2.0, 0.0])), augment=False)
        tensor([[1., 0.],
                [0., 0.]], dtype=torch.float64)
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if kind == "operator":
        weight, bias = _weight_and_bias(x, "x")
        check_finite(weight, "weight")
        w = operator_matrix(weight).detach().to(dtype)
        if augment:
            if bias is not None:
                check_finite(bias, "bias")
                bias = _bias_vector(bias, w.shape[0]).detach().to(dtype)
            w = _augment(w, bias)
        scale = w.abs().amax()
        if scale == 0:
            raise ValueError(
                f"density_matrix: all-zero operator (shape {tuple(w.shape)}) has zero trace; "
                "use augment=True"
            )
        w = w / scale
        rho = w @ w.T
    elif kind == "gram":
        _check_tensor(x, "gram")
        if x.ndim != 2 or x.shape[0] != x.shape[1] or x.shape[0] == 0:
            raise ValueError(f"gram must be a non-empty square matrix, got {tuple(x.shape)}")
        check_finite(x, "gram")
        g = x.detach().to(dtype)
        rho = (g + g.T) / 2
    else:
        raise ValueError(f"kind must be 'operator' or 'gram', got {kind!r}")
    trace = torch.trace(rho)
    if not trace > 0:
        raise ValueError(f"density_matrix: trace is {float(trace):.3g}; expected a positive trace")
    return rho / trace


def _spectral_decomposition(rho: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped >= 0, ascending) and eigenvectors of a float64 density matrix."""
    _check_tensor(rho, name)
    if rho.ndim != 2 or rho.shape[0] != rho.shape[1] or rho.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got {tuple(rho.shape)}")
    check_finite(rho, name)
    r = rho.detach().to(torch.float64)
    trace = float(torch.trace(r))
    if abs(trace - 1.0) > _TRACE_ATOL:
        raise ValueError(
            f"{name} has trace {trace:.6g}; expected a density matrix of trace 1 "
            "(use density_matrix)"
        )
    evals, evecs = torch.linalg.eigh((r + r.T) / 2)
    return evals.clamp(min=0.0), evecs


def quantum_relative_entropy(rho: Tensor, sigma: Tensor, *, eps: float = 1e-12) -> Tensor:
    """Quantum relative entropy S(ρ ‖ σ) = tr ρ (log ρ − log σ) in nats (paper §3.2).

    Computed from ``eigh`` of both matrices: with ρ = Σ pᵢ uᵢuᵢᵀ and σ = Σ qⱼ vⱼvⱼᵀ,
    S = Σᵢ pᵢ log pᵢ − Σⱼ ⟨vⱼ, ρ vⱼ⟩ log qⱼ, where 0·log 0 = 0 and eigenvalues ≤ ``eps`` count
    as zero. If ρ has weight ``⟨vⱼ, ρ vⱼ⟩ > eps`` on a null direction vⱼ of σ (supp ρ ⊄ supp σ),
    S = +∞ and a tensor holding ``inf`` is returned; the result is never NaN.

    Args:
        rho, sigma: symmetric PSD matrices of trace 1 (within 1e-5) and equal shape.
        eps: eigenvalue / leakage threshold.

    Returns:
        0-D float64 tensor >= 0 (clamped; may be ``inf``), on ``rho``'s device.

    Example:
        >>> rho = torch.diag(torch.tensor([0.5, 0.5], dtype=torch.float64))
        >>> quantum_relative_entropy(rho, rho)
        tensor(0., dtype=torch.float64)
        >>> quantum_relative_entropy(rho, torch.diag(torch.tensor([1.0, 0.0])))
        tensor(inf, dtype=torch.float64)
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    p, _ = _spectral_decomposition(rho, "rho")
    q, v = _spectral_decomposition(sigma, "sigma")
    if rho.shape != sigma.shape:
        raise ValueError(f"rho {tuple(rho.shape)} and sigma {tuple(sigma.shape)} differ in shape")
    r = rho.detach().to(torch.float64).to(v.device)
    r = (r + r.T) / 2
    weights = torch.einsum("ij,ik,kj->j", v, r, v)  # ⟨v_j, ρ v_j⟩
    null = q <= eps
    if bool((weights[null] > eps).any()):
        return torch.tensor(math.inf, dtype=torch.float64, device=v.device)
    p_pos = p[p > eps]
    entropy_term = (p_pos * torch.log(p_pos)).sum()
    cross_term = (weights[~null] * torch.log(q[~null])).sum()
    return (entropy_term - cross_term).clamp(min=0.0)


def truncate_density(rho: Tensor, q: int) -> Tensor:
    """Rank-q truncation ρ_q = V_q Λ_q V_qᵀ / tr Λ_q on the top-q eigenpairs of ρ (paper §3.2).

    Example:
        >>> truncate_density(torch.diag(torch.tensor([0.75, 0.25], dtype=torch.float64)), 1)
        tensor([[1., 0.],
                [0., 0.]], dtype=torch.float64)
    """
    n = rho.shape[0] if isinstance(rho, Tensor) and rho.ndim == 2 else None
    evals, evecs = _spectral_decomposition(rho, "rho")
    n = evals.shape[0] if n is None else n
    if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= n:
        raise ValueError(f"q must be an int in [1, {n}], got {q!r}")
    top_vals = evals[-q:]
    top_vecs = evecs[:, -q:]
    kept = top_vals.sum()
    if not kept > 0:
        raise ValueError("rho has no positive eigenvalue; expected a density matrix")
    return (top_vecs * (top_vals / kept)) @ top_vecs.T


def relative_entropy_rank(rho: Tensor, delta: float) -> int:
    """Smallest q with S(ρ_q ‖ ρ) ≤ δ, the rank rule of §3.2.

    Closed form: with ρ = Σᵢ λᵢ uᵢuᵢᵀ (λ descending, Σλ = 1) and Λ_q = Σ_{i≤q} λᵢ,
    ρ_q = Σ_{i≤q} (λᵢ/Λ_q) uᵢuᵢᵀ shares ρ's eigenbasis, so

        S(ρ_q ‖ ρ) = Σ_{i≤q} (λᵢ/Λ_q)(log(λᵢ/Λ_q) − log λᵢ) = −log Λ_q · Σ_{i≤q} λᵢ/Λ_q = −log Λ_q,

    and the rule is: smallest q with Λ_q ≥ e^{−δ}. (The other direction S(ρ ‖ ρ_q) is +∞
    whenever q < rank ρ, which is why the truncation goes first.)

    Example:
        >>> rho = torch.diag(torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
        >>> relative_entropy_rank(rho, 0.2), relative_entropy_rank(rho, 0.0)
        (2, 3)
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise TypeError(f"delta must be a real number, got {type(delta).__name__}")
    if not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}")
    evals, _ = _spectral_decomposition(rho, "rho")
    lam = torch.flip(evals, dims=[0])
    captured = torch.cumsum(lam, dim=0) / lam.sum()
    captured[-1] = 1.0
    divergence = -torch.log(captured)  # S(ρ_q ‖ ρ) for q = 1..n
    ok = torch.nonzero(divergence <= delta + 1e-12)
    return int(ok[0]) + 1
