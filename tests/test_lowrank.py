"""Controllable kernel approximation (§3.2): rank rule, factorized layers, lowrank_compress."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from torch_qmprune import lowrank
from torch_qmprune.calibration import collect_input_grams
from torch_qmprune.lowrank import (
    factorize_layer,
    jensen_shannon_truncation,
    kept_mass_divergence,
    lowrank_compress,
    select_rank,
)
from torch_qmprune.spectral import (
    density_matrix,
    quantum_relative_entropy,
    relative_entropy_rank,
    truncate_density,
)


def _decaying(out: int, n_in: int, seed: int = 0, decay: float = 0.7) -> torch.Tensor:
    """A float64 matrix with singular values decaying geometrically (all clearly > 0)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    k = min(out, n_in)
    s = decay ** torch.arange(k, dtype=torch.float64)
    return (u[:, :k] * s) @ v[:, :k].T


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))


# ---------------------------------------------------------------------------------------------
# rank rule
# ---------------------------------------------------------------------------------------------


def test_closed_form_matches_direct_relative_entropy():
    w = _decaying(6, 9)
    rho = density_matrix(w, augment=False)
    curve = kept_mass_divergence(torch.linalg.eigvalsh(rho))
    for q in range(1, 7):
        direct = float(quantum_relative_entropy(truncate_density(rho, q), rho))
        assert curve[q - 1].item() == pytest.approx(direct, abs=1e-9)
    assert curve[-1].item() == pytest.approx(0.0, abs=1e-12)
    for delta in (0.0, 0.01, 0.05, 0.2, 0.6, 2.0):
        direct_q = next(q for q in range(1, 7) if float(
            quantum_relative_entropy(truncate_density(rho, q), rho)) <= delta + 1e-9)
        assert select_rank(w, delta) == direct_q == relative_entropy_rank(rho, delta)


def test_rank_monotone_in_delta_and_full_at_zero():
    w = _decaying(12, 20, seed=1, decay=0.8)
    deltas = [0.0, 1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    qs = [select_rank(w, d) for d in deltas]
    assert qs[0] == 12
    assert all(a >= b for a, b in zip(qs, qs[1:]))
    assert qs[-1] < qs[2]  # the sweep really moves
    conv = nn.Conv2d(4, 8, 3)
    assert select_rank(conv, 0.0) == 8


def test_reverse_form_infinite_below_rank():
    full = _decaying(5, 7)
    with pytest.raises(ValueError, match=r"\+inf"):
        select_rank(full, 0.1, reverse=True)
    low = _decaying(8, 3) @ _decaying(3, 8, seed=2)[:3]      # rank 3, 8 x 8
    assert select_rank(low, 0.1, reverse=True) == 3
    rho = density_matrix(low, augment=False)
    assert math.isinf(float(quantum_relative_entropy(rho, truncate_density(rho, 2))))
    assert float(quantum_relative_entropy(rho, truncate_density(rho, 3))) == pytest.approx(
        0.0, abs=1e-8)


def test_symmetric_form_is_quantum_jensen_shannon():
    w = _decaying(5, 5, seed=3, decay=0.6)
    rho = density_matrix(w, augment=False)
    js = jensen_shannon_truncation(torch.linalg.eigvalsh(rho))
    for q in range(1, 6):
        rq = truncate_density(rho, q)
        m = (rho + rq) / 2
        direct = 0.5 * float(quantum_relative_entropy(rho, m)) + 0.5 * float(
            quantum_relative_entropy(rq, m))
        assert js[q - 1].item() == pytest.approx(direct, abs=1e-9)
        assert js[q - 1].item() <= math.log(2) + 1e-12
    q = select_rank(w, 0.02, symmetric=True)
    assert js[q - 1] <= 0.02 and (q == 1 or js[q - 2] > 0.02)


def test_activation_basis_from_input_gram_equals_output_gram():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6).double()
    scale = torch.linspace(0.1, 2, 10, dtype=torch.float64)
    x = torch.randn(500, 10, dtype=torch.float64) * scale
    x = x + 0.5
    y = (x @ lin.weight.T).detach()
    yc = y - y.mean(0)
    out_gram = yc.T @ yc
    grams = collect_input_grams(nn.Sequential(lin), x)
    for delta in (0.001, 0.05, 0.3):
        a = select_rank(lin, delta, basis="activation", gram=out_gram)
        b = select_rank(lin, delta, basis="activation", gram=grams.grams[lin])
        c = select_rank(out_gram, delta, basis="activation")
        assert a == b == c
    with pytest.raises(ValueError, match="output Gram"):
        select_rank(lin, 0.1, basis="activation", gram=torch.eye(3))


def test_bad_delta_named():
    with pytest.raises(ValueError, match="delta"):
        select_rank(torch.eye(3), -0.1)
    with pytest.raises(TypeError, match="delta"):
        select_rank(torch.eye(3), True)


# ---------------------------------------------------------------------------------------------
# factorized layers
# ---------------------------------------------------------------------------------------------


def test_full_rank_factorization_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7).double()
    pair = factorize_layer(lin, rank=1.0)
    x = torch.randn(5, 12, dtype=torch.float64)
    assert pair[0].out_features == 7
    assert torch.allclose(pair(x), lin(x), atol=1e-12)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2).double()
    cpair = factorize_layer(conv, rank=8)
    xc = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    assert cpair[0].stride == (2, 2) and cpair[0].dilation == (2, 2) and cpair[1].kernel_size == (
        1, 1)
    assert torch.allclose(cpair(xc), conv(xc), atol=1e-12)


