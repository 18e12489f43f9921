"""One-call physical pruning on Torch-Pruning's dependency graph, with redundancy merging.

Data flow of :func:`prune` (ARCHITECTURE.md): model + example inputs → dependency graph →
groups → calibration forward with hooks (once) → per-group scores → ranking (local / global,
channel ratio solved for a params or MACs target) → least-squares merging of each pruned channel
into its siblings at every consumer → physical removal → BatchNorm re-estimation → report.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from ._transaction import atomic
from ._validation import check_budget, check_ratio
from .calibration import (
    CalibrationStats,
    collect_input_grams,
    recalibrate_batchnorm,
)
from .importance import SpectralImportance, _is_out

__all__ = [
    "prune",
    "PruneReport",
    "compensate_group",
    "make_importance",
    "TP_CRITERIA",
    "QM_CRITERIA",
    "count_params_and_macs",
    "register_allocation",
    "available_allocations",
]

TP_CRITERIA = ("l1", "l2", "fpgm", "lamp", "taylor", "random")
QM_CRITERIA = ("qm", "literal", "loo", "hybrid")
TARGETS = ("channels", "params", "macs", "latency")

#: ``allocation name -> allocator``; an allocator turns ``prune``'s arguments into per-layer
#: channel ratios (``{layer: ratio}``) plus an info dict. Higher layers of the package register
#: theirs (``"latency"`` from :mod:`torch_qmprune.hardware`, ``"policy"`` from
#: :mod:`torch_qmprune.policy`) so this module never imports them.
Allocator = Callable[..., "tuple[Mapping[nn.Module, float], dict[str, Any]]"]
_ALLOCATIONS: dict[str, Allocator] = {}


def register_allocation(name: str, allocator: Allocator, *, overwrite: bool = False) -> None:
    """Teach :func:`prune` a new ``allocation=`` strategy (per-layer channel ratios).

    ``allocator(model, example_inputs, *, ratio, target, calibration, ignored_layers, round_to,
    device, device_profile, budget, **allocation_kwargs)`` must leave ``model`` unchanged and
    return ``({layer: channel_ratio}, info)``; :func:`prune` then removes channels with those
    ratios through its usual pipeline (criterion, merging, BatchNorm re-estimation).

    Example:
        >>> def half_first_conv(model, example_inputs, **kw):
        ...     conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        ...     return {conv: 0.5}, {"note": "only the first conv"}
        >>> register_allocation("first-conv", half_first_conv, overwrite=True)
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
        >>> rep = prune(net, torch.randn(1, 1, 8, 8), criterion="l1", compensate=False,
        ...             allocation="first-conv")
        >>> net[0].out_channels, net[2].out_channels, rep.allocation
        (4, 8, 'first-conv')
    """
    if not isinstance(name, str) or not name or name == "uniform":
        raise ValueError(f"allocation name must be a non-empty string other than 'uniform', "
                         f"got {name!r}")
    if not callable(allocator):
        raise TypeError(f"allocator must be callable, got {type(allocator).__name__}")
    if name in _ALLOCATIONS and not overwrite and _ALLOCATIONS[name] is not allocator:
        raise ValueError(f"allocation {name!r} is already registered; pass overwrite=True")
    _ALLOCATIONS[name] = allocator


def available_allocations() -> list[str]:
    """Names ``prune(..., allocation=...)`` accepts: ``"uniform"`` plus the registered ones."""
    return ["uniform", *sorted(_ALLOCATIONS)]


@dataclass
class PruneReport:
    """What :func:`prune` did: sizes before/after, per-layer widths, times."""

    criterion: str
    target: str
    ratio: float
    channel_ratio: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    compensated_layers: int = 0
    calibration_seconds: float = 0.0
    scoring_seconds: float = 0.0
    total_seconds: float = 0.0
    bn_recalibrated: int = 0
    allocation: str = "uniform"
    allocation_info: dict[str, Any] = field(default_factory=dict)
    allocation_seconds: float = 0.0

    @property
    def param_sparsity(self) -> float:
        return 1.0 - self.params_after / max(1, self.params_before)

    @property
    def macs_speedup(self) -> float:
        return self.macs_before / max(1, self.macs_after)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["param_sparsity"] = self.param_sparsity
        d["macs_speedup"] = self.macs_speedup
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        return (
            f"PruneReport(criterion={self.criterion!r}, params {self.params_before:,} -> "
            f"{self.params_after:,} ({100 * self.param_sparsity:.1f}% removed), MACs "
            f"{self.macs_before:,} -> {self.macs_after:,} ({self.macs_speedup:.2f}x fewer), "
            f"{len(self.layers)} layers, {self.total_seconds:.2f}s)"
        )


def count_params_and_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(parameters, MACs)`` of one forward pass on ``example_inputs`` (Torch-Pruning's
    counter)."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(params), int(macs)


def make_importance(criterion: str, stats: CalibrationStats | None = None, **kwargs: Any):
    """The importance object behind a ``criterion`` name (ours or Torch-Pruning's)."""
    if criterion in QM_CRITERIA:
        return SpectralImportance(criterion, stats=stats, **kwargs)
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "fpgm":
        return tp.importance.FPGMImportance()
    if criterion == "lamp":
        return tp.importance.LAMPImportance()
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    if criterion == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"criterion must be one of {QM_CRITERIA + TP_CRITERIA}, got {criterion!r}")


