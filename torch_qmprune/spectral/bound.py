"""Theorem 2.1 of the paper (Eq. (2)), implemented as stated although it is false in general,
next to the Lipschitz bound that does hold and an empirical checker that tells them apart.

Counterexample (SCIENCE.md §2): A = diag(1, 0), B = diag(0, 1), zero bias. Both augmented
matrices have spectrum (1, 1, 0) and equal Frobenius norm, so W₂(F_A, F_B) = 0, the indicator is
0 and Eq. (2) bounds ‖ReLU(Ax) − ReLU(Bx)‖ by 0, yet x = e₁ gives 1. Spectra only determine an
operator up to orthogonal changes of basis (U W Vᵀ); the bound that holds compares the weights
themselves: ‖σ(W₁x + b₁) − σ(W₂x + b₂)‖ ≤ L(‖W₁ − W₂‖_op·R + ‖b₁ − b₂‖) for ‖x‖ ≤ R.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torch_qmprune._validation import check_finite
from torch_qmprune.spectral.states import (
    _augment,
    _bias_vector,
    _compute_dtype,
    _weight_and_bias,
    operator_matrix,
)
from torch_qmprune.spectral.wasserstein import wasserstein2

__all__ = ["Theorem21Report", "check_theorem21", "lipschitz_bound", "theorem21_bound"]

_NORM_RTOL = 1e-6  # ‖Ŵ₁‖_F and ‖Ŵ₂‖_F closer than this (relative) count as equal in Eq. (2)

LinearLike = nn.Module | tuple[Tensor, Tensor | None]


def _nonnegative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _affine(x: object, name: str, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(W, b)`` of a linear layer or ``(weight, bias)`` pair as an ``(m, n)`` matrix and an
    ``(m,)`` bias (zeros if absent), finite, in the compute dtype."""
    weight, bias = _weight_and_bias(x, name)
    check_finite(weight, f"{name} weight")
    w = operator_matrix(weight)
    if bias is None:
        b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    else:
        check_finite(bias, f"{name} bias")
        b = _bias_vector(bias, w.shape[0], f"{name} bias")
    cdtype = _compute_dtype(w, b, dtype=dtype)
    return w.detach().to(cdtype), b.detach().to(cdtype)


def _output_sup(w: Tensor, b: Tensor, lipschitz: float, radius: float) -> Tensor:
    """L(‖W‖_op·R + ‖b‖) ≥ sup_{‖x‖≤R} ‖σ(Wx + b)‖ for an L-Lipschitz σ with σ(0) = 0."""
    return lipschitz * (torch.linalg.matrix_norm(w, ord=2) * radius + torch.linalg.norm(b))


def theorem21_bound(
    a: LinearLike,
    b: LinearLike,
    *,
    lipschitz: float = 1.0,
    radius: float = 1.0,
    output_bound: float | None = None,
) -> Tensor:
    """Right-hand side of Eq. (2) (Theorem 2.1), exactly as the paper states it:

        L(R + 1)(‖Ŵ₁‖_F + ‖Ŵ₂‖_F)·W₂(F₁, F₂) + 2M·1{‖Ŵ₁‖_F ≠ ‖Ŵ₂‖_F}

    with W₂ the ``kind="profile"`` distance of :func:`wasserstein2` on the augmented spectra.
    **This is not a valid bound in general** (module docstring: diag(1, 0) vs diag(0, 1) gives 0
    while the outputs differ by 1); use :func:`lipschitz_bound` for a guarantee.

    Args:
        a, b: ``nn.Linear``-like modules or ``(weight, bias)`` pairs (bias may be ``None``).
        lipschitz: L, the activation's Lipschitz constant.
        radius: R, the radius of the input ball.
        output_bound: M; default ``max_i L(‖W_i‖_op·R + ‖b_i‖)``, the sup of ‖σ(W_i x + b_i)‖
            over the ball for any L-Lipschitz σ with σ(0) = 0.

    Returns:
        0-D tensor (float32, or float64 for float64 weights). Norms count as equal within a
        relative tolerance of 1e-6.

    Example:
        >>> A, B = torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
        >>> theorem21_bound((A, None), (B, None))
        tensor(0.)
    """
    lipschitz = _nonnegative(lipschitz, "lipschitz")
    radius = _nonnegative(radius, "radius")
    wa, ba = _affine(a, "a")
    wb, bb = _affine(b, "b")
    dtype = _compute_dtype(wa, wb)
    wa, ba, wb, bb = (t.to(dtype) for t in (wa, ba, wb, bb))
    if wa.device != wb.device:
        raise ValueError(f"a is on {wa.device} but b is on {wb.device}; expected one device")
    norm_a = torch.linalg.matrix_norm(_augment(wa, ba))
    norm_b = torch.linalg.matrix_norm(_augment(wb, bb))
    if output_bound is None:
        m_sup = torch.maximum(
            _output_sup(wa, ba, lipschitz, radius), _output_sup(wb, bb, lipschitz, radius)
        )
    else:
        m_sup = torch.tensor(_nonnegative(output_bound, "output_bound"), dtype=dtype)
    w2 = wasserstein2((wa, ba), (wb, bb), kind="profile", augment=True)
    differ = torch.abs(norm_a - norm_b) > _NORM_RTOL * torch.maximum(norm_a, norm_b)
    spectral_term = lipschitz * (radius + 1) * (norm_a + norm_b) * w2.to(dtype)
    return spectral_term + 2 * m_sup.to(spectral_term.device) * differ.to(dtype)


