"""The ``qmprune`` command: demo, prune, analyze and bench, with errors a person can act on."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["main", "load_model", "CLIError"]


class CLIError(Exception):
    """An error the user can fix; printed as one line (no traceback unless --debug)."""


def load_model(spec: str) -> nn.Module:
    """Resolve MODEL: a built-in name (``small_cnn``, ``resnet18_fmnist``, ``small_vit``), a
    torchvision model name (``resnet18``), a file saved with ``torch.save(model)``, or
    ``package.module:function`` returning an ``nn.Module``."""
    from . import models as builtin

    if os.path.exists(spec):
        try:
            obj = torch.load(spec, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - re-raised as a user-facing error
            raise CLIError(f"could not load {spec!r} with torch.load: {exc}") from exc
        if not isinstance(obj, nn.Module):
            raise CLIError(f"{spec!r} holds a {type(obj).__name__}, not an nn.Module; save the "
                           "whole model with torch.save(model, path)")
        return obj
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise CLIError(f"cannot import {spec!r}: {exc}") from exc
        model = fn()
        if not isinstance(model, nn.Module):
            raise CLIError(f"{spec!r} returned {type(model).__name__}, expected an nn.Module")
        return model
    if spec in ("small_cnn", "resnet18_fmnist", "small_vit"):
        return getattr(builtin, spec)()
    import torchvision.models as tvm

    if spec in tvm.list_models(module=tvm):
        return tvm.get_model(spec, weights=None)
    if spec.endswith((".pt", ".pth")):
        raise CLIError(f"model file {spec!r} does not exist")
    raise CLIError(f"unknown model {spec!r}: give a file saved with torch.save(model), "
                   "'package.module:function', a built-in (small_cnn, resnet18_fmnist, "
                   "small_vit) or a torchvision name such as resnet18")


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise CLIError(f"--input-shape must look like 3,224,224, got {text!r}") from exc
    if not shape or any(v <= 0 for v in shape):
        raise CLIError(f"--input-shape must be positive integers, got {text!r}")
    return shape


def _calibration(spec: str, shape: tuple[int, ...], n: int) -> tuple[torch.Tensor, Any]:
    if spec == "fashion-mnist":
        from .data import load_fashion_mnist

        if shape != (1, 28, 28):
            raise CLIError(f"--calibration fashion-mnist gives 1×28×28 images; the model "
                           f"expects {shape}: pass --calibration FILE.pt instead")
        x, _ = load_fashion_mnist("train", limit=n)
        return x, x
    if spec == "random":
        print("warning: random calibration data; the merge fits noise — pass real inputs "
              "with --calibration FILE.pt for a useful model", file=sys.stderr)
        x = torch.randn(n, *shape)
        return x, x
    if not os.path.exists(spec):
        raise CLIError(f"calibration file {spec!r} does not exist (expected a tensor saved "
                       "with torch.save, 'fashion-mnist' or 'random')")
    x = torch.load(spec, map_location="cpu", weights_only=True)
    if isinstance(x, (tuple, list)):
        x = x[0]
    if not torch.is_tensor(x) or tuple(x.shape[1:]) != shape:
        raise CLIError(f"calibration tensor in {spec!r} must have shape (N, {shape}), got "
                       f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    return x[:n], x[:n]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_json, run_demo

    ratios = tuple(float(r) for r in args.ratios.split(","))
    for r in ratios:
        if not 0 < r < 1:
            raise CLIError(f"--ratios must be fractions in (0, 1), got {r}")
    out = run_demo(ratios, calibration_size=args.calibration_size, seed=args.seed,
                   train_limit=args.train_limit, test_limit=args.test_limit,
                   progress=not args.json, echo=not args.json)
    if args.json:
        print(demo_json(out))
    return 0


def _jsonable(value: Any) -> Any:
    """``value`` as standard JSON: tensors / NumPy values as lists or numbers, tuples as lists,
    keys as strings, NaN and ±inf as ``null``, anything else as its ``str``."""
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors, NumPy arrays / scalars
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _allocation_kwargs(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--allocation-kwargs must be a JSON object such as "
                       f"'{{\"steps\": 100}}': {exc.msg} at column {exc.colno}") from exc
    if not isinstance(value, dict):
        raise CLIError(f"--allocation-kwargs must be a JSON object, got "
                       f"{type(value).__name__}")
    return value


def _allocation_line(report: Any) -> str | None:
    """One line about a non-uniform allocation for the human-readable output."""
    if report.allocation == "uniform":
        return None
    info = report.allocation_info
    parts = [f"allocation {report.allocation!r} ({report.allocation_seconds:.2f}s)"]
    if isinstance(info.get("achieved"), (int, float)):
        what = info.get("target") or info.get("resource") or report.target
        parts.append(f"{what} reduced by {100 * float(info['achieved']):.1f}%")
    if info.get("profile"):
        parts.append(f"profile {info['profile']!r} ({info.get('profile_source', '?')})")
    return ", ".join(parts)


def _cmd_prune(args: argparse.Namespace) -> int:
    from .hardware import available_profiles, load_profile
    from .structural import available_allocations, prune

    if args.ratio is not None and not 0 <= args.ratio < 1:
        raise CLIError(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.budget is not None and not 0 < args.budget <= 1:
        raise CLIError(f"--budget is the fraction kept, in (0, 1], got {args.budget}")
    if args.ratio is not None and args.budget is not None and abs(
            args.ratio - (1.0 - args.budget)) > 1e-9:
        raise CLIError(f"--ratio {args.ratio} and --budget {args.budget} disagree (--ratio is "
                       f"the fraction removed, --budget the fraction kept); pass one of them")
    if "latency" in (args.target, args.allocation) and args.device_profile is None:
        raise CLIError(f"--{'target' if args.target == 'latency' else 'allocation'} latency "
                       f"needs --device-profile: 'measure' (time this model's layers now), a "
                       f"shipped profile name ({', '.join(available_profiles())}) or a JSON "
                       f"file")
    if args.device_profile not in (None, "measure"):
        load_profile(args.device_profile)  # a bad name or file fails before any work is done
    allocation_kwargs = _allocation_kwargs(args.allocation_kwargs)
    model = load_model(args.model).eval()
    # after loading MODEL: importing a module:function may register more allocations
    if args.allocation is not None and args.allocation not in available_allocations():
        raise CLIError(f"unknown --allocation {args.allocation!r}; expected one of "
                       f"{', '.join(available_allocations())} (or a name your model's module "
                       f"registers with torch_qmprune.register_allocation)")
    shape = _input_shape(args.input_shape)
    calib, _ = _calibration(args.calibration, shape, args.calibration_size)
    progress = not (args.json or args.no_progress) and sys.stderr.isatty()
    report = prune(model, calib[:1], args.ratio, target=args.target, criterion=args.criterion,
                   calibration=calib, global_pruning=args.global_pruning,
                   allocation=args.allocation, device_profile=args.device_profile,
                   budget=args.budget, allocation_kwargs=allocation_kwargs, progress=progress)
    try:
        torch.save(model, args.output)
    except OSError as exc:
        raise CLIError(f"cannot write the pruned model to {args.output!r}: "
                       f"{exc.strerror or exc}") from exc
    payload = _jsonable(report.to_dict()) | {"output": args.output}
    if args.report is not None:
        try:
            with open(args.report, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=2)
        except OSError as exc:
            raise CLIError(f"cannot write the report to {args.report!r}: "
                           f"{exc.strerror or exc}") from exc
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(report)
        line = _allocation_line(report)
        if line:
            print(line)
        print(f"saved pruned model to {args.output} (load with torch.load(path, "
              "weights_only=False))" + (f"; report in {args.report}" if args.report else ""))
    return 0


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    from .graph import summary_text

    if not rows:
        return []
    keys = [k for k in rows[0] if k != "block"]
    lines = ["| " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(summary_text(row[k]).replace("|", "\\|") for k in keys)
                    + " |" for row in rows]


def _cmd_analyze(args: argparse.Namespace) -> int:
    import io

    from tqdm import tqdm

    from .graph import redundancy_graph

    if args.clusters is not None and args.clusters < 1:
        raise CLIError(f"--clusters must be a positive integer, got {args.clusters}")
    if args.top < 0:
        raise CLIError(f"--top must be >= 0, got {args.top}")
    model = load_model(args.model).eval()
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot use --output-dir {args.output_dir!r}: "
                       f"{exc.strerror or exc}") from exc
    base = os.path.join(args.output_dir, f"qmfrg_{args.level}")
    paths = {ext: f"{base}.{ext}" for ext in ("png", "json", "md", "html")}
    # stages, not items: the graph (SVDs), the clustering and a large heatmap each take seconds
    bar = tqdm(total=4, desc="analyze: graph", file=sys.stderr, dynamic_ncols=True,
               disable=True if args.json or args.no_progress else None,
               leave=False, bar_format="{desc:<22} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
    with bar:
        graph = redundancy_graph(model, level=args.level, metric=args.metric)
        bar.set_description_str("analyze: clusters")
        bar.update()
        clusters = graph.cluster(n_clusters=args.clusters)
        reps = graph.representatives(clusters)
        bar.set_description_str("analyze: heatmap")
        bar.update()
        buffer = io.BytesIO()
        graph.plot_heatmap(None).savefig(buffer, format="png")
        png = buffer.getvalue()
        bar.set_description_str("analyze: reports")
        bar.update()
        try:
            with open(paths["png"], "wb") as fh:
                fh.write(png)
            graph.to_json(paths["json"], precision=args.graph_precision,
                          full_matrix=args.full_matrix)
            title = f"QM-FRG of {args.model} ({args.level} level, {args.metric} distance)"
            graph.to_html(paths["html"], clusters=clusters, title=title, top=args.top,
                          heatmap_png=png)
            pairs = graph.most_redundant_pairs(args.top)
            layers = graph.layer_summary(clusters)
            lines = [f"# {title}", "",
                     f"{len(graph)} operators, {len(clusters)} redundancy clusters "
                     "(most redundant first). Heatmap: " + os.path.basename(paths["png"])
                     + "; HTML report: " + os.path.basename(paths["html"]), "",
                     "## Most redundant pairs", "", "| a | b | distance |", "|---|---|---|"]
            lines += [f"| {a} | {b} | {d:.4f} |" for a, b, d in pairs]
            head = len(lines)
            lines += ["", "## Layers", "", *_md_table(layers), "", "## Clusters", ""]
            lines += [f"{k + 1}. representative `{graph.names[r]}`: " + ", ".join(
                f"`{graph.names[i]}`" for i in c) for k, (c, r) in enumerate(zip(clusters, reps))]
            with open(paths["md"], "w", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
        except OSError as exc:
            raise CLIError(f"cannot write the report to {args.output_dir!r}: "
                           f"{exc.strerror or exc}") from exc
        bar.set_description_str("analyze: done")
        bar.update()
    payload = {
        "model": args.model, "level": args.level, "metric": args.metric,
        "vertices": len(graph), "clusters": [[graph.names[i] for i in c] for c in clusters],
        "representatives": [graph.names[i] for i in reps],
        "most_redundant_pairs": [{"a": a, "b": b, "distance": d} for a, b, d in pairs],
        "layers": layers,
        "heatmap": paths["png"], "report": paths["md"], "html": paths["html"],
        "graph_json": paths["json"],
    }
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print("\n".join(lines[:head]))
        print(f"\nwrote {paths['html']}, {paths['md']}, {paths['png']}, {paths['json']}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    from .hardware import available_profiles
    from .structural import QM_CRITERIA, TARGETS, TP_CRITERIA, available_allocations

    parser = argparse.ArgumentParser(
        prog="qmprune", description="Spectral-geometry pruning for PyTorch (torch_qmprune).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="prune a real CNN on Fashion-MNIST: ours vs magnitude")
    demo.add_argument("--ratios", default="0.3,0.5,0.7", help="channel fractions to remove")
    demo.add_argument("--calibration-size", type=int, default=1024)
    demo.add_argument("--train-limit", type=int, default=None, help="train on fewer images")
    demo.add_argument("--test-limit", type=int, default=None, help="evaluate on fewer images")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print JSON instead of a table")
    demo.set_defaults(func=_cmd_demo)

    pr = sub.add_parser(
        "prune", help="physically prune MODEL and save it with a report",
        description="Removes channels (merging them into their siblings), re-estimates "
        "BatchNorm and saves the whole model with torch.save. --ratio is the fraction "
        "removed, --budget the fraction kept (give one). --target latency (with "
        "--device-profile) or --allocation latency / policy spread the cut over layers.")
    pr.add_argument("model", help="file, module:function, built-in or torchvision name")
    pr.add_argument("--ratio", type=float, default=None,
                    help="fraction of --target to remove (default 0.5, or 1 - --budget)")
    pr.add_argument("--budget", type=float, default=None,
                    help="fraction of --target to keep, in (0, 1]; same as --ratio 1-BUDGET")
    pr.add_argument("--target", default="channels", choices=TARGETS,
                    help="what the ratio measures (latency: estimated Σ cost·MACs under "
                    "--device-profile)")
    pr.add_argument("--criterion", default="qm", choices=QM_CRITERIA + TP_CRITERIA)
    pr.add_argument("--allocation", default=None, metavar="NAME",
                    help="per-layer ratios: " + ", ".join(available_allocations())
                    + " (default: uniform; latency with --target latency)")
    pr.add_argument("--device-profile", default=None, metavar="NAME|PATH|measure",
                    help="cost profile for latency allocation: 'measure' (time the layers "
                    "here), a shipped name (" + ", ".join(available_profiles())
                    + ") or a JSON file")
    pr.add_argument("--allocation-kwargs", default=None, metavar="JSON",
                    help='extra allocator arguments as a JSON object, e.g. \'{"steps": 100}\'')
    pr.add_argument("--calibration", default="fashion-mnist",
                    help="'fashion-mnist', 'random' or a tensor file (N, *input-shape)")
    pr.add_argument("--calibration-size", type=int, default=512)
    pr.add_argument("--input-shape", default="1,28,28")
    pr.add_argument("--global-pruning", action="store_true")
    pr.add_argument("--output", "-o", default="pruned.pt")
    pr.add_argument("--report", default=None, metavar="PATH",
                    help="also write the JSON report (as printed by --json) to PATH")
    pr.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    pr.set_defaults(func=_cmd_prune)

    an = sub.add_parser("analyze", help="QM-FRG report of MODEL: states, clusters, heatmap",
                        description="Writes qmfrg_LEVEL.html (self-contained), .md, .png "
                        "(heatmap) and .json (the graph: its edges as per-block upper "
                        "triangles, read back with RedundancyGraph.from_json) into "
                        "--output-dir.")
    an.add_argument("model", help="file, module:function, built-in or torchvision name")
    an.add_argument("--level", default="layer", choices=("layer", "channel", "head"))
    an.add_argument("--metric", default="fs", choices=("fs", "w2"))
    an.add_argument("--clusters", type=int, default=None, help="default: eigengap heuristic")
    an.add_argument("--top", type=int, default=10, help="most redundant pairs to list")
    an.add_argument("--output-dir", "-o", default="qmprune_report")
    an.add_argument("--graph-precision", default="float32", choices=("float32", "float64"),
                    help="precision of the distances in qmfrg_LEVEL.json (float64: exact)")
    an.add_argument("--full-matrix", action="store_true",
                    help="store the dense n x n distance matrix in qmfrg_LEVEL.json instead of "
                    "the edges only (large: ~240 MB for resnet18 --level channel)")
    an.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    an.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    an.set_defaults(func=_cmd_analyze)

    be = sub.add_parser("bench", help="benchmarks (see `qmprune bench --help`)",
                        add_help=False)
    be.add_argument("bench_args", nargs=argparse.REMAINDER)
    be.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qmprune`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        if args.debug:
            raise
        # KeyError's str() is the repr of its key; messages are kept to one line
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        text = " ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or type(exc).__name__
        print(f"qmprune {args.command}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
