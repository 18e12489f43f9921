"""Pruning inside fine-tune loops: remove channels gradually while training goes on (layer 7).

:class:`PruningScheduler` is called from any training loop (plain PyTorch, DDP) every ``k``
iterations. Each :meth:`~PruningScheduler.step` raises the pruned fraction along a schedule
(linear, the cubic schedule of Zhu & Gupta 2017, or a predictive one driven by
:mod:`torch_qmprune.dynamics`), prunes through :func:`~torch_qmprune.prune` (Torch-Pruning's
dependency graph with least-squares merging of removed channels into their siblings), and
re-binds the optimizer to the new, narrower parameters so that training simply continues.

Helpers usable on their own: :func:`schedule_fraction` (the schedules), :func:`record_kept_indices`
(which indices Torch-Pruning kept, per parameter), :func:`rebind_optimizer` (carry SGD momentum /
Adam moments over to pruned parameters) and :func:`rewrap_ddp` (DistributedDataParallel must be
rebuilt once its parameters change).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import numbers
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .methods import custom_from_mask
from .methods import remove as _remove_mask
from .serialization import load_pruned, pruned_state
from .structural import QM_CRITERIA, TP_CRITERIA, count_params_and_macs, prune

__all__ = ["PruningScheduler", "schedule_fraction", "record_kept_indices", "rebind_optimizer",
           "rewrap_ddp", "SCHEDULES", "TARGET_KINDS", "MODES"]

SCHEDULES = ("linear", "cubic", "predictive")
TARGET_KINDS = ("macs", "params", "channels")
MODES = ("physical", "mask_then_physical")
_FORMAT = "torch_qmprune.schedule/1"
_CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
#: prune() arguments the scheduler sets itself (not accepted in ``prune_kwargs``).
_RESERVED = ("model", "example_inputs", "ratio", "target", "criterion", "calibration",
             "compensate", "ignored_layers", "layer_ratios")

KeptIndices = dict[str, list[tuple[int, torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------


def schedule_fraction(step: int, steps: int, target: float, schedule: str = "cubic") -> float:
    """Pruned fraction after ``step`` of ``steps`` pruning steps (0 before the first).

    * ``"linear"``: ``target · t / n``.
    * ``"cubic"`` (Zhu & Gupta 2017, Eq. (1) with initial sparsity 0):
      ``s_t = s_f + (s_i − s_f)(1 − t/n)³ = target · (1 − (1 − t/n)³)`` — large steps early, while
      the network still has redundancy to give, small ones near the end.
    * ``"predictive"``: the cubic fractions (what changes is *where* the pruning goes, see
      :class:`PruningScheduler`).

    Example:
        >>> [schedule_fraction(t, 4, 0.5, "linear") for t in range(5)]
        [0.0, 0.125, 0.25, 0.375, 0.5]
        >>> [schedule_fraction(t, 4, 0.5, "cubic") for t in range(5)]
        [0.0, 0.2890625, 0.4375, 0.4921875, 0.5]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step <= steps:
        raise ValueError(f"step must be an int in [0, {steps}], got {step!r}")
    progress = step / steps
    if schedule == "linear":
        return target * progress
    return target * (1.0 - (1.0 - progress) ** 3)


# ---------------------------------------------------------------------------------------------
# which indices survive a Torch-Pruning call, and what that means for an optimizer
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def record_kept_indices(model: nn.Module) -> Iterator[KeptIndices]:
    """Record, for every parameter of ``model`` that Torch-Pruning narrows inside the block,
    the indices it keeps: ``{name: [(dim, kept_indices), ...]}`` in the order applied.

    Works by wrapping ``BasePruningFunc._prune_parameter_and_grad`` (the single place where
    Torch-Pruning 1.6 slices a parameter) for the duration of the block; parameters of other
    models (e.g. the scratch copies of a ratio search) are ignored. Not thread-safe.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> with record_kept_indices(net) as kept:
        ...     _ = prune(net, torch.randn(1, 4), 0.5, criterion="l1", compensate=False)
        >>> sorted(kept), [d for d, _ in kept["2.weight"]], len(kept["0.weight"][0][1])
        (['0.bias', '0.weight', '2.weight'], [1], 3)
    """
    func_cls = tp.pruner.function.BasePruningFunc
    original = func_cls._prune_parameter_and_grad
    names = {id(p): n for n, p in model.named_parameters()}
    alive: list[torch.Tensor] = list(model.parameters())  # keeps ids unique while recording
    kept: KeptIndices = {}

    def wrapped(self, weight, keep_idxs, pruning_dim):
        new = original(self, weight, keep_idxs, pruning_dim)
        name = names.get(id(weight))
        if name is not None:
            idx = torch.as_tensor(list(keep_idxs), dtype=torch.long)
            kept.setdefault(name, []).append((int(pruning_dim) % weight.dim(), idx))
            names[id(new)] = name
            alive.append(new)
        return new

    func_cls._prune_parameter_and_grad = wrapped
    try:
        yield kept
    finally:
        func_cls._prune_parameter_and_grad = original


