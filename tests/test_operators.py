"""Tests for torch_qmprune.operators: exact matrices of Linear / Conv / Embedding / attention
heads (checked against forward passes), the registry and the unsupported-module error."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from torch_qmprune.operators import (
    OperatorView,
    UnsupportedModuleError,
    bert_head_matrices,
    channel_matrices,
    head_matrices,
    layer_matrices,
    operator_views,
    register_operator,
    unregister_operator,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------- linear / conv


def test_linear_view_is_weight_and_bias() -> None:
    net = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    views = layer_matrices(net)
    assert list(views) == ["0", "2"]
    assert views["0"].kind == "linear"
    assert torch.equal(views["0"].matrix, net[0].weight.detach())
    assert torch.equal(views["0"].bias, net[0].bias.detach())
    assert views["2"].bias is None
    assert not views["0"].matrix.requires_grad


def test_conv_layer_and_channel_matrices() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=(3, 2))
    (view,) = operator_views(conv, "conv")
    assert view.kind == "conv" and view.name == "conv"
    assert tuple(view.matrix.shape) == (8, 18)
    assert torch.equal(view.matrix, conv.weight.detach().reshape(8, 18))
    chans = channel_matrices(conv)
    assert tuple(chans.shape) == (8, 3, 6)
    assert torch.equal(chans[5], conv.weight.detach()[5].reshape(3, 6))
    assert tuple(channel_matrices(nn.Conv1d(4, 6, 5)).shape) == (6, 4, 5)
    assert tuple(channel_matrices(nn.Conv3d(2, 3, 3)).shape) == (3, 2, 27)
    lin = nn.Linear(7, 4)
    rows = channel_matrices(lin)
    assert tuple(rows.shape) == (4, 1, 7)
    assert torch.equal(rows[2, 0], lin.weight.detach()[2])


def test_grouped_conv_is_block_diagonal_operator() -> None:
    conv = nn.Conv2d(4, 6, 3, groups=2)
    matrix = operator_views(conv)[0].matrix
    w = conv.weight.detach()
    assert tuple(matrix.shape) == (6, 36)
    assert torch.equal(matrix[:3, :18], w[:3].reshape(3, 18))
    assert torch.equal(matrix[3:, 18:], w[3:].reshape(3, 18))
    assert torch.count_nonzero(matrix[:3, 18:]) == 0 and torch.count_nonzero(matrix[3:, :18]) == 0
    # spectrum of the block-diagonal operator = union of the groups' spectra
    union = torch.cat(
        [torch.linalg.svdvals(w[:3].reshape(3, 18)), torch.linalg.svdvals(w[3:].reshape(3, 18))]
    )
    torch.testing.assert_close(
        torch.linalg.svdvals(matrix), torch.sort(union, descending=True).values
    )
    assert tuple(channel_matrices(conv).shape) == (6, 2, 9)


def test_conv_transpose_channel_is_weight_column() -> None:
    convt = nn.ConvTranspose2d(4, 6, 3, groups=2)
    chans = channel_matrices(convt)
    w = convt.weight.detach()  # (C_in, C_out / g, 3, 3)
    assert tuple(chans.shape) == (6, 2, 9)
    # output channel 4 = group 1, local channel 1: reads inputs 2..3
    assert torch.equal(chans[4], w[2:4, 1].reshape(2, 9))
    # only that filter matters for output channel 4: zeroing it zeroes the response
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        convt.weight[2:4, 1] = 0
        convt.bias.zero_()
        y = convt(x)[0]
    assert float(y[4].abs().max()) == 0.0
    assert float(y[5].abs().max()) > 0.0


def test_embedding_view() -> None:
    emb = nn.Embedding(11, 4)
    (view,) = operator_views(emb, "emb")
    assert view.kind == "embedding"
    assert torch.equal(view.matrix, emb.weight.detach())
    assert view.bias is None


# ----------------------------------------------------------------------------------- attention


def _mha_slices(mha: nn.MultiheadAttention):
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight.detach()
        return w[:e], w[e : 2 * e], w[2 * e :]
    return mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()


def test_mha_qk_equals_manual_product_of_in_proj_slices() -> None:
    mha = nn.MultiheadAttention(12, 3)
    hm = head_matrices(mha, num_heads=3)
    wq, wk, _ = _mha_slices(mha)
    assert tuple(hm["qk"].shape) == (3, 12, 12)
    for h in range(3):
        rows = slice(4 * h, 4 * h + 4)
        torch.testing.assert_close(hm["qk"][h], wq[rows].T @ wk[rows])
    torch.testing.assert_close(hm["qk"].sum(0), wq.T @ wk, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dims", [(None, None), (6, 5)])
def test_mha_head_matrices_reproduce_forward(batch_first: bool, dims: tuple) -> None:
    kdim, vdim = dims
    e, heads, hd = 8, 2, 4
    mha = nn.MultiheadAttention(e, heads, batch_first=batch_first, kdim=kdim, vdim=vdim)
    with torch.no_grad():  # make the q/k biases zero so scores are exactly the bilinear form
        mha.in_proj_bias[: 2 * e].zero_()
        mha.in_proj_bias[2 * e :].normal_()
        mha.out_proj.bias.normal_()
    hm = head_matrices(mha)
    assert tuple(hm["qk"].shape) == (heads, e, kdim or e)
    assert tuple(hm["vo"].shape) == (heads, e, vdim or e)
    assert tuple(hm["vo_bias"].shape) == (heads, e)
    xq, xk, xv = torch.randn(5, e), torch.randn(7, kdim or e), torch.randn(7, vdim or e)

    def batch(x):
        return x.unsqueeze(0) if batch_first else x.unsqueeze(1)

    with torch.no_grad():
        out, attn = mha(batch(xq), batch(xk), batch(xv), average_attn_weights=False)
    attn = attn[0]  # (H, L, S)
    out = out[0] if batch_first else out[:, 0]
    expect_out = mha.out_proj.bias.detach().clone()
    for h in range(heads):
        scores = xq @ hm["qk"][h] @ xk.T / math.sqrt(hd)
        torch.testing.assert_close(attn[h], torch.softmax(scores, dim=-1), atol=1e-5, rtol=1e-5)
        expect_out = expect_out + attn[h] @ (xv @ hm["vo"][h].T + hm["vo_bias"][h])
    torch.testing.assert_close(out, expect_out, atol=1e-5, rtol=1e-5)


def test_mha_layer_view_consumes_out_proj_and_sums_heads() -> None:
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2, batch_first=True))
    model.add_module("fc", nn.Linear(8, 3))
    views = layer_matrices(model)
    assert list(views) == ["attn.qk", "attn.vo", "fc"]  # out_proj is inside attn.vo
    attn = model.attn
    wq, wk, wv = _mha_slices(attn)
    wo, bo = attn.out_proj.weight.detach(), attn.out_proj.bias.detach()
    bv = attn.in_proj_bias.detach()[16:]
    assert views["attn.qk"].kind == "head-qk" and views["attn.qk"].is_batch
    torch.testing.assert_close(views["attn.qk"].layer_matrix(), wq.T @ wk, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(views["attn.vo"].layer_matrix(), wo @ wv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(views["attn.vo"].layer_bias(), wo @ bv + bo, atol=1e-6, rtol=1e-5)
    assert views["attn.qk"].layer_bias() is None


def _tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=28,
        patch_size=7,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )


def test_torchvision_vit_heads() -> None:
    vit = _tiny_vit()
    layers = list(vit.encoder.layers)
    assert len(layers) == 2
    for layer in layers:
        hm = head_matrices(layer.self_attention)
        assert tuple(hm["qk"].shape) == (4, 64, 64)
        assert tuple(hm["vo"].shape) == (4, 64, 64)
        wq, wk, _ = _mha_slices(layer.self_attention)
        torch.testing.assert_close(hm["qk"][3], wq[48:].T @ wk[48:])
    views = layer_matrices(vit)
    kinds = [v.kind for v in views.values()]
    assert kinds.count("head-qk") == 2 and kinds.count("head-vo") == 2
    assert kinds.count("conv") == 1  # the patch embedding
    assert kinds.count("linear") == 2 * 2 + 1  # two MLP layers per block + classifier
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" not in views


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config).eval()


def test_bert_head_matrices_match_query_key_value_slices() -> None:
    bert = _tiny_bert()
    attention = bert.encoder.layer[1].attention
    hm = bert_head_matrices(attention)
    wq, wk = attention.self.query.weight.detach(), attention.self.key.weight.detach()
    wv, bv = attention.self.value.weight.detach(), attention.self.value.bias.detach()
    wo, bo = attention.output.dense.weight.detach(), attention.output.dense.bias.detach()
    assert tuple(hm["qk"].shape) == (4, 32, 32) and tuple(hm["vo"].shape) == (4, 32, 32)
    for h in range(4):
        r = slice(8 * h, 8 * h + 8)
        torch.testing.assert_close(hm["qk"][h], wq[r].T @ wk[r])
        torch.testing.assert_close(hm["vo"][h], wo[:, r] @ wv[r])
        torch.testing.assert_close(hm["vo_bias"][h], wo[:, r] @ bv[r])
    torch.testing.assert_close(head_matrices(attention, num_heads=4)["qk"], hm["qk"])
    views = layer_matrices(bert)
    assert "encoder.layer.0.attention.qk" in views and "encoder.layer.1.attention.vo" in views
    assert "encoder.layer.0.attention.self.query" not in views
    torch.testing.assert_close(
        views["encoder.layer.1.attention.vo"].layer_bias(), wo @ bv + bo, atol=1e-6, rtol=1e-5
    )
    assert views["embeddings.word_embeddings"].kind == "embedding"
    with pytest.raises(ValueError, match="pass its parent"):
        head_matrices(attention.self)


def test_head_matrices_errors() -> None:
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="num_heads=3 but"):
        head_matrices(mha, num_heads=3)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        head_matrices(mha, num_heads=True)
    with pytest.raises(UnsupportedModuleError, match="Conv2d"):
        head_matrices(nn.Conv2d(3, 3, 3))
    with pytest.raises(UnsupportedModuleError, match="no attention-head handler"):
        head_matrices(nn.Linear(3, 3))


# ------------------------------------------------------------------------- registry and errors


class MyLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel.T


def test_unsupported_module_error_names_module_and_how_to_register() -> None:
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Linear(4, 4)))
    model.block.add_module("custom", MyLayer())
    with pytest.raises(UnsupportedModuleError) as info:
        layer_matrices(model)
    message = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "'block.custom'" in message
    assert f"{MyLayer.__module__}.MyLayer" in message
    assert "register it with torch_qmprune.register_operator(MyLayer, handler)" in message
    # escape hatches: non-strict walk, or a filter that leaves the module out
    assert list(layer_matrices(model, strict=False)) == ["block.0"]
    assert list(layer_matrices(model, module_filter=lambda n, m: n != "block.custom")) == [
        "block.0"
    ]
    with pytest.raises(UnsupportedModuleError, match="channel handler"):
        channel_matrices(MyLayer())


def test_parameter_free_and_norm_layers_are_skipped() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm(4),
        nn.Linear(4, 2),
    )
    assert list(layer_matrices(model)) == ["0", "5"]


def test_custom_registration_decorator_and_mro() -> None:
    @register_operator(MyLayer)
    def _handler(module: MyLayer) -> list[OperatorView]:
        return [OperatorView("kernel", "custom", module.kernel.detach())]

    try:
        model = nn.Sequential(nn.Linear(4, 4), MyLayer())
        views = layer_matrices(model)
        assert list(views) == ["0", "1.kernel"]
        assert views["1.kernel"].kind == "custom"
        assert torch.equal(views["1.kernel"].matrix, model[1].kernel.detach())

        class SubLayer(MyLayer):  # subclasses use the base class handler
            pass

        assert operator_views(SubLayer(), "s")[0].name == "s.kernel"
    finally:
        unregister_operator(MyLayer)
    with pytest.raises(UnsupportedModuleError):
        layer_matrices(nn.Sequential(MyLayer()))
    with pytest.raises(KeyError, match="no operator handler"):
        unregister_operator(MyLayer)


def test_registration_overrides_builtin_and_validates() -> None:
    class Doubled(nn.Linear):
        pass

    register_operator(Doubled, lambda m: OperatorView("", "linear", 2 * m.weight.detach()))
    try:
        layer = Doubled(3, 3)
        assert torch.equal(operator_views(layer)[0].matrix, 2 * layer.weight.detach())
    finally:
        unregister_operator(Doubled)
    assert torch.equal(operator_views(layer)[0].matrix, layer.weight.detach())  # back to Linear
    with pytest.raises(TypeError, match="subclass of torch.nn.Module"):
        register_operator(int, lambda m: None)
    with pytest.raises(TypeError, match="handler must be callable"):
        register_operator(MyLayer, 3)
    register_operator(MyLayer, lambda m: "not a view")
    try:
        with pytest.raises(TypeError, match="must return OperatorView"):
            operator_views(MyLayer())
    finally:
        unregister_operator(MyLayer)


def test_operator_view_validates_shapes() -> None:
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        OperatorView("x", "linear", torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="matrix must be a"):
        OperatorView("x", "linear", torch.zeros(3))
    batch = OperatorView("x", "head-vo", torch.ones(2, 3, 3), torch.ones(2, 3), torch.ones(3))
    assert torch.equal(batch.layer_matrix(), torch.full((3, 3), 2.0))
    assert torch.equal(batch.layer_bias(), torch.full((3,), 3.0))


def test_root_module_names() -> None:
    assert list(layer_matrices(nn.Linear(3, 2))) == ["Linear"]
    assert list(layer_matrices(nn.MultiheadAttention(8, 2))) == ["qk", "vo"]
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32)
    views = layer_matrices(layer)
    assert list(views) == ["self_attn.qk", "self_attn.vo", "linear1", "linear2"]
