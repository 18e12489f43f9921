"""Hardware-aware allocation (arXiv 2512.00880 §5): at equal MACs, does taking more channels from
layers that are slow per MAC on the device buy more measured speed than a uniform ratio?

Set-up: torchvision ResNet-18 (random weights, eval mode) on 3×64×64 inputs. For each batch size:

1. :func:`~torch_qmprune.hardware.measure_profile` times every conv/linear layer in isolation on
   this device at this batch size (full width and half width → marginal seconds per MAC).
2. Two allocations cut MACs by ``--ratio`` (0.5 = 2× fewer), both solved by the same bisection
   on dry runs of Torch-Pruning (within 2 %): uniform (``strength=0``, one ratio everywhere)
   and latency-aware (``strength=1``: ratio ∝ the group's marginal latency per MAC).
3. Each is applied with :func:`~torch_qmprune.prune` (``layer_ratios=``, L1 criterion, no
   compensation: latency does not depend on which channels go).
4. Dense, uniform and latency-aware models are timed in the same process, interleaved in a
   shuffled order each round; the median over rounds is reported.

Accuracy is not measured here (random weights): the latency-aware allocation concentrates the
pruning on few layers, which may cost more accuracy than the uniform one at equal MACs.

Run: ``python benchmarks/latency_alloc.py --out docs/results/latency.json``
(GPU: add ``--device cuda --batches 1 64 256``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from torchvision.models import resnet18

from torch_qmprune.bench import environment, write_results
from torch_qmprune.hardware import latency_allocation, measure_profile
from torch_qmprune.structural import count_params_and_macs, prune


@torch.no_grad()
def interleaved_timing(models: dict, x: torch.Tensor, rounds: int, inner: int,
                       device: torch.device) -> dict[str, list[float]]:
    """Per model: list of per-round times (mean of ``inner`` forwards), rounds interleaved."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for m in models.values():
        for _ in range(3):
            m(x)
    sync()
    times: dict[str, list[float]] = {k: [] for k in models}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(models)
        rng.shuffle(order)
        for k in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                models[k](x)
            sync()
            times[k].append((time.perf_counter() - t0) / inner)
    return times


def stage_summary(alloc, model) -> dict[str, float]:
    names = {m: n for n, m in model.named_modules()}
    per_stage: dict[str, list[float]] = {}
    for m, r in alloc.items():
        stage = names[m].split(".")[0]
        per_stage.setdefault(stage, []).append(r)
    return {k: round(statistics.mean(v), 3) for k, v in sorted(per_stage.items())}