class _CachedImportance(tp.importance.Importance):
    """Scores each group once (keyed by root layer name), so ratio search re-uses them."""

    def __init__(self, inner, name_of: Callable[[nn.Module], str]) -> None:
        self.inner, self.name_of, self.cache = inner, name_of, {}

    def key(self, group) -> tuple:
        dep = group[0][0]
        return (self.name_of(dep.target.module), _is_out(dep), len(group[0][1]))

    def __call__(self, group):
        k = self.key(group)
        if k not in self.cache:
            self.cache[k] = self.inner(group)
        return self.cache[k]


def _following_batchnorm(dg: tp.DependencyGraph, layer: nn.Module) -> nn.Module | None:
    node = dg.module2node.get(layer)
    if node is None or len(node.outputs) != 1:
        return None
    nxt = node.outputs[0].module
    return nxt if isinstance(nxt, nn.modules.batchnorm._BatchNorm) else None


@torch.no_grad()
def compensate_group(
    group, stats: CalibrationStats, dg: tp.DependencyGraph | None = None, *, damping: float = 1e-4
) -> int:
    """Merge the channels a group is about to remove into their siblings, at every consumer.

    For consumer input features split into pruned P and kept K, solve
    ``X_P ≈ [X_K, 1] B`` by ridge least squares on the calibration Gram, then fold:
    ``W_K ← W_K + W_P Bᵀ`` for every kernel tap, and the constant into the consumer's bias
    (or into the running mean of the BatchNorm that follows a bias-free consumer; otherwise
    the regression is done without a constant). Returns the number of consumers updated.
    """
    updated = 0
    for dep, idxs in group:
        layer = dep.layer
        if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) or _is_out(dep):
            continue
        entry = stats.get(layer)
        if entry is None or len(idxs) == 0:
            continue
        d = entry.dim
        pruned = torch.tensor(sorted(set(int(i) for i in idxs)))
        keep_mask = torch.ones(d, dtype=torch.bool)
        keep_mask[pruned] = False
        kept = torch.nonzero(keep_mask).view(-1)
        bn = None
        use_const = layer.bias is not None
        if not use_const and dg is not None:
            bn = _following_batchnorm(dg, layer)
            use_const = bn is not None and bn.track_running_stats and bn.running_mean is not None
        k_idx = torch.cat([kept, torch.tensor([d])]) if use_const else kept
        g = entry.gram.double()
        g_kk = g[k_idx][:, k_idx]
        ridge = damping * float(g_kk.diagonal().mean().clamp_min(1e-12))
        g_kk = g_kk + ridge * torch.eye(len(k_idx), dtype=g.dtype)
        b = torch.linalg.solve(g_kk, g[k_idx][:, pruned])  # (|K|(+1), |P|)
        w = layer.weight
        wd = w.detach().double().cpu()
        w_p = wd[:, pruned]  # (out, |P|, *k)
        b_k = b[: len(kept)]  # (|K|, |P|)
        delta = torch.einsum("op...,qp->oq...", w_p, b_k)
        wd[:, kept] += delta
        w.data.copy_(wd.to(w.dtype))
        if use_const:
            const = torch.einsum("op...,p->o", w_p, b[-1])
            if layer.bias is not None:
                layer.bias.data += const.to(layer.bias.dtype).to(layer.bias.device)
            else:
                # conv → BN: y = γ(z + c − μ)/σ + β, so adding c to z is subtracting it from μ.
                bn.running_mean.data -= const.to(bn.running_mean.dtype).to(bn.running_mean.device)
        updated += 1
    return updated


