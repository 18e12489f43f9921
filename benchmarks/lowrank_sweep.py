"""Controllable kernel approximation (arXiv 2512.00880 §3.2): δ sweep and rank-rule comparison.

For each trained baseline (``small_cnn``; ``resnet18_s2`` when its checkpoint is in the cache —
this script never trains it), every Linear/Conv layer is replaced by a rank-q factor pair with
:func:`torch_qmprune.lowrank.lowrank_compress`, one shot, no fine-tuning:

1. δ sweep: for each δ and each basis (``weight``: truncated SVD of W; ``activation``: top-q
   eigenvectors of the layer's centered output Gram on calibration images), params, MACs and
   Fashion-MNIST test accuracy before and after BatchNorm re-estimation.
2. Equal-parameter comparison: the relative-entropy rule (q per layer from S(ρ_q‖ρ) ≤ δ) vs a
   uniform per-layer rank fraction f (q = round(f·full rank), same basis, same "only where it
   saves parameters" rule), f found by bisection so that the parameter counts match.

Calibration: the first ``--calib`` training images (Grams, errors); BatchNorm re-estimation on
the first ``--bn`` training images. Prints markdown; ``--out`` writes JSON, ``--md`` markdown.

Run: ``python benchmarks/lowrank_sweep.py --out docs/results/lowrank.json
--md docs/results/lowrank.md``
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from torch_qmprune.bench import environment, write_results
from torch_qmprune.calibration import recalibrate_batchnorm
from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.lowrank import lowrank_compress
from torch_qmprune.structural import count_params_and_macs
from torch_qmprune.training import evaluate
from torch_qmprune.zoo import cache_dir, get_baseline, is_cached

_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def uniform_params(model: nn.Module, fraction: float, basis: str) -> int:
    """Parameter count lowrank_compress(ranks=fraction) would give (same saving rule)."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if type(m) not in _TYPES or (not isinstance(m, nn.Linear) and m.groups != 1):
            continue
        out, n_in = m.weight.shape[0], m.weight[0].numel()
        full = min(out, n_in)
        q = max(1, min(full, int(round(fraction * full))))
        bias = m.bias is not None or basis == "activation"
        new = q * (n_in + out) + (out if bias else 0)
        old = sum(p.numel() for p in m.parameters(recurse=False))
        if new < old:
            total += new - old
    return total


def match_fraction(model: nn.Module, target: int, basis: str) -> float:
    lo, hi = 1e-4, 1.0
    best = (math.inf, 1.0)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        n = uniform_params(model, mid, basis)
        if abs(n - target) < best[0]:
            best = (abs(n - target), mid)
        if n > target:
            hi = mid
        else:
            lo = mid
    return best[1]


def run_variant(base: nn.Module, args: argparse.Namespace, data: dict, **kwargs) -> dict:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    report = lowrank_compress(model, calibration=data["calib"], example_inputs=data["x1"],
                              measure_error=True, **kwargs)
    seconds = time.perf_counter() - t0
    model = report.model
    acc_raw = evaluate(model, data["xt"], data["yt"])
    n_bn = recalibrate_batchnorm(model, data["bn"])
    acc_bn = evaluate(model, data["xt"], data["yt"]) if n_bn else acc_raw
    params, macs = count_params_and_macs(model.eval(), data["x1"])
    ranks = {n: e.rank for n, e in report.layers.items() if e.replaced}
    return {
        "params": params, "macs": macs, "acc": acc_raw, "acc_bn": acc_bn,
        "params_ratio": params / data["params"], "macs_ratio": macs / data["macs"],
        "output_error": report.output_error, "layers_replaced": len(ranks), "ranks": ranks,
        "seconds": seconds,
    }


