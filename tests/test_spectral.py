"""Tests of torch_qmprune.spectral: metric axioms, invariances, dtypes, POT agreement, the
Theorem 2.1 counterexample, relative entropy and embeddings."""

from __future__ import annotations

import doctest
import math
import re

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from torch_qmprune import spectral
from torch_qmprune.spectral import (
    augment,
    check_theorem21,
    density_matrix,
    fidelity,
    fubini_study,
    lipschitz_bound,
    majorization_profile,
    operator_matrix,
    pad_states,
    pairwise_fubini_study,
    pairwise_wasserstein2,
    quantum_relative_entropy,
    random_feature_embedding,
    relative_entropy_rank,
    spectral_state,
    spectral_states,
    theorem21_bound,
    truncate_density,
    wasserstein2,
    wasserstein2_states,
)

HALF_PI = math.pi / 2
FAST = settings(max_examples=40, deadline=None)

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)


def vectors(min_len: int = 1, max_len: int = 8):
    """Non-degenerate float64 vectors (max |entry| >= 0.1, so normalization is well conditioned)."""
    return (
        st.integers(min_len, max_len)
        .flatmap(lambda n: arrays(np.float64, n, elements=finite))
        .filter(lambda a: np.abs(a).max() >= 0.1)
        .map(torch.from_numpy)
    )


def matrices(max_side: int = 6):
    return (
        st.tuples(st.integers(1, max_side), st.integers(1, max_side))
        .flatmap(lambda s: arrays(np.float64, s, elements=finite))
        .filter(lambda a: np.abs(a).max() >= 0.1)
        .map(torch.from_numpy)
    )


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# ------------------------------------------------------------------------------------------
# states.py
# ------------------------------------------------------------------------------------------


def test_operator_matrix_shapes():
    assert operator_matrix(torch.zeros(5)).shape == (1, 5)
    assert operator_matrix(torch.zeros(4, 7)).shape == (4, 7)
    assert operator_matrix(torch.zeros(8, 3, 3, 3)).shape == (8, 27)
    assert operator_matrix(torch.zeros(8, 2, 3, 3, 3)).shape == (8, 54)
    w = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(operator_matrix(w)[1], torch.arange(12.0, 24.0))


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 3, 3)])
def test_operator_matrix_empty_raises_naming_shape(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        operator_matrix(torch.zeros(shape))
    with pytest.raises(ValueError, match="shape"):
        spectral_state(torch.zeros(shape))


def test_operator_matrix_scalar_raises():
    with pytest.raises(ValueError, match=r"shape \(\)"):
        operator_matrix(torch.tensor(1.0))


def test_augment_values_and_batching():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([5.0, 6.0])
    expected = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 6.0], [0.0, 0.0, 1.0]])
    assert torch.equal(augment(w, b), expected)
    assert torch.equal(augment(w)[:, 2], torch.tensor([0.0, 0.0, 1.0]))
    batch = torch.randn(3, 4, 2, 5)
    bias = torch.randn(3, 4, 2)
    out = augment(batch, bias)
    assert out.shape == (3, 4, 3, 6)
    assert torch.equal(out[1, 2], augment(batch[1, 2], bias[1, 2]))
    with pytest.raises(ValueError, match="bias has shape"):
        augment(w, torch.zeros(3))


def test_spectral_state_known_values():
    psi = spectral_state(torch.diag(torch.tensor([3.0, 4.0])), augment=False)
    assert torch.allclose(psi, torch.tensor([0.8, 0.6]))
    # augmented: Ŵ = diag(3, 4, 1) -> (4, 3, 1) / sqrt(26)
    psi = spectral_state(torch.diag(torch.tensor([3.0, 4.0])))
    assert torch.allclose(psi, torch.tensor([4.0, 3.0, 1.0]) / math.sqrt(26.0))


@FAST
@given(matrices(), st.booleans())
def test_spectral_state_is_unit_descending_nonnegative(w, aug):
    psi = spectral_state(w, augment=aug)
    assert psi.shape == (min(w.shape) + int(aug),)
    assert torch.all(psi >= 0)
    assert torch.all(psi[:-1] >= psi[1:])
    assert abs(float(psi.norm()) - 1.0) < 1e-12


def test_spectral_state_of_module_uses_weight_and_bias():
    lin = nn.Linear(5, 3)
    assert torch.allclose(spectral_state(lin), spectral_state(lin.weight, lin.bias))
    assert torch.allclose(
        spectral_state(lin, augment=False), spectral_state(lin.weight, augment=False)
    )
    conv = nn.Conv2d(3, 4, 3)
    assert spectral_state(conv).shape == (5,)
    with pytest.raises(ValueError, match="either a module"):
        spectral_state(lin, lin.bias)