def run_batch(batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    dense = resnet18().eval().to(device)
    x1 = torch.randn(1, 3, args.size, args.size, device=device)
    xb = torch.randn(batch, 3, args.size, args.size, device=device)
    t0 = time.perf_counter()
    profile = measure_profile(dense, xb, repeats=args.profile_repeats)
    t_prof = time.perf_counter() - t0
    params0, macs0 = count_params_and_macs(dense, x1)
    out = {"batch": batch, "profile_seconds": t_prof, "profile_costs": profile["costs"],
           "profile_device": profile["device"], "params_dense": params0, "macs_dense": macs0,
           "variants": {}}
    models = {"dense": dense}
    for label, strength in (("uniform", 0.0), ("latency-aware", 1.0)):
        t0 = time.perf_counter()
        alloc = latency_allocation(dense, x1, args.ratio, profile, strength=strength,
                                   max_ratio=args.max_ratio)
        t_alloc = time.perf_counter() - t0
        pruned = copy.deepcopy(dense)
        mapping = dict(zip(dense.modules(), pruned.modules()))
        prune(pruned, x1, 0.0, layer_ratios={mapping[m]: r for m, r in alloc.items()},
              criterion="l1", compensate=False)
        pruned.eval()
        params, macs = count_params_and_macs(pruned, x1)
        models[label] = pruned
        out["variants"][label] = {
            "params": params, "macs": macs, "macs_reduction": 1 - macs / macs0,
            "alloc_seconds": t_alloc, "stage_ratios": stage_summary(alloc, dense),
            "target_met": abs(macs / ((1 - args.ratio) * macs0) - 1) <= 0.02}
    inner = max(1, args.inner if batch == 1 else 1)
    rounds = args.rounds if batch == 1 else args.rounds_large
    times = interleaved_timing(models, xb, rounds, inner, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    q = {k: (statistics.quantiles(v, n=4)[0], statistics.quantiles(v, n=4)[2])
         for k, v in times.items()}
    out["median_seconds"] = med
    out["iqr_seconds"] = q
    out["rounds"] = rounds
    out["speedup_vs_dense"] = {k: med["dense"] / v for k, v in med.items()}
    out["aware_over_uniform"] = med["uniform"] / med["latency-aware"]
    # paired per-round ratio (same round → same machine load)
    paired = [u / a for u, a in zip(times["uniform"], times["latency-aware"])]
    out["paired_ratio_median"] = statistics.median(paired)
    out["paired_aware_faster_fraction"] = sum(p > 1 for p in paired) / len(paired)
    return out


def small_cnn_check(args: argparse.Namespace) -> dict:
    """Accuracy side of the trade: the trained small CNN, 2× fewer MACs, both allocations,
    pruned with the default "qm" criterion + compensation + BN re-estimation."""
    from torch_qmprune.data import load_fashion_mnist
    from torch_qmprune.training import evaluate
    from torch_qmprune.zoo import get_baseline

    base, _ = get_baseline("small_cnn")
    base.eval()
    x, _ = load_fashion_mnist("train", limit=1024)
    xt, yt = load_fashion_mnist("test")
    x1 = x[:1]
    out = {"dense_acc": evaluate(base, xt, yt), "variants": {}}
    models = {"dense": base}
    for batch in (1, 64):
        profile = measure_profile(base, x[:batch], repeats=args.profile_repeats)
        for label, strength in (("uniform", 0.0), ("latency-aware", 1.0)):
            if label == "uniform" and batch != 1:
                continue
            alloc = latency_allocation(base, x1, args.ratio, profile, strength=strength,
                                       max_ratio=args.max_ratio)
            pruned = copy.deepcopy(base)
            mapping = dict(zip(base.modules(), pruned.modules()))
            prune(pruned, x1, 0.0, layer_ratios={mapping[m]: r for m, r in alloc.items()},
                  criterion="qm", calibration=x.split(256))
            pruned.eval()
            key = label if label == "uniform" else f"{label} (profile batch {batch})"
            params, macs = count_params_and_macs(pruned, x1)
            names = {m: n for n, m in base.named_modules()}
            out["variants"][key] = {"acc": evaluate(pruned, xt, yt), "params": params,
                                    "macs": macs, "ratios": {names[m]: round(r, 3)
                                                             for m, r in alloc.items()}}
            models[key] = pruned
    out["macs_dense"] = count_params_and_macs(base, x1)[1]
    out["latency"] = {}
    for batch, rounds in ((1, args.rounds), (64, args.rounds_large)):
        times = interleaved_timing(models, x[:batch], rounds, args.inner if batch == 1 else 1,
                                   torch.device("cpu"))
        out["latency"][batch] = {k: statistics.median(v) for k, v in times.items()}
    return out


def small_cnn_markdown(res: dict) -> str:
    lines = ["", f"Trained small CNN (Fashion-MNIST, dense {res['dense_acc']:.2f} %, "
             f"{res['macs_dense'] / 1e6:.2f} M MACs), 2× fewer MACs, criterion \"qm\" with "
             "compensation and BN re-estimation (1,024 calibration images), 10,000 test images:",
             "", "| allocation | MACs | params | accuracy | latency batch 1 (ms) | "
             "latency batch 64 (ms) | channel ratios |", "|---|---|---|---|---|---|---|"]
    lat = res["latency"]
    lines.append(f"| dense | {res['macs_dense'] / 1e6:.2f} M | – | {res['dense_acc']:.2f} | "
                 f"{1e3 * lat[1]['dense']:.3f} | {1e3 * lat[64]['dense']:.2f} | – |")
    for k, v in res["variants"].items():
        ratios = ", ".join(f"{n} {r:.2f}" for n, r in v["ratios"].items())
        lines.append(f"| {k} | {v['macs'] / 1e6:.2f} M | {v['params']:,} | {v['acc']:.2f} | "
                     f"{1e3 * lat[1][k]:.3f} | {1e3 * lat[64][k]:.2f} | {ratios} |")
    return "\n".join(lines) + "\n"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"torchvision ResNet-18 (random weights), input 3×{meta['size']}×{meta['size']}, "
             f"{meta['device_name']}, torch {meta['torch']}, {meta['threads']} thread(s); MACs "
             f"cut by {meta['ratio']:.0%} ({1 / (1 - meta['ratio']):.1f}× fewer). Median of "
             "interleaved rounds; IQR in brackets.", "",
             "| batch | model | MACs | params | median latency (ms) | speed-up vs dense |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for k in ("dense", "uniform", "latency-aware"):
            macs = r["macs_dense"] if k == "dense" else r["variants"][k]["macs"]
            params = r["params_dense"] if k == "dense" else r["variants"][k]["params"]
            lo, hi = r["iqr_seconds"][k]
            lines.append(f"| {r['batch']} | {k} | {macs / 1e6:.1f} M | {params / 1e6:.2f} M | "
                         f"{1e3 * r['median_seconds'][k]:.2f} [{1e3 * lo:.2f}–{1e3 * hi:.2f}] | "
                         f"{r['speedup_vs_dense'][k]:.2f}× |")
    lines += ["", "| batch | latency-aware / uniform speed (median) | paired per-round median | "
              "rounds aware faster | mean channel ratio per stage: uniform → aware |",
              "|---|---|---|---|---|"]
    for r in results:
        u = r["variants"]["uniform"]["stage_ratios"]
        a = r["variants"]["latency-aware"]["stage_ratios"]
        stages = ", ".join(f"{s} {u[s]:.2f}→{a.get(s, 0):.2f}" for s in u)
        lines.append(f"| {r['batch']} | {r['aware_over_uniform']:.2f}× | "
                     f"{r['paired_ratio_median']:.2f}× | "
                     f"{100 * r['paired_aware_faster_fraction']:.0f} % of {r['rounds']} | "
                     f"{stages} |")
    lines += ["", "Measured per-type costs (latency per MAC, linear = 1): " + "; ".join(
        f"batch {r['batch']}: conv {r['profile_costs']['conv']:.3f}" for r in results), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--max-ratio", type=float, default=0.8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--rounds-large", type=int, default=12)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--profile-repeats", type=int, default=10)
    parser.add_argument("--small-cnn", action="store_true",
                        help="also prune the trained small CNN both ways and measure accuracy")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args.device)
    start = time.perf_counter()
    results = []
    for b in [] if args.skip_resnet else args.batches:
        r = run_batch(b, args, device)
        results.append(r)
        print(json.dumps({k: r[k] for k in ("batch", "median_seconds", "speedup_vs_dense",
                                            "aware_over_uniform", "paired_ratio_median")}),
              flush=True)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU {platform.processor() or platform.machine()}")
    meta = {**env, "threads": args.threads, "device_name": device_name, "size": args.size,
            "ratio": args.ratio, "seconds": time.perf_counter() - start, "args": vars(args)}
    md = markdown(results, meta) if results else ""
    small = small_cnn_check(args) if args.small_cnn else None
    if small:
        md += small_cnn_markdown(small)
    meta["seconds"] = time.perf_counter() - start
    print("\n" + md)
    if args.out:
        write_results(args.out, {"meta": meta, "results": results, "small_cnn": small})
    if args.md:
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
