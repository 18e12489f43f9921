"""Physical pruning: prune() on real architectures, merging exactness, safety, accuracy floor."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_qmprune.calibration import collect_input_grams, recalibrate_batchnorm
from torch_qmprune.importance import SpectralImportance, greedy_merge_costs
from torch_qmprune.models import resnet18_fmnist, small_cnn, small_vit
from torch_qmprune.serialization import load_pruned, save_pruned
from torch_qmprune.structural import prune
from torch_qmprune.training import evaluate


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


class LinearChain(nn.Module):
    """conv → conv with no nonlinearity: removed channels are exactly linear in the kept ones."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c2(self.c1(x)).mean((2, 3)))


def test_merge_is_exact_when_removed_channels_are_combinations_of_kept():
    torch.manual_seed(0)
    net = LinearChain()
    with torch.no_grad():
        w, b = net.c1.weight, net.c1.bias
        w[3] = 0.5 * w[0] - 2.0 * w[1]           # channel 3 = 0.5·ch0 − 2·ch1
        b[3] = 0.5 * b[0] - 2.0 * b[1]
        w[5] = -w[2]                             # channel 5 = −ch2
        b[5] = -b[2]
    x = torch.randn(32, 3, 8, 8)
    ref = net(x)
    report = prune(net, x[:1], ratio=2 / 6, criterion="qm", calibration=x, compensate=True,
                   damping=1e-9, ignored_layers=[net.fc, net.c2])
    assert net.c1.out_channels == 4 and net.c2.in_channels == 4
    assert report.compensated_layers >= 1
    out = net(x)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


def test_merge_folds_constants_into_the_consumer_bias():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight[4] = 3.0 * net[0].weight[1]
        net[0].bias[4] = 3.0 * net[0].bias[1] + 0.9       # ch4 = 3·ch1 + 0.9 (affine)
    x = torch.randn(256, 5)
    ref = net(x)
    prune(net, x[:1], ratio=1 / 6, criterion="qm", calibration=x, damping=1e-9,
          ignored_layers=[net[1], net[2]])
    assert net[0].out_features == 5
    assert torch.allclose(net(x), ref, atol=1e-4), (net(x) - ref).abs().max()


def test_without_compensation_the_same_pruning_is_not_exact():
    torch.manual_seed(0)
    net = LinearChain()
    with torch.no_grad():
        net.c1.weight[3] = 0.5 * net.c1.weight[0] - 2.0 * net.c1.weight[1]
    x = torch.randn(32, 3, 8, 8)
    ref = net(x)
    prune(net, x[:1], ratio=1 / 6, criterion="l2", calibration=x, compensate=False,
          recalibrate_bn=False, ignored_layers=[net.fc, net.c2])
    assert (net(x) - ref).abs().max() > 1e-3


def test_greedy_never_removes_both_copies_of_a_duplicate():
    torch.manual_seed(1)
    base = torch.randn(2000, 3)
    feats = torch.cat([base[:, :1], base[:, :1], base[:, 1:]], 1)   # features 0 and 1 identical
    aug = torch.cat([feats, torch.ones(2000, 1)], 1)
    gram = aug.T @ aug
    rows = torch.ones(5, 4)
    order, cost = greedy_merge_costs([(rows, gram, torch.arange(4).view(4, 1))], 4)
    assert set(order[:1].tolist()) <= {0, 1}              # a duplicate goes first, at ~zero cost
    assert cost[0] < 1e-3
    assert not {0, 1} <= set(order[:2].tolist())          # ...but never both of them
    assert torch.all(cost[1:] > 1e-2)


def test_resnet18_prunes_and_runs_forward_backward():
    torch.manual_seed(0)
    model = resnet18_fmnist(stem_stride=2)
    x = torch.randn(16, 1, 28, 28)
    report = prune(model, x[:1], 0.5, criterion="qm", calibration=x)
    out = model(x)
    assert out.shape == (16, 10)
    out.sum().backward()
    assert model.conv1.out_channels == 32
    assert 0.70 < report.param_sparsity < 0.80            # ~1 - 0.5² of the conv weights
    assert report.macs_after < report.macs_before / 3


