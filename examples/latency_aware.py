"""Latency-aware pruning (paper §5): measure what each layer costs on this device, then remove
more channels where a MAC is expensive — against uniform pruning at the same MACs.

Run: python examples/latency_aware.py                 (ResNet-18 at 3×112×112, about a minute)
     python examples/latency_aware.py --quick         (seconds)
"""

from __future__ import annotations

import argparse
import copy

import torch
from torchvision.models import resnet18

import torch_qmprune as qmprune


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=112, help="input height = width")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of MACs removed")
    parser.add_argument("--batch", type=int, default=8, help="batch for the latency check")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.repeats = 32, 2, 2
    torch.manual_seed(0)
    dense = resnet18(num_classes=10).eval()
    x1 = torch.randn(1, 3, args.size, args.size)
    calib = torch.randn(32, 3, args.size, args.size)
    # 1. what a MAC costs in each layer, timed on this machine (each layer's marginal cost)
    profile = qmprune.measure_profile(dense, x1, repeats=args.repeats)
    # 2. the same MACs cut, spread uniformly or by cost
    results: dict = {"profile_device": profile.get("device")}
    xb = torch.randn(args.batch, 3, args.size, args.size)
    t_dense = qmprune.measure_latency(dense, xb, repeats=args.repeats)
    for name, kwargs in (("uniform", {}),
                         ("latency-aware", {"allocation": "latency", "device_profile": profile})):
        model = copy.deepcopy(dense)
        report = qmprune.prune(model, x1, args.ratio, target="macs", criterion="l1",
                               calibration=calib, **kwargs)
        seconds = qmprune.measure_latency(model, xb, repeats=args.repeats)
        results[name] = {
            "macs_speedup": report.macs_speedup,
            "estimated": qmprune.estimate_latency(model, x1, profile)["total"],
            "measured_speedup": t_dense / seconds,
        }
        print(f"{name:>13}: {report.macs_speedup:.2f}x fewer MACs, measured speed-up "
              f"{t_dense / seconds:.2f}x (batch {args.batch})")
    results["estimated_dense"] = qmprune.estimate_latency(dense, x1, profile)["total"]
    return results


if __name__ == "__main__":
    main()
