"""The ``qmprune`` command: ``analyze`` reports (HTML, Markdown, heatmap, JSON) and its errors."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
import torch
from torch import nn

from torch_qmprune.cli import main
from torch_qmprune.graph import redundancy_graph


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