@pytest.mark.parametrize("q", [1, 3, 5])
def test_rank_q_error_is_tail_singular_mass(q):
    torch.manual_seed(q)
    conv = nn.Conv2d(4, 9, 3, padding=1).double()
    w = conv.weight.detach().reshape(9, -1)
    s = torch.linalg.svdvals(w)
    pair = factorize_layer(conv, rank=q)
    w_q = (pair[1].weight.reshape(9, q) @ pair[0].weight.reshape(q, -1)).detach()
    assert float((w - w_q).pow(2).sum()) == pytest.approx(float(s[q:].pow(2).sum()), rel=1e-9)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    expect = nn.functional.conv2d(x, w_q.reshape(conv.weight.shape), conv.bias, padding=1)
    assert torch.allclose(pair(x), expect, atol=1e-12)
    # δ-driven: the achieved relative error is sqrt(1 − e^{−δ_q}) <= sqrt(1 − e^{−δ})
    delta = 0.05
    pair_d = factorize_layer(conv, delta=delta)
    qd = pair_d[0].out_channels
    rel = float(s[qd:].pow(2).sum() / s.pow(2).sum())
    assert rel <= -math.expm1(-delta) + 1e-12 < float(s[qd - 1:].pow(2).sum() / s.pow(2).sum())


def test_activation_basis_error_on_calibration_data_is_output_gram_tail():
    torch.manual_seed(0)
    lin = nn.Linear(24, 16).double()
    scale = torch.linspace(0.05, 3, 24, dtype=torch.float64)
    x = torch.randn(400, 24, dtype=torch.float64) * scale + 1.0
    y = lin(x).detach()
    b = lin.bias.detach()
    yc = (y - b) - (y - b).mean(0)
    evals = torch.linalg.eigvalsh(yc.T @ yc).flip(0)
    net = nn.Sequential(lin)
    report = lowrank_compress(net, ranks=4, calibration=x, basis="activation")
    entry = report.layers["0"]
    assert entry.replaced and entry.rank == 4
    err = (net(x) - y).detach().pow(2).sum()
    assert float(err) == pytest.approx(float(evals[4:].sum()), rel=1e-8)
    assert entry.output_error == pytest.approx(math.sqrt(float(err / y.pow(2).sum())), rel=1e-6)
    assert entry.predicted_error == pytest.approx(math.sqrt(float(evals[4:].sum() / evals.sum())),
                                                  rel=1e-8)
    # it beats the weight-basis factorization of the same rank on the same data
    pair = factorize_layer(lin, rank=4)
    assert float((pair(x) - y).detach().pow(2).sum()) > float(err)


# ---------------------------------------------------------------------------------------------
# lowrank_compress on a model
# ---------------------------------------------------------------------------------------------


def test_compress_shapes_params_backward_and_save_load():
    model = _cnn()
    x = torch.randn(32, 3, 8, 8)
    y_before = model.eval()(x).detach()
    n_before = sum(p.numel() for p in model.parameters())
    report = lowrank_compress(model, 0.05, calibration=x)
    assert report.params_before == n_before
    assert report.params_after == sum(p.numel() for p in model.parameters()) < n_before
    assert report.macs_after < report.macs_before
    replaced = report.replaced
    assert "7" in replaced and isinstance(model[7], nn.Sequential)
    assert "0" not in replaced and "conv" in report.layers["0"].kind  # 3->32 3x3: cannot save
    for name in replaced:
        entry = report.layers[name]
        assert entry.delta <= 0.05 + 1e-9 and entry.params_after < entry.params_before
        assert entry.output_error is not None and entry.output_error < 0.5
    y = model(x).detach()
    assert y.shape == y_before.shape
    assert 0 < report.output_error < 1
    assert float((y - y_before).norm() / y_before.norm()) == pytest.approx(report.output_error,
                                                                           rel=1e-4)
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (32,)))
    loss.backward()
    assert model[7][0].weight.grad is not None and model[7][0].weight.grad.abs().sum() > 0
    model.eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.allclose(loaded(x), model(x))


def test_uniform_ranks_and_ignored_layers_and_bare_layer():
    model = _cnn()
    report = lowrank_compress(model, ranks=0.25, ignored_layers=[model[9]])
    assert report.layers["7"].rank == 24 and report.layers["3"].rank == 8
    assert report.layers["9"].reason == "ignored_layers" and isinstance(model[9], nn.Linear)
    lin = nn.Linear(64, 64)
    rep = lowrank_compress(lin, ranks=8)
    assert isinstance(rep.model, nn.Sequential) and rep.model[0].out_features == 8
    assert rep.model(torch.randn(2, 64)).shape == (2, 64)


def test_share_clusters_shares_one_basis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    model[2].load_state_dict(model[0].state_dict())
    with torch.no_grad():
        model[2].weight.mul_(1.5)
    report = lowrank_compress(model, ranks=16, share_clusters=True, ignored_layers=[model[4]])
    assert report.layers["0"].shared_with == ["2"]
    assert model[0][0] is model[2][0]
    n = sum(p.numel() for p in model.parameters())
    assert report.params_after == n == 16 * 64 + 2 * (64 * 16 + 64) + 650


def test_atomic_on_failure(monkeypatch):
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(lowrank, "_model_error", boom)
    with pytest.raises(RuntimeError, match="injected"):
        lowrank_compress(model, 0.05, calibration=torch.randn(16, 3, 8, 8))
    assert list(model.modules()) == modules
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_argument_errors():
    model = _cnn()
    with pytest.raises(ValueError, match="calibration"):
        lowrank_compress(model, 0.1, basis="activation")
    with pytest.raises(ValueError, match="ranks"):
        lowrank_compress(model, None)
    with pytest.raises(ValueError, match="min_params_saving"):
        lowrank_compress(model, 0.1, min_params_saving=1.5)
    with pytest.raises(ValueError, match="not a factorizable layer"):
        lowrank_compress(model, 0.1, ranks={"nope": 3})
