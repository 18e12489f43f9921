"""Attention-head pruning of a ViT trained on Fashion-MNIST, one-shot, on CPU.

Model: torchvision's ``VisionTransformer`` scaled to 1×28×28
(:func:`torch_qmprune.models.small_vit`: 4 layers × 8 heads, hidden 128, 16 patches of 7×7),
trained on all 60,000 training images by :func:`torch_qmprune.zoo.get_baseline` (``"vit"``,
cached). Calibration: ``--calibration`` training
images (one shared pass of :func:`~torch_qmprune.heads.collect_head_grams`). Evaluation: the
10,000 test images (or ``--test-limit``).

For every ratio (fraction of heads removed in *each* layer) and criterion (``qm``, ``literal``,
``l1``, ``random`` with 3 seeds), the dense model is copied, its heads pruned with
:func:`~torch_qmprune.heads.prune_attention_heads` with and without least-squares merging, and
evaluated: test accuracy, and the mean cosine similarity of the pruned model's logits to the
dense ones. Prints a markdown table and writes every run to ``--out`` as JSON.

Run:  .venv/bin/python benchmarks/heads_vit.py --out docs/results/heads_vit.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch_qmprune.bench import environment, write_results  # noqa: E402
from torch_qmprune.data import load_fashion_mnist  # noqa: E402
from torch_qmprune.heads import collect_head_grams, prune_attention_heads  # noqa: E402
from torch_qmprune.training import evaluate  # noqa: E402
from torch_qmprune.zoo import get_baseline  # noqa: E402


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for every run")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--criteria", nargs="+", default=["qm", "literal", "l1", "random"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="for 'random'")
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--train-limit", type=int, default=None, help="baseline training images")
    ap.add_argument("--epochs", type=float, default=None, help="baseline epochs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    start = time.perf_counter()
    model, info = get_baseline("vit", train_limit=args.train_limit, epochs=args.epochs,
                               progress=True)
    x, _ = load_fashion_mnist("train", limit=args.calibration)
    xt, yt = load_fashion_mnist("test", limit=args.test_limit)
    dense_logits = logits(model, xt)
    dense_acc = evaluate(model, xt, yt)
    t0 = time.perf_counter()
    stats = collect_head_grams(model, [x[i:i + 256] for i in range(0, len(x), 256)])
    calib_s = time.perf_counter() - t0
    print(f"ViT baseline {dense_acc:.2f} % ({info.get('epochs')} epochs), {len(x)} calibration "
          f"images, Grams in {calib_s:.1f}s", flush=True)
    runs = []
    for ratio in args.ratios:
        for crit in args.criteria:
            for seed in (args.seeds if crit == "random" else [0]):
                for comp in (True, False):
                    m = copy.deepcopy(model)
                    rep = prune_attention_heads(m, ratio, criterion=crit, calibration=stats,
                                                compensate=comp, seed=seed)
                    out = logits(m, xt)
                    acc = 100.0 * float((out.argmax(1) == yt).double().mean())
                    cos = float(F.cosine_similarity(out, dense_logits, dim=1).mean())
                    runs.append(dict(ratio=ratio, criterion=crit, seed=seed, compensate=comp,
                                     heads_before=sum(rep.heads_before.values()),
                                     heads_after=sum(rep.heads_after.values()),
                                     params_before=rep.params_before,
                                     params_after=rep.params_after, accuracy=acc, cosine=cos))
                    print(f"ratio {ratio:.2f} {crit:>7} seed {seed} merge {comp!s:>5}: "
                          f"{acc:6.2f} %  cosine {cos:.3f}", flush=True)

    def cell(ratio: float, crit: str, comp: bool, key: str) -> str:
        vals = [r[key] for r in runs if r["ratio"] == ratio and r["criterion"] == crit
                and r["compensate"] == comp]
        fmt = "{:.2f}" if key == "accuracy" else "{:.3f}"
        if len(vals) > 1:
            return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"
        return fmt.format(vals[0])

    lines = ["| removed / layer | heads kept | criterion | accuracy (merged) | cosine (merged) "
             "| accuracy (no merge) | cosine (no merge) |", "|---|---|---|---|---|---|---|"]
    for ratio in args.ratios:
        kept = next(r for r in runs if r["ratio"] == ratio)
        for crit in args.criteria:
            name = crit + (f" ({len(args.seeds)} seeds)" if crit == "random" else "")
            lines.append(f"| {ratio:.0%} | {kept['heads_after']}/{kept['heads_before']} | {name} | "
                         f"{cell(ratio, crit, True, 'accuracy')} | "
                         f"{cell(ratio, crit, True, 'cosine')} | "
                         f"{cell(ratio, crit, False, 'accuracy')} | "
                         f"{cell(ratio, crit, False, 'cosine')} |")
    table = "\n".join(lines)
    print(f"\ndense: {dense_acc:.2f} %\n{table}")
    result = dict(command="python benchmarks/heads_vit.py " + " ".join(argv or sys.argv[1:]),
                  baseline=info, dense_accuracy=dense_acc, calibration_images=len(x),
                  test_images=len(xt), calibration_seconds=calib_s, runs=runs, table=table,
                  wall_seconds=time.perf_counter() - start, threads=torch.get_num_threads(),
                  **env)
    write_results(args.out, result)
    return result


if __name__ == "__main__":
    main()
