"""The budget-conditioned quantum policy gate (paper §4): per-layer keep ratios from the Born
probabilities of a product of Givens rotations, trained on the Lagrangian of Eq. (8), against a
uniform allocation of the same MACs budget, on a CNN trained on Fashion-MNIST.

Run: python examples/policy_gate.py                  (about two minutes on a laptop CPU)
     python examples/policy_gate.py --quick          (tiny slice, seconds)
"""

from __future__ import annotations

import argparse
import copy

import torch_qmprune as qmprune
from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.models import small_cnn
from torch_qmprune.training import evaluate, set_seed, train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of MACs kept")
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--test-limit", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=200, help="policy-gradient steps")
    parser.add_argument("--calibration", type=int, default=512, help="calibration images")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.test_limit, args.steps, args.calibration = 2000, 500, 20, 128
    set_seed(0)
    x, y = load_fashion_mnist("train", limit=args.train_limit)
    xt, yt = load_fashion_mnist("test", limit=args.test_limit)
    model = small_cnn()
    train(model, x, y, epochs=1.0, lr=0.05)
    results: dict = {"dense": evaluate(model, xt, yt)}
    calib = x[:args.calibration]
    for name, kwargs in (("uniform", {}),
                         ("policy", {"allocation": "policy",
                                     "allocation_kwargs": {"steps": args.steps, "seed": 0}})):
        pruned = copy.deepcopy(model)
        report = qmprune.prune(pruned, x[:1], target="macs", budget=args.budget,
                               calibration=calib, **kwargs)
        kept = report.macs_after / report.macs_before
        results[name] = {"accuracy": evaluate(pruned, xt, yt), "macs_kept": kept,
                         "widths": {n: d["after"] for n, d in report.layers.items()}}
        print(f"{name:>7}: keeps {kept:.3f} of MACs (budget {args.budget}), accuracy "
              f"{results[name]['accuracy']:.2f} % (dense {results['dense']:.2f}), widths "
              f"{results[name]['widths']}")
    return results


if __name__ == "__main__":
    main()
