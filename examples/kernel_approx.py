"""Controllable kernel approximation (paper §3.2, Eq. 5): replace layers by rank-q factor pairs,
q the smallest rank whose truncated density matrix has S(ρ_q ‖ ρ) ≤ δ.

A SmallCNN trained briefly on Fashion-MNIST is compressed in the activation basis (ρ of each
layer's outputs on calibration images): the script prints the rank chosen per layer, the
parameters saved, the predicted and measured output errors, and the accuracy before and after.

Run: python examples/kernel_approx.py --delta 0.05
     python examples/kernel_approx.py --quick                (seconds, tiny slice)
"""

from __future__ import annotations

import argparse
import copy

import torch

import torch_qmprune as qmprune
from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.models import small_cnn
from torch_qmprune.training import evaluate, train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delta", type=float, default=0.05, help="relative-entropy budget, nats")
    parser.add_argument("--train-limit", type=int, default=6000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.test_limit, args.calibration, args.epochs = 512, 256, 256, 0.5
    torch.manual_seed(0)
    x, y = load_fashion_mnist("train", limit=args.train_limit)
    xt, yt = load_fashion_mnist("test", limit=args.test_limit)
    model = small_cnn()
    train(model, x, y, epochs=args.epochs)
    dense = evaluate(model, xt, yt)

    compressed = copy.deepcopy(model).eval()
    report = qmprune.lowrank_compress(compressed, args.delta, calibration=x[:args.calibration])
    for name, layer in report.layers.items():
        if layer.replaced:
            print(f"{name:>14}: rank {layer.rank}/{layer.full_rank}, δ = {layer.delta:.4f}, "
                  f"predicted error {layer.predicted_error:.3f}, measured "
                  f"{layer.output_error:.3f}, params {layer.params_before:,} -> "
                  f"{layer.params_after:,}")
    # the compressed network is an ordinary nn.Module: it runs, and is measured on unseen images
    with torch.no_grad():
        out_dense, out_comp = model.eval()(xt), compressed(xt)
    test_error = float((out_comp - out_dense).norm() / out_dense.norm())
    accuracy = evaluate(compressed, xt, yt)
    saved = 1.0 - report.param_ratio
    print(f"{report}\nparams saved {saved:.1%}; output error on test images {test_error:.4f}; "
          f"accuracy {dense:.2f} % -> {accuracy:.2f} %")
    return {"replaced": report.replaced, "params_before": report.params_before,
            "params_after": report.params_after, "params_saved": saved,
            "calibration_error": report.output_error, "test_error": test_error,
            "dense": dense, "compressed": accuracy, "output_shape": tuple(out_comp.shape)}


if __name__ == "__main__":
    main()
