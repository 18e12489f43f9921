"""Hardware-aware metric (§5, Eq. (9)), cost profiles, measured profiles, latency allocation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from torch_qmprune.hardware import (
    PAPER_SOURCE,
    available_profiles,
    estimate_latency,
    latency_allocation,
    layer_macs,
    load_profile,
    measure_profile,
    weighted_fubini_study,
)
from torch_qmprune.spectral import fubini_study, spectral_state
from torch_qmprune.structural import count_params_and_macs, prune


def _states(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv": torch.rand(6, generator=g, dtype=torch.float64),
            "linear": torch.rand(4, generator=g, dtype=torch.float64)}


def test_eq9_single_type_is_plain_fubini_study():
    a, b = _states(0), _states(1)
    d = weighted_fubini_study({"conv": a["conv"]}, {"conv": b["conv"]}, {"conv": 1.0})
    assert float(d) == pytest.approx(float(fubini_study(a["conv"], b["conv"])), abs=1e-12)
    assert float(d) > 0.01
    # modules and weights are turned into their spectral states
    c1, c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    dm = weighted_fubini_study({"conv": c1}, {"conv": c2}, {"conv": 1.0})
    ref = fubini_study(spectral_state(c1, dtype=torch.float64), spectral_state(c2,
                                                                              dtype=torch.float64))
    assert float(dm.detach()) == pytest.approx(float(ref.detach()), abs=1e-12)


def test_eq9_weights_behave():
    a, b = _states(2), _states(3)
    d_conv = float(fubini_study(a["conv"], b["conv"]))
    d_lin = float(fubini_study(a["linear"], b["linear"]))
    base = float(weighted_fubini_study(a, b, {"conv": 1.2, "linear": 1.0}))
    assert base == pytest.approx(math.sqrt(1.2 * d_conv ** 2 + d_lin ** 2), rel=1e-12)
    for k in (0.25, 4.0, 9.0):
        scaled = float(weighted_fubini_study(a, b, {"conv": 1.2 * k, "linear": k}))
        assert scaled == pytest.approx(math.sqrt(k) * base, rel=1e-12)
    # raising one type's cost raises the distance; an unlisted type costs 1
    assert float(weighted_fubini_study(a, b, {"conv": 5.0})) > float(
        weighted_fubini_study(a, b, {"conv": 1.0}))
    assert float(weighted_fubini_study(a, b, {"conv": 1.0})) == pytest.approx(
        math.hypot(d_conv, d_lin), rel=1e-12)
    assert float(weighted_fubini_study(a, b, "ascend")) == pytest.approx(base, rel=1e-12)
    with pytest.raises(ValueError, match="same operator types"):
        weighted_fubini_study(a, {"conv": b["conv"]}, {"conv": 1.0})
    with pytest.raises(ValueError, match="finite cost"):
        weighted_fubini_study(a, b, {"conv": -1.0})


def test_shipped_profiles_load_with_source_label(tmp_path):
    names = available_profiles()
    assert {"ascend", "cambricon-mlu", "kunlunxin"} <= set(names)
    for name in ("ascend", "cambricon-mlu", "kunlunxin"):
        prof = load_profile(name)
        assert prof["source"] == PAPER_SOURCE
        assert prof["costs"]["linear"] == 1.0
    assert load_profile("ascend")["costs"]["conv"] == 1.2
    assert load_profile("cambricon-mlu")["costs"]["conv"] == 1.5
    kx = load_profile("kunlunxin")["costs"]
    assert kx["head-qk"] < 1.0 and kx["head-vo"] < 1.0
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "source": "measured", "costs": {"conv": 2.0}}))
    assert load_profile(path)["costs"]["conv"] == 2.0
    with pytest.raises(ValueError, match="unknown hardware profile"):
        load_profile("no-such-chip")
    with pytest.raises(ValueError, match="source"):
        load_profile({"costs": {"conv": 1.0}})


def test_measure_profile_positive_costs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    x = torch.randn(2, 3, 8, 8)
    prof = measure_profile(net, x, repeats=5)
    assert prof["source"] == "measured" and prof["device"].startswith("cpu")
    assert "T" in prof["timestamp"]
    assert prof["costs"]["linear"] == 1.0 and prof["costs"]["conv"] > 0
    assert prof["seconds_per_mac"]["conv"] > 0 and prof["seconds_per_mac"]["linear"] > 0
    macs = layer_macs(net, x)
    assert macs["0"] == 2 * 16 * 64 * 27 and macs["5"] == 2 * 32 * 1024
    assert set(prof["layers"]) == set(macs)
    assert all(entry["seconds"] > 0 for entry in prof["layers"].values())
    assert load_profile(prof)["costs"] == prof["costs"]
    est = estimate_latency(net, x, prof)
    assert est["unit"] == "seconds" and est["total"] > 0
    # a conv-only model is normalized by a reference Linear
    conv_only = measure_profile(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8), repeats=3)
    assert conv_only["linear_reference"] and conv_only["costs"]["conv"] > 0


def test_estimate_latency_uses_type_costs():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x = torch.randn(1, 2, 6, 6)
    est = estimate_latency(net, x, "cambricon-mlu")
    conv_macs, lin_macs = 4 * 16 * 18, 64 * 5
    assert est["layers"]["0"] == pytest.approx(1.5 * conv_macs)
    assert est["total"] == pytest.approx(1.5 * conv_macs + lin_macs)


def _two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


def test_latency_allocation_meets_target_and_prefers_costly_layer():
    ratio = 0.5
    x = torch.randn(1, 3, 8, 8)
    profile = {"name": "test", "source": "constructed", "costs": {"conv": 4.0, "linear": 1.0}}
    net = _two_layer()
    alloc = latency_allocation(net, x, ratio, profile)
    assert alloc[net[0]] > alloc[net[4]] + 0.05
    _, macs_before = count_params_and_macs(net, x)
    prune(net, x, 0.0, layer_ratios=alloc, criterion="l1", compensate=False)
    _, macs_after = count_params_and_macs(net, x)
    assert abs(macs_after / ((1 - ratio) * macs_before) - 1) <= 0.02
    assert macs_after == alloc.info["after"]
    # the same machinery with strength 0 is the uniform allocation, also on target
    uniform_net = _two_layer()
    uni = latency_allocation(uniform_net, x, ratio, profile, strength=0.0)
    assert uni[uniform_net[0]] == pytest.approx(uni[uniform_net[4]])
    assert abs(uni.info["after"] / ((1 - ratio) * macs_before) - 1) <= 0.02
    # flipping the costs flips the preference
    other = _two_layer()
    flipped = latency_allocation(other, x, ratio, {"source": "constructed",
                                                   "costs": {"conv": 0.05}})
    assert flipped[other[0]] < flipped[other[4]]


def test_latency_allocation_errors():
    net = _two_layer()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="ratio"):
        latency_allocation(net, x, 1.5, "ascend")
    with pytest.raises(ValueError, match="target"):
        latency_allocation(net, x, 0.5, "ascend", target="flops")
    with pytest.raises(ValueError, match="cannot be reached"):
        latency_allocation(net, x, 0.97, "ascend", max_ratio=0.5)


def test_prune_latency_target_meets_estimated_latency_and_skews_to_costly_layers():
    x = torch.randn(1, 3, 8, 8)
    profile = {"name": "test", "source": "constructed", "costs": {"conv": 4.0, "linear": 1.0}}
    net = _two_layer()
    before = estimate_latency(net, x, profile)["total"]
    report = prune(net, x, 0.4, target="latency", device_profile=profile, criterion="l1",
                   compensate=False)
    after = estimate_latency(net, x, profile)["total"]
    assert report.allocation == "latency" and report.target == "latency"
    assert abs(after / (0.6 * before) - 1) <= 0.02
    assert report.allocation_info["after"] == pytest.approx(after)
    kept_conv = net[0].out_channels / 64
    kept_fc = net[4].out_features / 128
    assert kept_conv < kept_fc - 0.05          # the costly conv gave more
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_prune_latency_allocation_with_macs_target_beats_uniform_on_estimate():
    x = torch.randn(1, 3, 8, 8)
    profile = {"name": "test", "source": "constructed", "costs": {"conv": 4.0, "linear": 1.0}}
    aware, uniform = _two_layer(), _two_layer()
    _, macs0 = count_params_and_macs(aware, x)
    prune(aware, x, 0.5, target="macs", allocation="latency", device_profile=profile,
          criterion="l1", compensate=False)
    prune(uniform, x, 0.5, target="macs", criterion="l1", compensate=False)
    for net in (aware, uniform):
        assert abs(count_params_and_macs(net, x)[1] / (0.5 * macs0) - 1) <= 0.03
    assert (estimate_latency(aware, x, profile)["total"]
            < 0.98 * estimate_latency(uniform, x, profile)["total"])


def test_prune_allocation_argument_errors_leave_model_unchanged():
    x = torch.randn(1, 3, 8, 8)
    net = _two_layer()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="device_profile"):
        prune(net, x, 0.5, target="latency", criterion="l1", compensate=False)
    with pytest.raises(ValueError, match="allocation must be one of"):
        prune(net, x, 0.5, allocation="fastest", criterion="l1", compensate=False)
    with pytest.raises(ValueError, match="disagree"):
        prune(net, x, 0.3, budget=0.5, criterion="l1", compensate=False)
    with pytest.raises(ValueError, match="budget"):
        prune(net, x, budget=1.5, criterion="l1", compensate=False)
    with pytest.raises(ValueError, match="layer_ratios"):
        prune(net, x, 0.5, allocation="latency", device_profile="ascend",
              layer_ratios={net[0]: 0.5}, criterion="l1", compensate=False)
    with pytest.raises(ValueError, match="policy gate budgets"):
        prune(net, x, 0.5, allocation="policy", device_profile="ascend", criterion="l1",
              compensate=False)
    with pytest.raises(ValueError, match="only apply"):
        prune(net, x, 0.5, device_profile="ascend", criterion="l1", compensate=False)
    with pytest.raises(ValueError, match="cannot be reached"):   # raised inside the allocator
        prune(net, x, 0.97, target="latency", device_profile="ascend", criterion="l1",
              compensate=False, allocation_kwargs={"max_ratio": 0.5})
    assert net[0].out_channels == 64
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
