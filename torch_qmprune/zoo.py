"""Trained baselines on Fashion-MNIST, cached on disk and re-trained when absent.

A checkpoint's file name encodes everything that produced it (model, epochs, seed, training
size), so a changed recipe never silently re-uses an old file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .data import load_fashion_mnist
from .models import resnet18_fmnist, small_cnn, small_vit
from .training import evaluate, set_seed, train

__all__ = ["BASELINES", "cache_dir", "checkpoint_path", "get_baseline", "is_cached"]

BASELINES = {
    "small_cnn": dict(builder=lambda: small_cnn(), epochs=1.0, lr=0.05, augment=False),
    "resnet18": dict(builder=lambda: resnet18_fmnist(stem_stride=1), epochs=8.0, lr=0.1,
                     augment=True),
    "resnet18_s2": dict(builder=lambda: resnet18_fmnist(stem_stride=2), epochs=4.0, lr=0.1,
                        augment=True),
    "vit": dict(builder=lambda: small_vit(), epochs=3.0, lr=0.05, augment=True),
}


def cache_dir() -> Path:
    """``$QMPRUNE_CACHE`` or ``~/.cache/torch_qmprune``."""
    path = Path(os.environ.get("QMPRUNE_CACHE", Path.home() / ".cache" / "torch_qmprune"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_path(name: str, *, seed: int = 0, epochs: float | None = None,
                    train_limit: int | None = None) -> Path:
    """The checkpoint file :func:`get_baseline` reads and writes for this recipe (its metadata
    is the ``.json`` beside it); the name encodes model, epochs, seed and training size."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(BASELINES)}")
    epochs = BASELINES[name]["epochs"] if epochs is None else epochs
    return cache_dir() / f"{name}_e{epochs:g}_s{seed}_n{train_limit or 'all'}.pt"


def is_cached(name: str, *, seed: int = 0, epochs: float | None = None,
              train_limit: int | None = None) -> bool:
    """Whether :func:`get_baseline` would load this recipe from disk instead of training."""
    ckpt = checkpoint_path(name, seed=seed, epochs=epochs, train_limit=train_limit)
    return ckpt.exists() and ckpt.with_suffix(".json").exists()


def get_baseline(
    name: str,
    *,
    seed: int = 0,
    epochs: float | None = None,
    train_limit: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    retrain: bool = False,
) -> tuple[nn.Module, dict]:
    """Return ``(model, info)``: a trained baseline from the cache, training it if needed.

    ``info`` holds the test accuracy, training time, recipe and the checkpoint path.

    Example:
        >>> model, info = get_baseline("small_cnn", train_limit=2000)   # doctest: +SKIP
        >>> info["test_accuracy"] > 70
        True
    """
    ckpt = checkpoint_path(name, seed=seed, epochs=epochs, train_limit=train_limit)
    meta = ckpt.with_suffix(".json")
    recipe = BASELINES[name]
    epochs = recipe["epochs"] if epochs is None else epochs
    set_seed(seed)
    model = recipe["builder"]()
    if ckpt.exists() and meta.exists() and not retrain:
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        return model.to(device).eval(), json.loads(meta.read_text())
    x, y = load_fashion_mnist("train", limit=train_limit)
    xt, yt = load_fashion_mnist("test")
    start = time.perf_counter()
    train(model.to(device), x, y, epochs=epochs, lr=recipe["lr"], seed=seed,
          augment=recipe["augment"], device=device, progress=progress)
    seconds = time.perf_counter() - start
    acc = evaluate(model, xt, yt, device=device)
    info = dict(name=name, seed=seed, epochs=epochs, train_limit=train_limit,
                test_accuracy=acc, train_seconds=seconds, device=str(device),
                checkpoint=str(ckpt))
    torch.save(model.state_dict(), ckpt)
    meta.write_text(json.dumps(info, indent=2))
    return model.eval(), info
