"""Calibration statistics: streamed input Gram matrices of every Conv/Linear, from forward hooks.

The Gram of a layer's input, normalized to unit trace, is the layer's activation density matrix
ρ (paper §3.2); its inverse gives each channel's residual against its siblings, i.e. the
Fubini–Study distance of the channel's activation state to the span of the others. Activations
are never stored: each batch adds ``XᵀX`` (float64) and is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = ["InputGram", "CalibrationStats", "collect_input_grams", "iter_calibration",
           "recalibrate_batchnorm"]

#: Layers whose input dimension exceeds this are skipped (their Gram would not fit comfortably).
MAX_GRAM_DIM = 16384


@dataclass
class InputGram:
    """Running ``[X, 1]ᵀ[X, 1]`` of one layer's input features (last row/col: the constant)."""

    gram: torch.Tensor
    count: int = 0

    @property
    def dim(self) -> int:
        return self.gram.shape[0] - 1

    def density_matrix(self) -> torch.Tensor:
        """ρ = G / tr G over the features (constant excluded), float64."""
        g = self.gram[:-1, :-1]
        return g / g.diagonal().sum().clamp_min(torch.finfo(g.dtype).tiny)


@dataclass
class CalibrationStats:
    """Input Grams keyed by module, plus how they were gathered."""

    grams: dict[nn.Module, InputGram] = field(default_factory=dict)
    names: dict[nn.Module, str] = field(default_factory=dict)
    n_samples: int = 0
    n_batches: int = 0
    seconds: float = 0.0

    def get(self, module: nn.Module) -> InputGram | None:
        return self.grams.get(module)


def _features(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Rows = samples (pixels count as samples for convolutions), columns = input channels."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1 or module.transposed:
            return None
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return None


def iter_calibration(calibration: Any, max_batches: int | None = None) -> Iterable[Any]:
    """Yield model inputs from a tensor (split in batches of 256), an iterable of tensors, or
    an iterable of ``(inputs, targets)`` pairs / dicts (the inputs are taken)."""
    if calibration is None:
        return
    if isinstance(calibration, torch.Tensor):
        calibration = calibration.split(256)
    for i, batch in enumerate(calibration):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        yield batch


def _forward(model: nn.Module, batch: Any, device: torch.device | None = None) -> Any:
    """Call ``model`` on one batch: a dict is keyword arguments, a tuple/list positional ones,
    anything else the single input; tensors move to ``device`` when it is given. The one home
    of this rule (calibration, hardware timing and low-rank error checks all use it)."""

    def move(v: Any) -> Any:
        return v.to(device) if device is not None and torch.is_tensor(v) else v

    if isinstance(batch, Mapping):
        return model(**{k: move(v) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return model(*(move(v) for v in batch))
    return model(move(batch))


@torch.no_grad()
def collect_input_grams(
    model: nn.Module,
    calibration: Any,
    *,
    modules: Iterable[nn.Module] | None = None,
    max_batches: int | None = None,
    device: torch.device | None = None,
) -> CalibrationStats:
    """One forward pass over ``calibration`` accumulating every Conv/Linear input Gram.

    Args:
        model: the network (put in eval mode for the pass, restored after).
        calibration: tensor, iterable of tensors, or iterable of ``(x, y)`` pairs.
        modules: restrict to these layers (default: every ungrouped Conv and every Linear).
        max_batches: stop after this many batches.
        device: move batches here (default: leave them where they are).

    Returns:
        :class:`CalibrationStats` with one :class:`InputGram` per hooked layer.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> stats = collect_input_grams(net, torch.randn(64, 4))
        >>> stats.grams[net[2]].gram.shape, stats.grams[net[2]].count
        (torch.Size([4, 4]), 64)
    """
    names = {m: n for n, m in model.named_modules()}
    targets = list(modules) if modules is not None else [
        m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    stats = CalibrationStats(names={m: names.get(m, "") for m in targets})
    handles = []

    def hook(module: nn.Module, args: tuple) -> None:
        if not args or not torch.is_tensor(args[0]):
            return
        feats = _features(module, args[0].detach())
        if feats is None or feats.shape[1] > MAX_GRAM_DIM:
            return
        feats = feats.float()
        ones = torch.ones(feats.shape[0], 1, dtype=feats.dtype, device=feats.device)
        aug = torch.cat([feats, ones], dim=1)
        g = (aug.T @ aug).double()
        entry = stats.grams.get(module)
        if entry is None:
            stats.grams[module] = InputGram(gram=g, count=feats.shape[0])
        else:
            entry.gram += g
            entry.count += feats.shape[0]

    for m in targets:
        handles.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for batch in iter_calibration(calibration, max_batches):
            _forward(model, batch, device)
            stats.n_batches += 1
            first = batch if torch.is_tensor(batch) else next(
                (v for v in (batch.values() if isinstance(batch, dict) else [])), None)
            stats.n_samples += int(first.shape[0]) if torch.is_tensor(first) else 0
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats.seconds = time.perf_counter() - start
    if stats.n_batches == 0:
        raise ValueError("calibration yielded no batches; pass a tensor or an iterable of batches")
    return stats


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calibration: Any, *, max_batches: int | None = None,
                          device: torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running mean/var on ``calibration`` (cumulative average).

    Returns the number of BatchNorm layers reset. The model comes back in its original mode.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
        >>> recalibrate_batchnorm(net, torch.randn(8, 1, 5, 5))
        1
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = {m: m.momentum for m in bns}
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for batch in iter_calibration(calibration, max_batches):
            _forward(model, batch, device)
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        model.train(was_training)
    return len(bns)
