"""SpectralTracker overhead on ResNet-18 inference (arXiv 2512.00880 §3.3; issue #6 target: at
default settings at most 10 % throughput loss on CPU, i.e. a tracked / untracked ratio ≥ 0.90).

torchvision ResNet-18 (``weights=None``, seed 0, eval mode, ``torch.no_grad``) runs on real
images — Fashion-MNIST test images, grey level copied to 3 channels, resized to the input size
and normalized (random normal inputs if the idx files are missing) — once per input shape in
``--inputs``. Arms, all timed in the same process:

* ``untracked``;
* ``default`` — ``SpectralTracker(model)``: every Conv/Linear (21 modules), window 8 calls,
  one call in 4, at most 512 rows per call (stratified by image), float32 sums, records
  computed when read;
* ``every=2`` / ``every=1`` — the same, one call in 2 / every call;
* ``eager`` — the defaults, but every record computed when its window closes (ψ, redundancy,
  Bures angles: the cost of reading the tracker online);
* ``exact`` — every call, every row, float64 sums, eager records: the behaviour measured before
  (0.44× on SmallCNN).

Each repeat times ``--iters`` calls of every arm (one untimed warm-up call each, a fresh tracker
per tracked segment), the arm order rotating from repeat to repeat so that a drifting machine
load does not favour one arm. Two clocks: wall time, and the CPU time of the process
(``time.process_time``). With one intra-op thread (``--threads 1``, the default) CPU time is the
work the forward passes and hooks cost, and it is not inflated when a loaded machine takes the
core away — on a shared machine it is the reliable number; wall time is reported next to it.
Reported per arm and clock: ratio of the median segment times (untracked / arm) and the median
of the per-repeat paired ratios.

Honesty of the cheap estimates: on one window of the same ``window`` batches, each setting's ρ
of every module is compared with the exact one — d_FS of their spectral states, Bures angle and
relative Frobenius error — and with the same setting's ρ on a second, disjoint window of images
from the same distribution (the window-to-window fluctuation: the noise floor under a measured
drift d_FS,t). The cost of analysing
a window when it is read (all modules, ``WindowRecord.finalize``) is reported separately.

``--before FILE`` adds an arm ``before``: the ``SpectralTracker`` class of another version of
``torch_qmprune/dynamics.py`` at its own defaults, e.g.
``git show 3346ff6:torch_qmprune/dynamics.py > /tmp/dynamics_before.py``.

Run: ``python benchmarks/tracker_overhead.py --out docs/results/dynamics.overhead.json``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torch_qmprune.bench import environment, write_results
from torch_qmprune.dynamics import SpectralTracker, bures_angle
from torch_qmprune.spectral import fubini_study

ARMS = {
    "default": {},
    "every=2": {"every": 2},
    "every=1": {"every": 1},
    "eager": {"eager": True},
    "exact": {"every": 1, "max_rows": None, "product_dtype": torch.float64, "eager": True},
}


def parse_shape(text: str) -> tuple[int, int]:
    """``"8x224"`` -> (batch 8, 224×224 pixels)."""
    try:
        batch, size = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected BATCHxSIZE, e.g. 8x224, got {text!r}") from exc
    if batch < 1 or size < 16:
        raise argparse.ArgumentTypeError(f"bad input shape {text!r}")
    return batch, size


def make_batches(batch: int, size: int, count: int, seed: int) -> tuple[list[torch.Tensor], str]:
    """``count`` batches (3, size, size) of real Fashion-MNIST test images, else N(0, 1)."""
    try:
        from torch_qmprune.data import _MEAN, _STD, load_fashion_mnist

        x, _ = load_fashion_mnist("test", limit=batch * count, normalize=False)
        if x.shape[0] < batch * count:
            raise FileNotFoundError("too few images")
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = ((x - _MEAN) / _STD).expand(-1, 3, -1, -1).contiguous()
        source = "Fashion-MNIST test images (grey copied to 3 channels, bilinear resize)"
    except (FileNotFoundError, OSError):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch * count, 3, size, size, generator=gen)
        source = "random normal"
    return list(x.split(batch)), source


def load_tracker_class(path: Path) -> type:
    """``SpectralTracker`` from another copy of ``torch_qmprune/dynamics.py``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dynamics_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.SpectralTracker


