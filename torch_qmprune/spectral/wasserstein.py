"""Wasserstein-2 distances between operator spectra: the majorization profile of Theorem 2.1 and
two 1-D optimal-transport readings of "W₂(F₁, F₂)", via POT and a vectorized torch formula.
"""

from __future__ import annotations

import math

import ot
import torch
from torch import Tensor, nn

from torch_qmprune._validation import check_finite
from torch_qmprune.spectral.metrics import pad_states
from torch_qmprune.spectral.states import (
    _check_tensor,
    _compute_dtype,
    _weight_and_bias,
    spectral_state,
)

__all__ = [
    "majorization_profile",
    "pairwise_wasserstein2",
    "wasserstein2",
    "wasserstein2_states",
]

_KINDS = ("profile", "spectrum")
_INTEGER_SLACK = 1e-6  # t·m within this of an integer j counts as j in ⌊t·m⌋


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def _state_of(x: object, name: str, augment: bool) -> Tensor:
    """Spectral state of a weight tensor, ``(weight, bias)`` pair or module."""
    if isinstance(x, nn.Module):
        return spectral_state(x, augment=augment)
    weight, bias = _weight_and_bias(x, name)
    return spectral_state(weight, bias, augment=augment)


def _check_spectrum(x: Tensor, name: str, *, nonnegative: bool) -> Tensor:
    """Validate a 1-D (or ``(n, d)``) spectrum: finite, non-empty, non-zero rows, optional sign."""
    _check_tensor(x, name)
    if x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"{name} of shape {tuple(x.shape)} is empty; expected d >= 1 entries")
    check_finite(x, name)
    if nonnegative and bool((x < 0).any()):
        raise ValueError(
            f"{name} has negative entries (min {float(x.min()):.3g}); singular values and "
            "spectral states are non-negative"
        )
    if bool((x == 0).all(dim=-1).any()):
        raise ValueError(f"{name} contains an all-zero spectrum; expected a non-zero vector")
    return x


def majorization_profile(x: Tensor | nn.Module, t: Tensor | None = None) -> Tensor:
    """Majorization profile F(t) = (1/‖Ŵ‖_F) Σ_{j ≤ ⌊t·m⌋} σ_j(Ŵ) of Theorem 2.1.

    Since ‖Ŵ‖_F = ‖σ‖₂, F is the cumulative sum of the spectral state ψ = σ/‖σ‖₂: F(0) = 0 and
    F(1) = ‖σ‖₁/‖σ‖₂ ∈ [1, √m] — it is *not* a distribution function (see
    :func:`wasserstein2` for the normalization used to compare two profiles).

    Args:
        x: a weight tensor with >= 2 dims, an ``nn.Module`` or a ``(weight, bias)`` pair (its
            augmented spectrum is computed, §2.1), or a 1-D non-negative spectrum (sorted
            descending here if it is not).
        t: points in [0, 1] (any shape); default the grid ``j/m``, ``j = 1..m``. ``t·m`` within
            1e-6 of an integer counts as that integer.

    Returns:
        F evaluated at ``t`` (same shape as ``t``; length ``m`` for the default grid).

    Example:
        >>> majorization_profile(torch.tensor([3.0, 4.0]))
        tensor([0.8000, 1.4000])
        >>> majorization_profile(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.49, 0.5]))
        tensor([0.0000, 0.0000, 0.8000])
    """
    if isinstance(x, Tensor) and x.ndim == 1:
        _check_spectrum(x, "spectrum", nonnegative=True)
        s = x.to(_compute_dtype(x))
        s = torch.sort(s, descending=True).values
        s = s / s.amax()
        psi = s / torch.linalg.vector_norm(s)
    else:
        psi = _state_of(x, "x", augment=True)
    cumulative = torch.cumsum(psi, dim=0)
    if t is None:
        return cumulative
    _check_tensor(t, "t")
    check_finite(t, "t")
    if bool(((t < 0) | (t > 1)).any()):
        lo, hi = float(t.min()), float(t.max())
        raise ValueError(f"t must lie in [0, 1], got values in [{lo}, {hi}]")
    m = psi.shape[0]
    k = torch.floor(t.to(torch.float64) * m + _INTEGER_SLACK).long().clamp_(0, m)
    table = torch.cat([cumulative.new_zeros(1), cumulative])
    return table[k.to(table.device)]


def _profile_measure(states: Tensor) -> tuple[Tensor, Tensor]:
    """Atoms ``t_j = j/d`` and masses ``ψ_j / Σψ`` of the normalized majorization profile."""
    d = states.shape[-1]
    atoms = torch.arange(1, d + 1, dtype=states.dtype, device=states.device) / d
    masses = states / states.sum(dim=-1, keepdim=True)
    return atoms, masses


