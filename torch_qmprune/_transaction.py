"""All-or-nothing changes to a user's model: snapshot before, restore exactly on failure.

The one home of rollback in the package: :func:`~torch_qmprune.prune`, the low-rank
compression and the drop-in ``torch.nn.utils.prune`` dialect (which snapshots only the modules
it touches, without tensor values) all use it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils.prune import PruningContainer

__all__ = ["ModelSnapshot", "atomic"]

# containers whose *contents* change when parameters, buffers, submodules or hooks are added,
# replaced or removed; they are refilled in place on restore, so that the objects other code
# holds (a hook's RemovableHandle keeps a weak reference to its dict) stay the live ones
_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
               "_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_always_called", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _unique_modules(target: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    modules = target.modules() if isinstance(target, nn.Module) else target
    out, seen = [], set()
    for module in modules:
        if id(module) not in seen:
            seen.add(id(module))
            out.append(module)
    return out


class ModelSnapshot:
    """Everything needed to put ``target`` (a model and all its submodules, or an iterable of
    modules) back as it was.

    Saves each module's attribute dict, the contents of its parameter / buffer / submodule /
    hook containers (in order), the method tuples of ``torch.nn.utils.prune`` containers and,
    with ``values=True``, a clone of every tensor's values (so that in-place edits are undone
    too; costs one copy of the weights). Restoring puts back the *same* objects in the same
    order, refilling the containers in place.
    """

    def __init__(self, target: nn.Module | Iterable[nn.Module], *, values: bool = True) -> None:
        self._modules: list[tuple[nn.Module, dict[str, Any], dict[str, tuple[Any, Any]],
                                  list[tuple[PruningContainer, tuple]]]] = []
        self._values: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        for module in _unique_modules(target):
            attrs = dict(module.__dict__)
            contents = {}
            for key in _CONTAINERS:
                obj = attrs.get(key)
                if isinstance(obj, dict):
                    contents[key] = (obj, list(obj.items()))
                elif isinstance(obj, set):
                    contents[key] = (obj, set(obj))
            pruning = [(hook, hook._pruning_methods)
                       for hook in module._forward_pre_hooks.values()
                       if isinstance(hook, PruningContainer)]
            self._modules.append((module, attrs, contents, pruning))
            if not values:
                continue
            for tensor in list(module._parameters.values()) + list(module._buffers.values()):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    self._values.append((tensor, tensor.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every module's attributes, containers and every tensor's values back."""
        for module, attrs, contents, pruning in self._modules:
            module.__dict__.clear()
            module.__dict__.update(attrs)  # bypasses nn.Module.__setattr__: same objects
            for obj, items in contents.values():
                obj.clear()
                obj.update(items)
            for hook, methods in pruning:
                hook._pruning_methods = methods
        for tensor, value in self._values:
            if tensor.shape != value.shape:
                tensor.data = value
            else:
                tensor.copy_(value)


@contextlib.contextmanager
def atomic(target: nn.Module | Iterable[nn.Module], enabled: bool = True, *,
           values: bool = True) -> Iterator[None]:
    """Run the block; if it raises, restore ``target`` exactly and re-raise.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> try:
        ...     with atomic(net):
        ...         _ = net[0].weight.data.zero_()
        ...         _ = net.append(nn.ReLU())
        ...         raise RuntimeError("midway")
        ... except RuntimeError:
        ...     pass
        >>> len(net), bool(net[0].weight.abs().sum() > 0)
        (1, True)
    """
    if not enabled:
        yield
        return
    snapshot = ModelSnapshot(target, values=values)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
