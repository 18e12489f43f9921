"""Spectra of rank-one downdates by secular equations (private helper of the leave-one-out
spectral shift, paper §2.1, §2.3).

Removing row ``c`` of an operator matrix ``M`` (one output channel) removes the rank-one term
``m_c m_cᵀ`` from the Gram ``MᵀM``. With ``MᵀM = V diag(λ) Vᵀ`` (or ``MMᵀ = U diag(λ) Uᵀ`` when
``M`` is wide) the squared singular values of the smaller matrix are the eigenvalues of
``diag(λ) − z zᵀ`` with ``z = Vᵀ m_c`` (``z_j = √λ_j U_cj``), i.e. the roots ``μ`` of the
secular equation

    f(μ) = 1 − Σ_j z_j² / (λ_j − μ) = 0,

one in each interval ``(λ_{j−1}, λ_j)`` and one in ``[max(0, λ_1 − ‖z‖²), λ_1]`` (Cauchy
interlacing). Solving it costs O(r) per root and iteration, O(r²) per channel, instead of the
O(r³) of an eigendecomposition of every downdated Gram.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__: list[str] = []

_CHUNK_ELEMENTS = 1 << 18  # rows x poles per iteration (2 MB of float64 per buffer: cache)


def downdated_eigvalsh(
    lam: Tensor, weights: Tensor, *, zero_first: bool = False, max_iter: int = 100
) -> Tensor:
    """Eigenvalues of ``diag(lam) − z zᵀ`` for every row ``w = z²`` of ``weights``.

    Each root is bracketed by its interlacing interval and found by the rational iteration of
    Bunch, Nielsen and Sorensen (1978): the poles left and right of the root are modelled by
    one pole each, matching value and slope, and the model's root is the next iterate (from
    ``λ_j − z_j²``, first-order perturbation theory, when that lies in the interval); an
    iterate outside the current bracket is replaced by bisection. Typically 4 to 5 iterations
    per root, each a few vectorized passes over the ``r`` poles. Roots are accurate to a few
    ulps of ``max(lam)`` (as ``eigvalsh`` of the downdated matrix is); the problem is solved
    after an exact power-of-two rescaling, so any finite scale works.

    Args:
        lam: ``(r,)`` float64 eigenvalues, ascending, ``>= 0``.
        weights: ``(c, r)`` float64 ``z²`` per row, ``>= 0``.
        zero_first: the smallest root is 0 (``z`` is a row of a wide matrix ``M`` with
            ``MMᵀ = U diag(lam) Uᵀ``: removing it drops the rank), so it is not searched.
        max_iter: iteration cap (bisection alone would need about 60).

    Returns:
        ``(c, r)`` float64 eigenvalues of each downdate, ascending, clamped at 0 (the downdated
        Gram is positive semi-definite).
    """
    c, r = weights.shape
    if c == 0 or r == 0:
        return torch.empty(c, r, dtype=lam.dtype, device=lam.device)
    # a power-of-two scale (exact) keeps squares and reciprocals of the poles in range
    top = float(lam[-1])
    scale = math.ldexp(1.0, math.frexp(top)[1]) if 0 < top < math.inf else 1.0
    mu = _solve(lam / scale, weights / scale, max_iter, zero_first)
    return mu.view(c, r).clamp_min_(0.0).mul_(scale)


def _step(
    state: Tensor, total: Tensor, left2: Tensor, right2: Tensor, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One safeguarded iteration given the secular sums at ``μ`` (:func:`_secular_sums`):
    ``f(μ) = 1 − total``. ``state`` is ``(A, 5)``: ``μ``, bracket ``lo``, ``hi``, and the poles
    ``λ_{j−1}``, ``λ_j`` around the root (for the smallest root, the lower bound instead of
    ``λ_{j−1}``: no pole there, and ``left2 = 0``). Updates the bracket in place.

    Returns ``(x, done, final)``: next iterate, convergence flags and the converged values.
    """
    mu, lo, hi, p_left, p_right = state.unbind(1)
    f = 1 - total
    # the bracket shrinks to the side of μ where f changes sign (f decreases)
    lo.copy_(torch.where(f > 0, mu, lo))
    hi.copy_(torch.where(f < 0, mu, hi))
    # one-pole models of both sides of f = 1 + ψ − φ (ψ: poles below μ, φ: above):
    # ψ(x) ≈ a0 + a1 / (x − λ_{j−1}), a1 = |ψ'| (μ − λ_{j−1})², a0 = ψ − |ψ'| (μ − λ_{j−1}),
    # φ(x) ≈ b0 + b1 / (λ_j − x), b1 = φ' (λ_j − μ)², b0 = φ − φ' (λ_j − μ), ψ − φ = −total
    dl = mu - p_left
    dr = p_right - mu
    left = left2 * dl
    right = right2 * dr
    a1 = left * dl
    b1 = right * dr
    cc = f - left + right  # 1 + a0 − b0
    # model root: cc + a1/p − b1/(g − p) = 0, p = x − λ_{j−1} in (0, g): the root in (0, g)
    # of −cc p² + (cc g − a1 − b1) p + a1 g, in its cancellation-free form. With no pole
    # below (a1 = 0) it is p = g − b1/cc, or p = 0 (the lower bound) when that is below.
    g = p_right - p_left
    bq = cc * g - a1 - b1
    sq = (bq * bq + 4 * cc * a1 * g).clamp_min(0).sqrt()
    x = p_left + torch.where(bq <= 0, 2 * a1 * g / (sq - bq), (bq + sq) / (2 * cc))
    # converged: the model moves μ by a few ulps (at the root it returns μ itself), or the
    # bracket is that small; the answer is then the model root kept inside the bracket
    step_ok = ((x - mu).abs() <= tol) & (x >= lo - tol) & (x <= hi + tol)
    done = (f == 0) | (hi - lo <= tol) | step_ok
    final = torch.where((f != 0) & torch.isfinite(x), torch.clamp(x, lo, hi), mu)
    # a model root outside the open bracket (a step the model got wrong, or one that rounds
    # onto a pole) falls back to bisection
    inside = (x > lo) & (x < hi)  # false for NaN
    x = torch.where(inside, x, (lo + hi) / 2)
    return x, done, final