def _unit(x: Tensor) -> Tensor:
    x = x / x.abs().amax(dim=-1, keepdim=True)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def wasserstein2_states(psi_a: Tensor, psi_b: Tensor, *, kind: str = "profile") -> Tensor:
    """W₂ between two spectral states (1-D, non-negative; zero-padded to a common length).

    ``kind="profile"`` (Theorem 2.1's W₂(F₁, F₂)): the profile F is turned into a probability
    measure on [0, 1] with atoms ``t_j = j/m`` and masses ``σ_j / Σσ`` (F rescaled to end at 1);
    W₂ between the two measures is ``sqrt(ot.wasserstein_1d(t, t, p_a, p_b, p=2))`` — POT
    returns W₂², the integral of the squared quantile difference.

    ``kind="spectrum"``: W₂ between the uniform empirical measures on the entries of the two
    unit states; for sorted vectors this is ``sqrt(mean((ψ_a − ψ_b)²)) = ‖ψ_a − ψ_b‖/√m``,
    hence ``≤ 2·sin(d_FS/2)/√m ≤ d_FS``.

    Inputs are rescaled (mass 1, resp. unit norm), so raw singular values work too.

    Example:
        >>> wasserstein2_states(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        tensor(0.5000)
        >>> wasserstein2_states(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), kind="spectrum")
        tensor(0.)
    """
    _check_kind(kind)
    for name, x in (("psi_a", psi_a), ("psi_b", psi_b)):
        _check_tensor(x, name)
        if x.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}; use pairwise_*")
        _check_spectrum(x, name, nonnegative=kind == "profile")
    if psi_a.device != psi_b.device:
        raise ValueError(f"psi_a on {psi_a.device} but psi_b on {psi_b.device}")
    dtype = _compute_dtype(psi_a, psi_b)
    a, b = pad_states(psi_a.to(dtype), psi_b.to(dtype))
    if kind == "spectrum":
        a = torch.sort(_unit(a)).values
        b = torch.sort(_unit(b)).values
        return torch.sqrt(torch.mean((a - b) ** 2))
    atoms, wa = _profile_measure(a)
    _, wb = _profile_measure(b)
    # POT's batched layout: values and weights of shape (d, 1) -> one W₂² of shape (1,)
    w2_squared = ot.wasserstein_1d(atoms[:, None], atoms[:, None], wa[:, None], wb[:, None], p=2)
    return torch.sqrt(w2_squared.reshape(()).clamp(min=0.0))


def wasserstein2(
    a: Tensor | nn.Module,
    b: Tensor | nn.Module,
    *,
    kind: str = "profile",
    augment: bool = True,
) -> Tensor:
    """W₂ between the spectra of two operators (Theorem 2.1, Eq. (2)); see
    :func:`wasserstein2_states` for the two ``kind`` readings.

    Args:
        a, b: weight tensors, ``(weight, bias)`` pairs or modules with ``.weight``/``.bias``;
            shapes may differ (spectra are zero-padded, §2.2).
        kind: ``"profile"`` (normalized majorization profile, POT) or ``"spectrum"``.
        augment: use the bias-augmented Ŵ (§2.1).

    Returns:
        0-D tensor, float32 (float64 for float64 weights), on the weights' device.

    Example:
        >>> wasserstein2(torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0])))
        tensor(0.)
    """
    _check_kind(kind)
    psi_a = _state_of(a, "a", augment)
    psi_b = _state_of(b, "b", augment)
    return wasserstein2_states(psi_a, psi_b, kind=kind)


def _pairwise_profile_block(cdf_i: Tensor, cdf_j: Tensor) -> Tensor:
    """W₂² between each row measure of ``cdf_i`` (p, d) and of ``cdf_j`` (q, d), all on the
    common atoms ``k/d``: ∫₀¹ (Q_a(u) − Q_b(u))² du with Q the quantile functions, integrated
    exactly over the merged breakpoints of the two distribution functions.

    On the interval ending at the l-th merged breakpoint, Q_a sits on atom ``ia`` = number of
    a-breakpoints sorted before position l, and Q_b on ``l − ia``.
    """
    p, d = cdf_i.shape
    q = cdf_j.shape[0]
    merged = torch.cat([cdf_i[:, None, :].expand(p, q, d), cdf_j[None, :, :].expand(p, q, d)], -1)
    breaks, order = torch.sort(merged, dim=-1)  # (p, q, 2d), ends at 1
    widths = torch.diff(breaks, dim=-1, prepend=breaks.new_zeros(p, q, 1))
    from_a = (order < d).to(breaks.dtype)
    ia = torch.cumsum(from_a, dim=-1) - from_a
    position = torch.arange(2 * d, dtype=breaks.dtype, device=breaks.device)
    ib = position - ia
    gap = (ia.clamp(max=d - 1) - ib.clamp(max=d - 1)) / d
    return (widths * gap * gap).sum(dim=-1)


def pairwise_wasserstein2(states: Tensor, *, kind: str = "profile") -> Tensor:
    """Matrix of W₂ distances between the rows of ``states`` (``(n, d)``), vectorized in torch.

    Same definitions as :func:`wasserstein2_states`. ``kind="profile"`` uses the 1-D quantile
    formula W₂² = ∫₀¹ (Q_a(u) − Q_b(u))² du, exact for atomic measures by integrating over the
    merged breakpoints of the two CDFs (rows processed in blocks, no per-pair loop);
    ``kind="spectrum"`` is ``cdist(sort(ψ), sort(ψ)) / √d``. Symmetric, zero diagonal.

    Example:
        >>> pairwise_wasserstein2(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([[0.0000, 0.5000],
                [0.5000, 0.0000]])
    """
    _check_kind(kind)
    _check_tensor(states, "states")
    if states.ndim != 2:
        raise ValueError(f"states must have shape (n, d), got {tuple(states.shape)}")
    dtype = _compute_dtype(states)
    n, d = states.shape
    if n == 0:
        return torch.zeros(0, 0, dtype=dtype, device=states.device)
    _check_spectrum(states, "states", nonnegative=kind == "profile")
    x = states.to(dtype)
    if kind == "spectrum":
        x = torch.sort(_unit(x), dim=-1).values
        out = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)
    else:
        _, masses = _profile_measure(x)
        cdf = torch.cumsum(masses, dim=-1)
        cdf[:, -1] = 1.0
        rows = max(1, (1 << 22) // max(1, n * 2 * d))
        out = torch.empty(n, n, dtype=dtype, device=x.device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            block = torch.sqrt(_pairwise_profile_block(cdf[start:stop], cdf[start:]).clamp_(min=0))
            out[start:stop, start:] = block  # upper block rows; mirrored below
            out[start:, start:stop] = block.T
    out.fill_diagonal_(0.0)
    return out
