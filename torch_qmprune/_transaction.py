"""All-or-nothing changes to a user's model: snapshot before, restore exactly on failure."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["ModelSnapshot", "atomic"]

_CONTAINERS = ("_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


class ModelSnapshot:
    """Everything needed to put every submodule of ``model`` back as it was.

    Saves each module's attribute dict (with copies of its parameter/buffer/submodule/hook
    containers, so that replaced entries come back as the *same* objects) and a clone of every
    tensor's values (so that in-place edits are undone too). Costs one copy of the weights.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules: list[tuple[nn.Module, dict]] = []
        self._values: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        for module in model.modules():
            saved = dict(module.__dict__)
            for key in _CONTAINERS:
                if key in saved and saved[key] is not None:
                    saved[key] = saved[key].copy()
            self._modules.append((module, saved))
            for tensor in list(module._parameters.values()) + list(module._buffers.values()):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    self._values.append((tensor, tensor.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every module's attributes and every tensor's values back."""
        for module, saved in self._modules:
            module.__dict__.clear()
            module.__dict__.update(saved)
            for key in _CONTAINERS:
                if key in saved and saved[key] is not None:
                    module.__dict__[key] = saved[key].copy()
        for tensor, value in self._values:
            if tensor.shape != value.shape:
                tensor.data = value
            else:
                tensor.copy_(value)


@contextlib.contextmanager
def atomic(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the block; if it raises, restore ``model`` exactly and re-raise."""
    if not enabled:
        yield
        return
    snapshot = ModelSnapshot(model)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