def _compose(ops: Sequence[tuple[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per-dimension indices into the *original* tensor after a sequence of index_selects."""
    out: dict[int, torch.Tensor] = {}
    for dim, idx in ops:
        out[dim] = out[dim][idx] if dim in out else idx.clone()
    return out


def _slice(tensor: torch.Tensor, ops: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    for dim, idx in ops:
        tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor


@torch.no_grad()
def _scatter(dst: torch.Tensor, value: torch.Tensor, keep: Mapping[int, torch.Tensor]) -> None:
    """``dst[keep grid] = value`` for per-dimension index sets ``keep`` (in place)."""
    if not keep:
        dst.copy_(value)
        return
    dim = next(iter(keep))
    idx = keep[dim].to(dst.device)
    sub = dst.index_select(dim, idx)
    _scatter(sub, value.to(dst.device), {d: i for d, i in keep.items() if d != dim})
    dst.index_copy_(dim, idx, sub)


def rebind_optimizer(
    optimizer: torch.optim.Optimizer,
    old_params: Mapping[str, nn.Parameter],
    model: nn.Module,
    kept: Mapping[str, Sequence[tuple[int, torch.Tensor]]] | None = None,
) -> dict[str, int]:
    """Point ``optimizer`` at ``model``'s current parameters after a physical pruning step.

    Torch-Pruning (and :func:`~torch_qmprune.load_pruned`) replace every narrowed weight with a
    new ``nn.Parameter``, so an optimizer built before the step still holds the old, full-size
    tensors: it would keep updating parameters the model no longer uses. This replaces, in every
    param group and in the same order (so ``optimizer.state_dict()`` stays loadable), each old
    parameter by the model's parameter of the same name, and carries its per-parameter state
    over: every state tensor shaped like the old parameter (SGD ``momentum_buffer``, Adam
    ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, ...) is sliced to the kept indices; scalars
    (``step``) are kept. When a state tensor cannot be sliced (no ``kept`` entry for a narrowed
    parameter, or a state of another shape, e.g. a factored second moment), the parameter's whole
    state is reset, because optimizers initialise their state only when it is empty.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        old_params: ``dict(model.named_parameters())`` taken before the step.
        model: the model after the step (names unchanged).
        kept: ``{name: [(dim, kept_indices), ...]}`` from :func:`record_kept_indices`.

    Returns:
        ``{"rebound": parameters replaced, "carried": states sliced, "reset": states dropped}``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> net(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> before = dict(net.named_parameters())
        >>> with record_kept_indices(net) as kept:
        ...     _ = prune(net, torch.randn(1, 4), 0.5, criterion="l1", compensate=False)
        >>> rebind_optimizer(opt, before, net, kept)
        {'rebound': 3, 'carried': 3, 'reset': 0}
        >>> opt.state[net[0].weight]["momentum_buffer"].shape
        torch.Size([3, 4])
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, "
                        f"got {type(optimizer).__name__}")
    kept = kept or {}
    now = dict(model.named_parameters())
    name_of = {id(p): n for n, p in old_params.items()}
    counts = {"rebound": 0, "carried": 0, "reset": 0}
    new_state: collections.defaultdict = collections.defaultdict(dict)
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = name_of.get(id(p))
            q = now.get(name, p) if name is not None else p
            params.append(q)
            state = optimizer.state.get(p)
            if q is p:
                if state:
                    new_state[q] = state
                continue
            counts["rebound"] += 1
            if not state:
                continue
            carried: dict[str, Any] = {}
            ok = True
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape:
                    if value.shape == q.shape:
                        carried[key] = value
                        continue
                    ops = kept.get(name)
                    sliced = _slice(value, ops) if ops else None
                    if sliced is None or sliced.shape != q.shape:
                        ok = False
                        break
                    carried[key] = sliced.contiguous()
                elif torch.is_tensor(value) and value.dim() > 0:
                    ok = False  # a state of another shape: cannot be mapped, reset
                    break
                else:
                    carried[key] = value
            if ok:
                new_state[q] = carried
                counts["carried"] += 1
            else:
                counts["reset"] += 1
        group["params"] = params
    optimizer.state = new_state
    return counts


def rewrap_ddp(ddp_model: nn.Module, module: nn.Module | None = None) -> nn.Module:
    """A fresh ``DistributedDataParallel`` around ``ddp_model.module`` with the same settings.

    DDP registers its gradient hooks and buckets on the parameters that exist when it is built;
    after a physical pruning step the narrowed parameters are new objects, so the old wrapper
    would all-reduce nothing for them. Build a new one (collective: call it on every rank) and
    stop using the old one. The new wrapper broadcasts rank 0's parameters and buffers once.

    Args:
        ddp_model: the current ``DistributedDataParallel`` wrapper.
        module: wrap this instead of ``ddp_model.module`` (same settings).

    Returns:
        the new wrapper.

    Example:
        >>> rewrap_ddp(nn.Linear(2, 2))   # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        TypeError: rewrap_ddp needs a DistributedDataParallel model, got Linear
    """
    ddp_cls = nn.parallel.DistributedDataParallel
    if not isinstance(ddp_model, ddp_cls):
        raise TypeError(f"rewrap_ddp needs a DistributedDataParallel model, got "
                        f"{type(ddp_model).__name__}")
    module = ddp_model.module if module is None else module
    settings = {
        "device_ids": ddp_model.device_ids,
        "output_device": ddp_model.output_device,
        "dim": ddp_model.dim,
        "process_group": ddp_model.process_group,
        "bucket_cap_mb": ddp_model.bucket_bytes_cap / (1024 * 1024),
        "find_unused_parameters": ddp_model.find_unused_parameters,
        "gradient_as_bucket_view": ddp_model.gradient_as_bucket_view,
        "static_graph": ddp_model.static_graph,
        "mixed_precision": getattr(ddp_model, "mixed_precision", None),
    }
    accepted = inspect.signature(ddp_cls.__init__).parameters
    if "forward_sync_buffers" in accepted:  # torch >= 2.13 renamed broadcast_buffers
        settings["forward_sync_buffers"] = ddp_model.broadcast_buffers
    else:
        settings["broadcast_buffers"] = ddp_model.broadcast_buffers
    return ddp_cls(module, **{k: v for k, v in settings.items() if k in accepted})


# ---------------------------------------------------------------------------------------------
# the scheduler
# ---------------------------------------------------------------------------------------------


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _width(module: nn.Module) -> int:
    return int(module.out_channels if hasattr(module, "out_channels") else module.out_features)


def _post_activation(module: nn.Module, y: torch.Tensor) -> torch.Tensor | None:
    """(samples, channels) of ``relu(y)``: what the next layer reads after BN → ReLU."""
    y = torch.relu(y)
    if y.dim() >= 3:
        return y.movedim(1, -1).reshape(-1, y.shape[1])
    if y.dim() == 2:
        return y
    return None


class PruningScheduler:
    """Gradual structured pruning driven from a training loop.

    Call :meth:`step` every ``k`` iterations, *after* ``optimizer.step()``. Step ``t`` (1 …
    ``steps``) prunes until the fraction ``schedule_fraction(t, steps, target, schedule)`` of the
    dense model's ``target_kind`` (MACs, parameters or output channels of the prunable layers)
    is gone; after ``steps`` calls :attr:`done` is true and further calls do nothing. With
    ``k`` iterations between steps, a fine-tune budget of ``B`` iterations fits
    ``steps = B // k`` steps; leave some iterations after the last one to recover.

    Each step prunes a deep copy of the model with :func:`~torch_qmprune.prune` (the ratio is
    re-solved from the *measured* size, so rounding never accumulates), then loads the result
    into the model in place (:func:`~torch_qmprune.load_pruned`: same module objects, new
    ``nn.Parameter`` objects for every narrowed tensor) and re-binds ``optimizer`` with
    :func:`rebind_optimizer` (momentum and Adam moments sliced to the kept channels). The real
    model is untouched if pruning fails. LR schedulers keep working (they hold the optimizer).

    Modes:
        ``"physical"``: every step removes channels for real (the model gets faster at once).
        ``"mask_then_physical"``: steps before the last zero the chosen output channels with
        drop-in masks (:func:`~torch_qmprune.custom_from_mask` on the producing layers' weights
        and biases and on their BatchNorm's affine parameters; the kept weights receive the
        merged values of the pruned copy); the last step removes them physically. Masks are
        chosen afresh on the dense architecture each step; masked channels are exactly zero,
        so weight-based and data-aware criteria take them first and masks only grow (with
        ``criterion="random"`` they may not).

    Schedules: ``"linear"``, ``"cubic"`` (Zhu & Gupta), ``"predictive"``: cubic fractions,
    but each layer's share of a step follows its *forecast* redundancy (paper §3.3): a
    :class:`~torch_qmprune.dynamics.SpectralTracker` streams the post-activation density
    matrix of every prunable layer (ReLU of the following BatchNorm's output, or of the
    layer's own output) during training, a :class:`~torch_qmprune.dynamics.LindbladPredictor`
    forecasts it ``forecast_horizon`` windows ahead, and layer ``l`` gets the channel ratio
    ``min(0.9, α·w_l)`` with ``w_l ∝ 1 − mean forecast redundancy`` and ``α`` solved for the
    step's target. Steps with fewer than 2 tracked windows per layer fall back to the uniform
    allocation (``history[t]["allocation"]`` says which was used).

    Distributed (``model`` a ``DistributedDataParallel``): rank 0 alone scores and prunes (only
    rank 0 calls ``calibration``) and broadcasts the result — the pruned architecture and
    weights (``pruned_state``) and the kept indices — so every rank applies the identical
    change; then the wrapper is rebuilt (:func:`rewrap_ddp`, a collective). DDP has to be
    re-wrapped because it registers hooks on the parameter objects of its construction time.
    Read the new wrapper from :attr:`model` after each step: ``model = scheduler.model``.
    ``step`` and ``state_dict``/``load_state_dict`` must be called on every rank.

    Checkpointing: :meth:`state_dict` holds the pruned architecture and weights, masks,
    schedule position and history. To resume, build the *dense* model, its optimizer and the
    scheduler as at the start, call :meth:`load_state_dict` (reshapes the model, loads the
    weights, re-binds the optimizer), then ``optimizer.load_state_dict(...)``.

    Args:
        model: the network (or its DDP wrapper), in training.
        example_inputs: an input batch (one sample is enough) for tracing and counting.
        target: final fraction of ``target_kind`` removed, in (0, 1) (0.5 MACs = 2× fewer).
        target_kind: ``"macs"``, ``"params"`` or ``"channels"``.
        steps: number of pruning steps (calls to :meth:`step`).
        schedule: ``"linear"``, ``"cubic"`` or ``"predictive"``.
        criterion: any criterion of :func:`~torch_qmprune.prune` (``"qm"`` default).
        calibration: ``None``, or a callable returning calibration batches (a tensor, or a list
            / iterable of tensors or ``(x, y)`` pairs), called once per step, e.g. a few fresh
            training batches; a tensor or list is used as is every step. Needed by ``"qm"``
            and ``"taylor"`` and by the least-squares merging.
        mode: ``"physical"`` or ``"mask_then_physical"``.
        optimizer: re-bound after every physical step (``None``: nothing to re-bind).
        ignored_layers: layers whose outputs are never pruned (default: the last Linear).
        compensate: merge pruned channels into their siblings (default: when calibration is
            given).
        prune_kwargs: further arguments for :func:`~torch_qmprune.prune` (e.g.
            ``global_pruning``, ``round_to``, ``damping``, ``max_calibration_batches``).
        track_window: predictive: training batches per tracked window.
        forecast_horizon: predictive: windows ahead of the last observed one.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        ...                     nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(16 * 6 * 6, 3))
        >>> x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        >>> sched = PruningScheduler(net, x[:1], target=0.5, steps=2, schedule="linear",
        ...                          calibration=lambda: x, optimizer=opt)
        >>> for it in range(6):
        ...     opt.zero_grad(); nn.functional.cross_entropy(net(x), y).backward(); opt.step()
        ...     if it % 2 == 1 and not sched.done:
        ...         _ = sched.step()
        >>> sched.done, [h["fraction"] for h in sched.history]
        (True, [0.25, 0.5])
        >>> abs(sched.history[-1]["achieved"] - 0.5) < 0.02, net[0].out_channels < 16
        (True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        target: float,
        target_kind: str = "macs",
        steps: int,
        schedule: str = "cubic",
        criterion: str = "qm",
        calibration: Callable[[], Any] | Any = None,
        mode: str = "physical",
        optimizer: torch.optim.Optimizer | None = None,
        ignored_layers: Sequence[nn.Module] | None = None,
        compensate: bool | None = None,
        prune_kwargs: Mapping[str, Any] | None = None,
        track_window: int = 4,
        forecast_horizon: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(target, bool) or not isinstance(target, numbers.Real) \
                or not 0.0 < float(target) < 1.0:
            raise ValueError(f"target must be a fraction in (0, 1), got {target!r}")
        if target_kind not in TARGET_KINDS:
            raise ValueError(f"target_kind must be one of {TARGET_KINDS}, got {target_kind!r}")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if criterion not in QM_CRITERIA + TP_CRITERIA:
            raise ValueError(f"criterion must be one of {QM_CRITERIA + TP_CRITERIA}, "
                             f"got {criterion!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, "
                            f"got {type(optimizer).__name__}")
        if compensate is None:
            compensate = calibration is not None
        if calibration is None and (criterion in ("qm", "taylor") or compensate):
            raise ValueError(
                f"criterion={criterion!r} with compensate={compensate} needs calibration: pass "
                "calibration=<callable returning batches>, e.g. lambda: next(batch_iter)[0], or "
                "use a weight-only criterion such as 'l1' with compensate=False")
        prune_kwargs = dict(prune_kwargs or {})
        bad = sorted(set(prune_kwargs) & set(_RESERVED))
        if bad:
            raise ValueError(f"prune_kwargs may not set {bad}: they are scheduler arguments")
        for name, value in (("track_window", track_window), ("forecast_horizon", forecast_horizon)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self._wrapper = model
        self._base = model.module if _is_ddp(model) else model
        base = self._base
        names = {m: n for n, m in base.named_modules()}
        if ignored_layers is None:
            linears = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
            self._ignored = linears[-1:]
        else:
            self._ignored = []
            for m in ignored_layers:
                if m not in names:
                    raise ValueError(f"ignored layer {type(m).__name__} is not a submodule of the "
                                     f"model: {m!r}")
                self._ignored.append(names[m])
        self.example_inputs = example_inputs
        self.target = float(target)
        self.target_kind = target_kind
        self.steps = int(steps)
        self.schedule = schedule
        self.criterion = criterion
        self.calibration = calibration
        self.mode = mode
        self.optimizer = optimizer
        self.compensate = bool(compensate)
        self.prune_kwargs = prune_kwargs
        self.track_window = int(track_window)
        self.forecast_horizon = int(forecast_horizon)
        self.history: list[dict[str, Any]] = []
        self.last_rebind: dict[str, int] | None = None
        self._step = 0
        self._masks: dict[str, torch.Tensor] = {}
        self._tracker = None
        self._tracked: dict[str, str] = {}
        self._dense = self._measure(base)
        self._attach_tracker()

    # -- public state --------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The model to train now: the (re-built) DDP wrapper, or the plain model."""
        return self._wrapper

    @property
    def module(self) -> nn.Module:
        """The underlying network (``model.module`` under DDP)."""
        return self._base

    @property
    def done(self) -> bool:
        """Whether all ``steps`` steps have been taken."""
        return self._step >= self.steps

    @property
    def step_count(self) -> int:
        """Steps taken so far."""
        return self._step

    @property
    def dense(self) -> dict[str, int]:
        """``{"macs", "params", "channels"}`` of the model the schedule started from."""
        return dict(self._dense)

    def fraction_at(self, step: int) -> float:
        """Scheduled fraction of ``target_kind`` removed after ``step`` steps."""
        return schedule_fraction(step, self.steps, self.target, self.schedule)

    def __repr__(self) -> str:
        return (f"PruningScheduler(target={self.target}, target_kind={self.target_kind!r}, "
                f"schedule={self.schedule!r}, step={self._step}/{self.steps}, "
                f"mode={self.mode!r}, criterion={self.criterion!r})")

    # -- measuring -----------------------------------------------------------------------------

    def _prunable(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in model.named_modules()
                if isinstance(m, _CONV_LINEAR) and n not in self._ignored]

    @torch.no_grad()
    def _measure(self, model: nn.Module) -> dict[str, int]:
        was_training = model.training
        model.eval()
        try:
            params, macs = count_params_and_macs(model, self.example_inputs)
        finally:
            model.train(was_training)
        channels = sum(_width(m) for _, m in self._prunable(model))
        return {"macs": macs, "params": params, "channels": channels}

    def _achieved(self, sizes: Mapping[str, int]) -> float:
        kind = self.target_kind
        return 1.0 - sizes[kind] / max(1, self._dense[kind])

    # -- distributed ---------------------------------------------------------------------------

    def _group(self):
        return self._wrapper.process_group if _is_ddp(self._wrapper) else None

    def _distributed(self) -> bool:
        return (_is_ddp(self._wrapper) and torch.distributed.is_available()
                and torch.distributed.is_initialized()
                and torch.distributed.get_world_size(self._group()) > 1)

    def _is_leader(self) -> bool:
        return not self._distributed() or torch.distributed.get_rank(self._group()) == 0

    def _broadcast(self, payload: Any) -> Any:
        if not self._distributed():
            return payload
        group = self._group()
        src = torch.distributed.get_global_rank(group, 0) if group is not None else 0
        box = [payload if self._is_leader() else None]
        torch.distributed.broadcast_object_list(box, src=src, group=group)
        return box[0]

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> dict[str, Any] | None:
        """Take the next pruning step; returns its history record (``None`` once :attr:`done`).

        The record: ``step``, ``fraction`` (scheduled), ``achieved`` (measured fraction of
        ``target_kind`` removed, relative to the dense model), ``macs``, ``params``,
        ``channels`` (effective sizes: masked channels count as removed), ``allocation``
        (``"uniform"`` or ``"forecast"``), ``physical`` and ``seconds``.
        """
        if self.done:
            return None
        start = time.perf_counter()
        t = self._step + 1
        goal = self.fraction_at(t)
        physical = self.mode == "physical" or t == self.steps
        payload = None
        if self._is_leader():
            payload = self._decide(goal, physical)
        payload = self._broadcast(payload)
        if payload.get("error"):
            raise RuntimeError(f"pruning step {t} failed on rank 0: {payload['error']}")
        if payload["kind"] == "physical":
            self._apply_physical(payload)
        elif payload["kind"] == "masks":
            self._apply_masks(payload)
        record = dict(payload["record"], step=t, fraction=goal, physical=physical,
                      seconds=time.perf_counter() - start)
        self._step = t
        self.history.append(record)
        if payload["kind"] != "none" and _is_ddp(self._wrapper):
            self._wrapper = rewrap_ddp(self._wrapper, self._base)
        if payload["kind"] == "physical":
            self._attach_tracker()
        return record

    def _calibration_batches(self) -> Any:
        cal = self.calibration() if callable(self.calibration) else self.calibration
        if cal is None or torch.is_tensor(cal) or isinstance(cal, (list, tuple)):
            return cal
        return list(cal)  # prune() reads it twice (Grams, then BatchNorm re-estimation)

    def _working_copy(self) -> nn.Module:
        work = copy.deepcopy(self._base)
        _materialize_masks(work, self._masks)
        return work

    def _prune_copy(self, work: nn.Module, ratio: float, layer_ratios=None):
        modules = dict(work.named_modules())
        kwargs = dict(self.prune_kwargs)
        target = "channels" if layer_ratios else self.target_kind
        if (self.criterion == "qm" and target != "channels"
                and not kwargs.get("global_pruning", False)):
            # speed: the exact greedy only needs to run over the channels a layer may lose
            # (a MACs/params ratio f never needs a channel ratio above f)
            imp = dict(kwargs.get("importance_kwargs") or {})
            imp.setdefault("greedy_fraction", min(1.0, ratio + 0.05))
            kwargs["importance_kwargs"] = imp
        with record_kept_indices(work) as kept:
            prune(work, self.example_inputs, ratio, target=target, criterion=self.criterion,
                  calibration=self._calibration_batches() if self.calibration is not None
                  else None, compensate=self.compensate,
                  ignored_layers=[modules[n] for n in self._ignored],
                  layer_ratios={modules[n]: r for n, r in layer_ratios.items()}
                  if layer_ratios else None, **kwargs)
        return kept

    def _decide(self, goal: float, physical: bool) -> dict[str, Any]:
        try:
            work = self._working_copy()
            if physical:
                current = self._measure(work)[self.target_kind]
                dense = self._dense[self.target_kind]
                ratio = 1.0 - (1.0 - goal) * dense / max(1, current)
            else:
                ratio = goal  # masks are decided on the dense architecture
            if ratio <= 1e-6:
                sizes = self._measure(work)
                return {"kind": "none", "record": self._record(sizes, "none")}
            layer_ratios, allocation = None, "uniform"
            if self.schedule == "predictive":
                layer_ratios = self._forecast_allocation(work, min(ratio, 0.999))
                allocation = "forecast" if layer_ratios else "uniform"
            kept = self._prune_copy(work, min(ratio, 0.999), layer_ratios)
            sizes = self._measure(work)
            record = self._record(sizes, allocation)
            if physical:
                state = pruned_state(work)
                state["state_dict"] = {k: v.detach().cpu() for k, v in state["state_dict"].items()}
                return {"kind": "physical", "state": state, "kept": kept, "record": record}
            return dict(self._mask_payload(work, kept), kind="masks", record=record)
        except Exception as exc:
            if not self._distributed():
                raise
            return {"kind": "error", "error": f"{type(exc).__name__}: {exc}"}

    def _record(self, sizes: Mapping[str, int], allocation: str) -> dict[str, Any]:
        return {"achieved": self._achieved(sizes), "macs": sizes["macs"],
                "params": sizes["params"], "channels": sizes["channels"],
                "allocation": allocation}

    # -- physical ------------------------------------------------------------------------------

    def _apply_physical(self, payload: Mapping[str, Any]) -> None:
        base = self._base
        _materialize_masks(base, self._masks)
        self._masks = {}
        old = dict(base.named_parameters())
        device = next(iter(old.values())).device if old else torch.device("cpu")
        load_pruned(base, payload["state"])
        if device.type != "cpu":
            base.to(device)
        if self.optimizer is not None:
            self.last_rebind = rebind_optimizer(self.optimizer, old, base, payload["kept"])

    # -- masks ---------------------------------------------------------------------------------

    def _mask_payload(self, work: nn.Module, kept: KeptIndices) -> dict[str, Any]:
        """Masks (kept output indices along dim 0) and the merged values to write back."""
        masks: dict[str, torch.Tensor] = {}
        values: dict[str, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
        params = dict(work.named_parameters())
        for name, ops in kept.items():
            keep = _compose(ops)
            if 0 in keep:
                masks[name] = keep[0]
            values[name] = (params[name].detach().cpu(), keep)
        buffers: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, buf in work.named_buffers():
            mod_name, _, _ = name.rpartition(".")
            weight = f"{mod_name}.weight" if mod_name else "weight"
            keep = _compose(kept[weight]).get(0) if weight in kept else None
            buffers[name] = (buf.detach().cpu(), keep)
        return {"masks": masks, "values": values, "buffers": buffers}

    @torch.no_grad()
    def _apply_masks(self, payload: Mapping[str, Any]) -> None:
        base = self._base
        modules = dict(base.named_modules())
        for name in list(self._masks):
            if name not in payload["masks"]:  # no longer pruned: unmask
                mod_name, _, leaf = name.rpartition(".")
                getattr(modules[mod_name], leaf + "_mask").fill_(1)
                del self._masks[name]
        for name, keep in payload["masks"].items():
            mod_name, _, leaf = name.rpartition(".")
            _set_mask(modules[mod_name], leaf, keep)
            self._masks[name] = keep.clone()
        for name, (value, keep) in payload["values"].items():
            mod_name, _, leaf = name.rpartition(".")
            module = modules[mod_name]
            param = module._parameters.get(leaf + "_orig", module._parameters.get(leaf))
            _scatter(param.data, value, keep)
        own = dict(base.named_buffers())
        for name, (value, keep) in payload["buffers"].items():
            dst = own.get(name)
            if dst is None or name.endswith("_mask"):
                continue
            if dst.shape == value.shape:
                dst.copy_(value.to(dst.device))
            elif keep is not None and dst.dim() >= 1 and value.shape[0] == len(keep):
                _scatter(dst, value, {0: keep})

    # -- predictive ----------------------------------------------------------------------------

    def _attach_tracker(self) -> None:
        """(Re)start the activation tracker (predictive schedule, leader rank only)."""
        if self._tracker is not None:
            self._tracker.remove()
            self._tracker = None
        if self.schedule != "predictive" or not self._is_leader():
            return
        from .dynamics import SpectralTracker

        probe = copy.deepcopy(self._base).eval()
        names = {m: n for n, m in probe.named_modules()}
        dg = tp.DependencyGraph().build_dependency(probe, example_inputs=self.example_inputs)
        tracked = {}
        for name, layer in self._prunable(probe):
            node = dg.module2node.get(layer)
            nxt = node.outputs[0].module if node is not None and len(node.outputs) == 1 else None
            follow = nxt if isinstance(nxt, nn.modules.batchnorm._BatchNorm) else layer
            tracked[name] = names[follow]
        self._tracked = tracked
        self._tracker = SpectralTracker(self._base, sorted(set(tracked.values())),
                                        window=self.track_window, reference=None,
                                        feature_fn=_post_activation,
                                        product_dtype=torch.float32,
                                        # forecasts need every window's call: skipping calls
                                        # raises the d_FS noise floor above the drift
                                        every=1)

    def _forecast_allocation(self, work: nn.Module, ratio: float) -> dict[str, float] | None:
        """Per-layer channel ratios from forecast redundancy, scaled to remove ``ratio``."""
        from .dynamics import forecast_channel_redundancy

        tracker = self._tracker
        if tracker is None:
            return None
        weights = {}
        for root, tracked in self._tracked.items():
            if len(tracker.history.get(tracked, [])) < 2:
                return None
            red = forecast_channel_redundancy(
                tracker, tracked, self.forecast_horizon, rank=4, windows=6, steps=40,
                polish_steps=10)
            weights[root] = max(0.05, 1.0 - float(red.mean()))
        mean = sum(weights.values()) / len(weights)
        weights = {n: w / mean for n, w in weights.items()}
        base_size = self._measure(work)[self.target_kind]

        def removed(alpha: float) -> float:
            trial = copy.deepcopy(work)
            trial_modules = dict(trial.named_modules())
            prune(trial, self.example_inputs, 0.0, target="channels", criterion="l1",
                  compensate=False, recalibrate_bn=False, atomic_update=False,
                  ignored_layers=[trial_modules[n] for n in self._ignored],
                  layer_ratios={trial_modules[n]: min(0.9, alpha * w) for n, w in weights.items()
                                if alpha * w > 0})
            return 1.0 - self._measure(trial)[self.target_kind] / max(1, base_size)

        lo, hi = 0.0, 0.9 / min(weights.values())
        if removed(hi) < ratio:
            return None
        for _ in range(10):
            mid = 0.5 * (lo + hi)
            if removed(mid) < ratio:
                lo = mid
            else:
                hi = mid
        return {n: min(0.9, hi * w) for n, w in weights.items()}

    # -- checkpointing -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"target": self.target, "target_kind": self.target_kind, "steps": self.steps,
                "schedule": self.schedule, "criterion": self.criterion, "mode": self.mode}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-schedule: the pruned architecture and weights
        (``pruned_state``: widths + state dict), masks, schedule position, dense sizes, history.

        Tensors are references to the live model's (as ``nn.Module.state_dict``): save it
        (``torch.save``) before training on. The optimizer's own state dict is saved apart.
        """
        return {
            "format": _FORMAT,
            "config": self._config(),
            "step": self._step,
            "dense": dict(self._dense),
            "history": [dict(h) for h in self.history],
            "masks": {n: k.tolist() for n, k in self._masks.items()},
            "model": pruned_state(self._base),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: reshape the (dense, freshly built) model to the saved pruned architecture,
        load its weights and masks, re-bind the optimizer, and restore the schedule position.

        Load the optimizer's state dict *after* this call (its tensors have the pruned shapes).
        The predictive schedule's tracker restarts empty (its first step after resuming may fall
        back to the uniform allocation).
        """
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ValueError("not a PruningScheduler state dict (missing format tag "
                             f"{_FORMAT!r})")
        config = self._config()
        for key, saved in state["config"].items():
            if config.get(key) != saved:
                raise ValueError(f"checkpoint was made with {key}={saved!r} but this scheduler "
                                 f"has {key}={config.get(key)!r}")
        base = self._base
        modules = dict(base.named_modules())
        old = dict(base.named_parameters())
        with torch.no_grad():
            for name, keep in state["masks"].items():
                mod_name, _, leaf = name.rpartition(".")
                if mod_name not in modules:
                    raise KeyError(f"checkpoint masks {name!r}, which the model lacks")
                _set_mask(modules[mod_name], leaf, torch.as_tensor(keep, dtype=torch.long))
        self._masks = {n: torch.as_tensor(k, dtype=torch.long) for n, k in state["masks"].items()}
        load_pruned(base, state["model"])
        if self.optimizer is not None:
            self.last_rebind = rebind_optimizer(self.optimizer, old, base, None)
        self._step = int(state["step"])
        self._dense = dict(state["dense"])
        self.history = [dict(h) for h in state["history"]]
        if _is_ddp(self._wrapper):
            self._wrapper = rewrap_ddp(self._wrapper, base)
        self._attach_tracker()


def _set_mask(module: nn.Module, leaf: str, keep: torch.Tensor) -> None:
    """Zero all but the ``keep`` slices (dim 0) of ``module.<leaf>`` with a drop-in mask."""
    param = module._parameters.get(leaf + "_orig", module._parameters.get(leaf))
    mask = torch.zeros_like(param, dtype=param.dtype)
    mask.index_fill_(0, keep.to(mask.device), 1.0)
    if hasattr(module, leaf + "_mask"):
        getattr(module, leaf + "_mask").copy_(mask)
        with torch.no_grad():
            setattr(module, leaf, param * mask)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            custom_from_mask(module, leaf, mask)


def _materialize_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Make the scheduler's masks permanent (zeros stay, reparametrization goes)."""
    modules = dict(model.named_modules())
    for name in masks:
        mod_name, _, leaf = name.rpartition(".")
        module = modules[mod_name]
        if hasattr(module, leaf + "_mask"):
            _remove_mask(module, leaf)
