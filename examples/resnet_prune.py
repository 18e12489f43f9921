"""Physical pruning of a ResNet-18 trained on Fashion-MNIST, one shot, with redundancy merging.

Run: python examples/resnet_prune.py --train-limit 60000 --epochs 2   (CPU: ~15 min to train)
     python examples/resnet_prune.py --quick                          (seconds, tiny slice)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import torch_qmprune as qmprune
from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.models import resnet18_fmnist
from torch_qmprune.training import evaluate, train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-limit", type=int, default=6000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of parameters")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.test_limit, args.epochs = 512, 256, 0.5
    x, y = load_fashion_mnist("train", limit=args.train_limit)
    xt, yt = load_fashion_mnist("test", limit=args.test_limit)
    model = resnet18_fmnist(stem_stride=2)
    train(model, x, y, epochs=args.epochs, lr=0.1, augment=True)
    dense = evaluate(model, xt, yt)
    results = {"dense": dense}
    for criterion in ("qm", "l1"):
        pruned = copy.deepcopy(model)
        report = qmprune.prune(pruned, x[:1], args.sparsity, target="params",
                               criterion=criterion, calibration=x[:512])
        results[criterion] = evaluate(pruned, xt, yt)
        print(f"{criterion:>3}: {report}  accuracy {results[criterion]:.2f} % (dense {dense:.2f})")
    # save and re-load the pruned architecture into a fresh, unpruned ResNet-18
    path = Path(tempfile.mkdtemp()) / "resnet18_pruned.pt"
    qmprune.save_pruned(pruned, path)
    reloaded = qmprune.load_pruned(resnet18_fmnist(stem_stride=2), path).eval()
    results["reload_identical"] = bool(torch.equal(reloaded(xt[:8]), pruned.eval()(xt[:8])))
    results["param_sparsity"] = report.param_sparsity
    return results


if __name__ == "__main__":
    main()
