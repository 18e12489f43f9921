"""QM-FRG (paper §3.1): the redundancy graph of a network's layers, clusters and a heatmap.

Run: python examples/qmfrg_analysis.py --out qmfrg.png
"""

from __future__ import annotations

import argparse

import torch

import torch_qmprune as qmprune
from torch_qmprune.models import resnet18_fmnist


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="qmfrg_layers.png")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = resnet18_fmnist()
    graph = qmprune.redundancy_graph(model, level="layer", metric="fs")
    clusters = graph.cluster()
    reps = graph.representatives(clusters)
    for a, b, d in graph.most_redundant_pairs(5):
        print(f"d_FS({a}, {b}) = {d:.4f}")
    print(f"{len(graph)} layers in {len(clusters)} clusters; representatives: "
          + ", ".join(graph.names[r] for r in reps))
    graph.plot_heatmap(args.out)
    return {"n": len(graph), "clusters": clusters, "heatmap": args.out}


if __name__ == "__main__":
    main()
