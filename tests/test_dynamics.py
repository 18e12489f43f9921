"""Tests of torch_qmprune.dynamics: spectral tracking of activations and the Lindblad predictor
(paper arXiv 2512.00880 §3.3, Eq. (7) with and without the anticommutator)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torch_qmprune.dynamics import (
    LindbladPredictor,
    SpectralTracker,
    bures_angle,
    channel_redundancy,
    forecast_channel_redundancy,
    lindblad_rhs,
    liouvillian,
    spectral_state_of_density,
    tracker_overhead,
)
from torch_qmprune.models import small_cnn
from torch_qmprune.spectral import fubini_study

C128 = torch.complex128
#: the tracker's exact setting: every call, every row, float64 sums
EXACT = dict(every=1, max_rows=None, product_dtype=torch.float64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: intra-op threads only add contention on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _conv_rows(y: torch.Tensor) -> torch.Tensor:
    return y.movedim(1, -1).reshape(-1, y.shape[1]).double()


def _random_system(d: int, n_jump: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, dtype=C128, generator=g)
    H = (a + a.conj().T) / 2 / math.sqrt(d)
    L = 0.3 * torch.randn(n_jump, d, d, dtype=C128, generator=g) / math.sqrt(d)
    b = torch.randn(d, d, dtype=C128, generator=g)
    rho0 = b @ b.conj().T
    return H, L, rho0 / torch.trace(rho0)


def _random_density(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d, rank or d, dtype=C128, generator=g)
    rho = b @ b.conj().T
    return rho / torch.trace(rho)


def _frob(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().pow(2).sum((-2, -1)).sqrt()


def _hook_snapshot(model: nn.Module) -> list:
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
             "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
             "_backward_pre_hooks")
    return [(name, attr, dict(getattr(m, attr)))
            for name, m in model.named_modules() for attr in attrs if hasattr(m, attr)]


# ---------------------------------------------------------------------------------------------
# SpectralTracker
# ---------------------------------------------------------------------------------------------


def test_tracker_windows_and_exact_gram() -> None:
    net = _net()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 2, 8, 8, generator=g) for _ in range(7)]
    with torch.no_grad(), SpectralTracker(net, window=3, **EXACT) as tr:
        for x in xs:
            net(x)
    assert tr.module_names == ["0", "3"]
    assert [len(tr.history[n]) for n in ("0", "3")] == [2, 2]  # 7 batches, window 3: 2 windows
    with torch.no_grad():
        conv_out = [_conv_rows(net[0](x)) for x in xs]
        lin_out = [net(x).double() for x in xs]
    for w in range(2):
        batch = slice(3 * w, 3 * w + 3)
        yc = torch.cat(conv_out[batch])
        yl = torch.cat(lin_out[batch])
        rc, rl = tr.history["0"][w], tr.history["3"][w]
        assert rc.samples == 3 * 3 * 36 and rl.samples == 9 and rc.batches == 3
        torch.testing.assert_close(rc.gram, yc.T @ yc, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(rl.gram, yl.T @ yl, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(rc.mean, yc.mean(0), rtol=1e-12, atol=1e-12)
        assert abs(float(torch.trace(rc.rho)) - 1) < 1e-12
        # ψ = sqrt(λ(ρ)) is the normalized singular-value spectrum of the activation matrix
        s = torch.linalg.svdvals(yc)
        torch.testing.assert_close(rc.state, s / s.norm(), rtol=1e-9, atol=1e-9)
        # redundancy = 1 / ([G⁻¹]_ii G_ii)
        G = yc.T @ yc
        expected = 1 / (torch.linalg.inv(G).diagonal() * G.diagonal())
        torch.testing.assert_close(rc.redundancy, expected, rtol=1e-8, atol=1e-10)
    # distances: FS of spectral states, reference = first window
    r0, r1 = tr.history["0"]
    assert r0.d_fs_prev is None and r0.d_fs_ref == 0.0
    assert r1.d_fs_prev == pytest.approx(float(fubini_study(r1.state, r0.state)), abs=1e-12)
    assert r1.d_fs_ref == pytest.approx(r1.d_fs_prev, abs=1e-12)
    assert r1.bures_ref == pytest.approx(bures_angle(r1.rho, r0.rho), abs=1e-12)
    traj = tr.trajectory("0")
    assert traj.shape == (2, 4, 4) and traj.dtype == torch.float64
    dist = tr.distances("3")
    assert math.isnan(float(dist["prev"][0])) and float(dist["ref"][0]) == 0.0
    # the 7th batch is pending until flushed
    rec = tr.flush()
    assert rec["0"].batches == 1 and len(tr.history["0"]) == 3
    torch.testing.assert_close(rec["0"].gram, conv_out[6].T @ conv_out[6], rtol=1e-12, atol=1e-10)


def test_tracker_every_and_reference_none() -> None:
    net = nn.Sequential(nn.Linear(3, 4))
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(5, 3, generator=g) for _ in range(8)]
    exact = dict(EXACT, every=2)
    with SpectralTracker(net, window=4, reference=None, **exact) as tr:
        for x in xs:
            net(x)
    recs = tr.history["0"]
    # a window is 4 calls; every=2 processes calls 0 and 2 of each window
    assert len(recs) == 2 and all(r.batches == 2 and r.calls == 4 for r in recs)
    with torch.no_grad():
        ys = [net(x).double() for x in xs]
    for rec, used in zip(recs, (torch.cat([ys[0], ys[2]]), torch.cat([ys[4], ys[6]]))):
        torch.testing.assert_close(rec.gram, used.T @ used, rtol=1e-12, atol=1e-12)
        assert rec.samples == rec.rows == 10
    assert recs[1].d_fs_ref is None and recs[1].d_fs_prev is not None
    with SpectralTracker(net, window=4, **dict(exact, product_dtype=torch.float32)) as tr32:
        for x in xs:
            net(x)
    assert tr32.history["0"][0].gram.dtype == torch.float64
    torch.testing.assert_close(tr32.history["0"][0].gram, recs[0].gram, rtol=1e-5, atol=1e-5)
    # every > window: only the first call of each window is processed
    with SpectralTracker(net, window=3, every=5, max_rows=None) as tr5:
        for x in xs:
            net(x)
    assert [(r.calls, r.batches) for r in tr5.history["0"]] == [(3, 1), (3, 1)]
    assert tr5.flush()["0"].calls == 2


def test_tracker_detects_drift() -> None:
    net = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
    g = torch.Generator().manual_seed(3)
    with SpectralTracker(net, window=2) as tr:
        for t in range(10):
            x = torch.randn(256, 4, generator=g)
            x[:, 0] *= 1 + 0.5 * (t // 2)  # channel 0 grows window by window
            net(x)
    d = tr.distances("0")["ref"]
    assert d.shape == (5,) and float(d[0]) == 0.0
    assert bool((d[1:] > d[:-1]).all()) and float(d[-1]) > 0.3


def test_remove_restores_model_exactly() -> None:
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.randn(4, 1, 28, 28)
    hooks = _hook_snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    tr = SpectralTracker(model, window=1)
    assert tr.module_names == ["features.0", "features.4", "features.8", "classifier.1",
                               "classifier.3"]
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # hooks don't touch outputs
    model.train()
    loss = model(x).square().mean()  # with autograd and in train mode
    loss.backward()
    model.eval()
    assert len(tr.history["features.4"]) == 2
    tr.remove()
    assert not tr.active
    assert _hook_snapshot(model) == hooks
    for k, v in model.state_dict().items():
        if "running" in k or "num_batches" in k:  # the train-mode forward updated BN stats
            continue
        assert torch.equal(v, state[k]), k
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert set(model.state_dict()) == set(state)


def test_tracker_does_not_change_gradients() -> None:
    net = _net()
    x = torch.randn(3, 2, 8, 8)
    net(x).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with SpectralTracker(net, window=1):
        net(x).sum().backward()
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_tracker_under_torch_compile() -> None:
    net = _net()
    xs = [torch.randn(3, 2, 8, 8) for _ in range(4)]
    with SpectralTracker(net, window=2) as eager:
        for x in xs:
            net(x)
    compiled = torch.compile(net, backend="eager")
    with torch.no_grad(), SpectralTracker(compiled, window=2) as tr:
        outs = [compiled(x) for x in xs]
    assert tr.compiled and tr.module_names == ["0", "3"]
    for name in tr.module_names:
        assert len(tr.history[name]) == 2
        for a, b in zip(tr.history[name], eager.history[name]):
            torch.testing.assert_close(a.gram, b.gram, rtol=1e-12, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], net(xs[0]))
    assert dict(net._forward_hooks) == {} and dict(net[0]._forward_hooks) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tracker_cuda() -> None:
    net = _net().cuda()
    xs = [torch.randn(3, 2, 8, 8, device="cuda") for _ in range(4)]
    with torch.no_grad(), SpectralTracker(net, window=2, **EXACT) as tr:
        for x in xs:
            net(x)
    rec = tr.history["0"][0]
    assert not rec.gram.is_cuda and rec.gram.dtype == torch.float64  # records live on the CPU
    with torch.no_grad():
        y = torch.cat([_conv_rows(net[0](x)) for x in xs[:2]])
    torch.testing.assert_close(rec.gram, (y.T @ y).cpu(), rtol=1e-9, atol=1e-7)
    with SpectralTracker(net, window=2, device="cpu", **EXACT) as tr_cpu, torch.no_grad():
        for x in xs:
            net(x)
    torch.testing.assert_close(tr_cpu.history["0"][0].gram, rec.gram, rtol=1e-9, atol=1e-7)
    assert tr.history["0"][1].d_fs_ref == pytest.approx(tr_cpu.history["0"][1].d_fs_ref, abs=1e-9)
    # defaults on CUDA: rows subsampled on the device, float32, asynchronous hand-over
    big = [torch.randn(16, 2, 24, 24, device="cuda") for _ in range(8)]
    with torch.no_grad(), SpectralTracker(net, window=4, max_rows=256) as fast:
        for x in big:
            net(x)
    rec = fast.history["0"][1]
    assert rec.batches == 2 and rec.rows == 512 and rec.samples == 2 * 16 * 22 * 22
    assert not rec.rho.is_cuda and abs(float(rec.rho.trace()) - 1) < 1e-9
    assert rec.d_fs_ref is not None and math.isfinite(rec.d_fs_ref)


def test_tracker_validation_and_overhead() -> None:
    net = _net()
    with pytest.raises(ValueError):
        SpectralTracker(net, window=0)
    with pytest.raises(ValueError):
        SpectralTracker(net, reference="last")
    with pytest.raises(KeyError):
        SpectralTracker(net, modules=["nope"])
    with SpectralTracker(net, modules=["3"]) as tr:
        with pytest.raises(ValueError, match="no complete window"):
            tr.trajectory("3")
        with pytest.raises(KeyError):
            tr.trajectory("0")
    ratio = tracker_overhead(net, torch.randn(8, 2, 8, 8), iters=2)
    assert math.isfinite(ratio) and ratio > 0
    assert dict(net[0]._forward_hooks) == {}


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Real-ish inputs: low-frequency random images (7×7 noise upsampled to 28×28)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 7, 7, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear",
                                           align_corners=False)


def test_subsampled_gram_is_close_and_unbiased() -> None:
    torch.manual_seed(0)
    model = small_cnn().eval()
    xs = [_smooth_images(16, seed) for seed in range(4)]  # features.4: 16·14·14 = 3136 rows
    layer = "features.4"

    def run(**kw) -> SpectralTracker:
        with torch.no_grad(), SpectralTracker(model, [layer], window=4,
                                              **dict(EXACT, **kw)) as tr:
            for x in xs:
                model(x)
        return tr

    exact = run().history[layer][0]
    sub = run(max_rows=512).history[layer][0]
    assert exact.rows == exact.samples == 4 * 3136
    assert sub.samples == exact.samples and sub.rows == 4 * 512
    rel = float((sub.rho - exact.rho).norm() / exact.rho.norm())
    assert rel < 0.1
    assert float(fubini_study(sub.state, exact.state)) < 0.05
    assert bures_angle(sub.rho, exact.rho) < 0.15
    # unbiased up to sampling noise: the scaled estimate averages to the full Gram
    grams = torch.stack([run(max_rows=512, seed=s).history[layer][0].gram for s in range(24)])
    err_one = float((grams[0] - exact.gram).norm() / exact.gram.norm())
    err_mean = float((grams.mean(0) - exact.gram).norm() / exact.gram.norm())
    assert err_mean < 0.4 * err_one and err_mean < 0.03
    # the default (float32, every=4, 512 rows) is the same estimator on every fourth call
    default = SpectralTracker(model, [layer], window=8)
    with torch.no_grad():
        for x in xs + xs:
            model(x)
    default.remove()
    rec = default.history[layer][0]
    assert rec.batches == 2 and rec.rows == 1024 and rec.samples == 2 * 3136
    assert rec.gram.dtype == torch.float64 and rec.calls == 8


def test_records_are_lazy_and_match_eager() -> None:
    net = _net()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 2, 8, 8, generator=g) * (1 + 0.3 * i) for i in range(6)]
    trackers = {}
    for eager in (False, True):
        with torch.no_grad(), SpectralTracker(net, window=2, eager=eager, **EXACT) as tr:
            for x in xs:
                net(x)
        trackers[eager] = tr
    lazy_rec = trackers[False].history["0"][2]
    assert "_eigh" not in lazy_rec.__dict__ and "state" not in lazy_rec.__dict__  # not computed
    assert "redundancy" in trackers[True].history["0"][2].__dict__
    for a, b in zip(trackers[False].history["0"], trackers[True].history["0"]):
        for attr in ("d_fs_prev", "d_fs_ref", "bures_prev", "bures_ref"):
            va, vb = getattr(a, attr), getattr(b, attr)
            assert (va is None and vb is None) or va == pytest.approx(vb, abs=1e-12)
        torch.testing.assert_close(a.redundancy, b.redundancy, rtol=0, atol=1e-12)
        # eigvalsh (lazy, ψ only) vs eigh (eager): equal up to round-off
        torch.testing.assert_close(a.state, b.state, rtol=0, atol=1e-12)
    d = trackers[False].distances("0", bures=False)
    assert set(d) == {"prev", "ref"} and d["ref"].shape == (3,)
    assert lazy_rec.reference is trackers[False].history["0"][0]
    assert lazy_rec.previous is trackers[False].history["0"][1]


def test_remove_leaves_rng_and_outputs_untouched_at_defaults() -> None:
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = _smooth_images(8, 3)  # 6,272 rows at features.0: subsampled by default
    hooks = _hook_snapshot(model)
    with torch.no_grad():
        expected = model(x)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    with torch.no_grad(), SpectralTracker(model, window=1) as tr:
        out = model(x)
    assert torch.equal(torch.get_rng_state(), rng)  # row sampling uses its own generator
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert tr.history["features.0"][0].rows == 512
    assert not tr.active and _hook_snapshot(model) == hooks


def test_tracked_importance_prunes_lowest_scores() -> None:
    import torch_pruning as tp

    from torch_qmprune.dynamics import TrackedImportance

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 3))
    original = net[0].weight.detach().clone()
    scores = torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 0.3])
    pruner = tp.pruner.BasePruner(net, torch.randn(1, 2, 8, 8),
                                  importance=TrackedImportance({net[0]: scores}),
                                  pruning_ratio=0.5, ignored_layers=[net[3]])
    pruner.step()
    assert net[0].out_channels == 3 and net[1].num_features == 3 and net[3].in_channels == 3
    torch.testing.assert_close(net[0].weight, original[[0, 2, 4]], rtol=0, atol=0)
    # a group without scores is left alone unless a fallback is given
    imp = TrackedImportance({})
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 2, 8, 8))
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=[0, 1, 2])
    assert imp(group) is None
    assert TrackedImportance({}, fallback=tp.importance.MagnitudeImportance())(group).shape == (3,)


def test_forecast_density_matrix_and_residual_energy() -> None:
    from torch_qmprune.dynamics import channel_residual_energy, forecast_density_matrix

    g = torch.Generator().manual_seed(6)
    x = torch.randn(400, 4, dtype=torch.float64, generator=g)
    x[:, 3] = x[:, 0] + 0.2 * x[:, 3]
    rho = x.T @ x / (x.T @ x).trace()
    expected = 1 / torch.linalg.inv(rho).diagonal()
    torch.testing.assert_close(channel_residual_energy(rho), expected, rtol=1e-9, atol=1e-12)
    # a trajectory whose mass moves linearly from channel 0 to channel 1
    traj = torch.stack([torch.diag(torch.tensor([0.6 - 0.04 * t, 0.2 + 0.04 * t, 0.1, 0.1],
                                                dtype=torch.float64)) for t in range(8)])
    fc = forecast_density_matrix(traj, 2, rank=4, objective="one_step", steps=200)
    assert fc.shape == (4, 4) and abs(float(fc.trace()) - 1) < 1e-9
    assert float(torch.linalg.eigvalsh(fc).min()) >= -1e-12
    assert float(fc[1, 1]) > float(traj[-1][1, 1]) and float(fc[0, 0]) < float(traj[-1][0, 0])
    with pytest.raises(ValueError):
        forecast_density_matrix(traj[:1], 1)


def test_channel_redundancy_is_sin_squared_of_fs_angle() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 4, dtype=torch.float64, generator=g)
    x[:, 3] = x[:, 0] + 0.1 * x[:, 3]
    score = channel_redundancy(x.T @ x)
    for i in range(4):  # sin² of the angle between column i and the span of the others
        others = torch.cat([x[:, :i], x[:, i + 1:]], dim=1)
        proj = others @ torch.linalg.lstsq(others, x[:, i:i + 1]).solution
        sin2 = (x[:, i:i + 1] - proj).square().sum() / x[:, i].square().sum()
        assert float(score[i]) == pytest.approx(float(sin2), rel=1e-8)
    assert float(score[3]) < 0.02 and float(score[1]) > 0.8
    dead = torch.zeros(3, 3, dtype=torch.float64)
    dead[0, 0] = dead[1, 1] = 1.0
    assert channel_redundancy(dead).tolist() == [1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Lindblad dynamics
# ---------------------------------------------------------------------------------------------


def test_liouvillian_matches_matrix_form() -> None:
    H, L, _ = _random_system(3, 2, seed=5)
    rho = _random_density(3, seed=6)
    for anti in (True, False):
        lhs = (liouvillian(H, L, anticommutator=anti) @ rho.reshape(-1)).reshape(3, 3)
        torch.testing.assert_close(lhs, lindblad_rhs(rho, H, L, anticommutator=anti),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("integrator", ["expm", "rk4"])
@pytest.mark.parametrize("time_dependent", [False, "linear", "ramp"])
def test_lindblad_keeps_trace_and_positivity(integrator: str, time_dependent: str | bool) -> None:
    H, L, _ = _random_system(4, 2, seed=7)
    H1 = _random_system(4, 1, seed=8)[0] * 0.2 if time_dependent == "linear" else None
    M = _random_system(4, 2, seed=17)[1] if time_dependent == "ramp" else None
    model = LindbladPredictor.from_operators(H, 3 * L, H1, M, integrator=integrator, dt=0.05)
    assert model.time_dependent == time_dependent
    for seed, rank in ((9, None), (10, 1)):  # full rank and pure initial states
        rho0 = _random_density(4, seed, rank)
        traj = model.predict(rho0, 20, step=0.5)
        trace = torch.diagonal(traj, dim1=-2, dim2=-1).sum(-1)
        assert float((trace - 1).abs().max()) < 1e-8
        torch.testing.assert_close(traj, traj.conj().transpose(-2, -1), rtol=0, atol=1e-10)
        assert float(torch.linalg.eigvalsh(traj).min()) >= -1e-8
        assert float(_frob(traj[-1], rho0)) > 0.1  # it did move


def test_expm_and_rk4_agree() -> None:
    H, L, rho0 = _random_system(3, 2, seed=11)
    H1 = 0.3 * _random_system(3, 1, seed=12)[0]
    for h1 in (None, H1):
        a = LindbladPredictor.from_operators(H, L, h1, integrator="expm", dt=0.01)
        b = LindbladPredictor.from_operators(H, L, h1, integrator="rk4", dt=0.05)
        torch.testing.assert_close(a.predict(rho0, 6, t0=1.0), b.predict(rho0, 6, t0=1.0),
                                   rtol=0, atol=1e-5)


def test_paper_form_without_anticommutator_breaks_the_trace() -> None:
    H, L, rho0 = _random_system(3, 2, seed=13)
    paper = torch.linalg.matrix_exp(liouvillian(H, L, anticommutator=False))
    full = torch.linalg.matrix_exp(liouvillian(H, L))
    v = rho0.reshape(-1)
    tr_paper = torch.trace((paper @ v).reshape(3, 3)).real
    tr_full = torch.trace((full @ v).reshape(3, 3)).real
    assert abs(float(tr_full) - 1) < 1e-12
    assert float(tr_paper) - 1 > 0.05  # d tr ρ / dt = Σ tr(L†L ρ) > 0
    rate = torch.trace(lindblad_rhs(rho0, H, L, anticommutator=False)).real
    expected = sum(torch.trace(Lk.conj().T @ Lk @ rho0).real for Lk in L)
    assert float(rate) == pytest.approx(float(expected), rel=1e-10) and float(rate) > 0


def _synthetic(seed: int, windows: int = 20) -> tuple[torch.Tensor, LindbladPredictor]:
    H, L, rho0 = _random_system(3, 2, seed)
    truth = LindbladPredictor.from_operators(H, L)
    traj = torch.cat([rho0[None], truth.predict(rho0, windows - 1, step=0.5)])
    return traj, truth


def test_predictor_recovers_known_lindblad_system() -> None:
    traj, _ = _synthetic(seed=1)
    times = 0.5 * torch.arange(12)
    model = LindbladPredictor(3, n_jump=2, objective="one_step").fit(traj[:12], times)
    assert model.fit_loss < 1e-8
    pred = model.predict(traj[11], 8)
    err = _frob(pred, traj[12:])
    last = _frob(traj[11].expand(8, 3, 3), traj[12:])
    for h in (1, 4, 8):
        assert float(err[h - 1]) < 1e-3, (h, err)
        assert float(err[h - 1]) < float(last[h - 1]) / 50  # far better than "last value"
    # forecast_distance: d_FS of future spectral states to the reference window
    fd = model.forecast_distance(traj[:12], 8, reference=traj[0])
    psi0 = spectral_state_of_density(traj[0])
    true_d = torch.stack([fubini_study(spectral_state_of_density(r), psi0) for r in traj[12:]])
    assert float((fd - true_d).abs().max()) < 1e-3


def test_predictor_rollout_objective_beats_last_value() -> None:
    traj, _ = _synthetic(seed=2)
    model = LindbladPredictor(3, n_jump=2, objective="rollout", seed=1).fit(traj[:12],
                                                                            0.5 * torch.arange(12))
    pred = model.predict(traj[11], 8)
    err = _frob(pred, traj[12:])
    last = _frob(traj[11].expand(8, 3, 3), traj[12:])
    assert float(err.mean()) < float(last.mean()) / 5
    assert bool((err < last).all())


def test_predictor_reduced_basis_and_lift() -> None:
    # a 3-level system embedded in 6 dimensions plus a fixed orthogonal block: the reduced
    # predictor must evolve the 3-dim block and hold the rest
    traj3, _ = _synthetic(seed=1, windows=14)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(0)))
    V = q[:, :3].to(C128)
    W = q[:, 3:].to(C128)
    rest = torch.diag(torch.tensor([0.05, 0.03, 0.02], dtype=C128))  # below the block's spectrum
    full = 0.9 * V @ traj3 @ V.conj().T + W @ rest @ W.conj().T
    model = LindbladPredictor(3, n_jump=2, objective="one_step").fit(full[:10],
                                                                     0.5 * torch.arange(10))
    assert model.basis is not None and model.basis.shape == (6, 3)
    pred = model.predict(full[9], 4)
    assert pred.shape == (4, 6, 6)
    assert float((torch.diagonal(pred, dim1=-2, dim2=-1).sum(-1) - 1).abs().max()) < 1e-10
    assert float(_frob(pred, full[10:]).max()) < 1e-3
    assert float(_frob(pred, full[9].expand(4, 6, 6)).min()) > 1e-2


def test_time_dependent_predictor_fits_linear_hamiltonian() -> None:
    H, L, rho0 = _random_system(3, 1, seed=14)
    H1 = 0.2 * _random_system(3, 1, seed=15)[0]
    truth = LindbladPredictor.from_operators(H, L, H1, dt=0.5)  # one midpoint step per window
    traj = torch.cat([rho0[None], truth.predict(rho0, 15, step=0.5)])
    times = 0.5 * torch.arange(12)
    kw = dict(n_jump=1, objective="one_step", dt=0.5, steps=200, polish_steps=150)
    static = LindbladPredictor(3, **kw).fit(traj[:12], times)
    linear = LindbladPredictor(3, time_dependent="linear", **kw).fit(traj[:12], times)
    assert linear.fit_loss < static.fit_loss / 10
    err = _frob(linear.predict(traj[11], 4, t0=5.5), traj[12:])
    assert float(err.max()) < 2e-2


def _ramp_truth() -> tuple[torch.Tensor, LindbladPredictor]:
    # relaxation towards level 0 at a rate that grows with t (a corruption ramping up): the
    # population of level 0 follows 1 − c·exp(−γ t²/2), slow at first, then saturating, which
    # a single constant relaxation channel (an exponential, fastest at t = 0) cannot follow
    M = torch.zeros(2, 3, 3, dtype=C128)
    M[0, 0, 1] = M[1, 0, 2] = 0.35  # |0⟩⟨1|, |0⟩⟨2|
    truth = LindbladPredictor.from_operators(torch.zeros(3, 3), 0.1 * M, ramp_jumps=M, dt=0.5)
    rho0 = torch.diag(torch.tensor([0.2, 0.5, 0.3], dtype=C128))
    return torch.cat([rho0[None], truth.predict(rho0, 15, step=0.5)]), truth


def test_ramp_predictor_forecasts_a_ramping_dissipation() -> None:
    traj, truth = _ramp_truth()
    assert truth.time_dependent == "ramp" and truth.ramp_jump_operators.shape == (2, 3, 3)
    gain = traj[1:, 0, 0].real - traj[:-1, 0, 0].real
    assert float(gain[3]) > 1.5 * float(gain[0])  # the simulated system speeds up
    times = 0.5 * torch.arange(10)
    kw = dict(n_jump=2, objective="rollout", dt=0.5, steps=300, polish_steps=200)
    static = LindbladPredictor(3, **kw).fit(traj[:10], times)
    ramp = LindbladPredictor(3, time_dependent="ramp", **kw).fit(traj[:10], times)
    assert ramp.fit_loss < static.fit_loss / 100
    psi0 = spectral_state_of_density(traj[0])
    true_d = torch.stack([fubini_study(spectral_state_of_density(r), psi0) for r in traj[10:]])
    err = {name: (m.forecast_distance(traj[:10], 6, reference=traj[0]) - true_d).abs().max()
           for name, m in (("static", static), ("ramp", ramp))}
    assert float(err["ramp"]) < 1e-2 and float(err["ramp"]) < float(err["static"]) / 10, err
    # predict() continues the fitted time axis by default (t0 = the last fitted window's time)
    torch.testing.assert_close(ramp.predict(traj[9], 3), ramp.predict(traj[9], 3, t0=4.5))
    # the ramp's generator is the constant one with the M_k scaled by sqrt(t)
    t = 2.0
    jumps = torch.cat([ramp.jump_operators, math.sqrt(t) * ramp.ramp_jump_operators])
    expected = liouvillian(ramp.hamiltonian(t), jumps)
    torch.testing.assert_close(ramp.liouvillian(t), expected, rtol=0, atol=1e-12)
    assert static.ramp_jump_operators is None


def test_ramp_predictor_refuses_negative_times_and_bad_operators() -> None:
    traj, truth = _ramp_truth()
    model = LindbladPredictor(3, time_dependent="ramp", steps=2, polish_steps=0)
    with pytest.raises(ValueError, match="times >= 0"):
        model.fit(traj[:4], torch.arange(4.0) - 1)
    with pytest.raises(ValueError, match="t0 >= 0"):
        truth.predict(traj[0], 2, t0=-1.0)
    with pytest.raises(ValueError, match="ramp_jumps must have the shape"):
        LindbladPredictor.from_operators(torch.zeros(3, 3), torch.zeros(2, 3, 3),
                                         ramp_jumps=torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="not both"):
        LindbladPredictor.from_operators(torch.zeros(3, 3), torch.zeros(2, 3, 3),
                                         torch.eye(3), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="'ramp'"):
        LindbladPredictor(3, time_dependent="quadratic")
    with pytest.raises(ValueError, match="n_jump >= 1"):
        LindbladPredictor(3, n_jump=0, time_dependent="ramp")
    with pytest.raises(ValueError, match="step must be"):
        truth.predict(traj[0], 2, step=-0.5)
    real = LindbladPredictor(3, time_dependent="ramp", real=True, steps=2, polish_steps=0)
    assert set(real.params) == {"h0_im", "l_re", "m_re"}
    assert real.ramp_jump_operators.shape == (2, 3, 3)


def test_forecast_channel_redundancy_follows_a_trend() -> None:
    # channel 2 becomes a copy of channel 0 window by window: its redundancy score falls
    net = nn.Sequential(nn.Identity())
    g = torch.Generator().manual_seed(16)
    with SpectralTracker(net, modules=[net[0]], window=1, **EXACT) as tr:
        for t in range(10):
            x = torch.randn(2000, 4, generator=g, dtype=torch.float64)
            x[:, 2] = x[:, 0] + (1.0 - 0.08 * t) * x[:, 2]
            net(x)
    observed = tr.redundancy("0")[:, 2]
    assert bool((observed[1:] < observed[:-1]).all())
    fc = forecast_channel_redundancy(tr, "0", horizon=3, rank=4, objective="one_step")
    assert fc.shape == (4,) and bool(((fc >= 0) & (fc <= 1)).all())
    last = tr.redundancy("0")[-1]
    # the trend continues for channels 2 and 0 (each is the other's near copy); 1 and 3 stay
    assert float(fc[2]) < float(last[2]) and float(fc[0]) < float(last[0])
    assert float(fc[2]) < 0.9 * float(last[2])  # a real move, not round-off
    assert float(fc[1]) > 0.9 and float(fc[3]) > 0.9
