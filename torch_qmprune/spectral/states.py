"""Spectral states of linear operators (paper §2.1): the normalized singular-value vector of the
bias-augmented weight matrix, a point on the unit sphere shared by every operator of a given rank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_qmprune._validation import check_finite
from torch_qmprune._threads import single_thread

__all__ = ["augment", "operator_matrix", "spectral_state", "spectral_states"]


# ---------------------------------------------------------------------------------------------
# private helpers shared by the spectral package
# ---------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor | None, dtype: torch.dtype | None = None) -> torch.dtype:
    """The floating dtype math runs in: ``dtype`` if given, float64 if any input is float64,
    otherwise float32 (fp16 / bf16 / integer inputs are upcast)."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _check_tensor(x: object, name: str) -> Tensor:
    """Return ``x`` if it is a real tensor, else raise ``TypeError`` naming it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got complex dtype {x.dtype}")
    return x


def _weight_and_bias(x: object, name: str = "operator") -> tuple[Tensor, Tensor | None]:
    """Split an ``nn.Module`` (``.weight``/``.bias``), a ``(weight, bias)`` tuple or a bare weight
    tensor into ``(weight, bias)``."""
    if isinstance(x, nn.Module):
        weight = getattr(x, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(
                f"{name}: module {type(x).__name__} has no tensor attribute 'weight'; "
                "pass the weight tensor directly"
            )
        bias = getattr(x, "bias", None)
        return weight, bias if isinstance(bias, Tensor) else None
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise TypeError(f"{name}: expected a (weight, bias) pair, got a sequence of {len(x)}")
        weight, bias = x
        _check_tensor(weight, f"{name} weight")
        if bias is not None:
            _check_tensor(bias, f"{name} bias")
        return weight, bias
    return _check_tensor(x, name), None


def _safe_scale(matrix: Tensor, dims: tuple[int, ...] = (-2, -1)) -> Tensor:
    """Largest absolute entry over ``dims`` (kept), with zeros replaced by one so dividing is safe.

    Singular-value *directions* are scale invariant; dividing by the max entry before an SVD
    keeps huge (1e30) or tiny (1e-30) weights from overflowing or underflowing ``‖s‖``.
    """
    scale = matrix.abs().amax(dim=dims, keepdim=True)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _bias_vector(bias: Tensor, rows: int, name: str = "bias") -> Tensor:
    """Reshape a bias to ``(rows,)`` or raise naming the shape mismatch."""
    _check_tensor(bias, name)
    if bias.numel() != rows:
        raise ValueError(
            f"{name} has shape {tuple(bias.shape)} ({bias.numel()} entries) but the operator "
            f"matrix has {rows} rows; expected {rows} entries"
        )
    return bias.reshape(rows)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def _svdvals(mats: Tensor) -> Tensor:
    """``torch.linalg.svdvals`` on the tall orientation (same values; LAPACK is several times
    faster on tall than on wide matrices on CPU)."""
    if mats.shape[-2] < mats.shape[-1]:
        mats = mats.transpose(-2, -1)
    if mats.dim() > 2 and mats.shape[0] > 1:
        # a batch of small problems: batched LAPACK under OpenMP thrashes on a loaded machine
        with single_thread():
            return torch.linalg.svdvals(mats)
    return torch.linalg.svdvals(mats)


def operator_matrix(weight: Tensor) -> Tensor:
    """View a weight tensor as the matrix of the linear operator it applies (paper §2.1).

    A 1-D weight ``(n,)`` becomes a row ``(1, n)``; a 2-D weight is returned unchanged; an
    N-D weight ``(out, in, *k)`` (ConvNd) becomes ``(out, in * prod(k))``, i.e. the convolution
    read as a ``C_out x C_in·k^d`` matrix acting on unfolded patches.

    Args:
        weight: real tensor with at least one dimension and at least one entry.

    Returns:
        A 2-D view/reshape of ``weight`` (same dtype and device).

    Raises:
        ValueError: if ``weight`` is 0-D or empty (the message names the shape).

    Example:
        >>> operator_matrix(torch.zeros(8, 3, 3, 3)).shape
        torch.Size([8, 27])
        >>> operator_matrix(torch.ones(5)).shape
        torch.Size([1, 5])
    """
    _check_tensor(weight, "weight")
    if weight.ndim == 0 or weight.numel() == 0:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} has no operator matrix; expected a tensor "
            "with at least one dimension and at least one entry"
        )
    if weight.ndim == 1:
        return weight.reshape(1, -1)
    if weight.ndim == 2:
        return weight
    return weight.reshape(weight.shape[0], -1)


def augment(weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Bias-augmented matrix Ŵ = [[W, b], [0, 1]] (paper §2.1), batched over leading dims.

    Args:
        weight: ``(..., m, n)`` matrix (or batch of matrices).
        bias: ``(..., m)`` or ``None`` (zeros).

    Returns:
        ``(..., m + 1, n + 1)`` tensor in the promoted dtype of ``weight`` and ``bias``.

    Example:
        >>> augment(torch.eye(2), torch.tensor([3.0, 4.0]))
        tensor([[1., 0., 3.],
                [0., 1., 4.],
                [0., 0., 1.]])
    """
    _check_tensor(weight, "weight")
    if weight.ndim < 2:
        raise ValueError(
            f"weight must have shape (..., m, n), got {tuple(weight.shape)}; "
            "use operator_matrix() first"
        )
    *lead, m, n = weight.shape
    if bias is None:
        bias = torch.zeros(*lead, m, dtype=weight.dtype, device=weight.device)
    else:
        _check_tensor(bias, "bias")
        if tuple(bias.shape) != (*lead, m):
            raise ValueError(
                f"bias has shape {tuple(bias.shape)}; expected {(*lead, m)} to match weight "
                f"of shape {tuple(weight.shape)}"
            )
    dtype = torch.promote_types(weight.dtype, bias.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    top = torch.cat([weight.to(dtype), bias.to(dtype).unsqueeze(-1)], dim=-1)
    bottom = torch.zeros(*lead, 1, n + 1, dtype=dtype, device=weight.device)
    bottom[..., 0, n] = 1
    return torch.cat([top, bottom], dim=-2)


_augment = augment  # ``spectral_state`` has a keyword named ``augment``


def spectral_state(
    weight: Tensor | nn.Module,
    bias: Tensor | None = None,
    *,
    augment: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Spectral state ψ = s / ‖s‖₂ with s = singular values of Ŵ, descending (paper §2.1).

    The state depends only on the singular values, so it is invariant under rescaling
    (``c·W``), row/column permutations and any orthogonal change of basis ``U W Vᵀ``: equal
    states do not mean equal functions (see SCIENCE.md §2).

    Args:
        weight: weight tensor (any shape accepted by :func:`operator_matrix`) or an
            ``nn.Module`` with ``.weight`` (and optional ``.bias``).
        bias: bias of the operator (``(out,)``); for a module its own ``.bias`` is used.
            Ignored when ``augment=False``.
        augment: use Ŵ = [[W, b], [0, 1]] (default, always defined) instead of W alone.
        dtype: float32 / float64 override; default float64 for float64 input, else float32.

    Returns:
        1-D tensor of length ``min(m, n) (+1 if augment)``, non-negative, descending, unit
        norm, on the input's device.

    Raises:
        ValueError: non-finite weight/bias, empty weight, or all-zero W with ``augment=False``.

    Example:
        >>> spectral_state(torch.diag(torch.tensor([3.0, 4.0])), augment=False)
        tensor([0.8000, 0.6000])
        >>> spectral_state(torch.ones(1, 5), augment=False)  # a single row: always [1]
        tensor([1.])
    """
    if isinstance(weight, nn.Module):
        if bias is not None:
            raise ValueError("pass either a module or (weight, bias), not a module and a bias")
        weight, bias = _weight_and_bias(weight, "weight")
    _check_tensor(weight, "weight")
    check_finite(weight, "weight")
    matrix = operator_matrix(weight)
    use_bias = bias if augment else None
    if use_bias is not None:
        check_finite(use_bias, "bias")
        use_bias = _bias_vector(use_bias, matrix.shape[0])
    cdtype = _compute_dtype(matrix, use_bias, dtype=dtype)
    matrix = matrix.to(cdtype)
    if augment:
        matrix = _augment(matrix, None if use_bias is None else use_bias.to(cdtype))
    elif not bool((matrix != 0).any()):
        raise ValueError(
            "all-zero operator has no spectral state; use augment=True "
            f"(weight of shape {tuple(weight.shape)})"
        )
    matrix = matrix / _safe_scale(matrix)
    s = _svdvals(matrix)
    return s / torch.linalg.vector_norm(s)


def spectral_states(
    matrices: Tensor,
    biases: Tensor | None = None,
    *,
    augment: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Batched spectral states (paper §2.1) with one batched ``torch.linalg.svdvals`` call.

    Args:
        matrices: ``(B, m, n)`` batch of operator matrices.
        biases: ``(B, m)`` or ``None`` (zeros); ignored when ``augment=False``.
        augment: use Ŵ = [[W, b], [0, 1]] per item (default).
        dtype: float32 / float64 override; default float64 for float64 input, else float32.

    Returns:
        ``(B, r)`` states, ``r = min(m, n) (+1 if augment)``; row ``i`` equals
        ``spectral_state(matrices[i], biases[i], augment=augment)``. ``B = 0`` gives ``(0, r)``.

    Raises:
        ValueError: wrong rank/shape, non-finite entries, or all-zero items with
            ``augment=False`` (the message lists their indices).

    Example:
        >>> spectral_states(torch.eye(3).expand(4, 3, 3), augment=False).shape
        torch.Size([4, 3])
    """
    _check_tensor(matrices, "matrices")
    if matrices.ndim != 3 or matrices.shape[1] == 0 or matrices.shape[2] == 0:
        raise ValueError(
            f"matrices must have shape (B, m, n) with m, n >= 1, got {tuple(matrices.shape)}"
        )
    check_finite(matrices, "weight matrices")
    b, m, n = matrices.shape
    use_bias = biases if augment else None
    if use_bias is not None:
        _check_tensor(use_bias, "biases")
        if tuple(use_bias.shape) != (b, m):
            raise ValueError(f"biases has shape {tuple(use_bias.shape)}; expected {(b, m)}")
        check_finite(use_bias, "biases")
    cdtype = _compute_dtype(matrices, use_bias, dtype=dtype)
    r = min(m, n) + (1 if augment else 0)
    if b == 0:
        return torch.zeros(0, r, dtype=cdtype, device=matrices.device)
    mats = matrices.to(cdtype)
    if augment:
        mats = _augment(mats, None if use_bias is None else use_bias.to(cdtype))
    else:
        zero = ~(mats != 0).flatten(1).any(dim=1)
        if bool(zero.any()):
            idx = torch.nonzero(zero).flatten().tolist()
            shown = idx[:20] + (["..."] if len(idx) > 20 else [])
            raise ValueError(
                f"all-zero operators at batch indices {shown} have no spectral state; "
                "use augment=True"
            )
    mats = mats / _safe_scale(mats)
    s = _svdvals(mats)
    return s / torch.linalg.vector_norm(s, dim=-1, keepdim=True)


_GRAM_CHUNK_ELEMENTS = 1 << 18  # float64 copy of the items per matmul (2 MB: stays in cache)


def _float64_gram(matrices: Tensor) -> Tensor:
    """``XᵀX`` (or ``XXᵀ`` for wide items) of every item in float64, converting the items a
    cache-sized chunk at a time into one reused buffer (a float64 copy of a whole layer is a
    large fresh allocation, paid in page faults; the result is the same)."""
    b, m, n = matrices.shape
    tall = m >= n
    r = n if tall else m
    gram = torch.empty(b, r, r, dtype=torch.float64, device=matrices.device)
    step = max(1, _GRAM_CHUNK_ELEMENTS // (m * n))
    buf = torch.empty(min(b, step) * m * n, dtype=torch.float64, device=matrices.device)
    for start in range(0, b, step):
        stop = min(b, start + step)
        x = buf[: (stop - start) * m * n].view(stop - start, m, n)
        x.copy_(matrices[start:stop])
        if tall:
            torch.matmul(x.mT, x, out=gram[start:stop])
        else:
            torch.matmul(x, x.mT, out=gram[start:stop])
    return gram


def _gram_spectral_states(matrices: Tensor, *, augment: bool = True) -> Tensor:
    """:func:`spectral_states` (no biases) for float32 math, with the singular values taken as
    ``sqrt(clamp(eigvalsh(G), 0))`` of the smaller float64 Gram (``XᵀX`` or ``XXᵀ``) of each item
    (paper §2.1: ψ = s / ‖s‖). One batched ``bmm`` and one batched ``eigvalsh`` of r x r
    matrices (r = min(m, n), 9 for a 3x3 conv filter) replace the SVD of every m x n item.

    Same states as :func:`spectral_states` to float32 rounding: the float64 Gram of float32
    entries loses no more than the float32 SVD (a singular value ``s`` is off by about
    ``1e-16·s_max²/s``, against ``6e-8·s_max`` for the float32 SVD). Items with one singular
    value (``r = 1``: a 1x1 conv filter ``C_in x 1``) have the state ``[1]`` and need no Gram.
    Float64 inputs (or ``dtype=float64`` math), bad shapes, non-finite entries and all-zero
    items with ``augment=False`` go to :func:`spectral_states`, which computes or raises.

    Args:
        matrices: ``(B, m, n)`` batch of operator matrices.
        augment: use Ŵ = [[W, 0], [0, 1]] per item (default), as :func:`spectral_states`.

    Returns:
        ``(B, r)`` float32 states, ``r = min(m, n) (+1 if augment)``, descending, unit norm.
    """
    _check_tensor(matrices, "matrices")
    if (
        matrices.ndim != 3
        or 0 in matrices.shape
        or _compute_dtype(matrices) != torch.float32
        or matrices.is_complex()
    ):
        return spectral_states(matrices, augment=augment)
    b, m, n = matrices.shape
    if not augment and min(m, n) == 1:
        # one singular value per item: ψ = [1]; only validity needs a look at the entries
        # finite and non-zero norm: every item valid (an overflowing or underflowing norm
        # only sends valid items to the exact path, which scales them first)
        norm = torch.linalg.vector_norm(matrices.reshape(b, -1), dim=1)
        if not bool((torch.isfinite(norm) & (norm > 0)).all()):
            return spectral_states(matrices, augment=augment)  # computes, or raises
        return torch.ones(b, 1, dtype=torch.float32, device=matrices.device)
    if augment:
        x = _augment(matrices.to(torch.float64))
        gram = x.mT @ x if x.shape[-2] >= x.shape[-1] else x @ x.mT
    else:
        gram = _float64_gram(matrices)
    diag = gram.diagonal(dim1=-2, dim2=-1)
    # float32 entries square without overflow or underflow in float64, so the diagonal is
    # non-finite iff an entry is, and zero iff the item is
    bad = ~torch.isfinite(diag).all(dim=-1)
    if not augment:
        bad |= diag.sum(dim=-1) == 0
    if bool(bad.any()):
        return spectral_states(matrices, augment=augment)  # raises, naming the items
    with single_thread():  # many tiny LAPACK problems: batched OpenMP thrashes under load
        eig = torch.linalg.eigvalsh(gram)
    s = eig.clamp_min_(0).sqrt_().flip(-1)
    return (s / torch.linalg.vector_norm(s, dim=-1, keepdim=True)).to(torch.float32)
