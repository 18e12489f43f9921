"""Tests for torch_qmprune.graph: the QM-FRG (§3.1) distances at layer / channel / head level,
spectral clustering with the eigengap heuristic (§3.4), and its exports."""

from __future__ import annotations

import copy
import json
import math

import networkx as nx
import pytest
import torch
import torchvision
from torch import nn

from torch_qmprune.graph import RedundancyGraph, redundancy_graph
from torch_qmprune.spectral import (
    pairwise_fubini_study,
    spectral_state,
    spectral_states,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _twin_conv_model() -> nn.Sequential:
    """conv0 (3->8), conv1 and conv3 identical (8->8), conv5 (8->4), fc."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    model[4].load_state_dict(model[2].state_dict())
    return model


def _spectrum_linear(singular_values: list[float], noise: float = 0.0) -> nn.Linear:
    """Linear layer U diag(s) Vᵀ (random orthogonal U, V), plus optional weight noise."""
    n = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(n, n))
    v, _ = torch.linalg.qr(torch.randn(n, n))
    layer = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(torch.tensor(singular_values)) @ v.T)
        layer.weight.add_(noise * torch.randn(n, n))
    return layer


# ------------------------------------------------------------------------------------ layer


def test_identical_conv_layers_distance_zero_and_same_cluster() -> None:
    graph = redundancy_graph(_twin_conv_model(), level="layer")
    assert graph.names == ["0", "2", "4", "6", "8"]
    assert graph.kinds == ["conv"] * 4 + ["linear"]
    i, j = graph.names.index("2"), graph.names.index("4")
    assert float(graph.distance[i, j]) == 0.0
    assert float(graph.distance[i, 0]) > 1e-3
    for clusters in (graph.cluster(), graph.cluster(n_clusters=3), graph.cluster(n_clusters=4)):
        assert any({i, j} <= set(c) for c in clusters)
    assert graph.cluster(n_clusters=4)[0] == [i, j]  # the most redundant cluster comes first
    assert graph.most_redundant_pairs(1) == [("2", "4", 0.0)]
    assert graph.representatives([[i, j]]) == [i]


def test_layer_state_matches_spectral_state_and_padding() -> None:
    model = _twin_conv_model()
    graph = redundancy_graph(model)
    psi0 = spectral_state(model[0], dtype=torch.float64)  # 8 x 27 -> 9 entries
    psi8 = spectral_state(model[8], dtype=torch.float64)  # 3 x 4 -> 4 entries
    assert graph.states.shape == (5, 9)
    torch.testing.assert_close(graph.states[0], psi0)
    torch.testing.assert_close(graph.states[4, :4], psi8)
    assert torch.count_nonzero(graph.states[4, 4:]) == 0
    expected = pairwise_fubini_study(torch.stack([psi0, torch.cat([psi8, psi8.new_zeros(5)])]))
    torch.testing.assert_close(graph.distance[0, 4], expected[0, 1])


@pytest.mark.filterwarnings("ignore:channel-level states of Linear rows")
@pytest.mark.parametrize("level", ["layer", "channel", "head"])
@pytest.mark.parametrize("metric", ["fs", "w2"])
def test_distance_symmetric_with_zero_diagonal(level: str, metric: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3), nn.Linear(4, 5), nn.MultiheadAttention(8, 2)
    )
    graph = redundancy_graph(model, level=level, metric=metric)
    d = graph.distance
    assert d.dtype == torch.float64
    assert torch.equal(d, d.T)
    assert torch.count_nonzero(torch.diagonal(d)) == 0
    finite = d[torch.isfinite(d)]
    assert bool((finite >= 0).all())
    if metric == "fs":
        assert float(finite.max()) <= math.pi / 2 + 1e-12
    n = {"layer": 5, "channel": 6 + 4 + 5 + 8, "head": 2}[level]
    assert len(graph) == n


def test_w2_metric_identical_layers_zero() -> None:
    graph = redundancy_graph(_twin_conv_model(), metric="w2")
    assert graph.metric == "w2"
    assert float(graph.distance[1, 2]) == 0.0
    assert float(graph.distance[0, 1]) > 0.0


def test_eigengap_finds_three_well_separated_groups() -> None:
    spectra = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 0.25, 0.0]]
    layers = [_spectrum_linear(s, noise=1e-3) for s in spectra for _ in range(3)]
    order = [0, 3, 6, 1, 4, 7, 2, 5, 8]  # interleave the groups
    graph = redundancy_graph(nn.Sequential(*[layers[k] for k in order]), augment=False)
    clusters = graph.cluster()
    assert len(clusters) == 3
    assert sorted(clusters) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_cluster_arguments() -> None:
    graph = redundancy_graph(_twin_conv_model())
    # 4 distinct operators: exact duplicates 1 and 2 are never split, singletons come last
    assert graph.cluster(n_clusters=5) == [[1, 2], [0], [3], [4]]
    assert graph.cluster(n_clusters=1) == [[0, 1, 2, 3, 4]]
    tight = graph.cluster(threshold=1e-6)
    assert tight[0] == [1, 2] and len(tight) == 4
    loose = graph.cluster(threshold=0.3)
    for cluster in loose:
        for a in cluster:
            for b in cluster:
                assert float(graph.distance[a, b]) < 0.3
    with pytest.raises(ValueError, match="not both"):
        graph.cluster(n_clusters=2, threshold=0.1)
    with pytest.raises(ValueError, match="exceeds the number of vertices"):
        graph.cluster(n_clusters=6)
    with pytest.raises(ValueError, match="n_clusters must be a positive int"):
        graph.cluster(n_clusters=0)
    with pytest.raises(ValueError, match="threshold must be a positive finite float"):
        graph.cluster(threshold=-1.0)
    with pytest.raises(ValueError, match="per_layer=True needs blocks"):
        graph.cluster(per_layer=True)
    with pytest.raises(ValueError, match="bandwidth must be"):
        graph.cluster(bandwidth="mean")


def test_clusters_ranked_by_mean_intra_cluster_distance() -> None:
    graph = redundancy_graph(_twin_conv_model())
    clusters = graph.cluster(n_clusters=3)

    def mean_distance(c: list[int]) -> float:
        if len(c) < 2:
            return math.inf
        return float(sum(graph.distance[a, b] for a in c for b in c if a < b)) / (
            len(c) * (len(c) - 1) / 2
        )

    scores = [mean_distance(c) for c in clusters]
    assert scores == sorted(scores)


def test_bad_level_and_metric_messages() -> None:
    model = nn.Linear(3, 3)
    with pytest.raises(
        ValueError,
        match=r"level must be one of \['layer', 'channel', 'head'\], "
        r"got 'neuron'",
    ):
        redundancy_graph(model, level="neuron")
    with pytest.raises(ValueError, match=r"metric must be one of \['fs', 'w2'\], got 'cosine'"):
        redundancy_graph(model, metric="cosine")
    with pytest.raises(ValueError, match="no attention modules found"):
        redundancy_graph(model, level="head")
    with pytest.raises(TypeError, match="module_filter must be a callable"):
        redundancy_graph(model, module_filter="conv")


def test_module_filter_selects_vertices() -> None:
    graph = redundancy_graph(
        _twin_conv_model(), module_filter=lambda n, m: isinstance(m, nn.Conv2d)
    )
    assert graph.names == ["0", "2", "4", "6"]


def test_hardware_weights_scale_distances_eq9() -> None:
    model = _twin_conv_model()
    plain = redundancy_graph(model)
    weighted = redundancy_graph(model, hardware_weights={"conv": 1.5, "linear": 1.0})
    # same kind: sqrt(c)·d (Eq. 9); conv vs linear: sqrt((1.5 + 1.0) / 2)·d
    torch.testing.assert_close(weighted.distance[0, 3], math.sqrt(1.5) * plain.distance[0, 3])
    torch.testing.assert_close(weighted.distance[0, 4], math.sqrt(1.25) * plain.distance[0, 4])
    assert weighted.hardware_weights == {"conv": 1.5, "linear": 1.0}
    with pytest.raises(ValueError, match="unknown operator kind 'gpu'"):
        redundancy_graph(model, hardware_weights={"gpu": 2.0})
    with pytest.raises(ValueError, match="must be a finite cost >= 0"):
        redundancy_graph(model, hardware_weights={"conv": -1.0})


# ---------------------------------------------------------------------------------- channel


def test_duplicated_channel_pairs_cluster_in_pairs() -> None:
    conv = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        conv.weight[1::2] = conv.weight[0::2]
        conv.bias[1::2] = conv.bias[0::2]
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 5, 3))
    graph = redundancy_graph(model, level="channel")
    assert graph.blocks == {"0": slice(0, 8), "2": slice(8, 13)}
    assert graph.names[:2] == ["0[0]", "0[1]"]
    for p in range(4):
        assert float(graph.distance[2 * p, 2 * p + 1]) == 0.0
    assert math.isinf(float(graph.distance[0, 8]))  # no edge across layers
    expected = [[0, 1], [2, 3], [4, 5], [6, 7]]
    explicit = graph.cluster(n_clusters={"0": 4, "2": 5})
    assert sorted(explicit[:4]) == expected
    assert sorted(explicit[4:]) == [[8], [9], [10], [11], [12]]
    pairs = [c for c in graph.cluster() if max(c) < 8]  # eigengap, per layer by default
    assert sorted(pairs) == expected
    reps = graph.representatives(sorted(explicit[:4]))
    assert reps == [0, 2, 4, 6]


def test_channel_states_are_filter_spectra_with_bias() -> None:
    conv = nn.Conv2d(2, 3, 3)
    graph = redundancy_graph(nn.Sequential(conv), level="channel")
    w, b = conv.weight.detach().double(), conv.bias.detach().double()
    for i in range(3):
        s = torch.cat([torch.linalg.svdvals(w[i].reshape(2, 9)), b[i].abs().reshape(1)])
        s = torch.sort(s, descending=True).values
        torch.testing.assert_close(graph.states[i], s / s.norm())


def test_channel_level_linear_rows_carry_norm_ratio() -> None:
    lin = nn.Linear(6, 4)
    graph = redundancy_graph(nn.Sequential(lin), level="channel")
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    for i in range(4):
        s = torch.sort(torch.stack([w[i].norm(), b[i].abs()]), descending=True).values
        torch.testing.assert_close(graph.states[i], s / s.norm())
    with pytest.warns(UserWarning, match="all e₁"):
        flat = redundancy_graph(nn.Sequential(nn.Linear(6, 4, bias=False)), level="channel")
    assert float(flat.distance.max()) == 0.0


def test_dead_channels_without_augment_are_defined() -> None:
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[1:3] = 0
    graph = redundancy_graph(nn.Sequential(conv), level="channel", augment=False)
    assert float(graph.distance[1, 2]) == 0.0
    assert torch.equal(graph.states[1], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert bool(torch.isfinite(graph.distance).all())


# ------------------------------------------------------------------------------------- head


def test_head_graph_duplicate_heads_and_eq9_combination() -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():  # head 3 := head 1 in q, k, v and out_proj
        for part in range(3):
            base = part * 16
            mha.in_proj_weight[base + 12 : base + 16] = mha.in_proj_weight[base + 4 : base + 8]
            mha.in_proj_bias[base + 12 : base + 16] = mha.in_proj_bias[base + 4 : base + 8]
        mha.out_proj.weight[:, 12:16] = mha.out_proj.weight[:, 4:8]
    model = nn.Sequential()
    model.add_module("attn", mha)
    graph = redundancy_graph(model, level="head")
    assert graph.names == ["attn.head0", "attn.head1", "attn.head2", "attn.head3"]
    assert graph.blocks == {"attn": slice(0, 4)}
    assert float(graph.distance[1, 3]) == 0.0
    assert graph.most_redundant_pairs(1)[0][:2] == ("attn.head1", "attn.head3")
    # d = sqrt(d_qk² + d_vo²) from the per-part states
    from torch_qmprune.operators import head_matrices

    hm = head_matrices(mha)
    qk = spectral_states(hm["qk"], None, dtype=torch.float64)
    vo = spectral_states(hm["vo"], hm["vo_bias"], dtype=torch.float64)
    expect = torch.sqrt(pairwise_fubini_study(qk) ** 2 + pairwise_fubini_study(vo) ** 2)
    torch.testing.assert_close(graph.distance, expect)
    torch.testing.assert_close(graph.states[:, graph.state_parts["qk"]], qk)
    weighted = redundancy_graph(model, level="head", hardware_weights={"head-qk": 0.0})
    torch.testing.assert_close(weighted.distance, pairwise_fubini_study(vo))


def test_vit_head_graph() -> None:
    vit = torchvision.models.VisionTransformer(
        image_size=28,
        patch_size=7,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )
    graph = redundancy_graph(vit, level="head")
    assert len(graph) == 8
    assert list(graph.blocks) == [
        "encoder.layers.encoder_layer_0.self_attention",
        "encoder.layers.encoder_layer_1.self_attention",
    ]
    assert graph.names[5] == "encoder.layers.encoder_layer_1.self_attention.head1"
    assert bool((graph.distance + torch.eye(8) > 0).all())  # random heads: all distinct
    per_module = graph.cluster(n_clusters=2, per_layer=True)
    assert len(per_module) == 4
    assert all(max(c) < 4 or min(c) >= 4 for c in per_module)


def test_bert_head_graph() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    bert = transformers.BertModel(config)
    graph = redundancy_graph(bert, level="head")
    assert len(graph) == 8
    assert list(graph.blocks) == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    layer_graph = redundancy_graph(bert, level="layer")
    assert "encoder.layer.0.attention.qk" in layer_graph.names
    assert "embeddings.word_embeddings" in layer_graph.names


# ----------------------------------------------------------------------------------- export


def _assert_same_graph(back: RedundancyGraph, graph: RedundancyGraph) -> None:
    assert back.names == graph.names and back.kinds == graph.kinds
    assert back.level == graph.level and back.metric == graph.metric
    assert torch.equal(back.distance, graph.distance)
    assert torch.equal(back.states, graph.states)
    assert back.blocks == graph.blocks and back.state_parts == graph.state_parts


def test_json_round_trip(tmp_path) -> None:
    for level in ("layer", "channel"):
        graph = redundancy_graph(_twin_conv_model(), level=level)
        for full in (False, True):
            path = tmp_path / f"{level}-{full}.json"
            data = graph.to_json(path, full_matrix=full)
            json.dumps(data, allow_nan=False)  # standard JSON: inf stored as null
            assert ("distance" in data) is full and ("distance_upper" in data) is not full
            for source in (data, path, str(path)):
                back = RedundancyGraph.from_json(source)
                _assert_same_graph(back, graph)
                assert back.cluster() == graph.cluster()
    with pytest.raises(ValueError, match="not a RedundancyGraph JSON"):
        RedundancyGraph.from_json({"format": "other"})


def test_json_is_compact_edges_only(tmp_path) -> None:
    """Channel level: one upper triangle per layer, no inf between layers, no diagonal."""
    graph = redundancy_graph(_twin_conv_model(), level="channel")
    data = graph.to_json()
    sizes = [8, 8, 8, 4, 3]
    blocks = data["distance_upper"]
    assert [(b["start"], b["stop"]) for b in blocks] == [(s.start, s.stop)
                                                         for s in graph.blocks.values()]
    assert [len(b["values"]) for b in blocks] == [c * (c - 1) // 2 for c in sizes]
    assert None not in [v for b in blocks for v in b["values"]]
    assert data["version"] == 2 and data["precision"] == "float64"
    compact, full = tmp_path / "compact.json", tmp_path / "full.json"
    graph.to_json(compact)
    graph.to_json(full, full_matrix=True)
    assert compact.stat().st_size < full.stat().st_size
    dense = json.dumps(graph.to_json(full_matrix=True)["distance"])
    assert len(json.dumps(blocks)) < len(dense) / 3
    # layer level: a complete graph, one block of all vertices
    layer = redundancy_graph(_twin_conv_model()).to_json()
    (block,) = layer["distance_upper"]
    assert (block["start"], block["stop"]) == (0, 5) and len(block["values"]) == 10


def test_json_float32_precision(tmp_path) -> None:
    graph = redundancy_graph(_twin_conv_model(), level="channel")
    path, exact = tmp_path / "f32.json", tmp_path / "f64.json"
    data = graph.to_json(path, precision="float32")
    graph.to_json(exact)
    assert data["precision"] == "float32"
    assert path.stat().st_size < exact.stat().st_size
    back = RedundancyGraph.from_json(path)
    assert back.distance.dtype == torch.float64
    finite = torch.isfinite(graph.distance)
    assert torch.equal(finite, torch.isfinite(back.distance))
    # the float32 nearest to each distance, written as its shortest decimal
    assert torch.equal(back.distance[finite].float(), graph.distance[finite].float())
    assert torch.allclose(back.states, graph.states, rtol=1e-7, atol=1e-7)
    # a float32 graph is written at its own precision and round-trips exactly
    g32 = redundancy_graph(_twin_conv_model(), level="channel", dtype=torch.float32)
    assert g32.to_json()["precision"] == "float32"
    _assert_same_graph(RedundancyGraph.from_json(g32.to_json()), g32)
    with pytest.raises(ValueError, match="precision"):
        graph.to_json(precision="float16")


def test_json_head_level_and_dense_fallback() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    model = nn.Sequential(layer, copy.deepcopy(layer))
    graph = redundancy_graph(model, level="head")
    data = graph.to_json()
    # heads of different modules are comparable: one block of all heads, not one per module
    assert [(b["start"], b["stop"]) for b in data["distance_upper"]] == [(0, 4)]
    _assert_same_graph(RedundancyGraph.from_json(data), graph)
    # a hand-made asymmetric matrix cannot be halved: stored dense, still round-trips
    graph.distance = graph.distance.clone()
    graph.distance[0, 1] += 0.5
    data = graph.to_json()
    assert "distance" in data and "distance_upper" not in data
    _assert_same_graph(RedundancyGraph.from_json(data), graph)
    with pytest.raises(ValueError, match="expected 6"):
        bad = graph.to_json() | {"distance": None}
        del bad["distance"]
        bad["distance_upper"] = [{"start": 0, "stop": 4, "values": [0.0]}]
        RedundancyGraph.from_json(bad)


def test_networkx_export() -> None:
    graph = redundancy_graph(_twin_conv_model())
    g = graph.to_networkx()
    n = len(graph)
    assert g.number_of_nodes() == n
    assert g.number_of_edges() == n * (n - 1) // 2
    assert g.edges["2", "4"]["weight"] == 0.0
    assert g.nodes["8"]["kind"] == "linear" and g.nodes["8"]["index"] == 4
    assert g.graph["level"] == "layer"
    channel = redundancy_graph(_twin_conv_model(), level="channel").to_networkx()
    sizes = [8, 8, 8, 4, 3]
    assert channel.number_of_edges() == sum(c * (c - 1) // 2 for c in sizes)
    assert nx.number_connected_components(channel) == 5


def test_heatmap_png(tmp_path) -> None:
    graph = redundancy_graph(_twin_conv_model(), level="channel")
    path = tmp_path / "heatmap.png"
    fig = graph.plot_heatmap(path, title="channels")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_xlabel() == "channel" and ax.get_title() == "channels"
    assert len(fig.axes) == 2  # image + colorbar
    assert fig.axes[1].get_ylabel() == "Fubini–Study distance (rad)"
    assert len(ax.get_xticklabels()) == len(graph) or len(graph) > 40


def test_cluster_isolated_vertex_is_a_singleton_without_overflow():
    # two tight groups and one far-away vertex: at the nearest-neighbour bandwidth its
    # affinities underflow; the embedding must not overflow and it must come back alone
    import warnings

    import numpy as np

    from torch_qmprune.graph import _cluster_matrix

    pts = np.array([0.0, 0.01, 0.02, 1.0, 1.01, 1.02, 1.03, 1.41])  # exp(-722): denormal
    dist = np.abs(pts[:, None] - pts[None, :])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        clusters = _cluster_matrix(dist, 3, None, 0)
    assert sorted(map(sorted, clusters)) == [[0, 1, 2], [3, 4, 5, 6], [7]]
