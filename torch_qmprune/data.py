"""Real data for demos, tests and benchmarks: Fashion-MNIST read offline from its idx files.

The files come from the Debian package ``dataset-fashion-mnist`` (installed by the README's
set-up commands) under ``/usr/share/datasets/fashion-mnist``; ``QMPRUNE_FASHION_MNIST`` or the
``root`` argument points elsewhere (e.g. a folder of carried files on another machine).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["FASHION_MNIST_DIRS", "load_fashion_mnist", "batches", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_MEAN, _STD = 0.2860, 0.3530


def _find_root(root: str | os.PathLike | None) -> Path:
    candidates = (
        [root]
        if root is not None
        else [os.environ.get("QMPRUNE_FASHION_MNIST"), *FASHION_MNIST_DIRS]
    )
    for cand in candidates:
        if cand and (Path(cand) / "t10k-labels-idx1-ubyte.gz").exists():
            return Path(cand)
        if cand and (Path(cand) / "t10k-labels-idx1-ubyte").exists():
            return Path(cand)
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found in {[c for c in candidates if c]!r}; install them with "
        "`apt-get install -y dataset-fashion-mnist` or set QMPRUNE_FASHION_MNIST to their folder"
    )


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = magic & 0xFF
    if (magic >> 8) != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    payload = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8)
    return payload.reshape(dims)


def load_fashion_mnist(
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    limit: int | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load Fashion-MNIST as ``(images (N, 1, 28, 28) float32, labels (N,) int64)``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: folder with the idx files; default: ``$QMPRUNE_FASHION_MNIST`` then the Debian path.
        limit: keep only the first ``limit`` images (they are class-balanced enough for tests).
        normalize: standardize with the training set's mean and std.

    Example:
        >>> x, y = load_fashion_mnist("test", limit=8)   # doctest: +SKIP
        >>> x.shape, y.shape
        (torch.Size([8, 1, 28, 28]), torch.Size([8]))
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = _find_root(root)
    prefix = "train" if split == "train" else "t10k"
    files = {}
    for kind, suffix in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
        path = base / f"{prefix}-{suffix}.gz"
        files[kind] = path if path.exists() else base / f"{prefix}-{suffix}"
    images = _read_idx(files["images"])
    labels = _read_idx(files["labels"]).long()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = images.unsqueeze(1).float().div_(255.0)
    if normalize:
        x = (x - _MEAN) / _STD
    return x, labels


def batches(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    batch_size: int = 256,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Yield mini-batches of ``x`` (and ``y``), optionally shuffled with a seeded generator."""
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, n, batch_size):
        idx = (
            order[start : start + batch_size]
            if order is not None
            else slice(start, start + batch_size)
        )
        yield (x[idx], y[idx]) if y is not None else x[idx]