@FAST
@given(matrices(), st.integers(0, 2**31 - 1))
def test_spectral_state_permutation_invariance(w, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(w.shape[0], generator=gen)
    cols = torch.randperm(w.shape[1], generator=gen)
    bias = torch.randn(w.shape[0], generator=gen, dtype=torch.float64)
    assert torch.allclose(
        spectral_state(w[rows][:, cols], bias[rows]), spectral_state(w, bias), atol=1e-10
    )
    permuted = spectral_state(w[rows][:, cols], augment=False)
    assert torch.allclose(permuted, spectral_state(w, augment=False), atol=1e-10)


@FAST
@given(matrices(), st.integers(0, 2**31 - 1))
def test_spectral_state_orthogonal_invariance(w, seed):
    gen = torch.Generator().manual_seed(seed)
    u = random_orthogonal(w.shape[0], gen)
    v = random_orthogonal(w.shape[1], gen)
    psi = spectral_state(w, augment=False)
    psi_rot = spectral_state(u @ w @ v.T, augment=False)
    assert torch.allclose(psi, psi_rot, atol=1e-9)
    assert float(fubini_study(psi, psi_rot)) < 1e-6


@FAST
@given(matrices(), st.floats(1e-3, 1e3))
def test_spectral_state_scale_invariance_without_bias(w, c):
    assert torch.allclose(
        spectral_state(c * w, augment=False), spectral_state(w, augment=False), atol=1e-10
    )


def test_spectral_state_extreme_scales_do_not_overflow():
    w = torch.randn(6, 4)
    ref = spectral_state(w, augment=False)
    for c in (1e-30, 1e30):
        psi = spectral_state(w * c, augment=False)
        assert torch.isfinite(psi).all()
        assert torch.allclose(psi, ref, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.int64, torch.float32),
    ],
)
def test_dtype_handling(dtype, expected):
    w = (torch.randn(5, 4, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    psi = spectral_state(w)
    assert psi.dtype == expected
    ref = spectral_state(w.to(torch.float64))
    assert torch.allclose(psi.double(), ref, atol=1e-5)
    if dtype.is_floating_point:
        assert fubini_study(psi, psi.to(dtype)).dtype == expected
        assert float(fubini_study(psi, psi.to(dtype))) < 1e-2
    assert spectral_states(w[None]).dtype == expected


def test_dtype_override():
    w = torch.randn(4, 4, dtype=torch.float16)
    assert spectral_state(w, dtype=torch.float64).dtype == torch.float64
    assert spectral_state(w.double(), dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        spectral_state(w, dtype=torch.float16)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_raises(bad):
    w = torch.randn(3, 3)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="weight"):
        spectral_state(w)
    with pytest.raises(ValueError, match="weight"):
        spectral_states(w[None])
    with pytest.raises(ValueError, match="bias"):
        spectral_state(torch.randn(3, 3), torch.tensor([0.0, bad, 0.0]))


def test_zero_matrix():
    message = "all-zero operator has no spectral state; use augment=True"
    with pytest.raises(ValueError, match=message):
        spectral_state(torch.zeros(3, 4), augment=False)
    psi = spectral_state(torch.zeros(3, 4))  # Ŵ = e_{m+1} e_{n+1}ᵀ
    assert torch.equal(psi, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_degenerate_unit_single_row():
    """SCIENCE.md §2: a 1×n row has a single singular value, ψ = [1], every d_FS is 0."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(10, 1, 7, generator=gen)
    states = spectral_states(rows, augment=False)
    assert torch.equal(states, torch.ones(10, 1))
    for i in range(1, 10):
        assert torch.equal(spectral_state(rows[i], augment=False), torch.tensor([1.0]))
        assert float(fubini_study(states[0], states[i])) == 0.0
    assert torch.equal(pairwise_fubini_study(states), torch.zeros(10, 10))


def test_spectral_states_batched_equals_per_item():
    gen = torch.Generator().manual_seed(2)
    mats = torch.randn(7, 5, 3, generator=gen)
    biases = torch.randn(7, 5, generator=gen)
    batched = spectral_states(mats, biases)
    assert batched.shape == (7, 4)
    for i in range(7):
        assert torch.allclose(batched[i], spectral_state(mats[i], biases[i]), atol=1e-6)
    plain = spectral_states(mats, augment=False)
    assert plain.shape == (7, 3)
    for i in range(7):
        assert torch.allclose(plain[i], spectral_state(mats[i], augment=False), atol=1e-6)


def test_spectral_states_errors_and_empty_batch():
    mats = torch.randn(5, 3, 3)
    mats[1] = 0
    mats[4] = 0
    with pytest.raises(ValueError, match=r"indices \[1, 4\]"):
        spectral_states(mats, augment=False)
    assert torch.isfinite(spectral_states(mats)).all()
    assert spectral_states(torch.zeros(0, 3, 5)).shape == (0, 4)
    assert spectral_states(torch.zeros(0, 3, 5), augment=False).shape == (0, 3)
    with pytest.raises(ValueError, match=r"\(B, m, n\)"):
        spectral_states(torch.randn(3, 3))
    with pytest.raises(ValueError, match="biases has shape"):
        spectral_states(torch.randn(2, 3, 3), torch.randn(3, 3))


def test_gram_states_equal_svd_states_to_float32_rounding():
    # the importance's fast path: singular values from eigvalsh of the float64 Gram
    from torch_qmprune.spectral.states import _gram_spectral_states

    gen = torch.Generator().manual_seed(5)
    cases = [
        (torch.randn(40, 64, 9, generator=gen), False),  # 3x3 conv filters, tall
        (torch.randn(12, 3, 49, generator=gen), False),  # 7x7 stem filters, wide
        (torch.randn(20, 1, 30, generator=gen), True),  # Linear rows, augmented
        (torch.randn(6, 5, 5, generator=gen) * 1e-30, False),  # tiny scale
        (torch.randn(6, 5, 5, generator=gen).half(), False),
    ]
    low_rank = torch.randn(10, 16, 2, generator=gen) @ torch.randn(10, 2, 9, generator=gen)
    cases.append((low_rank, False))  # rank 2 of 9: seven zero singular values
    for mats, aug in cases:
        fast = _gram_spectral_states(mats, augment=aug)
        exact = spectral_states(mats.double(), augment=aug)
        assert fast.dtype == torch.float32 and fast.shape == exact.shape
        assert torch.allclose(fast.double(), exact, atol=3e-7, rtol=0), (mats.shape, aug)
        # at least as close to the float64 truth as the float32 SVD is, within rounding
        svd32 = spectral_states(mats, augment=aug)
        assert (fast.double() - exact).abs().max() <= (svd32.double() - exact).abs().max() + 1e-7


def test_gram_states_shortcuts_and_fallbacks():
    from torch_qmprune.spectral.states import _gram_spectral_states

    ones = _gram_spectral_states(torch.randn(7, 16, 1), augment=False)  # 1x1 conv filters
    assert torch.equal(ones, torch.ones(7, 1))
    tiny = torch.full((2, 4, 1), 1e-30)  # squares underflow: the exact path scales first
    assert torch.equal(_gram_spectral_states(tiny, augment=False), torch.ones(2, 1))
    x64 = torch.randn(3, 6, 4, dtype=torch.float64)  # float64 math: the exact SVD path
    assert torch.equal(_gram_spectral_states(x64), spectral_states(x64))
    bad = torch.randn(5, 3, 3)
    bad[1] = 0
    bad[4] = 0
    with pytest.raises(ValueError, match=r"indices \[1, 4\]"):
        _gram_spectral_states(bad, augment=False)
    bad = torch.randn(5, 3, 1)
    bad[2] = 0
    with pytest.raises(ValueError, match=r"indices \[2\]"):
        _gram_spectral_states(bad, augment=False)
    for value in (math.nan, math.inf):
        bad = torch.randn(4, 8, 9)
        bad[3, 2, 1] = value
        with pytest.raises(ValueError, match="finite"):
            _gram_spectral_states(bad, augment=False)


def _downdate_case(n: int, k: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, k, generator=gen, dtype=torch.float64)
    if kind == "low_rank":
        m = torch.randn(n, 2, generator=gen, dtype=torch.float64) @ torch.randn(
            2, k, generator=gen, dtype=torch.float64
        )
    elif kind == "duplicates" and n >= 4:
        m[1] = m[0]
        m[3] = -2 * m[2]
    elif kind == "graded":  # singular values over 8 orders of magnitude
        m = m * torch.logspace(-8, 0, k, dtype=torch.float64)
    elif kind == "zero_rows":
        m[::3] = 0
    elif kind == "zero":
        m.zero_()
    return m


@pytest.mark.parametrize("kind", ["random", "low_rank", "duplicates", "graded", "zero_rows",
                                  "zero"])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (1, 6), (6, 1), (7, 19), (19, 7), (24, 24),
                                      (60, 200), (200, 60)])
def test_downdated_eigvalsh_equals_eigvalsh_of_each_downdate(kind, n, k):
    # the leave-one-out fast path: spectra of M without row c from one secular equation each
    from torch_qmprune.spectral.secular import downdated_eigvalsh

    gen = torch.Generator().manual_seed(n * 1000 + k)
    m = _downdate_case(n, k, kind, gen)
    wide = n <= k
    if wide:
        lam, vecs = torch.linalg.eigh(m @ m.T)
        lam = lam.clamp_min(0)
        weights = lam * vecs.square()
    else:
        lam, vecs = torch.linalg.eigh(m.T @ m)
        lam = lam.clamp_min(0)
        weights = (m @ vecs).square()
    mu = downdated_eigvalsh(lam, weights, zero_first=wide)
    assert mu.shape == (n, min(n, k)) and (mu >= 0).all()
    for c in range(n):
        rest = torch.cat([m[:c], m[c + 1 :]])
        gram = rest @ rest.T if wide else rest.T @ rest
        ref = torch.linalg.eigvalsh(gram).clamp_min(0)
        if wide:  # the removed row's direction: eigenvalue 0
            ref = torch.cat([ref.new_zeros(1), ref])
        scale = max(float(lam[-1]), 1e-300)
        assert float((mu[c] - ref).abs().max()) <= 1e-12 * scale, (c, mu[c], ref)


def test_downdated_eigvalsh_random_structures():
    # a sweep over shapes and spectra: clusters, rank deficiency, zero rows, graded and
    # extreme scales (1e-150: the squares are near the bottom of float64)
    from torch_qmprune.spectral.secular import downdated_eigvalsh

    gen = torch.Generator().manual_seed(11)
    kinds = ["random", "low_rank", "cluster", "graded", "sparse", "tiny", "huge"]
    for trial in range(70):
        n = int(torch.randint(1, 25, (1,), generator=gen))
        k = int(torch.randint(1, 25, (1,), generator=gen))
        kind = kinds[trial % len(kinds)]
        m = torch.randn(n, k, generator=gen, dtype=torch.float64)
        r = min(n, k)
        if kind == "low_rank":
            q = max(1, r // 3)
            m = torch.randn(n, q, generator=gen, dtype=torch.float64) @ m[:q] if n >= q else m
        elif kind == "cluster":  # repeated and nearly repeated singular values
            s = torch.tensor([1.0, 2.0, 2.0 + 1e-9, 2.0, 1e-6] * r, dtype=torch.float64)[:r]
            u, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
            v, _ = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))
            m = u @ torch.diag(s) @ v.T
        elif kind == "graded":
            m = m * torch.logspace(-7, 0, k, dtype=torch.float64)
        elif kind == "sparse":
            m = m * (torch.rand(n, k, generator=gen) < 0.2)
        elif kind == "tiny":
            m = m * 1e-150
        elif kind == "huge":
            m = m * 1e150
        wide = n <= k
        gram = m @ m.T if wide else m.T @ m
        lam, vecs = torch.linalg.eigh(gram)
        lam = lam.clamp_min(0)
        weights = lam * vecs.square() if wide else (m @ vecs).square()
        mu = downdated_eigvalsh(lam, weights, zero_first=wide)
        for c in range(n):
            rest = torch.cat([m[:c], m[c + 1 :]])
            ref = torch.linalg.eigvalsh(rest @ rest.T if wide else rest.T @ rest).clamp_min(0)
            if wide:
                ref = torch.cat([ref.new_zeros(1), ref])
            err = float((mu[c] - ref).abs().max())
            assert err <= 1e-13 * float(lam[-1]), (kind, n, k, c, err, float(lam[-1]))


# ------------------------------------------------------------------------------------------
# metrics.py
# ------------------------------------------------------------------------------------------


@FAST
@given(vectors(), vectors())
def test_fubini_study_symmetric_and_in_range(a, b):
    d_ab = float(fubini_study(a, b))
    assert d_ab == float(fubini_study(b, a))
    assert 0.0 <= d_ab <= HALF_PI


@FAST
@given(vectors())
def test_fubini_study_zero_on_same_state_exactly(a):
    assert float(fubini_study(a, a)) == 0.0
    assert float(fubini_study(a, -a)) == 0.0
    assert float(fubini_study(a, torch.cat([a, a.new_zeros(3)]))) == 0.0


@FAST
@given(vectors(2, 8), vectors(2, 8))
def test_fubini_study_zero_iff_parallel(a, b):
    a, b = pad_states(a, b)
    an, bn = a / a.norm(), b / b.norm()
    parallel = min(float((an - bn).norm()), float((an + bn).norm())) < 1e-6
    d = float(fubini_study(a, b))
    if parallel:
        assert d < 1e-5
    else:
        assert d > 0.0
        assert d == pytest.approx(math.acos(min(1.0, abs(float(an @ bn)))), abs=1e-6)


@FAST
@given(vectors(3, 3), vectors(3, 3), vectors(3, 3))
def test_fubini_study_triangle_inequality(a, b, c):
    assert float(fubini_study(a, c)) <= float(fubini_study(a, b) + fubini_study(b, c)) + 1e-12


@FAST
@given(vectors(), vectors(), st.floats(-100, 100).filter(lambda c: abs(c) > 1e-3))
def test_fubini_study_scale_invariance(a, b, c):
    assert float(fubini_study(c * a, b)) == pytest.approx(float(fubini_study(a, b)), abs=1e-7)


@FAST
@given(vectors(), vectors())
def test_fidelity_is_cos_squared(a, b):
    f = float(fidelity(a, b))
    assert 0.0 <= f <= 1.0
    assert f == pytest.approx(math.cos(float(fubini_study(a, b))) ** 2, abs=1e-9)


def test_fubini_study_known_values_and_broadcast():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(fubini_study(e1, e2)) == pytest.approx(HALF_PI)
    assert float(fubini_study(e1, e1 + e2)) == pytest.approx(math.pi / 4)
    batch = torch.stack([e1, e2, e1 + e2])
    d = fubini_study(batch, e1)
    assert d.shape == (3,)
    assert torch.allclose(d, torch.tensor([0.0, HALF_PI, math.pi / 4]))
    assert fubini_study(batch[:, None], batch[None]).shape == (3, 3)


def test_fubini_study_zero_vector_raises():
    with pytest.raises(ValueError, match="zero"):
        fubini_study(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="zero"):
        fidelity(torch.ones(3), torch.zeros(2))


def test_pad_states():
    a, b, c = pad_states(torch.tensor([0.8, 0.6]), torch.tensor([1.0]), torch.ones(2, 3))
    assert torch.equal(a, torch.tensor([0.8, 0.6, 0.0]))
    assert torch.equal(b, torch.tensor([1.0, 0.0, 0.0]))
    assert c.shape == (2, 3)
    assert pad_states() == ()
    # cross-shape comparison equals comparison of padded states
    x, y = torch.rand(4), torch.rand(7)
    assert float(fubini_study(x, y)) == float(fubini_study(*pad_states(x, y)))


def test_pairwise_equals_elementwise():
    gen = torch.Generator().manual_seed(3)
    s = torch.rand(40, 6, generator=gen)
    s[5] = s[2]  # an exact duplicate
    s[7] = -3 * s[1]  # an antiparallel rescaled copy
    d = pairwise_fubini_study(s, chunk_size=16)
    assert d.shape == (40, 40)
    assert torch.equal(d, d.T)
    assert torch.equal(torch.diagonal(d), torch.zeros(40))
    assert float(d[2, 5]) == 0.0 and float(d[1, 7]) < 1e-6
    elementwise = fubini_study(s[:, None, :], s[None, :, :])
    assert torch.allclose(d, elementwise, atol=2e-6)
    other = torch.rand(9, 4, generator=gen)  # shorter: padded
    cross = pairwise_fubini_study(s, other, chunk_size=7)
    assert cross.shape == (40, 9)
    assert torch.allclose(cross, fubini_study(s[:, None, :], other[None, :, :]), atol=2e-6)
    d64 = pairwise_fubini_study(s.double())
    assert d64.dtype == torch.float64
    assert torch.allclose(d64, fubini_study(s.double()[:, None], s.double()[None]), atol=1e-12)


def test_pairwise_nearly_parallel_pairs_are_accurate():
    gen = torch.Generator().manual_seed(4)
    base = torch.rand(20, 8, generator=gen, dtype=torch.float64)
    near = (base + 1e-6 * torch.randn(20, 8, generator=gen, dtype=torch.float64)).float()
    base = base.float()
    exact = fubini_study(base.double(), near.double())  # same float32 inputs, float64 math
    got = torch.diagonal(pairwise_fubini_study(base, near))
    # the float32 path normalizes in float64 internally: matches to float32 resolution
    assert torch.allclose(got.double(), exact, rtol=1e-3, atol=1e-9)
    assert float(exact.min()) > 0


def test_pairwise_errors():
    with pytest.raises(ValueError, match=r"all-zero rows at indices \[2\]"):
        pairwise_fubini_study(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="chunk_size"):
        pairwise_fubini_study(torch.ones(2, 2), chunk_size=0)
    assert pairwise_fubini_study(torch.zeros(0, 3)).shape == (0, 0)


def test_pairwise_10k_by_64():
    gen = torch.Generator().manual_seed(5)
    states = torch.rand(10_000, 64, generator=gen)
    d = pairwise_fubini_study(states)
    assert d.shape == (10_000, 10_000)
    assert d.dtype == torch.float32
    idx = torch.tensor([0, 17, 4096, 9999])
    expected = fubini_study(states[idx][:, None], states[idx][None])
    assert torch.allclose(d[idx][:, idx], expected, atol=2e-6)
    assert float(d.min()) >= 0.0 and float(d.max()) <= HALF_PI
    assert float(d[9999, 9999]) == 0.0


# ------------------------------------------------------------------------------------------
# wasserstein.py
# ------------------------------------------------------------------------------------------


def test_majorization_profile():
    assert torch.allclose(majorization_profile(torch.tensor([3.0, 4.0])), torch.tensor([0.8, 1.4]))
    t = torch.tensor([0.0, 0.49, 0.5, 0.99, 1.0])
    assert torch.allclose(
        majorization_profile(torch.tensor([4.0, 3.0]), t), torch.tensor([0.0, 0.0, 0.8, 0.8, 1.4])
    )
    w = torch.randn(5, 3, dtype=torch.float64)
    psi = spectral_state(w)
    s = torch.linalg.svdvals(augment(w))
    assert torch.allclose(majorization_profile(w), torch.cumsum(s, 0) / s.norm())
    assert torch.allclose(majorization_profile(w), torch.cumsum(psi, 0))
    with pytest.raises(ValueError, match="negative"):
        majorization_profile(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        majorization_profile(torch.tensor([1.0]), torch.tensor([1.5]))


def test_wasserstein2_profile_matches_pot():
    gen = torch.Generator().manual_seed(6)
    for _ in range(10):
        a = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        b = torch.randn(3, 7, generator=gen, dtype=torch.float64)
        pa, pb = pad_states(spectral_state(a), spectral_state(b))
        m = pa.shape[0]
        atoms = np.arange(1, m + 1) / m
        w2_sq = ot.wasserstein_1d(
            atoms, atoms, pa.numpy() / pa.sum().item(), pb.numpy() / pb.sum().item(), p=2
        )
        emd = ot.emd2(
            pa.numpy() / pa.sum().item(),
            pb.numpy() / pb.sum().item(),
            (atoms[:, None] - atoms[None, :]) ** 2,
        )
        got = float(wasserstein2(a, b))
        assert got == pytest.approx(math.sqrt(w2_sq), abs=1e-10)
        assert got == pytest.approx(math.sqrt(emd), abs=1e-7)  # POT returns W₂², not W₂


def test_wasserstein2_spectrum_matches_pot_and_is_below_fs():
    gen = torch.Generator().manual_seed(7)
    for _ in range(25):
        a = torch.randn(5, 5, generator=gen, dtype=torch.float64) * torch.rand(1, generator=gen)
        b = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        pa, pb = pad_states(spectral_state(a), spectral_state(b))
        pot = math.sqrt(ot.wasserstein_1d(pa.numpy(), pb.numpy(), p=2))
        got = float(wasserstein2(a, b, kind="spectrum"))
        assert got == pytest.approx(pot, abs=1e-10)
        assert got == pytest.approx(float((pa - pb).norm()) / math.sqrt(pa.shape[0]), abs=1e-12)
        assert got <= float(fubini_study(pa, pb)) + 1e-12


def test_wasserstein2_known_values():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(wasserstein2_states(e1, e2)) == pytest.approx(0.5)  # atoms 1/2 vs 1
    assert float(wasserstein2_states(e1, e1)) == 0.0
    assert float(wasserstein2_states(e1, e2, kind="spectrum")) == 0.0
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        assert float(wasserstein2(lin, lin)) == 0.0
        assert float(wasserstein2(lin, nn.Linear(6, 2))) > 0.0
    with pytest.raises(ValueError, match="kind"):
        wasserstein2(lin, lin, kind="nope")


@pytest.mark.parametrize("kind", ["profile", "spectrum"])
def test_pairwise_wasserstein2_equals_pot(kind):
    gen = torch.Generator().manual_seed(8)
    s = torch.rand(9, 6, generator=gen, dtype=torch.float64).sort(dim=1, descending=True).values
    s[2, 3:] = 0  # padded state
    s[4, 1:] = 0  # rank-one state
    d = pairwise_wasserstein2(s, kind=kind)
    assert d.shape == (9, 9)
    assert torch.equal(d, d.T)
    assert torch.equal(torch.diagonal(d), torch.zeros(9, dtype=torch.float64))
    atoms = np.arange(1, 7) / 6
    for i in range(9):
        for j in range(9):
            if kind == "profile":
                wi = s[i].numpy() / s[i].sum().item()
                wj = s[j].numpy() / s[j].sum().item()
                ref = math.sqrt(max(0.0, ot.wasserstein_1d(atoms, atoms, wi, wj, p=2)))
            else:
                ui = (s[i] / s[i].norm()).numpy()
                uj = (s[j] / s[j].norm()).numpy()
                ref = math.sqrt(max(0.0, ot.wasserstein_1d(ui, uj, p=2)))
            assert float(d[i, j]) == pytest.approx(ref, abs=1e-9)
            assert float(d[i, j]) == pytest.approx(
                float(wasserstein2_states(s[i], s[j], kind=kind)), abs=1e-9
            )


# ------------------------------------------------------------------------------------------
# bound.py
# ------------------------------------------------------------------------------------------

DIAG_A = torch.diag(torch.tensor([1.0, 0.0]))
DIAG_B = torch.diag(torch.tensor([0.0, 1.0]))


def test_theorem21_counterexample():
    """SCIENCE.md §2: same spectrum, d_FS = 0, Eq. (2) gives 0, yet the outputs differ by 1."""
    assert float(fubini_study(spectral_state(DIAG_A), spectral_state(DIAG_B))) == 0.0
    assert float(theorem21_bound((DIAG_A, None), (DIAG_B, None))) == 0.0
    lin_a, lin_b = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        lin_a.weight.copy_(DIAG_A)
        lin_b.weight.copy_(DIAG_B)
        lin_a.bias.zero_()
        lin_b.bias.zero_()
    report = check_theorem21(lin_a, lin_b)
    assert report.bound == 0.0
    assert report.observed_max >= 0.99
    assert report.holds is False
    assert report.lipschitz_holds is True
    assert report.lipschitz_bound == pytest.approx(1.0)  # ‖A − B‖_op = 1
    assert report.n_samples == 4096


def test_lipschitz_bound_holds_on_random_pairs():
    gen = torch.Generator().manual_seed(9)
    for seed in range(6):
        a = (torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen))
        b = (torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen))
        for activation in (torch.relu, torch.tanh, lambda x: x):
            report = check_theorem21(
                a, b, activation=activation, radius=2.0, n_samples=512, seed=seed
            )
            assert report.lipschitz_holds
            assert report.observed_max <= report.lipschitz_bound + 1e-9
            assert report.observed_max > 0
    # identity activation, equal biases: the bound ‖ΔW‖_op·R is attained on the sphere
    w = torch.tensor([[3.0]])
    report = check_theorem21((w, None), (torch.zeros(1, 1), None), activation=lambda x: x)
    assert report.observed_max == pytest.approx(3.0)
    assert report.lipschitz_bound == pytest.approx(3.0)
    assert report.lipschitz_holds


def test_lipschitz_bound_value_and_shape_check():
    got = lipschitz_bound(
        (torch.eye(2), None), (torch.zeros(2, 2), torch.ones(2)), radius=2.0, lipschitz=0.5
    )
    assert float(got) == pytest.approx(0.5 * (1.0 * 2.0 + math.sqrt(2.0)))
    with pytest.raises(ValueError, match="same shape"):
        lipschitz_bound((torch.eye(2), None), (torch.eye(3), None))
    with pytest.raises(ValueError, match="radius"):
        lipschitz_bound((torch.eye(2), None), (torch.eye(2), None), radius=-1.0)


def test_theorem21_bound_formula():
    gen = torch.Generator().manual_seed(10)
    wa = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    ba = torch.zeros(4, dtype=torch.float64)
    wb, bb = 2 * wa, ba  # different Frobenius norms: the indicator is on
    lip, radius = 2.0, 0.5
    norm_a = torch.linalg.matrix_norm(augment(wa, ba))
    norm_b = torch.linalg.matrix_norm(augment(wb, bb))
    w2 = wasserstein2((wa, ba), (wb, bb))
    m_sup = lip * torch.linalg.matrix_norm(wb, ord=2) * radius
    expected = lip * (radius + 1) * (norm_a + norm_b) * w2 + 2 * m_sup
    got = theorem21_bound((wa, ba), (wb, bb), lipschitz=lip, radius=radius)
    assert float(got) == pytest.approx(float(expected), rel=1e-10)
    got_m = theorem21_bound((wa, ba), (wb, bb), lipschitz=lip, radius=radius, output_bound=7.0)
    assert float(got_m) == pytest.approx(float(expected - 2 * m_sup + 14.0), rel=1e-10)
    # equal norms: no indicator term; orthogonally rotated copy has W₂ = 0 too
    q = random_orthogonal(4, gen)
    assert float(theorem21_bound((wa, None), (q @ wa, None))) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------
# density.py
# ------------------------------------------------------------------------------------------


def test_density_matrix_properties():
    lin = nn.Linear(6, 4)
    rho = density_matrix(lin)
    assert rho.dtype == torch.float64 and rho.shape == (5, 5)
    assert float(torch.trace(rho)) == pytest.approx(1.0)
    assert torch.allclose(rho, rho.T)
    evals = torch.linalg.eigvalsh(rho).flip(0)
    psi = spectral_state(lin).double()
    assert torch.allclose(evals, psi**2, atol=1e-6)  # eigenvalues of ρ are ψ²
    g = torch.randn(7, 3, dtype=torch.float64)
    rho_g = density_matrix(g @ g.T, kind="gram")
    assert float(torch.trace(rho_g)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="trace"):
        density_matrix(torch.zeros(3, 3), kind="gram")
    with pytest.raises(ValueError, match="zero trace"):
        density_matrix(torch.zeros(3, 3), augment=False)
    with pytest.raises(ValueError, match="square"):
        density_matrix(torch.zeros(3, 2), kind="gram")


def test_relative_entropy_closed_form_vs_direct():
    gen = torch.Generator().manual_seed(11)
    rho = density_matrix(torch.randn(6, 6, generator=gen, dtype=torch.float64), augment=False)
    lam = torch.linalg.eigvalsh(rho).flip(0)
    for q in range(1, 7):
        rho_q = truncate_density(rho, q)
        assert float(torch.trace(rho_q)) == pytest.approx(1.0)
        assert int(torch.linalg.matrix_rank(rho_q)) == q
        direct = float(quantum_relative_entropy(rho_q, rho))
        closed = -math.log(float(lam[:q].sum()))
        assert direct == pytest.approx(closed, abs=1e-9)
    for delta in (0.0, 0.01, 0.1, 0.5, 2.0):
        q = relative_entropy_rank(rho, delta)
        assert float(quantum_relative_entropy(truncate_density(rho, q), rho)) <= delta + 1e-9
        if q > 1:
            assert float(quantum_relative_entropy(truncate_density(rho, q - 1), rho)) > delta
    assert relative_entropy_rank(rho, 0.0) == 6


def test_relative_entropy_support_and_basic_values():
    half = torch.diag(torch.tensor([0.5, 0.5], dtype=torch.float64))
    pure = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert float(quantum_relative_entropy(half, half)) == 0.0
    inf = quantum_relative_entropy(half, pure)
    assert isinstance(inf, torch.Tensor) and math.isinf(float(inf)) and float(inf) > 0
    assert float(quantum_relative_entropy(pure, half)) == pytest.approx(math.log(2.0))
    # classical case: KL divergence of the diagonals
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    kl = float((p * (p / q).log()).sum())
    got = quantum_relative_entropy(torch.diag(p), torch.diag(q))
    assert float(got) == pytest.approx(kl, abs=1e-6)
    with pytest.raises(ValueError, match="trace"):
        quantum_relative_entropy(2 * half, half)
    with pytest.raises(ValueError, match="q must be"):
        truncate_density(half, 3)


# ------------------------------------------------------------------------------------------
# embedding.py
# ------------------------------------------------------------------------------------------


def test_embedding_determinism_shape_and_seed():
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(12))
    e = random_feature_embedding(w)
    assert e.shape == (256,) and e.dtype == torch.float32
    assert torch.equal(e, random_feature_embedding(w.clone()))
    assert not torch.allclose(e, random_feature_embedding(w, seed=1))
    assert random_feature_embedding(w, dim=32).shape == (32,)
    # scale invariance (normalization) and JL-style norm preservation
    assert torch.allclose(e, random_feature_embedding(5 * w), atol=1e-6)
    assert 0.7 < float(e.norm()) < 1.3
    # zero padding does not change the embedding (projection rows are a shared prefix)
    padded = torch.cat([w.flatten(), torch.zeros(50_000)])
    assert torch.allclose(e, random_feature_embedding(padded), atol=1e-6)
    f = random_feature_embedding(w, kind="fourier", dim=64)
    assert f.shape == (64,) and float(f.abs().max()) <= math.sqrt(2 / 64) + 1e-7


def test_embedding_lists_modules_and_errors():
    lin = nn.Linear(4, 3)
    flat = torch.cat([lin.weight.detach().flatten(), lin.bias.detach()])
    assert torch.allclose(random_feature_embedding(lin), random_feature_embedding(flat))
    stacked = random_feature_embedding([lin, torch.ones(5), nn.Conv2d(2, 2, 3)], dim=16)
    assert stacked.shape == (3, 16)
    assert torch.allclose(stacked[1], random_feature_embedding(torch.ones(5), dim=16))
    assert random_feature_embedding(torch.ones(3, dtype=torch.float64)).dtype == torch.float64
    assert random_feature_embedding(torch.ones(3, dtype=torch.float16)).dtype == torch.float32
    with pytest.raises(ValueError, match="all zeros"):
        random_feature_embedding(torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        random_feature_embedding(torch.zeros(0))
    with pytest.raises(ValueError, match="x"):
        random_feature_embedding(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="kind"):
        random_feature_embedding(lin, kind="laplace")


def test_embedding_inner_products_roughly_preserved():
    gen = torch.Generator().manual_seed(13)
    a = torch.randn(1000, generator=gen)
    b = a + 0.5 * torch.randn(1000, generator=gen)
    cos = float(a @ b / (a.norm() * b.norm()))
    ea, eb = random_feature_embedding([a, b], dim=1024)
    assert float(ea @ eb) == pytest.approx(cos, abs=0.1)


# ------------------------------------------------------------------------------------------
# package-wide
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    ["states", "metrics", "wasserstein", "bound", "density", "embedding"],
)
def test_docstring_examples_run(module):
    mod = getattr(spectral, module)
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_every_public_function_has_example():
    assert spectral.__all__ == sorted(spectral.__all__)
    for name in spectral.__all__:
        obj = getattr(spectral, name)
        if callable(obj) and not isinstance(obj, type):
            assert "Example:" in (obj.__doc__ or ""), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_results_stay_on_device():
    dev = torch.device("cuda")
    w = torch.randn(6, 5, device=dev)
    b = torch.randn(6, device=dev)
    psi = spectral_state(w, b)
    assert psi.device.type == "cuda"
    assert torch.allclose(psi.cpu(), spectral_state(w.cpu(), b.cpu()), atol=1e-5)
    states = spectral_states(torch.randn(8, 4, 4, device=dev))
    d = pairwise_fubini_study(states)
    assert d.device.type == "cuda"
    assert torch.allclose(d.cpu(), pairwise_fubini_study(states.cpu()), atol=1e-5)
    assert fubini_study(states[0], states[1]).device.type == "cuda"
    assert wasserstein2(w, 2 * w).device.type == "cuda"
    assert pairwise_wasserstein2(states).device.type == "cuda"
    emb = random_feature_embedding(w)
    assert emb.device.type == "cuda"
    assert torch.allclose(emb.cpu(), random_feature_embedding(w.cpu()), atol=1e-5)
    rho = density_matrix(w)
    assert rho.device.type == "cuda"
    assert float(quantum_relative_entropy(rho, rho)) == pytest.approx(0.0, abs=1e-9)
    assert check_theorem21((w, None), (2 * w, None), n_samples=64).lipschitz_holds
