"""The benchmark harness end to end on tiny CPU configurations (pipeline, not accuracy)."""

from __future__ import annotations

import json
import math

import pytest

from torch_qmprune import bench


def _have_fmnist() -> bool:
    from torch_qmprune.data import _find_root

    try:
        _find_root(None)
    except FileNotFoundError:
        return False
    return True


requires_fmnist = pytest.mark.skipif(not _have_fmnist(),
                                     reason="Fashion-MNIST idx files not installed")


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@requires_fmnist
def test_table1_tiny_writes_every_cell(tmp_path):
    from torch_qmprune.zoo import get_baseline

    get_baseline("small_cnn", train_limit=2000)   # cached after the first run (~10 s)
    out = tmp_path / "res"
    rc = bench.main(["table1", "--model", "small_cnn", "--criteria", "l1,random",
                     "--sparsity", "0.5", "--seeds", "0", "--train-limit", "2000",
                     "--test-limit", "500", "--calibration-size", "256",
                     "--finetune-epochs", "0.05", "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "table1.json").read_text())
    assert data["config"]["criteria"] == ["l1", "random"]
    assert data["levels"]["s0.5"]["param_sparsity"] == pytest.approx(0.5, abs=0.02)
    for variant in bench.VARIANTS:
        for crit in ("l1", "random"):
            cell = data["results"][variant][crit]["s0.5"]
            assert cell["oneshot"]["seeds"] == [0]
            assert all(0.0 <= v <= 100.0 for v in cell["oneshot"]["values"])
            if variant in ("plain", "merge+bn"):
                assert all(0.0 <= v <= 100.0 for v in cell["finetuned"]["values"])
    for key in ("python", "torch", "torch_pruning", "cpu_model"):
        assert data["environment"][key]
    assert data["command"].startswith("python -m torch_qmprune.bench table1")
    assert all(r["prune_seconds"] > 0 for r in data["runs"] if r["phase"] == "oneshot")
    md = (out / "table1.md").read_text()
    assert "| criterion | s = 0.5 |" in md
    assert "paper QM-FRG" in md and "## Where we lose" in md
    assert (out / "table1.png").stat().st_size > 1000


def test_where_we_lose_names_every_losing_cell():
    payload = {
        "config": {"criteria": ["qm", "l1", "fpgm"], "variants": ["plain", "merge+bn"]},
        "levels": {"s0.5": {"label": "0.5", "target": "params", "value": 0.5},
                   "s0.9": {"label": "0.9", "target": "params", "value": 0.9}},
        "results": {
            "plain": {"qm": {"s0.5": {"oneshot": {"values": [50.0]}},
                             "s0.9": {"oneshot": {"values": [20.0]}}},
                      "l1": {"s0.5": {"oneshot": {"values": [55.0]}},
                             "s0.9": {"oneshot": {"values": [10.0]}}},
                      "fpgm": {"s0.5": {"oneshot": {"values": [52.0]}}}},
            "merge+bn": {"qm": {"s0.5": {"oneshot": {"values": [80.0]},
                                         "finetuned": {"values": [85.0, 86.0, 87.0]}}},
                         "l1": {"s0.5": {"oneshot": {"values": [70.0]},
                                         "finetuned": {"values": [88.0, 88.0, 88.0]}}}}},
    }
    losses = bench.where_we_lose(payload)
    got = {(x["variant"], x["phase"], x["level"], x["best_builtin"]) for x in losses}
    assert got == {("plain", "oneshot", "s0.5", "l1"), ("merge+bn", "finetuned", "s0.5", "l1")}
    gap = next(x["gap"] for x in losses if x["phase"] == "finetuned")
    assert gap == pytest.approx(2.0)


def test_speed_tiny_ratios_are_positive_and_finite(tmp_path):
    out = tmp_path / "speed"
    rc = bench.main(["speed", "--models", "tiny_cnn", "--input-size", "16",
                     "--criteria", "literal,loo,qm", "--repeats", "1", "--warmup", "0",
                     "--calibration-size", "32", "--calibration-batch", "16",
                     "--latency-batches", "1,4", "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "speed.json").read_text())
    res = data["models"]["tiny_cnn"]
    for crit in ("group_magnitude", "literal", "loo", "qm"):
        assert _finite_positive(res["scoring"][crit]["ratio"])
    parts = res["literal_breakdown"]
    assert parts["producers"] == 3 and parts["identical_state_producers"] == 0
    for key in ("states_seconds", "pairwise_seconds", "greedy_seconds", "literal_seconds"):
        assert parts[key] >= 0
    assert _finite_positive(res["calibration"]["ratio"])
    assert _finite_positive(res["prune"]["ratio"])
    assert _finite_positive(res["prune"]["macs_ratio"])
    assert [lat["batch"] for lat in res["latency"] if lat["device"] == "cpu"] == [1, 4]
    for lat in res["latency"]:
        assert _finite_positive(lat["speedup"]) and _finite_positive(lat["macs_ratio"])
    md = (out / "speed.md").read_text()
    assert "GroupMagnitudeImportance" in md and "Against the issue's targets" in md
    assert "Where `literal`'s time goes" in md and "secular equation" in md


def test_checkpoint_path_is_where_get_baseline_caches(tmp_path, monkeypatch):
    from torch_qmprune import zoo

    monkeypatch.setenv("QMPRUNE_CACHE", str(tmp_path))
    path = zoo.checkpoint_path("small_cnn", train_limit=64)
    assert path == tmp_path / "small_cnn_e1_s0_n64.pt"
    assert zoo.checkpoint_path("resnet18_s2", seed=2).name == "resnet18_s2_e4_s2_nall.pt"
    assert not zoo.is_cached("small_cnn", train_limit=64)
    path.write_bytes(b"")                                   # the .json beside it is missing
    assert not zoo.is_cached("small_cnn", train_limit=64)
    path.with_suffix(".json").write_text("{}")
    assert zoo.is_cached("small_cnn", train_limit=64)
    with pytest.raises(ValueError, match="unknown baseline"):
        zoo.checkpoint_path("resnet1000")
