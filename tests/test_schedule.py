"""PruningScheduler: exact schedules, size targets, optimizer re-binding, checkpoint/resume, DDP."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from torch_qmprune.schedule import (
    PruningScheduler,
    rebind_optimizer,
    record_kept_indices,
    rewrap_ddp,
    schedule_fraction,
)
from torch_qmprune.structural import count_params_and_macs, prune


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is ~10× faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _net(width: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * 16, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return x, y


def _train(model, opt, x, y, iters, sched=None, every=2, start=0):
    """Fixed batches (iteration i uses batch i mod 4); prune every ``every`` iterations."""
    losses = []
    for it in range(start, start + iters):
        xb, yb = x[(it % 4) * 64:(it % 4 + 1) * 64], y[(it % 4) * 64:(it % 4 + 1) * 64]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if sched is not None and it % every == every - 1 and not sched.done:
            sched.step()
            model = sched.model
    return losses


def _params_are_model_params(opt, model) -> bool:
    ids = {id(p) for p in model.parameters()}
    return all(id(p) in ids for g in opt.param_groups for p in g["params"])


# -- schedules -----------------------------------------------------------------------------------


def test_schedule_fractions_exact():
    assert [schedule_fraction(t, 4, 0.5, "linear") for t in range(5)] == \
        [0.0, 0.125, 0.25, 0.375, 0.5]
    # Zhu & Gupta: s_t = s_f (1 - (1 - t/n)^3)
    assert [schedule_fraction(t, 4, 0.5, "cubic") for t in range(5)] == \
        [0.0, 0.2890625, 0.4375, 0.4921875, 0.5]
    assert schedule_fraction(2, 4, 0.5, "predictive") == schedule_fraction(2, 4, 0.5, "cubic")


@pytest.mark.parametrize("schedule", ["linear", "cubic"])
def test_scheduler_follows_schedule_and_reaches_macs_target(schedule):
    torch.manual_seed(0)
    model = _net(64)
    x, _ = _data()
    _, dense_macs = count_params_and_macs(model.eval(), x[:1])
    sched = PruningScheduler(model.train(), x[:1], target=0.5, steps=3, schedule=schedule,
                             criterion="l1", calibration=lambda: x[:128])
    records = []
    while not sched.done:
        records.append(sched.step())
    assert sched.step() is None and sched.step_count == 3
    assert [r["fraction"] for r in sched.history] == \
        [schedule_fraction(t, 3, 0.5, schedule) for t in (1, 2, 3)]
    for r in records:  # every step at or just past its scheduled fraction
        assert r["fraction"] - 1e-9 <= r["achieved"] <= r["fraction"] + 0.03, r
    _, macs = count_params_and_macs(model.eval(), x[:1])
    assert macs == sched.history[-1]["macs"]
    target_macs = 0.5 * dense_macs
    assert target_macs * 0.98 <= macs <= target_macs     # at least 2x fewer, within 2 % of it
    assert model(x[:4]).shape == (4, 3)


def test_channels_target_exact():
    model = _net(32)
    x, _ = _data()
    sched = PruningScheduler(model, x[:1], target=0.5, target_kind="channels", steps=2,
                             schedule="linear", criterion="l1", calibration=x[:128])
    sched.step()
    assert (model[0].out_channels, model[4].out_channels, model[8].out_features) == (24, 24, 12)
    sched.step()
    assert (model[0].out_channels, model[4].out_channels, model[8].out_features) == (16, 16, 8)
    assert sched.history[-1]["achieved"] == 0.5


# -- optimizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_rebind_slices_state_to_kept_indices(opt_name):
    torch.manual_seed(0)
    model = _net(32)
    x, y = _data()
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    _train(model, opt, x, y, 3)
    keys = ["momentum_buffer"] if opt_name == "sgd" else ["exp_avg", "exp_avg_sq"]
    old = dict(model.named_parameters())
    old_state = {n: {k: opt.state[p][k].clone() for k in keys} for n, p in old.items()}
    with record_kept_indices(model) as kept:
        prune(model, x[:1], 0.5, criterion="l1", compensate=False)
    counts = rebind_optimizer(opt, old, model, kept)
    assert counts == {"rebound": 11, "carried": 11, "reset": 0}   # all but the last bias
    assert _params_are_model_params(opt, model)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        for k in keys:
            assert opt.state[p][k].shape == p.shape, (name, k)
    # first conv: outputs pruned (dim 0) only, so its new state is exactly the old rows kept
    (dim, idx), = kept["0.weight"]
    assert dim == 0 and len(idx) == 16
    for k in keys:
        assert torch.equal(opt.state[model[0].weight][k], old_state["0.weight"][k][idx])
    # consumer conv: pruned along both dims
    rows, cols = _compose_for_test(kept["4.weight"])
    for k in keys:
        assert torch.equal(opt.state[model[4].weight][k],
                           old_state["4.weight"][k][rows][:, cols])
    if opt_name == "adam":
        assert float(opt.state[model[0].weight]["step"]) == 3.0
    # the optimizer state dict round-trips
    opt2 = type(opt)(model.parameters(), **{k: v for k, v in opt.defaults.items()
                                              if k in ("lr", "momentum")})
    opt2.load_state_dict(opt.state_dict())


def _compose_for_test(ops):
    rows = cols = None
    for dim, idx in ops:
        if dim == 0:
            rows = idx if rows is None else rows[idx]
        else:
            cols = idx if cols is None else cols[idx]
    return rows, cols


def test_rebind_resets_state_it_cannot_slice():
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    old = dict(net.named_parameters())
    prune(net, torch.randn(1, 4), 0.5, criterion="l1", compensate=False)
    counts = rebind_optimizer(opt, old, net, kept=None)   # no kept indices: cannot slice
    assert counts == {"rebound": 3, "carried": 0, "reset": 3}
    assert _params_are_model_params(opt, net) and len(opt.state) == 1   # 2.bias unchanged


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_continues_after_prune_step(opt_name):
    torch.manual_seed(0)
    model = _net(32)
    x, y = _data()
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=3e-3))
    sched = PruningScheduler(model, x[:1], target=0.5, target_kind="channels", steps=1,
                             criterion="qm", calibration=x[:256], optimizer=opt)
    _train(model, opt, x, y, 8)
    sched.step()
    assert model[0].out_channels == 16 and sched.last_rebind["reset"] == 0
    assert _params_are_model_params(opt, model)
    state_key = "momentum_buffer" if opt_name == "sgd" else "exp_avg"
    for p in model.parameters():
        assert opt.state[p][state_key].shape == p.shape
    xb, yb = x[:64], y[:64]
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses
    assert model[0].weight.grad is not None      # gradients reach the new parameters


# -- masks ---------------------------------------------------------------------------------------


def test_mask_then_physical():
    torch.manual_seed(0)
    model = _net(32)
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    params_before = [id(p) for p in model.parameters()]
    sched = PruningScheduler(model, x[:1], target=0.5, target_kind="channels", steps=3,
                             schedule="linear", criterion="l1", calibration=x[:128],
                             mode="mask_then_physical", optimizer=opt)
    _train(model, opt, x, y, 4, sched, every=2)          # two mask steps
    assert sched.step_count == 2 and model[0].weight_orig.shape[0] == 32
    assert [id(p) for p in model.parameters()] == params_before   # same objects while masked
    alive = model[0].weight_mask.flatten(1).amax(1)
    assert int(alive.sum()) == 32 - round(32 * schedule_fraction(2, 3, 0.5, "linear"))
    with torch.no_grad():
        act = model[:3](x[:16])                           # conv → BN → ReLU, masked channels
    assert float(act[:, alive == 0].abs().max()) == 0.0
    assert sched.history[-1]["achieved"] == pytest.approx(1 / 3, abs=0.02)
    sched.step()                                          # last step: physical removal
    assert sched.done and model[0].out_channels == 16 and not hasattr(model[0], "weight_mask")
    assert _params_are_model_params(opt, model)
    losses = _train(model, opt, x, y, 4)
    assert all(torch.isfinite(torch.tensor(losses)))


# -- checkpoint / resume --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["physical", "mask_then_physical"])
def test_resume_matches_uninterrupted_run(mode):
    x, y = _data()

    def build():
        torch.manual_seed(0)
        model = _net(32)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        sched = PruningScheduler(model, x[:1], target=0.5, target_kind="channels", steps=3,
                                 schedule="cubic", criterion="qm", calibration=x[:128],
                                 optimizer=opt, mode=mode)
        return model, opt, sched

    model_a, opt_a, sched_a = build()
    _train(model_a, opt_a, x, y, 8, sched_a)

    model_b, opt_b, sched_b = build()
    _train(model_b, opt_b, x, y, 4, sched_b)            # two steps, then "crash"
    buf = io.BytesIO()
    torch.save({"sched": sched_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model_c, opt_c, sched_c = build()                    # fresh dense model
    sched_c.load_state_dict(ckpt["sched"])
    opt_c.load_state_dict(ckpt["opt"])
    assert sched_c.step_count == 2 and _params_are_model_params(opt_c, model_c)
    _train(model_c, opt_c, x, y, 4, sched_c, start=4)
    assert sched_a.done and sched_c.done
    sd_a, sd_c = model_a.state_dict(), model_c.state_dict()
    assert list(sd_a) == list(sd_c)
    assert all(sd_a[k].shape == sd_c[k].shape for k in sd_a)
    assert all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    assert [h["macs"] for h in sched_a.history] == [h["macs"] for h in sched_c.history]


def test_load_state_dict_rejects_other_config():
    x, _ = _data(16)
    a = PruningScheduler(_net(16), x[:1], target=0.5, steps=2, criterion="l1")
    b = PruningScheduler(_net(16), x[:1], target=0.5, steps=3, criterion="l1")
    with pytest.raises(ValueError, match="steps=2"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="format"):
        b.load_state_dict({"step": 1})


# -- predictive ----------------------------------------------------------------------------------


def test_predictive_schedule_uses_forecast():
    pytest.importorskip("torch_qmprune.dynamics")
    torch.manual_seed(0)
    model = _net(32)
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = PruningScheduler(model, x[:1], target=0.5, target_kind="channels", steps=2,
                             schedule="predictive", criterion="l1", calibration=x[:128],
                             optimizer=opt, track_window=1)
    _train(model, opt, x, y, 8, sched, every=4)
    assert [h["allocation"] for h in sched.history] == ["forecast", "forecast"]
    assert sched.history[-1]["achieved"] >= 0.5 - 1e-9
    assert sched.history[-1]["achieved"] <= 0.56
    assert [h["fraction"] for h in sched.history] == [0.4375, 0.5]


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=1.5), "target must be a fraction in \\(0, 1\\), got 1.5"),
    (dict(target=True), "got True"),
    (dict(target=0.0), "got 0.0"),
    (dict(steps=0), "steps must be an int >= 1, got 0"),
    (dict(steps=2.5), "got 2.5"),
    (dict(schedule="quadratic"), "got 'quadratic'"),
    (dict(target_kind="flops"), "got 'flops'"),
    (dict(mode="masks"), "got 'masks'"),
    (dict(criterion="magic"), "got 'magic'"),
    (dict(criterion="qm", calibration=None), "criterion='qm'"),
    (dict(prune_kwargs={"ratio": 0.3}), "\\['ratio'\\]"),
    (dict(track_window=0), "track_window must be an int >= 1, got 0"),
])
def test_bad_arguments_raise_naming_the_value(kwargs, match):
    base = dict(target=0.5, steps=2, criterion="l1", calibration=None)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PruningScheduler(_net(16), torch.randn(1, 1, 8, 8), **base)


def test_bad_types_raise():
    with pytest.raises(TypeError, match="optimizer must be"):
        PruningScheduler(_net(16), torch.randn(1, 1, 8, 8), target=0.5, steps=1,
                         criterion="l1", optimizer="sgd")
    with pytest.raises(ValueError, match="not a submodule"):
        PruningScheduler(_net(16), torch.randn(1, 1, 8, 8), target=0.5, steps=1,
                         criterion="l1", ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="got Linear"):
        rewrap_ddp(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="step must be an int in \\[0, 4\\], got 5"):
        schedule_fraction(5, 4, 0.5)


# -- DDP -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_hash(model: nn.Module, params_only: bool = False) -> str:
    h = hashlib.sha256()
    items = model.named_parameters() if params_only else model.state_dict().items()
    for k, v in items:
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for mode in ("physical", "mask_then_physical"):
            torch.manual_seed(rank)                      # different init: DDP syncs rank 0's
            module = _net(32)
            model = nn.parallel.DistributedDataParallel(module)
            x, y = _data(256, seed=10 + rank)          # each rank its own shard
            opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
            sched = PruningScheduler(model, x[:1], target=0.5, target_kind="channels", steps=2,
                                     schedule="linear", criterion="qm",
                                     calibration=lambda x=x: x[:128],   # rank-specific data
                                     optimizer=opt, mode=mode)
            for it in range(6):
                xb, yb = x[(it % 4) * 64:(it % 4 + 1) * 64], y[(it % 4) * 64:(it % 4 + 1) * 64]
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                if it % 2 == 1 and not sched.done:
                    sched.step()
                    model = sched.model
                    if sched.done:  # the re-wrap synced everything: whole state_dict equal
                        full = [None] * world
                        dist.all_gather_object(full, _state_hash(module))
                        at_done = _state_hash(module, params_only=True)
            # two more iterations on the new wrapper: gradients must still be all-reduced
            # (BatchNorm running stats legitimately differ between forwards: DDP re-broadcasts
            # them at the start of each forward, so only parameters are compared here)
            params = [None] * world
            dist.all_gather_object(params, _state_hash(module, params_only=True))
            result[mode] = {
                "hashes": full,
                "param_hashes": params,
                "params_at_done": at_done,
                "widths": (module[0].out_channels, module[4].out_channels),
                "rewrapped": model is not None and model.module is module
                and isinstance(model, nn.parallel.DistributedDataParallel),
                "opt_ok": _params_are_model_params(opt, module),
            }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # success only: skip interpreter finalization, where gloo's threads can abort the process
    # (see examples/ddp_prune.py)
    os._exit(0)


def test_ddp_ranks_end_identical():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    for mode in ("physical", "mask_then_physical"):
        r0, r1 = results[0][mode], results[1][mode]
        assert r0["hashes"][0] == r0["hashes"][1] == r1["hashes"][0], mode
        assert r0["param_hashes"][0] == r0["param_hashes"][1], mode
        assert r0["param_hashes"][0] != r0["params_at_done"], mode   # training did go on
        assert r0["widths"] == r1["widths"] == (16, 16), mode
        assert r0["rewrapped"] and r1["rewrapped"] and r0["opt_ok"] and r1["opt_ok"], mode


def test_scheduler_leaves_model_untouched_when_pruning_fails():
    model = _net(16)
    x, _ = _data(16)
    sched = PruningScheduler(model, x[:1], target=0.5, steps=1, criterion="l1",
                             prune_kwargs={"round_to": "bad"})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(Exception):  # noqa: B017 - whatever prune raises, the model is intact
        sched.step()
    assert sched.step_count == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
