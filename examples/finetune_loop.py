"""Gradual pruning inside a plain PyTorch fine-tune loop: the Fashion-MNIST CNN to 2× fewer MACs.

The scheduler is stepped every ``k`` iterations, after ``optimizer.step()``; each step removes
channels physically (merging them into their siblings) and re-binds the optimizer, so the loop
itself needs no change beyond two lines.

Run: python examples/finetune_loop.py                  (full data; ~5 min on 2 busy CPU cores)
     python examples/finetune_loop.py --quick          (tiny configuration, well under a minute)
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.schedule import PruningScheduler
from torch_qmprune.structural import count_params_and_macs
from torch_qmprune.training import evaluate
from torch_qmprune.zoo import get_baseline


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="fine-tune budget")
    parser.add_argument("--steps", type=int, default=4, help="pruning steps")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of MACs removed")
    parser.add_argument("--schedule", default="cubic", choices=["linear", "cubic", "predictive"])
    parser.add_argument("--criterion", default="qm")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny configuration (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.steps, args.train_limit, args.test_limit = 24, 2, 2000, 500

    torch.manual_seed(args.seed)
    model, info = get_baseline("small_cnn", train_limit=args.train_limit)
    x, y = load_fashion_mnist("train", limit=args.train_limit)
    xt, yt = load_fashion_mnist("test", limit=args.test_limit)
    dense_acc = evaluate(model, xt, yt)
    _, dense_macs = count_params_and_macs(model, x[:1])

    gen = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    lr_at = lambda it: 0.5 * (1 + math.cos(math.pi * it / args.iterations))   # cosine decay
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    every = max(1, args.iterations // (args.steps + 1))   # last step leaves time to recover
    scheduler = PruningScheduler(
        model, x[:1], target=args.target, target_kind="macs", steps=args.steps,
        schedule=args.schedule, criterion=args.criterion, optimizer=optimizer,
        calibration=lambda: x[torch.randint(0, len(x), (1024,), generator=gen)],
        track_window=max(1, every // 5))

    model.train()
    loss_fn = nn.CrossEntropyLoss()
    for it in range(args.iterations):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        lr_sched.step()
        if (it + 1) % every == 0 and not scheduler.done:          # <- the two added lines
            record = scheduler.step()
            print(f"iter {it + 1:4d}: {record['achieved']:.1%} of MACs removed "
                  f"({record['macs']:,} MACs, {record['seconds']:.1f} s)")
    while not scheduler.done:      # a budget too short for every step: finish the schedule
        scheduler.step()
    final_acc = evaluate(model, xt, yt)
    _, macs = count_params_and_macs(model, x[:1])
    result = {"dense_accuracy": dense_acc, "accuracy": final_acc, "macs": macs,
              "dense_macs": dense_macs, "speedup": dense_macs / macs,
              "history": scheduler.history, "baseline": info.get("checkpoint")}
    print(f"dense {dense_acc:.2f} % -> pruned {final_acc:.2f} %, {dense_macs / macs:.2f}x fewer "
          f"MACs after {args.iterations} iterations ({args.schedule}, {args.criterion})")
    return result


if __name__ == "__main__":
    main()
