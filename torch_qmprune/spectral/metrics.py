"""Distances between spectral states: cross-shape zero padding (paper §2.2), the Fubini–Study
distance and fidelity (§2.3), and a vectorized pairwise distance matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_qmprune._validation import check_finite
from torch_qmprune.spectral.states import _check_tensor, _compute_dtype

__all__ = ["fidelity", "fubini_study", "pad_states", "pairwise_fubini_study"]


def pad_states(*states: Tensor) -> tuple[Tensor, ...]:
    """Zero-pad the last dimension of every state to the longest one (paper §2.2).

    States of operators with different shapes have different lengths; sorted descending, the
    shorter is padded with zeros at the end (the missing singular values are zero). Leading
    dimensions are left alone.

    Args:
        *states: tensors of shape ``(..., d_i)``, assumed sorted descending along the last dim.

    Returns:
        A tuple of tensors of shape ``(..., max_i d_i)`` (unchanged tensors are returned as is).

    Example:
        >>> pad_states(torch.tensor([0.8, 0.6]), torch.tensor([1.0]))
        (tensor([0.8000, 0.6000]), tensor([1., 0.]))
    """
    for i, s in enumerate(states):
        _check_tensor(s, f"states[{i}]")
        if s.ndim == 0:
            raise ValueError(f"states[{i}] is 0-D; expected a tensor of shape (..., d)")
    if not states:
        return ()
    length = max(s.shape[-1] for s in states)
    return tuple(
        s if s.shape[-1] == length else torch.nn.functional.pad(s, (0, length - s.shape[-1]))
        for s in states
    )


def _normalized(x: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """``x / ‖x‖`` along the last dim in ``dtype``; zero vectors raise ``ValueError``."""
    check_finite(x, name)
    x = x.to(dtype)
    scale = x.abs().amax(dim=-1, keepdim=True) if x.shape[-1] > 0 else None
    if scale is None or bool((scale == 0).any()):
        raise ValueError(
            f"{name} contains a zero (or empty) vector of shape {tuple(x.shape)}; a state must be "
            "a non-zero vector"
        )
    x = x / scale  # pre-scaling keeps ‖x‖ from overflowing / underflowing
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _prepare_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    _check_tensor(a, "a")
    _check_tensor(b, "b")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(
            f"states must have shape (..., d); got a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}; expected one device")
    dtype = _compute_dtype(a, b)
    a, b = pad_states(a, b)
    return _normalized(a, "a", dtype), _normalized(b, "b", dtype)


def _angle(minus: Tensor, plus: Tensor) -> Tensor:
    """θ = 2·atan2(min(‖a−b‖, ‖a+b‖), max(...)) = arccos|⟨a, b⟩| for unit a, b."""
    return 2 * torch.atan2(torch.minimum(minus, plus), torch.maximum(minus, plus))


def fubini_study(a: Tensor, b: Tensor) -> Tensor:
    """Fubini–Study distance d_FS(a, b) = arccos |⟨â, b̂⟩| (paper §2.3), in [0, π/2].

    Both inputs are normalized (so ``d_FS(c·a, b) = d_FS(a, b)``) and zero-padded to a common
    length (§2.2); leading dims broadcast. Computed in the stable form
    ``2·atan2(min(‖â−b̂‖, ‖â+b̂‖), max(‖â−b̂‖, ‖â+b̂‖))``: exact 0 for ``a == b`` (and for
    ``a == −b``), accurate for nearly parallel states where ``arccos`` loses half its digits.

    Args:
        a, b: tensors ``(..., d_a)`` and ``(..., d_b)``; non-zero along the last dim.

    Returns:
        Tensor of the broadcast leading shape, float32 (float64 if either input is float64).

    Raises:
        ValueError: zero vectors, non-finite entries, or inputs on different devices.

    Example:
        >>> fubini_study(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
        tensor(0.7854)
        >>> fubini_study(torch.tensor([1.0]), torch.tensor([2.0, 0.0]))  # padded, rescaled
        tensor(0.)
    """
    a, b = _prepare_pair(a, b)
    minus = torch.linalg.vector_norm(a - b, dim=-1)
    plus = torch.linalg.vector_norm(a + b, dim=-1)
    return _angle(minus, plus)


def fidelity(a: Tensor, b: Tensor) -> Tensor:
    """Fidelity |⟨â, b̂⟩|² = cos²(d_FS(a, b)) (paper §2.3), in [0, 1].

    Inputs are normalized and zero-padded like :func:`fubini_study`; leading dims broadcast.

    Example:
        >>> fidelity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
        tensor(0.5000)
    """
    a, b = _prepare_pair(a, b)
    return ((a * b).sum(dim=-1) ** 2).clamp(0.0, 1.0)


def _normalized_rows(x: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """Row-normalize a ``(n, d)`` matrix; zero rows raise ``ValueError`` listing their indices."""
    check_finite(x, name)
    x = x.to(dtype)
    scale = x.abs().amax(dim=-1, keepdim=True)
    zero = (scale == 0).flatten()
    if bool(zero.any()):
        idx = torch.nonzero(zero).flatten().tolist()
        shown = idx[:20] + (["..."] if len(idx) > 20 else [])
        raise ValueError(f"{name} has all-zero rows at indices {shown}; states must be non-zero")
    x = x / scale
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


# Pairs with 1 - |<a, b>| below this (θ below ~sqrt(2τ)) are recomputed from ‖a ∓ b‖ directly.
_REFINE_TAU = {torch.float32: 1e-8, torch.float64: 1e-4}
_REFINE_PAIRS = 1 << 18  # pairs recomputed per gather


def _block_angles(xb: Tensor, yb: Tensor, out_dtype: torch.dtype, symmetric: bool) -> Tensor:
    """d_FS between float64 unit rows of ``xb`` and ``yb``: a matmul, then an exact recompute
    of the nearly parallel pairs, where ``1 − |c|`` from the matmul has lost its digits."""
    g = xb @ yb.T
    if symmetric:
        # (g + gᵀ) / 2, exactly symmetric: every later step is elementwise and symmetric
        # (a contiguous transpose first: far faster than adding a strided view)
        g = g.T.contiguous().add_(g).mul_(0.5)
    u = g.abs_().neg_().add_(1).clamp_(min=0.0)  # 1 − |c| = 2 sin²(θ/2), ~1e-16 absolute error
    close = u < _REFINE_TAU[out_dtype]
    if symmetric:
        close.fill_diagonal_(False)  # the diagonal is set to 0 by the caller
    near = torch.nonzero(close) if bool(close.any()) else close.new_empty(0, 2, dtype=torch.long)
    theta = u.to(out_dtype).div_(2).sqrt_().clamp_(max=1.0).asin_().mul_(2)
    for start in range(0, near.shape[0], _REFINE_PAIRS):
        i, j = near[start : start + _REFINE_PAIRS].unbind(1)
        a, b = xb[i], yb[j]
        minus = torch.linalg.vector_norm(a - b, dim=-1)
        plus = torch.linalg.vector_norm(a + b, dim=-1)
        theta[i, j] = _angle(minus, plus).to(out_dtype)
    return theta


def pairwise_fubini_study(
    states: Tensor, other: Tensor | None = None, *, chunk_size: int = 4096
) -> Tensor:
    """Matrix of Fubini–Study distances D[i, j] = d_FS(states[i], other[j]) (paper §2.3, §3.1).

    Vectorized by blocks of ``chunk_size x chunk_size``: rows are normalized in float64, one
    matmul gives ``c = ⟨a, b⟩`` and ``θ = 2·asin(sqrt((1 − |c|) / 2))``; pairs so nearly
    parallel that ``1 − |c|`` is inaccurate (θ below ~1.4e-4 for float32 output, ~1.4e-2 for
    float64) are recomputed from ``‖a ∓ b‖`` with the stable ``atan2`` form of
    :func:`fubini_study`, so identical rows give exactly 0. With ``other=None`` the matrix is
    exactly symmetric with a zero diagonal. The two inputs are zero-padded to a common length
    (§2.2). Agreement with :func:`fubini_study` is to float rounding (~1e-6 in float32).

    Args:
        states: ``(n, d)`` non-zero rows.
        other: optional ``(m, d')``; defaults to ``states``.
        chunk_size: block edge (>= 1); memory is about ``16·chunk_size²`` bytes plus the output.

    Returns:
        ``(n, m)`` tensor with entries in [0, π/2], float32 (float64 for float64 input).

    Example:
        >>> psi = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
        >>> pairwise_fubini_study(psi)
        tensor([[0.0000, 0.7854, 1.5708],
                [0.7854, 0.0000, 0.7854],
                [1.5708, 0.7854, 0.0000]])
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_tensor(states, "states")
    if states.ndim != 2:
        raise ValueError(f"states must have shape (n, d), got {tuple(states.shape)}")
    same = other is None
    if other is None:
        other = states
    _check_tensor(other, "other")
    if other.ndim != 2:
        raise ValueError(f"other must have shape (m, d), got {tuple(other.shape)}")
    if other.device != states.device:
        raise ValueError(f"states on {states.device} but other on {other.device}")
    dtype = _compute_dtype(states, other)
    n, m = states.shape[0], other.shape[0]
    if n == 0 or m == 0:
        return torch.zeros(n, m, dtype=dtype, device=states.device)
    states, other = pad_states(states, other)
    x = _normalized_rows(states, "states", torch.float64)
    y = x if same else _normalized_rows(other, "other", torch.float64)
    if n <= chunk_size and m <= chunk_size:  # one block: no copy into an output buffer
        out = _block_angles(x, y, dtype, symmetric=same)
        if same:
            out.fill_diagonal_(0.0)
        return out
    out = torch.empty(n, m, dtype=dtype, device=x.device)
    for r0 in range(0, n, chunk_size):
        r1 = min(r0 + chunk_size, n)
        for c0 in range(r0 if same else 0, m, chunk_size):
            c1 = min(c0 + chunk_size, m)
            theta = _block_angles(x[r0:r1], y[c0:c1], dtype, symmetric=same and r0 == c0)
            out[r0:r1, c0:c1] = theta
            if same and c0 != r0:
                out[c0:c1, r0:r1] = theta.T
    if same:
        out.fill_diagonal_(0.0)
    return out