def test_vit_prunes_mlp_and_runs():
    torch.manual_seed(0)
    model = small_vit(num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
    x = torch.randn(8, 1, 28, 28)
    mlp0 = model.encoder.layers[0].mlp[0]
    report = prune(model, x[:1], 0.5, criterion="qm", calibration=x,
                   ignored_layers=[model.heads, model.conv_proj]
                   + [blk.self_attention for blk in model.encoder.layers])
    assert model(x).shape == (8, 10)
    assert mlp0.out_features == 64
    assert report.params_after < report.params_before


def test_params_target_is_met_within_two_percent():
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(64, 1, 28, 28)
    report = prune(model, x[:1], 0.6, target="params", criterion="l1", calibration=x)
    assert abs(report.param_sparsity - 0.6) < 0.02
    macs = prune(small_cnn(), x[:1], 0.5, target="macs", criterion="l1", calibration=x)
    assert abs(1 - 1 / macs.macs_speedup - 0.5) < 0.02


@pytest.mark.parametrize("criterion", ["qm", "literal", "loo", "hybrid", "l1", "l2", "fpgm",
                                       "lamp", "random"])
def test_every_criterion_runs_through_the_same_pipeline(criterion):
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(32, 1, 28, 28)
    report = prune(model, x[:1], 0.25, criterion=criterion, calibration=x)
    assert model(x).shape == (32, 10)
    assert report.layers["features.0"]["after"] == 24


def test_taylor_needs_labels_and_works_with_them():
    model = small_cnn()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    with pytest.raises(ValueError, match="labelled"):
        prune(model, x[:1], 0.25, criterion="taylor", calibration=[x])
    report = prune(model, x[:1], 0.25, criterion="taylor", calibration=[(x, y)])
    assert report.layers["features.4"]["after"] == 48
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"ratio": 1.0}, ValueError, r"ratio must be a float in \[0, 1\), got 1.0"),
    ({"ratio": True}, TypeError, "ratio must be a float"),
    ({"ratio": float("nan")}, ValueError, "nan"),
    ({"criterion": "magic"}, ValueError, "criterion must be one of .* got 'magic'"),
    ({"target": "flops"}, ValueError, "target must be one of .* got 'flops'"),
    ({"calibration": None}, ValueError, "needs calibration data"),
])
def test_bad_input_is_rejected_and_model_untouched(kwargs, exc, match):
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(8, 1, 28, 28)
    args = {"ratio": 0.5, "criterion": "qm", "calibration": x, **kwargs}
    with pytest.raises(exc, match=match):
        prune(model, x[:1], **args)
    assert _state_equal(model.state_dict(), before)


