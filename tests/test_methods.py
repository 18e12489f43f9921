"""Tests of the drop-in pruning layer: exact masks of the spectral methods, bit-identity with
torch where promised, and each of torch's traps reproduced and fixed."""

from __future__ import annotations

import copy
import doctest
import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from torch_qmprune import methods
from torch_qmprune.methods import (
    L1Unstructured,
    LnStructured,
    PruningContainer,
    SpectralStructured,
    SpectralUnstructured,
    custom_from_mask,
    global_structured,
    global_unstructured,
    is_pruned,
    l1_unstructured,
    ln_structured,
    load_pruned_state_dict,
    make_deepcopyable,
    random_structured,
    random_unstructured,
    remove,
    spectral_structured,
    spectral_unstructured,
)
from torch_qmprune.spectral import (
    fubini_study,
    pairwise_fubini_study,
    spectral_state,
    spectral_states,
)

# ---------------------------------------------------------------------------------------------
# fixtures: filters with designed spectra
# ---------------------------------------------------------------------------------------------


def _matrix(singular_values: tuple[float, ...], seed: int, rows: int = 3, cols: int = 4):
    """rows x cols float64 matrix U diag(s) Vᵀ with random orthogonal U, V (seeded)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.tensor(singular_values, dtype=torch.float64)
    return u[:, : len(s)] @ torch.diag(s) @ v[:, : len(s)].T


# Filter spectra (C_in=3, k=2, so each filter is a 3 x 4 matrix). FS distances (augmented):
# 0-1: 0 (identical), 0/1-2: 0.11, 3-4: 0.02, everything else > 0.33.
_SPECTRA = [(3, 1, 0.5), (3, 1, 0.5), (3, 1.4, 0.5), (1, 1, 1), (1, 1, 1.05), (5, 0.1, 0.1)]


def _designed_conv_weight(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    seeds = [0, 0, 2, 3, 4, 5]  # filters 0 and 1 are the same matrix
    w = torch.stack([_matrix(s, seed) for s, seed in zip(_SPECTRA, seeds)])
    return w.reshape(6, 3, 2, 2).to(dtype)


def _designed_conv(dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    conv = nn.Conv2d(3, 6, 2).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(_designed_conv_weight(dtype))
    return conv


def _pruned_channels(mask: torch.Tensor, dim: int = 0) -> list[int]:
    other = [d for d in range(mask.dim()) if d != dim]
    return torch.nonzero(~mask.ne(0).any(dim=other)).flatten().tolist()


def _designed_linear() -> nn.Linear:
    """Rows 3e1, 2e2, 1e3, 0.01e4, 3e1: σ(W) = (√18, 2, 1, 0.01), plus 1 from the augmentation.

    Leave-one-out FS shifts: row 3 (0.01) 0.002; rows 0 and 4 (√18 -> 3, a near rescaling of
    ψ) 0.161 each; row 2 (loses σ = 1) 0.204; row 1 (loses σ = 2) 0.288.
    """
    lin = nn.Linear(4, 5)
    w = torch.zeros(5, 4)
    w[0, 0], w[1, 1], w[2, 2], w[3, 3], w[4, 0] = 3.0, 2.0, 1.0, 0.01, 3.0
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


# ---------------------------------------------------------------------------------------------
# SpectralStructured
# ---------------------------------------------------------------------------------------------


def test_sibling_prunes_one_of_identical_pair():
    conv = spectral_structured(_designed_conv(), "weight", amount=1)
    assert _pruned_channels(conv.weight_mask) == [0]


def test_sibling_greedy_never_prunes_both_of_a_pair():
    # After filter 0 goes, filter 1 is no longer redundant (its nearest is filter 2 at 0.11);
    # the next most redundant is the 3-4 pair (0.02), so filter 3 goes, not filter 1. A static
    # ranking by nearest-sibling distance would have pruned 0 and 1 (both at distance 0).
    conv = spectral_structured(_designed_conv(), "weight", amount=2)
    assert _pruned_channels(conv.weight_mask) == [0, 3]
    conv = spectral_structured(_designed_conv(), "weight", amount=0.5)  # round(0.5 * 6) = 3
    assert _pruned_channels(conv.weight_mask) == [0, 1, 3]


def test_sibling_w2_metric_prunes_identical_first():
    conv = spectral_structured(_designed_conv(), "weight", amount=1, metric="w2")
    assert _pruned_channels(conv.weight_mask) == [0]


def _reference_greedy(w: torch.Tensor, k: int, aggregation: str) -> list[int]:
    """Per-pair loops with the scalar API: the specification the vectorized code must meet."""
    states = [spectral_state(w[i], dtype=torch.float64) for i in range(w.shape[0])]
    n = len(states)
    dist = [[float(fubini_study(states[i], states[j])) for j in range(n)] for i in range(n)]
    alive = list(range(n))
    pruned = []
    for _ in range(k):
        best, best_i = math.inf, None
        for i in alive:
            others = [dist[i][j] for j in alive if j != i]
            if aggregation == "nearest":
                value = min(others)
            else:
                value = sum(others) / len(others)
            if value < best - 1e-12:
                best, best_i = value, i
        alive.remove(best_i)
        pruned.append(best_i)
    return sorted(pruned)


@pytest.mark.parametrize("aggregation", ["nearest", "mean"])
def test_sibling_matches_scalar_reference(aggregation):
    torch.manual_seed(0)
    scales = torch.linspace(0.2, 3.0, 10, dtype=torch.float64)
    w = torch.randn(10, 3, 3, 3, dtype=torch.float64) * scales.view(10, 1, 1, 1)
    for k in (1, 4, 7):
        mask = SpectralStructured(k, aggregation=aggregation).compute_mask(w, torch.ones_like(w))
        assert _pruned_channels(mask) == _reference_greedy(w, k, aggregation)


def _simulated_greedy(distances: torch.Tensor, aggregation: str):
    """The §3.1 greedy run step by step (the previous torch implementation): the reference the
    fast order (death times for "nearest", NumPy loop for "mean") must reproduce exactly."""
    n = distances.shape[0]
    d = (distances + distances.T) / 2
    inf = torch.tensor(math.inf, dtype=d.dtype)
    alive = torch.ones(n, dtype=torch.bool)
    order = torch.empty(n, dtype=torch.long)
    at = torch.full((n,), math.inf, dtype=d.dtype)
    d = d.clone()
    if aggregation == "nearest":
        d.fill_diagonal_(math.inf)
        best, nearest = d.min(dim=1)
        for step in range(n):
            candidates = torch.where(alive, best, inf)
            i = int(torch.argmin(candidates))
            if not bool(alive[i]):
                i = int(torch.nonzero(alive)[0])
            order[step] = i
            at[step] = candidates[i] if step < n - 1 else inf
            alive[i] = False
            d[:, i] = math.inf
            d[i, :] = math.inf
            stale = alive & (nearest == i)
            if bool(stale.any()):
                best[stale], nearest[stale] = d[stale].min(dim=1)
    else:
        d.fill_diagonal_(0.0)
        sums = d.sum(dim=1)
        for step in range(n):
            count = n - step - 1
            means = sums / max(count, 1) if count > 0 else torch.full_like(sums, math.inf)
            candidates = torch.where(alive, means, inf)
            i = int(torch.argmin(candidates))
            if not bool(alive[i]):
                i = int(torch.nonzero(alive)[0])
            order[step] = i
            at[step] = candidates[i] if count > 0 else inf
            alive[i] = False
            sums -= d[:, i]
    return order, at


@pytest.mark.parametrize("aggregation", ["nearest", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_order_equals_step_by_step_simulation(aggregation, dtype):
    gen = torch.Generator().manual_seed(3)
    cases = []
    for n in (1, 2, 3, 5, 17, 64, 200):
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        cases.append(torch.cdist(x, x))  # generic distances
        # heavy ties: few distinct values, duplicated points, a zero block
        q = torch.randint(0, 3, (n, n), generator=gen).to(torch.float64)
        cases.append(q + q.T)
        dup = x[torch.randint(0, max(1, n // 3), (n,), generator=gen)]
        cases.append(torch.cdist(dup, dup))
        cases.append(torch.zeros(n, n, dtype=torch.float64))
    asym = torch.rand(30, 30, generator=gen, dtype=torch.float64)
    cases.append(asym)  # not symmetric: both use (d + dᵀ) / 2
    inf_block = torch.cdist(*(2 * [torch.randn(12, 3, generator=gen, dtype=torch.float64)]))
    inf_block[:6, 6:] = math.inf
    inf_block[6:, :6] = math.inf
    cases.append(inf_block)  # two groups with no finite distance between them
    for dist in cases:
        dist = dist.to(dtype)
        order, at = methods._greedy_sibling_order(dist, aggregation)
        ref_order, ref_at = _simulated_greedy(dist, aggregation)
        assert order.tolist() == ref_order.tolist()
        assert at.dtype == dtype
        torch.testing.assert_close(at, ref_at, rtol=0, atol=0, equal_nan=True)


def test_greedy_nearest_on_fubini_study_of_random_filters():
    # the importance's use: float32 Fubini–Study distances of many filters with close states
    gen = torch.Generator().manual_seed(4)
    states = spectral_states(torch.randn(300, 32, 9, generator=gen), augment=False)
    dist = pairwise_fubini_study(states)
    order, at = methods._greedy_sibling_order(dist, "nearest")
    ref_order, ref_at = _simulated_greedy(dist, "nearest")
    assert order.tolist() == ref_order.tolist() and torch.equal(at, ref_at)


def _reference_literal_scores(group, metric: str, aggregation: str, states_fn) -> torch.Tensor:
    """SpectralImportance("literal") as first written: states of every filter, the pairwise
    distance matrix, the step-by-step greedy (the specification of the fast path)."""
    from torch_qmprune.importance import SpectralImportance, _order_to_scores

    imp = SpectralImportance("literal", metric=metric, aggregation=aggregation)
    n = imp._n_roots(group)
    acc = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    for layer, idxs, roots in imp._producers(group):
        w = layer.weight.detach()[idxs].float()
        mats = w.reshape(w.shape[0], w.shape[1], -1) if w.dim() > 2 else w.unsqueeze(1)
        states = states_fn(mats, augment=w.dim() <= 2)
        if states.shape[0] < 2:
            s = torch.ones(states.shape[0], dtype=torch.float64)
        else:
            dist = methods._pairwise(states, metric).double()
            order, at = _simulated_greedy(dist, aggregation)
            at = at.double()
            finite = at[torch.isfinite(at)]
            at[~torch.isfinite(at)] = (finite.max() if finite.numel() else 1.0) + 1e-6
            s = _order_to_scores(order, at).double()
        s = s / s.mean().clamp_min(1e-30)
        acc.scatter_add_(0, torch.tensor(roots), s)
        hits.scatter_add_(0, torch.tensor(roots), torch.ones_like(s))
    return (acc / hits.clamp_min(1)).float()


@pytest.mark.parametrize(("metric", "aggregation"), [("fs", "nearest"), ("fs", "mean"),
                                                     ("w2", "nearest")])
def test_literal_importance_equals_reference_pipeline(metric, aggregation):
    import torch_pruning as tp

    from torch_qmprune.importance import SpectralImportance
    from torch_qmprune.spectral.states import _gram_spectral_states

    torch.manual_seed(6)
    net = nn.Sequential(
        nn.Conv2d(3, 24, 3), nn.ReLU(), nn.Conv2d(24, 40, 3), nn.ReLU(),
        nn.Conv2d(40, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 30), nn.ReLU(),
        nn.Linear(30, 5),
    )
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 8, 8))
    groups = list(dg.get_all_groups(ignored_layers=[net[-1]]))
    assert len(groups) == 4  # 3x3 tall, 3x3 from 3 inputs (wide), 1x1, Linear
    imp = SpectralImportance("literal", metric=metric, aggregation=aggregation)
    for group in groups:
        fast = imp(group)
        # same states: everything after them (shortcuts, greedy, scores) is bit-identical
        ref = _reference_literal_scores(group, metric, aggregation, _gram_spectral_states)
        assert torch.equal(fast, ref)
        # float32 SVD states (as first written) differ by rounding only; near-equal greedy
        # values may then swap neighbours, so only the values are compared (mean 1)
        ref = _reference_literal_scores(group, metric, aggregation, spectral_states)
        assert (fast - ref).abs().max() < 0.05
        assert (fast - ref).abs().median() < 1e-3


def test_sibling_along_input_dim():
    # dim=1 of a conv weight: input channels; slices (C_out, k, k) read as C_out x k².
    w = _designed_conv_weight().transpose(0, 1).contiguous()  # (3, 6, 2, 2): channels on dim 1
    mask = SpectralStructured(1, dim=1).compute_mask(w, torch.ones_like(w))
    assert _pruned_channels(mask, dim=1) == [0]
    assert mask.shape == w.shape


def test_sibling_on_vector_slices_raises_and_explains():
    with pytest.raises(ValueError, match="one singular value.*leave_one_out"):
        spectral_structured(nn.Linear(4, 5), "weight", amount=1, score="sibling")


def test_leave_one_out_on_linear_exact():
    lin = spectral_structured(_designed_linear(), "weight", amount=1)  # auto -> leave_one_out
    assert _pruned_channels(lin.weight_mask) == [3]
    lin = spectral_structured(_designed_linear(), "weight", amount=2)  # 0 and 4 tie: lower
    assert _pruned_channels(lin.weight_mask) == [0, 3]
    # leave-one-out is one-shot (not greedy): both duplicated rows can go
    lin = spectral_structured(_designed_linear(), "weight", amount=0.6, score="leave_one_out")
    assert _pruned_channels(lin.weight_mask) == [0, 3, 4]
    lin = spectral_structured(_designed_linear(), "weight", amount=4)
    assert _pruned_channels(lin.weight_mask) == [0, 2, 3, 4]


def test_leave_one_out_matches_per_channel_loop():
    torch.manual_seed(1)
    w = torch.randn(7, 5, dtype=torch.float64) * torch.linspace(0.1, 2, 7).view(7, 1)
    shifts = []
    full = spectral_state(w)
    for c in range(7):
        keep = [i for i in range(7) if i != c]
        shifts.append(float(fubini_study(full, spectral_state(w[keep]))))
    expected = sorted(sorted(range(7), key=lambda c: shifts[c])[:3])
    mask = SpectralStructured(3).compute_mask(w, torch.ones_like(w))
    assert _pruned_channels(mask) == expected


def _reference_shifts(t: torch.Tensor, dim: int, metric: str) -> torch.Tensor:
    """Leave-one-out shifts channel by channel in float64: the SVD of the whole operator and
    of the operator without each channel (the specification of the secular-equation path)."""
    from torch_qmprune.spectral import operator_matrix, pairwise_wasserstein2

    t = t.double()
    full = spectral_state(operator_matrix(t))
    shifts = []
    for c in range(t.shape[dim]):
        rest = torch.cat([t.narrow(dim, 0, c), t.narrow(dim, c + 1, t.shape[dim] - c - 1)], dim)
        loo = spectral_state(operator_matrix(rest))
        if metric == "fs":
            shifts.append(float(fubini_study(full, loo)))
        else:
            a, b = torch.nn.functional.pad(loo, (0, full.numel() - loo.numel())), full
            shifts.append(float(pairwise_wasserstein2(torch.stack([b, a]))[0, 1]))
    return torch.tensor(shifts, dtype=torch.float64)


@pytest.mark.parametrize("metric", ["fs", "w2"])
@pytest.mark.parametrize(
    ("shape", "dim"),
    [((12, 40), 0), ((40, 12), 0), ((12, 40), 1), ((16, 3, 3, 3), 0), ((64, 8, 1, 1), 0),
     ((9, 9), 0)],
)
@pytest.mark.parametrize("duplicate", [False, True])
def test_leave_one_out_shifts_equal_per_channel_svds(shape, dim, metric, duplicate):
    gen = torch.Generator().manual_seed(sum(shape))
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if duplicate:
        t[2] = t[1]  # a duplicated channel (dim 0) or column pair: rank deficient
    n = t.shape[dim]
    fast = methods._leave_one_out_shifts(t, dim, torch.arange(n), metric)
    ref = _reference_shifts(t, dim, metric)
    assert fast.dtype == torch.float64
    # a zero singular value comes out of a Gram as ~sqrt(eps)·s_max (as with eigvalsh of the
    # downdated Grams before): agreement to ~1e-7 then, to ~1e-12 at full rank
    assert torch.allclose(fast, ref, rtol=1e-6 if duplicate else 1e-10, atol=1e-14)
    some = torch.tensor([n - 1, 0, 3])  # any subset, any order
    sub = methods._leave_one_out_shifts(t, dim, some, metric)
    assert torch.allclose(sub, fast[some], rtol=1e-12, atol=0)
    # float32 weights: float64 math, the result rounded to float32
    fast32 = methods._leave_one_out_shifts(t.float(), dim, torch.arange(n), metric)
    assert fast32.dtype == torch.float32
    assert torch.allclose(fast32.double(), _reference_shifts(t.float(), dim, metric), rtol=1e-5,
                          atol=1e-9)


def test_leave_one_out_shifts_at_extreme_scales():
    # the Gram is formed after a power-of-two rescaling (the augmentation's 1 rescaled too)
    t = torch.randn(10, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for scale in (1e-150, 1e-3, 1.0, 1e3, 1e150):
        fast = methods._leave_one_out_shifts(t * scale, 0, torch.arange(10), "fs")
        assert torch.allclose(fast, _reference_shifts(t * scale, 0, "fs"), rtol=1e-9, atol=1e-300)
    zero = methods._leave_one_out_shifts(torch.zeros(4, 6), 0, torch.arange(4), "fs")
    assert torch.equal(zero, torch.zeros(4))


def test_leave_one_out_shifts_reject_non_finite():
    w = torch.randn(5, 7)
    w[2, 3] = math.nan
    with pytest.raises(ValueError, match="finite"):
        methods._leave_one_out_shifts(w, 0, torch.arange(5), "fs")


def test_structured_counts_only_survivors_and_keeps_default_mask():
    w = _designed_conv_weight()
    default = torch.ones_like(w)
    default[0] = 0  # channel 0 already pruned: of 5 survivors, amount 0.4 -> 2
    default[5, 0, 0, 0] = 0  # partial unstructured zero survives in the new mask
    mask = SpectralStructured(0.4).compute_mask(w, default)
    # survivors 1..5: 3-4 pair (0.02) -> 3 goes; then 1-2 (0.11) -> 1 goes
    assert _pruned_channels(mask) == [0, 1, 3]
    assert mask[5, 0, 0, 0] == 0 and mask[5].sum() == 11
    with pytest.raises(ValueError, match="only 5 of 6 channels"):
        SpectralStructured(6).compute_mask(w, default)


def test_structured_deterministic_and_tie_to_lower_index():
    w = torch.ones(4, 2, 2, 2)  # all filters identical: every distance 0
    for _ in range(3):
        mask = SpectralStructured(2).compute_mask(w, torch.ones_like(w))
        assert _pruned_channels(mask) == [0, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_structured_half_precision(dtype):
    conv = spectral_structured(_designed_conv(dtype), "weight", amount=2)
    assert conv.weight_mask.dtype == dtype
    assert _pruned_channels(conv.weight_mask) == [0, 3]
    lin = _designed_linear().to(dtype)
    spectral_structured(lin, "weight", amount=1)
    assert lin.weight_mask.dtype == dtype and _pruned_channels(lin.weight_mask) == [3]
    spectral_structured(lin, "weight", amount=1)
    assert _pruned_channels(lin.weight_mask) == [0, 3]


def test_structured_importance_scores_used_in_place_of_weight():
    conv = nn.Conv2d(3, 6, 2)
    before = conv.weight.detach().clone()
    spectral_structured(conv, "weight", amount=2, importance_scores=_designed_conv_weight())
    assert _pruned_channels(conv.weight_mask) == [0, 3]
    assert torch.equal(conv.weight_orig.detach(), before)
    with pytest.raises(AssertionError, match="same shape"):
        spectral_structured(nn.Conv2d(3, 6, 2), "weight", 1, importance_scores=torch.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "l2"}, "metric must be one of"),
        ({"aggregation": "max"}, "aggregation must be one of"),
        ({"score": "loo"}, "score must be one of"),
    ],
)
def test_structured_rejects_unknown_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralStructured(1, **kwargs)


def test_structured_rejects_1d_and_bad_dim():
    with pytest.raises(ValueError, match="multidimensional"):
        SpectralStructured(1).compute_mask(torch.ones(4), torch.ones(4))
    with pytest.raises(IndexError, match="dim=4"):
        SpectralStructured(1, dim=4).compute_mask(torch.ones(2, 2, 2), torch.ones(2, 2, 2))


# ---------------------------------------------------------------------------------------------
# SpectralUnstructured
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("amount", [0.3, 7, 0.0])
def test_unstructured_alpha0_equals_l1_bit_for_bit(dtype, amount):
    torch.manual_seed(2)
    for make in (lambda: nn.Linear(9, 6), lambda: nn.Conv2d(3, 4, 3)):
        a = make().to(dtype)
        b = copy.deepcopy(a)
        spectral_unstructured(a, "weight", amount, alpha=0.0)
        torch_prune.l1_unstructured(b, "weight", amount)
        assert a.weight_mask.dtype == b.weight_mask.dtype
        assert torch.equal(a.weight_mask, b.weight_mask)


def test_unstructured_spectral_term_is_first_order_fs_shift():
    # g_ij must be d_FS(ψ(W), ψ(W - ε w_ij E_ij)) / (ε |w_ij|) as ε -> 0 (non-augmented ψ)
    torch.manual_seed(3)
    w = torch.randn(4, 5, dtype=torch.float64)
    eps = 1e-6
    psi = spectral_state(w, augment=False)
    g_ref = torch.empty_like(w)
    for i in range(4):
        for j in range(5):
            w2 = w.clone()
            w2[i, j] -= eps * w[i, j]
            g_ref[i, j] = fubini_study(psi, spectral_state(w2, augment=False)) / (
                eps * w[i, j].abs()
            )
    alpha = 2.0
    scores = SpectralUnstructured.scores(w, alpha)
    g_ratio = (scores / w.abs() - 1) / alpha  # = g / mean(g)
    assert torch.allclose(g_ratio, g_ref / g_ref.mean(), rtol=1e-3, atol=1e-5)


def test_unstructured_scores_shape_dtype_and_1d_fallback():
    conv_w = torch.randn(4, 3, 2, 2, dtype=torch.float16)
    s = SpectralUnstructured.scores(conv_w)
    assert s.shape == conv_w.shape and s.dtype == torch.float32
    assert bool((s >= conv_w.float().abs() - 1e-6).all())  # factor >= 1
    b = torch.tensor([-3.0, 1.0, -2.0])
    assert torch.equal(SpectralUnstructured.scores(b, alpha=5.0), b.abs())
    with pytest.raises(ValueError, match="alpha must be a finite float >= 0, got -1"):
        SpectralUnstructured(0.5, alpha=-1)


def test_unstructured_spectral_term_changes_the_choice():
    # the mask follows the spectral scores exactly, and they change the choice made by L1
    torch.manual_seed(4)
    w = torch.randn(6, 6)
    method = SpectralUnstructured(5, alpha=4.0)
    mask = method.compute_mask(w, torch.ones_like(w))
    scores = SpectralUnstructured.scores(w, 4.0)
    lowest = set(torch.topk(scores.flatten(), 5, largest=False).indices.tolist())
    assert set(torch.nonzero(mask.flatten() == 0).flatten().tolist()) == lowest
    l1 = L1Unstructured(5).compute_mask(w, torch.ones_like(w))
    assert not torch.equal(mask, l1)


def test_unstructured_iterative_keeps_spectral_term():
    # The second call goes through a PruningContainer that hands compute_mask a flat vector;
    # the scores are computed on the whole masked tensor first, so the result equals
    # pruning the remaining entries by the spectral scores of W ⊙ mask.
    torch.manual_seed(5)
    lin = nn.Linear(8, 6)
    spectral_unstructured(lin, "weight", amount=10, alpha=3.0)
    first = lin.weight_mask.clone()
    effective = lin.weight_orig.detach() * first
    scores = SpectralUnstructured.scores(effective, 3.0).flatten()
    scores[first.flatten() == 0] = math.inf
    expected = first.clone().flatten()
    expected[torch.topk(scores, 5, largest=False).indices] = 0
    spectral_unstructured(lin, "weight", amount=5, alpha=3.0)
    assert isinstance(next(iter(lin._forward_pre_hooks.values())), PruningContainer)
    assert torch.equal(lin.weight_mask.flatten(), expected)


def test_unstructured_importance_scores():
    lin = nn.Linear(3, 2)
    scores = torch.tensor([[5.0, 1.0, 4.0], [2.0, 6.0, 3.0]])
    spectral_unstructured(lin, "weight", amount=2, alpha=0.0, importance_scores=scores)
    assert torch.equal(lin.weight_mask, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))


# ---------------------------------------------------------------------------------------------
# global pruning
# ---------------------------------------------------------------------------------------------


def _net() -> nn.Sequential:
    torch.manual_seed(6)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(24, 5))


def _params(net: nn.Sequential) -> list[tuple[nn.Module, str]]:
    return [(net[0], "weight"), (net[1], "weight"), (net[3], "weight"), (net[3], "bias")]


@pytest.mark.parametrize("method", [L1Unstructured, torch_prune.RandomUnstructured])
def test_global_unstructured_torch_methods_bit_identical(method):
    ours, theirs = _net(), _net()
    imp = {(ours[3], "weight"): torch.rand(5, 24)}
    imp_t = {(theirs[3], "weight"): imp[(ours[3], "weight")]}
    torch.manual_seed(7)
    global_unstructured(_params(ours), method, importance_scores=imp, amount=0.4)
    torch.manual_seed(7)
    torch_prune.global_unstructured(_params(theirs), method, importance_scores=imp_t, amount=0.4)
    for (a, name), (b, _) in zip(_params(ours), _params(theirs)):
        assert torch.equal(getattr(a, name + "_mask"), getattr(b, name + "_mask"))
    assert sum(int((getattr(m, n + "_mask") == 0).sum()) for m, n in _params(ours)) == round(
        0.4 * sum(getattr(m, n + "_orig").numel() for m, n in _params(ours))
    )


def test_global_unstructured_spectral_uses_per_tensor_scores():
    net = _net()
    params = _params(net)
    scores = [SpectralUnstructured.scores(getattr(m, n).detach(), 2.0) for m, n in params]
    flat = torch.cat([s.flatten().float() for s in scores])
    k = round(0.5 * flat.numel())
    expected = torch.ones_like(flat)
    expected[torch.topk(flat, k, largest=False).indices] = 0
    global_unstructured(params, SpectralUnstructured, amount=0.5, alpha=2.0)
    got = torch.cat([getattr(m, n + "_mask").flatten() for m, n in params])
    assert torch.equal(got, expected)
    # alpha=0 is torch's global L1, bit for bit
    a, b = _net(), _net()
    global_unstructured(_params(a), SpectralUnstructured, amount=0.5, alpha=0.0)
    torch_prune.global_unstructured(_params(b), L1Unstructured, amount=0.5)
    for (m1, n), (m2, _) in zip(_params(a), _params(b)):
        assert torch.equal(getattr(m1, n + "_mask"), getattr(m2, n + "_mask"))


def _three_layers() -> list[nn.Linear]:
    torch.manual_seed(8)
    layers = [nn.Linear(6, 5), nn.Linear(6, 4), nn.Linear(6, 3)]
    with torch.no_grad():
        layers[0].weight.mul_(100.0)  # big weights: plain norms would spare this layer entirely
        layers[2].weight.mul_(0.01)  # tiny weights: plain norms would empty this layer
    return layers


def test_global_structured_ln_one_threshold_on_normalized_norms():
    layers = _three_layers()
    normalized = []
    for lin in layers:
        norms = torch.linalg.vector_norm(lin.weight.detach(), dim=1)
        normalized.append(norms / norms.mean())
    global_structured([(m, "weight") for m in layers], amount=5, pruning_method=LnStructured, n=2)
    pruned_scores, kept_scores = [], []
    for lin, scores in zip(layers, normalized):
        pruned = set(_pruned_channels(lin.weight_mask))
        protected = int(torch.argmax(scores))
        assert protected not in pruned
        for c in range(scores.numel()):
            if c in pruned:
                pruned_scores.append(float(scores[c]))
            elif c != protected:
                kept_scores.append(float(scores[c]))
    assert len(pruned_scores) == 5
    assert max(pruned_scores) <= min(kept_scores)  # one threshold across layers
    # every layer lost something: the normalization made the scales comparable
    assert all(_pruned_channels(lin.weight_mask) for lin in layers)


def test_global_structured_keeps_one_channel_per_layer():
    layers = _three_layers()
    params = [(m, "weight") for m in layers]
    global_structured(params, amount=12 - 3, pruning_method=LnStructured, n=1)
    assert [m.weight_mask.any(dim=1).sum().item() for m in layers] == [1, 1, 1]
    fresh = _three_layers()
    keys = [list(m.state_dict()) for m in fresh]
    with pytest.raises(ValueError, match="at most 9 can go while every layer keeps"):
        global_structured([(m, "weight") for m in fresh], amount=1.0)
    assert [list(m.state_dict()) for m in fresh] == keys and not any(map(is_pruned, fresh))


def test_global_structured_spectral_prunes_most_redundant_across_layers():
    a, b = _designed_conv(), _designed_conv()
    with torch.no_grad():  # layer b: no identical pair, the 3-4 pair is its most redundant
        b.weight[1] = _matrix((6, 3, 0.2), 11).reshape(3, 2, 2).float()
    global_structured([(a, "weight"), (b, "weight")], amount=3)
    # a: 0 at distance 0, then 3 at 0.02; b: 3 at 0.02; next would be 0.11 in either layer
    pruned = (_pruned_channels(a.weight_mask), _pruned_channels(b.weight_mask))
    assert pruned == ([0, 3], [3])


def test_global_structured_composes_with_previous_pruning():
    layers = _three_layers()
    ln_structured(layers[0], "weight", amount=1, n=2, dim=0)
    first = layers[0].weight_mask.clone()
    global_structured([(m, "weight") for m in layers], amount=2, pruning_method=LnStructured, n=2)
    assert bool((layers[0].weight_mask <= first).all())
    hook = next(iter(layers[0]._forward_pre_hooks.values()))
    assert isinstance(hook, PruningContainer) and len(hook) == 2
    assert sum(len(_pruned_channels(m.weight_mask)) for m in layers) == 3


# ---------------------------------------------------------------------------------------------
# trap (a): amounts
# ---------------------------------------------------------------------------------------------

_BAD_AMOUNTS = [True, float("nan"), float("inf"), -1, -0.1, 1.5]


def _calls():
    return {
        "spectral_structured": lambda a: spectral_structured(nn.Conv2d(2, 4, 3), "weight", a),
        "spectral_unstructured": lambda a: spectral_unstructured(nn.Linear(3, 3), "weight", a),
        "l1_unstructured": lambda a: l1_unstructured(nn.Linear(3, 3), "weight", a),
        "random_unstructured": lambda a: random_unstructured(nn.Linear(3, 3), "weight", a),
        "ln_structured": lambda a: ln_structured(nn.Linear(3, 3), "weight", a, n=2, dim=0),
        "random_structured": lambda a: random_structured(nn.Linear(3, 3), "weight", a, dim=0),
        "global_unstructured": lambda a: global_unstructured(
            [(nn.Linear(3, 3), "weight")], L1Unstructured, amount=a
        ),
        "global_structured": lambda a: global_structured([(nn.Conv2d(2, 4, 3), "weight")], a),
        "SpectralStructured": lambda a: SpectralStructured(a),
        "SpectralUnstructured": lambda a: SpectralUnstructured(a),
    }


@pytest.mark.parametrize("name", sorted(_calls()))
@pytest.mark.parametrize("amount", _BAD_AMOUNTS, ids=repr)
def test_bad_amounts_rejected_with_value_in_message(name, amount):
    with pytest.raises((TypeError, ValueError)) as info:
        _calls()[name](amount)
    assert repr(amount) in str(info.value)


def test_torch_itself_mishandles_amount_true():
    # the trap: torch's ln_structured reads True as the integer 1 and silently prunes a channel;
    # l1_unstructured fails deep inside topk with a message that never mentions `amount`
    m = torch_prune.ln_structured(nn.Conv2d(2, 4, 3), "weight", amount=True, n=2, dim=0)
    assert _pruned_channels(m.weight_mask) != []
    with pytest.raises(TypeError, match="argument 'k' must be int, not bool"):
        torch_prune.l1_unstructured(nn.Linear(3, 3), "weight", amount=True)


# ---------------------------------------------------------------------------------------------
# trap (b): failed calls leave the module exactly as it was
# ---------------------------------------------------------------------------------------------


def _state(module: nn.Module):
    return {
        "params": [(k, id(v), v.detach().clone()) for k, v in module._parameters.items()],
        "buffers": [(k, id(v), v.clone()) for k, v in module._buffers.items()],
        "hooks": [(k, id(h)) for k, h in module._forward_pre_hooks.items()],
        "container": [
            tuple(id(m) for m in h)
            for h in module._forward_pre_hooks.values()
            if isinstance(h, PruningContainer)
        ],
        "keys": list(module.state_dict()),
        "dict": {k: id(v) for k, v in module.__dict__.items()},
    }


def _assert_same_state(a, b):
    assert [(k, i) for k, i, _ in a["params"]] == [(k, i) for k, i, _ in b["params"]]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a["params"], b["params"]))
    assert [(k, i) for k, i, _ in a["buffers"]] == [(k, i) for k, i, _ in b["buffers"]]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a["buffers"], b["buffers"]))
    for key in ("hooks", "container", "keys", "dict"):
        assert a[key] == b[key], key


def test_torch_failure_corrupts_the_module():
    # the trap, reproduced: state_dict order changes on a first failure ...
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError):
        torch_prune.l1_unstructured(lin, "weight", amount=10**6)
    assert list(lin.state_dict()) == ["bias", "weight"]
    # ... and on a second pruning call the pruning hook is lost
    lin = torch_prune.l1_unstructured(nn.Linear(4, 3), "weight", amount=2)
    with pytest.raises(ValueError):
        torch_prune.l1_unstructured(lin, "weight", amount=10**6)
    assert not torch_prune.is_pruned(lin)


_FAILURES = {
    "l1_unstructured": lambda m: l1_unstructured(m, "weight", amount=10**6),
    "spectral_unstructured": lambda m: spectral_unstructured(m, "weight", amount=10**6),
    "spectral_structured": lambda m: spectral_structured(m, "weight", amount=10**6),
    "sibling_on_rows": lambda m: spectral_structured(m, "weight", 1, score="sibling"),
    "ln_structured": lambda m: ln_structured(m, "weight", amount=10**6, n=2, dim=0),
    "global_unstructured": lambda m: global_unstructured(
        [(m, "bias"), (m, "weight")], L1Unstructured, amount=10**6
    ),
    "global_structured": lambda m: global_structured([(m, "weight")], amount=10**6),
    "custom_from_mask": lambda m: custom_from_mask(m, "weight", torch.ones(2)),
}


@pytest.mark.parametrize("already_pruned", [False, True])
@pytest.mark.parametrize("call", sorted(_FAILURES))
def test_failed_call_leaves_module_exactly_as_it_was(call, already_pruned):
    lin = nn.Linear(4, 3)
    if already_pruned:
        spectral_unstructured(lin, "weight", amount=0.25)
        l1_unstructured(lin, "weight", amount=1)  # a PruningContainer is now the hook
        lin(torch.randn(2, 4))
    before = _state(lin)
    with pytest.raises((ValueError, RuntimeError, AssertionError)):
        _FAILURES[call](lin)
    _assert_same_state(before, _state(lin))
    assert is_pruned(lin) == already_pruned


# ---------------------------------------------------------------------------------------------
# trap (c): deepcopy
# ---------------------------------------------------------------------------------------------


def test_torch_pruned_module_cannot_be_deepcopied():
    lin = torch_prune.l1_unstructured(nn.Linear(4, 3), "weight", amount=0.5)
    lin(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(lin)


def _check_copy(original: nn.Module, clone: nn.Module, x: torch.Tensor) -> None:
    for (name, a), (_, b) in zip(original.named_buffers(), clone.named_buffers()):
        assert name.endswith("_mask") and torch.equal(a, b)
    assert torch.equal(original(x), clone(x))
    for a, b in zip(original.parameters(), clone.parameters()):
        assert a is not b and a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(original(x), clone(x))


def test_deepcopy_of_pruned_module_and_model():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    spectral_structured(model[0], "weight", amount=2)
    l1_unstructured(model[0], "weight", amount=3)
    spectral_unstructured(model[2], "weight", amount=0.5)
    x = torch.randn(5, 4)
    model(x).sum().backward()  # gradients on: module.weight are non-leaf tensors
    _check_copy(model[0], copy.deepcopy(model[0]), x)
    clone = copy.deepcopy(model)
    _check_copy(model, clone, x)
    _check_copy(clone, copy.deepcopy(clone), x)  # the copy is itself deep-copyable
    assert model[0].weight.grad_fn is not None  # the original still prunes through its hook


def test_make_deepcopyable_fixes_modules_pruned_by_torch():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    torch_prune.ln_structured(model[1], "weight", amount=1, n=2, dim=0)
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    _check_copy(model, copy.deepcopy(make_deepcopyable(model)), torch.randn(3, 4))


def test_pruned_module_still_pickles_and_remove_drops_the_fix():
    lin = spectral_unstructured(nn.Linear(4, 3), "weight", amount=0.5)
    buffer = io.BytesIO()
    torch.save(lin, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.weight_mask, lin.weight_mask)
    x = torch.randn(2, 4)
    assert torch.equal(copy.deepcopy(loaded)(x), lin(x))
    remove(lin, "weight")
    assert "__deepcopy__" not in lin.__dict__ and not is_pruned(lin)
    assert torch.equal(copy.deepcopy(lin)(x), lin(x))


# ---------------------------------------------------------------------------------------------
# trap (d): loading a pruned state_dict into a fresh model
# ---------------------------------------------------------------------------------------------


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


def _pruned_model() -> nn.Sequential:
    torch.manual_seed(10)
    model = _model()
    spectral_structured(model[0], "weight", amount=1)
    l1_unstructured(model[0], "weight", amount=5)
    spectral_unstructured(model[3], "weight", amount=0.5)
    l1_unstructured(model[3], "bias", amount=1)
    return model


def test_torch_cannot_load_pruned_state_dict_into_fresh_model():
    with pytest.raises(RuntimeError, match="weight_orig"):
        _model().load_state_dict(_pruned_model().state_dict())


def test_load_pruned_state_dict_recreates_masks_and_outputs():
    pruned = _pruned_model()
    fresh = _model()
    load_pruned_state_dict(fresh, pruned.state_dict())
    assert list(fresh.state_dict()) == list(pruned.state_dict())
    for key, value in pruned.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(fresh[0].weight, pruned[0].weight)  # fresh before any forward
    assert torch.equal(fresh(x), pruned(x))
    assert is_pruned(fresh)
    copy.deepcopy(fresh)  # deep-copyable too


def test_load_pruned_state_dict_shape_mismatch_changes_nothing():
    sd = _pruned_model().state_dict()
    fresh = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 4))
    before = [_state(m) for m in fresh]
    message = r"'3.weight_mask': expected shape \(4, 16\), got \(3, 16\)"
    with pytest.raises(ValueError, match=message):
        load_pruned_state_dict(fresh, sd)
    for b, m in zip(before, fresh):
        _assert_same_state(b, _state(m))
    assert not is_pruned(fresh)
    sd = _pruned_model().state_dict()
    sd["3.bias_orig"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"'3.bias_orig': expected shape \(3,\), got \(7,\)"):
        load_pruned_state_dict(_model(), sd)


def test_load_pruned_state_dict_strict_keys():
    sd = _pruned_model().state_dict()
    del sd["0.bias"]
    fresh = _model()
    with pytest.raises(RuntimeError, match=r"missing keys \['0.bias'\]"):
        load_pruned_state_dict(fresh, sd)
    assert not is_pruned(fresh)
    result = load_pruned_state_dict(fresh, sd, strict=False)
    assert result.missing_keys == ["0.bias"] and is_pruned(fresh)


# ---------------------------------------------------------------------------------------------
# trap (e): containers
# ---------------------------------------------------------------------------------------------


def test_container_l1_then_spectral_structured_exact_mask():
    conv = _designed_conv()
    with torch.no_grad():
        conv.weight[4, 2, 1, 1] = 1e-4  # the smallest entry, in filter 4
    l1_unstructured(conv, "weight", amount=1)
    l1_mask = torch.ones(6, 3, 2, 2)
    l1_mask[4, 2, 1, 1] = 0
    assert torch.equal(conv.weight_mask, l1_mask)
    spectral_structured(conv, "weight", amount=1)
    expected = l1_mask.clone()
    expected[0] = 0  # of the identical pair, the first
    assert torch.equal(conv.weight_mask, expected)
    hook = next(iter(conv._forward_pre_hooks.values()))
    assert isinstance(hook, PruningContainer)
    assert [type(m) for m in hook] == [L1Unstructured, SpectralStructured]


def test_container_spectral_then_l1_matches_torch_semantics():
    conv = spectral_structured(_designed_conv(), "weight", amount=1)
    smallest = conv.weight_orig.detach().abs().clone()
    smallest[0] = math.inf  # channel 0 is gone: the container only sees survivors
    idx = int(torch.argmin(smallest.flatten()))
    l1_unstructured(conv, "weight", amount=1)
    expected = torch.ones(6 * 3 * 2 * 2)
    expected[idx] = 0
    expected = expected.view(6, 3, 2, 2)
    expected[0] = 0
    assert torch.equal(conv.weight_mask, expected)


def test_wrappers_compose_exactly_like_torch():
    torch.manual_seed(11)
    a = nn.Conv2d(3, 5, 3)
    b = copy.deepcopy(a)
    l1_unstructured(a, "weight", amount=0.3)
    ln_structured(a, "weight", amount=2, n=1, dim=0)
    torch_prune.l1_unstructured(b, "weight", amount=0.3)
    torch_prune.ln_structured(b, "weight", amount=2, n=1, dim=0)
    assert torch.equal(a.weight_mask, b.weight_mask)
    assert [type(m) for m in next(iter(a._forward_pre_hooks.values()))] == [
        type(m) for m in next(iter(b._forward_pre_hooks.values()))
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masks_equal_cpu_masks():
    for device in ("cpu", "cuda"):
        conv = _designed_conv().to(device)
        lin = _designed_linear().to(device)
        spectral_structured(conv, "weight", amount=2)
        spectral_structured(lin, "weight", amount=2)
        spectral_unstructured(lin, "weight", amount=3)
        assert conv.weight_mask.device.type == device == lin.weight_mask.device.type
        assert _pruned_channels(conv.weight_mask.cpu()) == [0, 3]
        assert _pruned_channels(lin.weight_mask.cpu()) == [0, 3]
        a, b = _designed_conv().to(device), _designed_conv().to(device)
        global_structured([(a, "weight"), (b, "weight")], amount=2)
        assert _pruned_channels(a.weight_mask.cpu()) == [0] == _pruned_channels(b.weight_mask.cpu())
        assert torch.equal(
            copy.deepcopy(conv)(torch.ones(1, 3, 2, 2, device=device)),
            conv(torch.ones(1, 3, 2, 2, device=device)),
        )


# ---------------------------------------------------------------------------------------------
# docstring examples run
# ---------------------------------------------------------------------------------------------


def test_docstring_examples_run():
    torch.manual_seed(0)
    result = doctest.testmod(methods, extraglobs={"torch": torch, "nn": nn}, verbose=False)
    assert result.attempted > 20
    assert result.failed == 0
