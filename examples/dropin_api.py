"""Drop-in torch.nn.utils.prune dialect: spectral masks next to torch's own methods.

Run: python examples/dropin_api.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import torch_qmprune as qmprune


def main() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    x = torch.randn(4, 3, 8, 8)

    # channels of one conv, by spectral-state distance to their surviving siblings (§2.3, §3.1)
    qmprune.spectral_structured(model[0], "weight", amount=0.25, dim=0)
    # weights of several layers against one global threshold, spectral element scores
    qmprune.global_unstructured([(model[2], "weight"), (model[5], "weight")],
                                pruning_method=qmprune.SpectralUnstructured, amount=0.5)
    kept_channels = int((model[0].weight_mask.flatten(1).sum(1) > 0).sum())
    sparsity = float((model[2].weight == 0).float().mean())

    # deep copies and state dicts of pruned models just work
    clone = copy.deepcopy(model)
    fresh = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    qmprune.load_pruned_state_dict(fresh, model.state_dict())
    same = bool(torch.equal(fresh(x), model(x)) and torch.equal(clone(x), model(x)))

    # make it permanent, like torch's prune.remove
    for module in (model[0], model[2], model[5]):
        qmprune.remove(module, "weight")
    print(f"conv1 keeps {kept_channels}/16 channels; conv2 weight sparsity {sparsity:.2f}; "
          f"copy and reloaded model identical: {same}; pruned now: {qmprune.is_pruned(model)}")
    return {"kept_channels": kept_channels, "sparsity": sparsity, "same": same,
            "still_pruned": qmprune.is_pruned(model)}


if __name__ == "__main__":
    main()
