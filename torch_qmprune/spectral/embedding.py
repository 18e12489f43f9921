"""Fixed-size random-feature embeddings of operators of any shape (paper §6): flatten, L2
normalize, then a seeded Gaussian projection or random Fourier features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torch_qmprune._validation import check_finite
from torch_qmprune.spectral.states import _check_tensor, _compute_dtype

__all__ = ["random_feature_embedding"]

_ROWS_PER_CHUNK = 16384  # rows of the projection G generated at a time (16384 x dim floats)
_KINDS = ("gaussian", "fourier")


def _flatten(x: object, name: str) -> Tensor:
    """The parameter vector of a tensor or module: ``weight`` then ``bias`` if the module has a
    tensor ``weight``, otherwise all its parameters in registration order."""
    if isinstance(x, nn.Module):
        weight = getattr(x, "weight", None)
        if isinstance(weight, Tensor):
            bias = getattr(x, "bias", None)
            parts = [weight] + ([bias] if isinstance(bias, Tensor) else [])
        else:
            parts = list(x.parameters())
        if not parts:
            raise ValueError(f"{name}: module {type(x).__name__} has no parameters to embed")
        return torch.cat([p.detach().reshape(-1) for p in parts])
    return _check_tensor(x, name).detach().reshape(-1)


def _embed_one(x: Tensor, name: str, dim: int, seed: int, kind: str) -> Tensor:
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); nothing to embed")
    check_finite(x, name)
    dtype = _compute_dtype(x)
    v = x.to(dtype)
    v = v / v.abs().amax() if bool((v != 0).any()) else v
    norm = torch.linalg.vector_norm(v)
    if not norm > 0:
        raise ValueError(f"{name} is all zeros; it has no direction to L2-normalize")
    v = v / norm
    gen = torch.Generator().manual_seed(seed)
    # The phase b is drawn first so G's rows come from the same stream for every kind and G
    # for a length-L input is the prefix of G for any longer input (a zero-padded input embeds
    # identically).
    phase = torch.rand(dim, generator=gen) * (2 * math.pi)
    out = torch.zeros(dim, dtype=dtype, device=v.device)
    for start in range(0, v.numel(), _ROWS_PER_CHUNK):
        block = torch.randn(_ROWS_PER_CHUNK, dim, generator=gen)  # full chunk: prefix-stable
        chunk = v[start : start + _ROWS_PER_CHUNK]
        out += chunk @ block[: chunk.numel()].to(device=v.device, dtype=dtype)
    if kind == "gaussian":
        return out / math.sqrt(dim)
    return math.sqrt(2.0 / dim) * torch.cos(out + phase.to(device=v.device, dtype=dtype))


def random_feature_embedding(
    x: Tensor | nn.Module | Sequence[Tensor | nn.Module],
    *,
    dim: int = 256,
    seed: int = 0,
    kind: str = "gaussian",
) -> Tensor:
    """Embed an operator into R^dim with random features (paper §6).

    The parameters are flattened (a module contributes ``weight`` then ``bias``) and
    L2-normalized to v; then ``kind="gaussian"`` returns ``Gᵀv / √dim`` (Johnson–Lindenstrauss:
    inner products and distances of unit vectors are preserved in expectation) and
    ``kind="fourier"`` returns ``√(2/dim)·cos(Gᵀv + b)`` (random Fourier features of the
    Gaussian kernel exp(−‖v − v'‖²/2)), with G ~ N(0, 1) of shape (len(v), dim) and
    b ~ U[0, 2π). G is generated in float32 on the CPU from ``torch.Generator(seed)``,
    16384 rows at a time, so memory stays O(16384·dim) for any layer and the result depends
    only on (seed, dim, input length) — identical on every device, and an input padded with
    zeros embeds the same as the original.

    Args:
        x: a tensor, a module, or a list/tuple of them (embedded row by row).
        dim: embedding dimension (>= 1).
        seed: generator seed.
        kind: ``"gaussian"`` or ``"fourier"``.

    Returns:
        ``(dim,)`` for one input, ``(k, dim)`` for a list of k; float32 (float64 for float64
        input), on the input's device.

    Example:
        >>> w = torch.arange(12.0).reshape(3, 4)
        >>> e = random_feature_embedding(w, dim=8, seed=1)
        >>> e.shape, bool(torch.equal(e, random_feature_embedding(w, dim=8, seed=1)))
        (torch.Size([8]), True)
        >>> random_feature_embedding([torch.ones(5), torch.ones(7)], dim=16).shape
        torch.Size([2, 16])
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("x is an empty list; expected at least one tensor or module")
        rows = [
            _embed_one(_flatten(item, f"x[{i}]"), f"x[{i}]", dim, seed, kind)
            for i, item in enumerate(x)
        ]
        dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
        return torch.stack([r.to(dtype) for r in rows])
    return _embed_one(_flatten(x, "x"), "x", dim, seed, kind)