def _validate(
    model: nn.Module, ratio: float, target: str, criterion: str, calibration: Any, compensate: bool
) -> float:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ratio = check_ratio(ratio, "ratio")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if criterion not in QM_CRITERIA + TP_CRITERIA:
        raise ValueError(f"criterion must be one of {QM_CRITERIA + TP_CRITERIA}, got {criterion!r}")
    if (criterion in ("qm", "taylor") or compensate) and calibration is None:
        raise ValueError(
            f"criterion={criterion!r} with compensate={compensate} needs calibration data: pass "
            "calibration=<tensor or iterable of batches> (a few hundred to a few thousand "
            "inputs), or use compensate=False with a weight-only criterion such as 'l1'"
        )
    return ratio


def _taylor_gradients(
    model: nn.Module, calibration: Any, loss_fn: Callable | None, max_batches: int | None, device
) -> None:
    """Accumulate gradients for Torch-Pruning's Taylor importance on labelled calibration data."""
    model.zero_grad(set_to_none=True)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    seen = 0
    for i, batch in enumerate(calibration if not torch.is_tensor(calibration) else []):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                "criterion='taylor' needs labelled calibration batches (inputs, targets)"
            )
        x, y = batch[0], batch[1]
        if device is not None:
            x, y = x.to(device), y.to(device)
        loss_fn(model(x), y).backward()
        seen += 1
    if seen == 0:
        raise ValueError("criterion='taylor' needs an iterable of (inputs, targets) batches")


def _run_pruner(
    model,
    example_inputs,
    importance,
    channel_ratio,
    *,
    ignored_layers,
    global_pruning,
    round_to,
    num_heads,
    stats,
    compensate,
    dry_run=False,
    damping: float = 1e-4,
    layer_ratios=None,
):
    kwargs = dict(
        importance=importance,
        pruning_ratio=channel_ratio,
        ignored_layers=ignored_layers,
        global_pruning=global_pruning,
        round_to=round_to,
        pruning_ratio_dict=dict(layer_ratios or {}),
    )
    if num_heads:
        kwargs.update(num_heads=num_heads, prune_num_heads=False, prune_head_dims=True)
    pruner = tp.pruner.BasePruner(model, example_inputs, **kwargs)
    compensated = 0
    for group in pruner.step(interactive=True):
        if compensate and stats is not None and not dry_run:
            compensated += compensate_group(group, stats, pruner.DG, damping=damping)
        group.prune()
    return pruner, compensated


