"""Benchmark harness: the paper's Table 1 measured, and the cost of spectral scoring.

Two sub-commands, runnable as ``python -m torch_qmprune.bench ...`` (and ``qmprune bench ...``):

``table1``
    Test accuracy of a trained Fashion-MNIST baseline after one-shot structured pruning at the
    paper's parameter sparsities (fraction of *parameters* removed, ``prune(target="params")``)
    or at MACs speed-ups, for every criterion, in three pipeline variants so that the
    criterion's own share is visible (SCIENCE.md §3):

    * ``plain``    – ``compensate=False, recalibrate_bn=False``: what Torch-Pruning users get;
    * ``bn``       – ``compensate=False`` + BatchNorm re-estimation on the calibration set;
    * ``merge+bn`` – least-squares merging of pruned channels into their siblings + BatchNorm
      re-estimation: the library's default pipeline.

    Optionally each pruned model is fine-tuned for a short fixed budget with several seeds
    (mean ± std). Writes ``table1.json`` (every number, seeds, versions, hardware, wall times,
    the command line), ``table1.md`` (the paper's Table 1 layout, the paper's *approximated*
    numbers beside, and an automatic "where we lose" paragraph) and ``table1.png``.

``speed``
    Scoring time of :class:`~torch_qmprune.SpectralImportance` against Torch-Pruning's
    ``GroupMagnitudeImportance`` on torchvision ResNets, the calibration pass of ``"qm"`` as a
    multiple of a plain forward pass, whole :func:`~torch_qmprune.prune` time against
    ``prune(criterion="l1", compensate=False)``, and real CPU (and CUDA) latency of the pruned
    model against the dense one, beside the MACs ratio. Writes ``speed.json`` and ``speed.md``.

Implementation note on ``target="params"``: with per-layer (local) pruning every criterion
removes the same number of channels from every layer, so the channel ratio that reaches a
parameter (or MACs) target does not depend on the criterion. The harness solves it once per
level with ``prune(target=...)`` and then prunes every criterion at that channel ratio; the
parameter sparsity reached by every run is recorded in the JSON and checked.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .training import _progress as _training_progress

__all__ = ["main", "build_parser", "run_table1", "run_speed", "PAPER_TABLE1", "VARIANTS",
           "TP_BUILTINS", "DEFAULT_CRITERIA", "render_table1_md", "where_we_lose", "environment",
           "write_results"]

#: The paper's Table 1 (ResNet-18, "approximated based on the FS distance and the remaining
#: parameter ratio" — not measured), keyed by parameter sparsity.
PAPER_TABLE1: dict[str, dict[float, float]] = {
    "QM-FRG": {0.5: 67.26, 0.7: 64.26, 0.9: 61.26, 0.95: 60.51},
    "magnitude": {0.5: 62.50, 0.7: 57.50, 0.9: 52.50, 0.95: 51.25},
    "random": {0.5: 60.00, 0.7: 54.00, 0.9: 48.00, 0.95: 46.50},
}
VARIANTS = ("plain", "bn", "merge+bn")
VARIANT_HELP = {
    "plain": "compensate=False, recalibrate_bn=False (what Torch-Pruning users get)",
    "bn": "compensate=False, BatchNorm statistics re-estimated on the calibration set",
    "merge+bn": "least-squares merge of every pruned channel into its siblings + BatchNorm "
                "re-estimation (torch_qmprune's default pipeline)",
}
TP_BUILTINS = ("l1", "l2", "fpgm", "lamp", "taylor")
DEFAULT_CRITERIA = "qm,literal,l1,l2,fpgm,lamp,taylor,random"
#: Criteria whose ranking does not depend on the seed (one one-shot run is enough).
STOCHASTIC_CRITERIA = ("random",)
TABLE1_MODELS = ("small_cnn", "resnet18_s2", "resnet18")
GPU_TABLE1_COMMAND = ("python -m torch_qmprune.bench table1 --model resnet18 --device cuda "
                      "--finetune-epochs 1 --seeds 0,1,2 --out docs/results/gpu_resnet18")


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated numbers, got {text!r}") \
            from exc
    return values


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") \
            from exc


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    """The training bar, kept on screen when done (a benchmark's overall progress)."""
    return _training_progress(iterable, total, desc, enabled, leave=True, dynamic_ncols=True)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _dist_version(dist: str, fallback: str) -> str:
    """Installed distribution version (torch_pruning's ``__version__`` lags its releases)."""
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - metadata missing in odd installs
        return fallback


def _source_fingerprint() -> dict[str, str]:
    """sha256 (first 12 hex digits) of the library's pruning sources, so that results can be
    matched to the code that produced them while the code is still changing."""
    import hashlib

    root = Path(__file__).resolve().parent
    out = {}
    for name in ("structural.py", "importance.py", "calibration.py", "methods.py", "bench.py"):
        path = root / name
        if path.exists():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return out


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware, for every results file."""
    import torch_pruning as tp

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_pruning": _dist_version("torch-pruning", getattr(tp, "__version__", "unknown")),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    with contextlib.suppress(OSError):
        env["load_average_at_start"] = list(os.getloadavg())
    env["library_sources"] = _source_fingerprint()
    return env


def command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:]) if argv is None else list(argv)
    return "python -m torch_qmprune.bench " + " ".join(shlex.quote(a) for a in args)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _cell(values: Sequence[float] | None, show_std: bool) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    if show_std and len(values) > 1:
        return f"{mean:.2f} ± {std:.2f}"
    return f"{mean:.2f}"


def _load(env: dict[str, Any], when: str) -> str:
    value = env.get(f"load_average_at_{when}")
    return f"{value[0]:.1f}" if value else "?"


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a results file: ``payload`` as indented JSON (values JSON cannot hold, such as
    paths, as their ``str``), creating the parent folders; written to a temporary file beside
    it and renamed, so that an interrupted run never leaves a half-written file. Returns the
    path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], repeats: int, device: torch.device | None = None,
                 warmup: int = 0) -> tuple[float, list[float]]:
    dev = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


# ---------------------------------------------------------------------------------------------
# table1
# ---------------------------------------------------------------------------------------------


def _levels(sparsities: Sequence[float], speedups: Sequence[float]) -> list[dict[str, Any]]:
    levels = []
    for s in sparsities:
        if not 0 < s < 1:
            raise ValueError(f"--sparsity values must be in (0, 1), got {s}")
        levels.append(dict(key=f"s{s:g}", label=f"{s:g}", target="params", value=s, ratio=s))
    for x in speedups:
        if x <= 1:
            raise ValueError(f"--macs-speedups values must be > 1, got {x}")
        levels.append(dict(key=f"macs{x:g}x", label=f"{x:g}× MACs", target="macs", value=x,
                           ratio=1.0 - 1.0 / x))
    if not levels:
        raise ValueError("give at least one --sparsity or --macs-speedups level")
    return levels


def _calibration_batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int,
                         batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A seeded random subset of the training set, as labelled batches (Taylor needs labels)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(x.shape[0], generator=gen)[: min(size, x.shape[0])]
    xs, ys = x[idx], y[idx]
    return list(zip(xs.split(batch_size), ys.split(batch_size)))


def run_table1(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the ``table1`` benchmark described by parsed ``args``; returns the JSON payload."""
    from .calibration import recalibrate_batchnorm
    from .data import load_fashion_mnist
    from .structural import QM_CRITERIA, TP_CRITERIA, prune
    from .training import evaluate, set_seed, train
    from .zoo import BASELINES, checkpoint_path, get_baseline

    started = time.perf_counter()
    device = torch.device(args.device)
    criteria = _names(args.criteria)
    for c in criteria:
        if c not in QM_CRITERIA + TP_CRITERIA:
            raise ValueError(f"unknown criterion {c!r}; expected some of "
                             f"{QM_CRITERIA + TP_CRITERIA}")
    variants = _names(args.variants)
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; expected some of {VARIANTS}")
    ft_variants = [v for v in _names(args.finetune_variants) if v in variants]
    ft_criteria = criteria if args.finetune_criteria == "all" else [
        c for c in _names(args.finetune_criteria) if c in criteria]
    ft_levels = None if args.finetune_levels == "all" else {
        f"s{v:g}" for v in _floats(args.finetune_levels, "--finetune-levels")}
    seeds = _ints(args.seeds, "--seeds")
    levels = _levels(_floats(args.sparsity, "--sparsity") if args.sparsity else [],
                     _floats(args.macs_speedups, "--macs-speedups") if args.macs_speedups else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    ckpt = checkpoint_path(args.model, seed=args.baseline_seed, epochs=args.baseline_epochs,
                           train_limit=args.train_limit)
    if args.require_cached and not ckpt.exists():
        raise FileNotFoundError(f"baseline checkpoint {ckpt} is not in the cache and "
                                "--require-cached forbids training it here")
    model, info = get_baseline(args.model, seed=args.baseline_seed, epochs=args.baseline_epochs,
                               train_limit=args.train_limit, device=device, progress=progress)
    model = model.to(device).eval()
    x_train, y_train = load_fashion_mnist("train", limit=args.train_limit)
    x_test, y_test = load_fashion_mnist("test", limit=args.test_limit)
    calib = _calibration_batches(x_train, y_train, args.calibration_size, args.baseline_seed)
    example = x_train[:1].to(device)
    t0 = time.perf_counter()
    dense_acc = evaluate(model, x_test, y_test, device=device)
    dense_eval_s = time.perf_counter() - t0
    augment = bool(BASELINES[args.model]["augment"])

    payload: dict[str, Any] = {
        "benchmark": "table1",
        "command": command_line(argv),
        "environment": environment(str(device)),
        "config": {
            "model": args.model, "criteria": criteria, "variants": variants,
            "variant_definitions": {v: VARIANT_HELP[v] for v in variants},
            "levels": levels, "seeds": seeds, "finetune_epochs": args.finetune_epochs,
            "finetune_lr": args.finetune_lr, "finetune_variants": ft_variants,
            "finetune_criteria": ft_criteria if args.finetune_epochs > 0 else [],
            "finetune_levels": "all" if ft_levels is None else sorted(ft_levels),
            "finetune_augment": augment,
            "calibration_size": len(torch.cat([b[0] for b in calib])),
            "calibration_source": "seeded random subset of the training images used for "
                                  "training (batches of 128, labels kept for Taylor)",
            "train_images": int(x_train.shape[0]), "test_images": int(x_test.shape[0]),
            "baseline_seed": args.baseline_seed, "pruning": "local (per layer), last Linear "
                                                            "ignored, Torch-Pruning BasePruner",
            "bn_variant_note": "the 'bn' model is the 'plain' model followed by "
                               "recalibrate_batchnorm on the same calibration batches, which "
                               "is exactly the last step prune(recalibrate_bn=True) performs",
        },
        "baseline": info | {"dense_test_accuracy": dense_acc, "dense_eval_seconds": dense_eval_s},
        "paper_table1_approximated": {k: {str(s): v for s, v in row.items()}
                                      for k, row in PAPER_TABLE1.items()},
        "levels": {},
        "results": {v: {c: {} for c in criteria} for v in variants},
        "runs": [],
        "errors": [],
    }

    # number of prune jobs (for the progress bar): per level, per criterion, per seed-run
    def prune_seeds(c: str) -> list[int]:
        return seeds if c in STOCHASTIC_CRITERIA else seeds[:1]

    jobs = [(lv, c, s) for lv in levels for c in criteria for s in prune_seeds(c)]
    bar = _progress(range(len(jobs)), len(jobs), f"table1 {args.model}", progress)
    bar_iter = iter(bar)

    def record(variant: str, crit: str, level: dict, phase: str, seed: int, acc: float) -> None:
        cell = payload["results"][variant][crit].setdefault(level["key"], {})
        slot = cell.setdefault(phase, {"values": [], "seeds": []})
        slot["values"].append(acc)
        slot["seeds"].append(seed)
        mean, std = _mean_std(slot["values"])
        slot["mean"], slot["std"], slot["n"] = mean, std, len(slot["values"])

    def finetune_eval(pruned: nn.Module, seed: int) -> tuple[float, float]:
        net = copy.deepcopy(pruned)
        t = time.perf_counter()
        train(net, x_train, y_train, epochs=args.finetune_epochs, lr=args.finetune_lr,
              seed=seed, augment=augment, device=device)
        acc = evaluate(net, x_test, y_test, device=device)
        return acc, time.perf_counter() - t

    for level in levels:
        # solve the channel ratio of this level once (criterion-independent, see module doc)
        t = time.perf_counter()
        probe = copy.deepcopy(model)
        try:
            rep = prune(probe, example, level["ratio"], target=level["target"], criterion="l1",
                        compensate=False, recalibrate_bn=False)
        except ValueError as exc:
            payload["errors"].append({"level": level["key"], "error": str(exc)})
            payload["levels"][level["key"]] = level | {"unreachable": str(exc)}
            for _ in range(sum(len(prune_seeds(c)) for c in criteria)):
                next(bar_iter, None)
            continue
        del probe
        channel_ratio = rep.channel_ratio
        payload["levels"][level["key"]] = level | {
            "channel_ratio": channel_ratio, "param_sparsity": rep.param_sparsity,
            "macs_speedup": rep.macs_speedup, "params_before": rep.params_before,
            "params_after": rep.params_after, "macs_before": rep.macs_before,
            "macs_after": rep.macs_after, "solve_seconds": time.perf_counter() - t}
        for crit in criteria:
            for seed in prune_seeds(crit):
                next(bar_iter, None)
                pruned_models: dict[str, nn.Module] = {}
                need_plain = "plain" in variants or "bn" in variants
                for variant in ("plain", "merge+bn"):
                    if variant == "plain" and not need_plain:
                        continue
                    if variant == "merge+bn" and "merge+bn" not in variants:
                        continue
                    net = copy.deepcopy(model)
                    set_seed(seed)
                    t = time.perf_counter()
                    try:
                        report = prune(net, example, channel_ratio, target="channels",
                                       criterion=crit, calibration=calib,
                                       compensate=(variant == "merge+bn"),
                                       recalibrate_bn=(variant == "merge+bn"), device=device)
                    except Exception as exc:  # noqa: BLE001 - recorded, the table goes on
                        payload["errors"].append({"level": level["key"], "criterion": crit,
                                                  "variant": variant, "seed": seed,
                                                  "error": f"{type(exc).__name__}: {exc}"})
                        continue
                    prune_s = time.perf_counter() - t
                    if abs(report.param_sparsity - rep.param_sparsity) > 1e-6:
                        payload["errors"].append({
                            "level": level["key"], "criterion": crit, "variant": variant,
                            "warning": f"parameter sparsity {report.param_sparsity:.6f} differs "
                                       f"from the solved {rep.param_sparsity:.6f}"})
                    runs = [(variant, net, prune_s)]
                    if variant == "plain" and "bn" in variants:
                        bn_net = copy.deepcopy(net)
                        t = time.perf_counter()
                        recalibrate_batchnorm(bn_net, calib, device=device)
                        runs.append(("bn", bn_net, prune_s + time.perf_counter() - t))
                    for name, m, secs in runs:
                        if name not in variants:
                            continue
                        t = time.perf_counter()
                        acc = evaluate(m, x_test, y_test, device=device)
                        eval_s = time.perf_counter() - t
                        record(name, crit, level, "oneshot", seed, acc)
                        rdict = report.to_dict()
                        rdict.pop("layers", None)
                        payload["runs"].append({
                            "level": level["key"], "criterion": crit, "variant": name,
                            "seed": seed, "phase": "oneshot", "accuracy": acc,
                            "prune_seconds": secs, "eval_seconds": eval_s, "report": rdict})
                        pruned_models[name] = m
                # fine-tuning: one run per seed (stochastic criteria: the seed of their pruning)
                if args.finetune_epochs > 0 and crit in ft_criteria and (
                        ft_levels is None or level["key"] in ft_levels):
                    ft_seeds = [seed] if crit in STOCHASTIC_CRITERIA else seeds
                    for name in ft_variants:
                        if name not in pruned_models:
                            continue
                        for s in ft_seeds:
                            acc, secs = finetune_eval(pruned_models[name], s)
                            record(name, crit, level, "finetuned", s, acc)
                            payload["runs"].append({
                                "level": level["key"], "criterion": crit, "variant": name,
                                "seed": s, "phase": "finetuned", "accuracy": acc,
                                "finetune_epochs": args.finetune_epochs,
                                "finetune_and_eval_seconds": secs})
                payload["wall_seconds"] = time.perf_counter() - started
                write_results(out / f"{args.name}.json", payload)
    for _ in bar_iter:
        pass
    if hasattr(bar, "close"):
        bar.close()
    payload["wall_seconds"] = time.perf_counter() - started
    with contextlib.suppress(OSError):
        payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    payload["where_we_lose"] = where_we_lose(payload)
    write_results(out / f"{args.name}.json", payload)
    md = render_table1_md(payload)
    (out / f"{args.name}.md").write_text(md)
    plot_table1(payload, out / f"{args.name}.png")
    return payload


def _values(payload: dict, variant: str, crit: str, level_key: str, phase: str) -> list[float]:
    return (payload["results"].get(variant, {}).get(crit, {}).get(level_key, {})
            .get(phase, {}).get("values", []))


def where_we_lose(payload: dict[str, Any], ours: str = "qm") -> list[dict[str, Any]]:
    """Every (variant, phase, level) where ``ours`` is below the best Torch-Pruning built-in
    of the same variant, with the gap in accuracy points (mean over seeds)."""
    losses = []
    crits = payload["config"]["criteria"]
    builtins = [c for c in TP_BUILTINS if c in crits]
    if ours not in crits or not builtins:
        return losses
    for variant in payload["config"]["variants"]:
        for phase in ("oneshot", "finetuned"):
            for key in payload["levels"]:
                mine = _values(payload, variant, ours, key, phase)
                if not mine:
                    continue
                best, best_c, best_std = -math.inf, None, 0.0
                for c in builtins:
                    vals = _values(payload, variant, c, key, phase)
                    if vals and _mean_std(vals)[0] > best:
                        best, best_c, best_std = _mean_std(vals)[0], c, _mean_std(vals)[1]
                if best_c is None:
                    continue
                m, sd = _mean_std(mine)
                if m < best:
                    losses.append({"variant": variant, "phase": phase, "level": key,
                                   "ours": m, "ours_std": sd, "best_builtin": best_c,
                                   "best": best, "best_std": best_std, "gap": best - m})
    return losses


def _identical_criteria(payload: dict[str, Any]) -> list[list[str]]:
    """Groups of criteria whose every measured value is identical (e.g. l2 and lamp)."""
    crits = payload["config"]["criteria"]

    def signature(c: str) -> str:
        return json.dumps({v: {k: {ph: x.get("values") for ph, x in cell.items()}
                               for k, cell in payload["results"][v][c].items()}
                           for v in payload["config"]["variants"]}, sort_keys=True)

    groups: dict[str, list[str]] = {}
    for c in crits:
        if c not in STOCHASTIC_CRITERIA:
            groups.setdefault(signature(c), []).append(c)
    return [g for g in groups.values() if len(g) > 1]


def _level_label(payload: dict, key: str) -> str:
    lv = payload["levels"][key]
    return lv["label"] if lv.get("target") == "macs" else f"s = {lv['label']}"


def render_table1_md(payload: dict[str, Any]) -> str:
    """The Markdown page of a ``table1`` payload (Table 1 layout per variant)."""
    cfg, env, base = payload["config"], payload["environment"], payload["baseline"]
    keys = [k for k, lv in payload["levels"].items() if "unreachable" not in lv]
    crits = cfg["criteria"]
    model = cfg["model"]
    lines = [f"# Table 1 measured: {model} on Fashion-MNIST", ""]
    lines += [
        f"Dense baseline: **{base['dense_test_accuracy']:.2f} %** test accuracy on "
        f"{cfg['test_images']:,} test images ({model}, {base.get('epochs')} epoch(s) of "
        f"training on {cfg['train_images']:,} images, seed {cfg['baseline_seed']}). "
        "Cells are top-1 test accuracy (%) after pruning. Sparsity is the fraction of "
        "**parameters** removed (the paper's definition, `prune(target=\"params\")`); per-layer "
        "(local) channel pruning with Torch-Pruning 1.6.1's dependency graph, last Linear kept.",
        "",
        f"Calibration: {cfg['calibration_size']} training images (criterion scores, merge, "
        "BatchNorm re-estimation and Taylor gradients all use the same batches). "
        "Deterministic criteria are pruned once; `random` is pruned once per seed "
        f"({', '.join(map(str, cfg['seeds']))}) and shown as mean ± std.",
        "",
        "Variants (the same pipeline for every criterion, so the criterion's own share is "
        "visible):",
        "",
    ]
    lines += [f"* **{v}**: {VARIANT_HELP[v]}" for v in cfg["variants"]]
    lines += [""]
    if cfg["finetune_epochs"] > 0:
        lines += [
            f"Fine-tuned: {cfg['finetune_epochs']:g} epoch of SGD (lr {cfg['finetune_lr']:g}, "
            "one-cycle, same recipe as the baseline) on the training set, one run per seed "
            f"({', '.join(map(str, cfg['seeds']))}), mean ± std; fine-tuned for variants "
            f"{', '.join(cfg['finetune_variants'])} and criteria "
            f"{', '.join(cfg['finetune_criteria'])}"
            + ("" if set(cfg["finetune_criteria"]) == set(crits) else
               f" (not fine-tuned, to stay in the compute budget: "
               f"{', '.join(c for c in crits if c not in cfg['finetune_criteria'])})")
            + ("" if cfg.get("finetune_levels", "all") == "all" else
               f", at sparsity levels {', '.join(k[1:] for k in cfg['finetune_levels'])} only")
            + ".", ""]
    # level facts
    lines += ["| level | channel ratio per layer | parameters removed | MACs speed-up |",
              "|---|---|---|---|"]
    for k in keys:
        lv = payload["levels"][k]
        lines.append(f"| {_level_label(payload, k)} | {lv['channel_ratio']:.3f} | "
                     f"{100 * lv['param_sparsity']:.1f} % | {lv['macs_speedup']:.2f}× |")
    for lv in payload["levels"].values():
        if "unreachable" in lv:
            lines.append(f"| {lv['label']} | unreachable: {lv['unreachable']} | | |")
    lines.append("")

    paper_keys = {k: payload["levels"][k]["value"] for k in keys
                  if payload["levels"][k]["target"] == "params"}

    def paper_rows(cols: Sequence[str]) -> list[str]:
        rows = []
        for name, row in PAPER_TABLE1.items():
            cells = []
            for k in cols:
                v = paper_keys.get(k)
                cells.append(f"*{row[v]:.2f}*" if v in row else "")
            rows.append(f"| *paper {name} (ResNet-18, approximated)* | " + " | ".join(cells) + " |")
        return rows

    for phase, title in (("oneshot", "one-shot (no fine-tuning)"),
                         ("finetuned", f"after {cfg['finetune_epochs']:g} epoch of fine-tuning")):
        pkeys = [k for k in keys if any(_values(payload, v, c, k, phase)
                                        for v in cfg["variants"] for c in crits)]
        header = "| criterion | " + " | ".join(_level_label(payload, k) for k in pkeys) + " |"
        sep = "|---|" + "---|" * len(pkeys)
        for variant in cfg["variants"]:
            rows = []
            for c in crits:
                vals = [_values(payload, variant, c, k, phase) for k in pkeys]
                if not any(vals):
                    continue
                best_here = []
                for j, k in enumerate(pkeys):
                    col = [_mean_std(_values(payload, variant, cc, k, phase))[0] for cc in crits
                           if _values(payload, variant, cc, k, phase)]
                    best_here.append(bool(vals[j]) and col and
                                     _mean_std(vals[j])[0] >= max(col) - 1e-9)
                cells = []
                for j, v in enumerate(vals):
                    text = _cell(v, show_std=True)
                    cells.append(f"**{text}**" if best_here[j] else text)
                label = "qm (ours, default)" if c == "qm" else c
                rows.append(f"| {label} | " + " | ".join(cells) + " |")
            if not rows:
                continue
            lines += [f"## {variant} — {title}", "", header, sep, *rows]
            if phase == "oneshot" and paper_keys:
                lines += paper_rows(pkeys)
            lines.append("")
    same = _identical_criteria(payload)
    if same:
        pairs = "; ".join(" = ".join(group) for group in same)
        lines += [f"Identical in every cell: {pairs}."
                  + (" With per-layer pruning LAMP's score is a monotone function of the "
                     "squared L2 magnitude within each layer, so it removes the same channels as "
                     "L2." if any({"l2", "lamp"} <= set(g) for g in same) else ""), ""]
    lines += ["Bold: best measured criterion of the column. *Italic*: the paper's Table 1 "
              "(ResNet-18; the paper says these accuracies were \"approximated based on the FS "
              "distance and the remaining parameter ratio\" — they were not measured, and the "
              "paper's network and dataset differ from this one; quoted for reference only).",
              ""]
    # where we lose
    lines += ["## Where we lose", ""]
    losses = payload.get("where_we_lose") or where_we_lose(payload)
    builtins = [c for c in TP_BUILTINS if c in crits]
    if "qm" not in crits or not builtins:
        lines += ["(not computed: needs `qm` and at least one Torch-Pruning built-in among the "
                  "criteria)", ""]
    elif not losses:
        lines += [f"Nowhere: in every measured cell, `qm` is at or above the best Torch-Pruning "
                  f"built-in ({', '.join(builtins)}) of the same variant.", ""]
    else:
        lines += [f"Every cell where the default criterion `qm` is below the best Torch-Pruning "
                  f"built-in ({', '.join(builtins)}) of the **same variant** (means over seeds; "
                  "fine-tuned gaps smaller than the standard deviations are within noise):", ""]
        for loss in losses:
            std = ""
            if loss["phase"] == "finetuned":
                std = (f" (std {loss['ours_std']:.2f} vs {loss['best_std']:.2f}"
                       + ("; within noise" if loss["gap"] < max(loss["ours_std"],
                                                                 loss["best_std"]) else "") + ")")
            lines.append(
                f"* {loss['variant']}, {'one-shot' if loss['phase'] == 'oneshot' else 'fine-tuned'}"
                f", {_level_label(payload, loss['level'])}: qm {loss['ours']:.2f} vs "
                f"{loss['best_builtin']} {loss['best']:.2f} — **{loss['gap']:.2f} points "
                f"behind**{std}")
        lines.append("")
    # headline: our default pipeline vs what Torch-Pruning users get
    if "qm" in crits and builtins and "merge+bn" in cfg["variants"] and "plain" in cfg["variants"]:
        lines += ["Our default pipeline (qm, merge+bn) against the best Torch-Pruning built-in as "
                  "users run it (plain), one-shot:", ""]
        for k in keys:
            ours = _values(payload, "merge+bn", "qm", k, "oneshot")
            best = max(((_mean_std(_values(payload, "plain", c, k, "oneshot"))[0], c)
                        for c in builtins if _values(payload, "plain", c, k, "oneshot")),
                       default=None)
            if ours and best:
                lines.append(f"* {_level_label(payload, k)}: {_mean_std(ours)[0]:.2f} vs "
                             f"{best[1]} {best[0]:.2f} ({_mean_std(ours)[0] - best[0]:+.2f})")
        lines.append("")
    if payload.get("errors"):
        lines += ["## Errors and warnings", ""]
        lines += [f"* `{json.dumps(e)}`" for e in payload["errors"]]
        lines.append("")
    # reproduction
    lines += [
        "## How this was produced", "",
        f"Command: `{payload['command']}`", "",
        f"Hardware: {env['cpu_model']}, {env['cpu_count']} CPU cores "
        f"(torch threads {env['torch_threads']}), device `{env['device']}`"
        + (f" ({env['cuda_device']})" if env.get("cuda_device") else "")
        + f"; shared with other jobs (1-minute load average {_load(env, 'start')} at start, "
          f"{_load(env, 'end')} at the end, on 2 cores), so wall times are indicative only.", "",
        f"Software: Python {env['python']}, torch {env['torch']}, torchvision "
        f"{env.get('torchvision', '?')}, torch-pruning {env['torch_pruning']}.", "",
        f"Wall time: {payload.get('wall_seconds', math.nan):.0f} s "
        f"({len(payload['runs'])} evaluated runs; per-run times in the JSON).", "",
        "The issue's full ResNet-18 run (stride-1 stem, 8-epoch baseline, SCIENCE.md §3's H100 "
        "set-up) was not run: this session had no GPU to run it on. On a GPU machine it is:",
        "",
        f"    {GPU_TABLE1_COMMAND}", "",
    ]
    return "\n".join(lines)


def plot_table1(payload: dict[str, Any], path: Path) -> None:
    """Accuracy vs sparsity per criterion (the paper's Figure 1), one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = payload["config"]
    keys = [k for k, lv in payload["levels"].items() if "unreachable" not in lv]
    variants = cfg["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(5.2 * len(variants), 4.4), sharey=True,
                             squeeze=False)
    xs = list(range(len(keys)))
    labels = [payload["levels"][k]["label"] for k in keys]
    colors = plt.get_cmap("tab10")
    dense = payload["baseline"]["dense_test_accuracy"]
    paper_x = {payload["levels"][k]["value"]: i for i, k in enumerate(keys)
               if payload["levels"][k]["target"] == "params"}
    for ax, variant in zip(axes[0], variants):
        for ci, c in enumerate(cfg["criteria"]):
            for phase, style in (("oneshot", "o-"), ("finetuned", "s--")):
                pts = [(x, _mean_std(_values(payload, variant, c, k, phase)))
                       for x, k in zip(xs, keys) if _values(payload, variant, c, k, phase)]
                if not pts:
                    continue
                px = [p[0] for p in pts]
                mean = [p[1][0] for p in pts]
                std = [p[1][1] for p in pts]
                ax.errorbar(px, mean, yerr=std, fmt=style, ms=3.5, lw=2 if c == "qm" else 1.2,
                            color=colors(ci % 10), capsize=2,
                            label=f"{c} ({'one-shot' if phase == 'oneshot' else 'fine-tuned'})")
        for name, row in PAPER_TABLE1.items():
            pts = [(paper_x[s], v) for s, v in row.items() if s in paper_x]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "x:", color="grey", lw=1,
                        ms=4)
                ax.annotate(f"paper {name}", pts[-1], fontsize=6, color="grey",
                            textcoords="offset points", xytext=(2, 2))
        ax.axhline(dense, color="black", lw=0.8, ls="-.")
        ax.set_title(variant)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.set_xlabel("parameter sparsity" if all(payload["levels"][k]["target"] == "params"
                                                   for k in keys) else "level")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    handles, lbls = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, lbls, loc="lower center", ncol=min(6, max(1, len(lbls))), fontsize=7,
               frameon=False)
    fig.suptitle(f"{cfg['model']} on Fashion-MNIST: accuracy after structured pruning "
                 f"(dense {dense:.1f} %, dash-dot; grey dotted: paper's approximated Table 1)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.12 + 0.02 * (len(lbls) // 6), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A 3-conv network with BatchNorm and global pooling (for smoke tests of ``speed``)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def _speed_model(name: str, input_size: int) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "tiny_cnn":
        return tiny_cnn(), (3, input_size, input_size)
    if name == "small_cnn":
        from .models import small_cnn

        return small_cnn(), (1, 28, 28)
    import torchvision.models as tvm

    return tvm.get_model(name, weights=None), (3, input_size, input_size)


def _literal_breakdown(groups: Sequence[Any]) -> dict[str, Any]:
    """Where one pass of ``"literal"`` scoring spends its time: the filter spectra (float64
    Gram + batched ``eigvalsh``), the pairwise Fubini–Study distances and the greedy order."""
    from .importance import SpectralImportance
    from .methods import _greedy_sibling_order, _pairwise
    from .spectral.states import _gram_spectral_states

    imp = SpectralImportance("literal")
    parts = {"states_seconds": 0.0, "pairwise_seconds": 0.0, "greedy_seconds": 0.0}
    identical = 0
    for g in groups:
        for layer, idxs, _ in imp._producers(g):
            w = layer.weight.detach()[idxs].float()
            mats = w.reshape(w.shape[0], w.shape[1], -1) if w.dim() > 2 else w.unsqueeze(1)
            t0 = time.perf_counter()
            states = _gram_spectral_states(mats, augment=w.dim() <= 2)
            t1 = time.perf_counter()
            parts["states_seconds"] += t1 - t0
            if states.shape[0] < 2 or bool((states == states[:1]).all()):
                identical += 1  # every distance 0: no matrix, no search
                continue
            dist = _pairwise(states, "fs")
            t2 = time.perf_counter()
            _greedy_sibling_order(dist, "nearest")
            parts["pairwise_seconds"] += t2 - t1
            parts["greedy_seconds"] += time.perf_counter() - t2
    t = time.perf_counter()
    for g in groups:
        imp(g)
    total = time.perf_counter() - t
    return parts | {"literal_seconds": total, "identical_state_producers": identical,
                    "producers": sum(len(imp._producers(g)) for g in groups)}


def _svd_orientation(model: nn.Module, repeats: int) -> dict[str, Any]:
    """``svdvals`` of every conv's operator matrix (C_out × C_in·k², wide) vs its transpose."""
    mats = [m.weight.detach().flatten(1) for m in model.modules()
            if isinstance(m, nn.modules.conv._ConvNd)]
    by_shape: dict[tuple[int, ...], torch.Tensor] = {}
    for w in mats:
        if w.shape[0] < w.shape[1]:
            by_shape.setdefault(tuple(w.shape), w)
    wide = list(by_shape.values())  # one matrix per distinct shape keeps this cheap
    if not wide:
        return {}

    def run(transpose: bool) -> None:
        for w in wide:
            torch.linalg.svdvals(w.T if transpose else w)

    as_is, _ = _median_time(lambda: run(False), repeats)
    transposed, _ = _median_time(lambda: run(True), repeats)
    return {"wide_matrices": len(wide), "shapes": [list(w.shape) for w in wide],
            "svdvals_wide_seconds": as_is,
            "svdvals_transposed_seconds": transposed,
            "wide_over_transposed": as_is / max(transposed, 1e-12)}


def _speed_one(name: str, args: argparse.Namespace, criteria: Sequence[str],
               batches: Sequence[int]) -> dict[str, Any]:
    """Every ``speed`` measurement of one model."""
    import torch_pruning as tp

    from .calibration import collect_input_grams
    from .importance import SpectralImportance
    from .structural import count_params_and_macs, prune

    model, shape = _speed_model(name, args.input_size)
    model.eval()
    example = torch.randn(1, *shape)
    calib = torch.randn(args.calibration_size, *shape).split(args.calibration_batch)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ignored = linears[-1:]
    res: dict[str, Any] = {"input_shape": list(shape)}
    params, macs = count_params_and_macs(model, example)
    res["params"], res["macs"] = params, macs
    t = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = list(dg.get_all_groups(ignored_layers=ignored,
                                    root_module_types=[nn.modules.conv._ConvNd, nn.Linear]))
    res["graph_seconds"] = time.perf_counter() - t
    res["groups"] = len(groups)

    n_channels = sum(len(g[0][1]) for g in groups)
    res["channels"] = n_channels

    def score(imp, cap: float | None = None) -> tuple[float, int, int]:
        """Score every group; stop early past ``cap`` seconds. (seconds, groups, channels)"""
        start, done, chans = time.perf_counter(), 0, 0
        for g in groups:
            imp(g)
            done, chans = done + 1, chans + len(g[0][1])
            if cap is not None and time.perf_counter() - start > cap and done < len(groups):
                break
        return time.perf_counter() - start, done, chans

    def timed_scoring(make_imp: Callable[[], Any]) -> dict[str, Any]:
        times: list[float] = []
        for i in range(args.warmup + max(1, args.repeats)):
            secs, done, chans = score(make_imp(), args.scoring_cap)
            if done < len(groups):  # too slow: report a lower bound and stop repeating
                return {"seconds": secs, "all": times + [secs], "partial": True,
                        "groups_scored": done, "channels_scored": chans,
                        "estimated_full_seconds": secs * n_channels / max(chans, 1)}
            if i >= args.warmup:
                times.append(secs)
        return {"seconds": statistics.median(times), "all": times, "partial": False}

    base = timed_scoring(lambda: tp.importance.GroupMagnitudeImportance(p=2))
    base_s = base["seconds"]
    scoring = {"group_magnitude": base | {"ratio": 1.0}}
    stats = None
    cal_s = fwd_s = None
    if "qm" in criteria:
        def calibrate() -> None:
            nonlocal stats
            stats = collect_input_grams(model, calib)

        def forward() -> None:
            with torch.no_grad():
                for xb in calib:
                    model(xb)

        fwd_s, fwd_all = _median_time(forward, args.repeats, warmup=args.warmup)
        cal_s, cal_all = _median_time(calibrate, args.repeats, warmup=args.warmup)
        res["calibration"] = {"seconds": cal_s, "all": cal_all, "forward_seconds": fwd_s,
                              "forward_all": fwd_all, "ratio": cal_s / max(fwd_s, 1e-12),
                              "images": args.calibration_size}
    for crit in criteria:
        kwargs: dict[str, Any] = {}
        if crit == "qm":
            kwargs = {"stats": stats, "greedy_fraction": min(1.0, args.ratio + 0.05)}
        entry = timed_scoring(lambda crit=crit, kwargs=kwargs: SpectralImportance(crit, **kwargs))
        scoring[crit] = entry | {"ratio": entry["seconds"] / max(base_s, 1e-12)}
        if crit == "qm":
            scoring[crit]["greedy_fraction"] = kwargs["greedy_fraction"]
    res["scoring"] = scoring
    if args.svd_analysis:
        res["svd_orientation"] = _svd_orientation(model, 1)
        if "literal" in criteria and not scoring["literal"].get("partial"):
            res["literal_breakdown"] = _literal_breakdown(groups)

    # whole prune(): qm default pipeline vs what Torch-Pruning users run
    def prune_time(**kw) -> tuple[float, list[float], Any, nn.Module]:
        times, last, net = [], None, None
        for _ in range(max(1, args.prune_repeats)):
            net = copy.deepcopy(model)
            t = time.perf_counter()
            last = prune(net, example, args.ratio, **kw)
            times.append(time.perf_counter() - t)
        return statistics.median(times), times, last, net

    l1_s, l1_all, l1_rep, pruned = prune_time(criterion="l1", compensate=False)
    res["prune"] = {"l1_plain_seconds": l1_s, "l1_plain_all": l1_all,
                    "channel_ratio": args.ratio, "params_after": l1_rep.params_after,
                    "macs_after": l1_rep.macs_after, "macs_ratio": l1_rep.macs_speedup,
                    "params_ratio": l1_rep.params_before / max(1, l1_rep.params_after)}
    latency_model = ("the l1-pruned model (the same layer widths as qm's: local pruning at "
                     "one channel ratio)")
    if "qm" not in criteria:
        pass
    elif scoring["qm"].get("partial"):
        # the full qm prune would take longer than the cap allows: estimate it from parts
        est = (cal_s or 0.0) + scoring["qm"]["estimated_full_seconds"] + l1_s
        res["prune"].update({"qm_seconds": est, "ratio": est / max(l1_s, 1e-12),
                             "estimated": True,
                             "qm_breakdown": {"calibration_seconds": cal_s,
                                              "scoring_seconds":
                                                  scoring["qm"]["estimated_full_seconds"]}})
    else:
        qm_s, qm_all, qm_rep, qm_net = prune_time(criterion="qm", calibration=calib)
        res["prune"].update({"qm_seconds": qm_s, "qm_all": qm_all,
                             "ratio": qm_s / max(l1_s, 1e-12), "estimated": False,
                             "qm_breakdown": {"calibration_seconds": qm_rep.calibration_seconds,
                                              "scoring_seconds": qm_rep.scoring_seconds,
                                              "total_seconds": qm_rep.total_seconds}})
        pruned, latency_model = qm_net, "the qm-pruned model"
    qm_rep = l1_rep  # same widths: local pruning at one channel ratio, any criterion
    res["latency_model"] = latency_model
    # real latency, pruned vs dense
    latency = []
    pruned.eval()
    for bs in batches:
        x = torch.randn(bs, *shape)
        with torch.no_grad():
            reps = args.latency_repeats or args.repeats
            dense_t, _ = _median_time(lambda x=x: model(x), reps, warmup=1)
            pruned_t, _ = _median_time(lambda x=x: pruned(x), reps, warmup=1)
        latency.append({"device": "cpu", "batch": bs, "dense_ms": 1e3 * dense_t,
                        "pruned_ms": 1e3 * pruned_t,
                        "speedup": dense_t / max(pruned_t, 1e-12),
                        "macs_ratio": qm_rep.macs_speedup})
    if torch.cuda.is_available() and args.cuda_batch > 0:
        dev = torch.device("cuda")
        dm, pm = copy.deepcopy(model).to(dev), copy.deepcopy(pruned).to(dev)
        x = torch.randn(args.cuda_batch, *shape, device=dev)
        with torch.no_grad():
            dense_t, _ = _median_time(lambda: dm(x), args.repeats, dev, warmup=3)
            pruned_t, _ = _median_time(lambda: pm(x), args.repeats, dev, warmup=3)
        latency.append({"device": torch.cuda.get_device_name(0), "batch": args.cuda_batch,
                        "dense_ms": 1e3 * dense_t, "pruned_ms": 1e3 * pruned_t,
                        "speedup": dense_t / max(pruned_t, 1e-12),
                        "macs_ratio": qm_rep.macs_speedup})
    else:
        res["cuda_latency"] = "skipped: CUDA not available"
    res["latency"] = latency
    return res


def run_speed(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the ``speed`` benchmark; returns the JSON payload (also written to ``--out``)."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    criteria = _names(args.criteria)
    batches = _ints(args.latency_batches, "--latency-batches")
    payload: dict[str, Any] = {
        "benchmark": "speed", "command": command_line(argv),
        "environment": environment("cpu"),
        "config": {"models": _names(args.models), "criteria": criteria,
                   "repeats": args.repeats, "calibration_size": args.calibration_size,
                   "calibration_batch": args.calibration_batch, "input_size": args.input_size,
                   "channel_ratio": args.ratio, "latency_batches": batches,
                   "latency_repeats": args.latency_repeats or args.repeats,
                   "cuda_batch": args.cuda_batch,
                   "calibration_data": "standard-normal random images (no ImageNet here); "
                                       "timings do not depend on the values",
                   "targets": {"weight_only_scoring_vs_group_magnitude": 2.0,
                               "calibration_vs_forward_passes": 3.0}},
        "models": {},
    }
    for name in _progress(payload["config"]["models"], len(payload["config"]["models"]),
                          "speed", progress):
        payload["models"][name] = _speed_one(name, args, criteria, batches)
        payload["wall_seconds"] = time.perf_counter() - started
        write_results(out / f"{args.name}.json", payload)
    payload["wall_seconds"] = time.perf_counter() - started
    with contextlib.suppress(OSError):
        payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    write_results(out / f"{args.name}.json", payload)
    (out / f"{args.name}.md").write_text(render_speed_md(payload))
    return payload


def render_speed_md(payload: dict[str, Any]) -> str:
    """The Markdown page of a ``speed`` payload."""
    cfg, env = payload["config"], payload["environment"]
    tgt = cfg["targets"]
    lines = ["# Speed: spectral scoring, calibration, prune() and real latency", "",
             f"Every time is the median of {cfg['repeats']} repeats in one process on "
             f"{env['cpu_model']} ({env['cpu_count']} cores, torch threads "
             f"{env['torch_threads']}); the machine was shared with other jobs (1-minute load "
             f"average {_load(env, 'start')} at start, {_load(env, 'end')} at the end), so "
             "absolute times are "
             "indicative and ratios are the figures to read. Models: torchvision with "
             "`weights=None` (scoring cost does not depend on the values); scoring = calling "
             "the importance on every group of `DependencyGraph.get_all_groups` (last Linear "
             "ignored), as `prune()` does.", ""]
    verdicts = []
    for name, res in payload["models"].items():
        lines += [f"## {name} (input {'×'.join(map(str, res['input_shape']))}, "
                  f"{res['params'] / 1e6:.1f} M params, {res['macs'] / 1e9:.2f} GMACs, "
                  f"{res['groups']} groups)", ""]
        lines += ["| importance | scoring time (s) | × GroupMagnitudeImportance | target |",
                  "|---|---|---|---|"]
        for crit, s in res["scoring"].items():
            target = ""
            if crit in ("literal", "loo"):
                ok = s["ratio"] <= tgt["weight_only_scoring_vs_group_magnitude"] and \
                    not s.get("partial")
                target = f"≤ {tgt['weight_only_scoring_vs_group_magnitude']:g}× — " + \
                         ("met" if ok else "**missed**")
                verdicts.append((name, f"weight-only `{crit}` scoring",
                                 ("≥ " if s.get("partial") else "") + f"{s['ratio']:.2f}", ok,
                                 tgt["weight_only_scoring_vs_group_magnitude"]))
            elif crit == "qm":
                target = f"(data-aware; exact greedy over {s['greedy_fraction']:.2f} of each group)"
            label = "GroupMagnitudeImportance (p=2)" if crit == "group_magnitude" else \
                f"SpectralImportance(\"{crit}\")"
            if s.get("partial"):
                lines.append(
                    f"| {label} | > {s['seconds']:.1f} (stopped after {s['groups_scored']} of "
                    f"{res['groups']} groups, {s['channels_scored']} of {res['channels']} "
                    f"channels; ≈ {s['estimated_full_seconds']:.0f} s if every channel costs "
                    f"the same) | ≥ {s['ratio']:.0f}× | {target} |")
            else:
                lines.append(f"| {label} | {s['seconds']:.4f} | {s['ratio']:.1f}× | {target} |")
        lines.append("")
        if "calibration" in res:
            c = res["calibration"]
            ok = c["ratio"] <= tgt["calibration_vs_forward_passes"]
            verdicts.append((name, "`qm` calibration pass", f"{c['ratio']:.2f}", ok,
                             tgt["calibration_vs_forward_passes"]))
            lines += [f"Calibration pass of `qm` (input Grams of every Conv/Linear, "
                      f"{c['images']} images): {c['seconds']:.2f} s = **{c['ratio']:.2f} plain "
                      f"forward passes** ({c['forward_seconds']:.2f} s) over the same images "
                      f"(target ≤ {tgt['calibration_vs_forward_passes']:g}: "
                      f"{'met' if ok else '**missed**'}).", ""]
        p = res["prune"]
        if "qm_seconds" in p:
            est = p.get("estimated")
            cal = p["qm_breakdown"]["calibration_seconds"] or 0.0
            lines += [f"Whole `prune(model, x, {p['channel_ratio']:g})` (channels): default `qm` "
                      f"pipeline (calibration {cal:.2f} s, scoring "
                      f"{p['qm_breakdown']['scoring_seconds']:.2f} s, merge, BatchNorm "
                      f"re-estimation) {'≈ ' if est else ''}{p['qm_seconds']:.2f} s vs "
                      f"`prune(criterion=\"l1\", compensate=False)` {p['l1_plain_seconds']:.2f} s"
                      f": **{'≈ ' if est else ''}{p['ratio']:.1f}×**"
                      + (" (estimated: calibration + extrapolated `qm` scoring + the l1 prune; "
                         "the full `qm` prune was not run because its scoring exceeded "
                         "--scoring-cap)" if est else "") + ".", ""]
        lines += [f"Latency of {res.get('latency_model', 'the pruned model')} against the dense "
                  f"one (median of {cfg.get('latency_repeats', cfg['repeats'])} forward passes "
                  "after one warm-up):", ""]
        lines += ["| device | batch | dense (ms) | pruned (ms) | real speed-up | MACs ratio |",
                  "|---|---|---|---|---|---|"]
        for lat in res["latency"]:
            lines.append(f"| {lat['device']} | {lat['batch']} | {lat['dense_ms']:.1f} | "
                         f"{lat['pruned_ms']:.1f} | {lat['speedup']:.2f}× | "
                         f"{lat['macs_ratio']:.2f}× |")
        if "cuda_latency" in res:
            lines.append(f"| cuda | {cfg['cuda_batch']} | – | – | {res['cuda_latency']} | |")
        lines += ["", "Real speed-up trails the MACs ratio: per-layer pruning leaves odd channel "
                  "counts that CPU kernels handle less efficiently, and at batch 1 the fixed "
                  "per-layer overheads weigh more. Batch-1 CPU latency on a shared machine is "
                  "the least stable figure here (OpenMP threads wait for cores held by other "
                  "jobs); the batch-64 row is the one to read.", ""]
        lb = res.get("literal_breakdown")
        if lb and "states_seconds" in lb:
            tot = max(lb["literal_seconds"], 1e-12)
            lines += [f"Where `literal`'s time goes (one pass, {lb['literal_seconds']:.3f} s): "
                      f"filter spectra {lb['states_seconds']:.3f} s "
                      f"({100 * lb['states_seconds'] / tot:.0f} %: singular values as the "
                      "square roots of `eigvalsh` of each filter's float64 k² × k² Gram, one "
                      "batched call per layer, instead of an SVD of each C_in × k² filter), "
                      f"pairwise Fubini–Study distances {lb['pairwise_seconds']:.3f} s "
                      f"({100 * lb['pairwise_seconds'] / tot:.0f} %), greedy sibling order "
                      f"{lb['greedy_seconds']:.3f} s ({100 * lb['greedy_seconds'] / tot:.0f} %: "
                      "read off the distance matrix as each channel's 'death time', "
                      "D(v) = min{d(v,u) : u > v, D(u) ≥ d(v,u)}, one vectorized row scan per "
                      "channel instead of simulating the removals); the rest is group "
                      "traversal and score bookkeeping. "
                      f"{lb['identical_state_producers']} of {lb['producers']} producers have "
                      "identical filter states (1×1 convolutions: a C_in × 1 filter has one "
                      "singular value, state [1]), so every distance is exactly 0 and the order "
                      "is the index order, with no matrix computed.", ""]
        elif lb:
            lines += [f"Where `literal`'s time goes (one pass, {lb['literal_seconds']:.2f} s): "
                      f"the batched `svdvals` of the filters (each C_in × k², tall) takes "
                      f"{lb['svd_seconds']:.2f} s ({100 * lb['svd_share']:.0f} %); the rest is "
                      "the pairwise Fubini–Study distances and the greedy sibling order (a "
                      "Python loop of one step per channel).", ""]
        svd = res.get("svd_orientation")
        if svd:
            lines += [f"Orientation of SVDs: `torch.linalg.svdvals` on one wide conv operator "
                      f"matrix (C_out × C_in·k²) of each of the {svd['wide_matrices']} distinct "
                      f"shapes ({', '.join('×'.join(map(str, sh)) for sh in svd['shapes'])}) took "
                      f"{svd['svdvals_wide_seconds']:.3f} s as stored and "
                      f"{svd['svdvals_transposed_seconds']:.3f} s on the transposes (same "
                      f"singular values): **{svd['wide_over_transposed']:.1f}×**. Every "
                      "weight-state SVD here runs on the tall orientation; `loo` no longer "
                      "takes any per-channel SVD (one eigendecomposition of the smaller Gram "
                      "per layer, then one secular equation per channel, below).", ""]
    lines += ["## Against the issue's targets", ""]
    for name, what, ratio, ok, target in verdicts:
        lines.append(f"* {name}: {what} = {ratio}× (target ≤ {target:g}×): "
                     + ("met." if ok else "**missed**."))
    if not verdicts:
        lines.append("* (no targeted quantity measured)")
    lines += ["", "Why: the magnitude baseline is one norm per channel (a single pass over "
              "the weights). `literal` adds, per layer, a float64 Gram of every filter, a "
              "batched `eigvalsh` of those k² × k² Grams, an n × n distance matrix and an O(n) "
              "scan per channel for the greedy order: a small constant factor over the "
              "baseline. `loo` is exact but inherently heavier: per layer one eigendecomposition "
              "of the r × r Gram (r = min(C_out, C_in·k²)), then for each channel the r "
              "squared singular values left after removing it, the roots of the secular "
              "equation 1 = Σ_j z_j² / (λ_j − μ) of that rank-one downdate (Bunch–Nielsen–"
              "Sorensen iteration, a few passes over r poles per root): O(C_out·r²) per "
              "layer against the baseline's O(C_out·C_in·k²), where it used to take one SVD "
              "of the whole layer per channel, O(C_out·r²·max(C_out, C_in·k²)). `qm` runs an "
              "exact greedy merge order with a downdated inverse Gram per consumer (float64), "
              "whose cost grows with the consumer's input width (a flatten into a Linear is "
              "the expensive case). The timings above say which part dominates.",
              ""]
    lines += ["## How this was produced", "", f"Command: `{payload['command']}`", "",
              f"Software: Python {env['python']}, torch {env['torch']}, torchvision "
              f"{env.get('torchvision', '?')}, torch-pruning {env['torch_pruning']}. "
              f"Wall time {payload.get('wall_seconds', math.nan):.0f} s.", "",
              ]
    if not any(lat["device"] != "cpu" for res in payload["models"].values()
               for lat in res["latency"]):
        lines += ["No GPU was available to this run, so the CUDA batch-"
                  f"{cfg['cuda_batch']} latency was skipped; on a GPU machine: `python -m "
                  "torch_qmprune.bench speed --models resnet18,resnet50 --out "
                  "docs/results/gpu_speed` (the CUDA row is added automatically).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def run_render(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Re-write the Markdown (and, for ``table1``, the PNG) of an existing results JSON."""
    path = Path(args.json)
    payload = json.loads(path.read_text())
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    args.out, args.name = str(out), path.stem
    if payload.get("benchmark") == "table1":
        payload["where_we_lose"] = where_we_lose(payload)
        (out / f"{path.stem}.md").write_text(render_table1_md(payload))
        plot_table1(payload, out / f"{path.stem}.png")
        args.render_png = True
    elif payload.get("benchmark") == "speed":
        (out / f"{path.stem}.md").write_text(render_speed_md(payload))
    else:
        raise ValueError(f"{path} is not a table1 or speed results file")
    return payload


def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` argument parser (sub-commands ``table1`` and ``speed``)."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_qmprune.bench",
        description="Benchmarks of torch_qmprune: the paper's Table 1 measured, and speed.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    t1 = sub.add_parser("table1", help="accuracy vs parameter sparsity per criterion and variant")
    t1.add_argument("--model", default="small_cnn", choices=TABLE1_MODELS)
    t1.add_argument("--criteria", default=DEFAULT_CRITERIA)
    t1.add_argument("--sparsity", default="0.5,0.7,0.9,0.95",
                    help="fractions of PARAMETERS removed (prune(target='params')); '' for none")
    t1.add_argument("--macs-speedups", default="",
                    help="e.g. 1.5,2,3,4: prune(target='macs', ratio=1-1/x)")
    t1.add_argument("--variants", default=",".join(VARIANTS))
    t1.add_argument("--seeds", default="0,1,2")
    t1.add_argument("--finetune-epochs", type=float, default=0.0,
                    help="fixed fine-tuning budget per pruned model (0 = none), e.g. 0.25")
    t1.add_argument("--finetune-lr", type=float, default=0.01)
    t1.add_argument("--finetune-variants", default="plain,merge+bn")
    t1.add_argument("--finetune-criteria", default="all",
                    help="comma-separated subset of --criteria to fine-tune, or 'all'")
    t1.add_argument("--finetune-levels", default="all",
                    help="comma-separated subset of --sparsity levels to fine-tune, or 'all'")
    t1.add_argument("--calibration-size", type=int, default=1024)
    t1.add_argument("--train-limit", type=int, default=None,
                    help="train the baseline (and fine-tune) on the first N training images")
    t1.add_argument("--test-limit", type=int, default=None)
    t1.add_argument("--baseline-seed", type=int, default=0)
    t1.add_argument("--baseline-epochs", type=float, default=None)
    t1.add_argument("--require-cached", action="store_true",
                    help="fail instead of training the baseline when it is not cached")
    t1.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t1.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    t1.add_argument("--out", default="docs/results")
    t1.add_argument("--name", default="table1", help="file stem of the outputs")
    t1.add_argument("--no-progress", action="store_true")
    t1.set_defaults(func=run_table1)

    sp = sub.add_parser("speed", help="scoring / calibration / prune() time and real latency")
    sp.add_argument("--models", default="resnet18",
                    help="comma-separated torchvision names (resnet18,resnet50), small_cnn, or "
                         "tiny_cnn (a 3-conv smoke-test net)")
    sp.add_argument("--criteria", default="literal,loo,qm")
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    sp.add_argument("--scoring-cap", type=float, default=120.0,
                    help="stop a scoring pass after this many seconds and report a lower bound")
    sp.add_argument("--prune-repeats", type=int, default=1)
    sp.add_argument("--calibration-size", type=int, default=64)
    sp.add_argument("--calibration-batch", type=int, default=32)
    sp.add_argument("--input-size", type=int, default=224)
    sp.add_argument("--ratio", type=float, default=0.5, help="channel ratio for prune/latency")
    sp.add_argument("--latency-batches", default="1,64")
    sp.add_argument("--latency-repeats", type=int, default=None,
                    help="timed forward passes per latency figure (default: --repeats)")
    sp.add_argument("--cuda-batch", type=int, default=256)
    sp.add_argument("--svd-analysis", action=argparse.BooleanOptionalAction, default=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=None)
    sp.add_argument("--out", default="docs/results")
    sp.add_argument("--name", default="speed")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=run_speed)

    rd = sub.add_parser("render", help="re-write the .md (and .png) of a results JSON")
    rd.add_argument("json", help="a table1 or speed JSON written by this module")
    rd.add_argument("--out", default=None, help="folder (default: the JSON's)")
    rd.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    rd.set_defaults(func=run_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m torch_qmprune.bench`` (and ``qmprune bench``); exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        payload = args.func(args, argv)
    except (ValueError, FileNotFoundError, argparse.ArgumentTypeError) as exc:
        if args.debug:
            raise
        print(f"bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    md = out / f"{args.name}.md"
    print(md.read_text())
    print(f"wrote {'' if args.command == 'render' else str(out / (args.name + '.json')) + ', '}{md}"
          + (f", {out / (args.name + '.png')}"
             if args.command == "table1" or getattr(args, "render_png", False) else ""))
    return 0 if payload is not None else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