def time_segment(model: torch.nn.Module, batches: list[torch.Tensor], iters: int,
                 tracker_kwargs: dict | None,
                 cls: type = SpectralTracker) -> tuple[tuple[float, float], SpectralTracker | None]:
    """(wall, CPU) seconds for ``iters`` calls (after one warm-up call), with a fresh tracker
    if asked."""
    tracker = cls(model, **tracker_kwargs) if tracker_kwargs is not None else None
    try:
        with torch.no_grad():
            model(batches[-1])
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(iters):
                model(batches[i % len(batches)])
            seconds = (time.perf_counter() - t0, time.process_time() - c0)
    finally:
        if tracker is not None:
            tracker.remove()
    return seconds, tracker


def honesty(model: torch.nn.Module, batches: list[torch.Tensor], window: int) -> dict:
    """For each setting: its ρ vs the exact ρ on the same window, and its window-to-window
    fluctuation (two disjoint windows of images from one distribution: the noise floor)."""
    def run(kwargs: dict, chunk: list[torch.Tensor]) -> SpectralTracker:
        with torch.no_grad(), SpectralTracker(model, **dict(kwargs, window=window)) as tr:
            for b in chunk:
                model(b)
        return tr

    first, second = batches[:window], batches[window:2 * window]
    exact_kw = dict(ARMS["exact"], eager=False)
    exact = run(exact_kw, first)
    out = {}
    for arm, kwargs in ARMS.items():
        if arm == "eager":  # same estimate as "default"
            continue
        one = exact if arm == "exact" else run(kwargs, first)
        two = run(exact_kw if arm == "exact" else kwargs, second)
        per_module = {}
        for name in exact.module_names:
            e, a, b = exact.history[name][0], one.history[name][0], two.history[name][0]
            per_module[name] = dict(
                dim=int(e.rho.shape[0]), rows=a.rows, rows_exact=e.rows,
                d_fs_vs_exact=float(fubini_study(a.state, e.state)),
                bures_vs_exact=bures_angle(a.rho, e.rho),
                rel_frobenius_vs_exact=float((a.rho - e.rho).norm() / e.rho.norm()),
                d_fs_window_to_window=float(fubini_study(b.state, a.state)),
                bures_window_to_window=bures_angle(b.rho, a.rho),
            )
        keys = ("d_fs_vs_exact", "bures_vs_exact", "rel_frobenius_vs_exact",
                "d_fs_window_to_window", "bures_window_to_window")
        summary = {k: {"median": statistics.median(v[k] for v in per_module.values()),
                       "max": max(v[k] for v in per_module.values())} for k in keys}
        out[arm] = {"per_module": per_module, "summary": summary}
    return out


