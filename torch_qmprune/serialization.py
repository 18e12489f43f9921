"""Saving a physically pruned model and re-loading it into a fresh, unpruned instance.

A pruned network has narrower layers than its constructor builds, so ``load_state_dict`` into a
fresh model fails on shapes. :func:`save_pruned` stores the state dict plus every layer's
width attributes (plain ints, loadable with ``torch.load(weights_only=True)``);
:func:`load_pruned` re-shapes the fresh model's layers to match, then loads strictly.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["pruned_state", "save_pruned", "load_pruned"]

#: Integer (or int-tuple) attributes that describe a layer's width and must follow its tensors.
WIDTH_ATTRIBUTES = (
    "in_channels", "out_channels", "in_features", "out_features", "num_features", "groups",
    "embed_dim", "kdim", "vdim", "num_heads", "head_dim", "normalized_shape",
    "num_attention_heads", "attention_head_size", "all_head_size", "hidden_dim", "mlp_dim",
    "num_embeddings", "embedding_dim",
)


def pruned_state(model: nn.Module) -> dict[str, Any]:
    """``{"state_dict": ..., "attributes": {module: {attr: int}}}`` of a (pruned) model."""
    attrs: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        found = {}
        for attr in WIDTH_ATTRIBUTES:
            value = module.__dict__.get(attr)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) or (isinstance(value, tuple)
                                          and all(isinstance(v, int) for v in value)):
                found[attr] = value
        if found:
            attrs[name] = found
    return {"state_dict": model.state_dict(), "attributes": attrs, "format": "torch_qmprune/1"}


def save_pruned(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a pruned model so that :func:`load_pruned` can rebuild it from a fresh instance.

    Example:
        >>> import tempfile, os
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> path = os.path.join(tempfile.mkdtemp(), "m.pt"); save_pruned(net, path)
        >>> load_pruned(torch.nn.Sequential(torch.nn.Linear(4, 3)), path)[0].out_features
        3
    """
    torch.save(pruned_state(model), path)


@torch.no_grad()
def load_pruned(model: nn.Module, source: str | os.PathLike | dict[str, Any]) -> nn.Module:
    """Re-shape a fresh ``model`` to the saved pruned widths and load the weights (strict).

    Everything is checked before anything changes: an unknown key or a tensor whose rank
    differs raises ``KeyError``/``ValueError`` naming it, and the model is left untouched.
    Returns ``model`` (modified in place).
    """
    state = torch.load(source, map_location="cpu", weights_only=True) \
        if not isinstance(source, dict) else source
    if state.get("format") != "torch_qmprune/1":
        raise ValueError("not a torch_qmprune pruned checkpoint (missing format tag); "
                         "save it with torch_qmprune.save_pruned(model, path)")
    sd: dict[str, torch.Tensor] = state["state_dict"]
    modules = dict(model.named_modules())
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    plan = []
    for key, value in sd.items():
        mod_name, _, leaf = key.rpartition(".")
        module = modules[mod_name]
        current = own[key]
        if current.dim() != value.dim():
            raise ValueError(f"{key}: saved rank {value.dim()} vs model rank {current.dim()}")
        if current.shape != value.shape:
            plan.append((module, leaf, value))
    for name in state["attributes"]:
        if name not in modules:
            raise KeyError(f"checkpoint describes module {name!r} which the model lacks")
    for module, leaf, value in plan:
        if leaf in module._parameters:
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(
                torch.empty_like(value, dtype=old.dtype, device=old.device),
                requires_grad=old.requires_grad)
        else:
            old = module._buffers[leaf]
            module._buffers[leaf] = torch.empty_like(value, dtype=old.dtype, device=old.device)
    for name, attrs in state["attributes"].items():
        for attr, value in attrs.items():
            setattr(modules[name], attr, value)
    model.load_state_dict(sd, strict=True)
    return model