def lipschitz_bound(
    a: LinearLike, b: LinearLike, *, lipschitz: float = 1.0, radius: float = 1.0
) -> Tensor:
    """A bound that holds: sup_{‖x‖≤R} ‖σ(W₁x + b₁) − σ(W₂x + b₂)‖ ≤ L(‖W₁ − W₂‖_op·R + ‖b₁ − b₂‖)
    for any L-Lipschitz σ (SCIENCE.md §2; the correct counterpart of Eq. (2)).

    Args:
        a, b: modules or ``(weight, bias)`` pairs of the same shape.
        lipschitz: L. radius: R.

    Returns:
        0-D tensor (float32, or float64 for float64 weights).

    Example:
        >>> lipschitz_bound((torch.eye(2), None), (torch.zeros(2, 2), torch.ones(2)))
        tensor(2.4142)
    """
    lipschitz = _nonnegative(lipschitz, "lipschitz")
    radius = _nonnegative(radius, "radius")
    wa, ba = _affine(a, "a")
    wb, bb = _affine(b, "b")
    if wa.shape != wb.shape:
        raise ValueError(
            f"a has weight matrix {tuple(wa.shape)} but b has {tuple(wb.shape)}; the Lipschitz "
            "bound compares operators of the same shape"
        )
    dtype = _compute_dtype(wa, wb)
    diff_w = wa.to(dtype) - wb.to(dtype)
    diff_b = ba.to(dtype) - bb.to(dtype)
    op_norm = torch.linalg.matrix_norm(diff_w, ord=2)
    return lipschitz * (op_norm * radius + torch.linalg.norm(diff_b))


@dataclass(frozen=True)
class Theorem21Report:
    """Outcome of :func:`check_theorem21`.

    Attributes:
        bound: Eq. (2) right-hand side (:func:`theorem21_bound`).
        lipschitz_bound: :func:`lipschitz_bound`.
        observed_max: max over the samples of ‖σ(W₁x + b₁) − σ(W₂x + b₂)‖.
        holds: ``observed_max <= bound`` (up to 1e-9 relative slack).
        lipschitz_holds: ``observed_max <= lipschitz_bound`` (same slack).
        n_samples: number of sampled inputs.
    """

    bound: float
    lipschitz_bound: float
    observed_max: float
    holds: bool
    lipschitz_holds: bool
    n_samples: int


def _ball_samples(n_samples: int, dim: int, radius: float, seed: int) -> Tensor:
    """``n_samples`` float64 points: the first half uniform in the R-ball, the rest on its
    sphere."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64)
    norms = torch.linalg.vector_norm(directions, dim=1, keepdim=True)
    directions = directions / torch.where(norms > 0, norms, torch.ones_like(norms))
    radii = torch.full((n_samples, 1), radius, dtype=torch.float64)
    n_ball = n_samples // 2
    u = torch.rand(n_ball, 1, generator=gen, dtype=torch.float64)
    radii[:n_ball] = radius * u ** (1.0 / dim)
    return directions * radii


def check_theorem21(
    a: LinearLike,
    b: LinearLike,
    *,
    activation: Callable[[Tensor], Tensor] = torch.relu,
    lipschitz: float = 1.0,
    radius: float = 1.0,
    n_samples: int = 4096,
    seed: int = 0,
) -> Theorem21Report:
    """Test Eq. (2) and the Lipschitz bound empirically on two layers x ↦ σ(Wx + b).

    Samples ``n_samples`` inputs in the R-ball (half uniform inside, half on the sphere, from a
    ``torch.Generator`` seeded with ``seed``), evaluates both layers in float64 and compares
    the largest observed output difference with both bounds. ``activation`` must be
    ``lipschitz``-Lipschitz with σ(0) = 0 for the default M and the Lipschitz bound to apply.

    Returns:
        :class:`Theorem21Report`; ``holds`` is False on the counterexample.

    Example:
        >>> A, B = torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
        >>> report = check_theorem21((A, None), (B, None), n_samples=256)
        >>> report.holds, report.lipschitz_holds, report.observed_max > 0.99
        (False, True, True)
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if not callable(activation):
        raise TypeError(f"activation must be callable, got {type(activation).__name__}")
    wa, ba = _affine(a, "a", torch.float64)
    wb, bb = _affine(b, "b", torch.float64)
    bound = theorem21_bound((wa, ba), (wb, bb), lipschitz=lipschitz, radius=radius)
    lip = lipschitz_bound((wa, ba), (wb, bb), lipschitz=lipschitz, radius=radius)
    x = _ball_samples(n_samples, wa.shape[1], float(radius), seed).to(wa.device)
    with torch.no_grad():
        diff = activation(x @ wa.T + ba) - activation(x @ wb.T + bb)
        observed = float(torch.linalg.vector_norm(diff, dim=1).max())
    bound_f, lip_f = float(bound), float(lip)
    return Theorem21Report(
        bound=bound_f,
        lipschitz_bound=lip_f,
        observed_max=observed,
        holds=observed <= bound_f + 1e-9 * (1 + bound_f),
        lipschitz_holds=observed <= lip_f + 1e-9 * (1 + lip_f),
        n_samples=n_samples,
    )
