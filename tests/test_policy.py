"""Quantum policy gate (paper §4): unitarity, budget conditioning, natural vs plain policy
gradient, Fisher–Rao checks, dual ascent, budget-exact allocation, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_qmprune.models import small_cnn
from torch_qmprune.policy import (
    PolicyProblem,
    QuantumPolicyGate,
    ResourceModel,
    build_policy_problem,
    lagrangian_gradient,
    measure_resource,
    policy_allocation,
    ratio_for_keep,
    train_policy,
)
from torch_qmprune.structural import count_params_and_macs, prune


@pytest.mark.parametrize("depth", [1, 3])
def test_gate_is_unitary_and_born_probabilities_are_normalized(depth):
    gate = QuantumPolicyGate(3, 5, depth=depth, seed=1, init_noise=0.7)
    for budget in (0.1, 0.5, 0.9):
        u = gate.unitaries(budget)
        eye = torch.eye(5, dtype=u.dtype).expand(3, -1, -1)
        assert torch.allclose(u.transpose(1, 2) @ u, eye, atol=1e-12)
        psi = gate.amplitudes(budget)
        assert torch.allclose(psi, u[:, :, 0], atol=1e-12)          # ψ = U|0⟩
        assert torch.allclose(psi.norm(dim=1), torch.ones(3, dtype=psi.dtype), atol=1e-12)
        p = gate.probabilities(budget)
        assert bool((p >= 0).all())
        assert torch.allclose(p.sum(1), torch.ones(3, dtype=p.dtype), atol=1e-12)
        joint = gate.joint_state(budget)
        assert joint.numel() == 5 ** 3
        assert abs(float(joint.detach().norm()) - 1.0) < 1e-12


def test_uniform_init_is_the_uniform_superposition():
    gate = QuantumPolicyGate(2, 8, init_noise=0.0)
    p = gate.probabilities(0.3)
    assert torch.allclose(p, torch.full_like(p, 1 / 8), atol=1e-12)
    assert gate.n_qubits == 3
    assert torch.allclose(gate.keep_ratios(0.3), torch.full((2,), 4.5 / 8, dtype=p.dtype))


def test_budget_token_conditions_the_distribution():
    gate = QuantumPolicyGate(2, 4, seed=0, init_noise=0.5)
    diff = (gate.probabilities(0.1) - gate.probabilities(0.9)).abs().max()
    assert float(diff.detach()) > 0.05
    flat = QuantumPolicyGate(2, 4, seed=0, init_noise=0.5, budget_embedding="none")
    assert torch.allclose(flat.probabilities(0.1), flat.probabilities(0.9))


def _two_budget_toy():
    """3 layers × 4 levels, R = mean keep, fixed λ₁: the cheapest level depends on the budget."""
    acc = torch.tensor([[2.0, 0.9, 0.3, 0.0], [1.5, 0.5, 0.2, 0.0], [1.0, 0.8, 0.4, 0.0]])
    prob = PolicyProblem.from_tables(acc, resource=ResourceModel(torch.ones(3), torch.eye(3)))
    budgets, lam = (0.25, 0.75), 1.0
    best = {}
    for b in budgets:
        a_ref, _ = prob.reference(b)
        best[b] = (prob.accuracy / a_ref + lam * prob.values / (3 * b)).argmin(1)
    return prob, budgets, lam, best


def test_natural_gradient_reaches_the_known_optimum_in_fewer_steps_than_plain():
    prob, budgets, lam, best = _two_budget_toy()
    assert not torch.equal(best[0.25], best[0.75])    # the optimum really depends on b
    rows = torch.arange(3)

    def reached(gate):
        return all(bool((gate.probabilities(b)[rows, best[b]] >= 0.9).all()) for b in budgets)

    steps = {}
    for natural in (True, False):
        gate = QuantumPolicyGate(3, 4, seed=0)
        assert not reached(gate)
        out = train_policy(gate, prob, budgets, steps=300, lr=1.0, natural=natural,
                           estimator="exact", dual_lr=0.0, penalty=0.0,
                           lambdas={b: [lam, 0.0] for b in budgets}, until=reached)
        assert reached(gate), f"natural={natural} did not reach the optimum in 300 steps"
        steps[natural] = out.steps
    # the budget weights w enter as w·τ with |τ| = 1/4: the metric rescales them, plain does not
    assert steps[True] <= steps[False]
    assert steps[True] < 30


def test_fisher_is_psd_and_matches_born_finite_differences_and_closed_form():
    gate = QuantumPolicyGate(2, 3, depth=2, seed=3, init_noise=0.4)
    b = 0.8
    fq = gate.fisher(b, "quantum")
    fb = gate.fisher(b, "born")
    assert torch.allclose(fq, fb, atol=1e-9)
    assert float(torch.linalg.eigvalsh(fq).min()) > -1e-10
    jac_a = gate.amplitude_jacobian(b, "analytic")
    jac_g = gate.amplitude_jacobian(b, "autograd")
    assert torch.allclose(jac_a, jac_g, atol=1e-12)
    # finite differences of the Born probabilities: F = Σ_k ∂p_k ∂p_kᵀ / p_k
    flat = gate.flat_parameters().detach()
    h = 1e-6
    n_params = flat.shape[1]
    dp = torch.zeros(2, 3, n_params, dtype=torch.float64)
    for i in range(n_params):
        e = torch.zeros_like(flat)
        e[:, i] = h
        plus = gate._amplitudes_from(flat + e, b) ** 2
        minus = gate._amplitudes_from(flat - e, b) ** 2
        dp[:, :, i] = (plus - minus) / (2 * h)
    p = gate.probabilities(b).detach()
    f_fd = torch.einsum("lk,lki,lkj->lij", 1 / p, dp, dp)
    assert torch.allclose(fq, f_fd, atol=1e-6)
    # one rotation with a budget weight: p = (cos²φ, sin²φ), φ = θ + wτ ⇒ F = 4 [[1, τ], [τ, τ²]]
    one = QuantumPolicyGate(1, 2, depth=1, seed=0, init_noise=0.3)
    tau = one.token(0.9)
    expect = 4 * torch.tensor([[1.0, tau], [tau, tau * tau]], dtype=torch.float64)
    assert torch.allclose(one.fisher(0.9)[0], expect, atol=1e-12)


def test_score_function_gradient_is_unbiased():
    acc = torch.tensor([[1.0, 0.2, 0.5, 0.0], [0.3, 0.0, 0.9, 1.2]])
    prob = PolicyProblem.from_tables(acc, drift=acc.flip(1),
                                     resource=ResourceModel(torch.ones(2), torch.eye(2)))
    gate = QuantumPolicyGate(2, 4, seed=2, init_noise=0.3)
    kw = dict(lambdas=(0.7, 0.4), penalty=0.0)
    exact, _, _ = lagrangian_gradient(gate, prob, 0.4, estimator="exact", **kw)
    gen = torch.Generator().manual_seed(0)
    score, _, _ = lagrangian_gradient(gate, prob, 0.4, estimator="score", samples=200_000,
                                      generator=gen, **kw)
    assert float((score - exact).norm()) < 0.05 * float(exact.norm())


def test_dual_ascent_raises_lambda1_while_the_budget_is_violated():
    acc = torch.tensor([[4.0, 2.0, 1.0, 0.0], [4.0, 2.0, 1.0, 0.0]])   # accuracy wants keep = 1
    prob = PolicyProblem.from_tables(acc, resource=ResourceModel(torch.ones(2), torch.eye(2)))
    gate = QuantumPolicyGate(2, 4, seed=0)
    out = train_policy(gate, prob, 0.3, steps=6, estimator="exact", dual_lr=0.5,
                       use_drift=False)
    lam = [h["lambda1@0.3"] for h in out.history]
    res = [h["resource@0.3"] for h in out.history]
    assert all(r > 0.3 for r in res)                    # violated throughout (E[keep] ≈ 0.6)
    assert lam[0] == 0.0 and all(b > a for a, b in zip(lam, lam[1:]))
    assert out.lambdas[0.3][0] > lam[-1] > 0.5
    # a slack budget leaves λ₁ at zero
    out = train_policy(QuantumPolicyGate(2, 4, seed=0), prob, 1.0, steps=8, estimator="exact",
                       use_drift=False)
    assert out.lambdas[1.0][0] == 0.0


def test_ratio_for_keep_is_exact_under_torch_pruning_rounding():
    for n in (1, 3, 10, 49, 64, 100, 128, 333, 512):
        for k in range(1, n + 1):
            assert int(n * (1 - ratio_for_keep(k, n))) == k


@pytest.fixture(scope="module")
def cnn_problem():
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.randn(1, 1, 28, 28)
    # weight-only accuracy proxy (no calibration): fast; the allocation logic is the same
    return model, x, build_policy_problem(model, x, resource="macs")


def test_resource_model_matches_the_counter(cnn_problem):
    model, x, prob = cnn_problem
    assert prob.names == ["classifier.1", "features.8", "features.4", "features.0"]
    keep = {prob.modules[1]: ratio_for_keep(20, 64), prob.modules[3]: ratio_for_keep(9, 32)}
    measured = measure_resource(model, x, keep)
    q = torch.tensor([1.0, 20 / 64, 1.0, 9 / 32], dtype=torch.float64)
    assert abs(float(prob.resource.fraction(q)) - measured) < 1e-3


def test_policy_allocation_meets_a_macs_budget_within_two_percent(cnn_problem):
    model, x, prob = cnn_problem
    for budget in (0.3,):
        ratios, rep = policy_allocation(model, x, budget, problem=prob, steps=40)
        assert abs(rep.achieved / budget - 1) <= 0.02
        assert set(ratios) == set(prob.modules)
        # apply it for real (the public pruner, on a copy) and count
        pruned = copy.deepcopy(model)
        mapping = dict(zip(model.modules(), pruned.modules()))
        report = prune(pruned, x, 0.0, layer_ratios={mapping[m]: r for m, r in ratios.items()},
                       criterion="l1", compensate=False)
        assert abs(report.macs_after / report.macs_before / budget - 1) <= 0.02
        assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        widths = {n: d["kept"] for n, d in rep.layers.items()}
        assert report.layers["features.8"]["after"] == widths["features.8"]
    _, macs = count_params_and_macs(model, x)
    assert macs == report.macs_before                   # the original model was not touched


def test_policy_allocation_is_deterministic_under_seed(cnn_problem):
    model, x, prob = cnn_problem
    a, rep_a = policy_allocation(model, x, 0.5, problem=prob, steps=12, seed=3)
    b, rep_b = policy_allocation(model, x, 0.5, problem=prob, steps=12, seed=3)
    assert a == b
    assert rep_a.history == rep_b.history
    assert rep_a.lambdas == rep_b.lambdas


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="budget"):
        policy_allocation(nn.Linear(2, 2), torch.randn(1, 2), 1.5)
    with pytest.raises(ValueError, match="resource"):
        build_policy_problem(nn.Linear(2, 2), torch.randn(1, 2), resource="latency")
    with pytest.raises(ValueError, match="levels"):
        QuantumPolicyGate(2, 3, levels=[0.5, 0.2, 1.0])
    with pytest.raises(ValueError, match="problem is"):
        train_policy(QuantumPolicyGate(2, 3), PolicyProblem.from_tables(torch.ones(2, 4)))


def test_heldout_accuracy_proxy_matches_an_explicit_fit_and_exposes_in_sample_optimism():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 4)).eval()
    x = torch.randn(60, 6)                 # 30 samples per half < 41 consumer inputs
    prob = build_policy_problem(net, x[:1], calibration=x, n_levels=4)
    greedy = build_policy_problem(net, x[:1], calibration=x, n_levels=4, accuracy_proxy="greedy")
    order = prob.orders[0]
    with torch.no_grad():
        h = net[1](net[0](x)).double()
    w = net[2].weight.detach().double()
    h_a, h_b = h[:30], h[30:]
    for level, kept in enumerate((10, 20, 30)):
        removed, keep = order[: 40 - kept], order[40 - kept:]
        a_k = torch.cat([h_a[:, keep], torch.ones(30, 1, dtype=h.dtype)], 1)
        g = a_k.T @ a_k
        ridge = 1e-4 * float((h_a ** 2).sum(0).mean())
        b = torch.linalg.solve(g + ridge * torch.eye(kept + 1, dtype=h.dtype),
                               a_k.T @ h_a[:, removed])
        b_k = torch.cat([h_b[:, keep], torch.ones(30, 1, dtype=h.dtype)], 1)
        err = ((h_b[:, removed] - b_k @ b) @ w[:, removed].T).pow(2).sum()
        expect = float(err / (h_b @ w.T).pow(2).sum())
        # the Grams are accumulated in float32: agreement to ~1e-4 relative
        assert abs(float(prob.accuracy[0, level]) - expect) < 1e-3 * expect + 1e-7
    # fitted and scored on the same samples, the merge looks free; on held-out data it is not
    assert float(greedy.accuracy[0, 1]) < 0.25 * float(prob.accuracy[0, 1])


def test_prune_with_policy_allocation_meets_the_budget_through_the_public_call():
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.randn(1, 1, 28, 28)
    calib = torch.randn(64, 1, 28, 28)
    report = prune(model, x, target="macs", allocation="policy", budget=0.4, calibration=calib,
                   allocation_kwargs={"steps": 20, "seed": 1})
    assert report.allocation == "policy" and report.ratio == pytest.approx(0.6)
    assert abs(report.macs_after / report.macs_before / 0.4 - 1) <= 0.02
    assert abs(report.allocation_info["achieved"] / 0.4 - 1) <= 0.02
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # the policy's per-layer widths are the ones prune applied
    for name, layer in report.allocation_info["layers"].items():
        assert report.layers[name]["after"] == layer["kept"]


def test_prune_policy_allocation_rejects_latency_target():
    model = small_cnn().eval()
    with pytest.raises(ValueError, match="target='latency'"):
        prune(model, torch.randn(1, 1, 28, 28), 0.5, target="latency", allocation="policy",
              calibration=torch.randn(8, 1, 28, 28))


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2, float("nan"), True, "0.5", None])
def test_policy_and_prune_reject_the_same_bad_budgets(bad):
    model = small_cnn().eval()
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(ValueError, match="budget is the fraction of macs kept"):
        policy_allocation(model, x, bad)
    if bad is not None:                                   # None means "no budget" to prune
        with pytest.raises(ValueError, match="budget is the fraction of the resource kept"):
            prune(model, x, budget=bad, criterion="l1", compensate=False)