class _Progress:
    """A tqdm bar over prune()'s stages (on stderr), or nothing when ``enabled`` is False."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc=desc, unit="step", dynamic_ncols=True, leave=False)

    def add(self, n: int, stage: str) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.set_postfix_str(stage, refresh=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _solve_channel_ratio(
    model,
    example_inputs,
    importance,
    goal,
    target,
    *,
    ignored_layers,
    global_pruning,
    round_to,
    num_heads,
    base,
    iters: int = 9,
    progress: _Progress | None = None,
) -> float:
    """Bisection on the channel ratio so that params (or MACs) fall by ``goal`` (9 halvings of
    [0, 0.9]: the ratio to 0.002, the size to well within 1 %)."""
    idx = 0 if target == "params" else 1

    def removed(r: float) -> float:
        if progress is not None:
            progress.step()
        trial = copy.deepcopy(model)
        name_map = {m: n for n, m in model.named_modules()}
        trial_names = {mt: name_map[m] for (m, mt) in zip(model.modules(), trial.modules())}
        imp = (
            _CachedImportance(importance.inner, lambda m: trial_names.get(m, ""))
            if isinstance(importance, _CachedImportance)
            else importance
        )
        if isinstance(importance, _CachedImportance):
            imp.cache = importance.cache
        ignored = [dict(zip(model.modules(), trial.modules()))[m] for m in ignored_layers]
        _run_pruner(
            trial,
            example_inputs,
            imp,
            r,
            ignored_layers=ignored,
            global_pruning=global_pruning,
            round_to=round_to,
            num_heads={
                dict(zip(model.modules(), trial.modules()))[k]: v
                for k, v in (num_heads or {}).items()
            },
            stats=None,
            compensate=False,
            dry_run=True,
        )
        if target == "params":
            return 1.0 - sum(p.numel() for p in trial.parameters()) / base[0]
        return 1.0 - count_params_and_macs(trial, example_inputs)[idx] / base[idx]

    # Torch-Pruning skips a layer whose ratio would leave no channel, so the reachable maximum
    # is not at ratio→1: take the best of a few high ratios as the upper end.
    if progress is not None:
        progress.add(iters + 1, "solving the channel ratio")
    lo, hi, best = 0.0, 0.9, removed(0.9)
    # narrow layers (< 10 channels) are skipped at 0.9 already: try lower ends too
    for cand in (0.95, 0.98, 0.8, 0.6):
        if best >= goal:
            break
        value = removed(cand)
        if value > best:
            hi, best = cand, value
    if best < goal:
        raise ValueError(
            f"ratio={goal} of {target} cannot be reached by channel pruning "
            f"(at most {best:.3f} with the given ignored layers)"
        )
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if removed(mid) < goal:
            lo = mid
        else:
            hi = mid
    return hi


def prune(
    model: nn.Module,
    example_inputs: Any,
    ratio: float | None = None,
    *,
    target: str = "channels",
    criterion: str = "qm",
    calibration: Any = None,
    compensate: bool = True,
    recalibrate_bn: bool | None = None,
    num_heads: dict[nn.Module, int] | None = None,
    ignored_layers: Sequence[nn.Module] | None = None,
    global_pruning: bool = False,
    round_to: int | None = None,
    max_calibration_batches: int | None = None,
    loss_fn: Callable | None = None,
    device: str | torch.device | None = None,
    importance_kwargs: dict[str, Any] | None = None,
    damping: float = 1e-4,
    layer_ratios: dict[nn.Module, float] | None = None,
    allocation: str | None = None,
    device_profile: Any = None,
    budget: float | None = None,
    allocation_kwargs: dict[str, Any] | None = None,
    atomic_update: bool = True,
    progress: bool = False,
) -> PruneReport:
    """Physically remove channels from ``model`` in place (one shot), merging them into siblings.

    Args:
        model: any network Torch-Pruning can trace (ResNets, ViTs, MLPs, ...).
        example_inputs: a tensor (or tuple/dict) the model accepts, for tracing and counting.
        ratio: fraction to remove (default 0.5, or ``1 - budget``), of channels
            (``target="channels"``), parameters (``"params"``, the paper's sparsity), MACs
            (``"macs"``; 0.5 = 2× fewer MACs) or estimated latency (``"latency"``: Σ c·MACs
            under ``device_profile``, §5).
        target: what ``ratio`` measures; for params/MACs the per-layer channel ratio is solved
            by bisection on scored copies of the model; ``"latency"`` needs ``device_profile``
            and uses the latency-aware allocation.
        criterion: ``"qm"`` (default: activation-state redundancy, see
            :class:`~torch_qmprune.SpectralImportance`), ``"literal"`` (paper §3.1 sibling FS
            distance), ``"loo"``, ``"hybrid"``, or Torch-Pruning's ``"l1"``, ``"l2"``,
            ``"fpgm"``, ``"lamp"``, ``"taylor"``, ``"random"`` — all through the same pipeline.
        calibration: tensor or iterable of batches (``(x, y)`` pairs allowed) used for the Grams,
            Taylor gradients and BatchNorm re-estimation.
        compensate: merge every pruned channel into its siblings at each consumer by least
            squares on calibration activations (any criterion).
        recalibrate_bn: re-estimate BatchNorm statistics afterwards (default: when calibration
            is given).
        num_heads: ``{qkv_layer: heads}`` for attention layers (head dims shrink uniformly).
        ignored_layers: layers whose outputs are never pruned (default: the last Linear).
        global_pruning: rank channels of all layers together instead of per layer.
        round_to: keep channel counts multiples of this.
        max_calibration_batches: cap on calibration batches.
        loss_fn: loss for ``"taylor"`` (default cross-entropy).
        device: where calibration batches are moved (default: left where they are).
        importance_kwargs: extra arguments for :class:`SpectralImportance`.
        damping: ridge of the least-squares merge and of the ``"qm"`` Gram inverses, relative to
            the mean diagonal of the Gram (guards against dead channels and few samples).
        layer_ratios: ``{layer: channel ratio}`` overriding ``ratio`` for those layers (what
            the latency-aware and policy allocations produce); ``target`` must be "channels".
        allocation: how the ratio is spread over layers: ``"uniform"`` (default: one ratio
            per layer, or one global ranking), ``"latency"`` (§5: more removed where the
            profile's cost per MAC is higher; :func:`~torch_qmprune.hardware.latency_allocation`)
            or ``"policy"`` (§4: the budget-conditioned quantum policy gate;
            :func:`~torch_qmprune.policy.policy_allocation`), or a name given to
            :func:`register_allocation`. ``target="latency"`` implies ``"latency"``.
        device_profile: cost profile for ``"latency"``: ``"measure"`` (time this model's
            layers on ``example_inputs`` now), a shipped name (``"ascend"``, ...), a JSON path or
            a dict (see :func:`~torch_qmprune.hardware.load_profile`).
        budget: fraction of the resource to *keep* (the policy gate's budget token, Eq. 8);
            same as ``ratio=1 - budget``.
        allocation_kwargs: extra keyword arguments for the allocator (``strength``,
            ``max_ratio``, ``steps``, ``seed``, ``tolerance``, ...).
        atomic_update: on any error, restore the model exactly as it was (one weight copy).
        progress: show a progress bar (stderr) over calibration, scoring, ratio search, removal.

    Returns:
        :class:`PruneReport` (params/MACs before and after, per-layer widths, timings).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(8 * 6 * 6, 3))
        >>> x = torch.randn(64, 1, 8, 8)
        >>> report = prune(net, x[:1], 0.5, calibration=x)
        >>> net[0].out_channels, net(x).shape
        (4, torch.Size([64, 3]))
    """
    start = time.perf_counter()
    ratio, allocation = _resolve_ratio_and_allocation(
        ratio, budget, target, allocation, device_profile, layer_ratios, allocation_kwargs
    )
    ratio = _validate(model, ratio, target, criterion, calibration, compensate)
    layer_ratios = dict(layer_ratios or {})
    if layer_ratios and target != "channels":
        raise ValueError(
            f"layer_ratios fixes per-layer channel ratios; target must be "
            f"'channels', got {target!r}"
        )
    for layer, value in layer_ratios.items():
        check_ratio(value, f"layer_ratios[{type(layer).__name__}]")
    if ignored_layers is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        ignored_layers = linears[-1:]
    ignored_layers = list(ignored_layers)
    names = {m: n for n, m in model.named_modules()}
    for m in ignored_layers:
        if m not in names:
            raise ValueError(f"ignored layer {m!r} is not a submodule of the model")
    if recalibrate_bn is None:
        recalibrate_bn = calibration is not None
    dev = torch.device(device) if device is not None else None
    report = None
    bar = _Progress(progress, f"prune[{criterion}]")
    with bar, atomic(model, enabled=atomic_update):
        was_training = model.training
        model.eval()
        allocation_info: dict[str, Any] = {}
        t_alloc = 0.0
        if allocation != "uniform":
            t0 = time.perf_counter()
            layer_ratios, allocation_info = _allocate(
                allocation, model, example_inputs, names, ratio=ratio, target=target,
                calibration=calibration, ignored_layers=ignored_layers, round_to=round_to,
                device=dev, device_profile=device_profile, budget=budget,
                allocation_kwargs=allocation_kwargs,
            )
            model.eval()
            t_alloc = time.perf_counter() - t0
        params_before, macs_before = count_params_and_macs(model, example_inputs)
        widths_before = {
            names[m]: (m.out_channels if hasattr(m, "out_channels") else m.out_features)
            for m in model.modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
        }
        stats = None
        t_cal = 0.0
        if calibration is not None and (criterion == "qm" or compensate):
            bar.add(1, "calibration")
            stats = collect_input_grams(
                model, calibration, max_batches=max_calibration_batches, device=dev
            )
            t_cal = stats.seconds
            bar.step()
        if criterion == "taylor":
            _taylor_gradients(model, calibration, loss_fn, max_calibration_batches, dev)
        imp_kwargs = dict(importance_kwargs or {})
        if criterion == "qm":
            imp_kwargs.setdefault("damping", damping)
            if target == "channels" and not global_pruning:
                top = max([ratio, *layer_ratios.values()])
                imp_kwargs.setdefault("greedy_fraction", min(1.0, top + 0.05))
        inner = make_importance(criterion, stats, **imp_kwargs)
        importance = _CachedImportance(inner, lambda m: names.get(m, ""))
        t0 = time.perf_counter()
        # score every group once (also what the ratio search re-uses)
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        groups = list(dg.get_all_groups(
            ignored_layers=ignored_layers, root_module_types=[nn.modules.conv._ConvNd, nn.Linear]
        ))
        bar.add(len(groups), "scoring groups")
        for group in groups:
            importance(group)
            bar.step()
        t_score = time.perf_counter() - t0
        channel_ratio = 0.0 if allocation != "uniform" else ratio
        if target != "channels" and allocation == "uniform" and ratio > 0:
            channel_ratio = _solve_channel_ratio(
                model,
                example_inputs,
                importance,
                ratio,
                target,
                ignored_layers=ignored_layers,
                global_pruning=global_pruning,
                round_to=round_to,
                num_heads=num_heads,
                base=(params_before, macs_before),
                progress=bar,
            )
        compensated = 0
        bar.add(2, "merging and removing")
        if channel_ratio > 0 or layer_ratios:
            _, compensated = _run_pruner(
                model,
                example_inputs,
                importance,
                channel_ratio,
                ignored_layers=ignored_layers,
                global_pruning=global_pruning,
                round_to=round_to,
                num_heads=num_heads,
                stats=stats,
                compensate=compensate,
                damping=damping,
                layer_ratios=layer_ratios,
            )
        bar.step()
        if criterion == "taylor":
            model.zero_grad(set_to_none=True)
        n_bn = 0
        if recalibrate_bn and calibration is not None:
            n_bn = recalibrate_batchnorm(
                model, calibration, max_batches=max_calibration_batches, device=dev
            )
        model.train(was_training)
        params_after, macs_after = count_params_and_macs(model, example_inputs)
        layers = {}
        for m in model.modules():
            if (
                isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                and names.get(m) in widths_before
            ):
                now = m.out_channels if hasattr(m, "out_channels") else m.out_features
                layers[names[m]] = {"before": widths_before[names[m]], "after": now}
        report = PruneReport(
            criterion=criterion,
            target=target,
            ratio=ratio,
            channel_ratio=channel_ratio,
            params_before=params_before,
            params_after=params_after,
            macs_before=macs_before,
            macs_after=macs_after,
            layers=layers,
            compensated_layers=compensated,
            calibration_seconds=t_cal,
            scoring_seconds=t_score,
            total_seconds=time.perf_counter() - start,
            bn_recalibrated=n_bn,
            allocation=allocation,
            allocation_info=allocation_info,
            allocation_seconds=t_alloc,
        )
        bar.step()
    return report


def _resolve_ratio_and_allocation(
    ratio: float | None,
    budget: float | None,
    target: str,
    allocation: str | None,
    device_profile: Any,
    layer_ratios: Mapping[nn.Module, float] | None,
    allocation_kwargs: Mapping[str, Any] | None,
) -> tuple[float, str]:
    """Check the ratio/budget/allocation arguments of :func:`prune` against each other."""
    if budget is not None:
        implied = 1.0 - check_budget(budget)
        if ratio is not None and not (
            isinstance(ratio, (int, float)) and abs(float(ratio) - implied) < 1e-9
        ):
            raise ValueError(f"ratio={ratio!r} and budget={budget!r} disagree (ratio is the "
                             f"fraction removed, budget the fraction kept); pass one of them")
        ratio = implied
    if ratio is None:
        ratio = 0.5
    if allocation is None:
        allocation = "latency" if target == "latency" else "uniform"
    if allocation != "uniform" and allocation not in _ALLOCATIONS:
        raise ValueError(f"allocation must be one of {available_allocations()}, got "
                         f"{allocation!r}")
    if target == "latency" and allocation != "latency":
        raise ValueError(f"target='latency' is reached by allocation='latency', got "
                         f"allocation={allocation!r}")
    if allocation == "latency" and device_profile is None:
        raise ValueError(
            "latency-aware pruning needs device_profile=: 'measure' (time this model's layers "
            "now), a shipped profile name (see torch_qmprune.available_profiles()), a JSON path "
            "or a dict"
        )
    if allocation != "uniform" and layer_ratios:
        raise ValueError(f"allocation={allocation!r} computes the per-layer ratios itself; "
                         f"do not pass layer_ratios as well")
    if allocation == "uniform" and (allocation_kwargs or device_profile is not None):
        raise ValueError("allocation_kwargs / device_profile only apply with allocation="
                         "'latency', 'policy' or a registered allocation")
    if allocation == "policy" and device_profile is not None:
        raise ValueError("device_profile applies to allocation='latency'; the policy gate "
                         "budgets MACs or params (target='macs' or 'params')")
    if allocation_kwargs is not None and not isinstance(allocation_kwargs, Mapping):
        raise TypeError(f"allocation_kwargs must be a dict, got "
                        f"{type(allocation_kwargs).__name__}")
    return ratio, allocation


def _allocate(
    name: str,
    model: nn.Module,
    example_inputs: Any,
    names: Mapping[nn.Module, str],
    *,
    allocation_kwargs: Mapping[str, Any] | None,
    **arguments: Any,
) -> tuple[dict[nn.Module, float], dict[str, Any]]:
    """Run a registered allocator and check what it returns (``names``: module → name)."""
    ratios, info = _ALLOCATIONS[name](model, example_inputs, **arguments,
                                      **dict(allocation_kwargs or {}))
    out: dict[nn.Module, float] = {}
    for layer, value in dict(ratios).items():
        if layer not in names:
            raise ValueError(f"allocation {name!r} returned a layer that is not a submodule "
                             f"of the model: {layer!r}")
        out[layer] = check_ratio(value, f"allocation {name!r} ratio for {names[layer]!r}")
    return out, dict(info or {})