def _secular_sums(
    lam: Tensor, mu: Tensor, w: Tensor, work: tuple[Tensor, Tensor], rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums of the secular function at ``μ`` (``(A,)``) over the poles ``λ`` (``(r,)``):
    ``total = Σ z²/(λ−μ)``, and ``left2``, ``right2``: the sums of ``z²/(λ−μ)²`` over the
    poles below and above ``μ`` (those with ``λ − μ < 0`` and ``> 0``); ``z²`` of row ``k`` is
    ``w[rows[k]]``. Ten passes over ``(A, r)`` in the two preallocated ``work`` buffers (fresh
    multi-megabyte temporaries cost page faults on every call)."""
    shape = (*mu.shape, lam.shape[0])
    size = mu.numel() * lam.shape[0]
    rec = work[0][:size].view(shape)
    t = work[1][:size].view(shape)
    torch.sub(lam, mu.unsqueeze(-1), out=rec).reciprocal_()  # 1 / (λ_l − μ)
    torch.index_select(w, 0, rows, out=t).mul_(rec)  # z_l² / (λ_l − μ)
    total = t.sum(dim=-1)
    s2 = rec.abs_().mul_(t)  # z² / (λ−μ)², with the sign of λ − μ
    signed = s2.sum(dim=-1)  # right2 − left2
    both = s2.abs_().sum(dim=-1)  # right2 + left2 (vector_norm(ord=1) is slower on CPU)
    return total, (both - signed) / 2, (both + signed) / 2


def _solve(lam: Tensor, w: Tensor, max_iter: int, zero_first: bool) -> Tensor:
    """All roots, streamed: at most ``_CHUNK_ELEMENTS // r`` rows iterate at a time, and the
    rows of the next channels join as soon as converged rows leave (no per-block tails)."""
    c, r = w.shape
    dt, dev = lam.dtype, lam.device
    tol = 4 * torch.finfo(dt).eps * float(lam[-1].clamp_min(torch.finfo(dt).tiny))
    # every root's bracket (interlacing) and surrounding poles, rows ordered (channel, root)
    j = torch.arange(r, device=dev).repeat(c)
    lo = torch.cat([lam[:1], lam[:-1]]).repeat(c)  # λ_{j−1}
    # smallest root: Weyl (λ_1 − ‖z‖²) and positive semi-definiteness (0)
    lo[j == 0] = torch.minimum((lam[0] - w.sum(dim=1)).clamp_min(0.0), lam[0])
    hi = lam.repeat(c)
    # start at first-order perturbation theory (λ_j − z_j², close for a small downdate such
    # as one row of a tall matrix), else mid-interval
    guess = hi - w.reshape(-1)
    mu_out = torch.where((guess > lo) & (guess < hi), guess, (lo + hi) / 2)
    todo = hi - lo > tol
    if zero_first:
        mu_out[j == 0] = 0.0
        todo &= j != 0
    queue = torch.nonzero(todo).view(-1)  # rows still to solve
    budget = max(r, _CHUNK_ELEMENTS // r)  # rows per iteration
    work = (lam.new_empty(budget * r), lam.new_empty(budget * r))
    active = queue[:0]
    state = lam.new_empty(0, 5)  # μ, lo, hi, λ_{j−1} (or the lower bound), λ_j
    iters = torch.zeros(0, dtype=torch.int32, device=dev)
    head = 0
    while head < queue.numel() or active.numel():
        room = budget - active.numel()
        if room > 0 and head < queue.numel():
            new = queue[head : head + room]
            head += new.numel()
            active = torch.cat([active, new])
            fresh = torch.stack([mu_out[new], lo[new], hi[new], lo[new], hi[new]], dim=1)
            state = torch.cat([state, fresh])
            iters = torch.cat([iters, torch.zeros_like(new, dtype=torch.int32)])
        total, left2, right2 = _secular_sums(lam, state[:, 0], w, work, active // r)
        x, done, final = _step(state, total, left2, right2, tol)
        iters += 1
        done |= iters >= max_iter
        mu_out[active] = torch.where(done, final, x)
        state[:, 0] = x
        keep = ~done
        active, state, iters = active[keep], state[keep], iters[keep]
    return mu_out
