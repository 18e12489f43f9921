"""Hardware-aware metric and allocation (arXiv 2512.00880 §5): the cost-weighted Fubini–Study
distance of Eq. (9), per-device cost profiles (shipped JSON or measured), latency estimates and a
latency-aware per-layer channel allocation for :func:`torch_qmprune.prune`.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import numbers
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import check_ratio
from .calibration import _forward
from .spectral import fubini_study, spectral_state
from .structural import register_allocation

__all__ = [
    "LatencyAllocation",
    "available_profiles",
    "estimate_latency",
    "latency_allocation",
    "layer_macs",
    "load_profile",
    "measure_latency",
    "measure_profile",
    "weighted_fubini_study",
]

PAPER_SOURCE = "paper arXiv 2512.00880 §5, not measured"
_CONV = nn.modules.conv._ConvNd


# ---------------------------------------------------------------------------------------------
# Eq. (9)
# ---------------------------------------------------------------------------------------------


def _as_state(x: Any, name: str) -> Tensor:
    """A 1-D tensor is taken as a state; a module / 2-D+ weight becomes its spectral state."""
    if isinstance(x, nn.Module) or (isinstance(x, Tensor) and x.ndim >= 2):
        return spectral_state(x, dtype=torch.float64)
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return spectral_state(x[0], x[1], dtype=torch.float64)
    if isinstance(x, Tensor) and x.ndim == 1:
        return x.to(torch.float64)
    raise TypeError(f"{name} must be a 1-D spectral state, a weight tensor, a (weight, bias) "
                    f"pair or a module, got {type(x).__name__}")


def _cost_map(costs: Any) -> dict[str, float]:
    if isinstance(costs, (str, os.PathLike)):
        costs = load_profile(costs)
    if isinstance(costs, Mapping) and "costs" in costs and isinstance(costs["costs"], Mapping):
        costs = costs["costs"]
    if not isinstance(costs, Mapping):
        raise TypeError(f"costs must be a mapping {{kind: cost}}, a profile dict or a profile "
                        f"name, got {type(costs).__name__}")
    out = {}
    for kind, value in costs.items():
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not (math.isfinite(value) and value >= 0)):
            raise ValueError(f"costs[{kind!r}] must be a finite cost >= 0, got {value!r}")
        out[str(kind)] = float(value)
    return out


def weighted_fubini_study(
    components_a: Mapping[str, Any],
    components_b: Mapping[str, Any],
    costs: Mapping[str, float] | str | os.PathLike[str],
) -> Tensor:
    """Hardware-weighted Fubini–Study distance, Eq. (9) of §5.

    d_FS,w(Φ₁, Φ₂) = sqrt( Σ_m c_m · d_FS²(Φ₁^m, Φ₂^m) ) over the operator types m that both
    operators have (``"conv"``, ``"linear"``, ``"head-qk"``, ``"head-vo"``, ...), with c_m the
    instruction cost of type m on the target device. Types missing from ``costs`` cost 1 (as
    in :func:`~torch_qmprune.redundancy_graph`'s ``hardware_weights``). With one type of cost 1
    it is the plain d_FS; scaling every cost by k scales the distance by √k.

    Args:
        components_a, components_b: ``{type: component}`` with the same keys; a component is a
            1-D spectral state, a weight tensor, a ``(weight, bias)`` pair or a module (its
            bias-augmented state, §2.1, is used).
        costs: ``{type: c_m}``, a profile dict (its ``"costs"``) or a profile name / JSON path
            for :func:`load_profile`.

    Returns:
        0-D float64 tensor ≥ 0.

    Example:
        >>> a = {"conv": torch.tensor([1.0, 0.0]), "linear": torch.tensor([1.0, 0.0])}
        >>> b = {"conv": torch.tensor([0.0, 1.0]), "linear": torch.tensor([1.0, 0.0])}
        >>> round(float(weighted_fubini_study(a, b, {"conv": 4.0})), 4)   # sqrt(4)·π/2
        3.1416
    """
    if not isinstance(components_a, Mapping) or not isinstance(components_b, Mapping):
        raise TypeError("components_a and components_b must be mappings {operator type: state}")
    if set(components_a) != set(components_b):
        raise ValueError(f"components_a has types {sorted(components_a)} but components_b has "
                         f"{sorted(components_b)}; expected the same operator types")
    if not components_a:
        raise ValueError("components_a is empty; expected at least one operator type")
    c = _cost_map(costs)
    total = torch.zeros((), dtype=torch.float64)
    for kind in components_a:
        a = _as_state(components_a[kind], f"components_a[{kind!r}]")
        b = _as_state(components_b[kind], f"components_b[{kind!r}]").to(a.device)
        d = fubini_study(a, b).to(torch.float64).cpu()
        total = total + c.get(kind, 1.0) * d ** 2
    return total.sqrt()


# ---------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------


def _profile_dir() -> Path:
    try:
        path = Path(str(resources.files("torch_qmprune") / "profiles"))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual installs
        pass
    return Path(__file__).resolve().parent / "profiles"


def available_profiles() -> list[str]:
    """Names of the cost profiles shipped in ``torch_qmprune/profiles/*.json``.

    Example:
        >>> "ascend" in available_profiles()
        True
    """
    return sorted(p.stem for p in _profile_dir().glob("*.json"))


def _validate_profile(profile: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(profile, Mapping):
        raise TypeError(f"{where}: a profile must be a JSON object / mapping, got "
                        f"{type(profile).__name__}")
    out = dict(profile)
    if "costs" not in out or not isinstance(out["costs"], Mapping) or not out["costs"]:
        raise ValueError(f"{where}: expected a non-empty 'costs' mapping {{kind: cost}}, got "
                         f"{out.get('costs')!r}")
    out["costs"] = _cost_map(out["costs"])
    if "source" not in out:
        raise ValueError(f"{where}: expected a 'source' label (where the costs come from: "
                         f"'{PAPER_SOURCE}' or 'measured')")
    out.setdefault("name", where)
    return out


def load_profile(name_or_path: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Load a hardware cost profile (§5): a shipped name, a JSON file, or a dict (validated).

    A profile is ``{"name", "source", "costs": {kind: c_m}, ...}``; the shipped ones
    (``"ascend"``: c_conv = 1.2, ``"cambricon-mlu"``: c_conv = 1.5, ``"kunlunxin"``: cheap
    fused heads) carry ``"source": "paper arXiv 2512.00880 §5, not measured"``; profiles from
    :func:`measure_profile` carry ``"source": "measured"`` with the device and a timestamp.

    Example:
        >>> load_profile("ascend")["costs"]["conv"]
        1.2
    """
    if isinstance(name_or_path, Mapping):
        return _validate_profile(name_or_path, str(name_or_path.get("name", "profile")))
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a profile name, a path or a dict, got "
                        f"{type(name_or_path).__name__}")
    path = Path(name_or_path)
    if path.suffix != ".json" and not path.exists():
        path = _profile_dir() / f"{name_or_path}.json"
        if not path.exists():
            raise ValueError(f"unknown hardware profile {str(name_or_path)!r}; expected one of "
                             f"{available_profiles()} or a path to a JSON file")
    if not path.exists():
        raise FileNotFoundError(f"profile file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return _validate_profile(data, str(name_or_path))


# ---------------------------------------------------------------------------------------------
# per-layer MACs and timing
# ---------------------------------------------------------------------------------------------


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _macs_of(module: nn.Module, x: Tensor, y: Tensor) -> int:
    if isinstance(module, _CONV):
        taps = math.prod(module.kernel_size)
        if module.transposed:
            return int(x.numel() * module.out_channels // module.groups * taps)
        return int(y.numel() * module.in_channels // module.groups * taps)
    return int(y.numel() * module.in_features)


@torch.no_grad()
def _trace_layers(model: nn.Module, example_inputs: Any,
                  keep_inputs: bool = False) -> dict[str, dict[str, Any]]:
    """One forward with hooks: ``{name: {module, kind, macs, input}}`` for every Conv/Linear
    that is called (in call order). Modules called twice sum their MACs."""
    found: dict[str, dict[str, Any]] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not args or not torch.is_tensor(args[0]) or not torch.is_tensor(output):
                return
            entry = found.setdefault(name, {"module": module, "kind": _kind(module),
                                            "macs": 0, "input": None, "calls": 0})
            entry["macs"] += _macs_of(module, args[0], output)
            entry["calls"] += 1
            if keep_inputs and entry["input"] is None:
                entry["input"] = args[0].detach().clone()
        return hook

    for name, m in model.named_modules():
        if _kind(m) is not None:
            handles.append(m.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        _forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """MACs of every Conv/Linear layer for one forward on ``example_inputs`` (§5 accounting).

    Example:
        >>> layer_macs(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4))
        {'0': 24}
    """
    return {name: e["macs"] for name, e in _trace_layers(model, example_inputs).items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _check_repeats(repeats: object) -> int:
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    return int(repeats)


def _to_device(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs: Any, *, device: str | torch.device | None
                    = None, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of one forward (eval mode, no grad) over ``repeats`` runs.

    Example:
        >>> measure_latency(nn.Linear(8, 8), torch.randn(1, 8), repeats=3) > 0
        True
    """
    repeats = _check_repeats(repeats)
    dev = _model_device(model, device)
    net = model if device is None else model.to(dev)
    x = _to_device(example_inputs, dev)
    was_training = net.training
    net.eval()
    try:
        return _median_time(lambda: _forward(net, x), dev, repeats, warmup)
    finally:
        net.train(was_training)


def _half_width(module: nn.Module) -> nn.Module | None:
    """A copy of the layer with half its output channels (same input), or None if impossible."""
    if isinstance(module, nn.Linear):
        if module.out_features < 2:
            return None
        half = nn.Linear(module.in_features, module.out_features // 2,
                         bias=module.bias is not None)
    elif isinstance(module, _CONV) and not module.transposed:
        out = module.out_channels // 2
        if out < module.groups or out % module.groups:
            return None
        half = type(module)(module.in_channels, out, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation,
                            groups=module.groups, bias=module.bias is not None,
                            padding_mode=module.padding_mode)
    else:
        return None
    return half.to(device=module.weight.device, dtype=module.weight.dtype).eval()


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return f"cpu:{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@torch.no_grad()
def measure_profile(
    model: nn.Module,
    example_inputs: Any,
    device: str | torch.device | None = None,
    repeats: int = 20,
    *,
    warmup: int = 3,
    marginal: bool = True,
) -> dict[str, Any]:
    """Measure a cost profile (§5) of *this* model on *this* device: latency per MAC per type.

    Each Conv/Linear layer is re-executed in isolation on the input it received during one
    forward pass of ``example_inputs`` (captured by a hook), ``repeats`` times after ``warmup``
    runs; its median time divided by its MACs gives seconds per MAC. Per operator type,
    ``c_m = Σ_layers t / Σ_layers MACs`` normalized so that ``c_linear = 1`` (when the model has
    no Linear, a reference ``Linear(256, 256)`` of comparable MACs is timed for the unit).
    With ``marginal`` each layer is also timed at half its output channels, giving the
    *marginal* seconds per MAC ``(t_full − t_half) / (MACs_full − MACs_half)``: what pruning
    that layer actually saves (fixed per-call overhead excluded). The result is labelled
    ``"source": "measured"`` with the device, torch version and a UTC timestamp.

    Isolated timings miss fusion and cache effects between layers; they are a per-layer
    latency model, not a replacement for timing the whole network (:func:`measure_latency`).

    Args:
        model: the network (not modified; moved to ``device`` only if ``device`` is given).
        example_inputs: the input of one forward (its batch size is the one profiled).
        device: where to time (default: the model's device).
        repeats: timed runs per layer (median).
        warmup: untimed runs per layer first.
        marginal: also time half-width copies for the marginal cost.

    Returns:
        ``{"name": "measured", "source": "measured", "device", "timestamp", "costs": {kind:
        c}, "seconds_per_mac": {kind: s}, "layers": {name: {"kind", "macs", "seconds",
        "seconds_per_mac", "marginal_seconds_per_mac"}}, ...}`` (usable by
        :func:`load_profile`, :func:`estimate_latency`, :func:`latency_allocation`).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        >>> prof = measure_profile(net, torch.randn(1, 3, 8, 8), repeats=3)
        >>> prof["source"], prof["costs"]["linear"], prof["costs"]["conv"] > 0
        ('measured', 1.0, True)
    """
    repeats = _check_repeats(repeats)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dev = _model_device(model, device)
    net = model
    if device is not None and _model_device(model, None) != dev:
        net = copy.deepcopy(model).to(dev)
    x = _to_device(example_inputs, dev)
    layers = _trace_layers(net, x, keep_inputs=True)
    if not layers:
        raise ValueError(f"no Conv/Linear layer is called by {type(model).__name__}'s forward "
                         "on example_inputs; nothing to profile")
    per_layer: dict[str, dict[str, Any]] = {}
    sums: dict[str, list[float]] = {}
    for name, e in layers.items():
        module, inp = e["module"], e["input"]
        macs_one = _macs_of(module, inp, module(inp))
        if macs_one <= 0:
            continue
        t = _median_time(lambda m=module, i=inp: m(i), dev, repeats, warmup)
        entry = {"kind": e["kind"], "macs": e["macs"], "seconds": t * e["calls"],
                 "seconds_per_mac": t / macs_one, "marginal_seconds_per_mac": None}
        half = _half_width(module) if marginal else None
        if half is not None:
            macs_half = _macs_of(half, inp, half(inp))
            t_half = _median_time(lambda m=half, i=inp: m(i), dev, repeats, warmup)
            if macs_one > macs_half:
                entry["marginal_seconds_per_mac"] = (t - t_half) / (macs_one - macs_half)
        per_layer[name] = entry
        acc = sums.setdefault(e["kind"], [0.0, 0.0])
        acc[0] += t * e["calls"]
        acc[1] += e["macs"]
    spm = {k: v[0] / v[1] for k, v in sums.items() if v[1] > 0}
    reference = None
    if "linear" not in spm:
        mean_macs = sum(v[1] for v in sums.values()) / max(1, len(per_layer))
        rows = max(1, int(round(mean_macs / 65536)))
        ref = nn.Linear(256, 256).to(dev).eval()
        xr = torch.randn(rows, 256, device=dev)
        t = _median_time(lambda: ref(xr), dev, repeats, warmup)
        spm_linear = t / (rows * 65536)
        reference = f"Linear(256, 256) on {rows} rows"
    else:
        spm_linear = spm["linear"]
    costs = {k: v / spm_linear for k, v in spm.items()}
    costs["linear"] = 1.0
    shape = tuple(example_inputs.shape) if torch.is_tensor(example_inputs) else None
    return {
        "name": "measured",
        "source": "measured",
        "device": _device_name(dev),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "input_shape": shape,
        "repeats": repeats,
        "unit": "latency per MAC relative to linear layers of this model",
        "costs": costs,
        "seconds_per_mac": {**spm, "linear": spm_linear},
        "linear_reference": reference,
        "layers": per_layer,
    }


def estimate_latency(model: nn.Module, example_inputs: Any,
                     profile: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """Latency of one forward predicted by a cost profile (§5): Σ_layers c_kind · MACs.

    With a measured profile (it has ``"seconds_per_mac"``) the unit is seconds
    (c_kind × seconds per linear MAC); with a paper profile it is "linear-MAC equivalents".
    Only Conv/Linear layers count (normalization, activations and memory traffic do not).

    Returns:
        ``{"total": float, "unit": str, "layers": {name: float}}``.

    Example:
        >>> est = estimate_latency(nn.Sequential(nn.Linear(4, 3)), torch.randn(1, 4), "ascend")
        >>> est["total"], est["unit"]
        (12.0, 'linear-MAC equivalents')
    """
    prof = load_profile(profile) if not isinstance(profile, Mapping) else _validate_profile(
        profile, str(profile.get("name", "profile")))
    costs = prof["costs"]
    spm = prof.get("seconds_per_mac") or {}
    scale = float(spm["linear"]) if "linear" in spm else 1.0
    unit = "seconds" if "linear" in spm else "linear-MAC equivalents"
    per = {}
    for name, e in _trace_layers(model, example_inputs).items():
        per[name] = costs.get(e["kind"], 1.0) * e["macs"] * scale
    return {"total": float(sum(per.values())), "unit": unit, "layers": per}


# ---------------------------------------------------------------------------------------------
# latency-aware allocation
# ---------------------------------------------------------------------------------------------


class LatencyAllocation(dict):
    """``{layer: channel ratio}`` for ``prune(model, x, 0.0, layer_ratios=...)``, plus ``info``
    (MACs before / after the dry run, the target, the scale, each group's cost weight)."""

    info: dict[str, Any]


def _layer_costs(traced: Mapping[str, dict[str, Any]], prof: Mapping[str, Any]) -> dict[str, float]:
    """Per-layer cost per MAC: the measured marginal cost where the profile has this layer
    (falling back to its average cost), else the profile's per-type cost."""
    measured = prof.get("layers") or {}
    costs = prof["costs"]
    spm_linear = float((prof.get("seconds_per_mac") or {}).get("linear", 1.0)) or 1.0
    out = {}
    for name, e in traced.items():
        m = measured.get(name)
        if m is not None:
            marginal = m.get("marginal_seconds_per_mac")
            value = marginal if marginal is not None and marginal > 0 else m["seconds_per_mac"]
            out[name] = float(value) / spm_linear
        else:
            out[name] = costs.get(e["kind"], 1.0)
    return out


def _groups(model: nn.Module, example_inputs: Any, ignored: Sequence[nn.Module]):
    """Prunable channel groups (Torch-Pruning's dependency graph, same arguments as ``prune``):
    ``[(out-pruned layers, touched layers, channels)]`` and, per Conv/Linear layer, the group
    index owning its output / input channels."""
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    groups, out_group, in_group = [], {}, {}
    for group in dg.get_all_groups(ignored_layers=list(ignored),
                                   root_module_types=[_CONV, nn.Linear]):
        root_dep = group[0].dep
        root = root_dep.target.module
        channels = (dg.get_out_channels(root) if dg.is_out_channel_pruning_fn(root_dep.handler)
                    else dg.get_in_channels(root))
        outs, touched = [], []
        index = len(groups)
        for dep, _ in group:
            module = dep.target.module
            if _kind(module) is None:
                continue
            if dg.is_out_channel_pruning_fn(dep.handler):
                if module not in outs:
                    outs.append(module)
                out_group.setdefault(module, index)
            elif dg.is_in_channel_pruning_fn(dep.handler):
                in_group.setdefault(module, index)
            if module not in touched:
                touched.append(module)
        if outs and channels:
            groups.append((outs, touched, int(channels)))
        else:  # keep indices aligned: forget layers mapped to a group we do not keep
            out_group = {m: g for m, g in out_group.items() if g != index}
            in_group = {m: g for m, g in in_group.items() if g != index}
    return groups, out_group, in_group


def _dry_run_count(model: nn.Module, example_inputs: Any, ratios: Mapping[nn.Module, float],
                   ignored: Sequence[nn.Module], round_to: int | None, index: int,
                   kappa: Mapping[str, float] | None = None) -> float:
    """Params (``index`` 0), MACs (1) or estimated latency Σ κ·MACs (2) of a pruned copy."""
    import torch_pruning as tp

    trial = copy.deepcopy(model)
    mapping = dict(zip(model.modules(), trial.modules()))
    pruner = tp.pruner.BasePruner(
        trial, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.0, pruning_ratio_dict={mapping[m]: r for m, r in ratios.items() if r > 0},
        ignored_layers=[mapping[m] for m in ignored], round_to=round_to)
    pruner.step()
    if index == 2:
        traced = _trace_layers(trial, example_inputs)
        return float(sum((kappa or {}).get(n, 1.0) * e["macs"] for n, e in traced.items()))
    macs, params = tp.utils.count_ops_and_params(trial, example_inputs)
    return int(params) if index == 0 else int(macs)


def latency_allocation(
    model: nn.Module,
    example_inputs: Any,
    ratio: float,
    profile: Mapping[str, Any] | str | os.PathLike[str],
    *,
    target: str = "macs",
    strength: float = 1.0,
    max_ratio: float = 0.8,
    ignored_layers: Sequence[nn.Module] | None = None,
    round_to: int | None = None,
    tolerance: float = 0.02,
    max_iter: int = 20,
) -> LatencyAllocation:
    """Per-layer channel ratios that cut MACs by ``ratio`` while taking more from costly layers.

    §5 made operational: every prunable group g (coupled channels, Torch-Pruning's dependency
    graph) gets ``r_g = min(max_ratio, s · (κ_g / κ̄)^strength)`` where κ_g is the latency per
    MAC of the layers the group touches (its producers and consumers, MAC-weighted), κ̄ its
    MAC-weighted mean over groups, and the scale s is found by bisection on dry runs of the
    pruner so that MACs (or params) fall by ``ratio`` within ``tolerance`` (relative to the
    target count). κ per layer comes from the profile: a :func:`measure_profile` of this model
    gives each layer's *marginal* measured latency per MAC (what pruning it saves); a type
    profile (``"ascend"``, ...) gives c_kind. ``strength=0`` is the uniform allocation (same
    ratio everywhere, solved the same way), so the two compare at equal MACs.

    Args:
        model: the network (not modified: dry runs use copies).
        example_inputs: input for tracing and MAC counting.
        ratio: fraction of MACs (``target="macs"``), params (``"params"``) or estimated
            latency (``"latency"``) to remove; 0.5 = 2× fewer MACs.
        profile: measured profile dict, shipped name, JSON path, or ``"measure"`` to call
            :func:`measure_profile` on ``example_inputs`` now.
        target: ``"macs"``, ``"params"`` or ``"latency"`` (the estimate Σ κ_layer·MACs_layer
            under ``profile``, what ``prune(..., target="latency")`` uses).
        strength: exponent on the relative cost (0: uniform; larger: more skewed).
        max_ratio: cap on any group's channel ratio.
        ignored_layers: layers whose outputs are never pruned (default: the last Linear, as
            :func:`~torch_qmprune.prune`).
        round_to: channel-count multiple, passed to the dry runs (pass the same to ``prune``).
        tolerance: allowed relative miss of the target count.
        max_iter: bisection steps.

    Returns:
        :class:`LatencyAllocation` ``{module: channel_ratio}`` (every output-pruned layer of
        each group, same ratio per group) for ``prune(model, x, 0.0, layer_ratios=alloc)``;
        ``alloc.info`` holds the dry-run counts.

    Raises:
        ValueError: bad arguments, or a target no allocation under ``max_ratio`` reaches.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> alloc = latency_allocation(net, torch.randn(1, 3, 8, 8), 0.5, {"source": "demo",
        ...                            "costs": {"conv": 4.0, "linear": 1.0}})
        >>> alloc[net[0]] > alloc[net[3]], abs(alloc.info["achieved"] - 0.5) < 0.02
        (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ratio = check_ratio(ratio, "ratio")
    if target not in ("macs", "params", "latency"):
        raise ValueError(f"target must be 'macs', 'params' or 'latency', got {target!r}")
    for value, name in ((strength, "strength"), (tolerance, "tolerance")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    max_ratio = check_ratio(max_ratio, "max_ratio")
    if isinstance(profile, str) and profile == "measure":
        prof = measure_profile(model, example_inputs)
    else:
        prof = load_profile(profile)
    if ignored_layers is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        ignored_layers = linears[-1:]
    ignored = list(ignored_layers)
    was_training = model.training
    model.eval()
    try:
        traced = _trace_layers(model, example_inputs)
        kappa = _layer_costs(traced, prof)
        module_name = {e["module"]: n for n, e in traced.items()}
        groups, out_group, in_group = _groups(model, example_inputs, ignored)
        if not groups:
            raise ValueError("no prunable channel group found (every layer ignored?)")
        weights, macs_w = [], []
        for _, touched, _ in groups:
            names = [module_name[m] for m in touched if m in module_name]
            mac = sum(traced[n]["macs"] for n in names)
            cost = sum(kappa[n] * traced[n]["macs"] for n in names)
            weights.append(cost / mac if mac > 0 else 0.0)
            macs_w.append(mac)
        mean = sum(w * m for w, m in zip(weights, macs_w)) / max(1e-300, sum(macs_w))
        rel = [((w / mean) if mean > 0 else 1.0) ** float(strength) for w in weights]
        index = {"params": 0, "macs": 1, "latency": 2}[target]
        if index == 2:  # estimated latency Σ κ_layer · MACs_layer (Eq. 9's costs, §5)
            base = sum(kappa[n] * e["macs"] for n, e in traced.items())
            if not base > 0:
                raise ValueError("the model has no Conv/Linear MACs to estimate latency from")
        else:  # a whole-model count (the traced layers miss e.g. BatchNorm's parameters)
            import torch_pruning as tp

            base_macs, base_params = tp.utils.count_ops_and_params(model, example_inputs)
            base = int(base_params) if index == 0 else int(base_macs)
        goal = (1.0 - ratio) * base

        def ratios_at(scale: float) -> dict[nn.Module, float]:
            out: dict[nn.Module, float] = {}
            for (outs, _, _), w in zip(groups, rel):
                r = min(max_ratio, scale * w)
                for m in outs:
                    out[m] = r
            return out

        def count(scale: float) -> float:
            return _dry_run_count(model, example_inputs, ratios_at(scale), ignored, round_to,
                                  index, kappa)

        # analytic model of the count: a layer keeps int(n(1−r))/n of its output channels and
        # of its input channels (Torch-Pruning's local rule); used to bisect fast, then checked
        # (and the goal corrected) on real dry runs of the pruner.
        layer_cost = {e["module"]: (
            e["macs"] if index == 1 else kappa[n] * e["macs"] if index == 2 else sum(
                p.numel() for p in e["module"].parameters(recurse=False)))
            for n, e in traced.items()}

        def analytic(scale: float) -> float:
            kept = [int(n * (1 - min(max_ratio, scale * w))) / n
                    for (_, _, n), w in zip(groups, rel)]
            total = float(base)
            for m, cost in layer_cost.items():
                f = kept[out_group[m]] if m in out_group else 1.0
                f *= kept[in_group[m]] if m in in_group else 1.0
                total -= cost * (1.0 - f)
            return total

        def solve(goal_count: float, lo: float, hi: float) -> float:
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                if analytic(mid) > goal_count:
                    lo = mid
                else:
                    hi = mid
            return hi

        positive = [w for w in rel if w > 0]
        hi = max_ratio / min(positive) if positive else 0.0
        if ratio == 0:
            best = (0.0, 0.0, base)
        else:
            n_hi = count(hi)
            if n_hi > goal * (1 + tolerance):
                raise ValueError(f"ratio={ratio} of {target} cannot be reached with max_ratio="
                                 f"{max_ratio} (at most {1 - n_hi / base:.3f})")
            best = (abs(n_hi / goal - 1), hi, n_hi)
            aim = goal
            for _ in range(4):
                scale = solve(aim, 0.0, hi)
                n = count(scale)
                if abs(n / goal - 1) < best[0]:
                    best = (abs(n / goal - 1), scale, n)
                if best[0] <= tolerance / 2:
                    break
                aim *= goal / n
            lo, top = 0.0, hi
            for _ in range(max_iter if best[0] > tolerance else 0):
                mid = 0.5 * (lo + top)
                n = count(mid)
                if abs(n / goal - 1) < best[0]:
                    best = (abs(n / goal - 1), mid, n)
                if best[0] <= tolerance / 2:
                    break
                if n > goal:
                    lo = mid
                else:
                    top = mid
    finally:
        model.train(was_training)
    _, scale, achieved_count = best
    alloc = LatencyAllocation(ratios_at(scale))
    alloc.info = {
        "target": target, "ratio": ratio, "before": base, "after": achieved_count,
        "goal": goal, "achieved": 1.0 - achieved_count / base, "scale": scale,
        "strength": float(strength), "max_ratio": max_ratio,
        "profile": prof.get("name"), "profile_source": prof.get("source"),
        "groups": [{"layers": [module_name.get(m, "?") for m in outs], "cost_per_mac": w,
                    "relative": r, "ratio": min(max_ratio, scale * r)}
                   for (outs, _, _), w, r in zip(groups, weights, rel)],
    }
    if abs(achieved_count / goal - 1) > tolerance:
        raise ValueError(f"could not meet the {target} target within {tolerance:.0%}: best "
                         f"{achieved_count:,} vs goal {goal:,.0f} (channel granularity); try "
                         f"a larger tolerance or round_to=None")
    return alloc


def _latency_allocator(model: nn.Module, example_inputs: Any, *, ratio: float, target: str,
                       device_profile: Any, ignored_layers: Sequence[nn.Module] | None,
                       round_to: int | None, **kwargs: Any
                       ) -> tuple[dict[nn.Module, float], dict[str, Any]]:
    """``prune(..., allocation="latency")``: :func:`latency_allocation` on prune's arguments
    (``target="channels"`` is read as MACs; calibration / device / budget are not used)."""
    for unused in ("calibration", "device", "budget"):
        kwargs.pop(unused, None)
    alloc = latency_allocation(model, example_inputs, ratio, device_profile,
                               target="macs" if target == "channels" else target,
                               ignored_layers=ignored_layers, round_to=round_to, **kwargs)
    return dict(alloc), alloc.info


register_allocation("latency", _latency_allocator, overwrite=True)
