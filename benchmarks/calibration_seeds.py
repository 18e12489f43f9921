"""How much of a criterion gap on ResNet-18 is calibration noise: qm vs L1 (both with the
least-squares merge and BatchNorm re-estimation) on three different 1,024-image calibration
sets, at the channel ratios of parameter sparsity 0.5 and 0.9 (as solved in
docs/results/table1_resnet18_s2.json), on the full Fashion-MNIST test set.

Run: .venv/bin/python benchmarks/calibration_seeds.py
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch_qmprune.bench import _calibration_batches  # noqa: E402
from torch_qmprune.data import load_fashion_mnist  # noqa: E402
from torch_qmprune.structural import prune  # noqa: E402
from torch_qmprune.training import evaluate  # noqa: E402
from torch_qmprune.zoo import get_baseline  # noqa: E402

LEVELS = {"s0.5": 0.29179687499999996, "s0.9": 0.684}


def main() -> None:
    torch.set_num_threads(2)
    model, _ = get_baseline("resnet18_s2")
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    for level, ratio in LEVELS.items():
        for crit in ("qm", "l1"):
            accs = []
            for seed in (1, 2, 3):
                net = copy.deepcopy(model)
                prune(net, x[:1], ratio, target="channels", criterion=crit,
                      calibration=_calibration_batches(x, y, 1024, seed))
                accs.append(evaluate(net, xt, yt))
            print(level, crit, accs, f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
