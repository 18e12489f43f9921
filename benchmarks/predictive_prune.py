"""Predictive pruning (arXiv 2512.00880 §3.3): under a drifting input stream, does pruning on
channel scores *forecast* for window t+h serve windows t+1..t+h better than pruning on the
scores of the current window t?

Set-up (as ``benchmarks/dynamics_drift.py``): the cached Fashion-MNIST SmallCNN
(``get_baseline("small_cnn")``) sees test images whose corruption grows window by window
(rotation rising to ``--max-angle`` or Gaussian noise to ``--max-noise``; ``--windows`` windows of
``--window-batches`` × ``--batch-size`` fresh images). A
:class:`~torch_qmprune.dynamics.SpectralTracker` (exact setting) streams the post-ReLU density
matrix ρ of the four prunable layers (``features.0/4/8``, ``classifier.1``; the final classifier
is never pruned).

At each origin window t the network is pruned — a fraction ``--ratios`` of the channels of every
layer, through Torch-Pruning's ``BasePruner`` with
:class:`~torch_qmprune.dynamics.TrackedImportance` and the library's least-squares merge
(:func:`~torch_qmprune.compensate_group`, calibrated on window t's images: the only data in
hand) — with per-channel scores ``s_c = 1/[ρ⁻¹]_cc × ‖W_consumer[:, c]‖²`` (the residual energy
of channel c against its siblings, :func:`~torch_qmprune.dynamics.channel_residual_energy`,
times the energy of the weights that read it) computed from

* ``current`` — ρ_t, the window in hand;
* ``lindblad`` — ρ̂_{t+h} from :func:`~torch_qmprune.dynamics.forecast_density_matrix` (Lindblad
  predictor, rank ``--rank``, one-step objective, fitted on the last ``--fit-windows`` windows:
  the variant that forecast d_FS best in docs/results/dynamics.md);
* ``linear`` — ρ̂_{t+h} by entrywise least-squares lines through the last ``--fit-windows`` ρ
  (clipped to a density matrix): a naive forecaster;
* ``oracle`` — the actual ρ_{t+h} (future data: an upper bound for any forecaster, not a method);

plus, for context, ``qm (prune)``: :func:`torch_qmprune.prune` with its default criterion on
window t's images (no BatchNorm re-estimation, like the other arms). Each pruned copy is scored
on the images of windows t+1..t+h (accuracy, %) and on window t. The gains are paired: every
arm sees the same images.

Also reported: how many of the channels an arm removes ``current`` removes too (the headroom any
forecast has: where even the oracle picks the same channels, foresight cannot help).

Run: ``python benchmarks/predictive_prune.py --out docs/results/predictive_prune.json``
(about 10 minutes on one loaded CPU core; ``--origins 8 14 --ratios 0.5`` for a 2-minute check)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from torch_qmprune import compensate_group, prune
from torch_qmprune.bench import environment, write_results
from torch_qmprune.calibration import collect_input_grams
from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.dynamics import (
    SpectralTracker,
    TrackedImportance,
    channel_residual_energy,
    forecast_density_matrix,
)
from torch_qmprune.zoo import get_baseline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dynamics_drift import corrupt  # noqa: E402

#: prunable layer -> (module whose output ρ is tracked: its ReLU, consumer layer)
LAYERS = {
    "features.0": ("features.2", "features.4"),
    "features.4": ("features.6", "features.8"),
    "features.8": ("features.10", "classifier.1"),
    "classifier.1": ("classifier.2", "classifier.3"),
}
ARMS = ("current", "lindblad", "linear", "oracle", "qm (prune)")


def clip_density(rho: torch.Tensor) -> torch.Tensor:
    """Symmetric part, eigenvalues clipped at 0, trace one."""
    w, u = torch.linalg.eigh((rho + rho.T) / 2)
    out = (u * w.clamp(min=0.0)) @ u.T
    return out / out.trace()


def linear_density_forecast(traj: torch.Tensor, horizon: int) -> torch.Tensor:
    """Entrywise least-squares line through the ``(T, d, d)`` states, ``horizon`` steps past."""
    n = traj.shape[0]
    t = torch.arange(n, dtype=torch.float64)
    tc = t - t.mean()
    mean = traj.mean(0)
    slope = (tc[:, None, None] * (traj - mean)).sum(0) / (tc ** 2).sum()
    return clip_density(mean + slope * (n - 1 + horizon - t.mean()))


def consumer_energy(model: nn.Module, producer: str, consumer: str) -> torch.Tensor:
    """``‖W_consumer[:, c]‖²`` per output channel c of ``producer`` (flatten-aware)."""
    mods = dict(model.named_modules())
    channels = getattr(mods[producer], "out_channels", None) or mods[producer].out_features
    w = mods[consumer].weight.detach().double()
    per_input = w.transpose(0, 1).reshape(w.shape[1], -1).pow(2).sum(1)
    return per_input.reshape(channels, -1).sum(1)  # Linear after Flatten: c·49 … c·49+48


@torch.no_grad()
def accuracy(model: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(xs, ys))
    return 100.0 * correct / sum(len(y) for y in ys)


def prune_with_scores(model: nn.Module, scores: dict[str, torch.Tensor], ratio: float,
                      calib: torch.Tensor) -> nn.Module:
    """Copy of ``model`` with ``ratio`` of each layer's channels removed (lowest scores),
    the removed channels merged into the kept ones on ``calib`` (what ``prune()`` does)."""
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    stats = collect_input_grams(m, calib.split(256))
    imp = TrackedImportance({mods[name]: s for name, s in scores.items()})
    pruner = tp.pruner.BasePruner(m, calib[:1], importance=imp, pruning_ratio=ratio,
                                  ignored_layers=[mods["classifier.3"]])
    for group in pruner.step(interactive=True):
        compensate_group(group, stats, pruner.DG)
        group.prune()
    return m


def lowest(scores: torch.Tensor, ratio: float) -> set[int]:
    """The ``round(ratio · C)`` lowest-scored channels (what a local pruner removes)."""
    k = int(round(ratio * scores.numel()))
    return set(torch.argsort(scores)[:k].tolist())


def fit_lindblad(traj: torch.Tensor, horizon: int, args: argparse.Namespace) -> torch.Tensor:
    return forecast_density_matrix(traj, horizon, rank=args.rank, windows=args.fit_windows,
                                   objective="one_step", steps=args.steps,
                                   polish_steps=args.polish_steps, dt=1.0, seed=args.seed)


def run_corruption(model: nn.Module, x_raw: torch.Tensor, y: torch.Tensor, kind: str,
                   args: argparse.Namespace) -> dict:
    per_window = args.window_batches * args.batch_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    stream: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    tracked = [t for t, _ in LAYERS.values()]
    exact = dict(every=1, max_rows=None, product_dtype=torch.float64)
    with torch.no_grad(), SpectralTracker(model, tracked, window=args.window_batches,
                                          **exact) as tr:
        for w in range(args.windows):
            severity = w / (args.windows - 1)
            xs, ys = [], []
            for b in range(args.window_batches):
                lo = w * per_window + b * args.batch_size
                xb = corrupt(x_raw[lo:lo + args.batch_size], kind, severity, args, gen)
                xs.append(xb)
                ys.append(y[lo:lo + args.batch_size])
                model(xb)
            stream.append((xs, ys))
    dense = [accuracy(model, xs, ys) for xs, ys in stream]
    trajs = {name: tr.trajectory(t) for name, (t, _) in LAYERS.items()}
    energy = {name: consumer_energy(model, name, c) for name, (_, c) in LAYERS.items()}
    h = args.horizon
    origins = []
    for t in args.origins:
        t0 = time.perf_counter()
        rhos = {
            "current": {n: trajs[n][t] for n in LAYERS},
            "lindblad": {n: fit_lindblad(trajs[n][:t + 1], h, args) for n in LAYERS},
            "linear": {n: linear_density_forecast(trajs[n][t + 1 - args.fit_windows:t + 1], h)
                       for n in LAYERS},
            "oracle": {n: trajs[n][t + h] for n in LAYERS},
        }
        fit_seconds = time.perf_counter() - t0
        future_x = [x for xs, _ in stream[t + 1:t + 1 + h] for x in xs]
        future_y = [yy for _, ys in stream[t + 1:t + 1 + h] for yy in ys]
        now_x, now_y = stream[t]
        calib = torch.cat(now_x)
        entry = {"origin": t, "fit_seconds": fit_seconds,
                 "dense_future": accuracy(model, future_x, future_y),
                 "dense_now": accuracy(model, now_x, now_y), "ratios": {}}
        for ratio in args.ratios:
            row: dict[str, dict] = {}
            chosen: dict[str, dict[str, set[int]]] = {}
            for arm in ARMS:
                if arm == "qm (prune)":
                    m = copy.deepcopy(model).eval()
                    prune(m, calib[:1], ratio, criterion="qm", calibration=calib.split(256),
                          recalibrate_bn=False, ignored_layers=[m.classifier[3]])
                else:
                    scores = {n: channel_residual_energy(rhos[arm][n]) * energy[n]
                              for n in LAYERS}
                    m = prune_with_scores(model, scores, ratio, calib)
                    chosen[arm] = {n: lowest(s, ratio) for n, s in scores.items()}
                row[arm] = {"future": accuracy(m, future_x, future_y),
                            "now": accuracy(m, now_x, now_y)}
                if arm in chosen:
                    row[arm]["overlap_with_current"] = sum(
                        len(chosen[arm][n] & chosen["current"][n]) / max(1, len(chosen[arm][n]))
                        for n in LAYERS) / len(LAYERS)
            entry["ratios"][str(ratio)] = row
            print(f"  [{kind}] origin {t}, ratio {ratio}: future acc "
                  + ", ".join(f"{a} {v['future']:.1f}" for a, v in row.items())
                  + f" (dense {entry['dense_future']:.1f})", flush=True)
        origins.append(entry)
    return {"dense_accuracy_per_window": dense, "origins": origins}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument("--corruptions", nargs="+", default=["rotation", "noise"],
                   choices=["rotation", "noise"])
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--window-batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--origins", type=int, nargs="+", default=[5, 8, 11, 14, 17])
    p.add_argument("--horizon", type=int, default=6)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--max-angle", type=float, default=45.0)
    p.add_argument("--max-noise", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--fit-windows", type=int, default=4)
    p.add_argument("--steps", type=int, default=150, help="Adam steps of the Lindblad fit")
    p.add_argument("--polish-steps", type=int, default=50, help="L-BFGS steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if max(args.origins) + args.horizon > args.windows - 1 or \
            min(args.origins) + 1 < args.fit_windows:
        p.error("origins/horizon/fit-windows do not fit in --windows")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    env = environment("cpu")
    start = time.perf_counter()
    model, info = get_baseline("small_cnn")
    model.eval()
    n_images = args.windows * args.window_batches * args.batch_size
    x_raw, y = load_fashion_mnist("test", limit=n_images, normalize=False)
    order = torch.randperm(x_raw.shape[0], generator=torch.Generator().manual_seed(args.seed))
    x_raw, y = x_raw[order], y[order]
    results = {}
    for kind in args.corruptions:
        print(f"[{kind}]", flush=True)
        results[kind] = run_corruption(model, x_raw, y, kind, args)

    # mean future accuracy per ratio and arm, and paired gains over "current"
    summary: dict[str, dict] = {}
    for ratio in args.ratios:
        key = str(ratio)
        rows = [o["ratios"][key] for r in results.values() for o in r["origins"]]
        mean = {a: sum(row[a]["future"] for row in rows) / len(rows) for a in ARMS}
        now = {a: sum(row[a]["now"] for row in rows) / len(rows) for a in ARMS}
        wins = {a: sum(row[a]["future"] > row["current"]["future"] for row in rows)
                for a in ARMS if a != "current"}
        losses = {a: sum(row[a]["future"] < row["current"]["future"] for row in rows)
                  for a in ARMS if a != "current"}
        overlap = {a: sum(row[a]["overlap_with_current"] for row in rows) / len(rows)
                   for a in ("lindblad", "linear", "oracle")}
        summary[key] = {"future": mean, "now": now, "beats_current": wins,
                        "loses_to_current": losses, "cases": len(rows),
                        "pruned_overlap_with_current": overlap}
    dense = [o["dense_future"] for r in results.values() for o in r["origins"]]
    lines = ["| channels removed | " + " | ".join(ARMS) + " |",
             "|---|" + "---|" * len(ARMS)]
    for key, s in summary.items():
        cells = []
        for a in ARMS:
            cell = f"{s['future'][a]:.1f}"
            if a != "current":
                cell += f" ({s['beats_current'][a]}/{s['loses_to_current'][a]})"
            cells.append(cell)
        lines.append(f"| {float(key):.0%} | " + " | ".join(cells) + " |")
    print()
    print(f"Accuracy (%) on windows t+1..t+{args.horizon} after pruning at t, mean over "
          f"{summary[str(args.ratios[0])]['cases']} (corruption, origin) cases; dense "
          f"{sum(dense) / len(dense):.1f}. In brackets: cases better / worse than 'current'.")
    print("\n".join(lines))
    print("Share of the channels each arm removes that 'current' removes too (mean over layers "
          "and cases): " + "; ".join(
              f"{float(k):.0%}: " + ", ".join(f"{a} {v:.2f}" for a, v in
                                              s["pruned_overlap_with_current"].items())
              for k, s in summary.items()))
    result = dict(
        config=vars(args),  # write_results writes paths as text
        baseline=info, summary=summary, markdown="\n".join(lines), results=results,
        seconds=time.perf_counter() - start,
        env={**env, "threads": torch.get_num_threads()},
    )
    if args.out is not None:
        print(f"wrote {write_results(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
