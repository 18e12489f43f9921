"""The ``qmprune`` command: ``analyze`` reports (HTML, Markdown, heatmap, graph JSON), ``prune``
(targets, allocations, budget, JSON report) and their one-line errors."""

from __future__ import annotations

import base64
import json
import math
import re
import sys

import pytest
import torch
from torch import nn

from torch_qmprune.cli import main
from torch_qmprune.graph import RedundancyGraph, redundancy_graph


def _twin_model() -> nn.Sequential:
    """Conv layers 2 and 3 identical: the most redundant pair, distance 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3),
                        nn.Flatten(), nn.Linear(8, 4))
    net[3].load_state_dict(net[2].state_dict())
    return net


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "twin.pt"
    torch.save(_twin_model(), path)
    return str(path)


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_analyze_writes_self_contained_html_report(tmp_path, model_file, capsys):
    out_dir = tmp_path / "report"
    rc, out, err = _run(["analyze", model_file, "-o", str(out_dir), "--clusters", "3",
                         "--no-progress"], capsys)
    assert rc == 0, err
    for ext in ("html", "md", "png", "json"):
        assert (out_dir / f"qmfrg_layer.{ext}").stat().st_size > 0, ext
    assert "qmfrg_layer.html" in out
    text = (out_dir / "qmfrg_layer.html").read_text(encoding="utf-8")
    # the table of layers: one row per operator, with the spectral statistics
    assert '<table class="layers">' in text
    for column in ("spectral entropy", "effective rank", "nearest sibling"):
        assert f"<th>{column}</th>" in text
    layers = text[text.index('<table class="layers">'):text.index("</table>")]
    assert len(re.findall(r"<tr><td>", layers)) == 4
    for name in ("0", "2", "3", "5"):
        assert f"<tr><td>{name}</td>" in layers
    # clusters ranked by redundancy: the twins come first, at distance 0
    clusters = text[text.index('<table class="clusters">'):]
    first = re.search(r"<tbody>\s*<tr>(.*?)</tr>", clusters, re.S).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", first)[4] == "2, 3"
    # the heatmap is embedded, not linked: a real PNG behind a data URI
    match = re.search(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert match, "no embedded heatmap"
    png = base64.b64decode(match.group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png == (out_dir / "qmfrg_layer.png").read_bytes()
    assert not re.search(r'(src|href)="(https?:|//)', text)  # nothing fetched from elsewhere
    md = (out_dir / "qmfrg_layer.md").read_text(encoding="utf-8")
    assert "## Layers" in md and "qmfrg_layer.html" in md


def test_analyze_json_output_is_the_only_stdout(tmp_path, model_file, capsys):
    rc, out, err = _run(["analyze", model_file, "-o", str(tmp_path / "r"), "--clusters", "3",
                         "--json"], capsys)
    assert rc == 0, err
    payload = json.loads(out)
    assert payload["vertices"] == 4
    assert payload["clusters"][0] == ["2", "3"]
    assert payload["most_redundant_pairs"][0] == {"a": "2", "b": "3", "distance": 0.0}
    assert payload["html"].endswith("qmfrg_layer.html")
    assert {row["name"] for row in payload["layers"]} == {"0", "2", "3", "5"}
    row = next(r for r in payload["layers"] if r["name"] == "2")
    assert row["nearest"] == "3" and row["nearest_distance"] == 0.0 and row["cluster"] == 1
    assert 1.0 <= row["effective_rank"] <= 9.0


def test_analyze_channel_level_summarizes_each_layer(tmp_path, model_file, capsys):
    out_dir = tmp_path / "ch"
    rc, out, err = _run(["analyze", model_file, "--level", "channel", "--clusters", "3",
                         "-o", str(out_dir), "--json"], capsys)
    assert rc == 0, err
    rows = json.loads(out)["layers"]
    assert [(r["name"], r["vertices"]) for r in rows] == [("0", 8), ("2", 8), ("3", 8), ("5", 4)]
    text = (out_dir / "qmfrg_channel.html").read_text(encoding="utf-8")
    assert "<th>median nearest-sibling distance</th>" in text
    assert "28 channels in 4 layers" in text


def test_analyze_head_level(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "enc.pt"
    torch.save(nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32), path)
    rc, out, err = _run(["analyze", str(path), "--level", "head", "-o", str(tmp_path / "h"),
                         "--json"], capsys)
    assert rc == 0, err
    (row,) = json.loads(out)["layers"]
    assert row["vertices"] == 4
    assert {"mean_spectral_entropy_qk", "mean_effective_rank_vo"} <= set(row)


def test_analyze_graph_json_is_compact_and_reads_back(tmp_path, model_file, capsys):
    """Edges only, at float32 precision, by default; --full-matrix / --graph-precision."""
    graph = redundancy_graph(torch.load(model_file, weights_only=False), level="channel")
    sizes = {}
    for name, extra in (("compact", []), ("exact", ["--graph-precision", "float64"]),
                        ("full", ["--full-matrix", "--graph-precision", "float64"])):
        out_dir = tmp_path / name
        rc, _, err = _run(["analyze", model_file, "--level", "channel", "--clusters", "3",
                           "-o", str(out_dir), "--json", *extra], capsys)
        assert rc == 0, err
        path = out_dir / "qmfrg_channel.json"
        sizes[name] = path.stat().st_size
        data = json.loads(path.read_text())
        assert ("distance" in data) is (name == "full")
        back = RedundancyGraph.from_json(path)
        assert back.names == graph.names and back.blocks == graph.blocks
        if name == "compact":
            assert data["precision"] == "float32"
            assert torch.equal(back.distance.float(), graph.distance.float())
        else:
            assert torch.equal(back.distance, graph.distance)
    assert sizes["compact"] < sizes["exact"] < sizes["full"]


def test_report_statistics_match_their_definitions():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([4.0, 3.0])))
    flat = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        flat.weight.copy_(torch.eye(3))
    graph = redundancy_graph(nn.Sequential(lin, flat), augment=False)
    skewed, uniform = graph.vertex_summary()
    entropy = -(0.64 * math.log(0.64) + 0.36 * math.log(0.36))  # ψ = (0.8, 0.6)
    assert skewed["spectral_entropy"] == pytest.approx(entropy)
    assert skewed["effective_rank"] == pytest.approx(math.exp(entropy))
    assert uniform["effective_rank"] == pytest.approx(3.0)  # flat spectrum: full rank
    assert skewed["nearest"] == "1"
    assert skewed["nearest_distance"] == pytest.approx(float(graph.distance[0, 1]))


def test_to_html_escapes_names_and_draws_heatmap_itself():
    graph = redundancy_graph(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)))
    graph.names = ["<a>", "b&c"]
    text = graph.to_html(clusters=[[0, 1]], title="<t>")
    assert "&lt;a&gt;" in text and "b&amp;c" in text and "<a>" not in text
    assert "<title>&lt;t&gt;</title>" in text
    assert 'src="data:image/png;base64,iVBORw0KGgo' in text  # PNG signature, base64
    with pytest.raises(ValueError, match="max_clusters"):
        graph.to_html(max_clusters=-1)


def _bad(tmp_path):
    not_a_model = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_model)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cnn = tmp_path / "cnn.pt"
    torch.save(_twin_model(), cnn)
    return {
        "unknown model": (["no_such_model"], "unknown model 'no_such_model'"),
        "missing file": ([str(tmp_path / "missing.pt")], "does not exist"),
        "not a module": ([str(not_a_model)], "not an nn.Module"),
        "bad import": (["no_such_pkg.mod:fn"], "cannot import"),
        "zero clusters": ([str(cnn), "--clusters", "0"], "--clusters must be a positive"),
        "negative top": ([str(cnn), "--top", "-1"], "--top must be >= 0"),
        "no heads": ([str(cnn), "--level", "head"], "no attention modules found"),
        "output is a file": ([str(cnn), "-o", str(a_file)], "cannot use --output-dir"),
    }


@pytest.mark.parametrize("case", ["unknown model", "missing file", "not a module", "bad import",
                                  "zero clusters", "negative top", "no heads",
                                  "output is a file"])
def test_analyze_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    args, message = _bad(tmp_path)[case]
    out_dir = [] if "-o" in args else ["-o", str(tmp_path / "out")]
    rc, out, err = _run(["analyze", *args, *out_dir, "--no-progress"], capsys)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qmprune analyze: error: ") and message in lines[0], lines[0]


# ------------------------------------------------------------------------------ qmprune prune


def _tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture()
def prune_files(tmp_path):
    """A saved tiny CNN, calibration inputs (N, 3, 8, 8) and a latency profile as a JSON file
    (a type profile: no timing)."""
    model = tmp_path / "cnn.pt"
    torch.save(_tiny_cnn(), model)
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)), calib)
    profile = tmp_path / "toy.json"
    profile.write_text(json.dumps({"name": "toy", "source": "test: not measured",
                                   "costs": {"conv": 2.0, "linear": 1.0}}))
    return {"model": str(model), "calib": str(calib), "profile": str(profile),
            "out": str(tmp_path / "pruned.pt"), "dir": tmp_path}


def _prune_args(files, *extra):
    return ["prune", files["model"], "--calibration", files["calib"], "--input-shape", "3,8,8",
            "-o", files["out"], *extra]


def test_prune_latency_target_with_profile_file(prune_files, capsys):
    report_path = prune_files["dir"] / "report.json"
    rc, out, err = _run(_prune_args(prune_files, "--target", "latency", "--ratio", "0.4",
                                    "--device-profile", prune_files["profile"],
                                    "--report", str(report_path), "--json"), capsys)
    assert rc == 0, err
    assert err == ""  # --json: no progress bar, no warnings
    payload = json.loads(out)
    assert payload["allocation"] == "latency" and payload["target"] == "latency"
    assert payload["allocation_info"]["profile"] == "toy"
    assert payload["allocation_seconds"] > 0
    assert abs(payload["allocation_info"]["achieved"] - 0.4) < 0.05
    assert json.loads(report_path.read_text()) == payload
    pruned = torch.load(prune_files["out"], weights_only=False)
    assert _params(pruned) == payload["params_after"] < payload["params_before"]
    assert _params(pruned) < _params(_tiny_cnn())
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_prune_policy_allocation_with_budget(prune_files, capsys):
    rc, out, err = _run(_prune_args(prune_files, "--target", "macs", "--allocation", "policy",
                                    "--budget", "0.6", "--allocation-kwargs",
                                    '{"steps": 20, "seed": 0}', "--json"), capsys)
    assert rc == 0, err
    payload = json.loads(out)
    assert payload["allocation"] == "policy" and payload["ratio"] == pytest.approx(0.4)
    assert payload["allocation_info"]["budget"] == pytest.approx(0.6)
    assert payload["macs_after"] < payload["macs_before"]
    assert _params(torch.load(prune_files["out"], weights_only=False)) < _params(_tiny_cnn())


def test_prune_human_output_and_progress_choice(prune_files, capsys, monkeypatch):
    import torch_qmprune.structural as structural

    real, seen = structural.prune, []

    def spy(*args, **kwargs):
        seen.append(kwargs["progress"])
        return real(*args, **(kwargs | {"progress": False}))

    monkeypatch.setattr(structural, "prune", spy)
    rc, out, err = _run(_prune_args(prune_files, "--budget", "0.5"), capsys)
    assert rc == 0, err
    assert "PruneReport(" in out and "saved pruned model to" in out
    assert "allocation" not in out  # uniform: nothing more to say
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    for extra in ([], ["--no-progress"], ["--json"]):
        assert _run(_prune_args(prune_files, "--ratio", "0.5", *extra), capsys)[0] == 0
    assert seen == [False, True, False, False]  # a bar only on a terminal, never with --json
    rc, out, _ = _run(_prune_args(prune_files, "--target", "latency", "--device-profile",
                                  prune_files["profile"], "--no-progress"), capsys)
    assert rc == 0 and "allocation 'latency'" in out and "profile 'toy'" in out


def test_prune_module_function_model_and_registered_allocation(prune_files, capsys,
                                                               monkeypatch):
    """MODEL as module:function; the module registers an allocation when imported."""
    (prune_files["dir"] / "tiny_models.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "import torch_qmprune\n\n"
        "def first_conv(model, example_inputs, **kw):\n"
        "    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))\n"
        "    return {conv: 0.5}, {'note': 'first conv only'}\n\n"
        "torch_qmprune.register_allocation('test-first-conv', first_conv, overwrite=True)\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))\n")
    monkeypatch.syspath_prepend(str(prune_files["dir"]))
    args = _prune_args(prune_files, "--allocation", "test-first-conv", "--json")
    args[1] = "tiny_models:build"
    rc, out, err = _run(args, capsys)
    assert rc == 0, err
    payload = json.loads(out)
    assert payload["allocation"] == "test-first-conv"
    assert payload["allocation_info"] == {"note": "first conv only"}
    assert payload["layers"]["0"] == {"before": 8, "after": 4}
    assert payload["layers"]["2"] == {"before": 8, "after": 8}


_PRUNE_BAD = {
    "latency without profile": (["--target", "latency"], "--target latency needs "
                                "--device-profile"),
    "latency allocation without profile": (["--allocation", "latency"],
                                           "--allocation latency needs --device-profile"),
    "budget zero": (["--budget", "0"], "--budget is the fraction kept, in (0, 1]"),
    "budget above one": (["--budget", "1.5"], "--budget is the fraction kept, in (0, 1]"),
    "ratio out of range": (["--ratio", "1.2"], "--ratio must be in [0, 1)"),
    "ratio and budget disagree": (["--ratio", "0.3", "--budget", "0.5"], "disagree"),
    "unknown allocation": (["--allocation", "nope"], "unknown --allocation 'nope'"),
    "unknown profile": (["--target", "latency", "--device-profile", "no-such-device"],
                        "unknown hardware profile 'no-such-device'"),
    "missing profile file": (["--target", "latency", "--device-profile", "missing.json"],
                             "does not exist"),
    "latency target, policy allocation": (["--target", "latency", "--allocation", "policy",
                                           "--device-profile", "ascend"],
                                          "target='latency' is reached by allocation='latency'"),
    "profile with uniform": (["--allocation", "uniform", "--device-profile", "ascend"],
                             "device_profile only apply"),
    "bad allocation kwargs": (["--allocation", "policy", "--allocation-kwargs", "{steps: 1}"],
                              "--allocation-kwargs must be a JSON object"),
    "allocation kwargs not a dict": (["--allocation", "policy", "--allocation-kwargs", "[1]"],
                                     "--allocation-kwargs must be a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(_PRUNE_BAD))
def test_prune_bad_input_exits_2_with_one_line(prune_files, capsys, case):
    extra, message = _PRUNE_BAD[case]
    rc, out, err = _run(_prune_args(prune_files, *extra), capsys)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qmprune prune: error: ") and message in lines[0], lines[0]
    assert not (prune_files["dir"] / "pruned.pt").exists()


def test_prune_debug_shows_the_traceback(prune_files):
    """prune()'s own ValueError, raised as is with --debug."""
    args = _prune_args(prune_files, "--target", "latency", "--allocation", "policy",
                       "--device-profile", "ascend")
    with pytest.raises(ValueError, match="target='latency' is reached"):
        main(["--debug", *args])


def test_prune_bad_profile_fails_before_loading_data(prune_files, capsys):
    """With random calibration (which warns on stderr), a bad profile still fails first."""
    args = _prune_args(prune_files, "--target", "latency", "--device-profile", "nowhere")
    args[args.index("--calibration") + 1] = "random"
    rc, out, err = _run(args, capsys)
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("qmprune prune: error: unknown hardware profile 'nowhere'")
