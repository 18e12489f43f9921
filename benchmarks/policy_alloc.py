"""Quantum policy gate (arXiv 2512.00880 §4) vs uniform allocation of per-layer pruning ratios.

Set-up: a trained Fashion-MNIST baseline from the cache (``small_cnn``; ``resnet18_s2`` too if
its checkpoint already exists — this script never trains it). For each MACs budget (fraction
kept), per-layer channel ratios come from

* uniform — one keep fraction for every layer (:func:`~torch_qmprune.policy.uniform_allocation`);
* policy — the budget-conditioned gate trained by natural policy gradient on the Eq. (8)
  Lagrangian (:func:`~torch_qmprune.policy.policy_allocation`, score-function estimator), and
  the same with the plain gradient;

and every allocation is applied by the same call, ``prune(model, x, 0.0, layer_ratios=...,
criterion="qm", calibration=...)``: same criterion, same least-squares merging, same BatchNorm
re-estimation on the same calibration images. Reported: the MACs fraction the pruned model
really keeps (Torch-Pruning's counter), one-shot test accuracy on the full test set (no
fine-tuning), the calibration proxies, and timings.

Run: ``python benchmarks/policy_alloc.py --out docs/results/policy.json``
(``--md FILE`` also writes the bare markdown table).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from torch_qmprune.bench import environment, write_results
from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.policy import build_policy_problem, policy_allocation, uniform_allocation
from torch_qmprune.structural import prune
from torch_qmprune.training import evaluate
from torch_qmprune.zoo import get_baseline, is_cached


def run_model(name: str, args: argparse.Namespace, x_cal: torch.Tensor, xt: torch.Tensor,
              yt: torch.Tensor) -> dict:
    model, info = get_baseline(name, seed=args.seed)
    model.eval()
    x1 = x_cal[:1]
    dense = evaluate(model, xt, yt)
    print(f"[{name}] dense accuracy {dense:.2f}%", flush=True)
    t0 = time.perf_counter()
    problem = build_policy_problem(model, x1, calibration=x_cal, resource="macs",
                                   n_levels=args.levels, accuracy_proxy=args.accuracy_proxy)
    problem_s = time.perf_counter() - t0
    print(f"[{name}] problem: {problem.n_layers} layers in {problem_s:.1f}s", flush=True)
    rows = []
    for budget in args.budgets:
        allocations = [("uniform", *uniform_allocation(model, x1, budget, problem=problem))]
        for natural in (True, False):
            label = "policy (natural gradient)" if natural else "policy (plain gradient)"
            ratios, rep = policy_allocation(model, x1, budget, problem=problem, natural=natural,
                                            steps=args.steps, seed=args.seed,
                                            estimator=args.estimator)
            allocations.append((label, ratios, rep))
        for label, ratios, rep in allocations:
            pruned = copy.deepcopy(model)
            mapping = dict(zip(model.modules(), pruned.modules()))
            t1 = time.perf_counter()
            prep = prune(pruned, x1, 0.0, layer_ratios={mapping[m]: r for m, r in ratios.items()},
                         criterion="qm", calibration=x_cal)
            prune_s = time.perf_counter() - t1
            acc = evaluate(pruned, xt, yt)
            macs = prep.macs_after / prep.macs_before
            row = dict(model=name, budget=budget, method=label, macs_kept=macs,
                       params_kept=prep.params_after / prep.params_before, accuracy=acc,
                       dense_accuracy=dense, accuracy_proxy=rep.accuracy_proxy,
                       drift_proxy=rep.drift_proxy, lambdas=rep.lambdas,
                       widths={k: v["kept"] for k, v in rep.layers.items()},
                       channels={k: v["channels"] for k, v in rep.layers.items()},
                       policy_keep={k: v.get("policy_keep") for k, v in rep.layers.items()},
                       train_seconds=rep.train_seconds, correction_seconds=rep.correction_seconds,
                       prune_seconds=prune_s, problem_seconds=problem_s)
            rows.append(row)
            print(f"[{name}] budget {budget:.2f} {label:28s} MACs kept {macs:.4f} "
                  f"acc {acc:.2f}% proxy {rep.accuracy_proxy:.3e} widths {row['widths']}",
                  flush=True)
    return dict(model=name, dense_accuracy=dense, info=info, problem_seconds=problem_s,
                layers=problem.names, channels=problem.channels, rows=rows)


def markdown(results: list[dict], args: argparse.Namespace, skipped: list[str]) -> str:
    lines = ["| model | MACs budget (kept) | allocation | MACs kept (measured) | one-shot test "
             "acc. % | accuracy proxy | kept channels per layer |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            widths = ", ".join(f"{r['widths'][k]}/{r['channels'][k]}" for k in res["layers"])
            lines.append(f"| {r['model']} (dense {r['dense_accuracy']:.2f}) | {r['budget']:.2f} | "
                         f"{r['method']} | {r['macs_kept']:.4f} | {r['accuracy']:.2f} | "
                         f"{r['accuracy_proxy']:.2e} | {widths} |")
    if skipped:
        lines.append("")
        lines.append("Skipped (no cached checkpoint when run): " + ", ".join(skipped))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["small_cnn", "resnet18_s2"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--levels", type=int, default=8)
    ap.add_argument("--estimator", default="score", choices=["score", "exact"])
    ap.add_argument("--accuracy-proxy", default="heldout", choices=["heldout", "greedy"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_cal, _ = load_fashion_mnist("train", limit=args.calibration)
    xt, yt = load_fashion_mnist("test", limit=args.test_limit)
    results, skipped = [], []
    env = environment("cpu")
    start = time.perf_counter()
    for name in args.models:
        if name != "small_cnn" and not is_cached(name, seed=args.seed):
            print(f"[{name}] no cached checkpoint: skipped (never trained here)", flush=True)
            skipped.append(name)
            continue
        results.append(run_model(name, args, x_cal, xt, yt))
    table = markdown(results, args, skipped)
    print(table)
    payload = dict(args=vars(args), results=results, skipped=skipped,
                   seconds=time.perf_counter() - start, **env,
                   command="python benchmarks/policy_alloc.py " + " ".join(argv or sys.argv[1:]))
    if args.out:
        write_results(args.out, payload)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