def bench_model(name: str, args: argparse.Namespace) -> dict:
    base, info = get_baseline(name)
    base.eval()
    x, _ = load_fashion_mnist("train", limit=max(args.calib, args.bn))
    xt, yt = load_fashion_mnist("test", limit=args.test_limit)
    data = {"calib": x[: args.calib].split(256), "bn": x[: args.bn].split(256), "x1": x[:1],
            "xt": xt, "yt": yt}
    data["params"], data["macs"] = count_params_and_macs(base, data["x1"])
    dense_acc = evaluate(base, xt, yt)
    print(f"\n## {name}: {data['params']:,} params, {data['macs']:,} MACs, dense accuracy "
          f"{dense_acc:.2f} % on {len(yt)} test images")
    sweep = []
    deltas = args.deltas if name == "small_cnn" else args.deltas_large
    for basis in ("weight", "activation"):
        for delta in deltas:
            row = run_variant(base, args, data, delta=delta, basis=basis)
            row.update(basis=basis, delta=delta)
            sweep.append(row)
            print(f"δ={delta:<6} {basis:<10} params {row['params_ratio']:.3f} MACs "
                  f"{row['macs_ratio']:.3f} acc {row['acc']:.2f} / BN {row['acc_bn']:.2f} "
                  f"err {row['output_error']:.3f} ({row['seconds']:.1f}s)", flush=True)
    matched = []
    match_deltas = args.match_deltas if name == "small_cnn" else args.match_deltas_large
    for basis in ("weight", "activation"):
        for delta in match_deltas:
            ref = next(r for r in sweep if r["basis"] == basis and r["delta"] == delta)
            f = match_fraction(base, ref["params"], basis)
            row = run_variant(base, args, data, delta=None, ranks=f, basis=basis)
            matched.append({"basis": basis, "delta": delta, "fraction": f,
                            "entropy": {k: ref[k] for k in ("params", "macs", "acc", "acc_bn",
                                                            "output_error")},
                            "uniform": {k: row[k] for k in ("params", "macs", "acc", "acc_bn",
                                                            "output_error")}})
            print(f"match δ={delta} {basis}: entropy {ref['params']:,} p acc {ref['acc_bn']:.2f}"
                  f" | uniform f={f:.3f} {row['params']:,} p acc {row['acc_bn']:.2f}", flush=True)
    return {"model": name, "baseline": info, "dense_acc": dense_acc, "params": data["params"],
            "macs": data["macs"], "test_images": len(yt), "sweep": sweep, "matched": matched}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['model']} (dense: {res['params']:,} params, {res['macs']:,} MACs, "
                  f"{res['dense_acc']:.2f} % on {res['test_images']:,} test images)", "",
                  "δ sweep (one shot, no fine-tuning). \"BN\" = after BatchNorm re-estimation; "
                  "\"out err\" = ‖f_q(x) − f(x)‖/‖f(x)‖ of the logits on the calibration images "
                  "(before BN re-estimation).", "",
                  "| basis | δ | params | MACs | acc | acc + BN | out err | layers factorized |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["sweep"]:
            lines.append(f"| {r['basis']} | {r['delta']} | {r['params']:,} "
                         f"({100 * r['params_ratio']:.1f} %) | {r['macs']:,} "
                         f"({100 * r['macs_ratio']:.1f} %) | {r['acc']:.2f} | {r['acc_bn']:.2f} "
                         f"| {r['output_error']:.3f} | {r['layers_replaced']} |")
        lines += ["", "Equal parameters: relative-entropy rank rule vs uniform rank fraction "
                  "(accuracy after BN re-estimation; before in parentheses).", "",
                  "| basis | δ | params (entropy / uniform) | MACs (entropy / uniform) "
                  "| uniform f | acc entropy | acc uniform |", "|---|---|---|---|---|---|---|"]
        for m in res["matched"]:
            e, u = m["entropy"], m["uniform"]
            lines.append(f"| {m['basis']} | {m['delta']} | {e['params']:,} / {u['params']:,} | "
                         f"{e['macs']:,} / {u['macs']:,} | {m['fraction']:.3f} | "
                         f"{e['acc_bn']:.2f} ({e['acc']:.2f}) | {u['acc_bn']:.2f} "
                         f"({u['acc']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small_cnn,resnet18_s2")
    parser.add_argument("--deltas", type=float, nargs="+",
                        default=[0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--deltas-large", type=float, nargs="+", default=[0.005, 0.02, 0.05, 0.1])
    parser.add_argument("--match-deltas", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--match-deltas-large", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--calib", type=int, default=1024)
    parser.add_argument("--bn", type=int, default=2048)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment("cpu")
    start = time.perf_counter()
    results = []
    skipped = []
    for name in args.models.split(","):
        if name != "small_cnn" and not is_cached(name):
            print(f"\n## {name}: checkpoint not in {cache_dir()}; skipped (this script never "
                  "trains it)")
            skipped.append(name)
            continue
        results.append(bench_model(name, args))
    md = markdown(results, args)
    print("\n" + md)
    meta = {**env, "threads": args.threads, "processor": env["cpu_model"],
            "seconds": time.perf_counter() - start, "args": vars(args), "skipped": skipped}
    if args.out:
        write_results(args.out, {"meta": meta, "results": results})
    if args.md:
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