def run_shape(model: torch.nn.Module, batch: int, size: int, args: argparse.Namespace) -> dict:
    window = 8
    batches, source = make_batches(batch, size, max(args.iters, 2 * window), args.seed)
    arms = ["untracked", *ARMS] + (["before"] if args.before is not None else [])
    before_cls = load_tracker_class(args.before) if args.before is not None else None
    times: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    analysis = []
    for r in range(args.repeats):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            if arm == "before":
                seconds, tracker = time_segment(model, batches, args.iters, {}, before_cls)
            else:
                kwargs = None if arm == "untracked" else ARMS[arm]
                seconds, tracker = time_segment(model, batches, args.iters, kwargs)
            times[arm].append(seconds[0])
            cpu[arm].append(seconds[1])
            if arm == "default" and tracker is not None:
                recs = [rec for hist in tracker.history.values() for rec in hist]
                if recs:
                    c0 = time.process_time()
                    for rec in recs:
                        rec.finalize()
                    windows = max(len(h) for h in tracker.history.values())
                    analysis.append((time.process_time() - c0) / windows)
        print(f"  repeat {r + 1}/{args.repeats} (wall / CPU s): "
              + ", ".join(f"{a} {times[a][-1]:.2f}/{cpu[a][-1]:.2f}" for a in arms), flush=True)
    base = statistics.median(cpu["untracked"])
    result = {"input": [batch, 3, size, size], "data": source, "iters": args.iters,
              "repeats": args.repeats, "wall_seconds": times, "cpu_seconds": cpu,
              "seconds_per_call_untracked": base / args.iters, "arms": {}}
    for arm in arms[1:]:
        entry = {"settings": ({k: str(v) for k, v in ARMS[arm].items()} if arm in ARMS
                              else {"class": str(args.before)})}
        for clock, data in (("cpu", cpu), ("wall", times)):
            paired = [b / t for b, t in zip(data["untracked"], data[arm])]
            entry[clock] = {
                "ratio_of_medians": statistics.median(data["untracked"])
                / statistics.median(data[arm]),
                "median_paired_ratio": statistics.median(paired),
                "paired_ratios": paired,
            }
        result["arms"][arm] = entry
    window_seconds = window * base / args.iters  # CPU seconds of one untracked window
    result["analysis_seconds_per_window"] = statistics.median(analysis) if analysis else None
    result["untracked_seconds_per_window"] = window_seconds
    result["honesty"] = honesty(model, batches, window)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--inputs", nargs="+", type=parse_shape, default=[(8, 224), (256, 28)],
                   help="BATCHxSIZE input shapes (3 channels)")
    p.add_argument("--iters", type=int, default=8, help="timed calls per segment (one window)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds per arm")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--before", type=Path, default=None, help="another dynamics.py whose "
                   "SpectralTracker (at its defaults) is timed as arm 'before'")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = p.parse_args(argv)
    if args.iters < 1 or args.repeats < 1:
        p.error("--iters and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    import torchvision

    torch.manual_seed(args.seed)
    env = environment("cpu")
    model = torchvision.models.resnet18(weights=None).eval()
    start = time.perf_counter()
    shapes = {}
    for batch, size in args.inputs:
        key = f"{batch}x3x{size}x{size}"
        print(f"[{key}]", flush=True)
        shapes[key] = run_shape(model, batch, size, args)
    print()
    print("| input | arm | CPU time: ratio of medians | CPU: median paired | wall: ratio of "
          "medians | wall: median paired |")
    print("|---|---|---|---|---|---|")
    for key, res in shapes.items():
        for arm, r in res["arms"].items():
            print(f"| {key} | {arm} | {r['cpu']['ratio_of_medians']:.3f} | "
                  f"{r['cpu']['median_paired_ratio']:.3f} | "
                  f"{r['wall']['ratio_of_medians']:.3f} | {r['wall']['median_paired_ratio']:.3f} |")
    print()
    print("| input | setting | d_FS to exact ρ (median / max over modules) | window-to-window "
          "d_FS (median): noise floor |")
    print("|---|---|---|---|")
    for key, res in shapes.items():
        for arm, h in res["honesty"].items():
            sm = h["summary"]
            print(f"| {key} | {arm} | {sm['d_fs_vs_exact']['median']:.4f} / "
                  f"{sm['d_fs_vs_exact']['max']:.4f} | "
                  f"{sm['d_fs_window_to_window']['median']:.4f} |")
    for key, res in shapes.items():
        cost = res["analysis_seconds_per_window"]
        print(f"{key}: untracked {res['seconds_per_call_untracked'] * 1e3:.0f} ms/call; "
              "analysis of one window when read (all modules) "
              + ("n/a (no window closed: --iters < 8)" if cost is None else f"{cost:.2f}s")
              + f" vs {res['untracked_seconds_per_window']:.2f}s of inference (CPU time)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = dict(
        config=vars(args),  # write_results writes paths as text
        shapes=shapes, seconds=time.perf_counter() - start,
        env={**env, "processor": env["cpu_model"], "threads": torch.get_num_threads(),
             "loadavg_end": load},
    )
    if args.out is not None:
        print(f"wrote {write_results(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
