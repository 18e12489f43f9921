"""The README's main job: prune a real network on real data, spectral criterion vs magnitude.

Trains (or loads from the cache) the SmallCNN of SCIENCE.md §3 on all 60,000 Fashion-MNIST
training images, then removes 30 / 50 / 70 % of every layer's channels in one shot, no
fine-tuning, with four criteria through the same :func:`torch_qmprune.prune` pipeline, and
prints test accuracy on the 10,000 test images side by side.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import torch

from .data import load_fashion_mnist
from .structural import prune
from .training import evaluate
from .zoo import get_baseline

__all__ = ["run_demo", "DEMO_COLUMNS"]

#: column label -> prune() keyword arguments
DEMO_COLUMNS: dict[str, dict[str, Any]] = {
    "qm (ours: merge + BN)": dict(criterion="qm"),
    "L1 + our merge + BN": dict(criterion="l1"),
    "random + our merge + BN": dict(criterion="random"),
    "L1 (Torch-Pruning, plain)": dict(criterion="l1", compensate=False, recalibrate_bn=False),
}


def run_demo(
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7),
    *,
    calibration_size: int = 1024,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    echo: bool = True,
) -> dict[str, Any]:
    """Run the demo and return every number it printed (also as JSON-ready dict).

    Example:
        >>> out = run_demo((0.5,), train_limit=2000, test_limit=500, echo=False)  # doctest: +SKIP
        >>> sorted(out["results"]["0.5"])[:1]
        ['L1 (Torch-Pruning, plain)']
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    model, info = get_baseline("small_cnn", seed=seed, train_limit=train_limit, progress=progress)
    x, _ = load_fashion_mnist("train", limit=max(calibration_size, 1))
    xt, yt = load_fashion_mnist("test", limit=test_limit)
    calibration = x[:calibration_size]
    dense = evaluate(model, xt, yt)
    results: dict[str, dict[str, float]] = {}
    sizes: dict[str, dict[str, float]] = {}
    for ratio in ratios:
        row: dict[str, float] = {}
        for label, kwargs in DEMO_COLUMNS.items():
            pruned = copy.deepcopy(model)
            needs_cal = kwargs.get("compensate", True) or kwargs["criterion"] == "qm"
            report = prune(pruned, x[:1], ratio, calibration=calibration if needs_cal else None,
                           **kwargs)
            row[label] = evaluate(pruned, xt, yt)
            sizes[str(ratio)] = {"params": report.params_after, "macs": report.macs_after,
                                 "param_sparsity": report.param_sparsity}
        results[str(ratio)] = row
        if echo and progress:
            print(f"  pruned {int(100 * ratio)}% of channels ...", flush=True)
    out = {
        "dense_accuracy": dense,
        "baseline": info,
        "params_dense": sum(p.numel() for p in model.parameters()),
        "results": results,
        "sizes": sizes,
        "calibration_images": calibration_size,
        "test_images": int(xt.shape[0]),
        "seconds": time.perf_counter() - start,
    }
    if echo:
        print(format_demo_table(out))
    return out


def format_demo_table(out: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_demo` result."""
    labels = list(next(iter(out["results"].values())).keys())
    lines = [
        f"SmallCNN on Fashion-MNIST: dense test accuracy {out['dense_accuracy']:.2f} % "
        f"({out['params_dense']:,} params); one-shot, no fine-tuning, "
        f"{out['calibration_images']} calibration images, {out['test_images']} test images",
        "",
        "| channels removed | params left | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for ratio, row in out["results"].items():
        best = max(row.values())
        cells = [f"**{v:.2f}**" if v == best else f"{v:.2f}" for v in row.values()]
        size = out["sizes"][ratio]
        lines.append(f"| {float(ratio):.0%} | {size['params']:,} "
                     f"({1 - size['param_sparsity']:.0%}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"total {out['seconds']:.0f} s")
    return "\n".join(lines)


def demo_json(out: dict[str, Any]) -> str:
    return json.dumps(out, indent=2, default=str)
