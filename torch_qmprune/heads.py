"""Attention-head pruning: score whole heads (QM-FRG head vertices, arXiv 2512.00880 §3.1) and
remove them physically from ``nn.MultiheadAttention`` (torchvision ViT included) and Hugging Face
BERT-style encoders, merging each removed head into its surviving siblings by least squares.

Torch-Pruning 1.6 can only shrink the *head dimension* of ``nn.MultiheadAttention``; this module
removes whole heads and keeps ``embed_dim`` and ``head_dim``. The heads of one layer are the
vertices of the paper's QM-FRG (§3.1); four criteria rank them (higher score = keep):

* ``"qm"`` (default, data-aware): the output projection reads the concatenation of the heads'
  contexts ``X = [X_1, …, X_H]`` (``D = H·head_dim`` features). Its Gram ``[X, 1]ᵀ[X, 1]``
  (the unnormalized activation density matrix ρ of §3.2, with a constant feature) is streamed on
  calibration inputs by hooks, never storing activations. With blocks = each head's
  ``head_dim`` slice, :func:`~torch_qmprune.importance.greedy_merge_costs` removes heads greedily
  in the order of least output error *after* the removed head is merged into the survivors
  (block Optimal-Brain-Surgeon); :func:`prune_heads` then performs that merge
  (:func:`~torch_qmprune.structural.compensate_group`: ``X_P ≈ [X_K, 1]B``, ``W_K += W_P Bᵀ``,
  constant into the bias) — the paper's premise that redundant operators can be replaced by
  their siblings, made exact in activation space.
* ``"l1"``: L1 norm of the head's query/key/value rows and output-projection columns.
* ``"random"``: seeded uniform scores (Budhraja et al. 2020: a head criterion must beat it).
* ``"literal"`` (paper §3.1 as written): Fubini–Study distance of the head's spectral state to
  its nearest surviving sibling, greedy. A head has two operators
  (:func:`~torch_qmprune.operators.head_matrices`: ``W_Q_hᵀW_K_h`` without bias and
  ``W_O_h W_V_h`` augmented with its bias, §2.1); their distances combine as in the paper's
  Eq. (9) with unit costs: ``d(h, g) = sqrt(d_FS²(QK_h, QK_g) + d_FS²(VO_h, VO_g))``.

Measured (benchmarks/heads_minilm.py, pretrained all-MiniLM-L6-v2, 150 calibration / 150 held-out
sentences, one-shot, no fine-tuning): mean cosine of pruned vs dense sentence embeddings with
merging, 25 / 50 / 75 % of heads removed per layer — qm 0.965 / 0.911 / 0.827, random (3 seeds)
0.937 / 0.862 / 0.767, l1 0.923 / 0.821 / 0.744; merging adds 0.05–0.15 to every criterion.

Limits: Grams are collected once on the dense model (one-shot: later layers are scored on inputs
from the unpruned earlier layers); a 3-D ``attn_mask`` must be shaped for the *current*
``num_heads``; nested-tensor inputs, cross-attention blocks and MHA subclasses other than
:class:`PrunedMultiheadAttention` are not pruned.

Public calls: :func:`head_counts`, :func:`collect_head_grams`, :func:`head_scores`,
:func:`prune_heads`, :func:`prune_attention_heads` (→ :class:`HeadPruneReport`),
:func:`from_pretrained_pruned` (reload a pruned Hugging Face model) and
:class:`PrunedMultiheadAttention` (what a pruned ``nn.MultiheadAttention`` becomes).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from ._transaction import atomic
from ._validation import check_ratio
from .calibration import CalibrationStats, InputGram, _forward, iter_calibration
from .importance import _order_to_scores, greedy_merge_costs
from .methods import _greedy_sibling_order
from .operators import OperatorView, _bert_parts, _head_views, head_matrices, register_operator
from .spectral import pairwise_fubini_study, spectral_states
from .structural import compensate_group

__all__ = [
    "HEAD_CRITERIA",
    "HeadPruneReport",
    "PrunedMultiheadAttention",
    "collect_head_grams",
    "from_pretrained_pruned",
    "head_counts",
    "head_scores",
    "prune_attention_heads",
    "prune_heads",
]

HEAD_CRITERIA = ("qm", "l1", "random", "literal")

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


# ---------------------------------------------------------------------------------------------
# attention computed from a module's current weights (dense or pruned)
# ---------------------------------------------------------------------------------------------


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool masks (``True`` = may not attend, torch's MHA convention) → ``0 / -inf`` floats."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def _mha_projections(mha: nn.MultiheadAttention) -> tuple[Tensor, Tensor, Tensor, Tensor | None,
                                                          Tensor | None, Tensor | None]:
    """``(W_q, W_k, W_v, b_q, b_k, b_v)`` of the *current* heads (``num_heads·head_dim`` rows)."""
    n = mha.num_heads * mha.head_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight
        wq, wk, wv = w[:n], w[n:2 * n], w[2 * n:]
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b = mha.in_proj_bias
    if b is None:
        return wq, wk, wv, None, None, None
    return wq, wk, wv, b[:n], b[n:2 * n], b[2 * n:]


def _mha_context(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    *,
    need_weights: bool = False,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None, bool]:
    """Concatenated per-head context (the out-projection's input) of ``mha`` on these inputs.

    Recomputes what ``F.multi_head_attention_forward`` does up to (not including) the output
    projection, from the module's current weights — so it also works after heads were removed
    (``num_heads·head_dim < embed_dim``), where torch's functional path cannot. Supports
    ``batch_first`` both ways, unbatched inputs, ``kdim``/``vdim``, ``bias_k``/``bias_v``,
    ``add_zero_attn``, bool or float ``attn_mask`` (2-D, or 3-D with ``batch·num_heads``
    leading dim) and ``key_padding_mask``, and attention dropout in training mode.

    Returns:
        ``(context (B, L, num_heads·head_dim) batch-first, weights or None, batched)``.
    """
    if query.is_nested:
        raise NotImplementedError("nested-tensor inputs are not supported by pruned attention")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    bsz, tgt_len, _ = query.shape
    h, hd = mha.num_heads, mha.head_dim
    wq, wk, wv, bq, bk, bv = _mha_projections(mha)
    q = F.linear(query, wq, bq)
    k = F.linear(key, wk, bk)
    v = F.linear(value, wv, bv)
    if mha.bias_k is not None and mha.bias_v is not None:
        k = torch.cat([k, mha.bias_k.reshape(1, 1, -1).expand(bsz, 1, -1)], 1)
        v = torch.cat([v, mha.bias_v.reshape(1, 1, -1).expand(bsz, 1, -1)], 1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.reshape(bsz, tgt_len, h, hd).transpose(1, 2)
    k = k.reshape(bsz, k.shape[1], h, hd).transpose(1, 2)
    v = v.reshape(bsz, v.shape[1], h, hd).transpose(1, 2)
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(bsz, h, 1, hd)], 2)
        v = torch.cat([v, v.new_zeros(bsz, h, 1, hd)], 2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
    if attn_mask is not None:
        m = _additive_mask(attn_mask, scores.dtype)
        m = m.view(bsz, h, tgt_len, -1) if m.dim() == 3 else m.view(1, 1, tgt_len, -1)
        scores = scores + m
    if key_padding_mask is not None:
        scores = scores + _additive_mask(key_padding_mask, scores.dtype).view(bsz, 1, 1, -1)
    attn = torch.softmax(scores, dim=-1)
    if mha.dropout > 0.0 and mha.training:
        attn = F.dropout(attn, p=mha.dropout)
    ctx = torch.matmul(attn, v).transpose(1, 2).reshape(bsz, tgt_len, h * hd)
    weights = None
    if need_weights:
        weights = attn.mean(dim=1) if average_attn_weights else attn
    return ctx, weights, batched


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after whole heads were removed (what :func:`prune_heads` makes).

    Same parameters and state_dict keys as the original, with ``num_heads`` heads of the
    original ``head_dim`` and an unchanged ``embed_dim``: ``in_proj_weight`` is
    ``(3·num_heads·head_dim, embed_dim)`` (or ``q/k/v_proj_weight`` with
    ``num_heads·head_dim`` rows when ``_qkv_same_embed_dim`` is ``False``) and
    ``out_proj.weight`` is ``(embed_dim, num_heads·head_dim)``. torch's functional
    ``F.multi_head_attention_forward`` requires ``num_heads·head_dim == embed_dim``, so
    :meth:`forward` computes attention itself (same signature and return values); the output
    projection is called as a module, so hooks on ``out_proj`` fire.

    Example:
        >>> mha = nn.MultiheadAttention(16, 4, batch_first=True)
        >>> _ = prune_heads(mha, {mha: [1, 3]})
        >>> type(mha).__name__, mha.num_heads, mha.head_dim, mha.in_proj_weight.shape
        ('PrunedMultiheadAttention', 2, 4, torch.Size([24, 16]))
        >>> mha(torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16))[0].shape
        torch.Size([2, 5, 16])
    """

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        ctx, weights, batched = _mha_context(
            self, query, key, value, key_padding_mask, attn_mask, need_weights=need_weights,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        out = self.out_proj(ctx)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _pruned_mha_operator(module: nn.Module) -> list[OperatorView]:
    """Per-head operators of a pruned MHA (the built-in handler slices by ``embed_dim``)."""
    wq, wk, wv, _, _, bv = _mha_projections(module)
    ob = module.out_proj.bias
    return _head_views(wq.detach(), wk.detach(), wv.detach(),
                       None if bv is None else bv.detach(), module.out_proj.weight.detach(),
                       None if ob is None else ob.detach(), module.num_heads)


register_operator(PrunedMultiheadAttention, _pruned_mha_operator)


# ---------------------------------------------------------------------------------------------
# where the heads are
# ---------------------------------------------------------------------------------------------


@dataclass
class _Site:
    """One attention layer: its module, the linear reading the concatenated heads, geometry."""

    name: str
    module: nn.Module          # nn.MultiheadAttention, or the BERT ``*Attention`` parent
    kind: str                  # "mha" | "bert"
    out_proj: nn.Linear
    inner: nn.Module | None = None   # BERT ``self`` (query/key/value); None for MHA

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads if self.kind == "mha" else self.inner.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(self.module.head_dim if self.kind == "mha" else self.inner.attention_head_size)

    def blocks(self) -> Tensor:
        return torch.arange(self.num_heads * self.head_dim).view(self.num_heads, self.head_dim)


def _bert_inner(module: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(self_attention, output.dense)`` of a BERT-style attention block, else ``None``
    (operators' structural test, plus the head size that head removal needs)."""
    parts = _bert_parts(module)
    if parts is None or not isinstance(getattr(parts[0], "attention_head_size", None), int):
        return None
    return parts


def _sites(model: nn.Module) -> list[_Site]:
    """Every prunable attention layer of ``model`` in module order (cross-attention skipped)."""
    sites = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            sites.append(_Site(name, m, "mha", m.out_proj))
            continue
        parts = _bert_inner(m)
        if parts is not None and not getattr(m, "is_cross_attention", False):
            sites.append(_Site(name, m, "bert", parts[1], parts[0]))
    return sites


def _resolve(key: object, sites: list[_Site]) -> _Site:
    for s in sites:
        if key is s.module or key is s.inner or (isinstance(key, str) and key == s.name):
            return s
    if isinstance(key, nn.Module) and _bert_inner(key) is not None:
        raise ValueError(f"{type(key).__name__} is a cross-attention block; only self-attention "
                         "heads can be pruned")
    what = repr(key) if isinstance(key, str) else f"a {type(key).__name__}"
    raise ValueError(f"{what} is not an attention layer of this model; expected an "
                     "nn.MultiheadAttention, a BERT-style attention block (or its .self), or "
                     f"one of their names: {[s.name for s in sites]}")


def head_counts(model: nn.Module) -> dict[str, int]:
    """Number of heads of every prunable attention layer, by qualified module name.

    Example:
        >>> net = nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 4))
        >>> head_counts(net)
        {'0': 2, '1': 4}
    """
    return {s.name: s.num_heads for s in _sites(model)}


# ---------------------------------------------------------------------------------------------
# calibration: Gram of the concatenated head contexts, streamed
# ---------------------------------------------------------------------------------------------


def _accumulate(stats: CalibrationStats, linear: nn.Module, x: Tensor, keep: Tensor | None) -> None:
    feats = x.detach().reshape(-1, x.shape[-1])
    if keep is not None and keep.numel() == feats.shape[0]:
        feats = feats[keep.reshape(-1).to(feats.device)]
    feats = feats.double()
    aug = torch.cat([feats, torch.ones(feats.shape[0], 1, dtype=feats.dtype,
                                       device=feats.device)], 1)
    g = (aug.T @ aug).cpu()
    entry = stats.grams.get(linear)
    if entry is None or entry.gram.shape != g.shape:
        stats.grams[linear] = InputGram(gram=g, count=feats.shape[0])
    else:
        entry.gram += g
        entry.count += feats.shape[0]


@torch.no_grad()
def collect_head_grams(
    model: nn.Module,
    calibration: Any,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> CalibrationStats:
    """Stream the Gram ``[X, 1]ᵀ[X, 1]`` of every attention layer's concatenated head context.

    ``X`` is what the output projection reads (``num_heads·head_dim`` features); its Gram over
    calibration tokens, normalized to unit trace, is the layer's head density matrix ρ (paper
    §3.2). BERT-style: a forward pre-hook on ``output.dense``. ``nn.MultiheadAttention`` runs its
    output projection functionally (no hook fires), so a pre-hook on the MHA recomputes the
    context from the MHA's own inputs and masks (:class:`PrunedMultiheadAttention`'s code path).
    Padding tokens are left out: rows where a dict batch's ``attention_mask`` is 0, and for
    self-attention MHA the positions flagged by ``key_padding_mask``. Activations are never
    stored; each batch adds its float64 Gram.

    Args:
        model: the network (run in eval mode under ``torch.no_grad``; mode restored).
        calibration: tensor (split in batches of 256), iterable of tensors, ``(x, y)`` pairs or
            dicts of keyword inputs (e.g. a tokenizer's output).
        forward_fn: ``forward_fn(model, batch)`` to run one batch (default: ``model(**batch)``
            for dicts, else ``model(batch)``).
        max_batches: stop after this many batches.

    Returns:
        :class:`~torch_qmprune.calibration.CalibrationStats` keyed by each layer's output
        projection (``names`` gives their qualified names).

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = mha
        ...     def forward(self, x):
        ...         return self.attn(x, x, x)[0]
        >>> stats = collect_head_grams(Net(), torch.randn(4, 5, 8))
        >>> stats.grams[mha.out_proj].gram.shape, stats.grams[mha.out_proj].count
        (torch.Size([9, 9]), 20)
    """
    sites = _sites(model)
    names = {m: n for n, m in model.named_modules()}
    stats = CalibrationStats(names={s.out_proj: names.get(s.out_proj, s.name + ".out_proj")
                                    for s in sites})
    token_mask: list[Tensor | None] = [None]

    def batch_mask(x: Tensor) -> Tensor | None:
        m = token_mask[0]
        return None if m is None or tuple(m.shape) != tuple(x.shape[:-1]) else m

    def mha_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        ctx, _, _ = _mha_context(module, a["query"], a["key"], a["value"],
                                 a["key_padding_mask"], a["attn_mask"], is_causal=a["is_causal"])
        keep = batch_mask(ctx)
        kpm = a["key_padding_mask"]
        if keep is None and kpm is not None and a["query"] is a["key"]:
            kpm = kpm if kpm.dim() == 2 else kpm.unsqueeze(0)
            if tuple(kpm.shape) == tuple(ctx.shape[:2]):
                keep = ~kpm if kpm.dtype == torch.bool else kpm == 0
        _accumulate(stats, module.out_proj, ctx, keep)

    def linear_hook(module: nn.Module, args: tuple) -> None:
        if args and torch.is_tensor(args[0]):
            _accumulate(stats, module, args[0], batch_mask(args[0]))

    handles = []
    for s in sites:
        if s.kind == "mha":
            handles.append(s.module.register_forward_pre_hook(mha_hook, with_kwargs=True))
        else:
            handles.append(s.out_proj.register_forward_pre_hook(linear_hook))
    run = forward_fn or (lambda net, batch: _forward(net, batch, None))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for batch in iter_calibration(calibration, max_batches):
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            token_mask[0] = mask.bool() if torch.is_tensor(mask) else None
            run(model, batch)
            stats.n_batches += 1
    finally:
        for hnd in handles:
            hnd.remove()
        model.train(was_training)
    stats.seconds = time.perf_counter() - start
    if stats.n_batches == 0:
        raise ValueError("calibration yielded no batches; pass a tensor or an iterable of batches")
    stats.n_samples = max((g.count for g in stats.grams.values()), default=0)
    return stats


def _site_gram(site: _Site, stats: CalibrationStats | Mapping | None,
               model_names: dict[nn.Module, str]) -> Tensor | None:
    """The site's context Gram from stats (by module, else by qualified name) or a mapping."""
    if stats is None:
        return None
    if isinstance(stats, CalibrationStats):
        entry = stats.get(site.out_proj)
        if entry is None:
            wanted = model_names.get(site.out_proj)
            entry = next((stats.grams[m] for m, n in stats.names.items()
                          if n == wanted and m in stats.grams), None)
        gram = None if entry is None else entry.gram
    else:
        gram = None
        for key in (site.module, site.inner, site.out_proj, site.name):
            if key is not None and key in stats:
                gram = stats[key]
                break
        if isinstance(gram, InputGram):
            gram = gram.gram
    if gram is None:
        return None
    d = site.num_heads * site.head_dim + 1
    if not torch.is_tensor(gram) or tuple(gram.shape) != (d, d):
        got = tuple(gram.shape) if torch.is_tensor(gram) else type(gram).__name__
        raise ValueError(f"calibration Gram for {site.name!r} must be a ({d}, {d}) tensor "
                         f"(num_heads·head_dim + constant), got {got}; collect it with "
                         "collect_head_grams on the model as it is now")
    return gram


# ---------------------------------------------------------------------------------------------
# scoring (higher = keep)
# ---------------------------------------------------------------------------------------------


def _qkv_o(site: _Site) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Current ``(W_q, W_k, W_v, W_o)`` of a site, torch ``(out, in)`` layout."""
    if site.kind == "mha":
        wq, wk, wv, *_ = _mha_projections(site.module)
    else:
        wq, wk, wv = (site.inner.query.weight, site.inner.key.weight, site.inner.value.weight)
    return wq.detach(), wk.detach(), wv.detach(), site.out_proj.weight.detach()


def _l1_scores(site: _Site) -> Tensor:
    h, hd = site.num_heads, site.head_dim
    wq, wk, wv, wo = _qkv_o(site)
    rows = sum(w.abs().reshape(h, hd, -1).sum((1, 2)) for w in (wq, wk, wv))
    cols = wo.abs().reshape(wo.shape[0], h, hd).sum((0, 2))
    return (rows + cols).double().cpu()


def _literal_scores(site: _Site) -> Tensor:
    hm = head_matrices(site.module)
    qk = spectral_states(hm["qk"].double(), augment=False)
    vo = spectral_states(hm["vo"].double(), None if hm["vo_bias"] is None
                         else hm["vo_bias"].double())
    # Eq. (9) with unit costs: d² = d_FS²(QK) + d_FS²(VO), one vertex per head (§3.1)
    dist = (pairwise_fubini_study(qk) ** 2 + pairwise_fubini_study(vo) ** 2).sqrt()
    order, at = _greedy_sibling_order(dist, "nearest")
    finite = at[torch.isfinite(at)]
    top = float(finite.max()) if finite.numel() else 0.0
    at = torch.where(torch.isfinite(at), at, torch.full_like(at, top + 1e-6))
    return _order_to_scores(order, at.double()).double()


def _qm_scores(site: _Site, gram: Tensor, max_steps: int | None = None) -> Tensor:
    rows = site.out_proj.weight.detach().double().cpu()
    order, costs = greedy_merge_costs([(rows, gram, site.blocks())], site.num_heads,
                                      max_steps=max_steps)
    return _order_to_scores(order, costs).double()


def _per_layer_count(site: _Site, ratio: float) -> int:
    """Heads a layer loses at ``ratio``: ``round(ratio·H)`` (half up), at most ``H − 1``."""
    return min(site.num_heads - 1, int(math.floor(ratio * site.num_heads + 0.5)))


def _score_sites(sites: list[_Site], criterion: str, grams: dict[str, Tensor | None],
                 seed: int, steps: dict[str, int] | None = None) -> dict[str, Tensor]:
    """Scores per site; ``steps`` caps the qm greedy (the lowest ``steps`` stay exact)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for s in sites:
        if criterion == "qm":
            gram = grams.get(s.name)
            if gram is None:
                raise ValueError(f"criterion 'qm' needs calibration data: no context Gram for "
                                 f"attention layer {s.name!r}; pass calibration=...")
            cap = None if steps is None else max(1, steps[s.name])
            out[s.name] = _qm_scores(s, gram, cap)
        elif criterion == "l1":
            out[s.name] = _l1_scores(s)
        elif criterion == "random":
            out[s.name] = torch.rand(s.num_heads, generator=gen, dtype=torch.float64)
        else:
            out[s.name] = _literal_scores(s)
    return out


def _check_criterion(criterion: object) -> str:
    if criterion not in HEAD_CRITERIA:
        raise ValueError(f"criterion must be one of {HEAD_CRITERIA}, got {criterion!r}")
    return criterion  # type: ignore[return-value]


def _gather_grams(model: nn.Module, sites: list[_Site], calibration: Any,
                  forward_fn: Callable | None) -> tuple[dict[str, Tensor | None], float]:
    if calibration is None:
        return {s.name: None for s in sites}, 0.0
    start = time.perf_counter()
    stats = calibration if isinstance(calibration, CalibrationStats) else \
        collect_head_grams(model, calibration, forward_fn=forward_fn)
    names = {m: n for n, m in model.named_modules()}
    grams = {s.name: _site_gram(s, stats, names) for s in sites}
    return grams, time.perf_counter() - start


def head_scores(
    model: nn.Module,
    criterion: str = "qm",
    *,
    calibration: Any = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Per-head importance of every attention layer (QM-FRG head vertices, paper §3.1).

    Higher = keep. ``"qm"`` scores are the cumulative-max greedy merge costs (relative output
    error of the out-projection after merging, comparable across layers); ``"l1"`` raw L1
    norms; ``"random"`` uniform draws from ``seed``; ``"literal"`` greedy nearest-sibling
    Fubini–Study distances. See the module docstring for the formulas.

    Args:
        model: network holding ``nn.MultiheadAttention`` and/or BERT-style attention blocks.
        criterion: one of :data:`HEAD_CRITERIA`.
        calibration: batches (see :func:`collect_head_grams`) or a precomputed
            ``CalibrationStats``; required by ``"qm"``.
        forward_fn: how to run one calibration batch.
        seed: seed of ``"random"``.

    Returns:
        ``{layer name: float64 tensor (num_heads,)}``.

    Example:
        >>> mha = nn.MultiheadAttention(8, 4)
        >>> head_scores(mha, "l1")[""].shape
        torch.Size([4])
    """
    criterion = _check_criterion(criterion)
    sites = _sites(model)
    grams, _ = _gather_grams(model, sites, calibration if criterion == "qm" else None,
                             forward_fn)
    return _score_sites(sites, criterion, grams, seed)


# ---------------------------------------------------------------------------------------------
# physical removal
# ---------------------------------------------------------------------------------------------


@dataclass
class HeadPruneReport:
    """What :func:`prune_heads` / :func:`prune_attention_heads` did.

    ``removed`` lists, per layer, the removed heads in the layer's numbering at pruning time.
    """

    criterion: str
    ratio: float | None
    per_layer: bool
    heads_before: dict[str, int] = field(default_factory=dict)
    heads_after: dict[str, int] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    compensated_layers: int = 0
    calibration_seconds: float = 0.0
    scoring_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def head_sparsity(self) -> float:
        before = sum(self.heads_before.values())
        return 1.0 - sum(self.heads_after.values()) / before if before else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_sparsity"] = self.head_sparsity
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        heads = ", ".join(f"{n or '<root>'}: {self.heads_before[n]}→{self.heads_after[n]}"
                          for n in self.heads_before)
        return (f"HeadPruneReport({self.criterion}, heads {sum(self.heads_before.values())}→"
                f"{sum(self.heads_after.values())} [{heads}], params {self.params_before:,}→"
                f"{self.params_after:,}, compensated {self.compensated_layers}, "
                f"{self.total_seconds:.2f}s)")


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _check_heads(site: _Site, heads: object) -> list[int]:
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise TypeError(f"heads to prune for {site.name!r} must be a list of ints, got {heads!r}")
    heads = list(heads)
    h = site.num_heads
    for i in heads:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"head index {i!r} for {site.name!r} must be an int, got "
                            f"{type(i).__name__}")
        if not 0 <= i < h:
            raise ValueError(f"head index {i} out of range for {site.name!r}, which has {h} "
                             f"heads (valid: 0..{h - 1})")
    unique = sorted(set(heads))
    if len(unique) >= h:
        raise ValueError(f"cannot remove all {h} heads of {site.name!r} (asked {heads}); a layer "
                         "must keep at least one head")
    return unique


def _new_param(old: Tensor, value: Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)


def _slice_rows(linear: nn.Linear, idx: Tensor) -> None:
    linear.weight = _new_param(linear.weight, linear.weight[idx])
    if linear.bias is not None:
        linear.bias = _new_param(linear.bias, linear.bias[idx])
    linear.out_features = len(idx)


def _remove_mha_heads(mha: nn.MultiheadAttention, keep_heads: list[int],
                      ancestors: list[nn.Module]) -> None:
    hd, n = mha.head_dim, mha.num_heads * mha.head_dim
    idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep_heads])
    if mha._qkv_same_embed_dim:
        mha.in_proj_weight = _new_param(mha.in_proj_weight, mha.in_proj_weight[
            torch.cat([idx, idx + n, idx + 2 * n])])
    else:
        for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            setattr(mha, attr, _new_param(getattr(mha, attr), getattr(mha, attr)[idx]))
    if mha.in_proj_bias is not None:
        mha.in_proj_bias = _new_param(mha.in_proj_bias,
                                      mha.in_proj_bias[torch.cat([idx, idx + n, idx + 2 * n])])
    for attr in ("bias_k", "bias_v"):
        if getattr(mha, attr) is not None:
            setattr(mha, attr, _new_param(getattr(mha, attr), getattr(mha, attr)[..., idx]))
    op = mha.out_proj
    op.weight = _new_param(op.weight, op.weight[:, idx])
    op.in_features = len(idx)
    mha.num_heads = len(keep_heads)
    for up in ancestors:
        # torch's inference fast paths call fused kernels that assume num_heads·head_dim ==
        # embed_dim; these two attributes only gate those fast paths.
        if isinstance(up, nn.TransformerEncoderLayer):
            up.activation_relu_or_gelu = 0
        elif isinstance(up, nn.TransformerEncoder):
            up.use_nested_tensor = False


def _remove_bert_heads(site: _Site, keep_heads: list[int]) -> None:
    inner, hd = site.inner, site.head_dim
    idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep_heads])
    for lin in (inner.query, inner.key, inner.value):
        _slice_rows(lin, idx)
    dense = site.out_proj
    dense.weight = _new_param(dense.weight, dense.weight[:, idx])
    dense.in_features = len(idx)
    inner.num_attention_heads = len(keep_heads)
    inner.all_head_size = len(idx)


def _layer_index(site: _Site) -> int | None:
    idx = getattr(site.inner, "layer_idx", None)
    if isinstance(idx, int) and not isinstance(idx, bool):
        return idx
    m = re.search(r"(?:^|\.)layers?\.(\d+)\.attention$", site.name)
    return int(m.group(1)) if m else None


def _hf_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    return cfg if isinstance(getattr(cfg, "num_attention_heads", None), int) else None


def _config_pruned(config: Any) -> dict[int, list[int]]:
    raw = getattr(config, "pruned_heads", None) or {}
    return {int(k): sorted(int(h) for h in v) for k, v in dict(raw).items()}


def _original_ids(site: _Site, config: Any) -> list[int]:
    """Original (pre-pruning) indices of the layer's current heads."""
    ids = site.module.__dict__.get("_qmprune_head_ids")
    if ids is not None and len(ids) == site.num_heads:
        return list(ids)
    layer = _layer_index(site) if site.kind == "bert" else None
    if config is not None and layer is not None:
        gone = set(_config_pruned(config).get(layer, []))
        ids = [h for h in range(config.num_attention_heads) if h not in gone]
        if len(ids) == site.num_heads:
            return ids
    return list(range(site.num_heads))


@contextlib.contextmanager
def _transaction(model: nn.Module) -> Iterator[list[Callable[[], None]]]:
    """``atomic(model)`` plus undo actions for what it cannot see (class swaps, HF config)."""
    undo: list[Callable[[], None]] = []
    with atomic(model):
        try:
            yield undo
        except BaseException:
            for action in reversed(undo):
                action()
            raise


def _ancestors(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """Enclosing modules of ``module`` in ``model``, innermost first."""
    parent = {child: m for m in model.modules() for child in m.children()}
    chain, cur = [], module
    while cur in parent and parent[cur] not in chain:
        cur = parent[cur]
        chain.append(cur)
    return chain


@torch.no_grad()
def _prune_sites(model: nn.Module, plan: list[tuple[_Site, list[int]]],
                 grams: dict[str, Tensor | None], compensate: bool,
                 undo: list[Callable[[], None]]) -> int:
    """Compensate then remove, layer by layer (inside a transaction); returns #compensated."""
    config = _hf_config(model)
    if config is not None:
        saved = copy.deepcopy(config.__dict__.get("pruned_heads", None))
        had = "pruned_heads" in config.__dict__

        def restore_config() -> None:
            if had:
                config.pruned_heads = saved
            else:
                config.__dict__.pop("pruned_heads", None)
        undo.append(restore_config)
    compensated = 0
    for site, heads in plan:
        heads = _check_heads(site, heads)
        if not heads:
            continue
        if site.kind == "mha" and type(site.module) not in (nn.MultiheadAttention,
                                                            PrunedMultiheadAttention):
            raise TypeError(f"{site.name!r} is a {type(site.module).__name__}, a subclass of "
                            "nn.MultiheadAttention whose forward cannot be replaced safely")
        ids = _original_ids(site, config)
        keep = [h for h in range(site.num_heads) if h not in heads]
        gram = grams.get(site.name)
        if compensate and gram is not None:
            pruned = site.blocks()[heads].reshape(-1).tolist()
            dep = SimpleNamespace(layer=site.out_proj, pruning_fn=tp.prune_linear_in_channels)
            stats = CalibrationStats(grams={site.out_proj: InputGram(gram=gram)})
            compensated += compensate_group([(dep, pruned)], stats)
        if site.kind == "mha":
            mha = site.module
            _remove_mha_heads(mha, keep, _ancestors(model, mha))
            if type(mha) is nn.MultiheadAttention:
                mha.__class__ = PrunedMultiheadAttention
                undo.append(lambda m=mha: setattr(m, "__class__", nn.MultiheadAttention))
        else:
            _remove_bert_heads(site, keep)
            layer = _layer_index(site)
            if config is not None and layer is not None:
                table = {int(k): list(v) for k, v in dict(
                    getattr(config, "pruned_heads", None) or {}).items()}
                table[layer] = sorted(set(table.get(layer, [])) | {ids[h] for h in heads})
                config.pruned_heads = table
        site.module._qmprune_head_ids = [ids[h] for h in keep]
    return compensated


def prune_heads(
    model: nn.Module,
    heads_to_prune: Mapping[Any, Iterable[int]],
    *,
    calibration_grams: CalibrationStats | Mapping[Any, Tensor] | None = None,
    compensate: bool = True,
) -> HeadPruneReport:
    """Remove the given whole heads, optionally merging them into the surviving heads.

    For every layer, head ``h`` owns rows ``h·d:(h+1)·d`` of the query/key/value projections and
    the same columns of the output projection (``d = head_dim``). Those rows/columns are
    removed, ``head_dim`` and ``embed_dim`` are kept, and the head count is updated:

    * ``nn.MultiheadAttention``: ``in_proj_weight``/``in_proj_bias`` (or ``q/k/v_proj_weight``),
      ``bias_k``/``bias_v`` and ``out_proj.weight`` shrink, ``num_heads`` is set and the module
      becomes a :class:`PrunedMultiheadAttention` (same object, same state_dict keys).
    * BERT-style (``*.attention`` with ``self.query/key/value`` and ``output.dense``):
      ``query/key/value`` rows and ``dense`` columns shrink, ``num_attention_heads`` and
      ``all_head_size`` are patched; ``model.config.num_attention_heads`` stays (Hugging Face
      builds uniform layers) and the removed *original* head indices are recorded in
      ``model.config.pruned_heads`` (``{layer: [heads]}``, Hugging Face's own convention), so
      ``save_pretrained`` + :func:`from_pretrained_pruned` restores the model.

    With ``compensate`` and a Gram for the layer, each removed head's context is first merged
    into the kept heads (least squares ``X_P ≈ [X_K, 1]B`` on the Gram, folded into the
    output projection's kept columns and bias; :func:`~torch_qmprune.structural.compensate_group`).
    All-or-nothing: any error restores the model (and its config) exactly.

    Args:
        model: the network to modify in place.
        heads_to_prune: ``{layer: [head indices]}``; a layer is the MHA module, the BERT
            attention block or its ``.self``, or the qualified name of one. Indices are in the
            layer's current numbering; a layer must keep at least one head.
        calibration_grams: :func:`collect_head_grams` output (matched by module, else by name)
            or ``{layer: (D+1, D+1) Gram}``; needed for compensation.
        compensate: merge removed heads into the kept ones where a Gram is available
            (``report.compensated_layers`` says how many were).

    Returns:
        :class:`HeadPruneReport` (criterion ``"manual"``).

    Raises:
        ValueError: unknown layer, index out of range, or every head of a layer requested.
        TypeError: a non-integer head index.

    Example:
        >>> mha = nn.MultiheadAttention(16, 4)
        >>> report = prune_heads(mha, {mha: [0, 2]}, compensate=False)
        >>> mha.num_heads, mha.out_proj.weight.shape, report.heads_after
        (2, torch.Size([16, 8]), {'': 2})
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(heads_to_prune, Mapping):
        raise TypeError(f"heads_to_prune must be a dict {{layer: [head indices]}}, got "
                        f"{type(heads_to_prune).__name__}")
    sites = _sites(model)
    before = {s.name: s.num_heads for s in sites}
    params_before = _count_params(model)
    plan = [(_resolve(k, sites), v) for k, v in heads_to_prune.items()]
    seen = [s.name for s, _ in plan]
    dup = next((n for n in seen if seen.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"attention layer {dup!r} is named twice in heads_to_prune (as a module "
                         "and by name?); give each layer once")
    names = {m: n for n, m in model.named_modules()}
    grams = {s.name: _site_gram(s, calibration_grams, names) for s, _ in plan}
    removed = {}
    with _transaction(model) as undo:
        n_comp = _prune_sites(model, plan, grams, compensate, undo)
        for s, heads in plan:
            removed[s.name] = sorted(set(heads))
    return HeadPruneReport(
        criterion="manual", ratio=None, per_layer=True, heads_before=before,
        heads_after={s.name: s.num_heads for s in sites}, removed=removed,
        params_before=params_before, params_after=_count_params(model),
        compensated_layers=n_comp, total_seconds=time.perf_counter() - start)


def _plan(sites: list[_Site], scores: dict[str, Tensor], ratio: float, per_layer: bool
          ) -> list[tuple[_Site, list[int]]]:
    """Lowest-scoring heads per layer (``round(ratio·H)``, at most ``H−1``) or globally."""
    if per_layer:
        plan = []
        for s in sites:
            k = _per_layer_count(s, ratio)
            plan.append((s, sorted(torch.argsort(scores[s.name])[:k].tolist())))
        return plan
    total = int(math.floor(ratio * sum(s.num_heads for s in sites) + 0.5))
    pool = sorted(((float(scores[s.name][h]), i, h) for i, s in enumerate(sites)
                   for h in range(s.num_heads)))
    chosen: list[list[int]] = [[] for _ in sites]
    for _, i, h in pool:
        if total <= 0:
            break
        if len(chosen[i]) < sites[i].num_heads - 1:
            chosen[i].append(h)
            total -= 1
    return [(s, sorted(c)) for s, c in zip(sites, chosen)]


def prune_attention_heads(
    model: nn.Module,
    ratio: float,
    *,
    criterion: str = "qm",
    calibration: Any = None,
    compensate: bool = True,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    per_layer: bool = True,
    seed: int = 0,
) -> HeadPruneReport:
    """Score every attention head, remove a ``ratio`` of them, merge them into the survivors.

    One calibration pass (:func:`collect_head_grams`) → per-head scores (:func:`head_scores`;
    the QM-FRG head vertices of arXiv 2512.00880 §3.1) → ranking per layer (``round(ratio·H)``
    heads each, at most ``H − 1``) or globally (``per_layer=False``: the lowest scores of the
    whole model, every layer keeping one head) → least-squares merging into the kept heads
    (``compensate``, any criterion, when calibration is given) → physical removal
    (:func:`prune_heads`). All-or-nothing on failure.

    Args:
        model: network with ``nn.MultiheadAttention`` and/or BERT-style attention layers.
        ratio: fraction of heads to remove, in [0, 1).
        criterion: ``"qm"`` (default, needs ``calibration``), ``"l1"``, ``"random"``,
            ``"literal"``.
        calibration: batches (tensor, iterable of tensors / ``(x, y)`` / tokenizer dicts) or a
            precomputed :func:`collect_head_grams` result.
        compensate: merge removed heads into the kept ones (needs ``calibration``).
        forward_fn: ``forward_fn(model, batch)`` for calibration batches.
        per_layer: same ratio in every layer (default) or one global ranking.
        seed: seed of ``"random"``.

    Returns:
        :class:`HeadPruneReport`.

    Example:
        >>> from torch_qmprune.models import small_vit
        >>> vit = small_vit(num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64).eval()
        >>> rep = prune_attention_heads(vit, 0.5, calibration=torch.randn(8, 1, 28, 28))
        >>> list(rep.heads_after.values()), vit(torch.randn(2, 1, 28, 28)).shape
        ([2, 2], torch.Size([2, 10]))
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ratio = check_ratio(ratio, "ratio")
    criterion = _check_criterion(criterion)
    if criterion == "qm" and calibration is None:
        raise ValueError("criterion 'qm' needs calibration=... (batches of model inputs); use "
                         "'l1' or 'random' for a data-free criterion")
    sites = _sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no nn.MultiheadAttention or BERT-style "
                         "attention layer to prune")
    use_calibration = calibration if (criterion == "qm" or compensate) else None
    before = {s.name: s.num_heads for s in sites}
    params_before = _count_params(model)
    grams, calib_s = _gather_grams(model, sites, use_calibration, forward_fn)
    t0 = time.perf_counter()
    steps = {s.name: _per_layer_count(s, ratio) for s in sites} if per_layer else None
    scores = _score_sites(sites, criterion, grams, seed, steps)
    plan = _plan(sites, scores, ratio, per_layer)
    scoring_s = time.perf_counter() - t0
    with _transaction(model) as undo:
        n_comp = _prune_sites(model, plan, grams, compensate, undo)
    return HeadPruneReport(
        criterion=criterion, ratio=ratio, per_layer=per_layer, heads_before=before,
        heads_after={s.name: s.num_heads for s in sites},
        removed={s.name: h for s, h in plan}, params_before=params_before,
        params_after=_count_params(model), compensated_layers=n_comp,
        calibration_seconds=calib_s, scoring_seconds=scoring_s,
        total_seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Hugging Face reload
# ---------------------------------------------------------------------------------------------


def _apply_recorded_structure(model: nn.Module, pruned: dict[int, list[int]]) -> None:
    """Remove the heads recorded in ``config.pruned_heads`` from a freshly built model."""
    sites = {(_layer_index(s)): s for s in _sites(model) if s.kind == "bert"}
    plan = {}
    for layer, heads in pruned.items():
        if layer not in sites:
            raise ValueError(f"config.pruned_heads names layer {layer}, which the model does "
                             f"not have (layers: {sorted(k for k in sites if k is not None)})")
        plan[sites[layer].module] = heads
    prune_heads(model, plan, compensate=False)


def from_pretrained_pruned(model_class: type, pretrained: str | Any, **kwargs: Any) -> nn.Module:
    """Load a head-pruned Hugging Face model saved with ``save_pretrained``.

    transformers ≥ 5 dropped ``pruned_heads`` handling, so ``model_class.from_pretrained`` on a
    pruned checkpoint builds uniform layers and fails on the smaller tensors. This builds the
    model, removes the heads recorded in ``config.pruned_heads`` (:func:`prune_heads`' record),
    then lets Hugging Face load the weights as usual (``**kwargs`` are passed to
    ``from_pretrained``). Unpruned checkpoints load unchanged. (transformers 4.x applied
    ``config.pruned_heads`` itself inside ``from_pretrained``, with the same meaning — layer →
    original head indices — so there a plain ``from_pretrained`` should work; not tested here.)

    Args:
        model_class: e.g. ``transformers.BertModel``, or an ``Auto*`` class (resolved from the
            saved config).
        pretrained: directory (or hub id) given to ``from_pretrained``.

    Returns:
        An instance of ``model_class`` with the pruned structure and the saved weights.

    Example:
        >>> from transformers import BertConfig, BertModel  # doctest: +SKIP
        >>> bert = BertModel(BertConfig(hidden_size=32, num_attention_heads=4,  # doctest: +SKIP
        ...     num_hidden_layers=2, intermediate_size=64, vocab_size=99))
        >>> _ = prune_heads(bert, {bert.encoder.layer[0].attention: [1, 3]})  # doctest: +SKIP
        >>> bert.save_pretrained("/tmp/pruned_bert")  # doctest: +SKIP
        >>> again = from_pretrained_pruned(BertModel, "/tmp/pruned_bert")  # doctest: +SKIP
        >>> again.encoder.layer[0].attention.self.num_attention_heads  # doctest: +SKIP
        2
    """
    config = kwargs.pop("config", None)
    is_auto = hasattr(model_class, "_model_mapping")
    if getattr(model_class, "config_class", None) is None and is_auto:
        from transformers import AutoConfig  # an Auto* class: resolve the concrete class

        config = config if config is not None else AutoConfig.from_pretrained(pretrained)
        model_class = model_class._model_mapping[type(config)]
    if config is None:
        config = model_class.config_class.from_pretrained(pretrained)
    pruned = _config_pruned(config)
    config.pruned_heads = pruned
    if not any(pruned.values()):
        return model_class.from_pretrained(pretrained, config=config, **kwargs)

    def init(self: nn.Module, cfg: Any, *args: Any, **kw: Any) -> None:
        model_class.__init__(self, cfg, *args, **kw)
        _apply_recorded_structure(self, _config_pruned(cfg))

    shaped = type(model_class.__name__, (model_class,), {"__init__": init,
                                                           "__module__": model_class.__module__})
    model = shaped.from_pretrained(pretrained, config=config, **kwargs)
    model.__class__ = model_class
    return model
