"""Whole attention heads out of a Vision Transformer (torchvision), merged into the survivors.

Run: python examples/vit_heads.py
"""

from __future__ import annotations

import argparse

import torch

import torch_qmprune as qmprune
from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.models import small_vit


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calibration", type=int, default=256)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = small_vit(num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128).eval()
    try:
        x, _ = load_fashion_mnist("train", limit=args.calibration)
    except FileNotFoundError:
        x = torch.randn(args.calibration, 1, 28, 28)
    # compare encoder outputs (the randomly initialized classifier head of torchvision's ViT is
    # all zeros, so logits would say nothing)
    feats = {}
    model.encoder.register_forward_hook(lambda m, i, o: feats.__setitem__("z", o.detach()))
    with torch.no_grad():
        model(x[:64])
        before = feats["z"].flatten(1)
        report = qmprune.prune_attention_heads(model, args.ratio, criterion="qm", calibration=x)
        model(x[:64])
        after = feats["z"].flatten(1)
    cos = float(torch.nn.functional.cosine_similarity(before, after).mean())
    print(report)
    print(f"heads per layer now {qmprune.head_counts(model)}; output cosine to dense {cos:.3f}")
    return {"heads": qmprune.head_counts(model), "cosine": cos}


if __name__ == "__main__":
    main()