def test_failure_midway_restores_the_model_exactly(monkeypatch):
    import torch_qmprune.structural as structural

    model = small_cnn()
    x = torch.randn(16, 1, 28, 28)
    params = dict(model.named_parameters())
    before = copy.deepcopy(model.state_dict())
    calls = {"n": 0}
    real = structural.compensate_group

    def failing(group, stats, dg=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(group, stats, dg, **kw)

    monkeypatch.setattr(structural, "compensate_group", failing)
    with pytest.raises(RuntimeError, match="injected"):
        prune(model, x[:1], 0.5, criterion="qm", calibration=x)
    assert calls["n"] == 2
    assert _state_equal(model.state_dict(), before)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.features[0].out_channels == 32 and model.features[4].in_channels == 32
    assert model(x).shape == (16, 10)


def test_pruned_model_saves_and_reloads_into_fresh_instance(tmp_path):
    torch.manual_seed(0)
    model = resnet18_fmnist(stem_stride=2).eval()
    x = torch.randn(8, 1, 28, 28)
    prune(model, x[:1], 0.4, criterion="l1", calibration=x)
    model.eval()
    ref = model(x)
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    fresh = resnet18_fmnist(stem_stride=2)
    load_pruned(fresh, path).eval()
    assert torch.equal(fresh(x), ref)
    torch.save(model, tmp_path / "whole.pt")
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(again(x), ref)


def test_load_pruned_rejects_a_mismatched_model_without_changing_it(tmp_path):
    model = small_cnn()
    x = torch.randn(8, 1, 28, 28)
    prune(model, x[:1], 0.5, criterion="l1", calibration=x)
    save_pruned(model, tmp_path / "p.pt")
    other = resnet18_fmnist()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(KeyError, match="does not match"):
        load_pruned(other, tmp_path / "p.pt")
    assert _state_equal(other.state_dict(), before)


def test_calibration_gram_is_exact_and_costs_one_pass():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(50, 3)
    calls = {"n": 0}
    net.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    stats = collect_input_grams(net, [x[:25], x[25:]])
    assert calls["n"] == 2 and stats.n_samples == 50
    h = torch.relu(net[0](x)).detach()
    aug = torch.cat([h, torch.ones(50, 1)], 1).double()
    assert torch.allclose(stats.grams[net[2]].gram, aug.T @ aug, atol=1e-5)


def test_bn_recalibration_matches_batch_statistics():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    x = torch.randn(40, 1, 6, 6)
    assert recalibrate_batchnorm(net, x) == 1
    z = net[0](x).detach()
    assert torch.allclose(net[1].running_mean, z.mean((0, 2, 3)), atol=1e-5)


def test_spectral_importance_plugs_into_torch_pruning_pruner():
    import torch_pruning as tp

    model = small_cnn()
    x = torch.randn(16, 1, 28, 28)
    stats = collect_input_grams(model, x)
    imp = SpectralImportance("qm", stats=stats)
    pruner = tp.pruner.BasePruner(model, x[:1], importance=imp, pruning_ratio=0.5,
                                  global_pruning=True, ignored_layers=[model.classifier[-1]])
    pruner.step()
    assert model(x).shape == (16, 10)
    assert sum(p.numel() for p in model.parameters()) < 458_730
    with pytest.raises(ValueError, match="data-aware"):
        SpectralImportance("qm")


def test_accuracy_floor_on_real_fashion_mnist(trained_small_cnn, fmnist_small):
    """The CI-sized version of the benchmark: one shot, no fine-tuning, 50 % of channels."""
    x, _, xt, yt = fmnist_small
    dense = evaluate(trained_small_cnn, xt, yt)
    results = {}
    for name, kwargs in {
        "qm": dict(criterion="qm"),
        "l1_plain": dict(criterion="l1", compensate=False, recalibrate_bn=False),
        "l1_same_pipeline": dict(criterion="l1"),
    }.items():
        model = copy.deepcopy(trained_small_cnn)
        prune(model, x[:1], 0.5, calibration=x[:1024], **kwargs)
        results[name] = evaluate(model, xt, yt)
    assert dense > 80.0
    assert results["qm"] >= dense - 4.0, (dense, results)
    assert results["qm"] >= results["l1_plain"] + 10.0, results
    assert results["qm"] >= results["l1_same_pipeline"] - 1.0, results


def test_prune_progress_bar_reports_stages(capsys):
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    x = torch.randn(32, 1, 8, 8)
    prune(net, x[:1], 0.3, target="params", calibration=x, progress=True)
    err = capsys.readouterr().err
    assert "prune[qm]" in err and "step" in err
    assert net(x).shape == (32, 3)


@pytest.mark.parametrize("rows_out,inputs,block", [(6, 40, 4), (50, 12, 1), (8, 30, 1)])
def test_greedy_merge_costs_weight_and_gram_forms_agree(rows_out, inputs, block):
    # the downdate on the (R, D+1) weights (few rows) and on M = WᵀW (many rows) are the same
    # algebra: identical orders, costs equal to rounding
    from torch_qmprune.importance import _greedy_merge_costs

    g = torch.Generator().manual_seed(rows_out + inputs)
    n = inputs // block
    x = torch.randn(300, inputs, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.01 * x[:, 1]                       # a near-duplicate input
    xa = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], 1)
    gram = xa.T @ xa
    rows = torch.randn(rows_out, inputs, generator=g, dtype=torch.float64)
    blocks = torch.arange(inputs).view(n, block)
    runs = [_greedy_merge_costs([(rows, gram, blocks)], n, 1e-4, None, 4, weight_form=f)
            for f in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.allclose(runs[0][1], runs[1][1], rtol=1e-7, atol=1e-12)


def test_failed_prune_restores_in_place_so_user_hook_handles_still_work():
    from torch_qmprune.structural import register_allocation

    def boom(model, example_inputs, **kw):
        model[0].register_forward_hook(lambda *a: None)        # a change to roll back
        raise RuntimeError("allocator failed midway")

    register_allocation("test-boom", boom, overwrite=True)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    calls = []
    handle = net[0].register_forward_hook(lambda *a: calls.append(1))
    hooks_dict = net[0]._forward_hooks
    with pytest.raises(RuntimeError, match="midway"):
        prune(net, torch.randn(1, 1, 8, 8), 0.5, criterion="l1", compensate=False,
              allocation="test-boom")
    assert net[0]._forward_hooks is hooks_dict and len(hooks_dict) == 1
    net(torch.randn(1, 1, 8, 8))
    assert calls == [1]
    handle.remove()                                             # the user's handle still works
    net(torch.randn(1, 1, 8, 8))
    assert calls == [1]
