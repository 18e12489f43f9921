"""Small, deterministic training and evaluation loops shared by the demo, tests and benchmarks."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from .data import batches

__all__ = ["train", "evaluate", "set_seed"]


def set_seed(seed: int) -> None:
    """Seed torch's CPU and CUDA generators."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool, **tqdm_kwargs: Any):
    """``iterable`` behind a tqdm bar when ``enabled`` (training, evaluation, the benchmark
    loops); extra keywords go to tqdm (default ``leave=False``)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc, **{"leave": False, **tqdm_kwargs})


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: float = 1.0,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    seed: int = 0,
    augment: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` with SGD + momentum and a one-cycle schedule; returns it in eval mode.

    ``epochs`` may be fractional (e.g. 0.5 for half an epoch). ``augment`` adds random
    horizontal flips and ±2-pixel shifts. Deterministic for a given seed on CPU.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    set_seed(seed)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    step, epoch = 0, 0

    def _stream():
        nonlocal epoch
        while True:
            for xb, yb in batches(x, y, batch_size=batch_size, shuffle=True, seed=seed + epoch):
                yield xb, yb
            epoch += 1

    for xb, yb in _progress(_stream(), total, "train", progress):
        if step >= total:
            break
        if augment:
            flip = torch.rand(xb.shape[0], generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(-2, -1))
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
    return model.eval()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on ``(x, y)``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    n_batches = math.ceil(x.shape[0] / batch_size)
    for xb, yb in _progress(batches(x, y, batch_size=batch_size), n_batches, "eval", progress):
        out = model(xb.to(device))
        correct += int((out.argmax(1).cpu() == yb).sum())
    model.train(was_training)
    return 100.0 * correct / max(1, x.shape[0])
