"""Gradual pruning during a fixed fine-tune budget vs one-shot pruning + the same budget.

Set-up: a cached Fashion-MNIST baseline (``get_baseline("small_cnn")``: 1 epoch, ~90 %; and
``resnet18_s2`` when its checkpoint is already cached — this script never trains it). Every
method gets the same fine-tune budget of ``--iterations`` SGD iterations (batch 128, lr 0.01,
Nesterov momentum 0.9, weight decay 5e-4, cosine decay to 0, fresh random batches of the full
training set) and must end at 2× fewer MACs (``--target 0.5``):

* ``dense+ft`` — no pruning, same fine-tune (how much the budget alone is worth);
* ``oneshot`` — :func:`~torch_qmprune.prune` to the target at iteration 0, then the budget;
* ``linear`` / ``cubic`` / ``predictive`` — :class:`~torch_qmprune.schedule.PruningScheduler`
  with ``--steps`` steps every ``iterations // (steps + 1)`` iterations (the last fifth of the
  budget recovers), physical mode, optimizer re-bound at each step.

All pruning uses the same criterion (``--criterion``, default ``qm``) with least-squares merging
and BatchNorm re-estimation on ``--calibration`` random training images drawn afresh at each
step. Test accuracy on the full test set (10,000 images). Seeds change the fine-tune batches
and the calibration draws (the baseline is the same checkpoint). Jobs run in ``--workers``
processes of one thread each.

Run: ``python benchmarks/finetune_gradual.py --out docs/results/finetune.json
--md docs/results/finetune.md``
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

from torch_qmprune.bench import environment, write_results
from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.schedule import PruningScheduler
from torch_qmprune.structural import count_params_and_macs, prune
from torch_qmprune.training import evaluate
from torch_qmprune.zoo import checkpoint_path, get_baseline, is_cached

METHODS = ("dense+ft", "oneshot", "linear", "cubic", "predictive")
_DATA: dict = {}


def _data():
    if not _DATA:
        _DATA["train"] = load_fashion_mnist("train")
        _DATA["test"] = load_fashion_mnist("test")
    return _DATA["train"], _DATA["test"]


def run_job(job: dict) -> dict:
    """One (model, method, seed): fine-tune with the method, return accuracy and sizes."""
    torch.set_num_threads(job["threads"])
    (x, y), (xt, yt) = _data()
    if not is_cached(job["model"]):
        raise RuntimeError(f"{job['model']} baseline not cached; this benchmark never trains it")
    model, info = get_baseline(job["model"])
    model.train()
    seed, iters, method = job["seed"], job["iterations"], job["method"]
    gen = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(seed)
    calibration = lambda: x[torch.randint(0, len(x), (job["calibration"],), generator=gen)]
    _, dense_macs = count_params_and_macs(copy.deepcopy(model).eval(), x[:1])
    start = time.perf_counter()
    prune_seconds = 0.0
    if method == "oneshot":
        t0 = time.perf_counter()
        prune(model, x[:1], job["target"], target="macs", criterion=job["criterion"],
              calibration=calibration())
        prune_seconds = time.perf_counter() - t0
        model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=job["lr"], momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.5 * (1 + math.cos(math.pi * it / iters)))
    scheduler = None
    every = max(1, iters // (job["steps"] + 1))
    if method in ("linear", "cubic", "predictive"):
        scheduler = PruningScheduler(
            model, x[:1], target=job["target"], target_kind="macs", steps=job["steps"],
            schedule=method, criterion=job["criterion"], calibration=calibration,
            optimizer=optimizer, track_window=max(1, every // 5))
    loss_fn = nn.CrossEntropyLoss()
    for it in range(iters):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
        lr_sched.step()
        if scheduler is not None and (it + 1) % every == 0 and not scheduler.done:
            scheduler.step()
    if scheduler is not None:
        while not scheduler.done:
            scheduler.step()
        prune_seconds = sum(h["seconds"] for h in scheduler.history)
    seconds = time.perf_counter() - start
    acc = evaluate(model, xt, yt)
    _, macs = count_params_and_macs(model.eval(), x[:1])
    return dict(job, accuracy=acc, dense_accuracy=info["test_accuracy"], macs=macs,
                dense_macs=dense_macs, speedup=dense_macs / macs, seconds=seconds,
                prune_seconds=prune_seconds,
                history=[dict(h) for h in (scheduler.history
                                                                if scheduler else [])])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict]) -> tuple[list[dict], str]:
    rows = []
    for model_name in dict.fromkeys(r["model"] for r in results):
        for method in METHODS:
            rs = [r for r in results if r["model"] == model_name and r["method"] == method]
            if not rs:
                continue
            acc, acc_sd = _mean_std([r["accuracy"] for r in rs])
            dense = rs[0]["dense_accuracy"]
            rows.append(dict(model=model_name, method=method, seeds=[r["seed"] for r in rs],
                             accuracy=acc, accuracy_std=acc_sd, delta=acc - dense,
                             dense_accuracy=dense,
                             speedup=statistics.mean(r["speedup"] for r in rs),
                             seconds=statistics.mean(r["seconds"] for r in rs),
                             prune_seconds=statistics.mean(r["prune_seconds"] for r in rs),
                             within_1pt=all(r["accuracy"] >= dense - 1.0 for r in rs)))
    lines = ["| model | method | test accuracy % (mean ± std) | Δ vs dense | MACs ↓ | "
             "≥ dense − 1 pt (every seed) | wall s (of which pruning) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['accuracy']:.2f} ± {r['accuracy_std']:.2f} | "
            f"{r['delta']:+.2f} | {r['speedup']:.2f}× | {'yes' if r['within_1pt'] else 'no'} | "
            f"{r['seconds']:.0f} ({r['prune_seconds']:.0f}) |")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,resnet18_s2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--resnet-iterations", type=int, default=60)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--criterion", default="qm")
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    skipped = [m for m in models if not is_cached(m)]
    models = [m for m in models if is_cached(m)]
    for m in skipped:
        print(f"skipping {m}: checkpoint {checkpoint_path(m).name} not cached (not trained here)")
    jobs = [dict(model=m, method=meth, seed=int(s),
                 iterations=args.resnet_iterations if m == "resnet18_s2" else args.iterations,
                 steps=args.steps, target=args.target, criterion=args.criterion,
                 calibration=args.calibration, lr=args.lr, threads=args.threads)
            for m in models for s in args.seeds.split(",") for meth in args.methods.split(",")]
    env = environment("cpu")
    start = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for res in pool.map(run_job, jobs):
            print(f"{res['model']:>11} {res['method']:>10} seed {res['seed']}: "
                  f"{res['accuracy']:.2f} % ({res['speedup']:.2f}x fewer MACs, "
                  f"{res['seconds']:.0f} s)", flush=True)
            results.append(res)
    rows, table = summarize(results)
    print(table)
    env.update(cpus=env["cpu_count"], processor=env["cpu_model"],
               workers=args.workers, threads_per_worker=args.threads,
               total_seconds=time.perf_counter() - start,
               command="python benchmarks/finetune_gradual.py " + " ".join(argv or sys.argv[1:]),
               skipped=skipped)
    out = {"args": vars(args), "env": env, "rows": rows, "results": results, "table": table}
    if args.out:
        write_results(args.out, out)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n")
    return out


if __name__ == "__main__":
    main()
