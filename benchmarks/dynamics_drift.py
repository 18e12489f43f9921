"""Forecasting activation drift (arXiv 2512.00880 §3.3): does a Lindblad model of the activation
density matrix predict the Fubini–Study drift d_FS,t better than naive forecasters?

Set-up: the cached small CNN (``get_baseline("small_cnn")``) runs on Fashion-MNIST test images
whose corruption grows window by window (rotation angle or Gaussian noise rising linearly from 0
to ``--max-angle`` / ``--max-noise``, or a class-mix shift: the share of images from classes 0–4
rising from one half to (1 + ``--max-mix``)/2; each window sees fresh images). A
:class:`~torch_qmprune.dynamics.SpectralTracker` on one or two layers emits one density matrix ρ_t
per window and d_FS(ψ_t, ψ_0) to the first (clean) window. For each forecast origin o (the first
is ``--fit`` windows in), every forecaster sees windows 0..o and predicts d_FS of windows
o+1..o+k:

* last value — d_FS,o for every horizon;
* linear — least-squares line through the last ``--linear-window`` observed d_FS values;
* Lindblad — :class:`~torch_qmprune.dynamics.LindbladPredictor` fitted on ρ_0..ρ_o (or only the
  last W windows, ``@W``) in the rank-r reduced basis, evolved from ρ_o, lifted back, d_FS of the
  forecast spectral state to ρ_0 (variants: rollout or one-step objective; a constant generator,
  H(t) = H0 + t·H1 (``_linearH``) or a dissipation ramping up linearly in time, 𝓛(t) =
  𝓛[H0; L] + t·D[M] (``_ramp``); with ``@W`` the time axis, and so the ramp's t = 0, starts at
  the first window of the fit). Note that d_FS of spectral states is blind to the unitary part
  −i[H, ρ] (it only rotates the eigenbasis): only the dissipator moves the forecast spectrum,
  which is why the time dependence that matters is the ramp's.

Prints a markdown table of the mean absolute error per horizon (over corruptions × layers ×
origins) and the tracker's throughput ratio; ``--out`` writes everything as JSON.

Run: ``python benchmarks/dynamics_drift.py --workers 2 --out runs/dynamics_drift.json``
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from torch_qmprune.bench import environment, write_results
from torch_qmprune.data import _MEAN, _STD, load_fashion_mnist
from torch_qmprune.dynamics import LindbladPredictor, SpectralTracker, tracker_overhead
from torch_qmprune.zoo import get_baseline

#: SpectralTracker's exact setting (its defaults subsample calls and rows to stay cheap)
EXACT = dict(every=1, max_rows=None, product_dtype=torch.float64)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate raw [0, 1] images (N, 1, H, W) by ``degrees`` (zero = black background)."""
    if degrees == 0:
        return x
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                         dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def corrupt(x_raw: torch.Tensor, kind: str, severity: float, args: argparse.Namespace,
            gen: torch.Generator) -> torch.Tensor:
    """Corrupted, normalized images; ``severity`` in [0, 1]."""
    if kind == "rotation":
        out = rotate(x_raw, severity * args.max_angle)
    elif kind == "noise":
        out = x_raw + severity * args.max_noise * torch.randn(x_raw.shape, generator=gen)
    elif kind == "classmix":  # the shift is in which images are drawn (classmix_stream)
        out = x_raw
    else:
        raise ValueError(kind)
    return (out - _MEAN) / _STD


def classmix_stream(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Images for a class-mix shift: in window w (severity s = w / (windows − 1)) each image is
    drawn from classes 0–4 with probability (1 + s·``max_mix``)/2, else from classes 5–9, without
    replacement from the 10,000 test images — balanced at first, one-sided at the end."""
    x_all, y_all = load_fashion_mnist("test", normalize=False)
    g = torch.Generator().manual_seed(args.seed + 2)
    perm = torch.randperm(y_all.shape[0], generator=g)
    pools = [perm[y_all[perm] < 5].tolist(), perm[y_all[perm] >= 5].tolist()]
    per_window = args.window_batches * args.batch_size
    idx = []
    for w in range(args.windows):
        s = w / (args.windows - 1)
        for first in (torch.rand(per_window, generator=g) < (1 + s * args.max_mix) / 2).tolist():
            pool = pools[0 if first else 1]
            if not pool:
                raise SystemExit("classmix: too few test images for --windows × window size; "
                                 "lower --max-mix or the window size")
            idx.append(pool.pop())
    return x_all[idx], y_all[idx]


def linear_forecast(values: torch.Tensor, horizon: int, window: int) -> torch.Tensor:
    """Least-squares line through the last ``window`` values, extrapolated 1..horizon ahead."""
    y = values[-window:].double()
    n = y.shape[0]
    if n < 2:
        return y[-1].expand(horizon).clone()
    t = torch.arange(n, dtype=torch.float64)
    slope = ((t - t.mean()) * (y - y.mean())).sum() / ((t - t.mean()) ** 2).sum()
    future = torch.arange(n, n + horizon, dtype=torch.float64)
    return y.mean() + slope * (future - t.mean())


#: variant suffix -> LindbladPredictor's ``time_dependent``
TIME_DEPENDENCE = {"_linearH": "linear", "_ramp": "ramp"}


def parse_variant(variant: str) -> tuple[str, str | bool, int | None]:
    """``"<objective>[_linearH|_ramp][@W]"`` -> (objective, time dependence, sliding fit
    window)."""
    name, _, window = variant.partition("@")
    mode: str | bool = False
    for suffix, td in TIME_DEPENDENCE.items():  # at most one suffix
        if name.endswith(suffix):
            name, mode = name.removesuffix(suffix), td
            break
    if name not in ("rollout", "one_step") or (window and not window.isdigit()):
        raise argparse.ArgumentTypeError(f"bad variant {variant!r}")
    return name, mode, int(window) if window else None


def lindblad_forecast(traj: torch.Tensor, variant: str,
                      args: argparse.Namespace) -> tuple[list[float], dict]:
    """Fit one LindbladPredictor variant on windows 0..o (or the last W of them) and forecast
    d_FS of windows o+1..o+k to ρ_0."""
    objective, mode, window = parse_variant(variant)
    reference = traj[0]
    if window is not None:
        traj = traj[-window:]
    t1 = time.perf_counter()
    pred = LindbladPredictor(min(args.rank, traj.shape[-1]), n_jump=args.n_jump,
                             time_dependent=mode, objective=objective,
                             steps=args.steps, polish_steps=args.polish_steps, dt=args.dt,
                             seed=args.seed)
    pred.fit(traj)
    fc = pred.forecast_distance(traj, args.horizon, reference=reference)
    return fc.tolist(), {"seconds": time.perf_counter() - t1, "fit_loss": pred.fit_loss}


class _Inline:
    """Executor stand-in that runs jobs at once (``--workers 1``)."""

    class _Done:
        def __init__(self, value: object) -> None:
            self.value = value

        def result(self) -> object:
            return self.value

    def submit(self, fn, *args):  # noqa: ANN001, ANN202
        return self._Done(fn(*args))

    def shutdown(self) -> None:
        pass


def track(model: torch.nn.Module, x_raw: torch.Tensor, y: torch.Tensor, kind: str,
          args: argparse.Namespace, device: torch.device) -> tuple[SpectralTracker, list[float]]:
    per_window = args.window_batches * args.batch_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    accs = []
    # the exact setting (every call, every row, float64): forecasting needs the low noise floor
    with torch.no_grad(), SpectralTracker(model, args.layers, window=args.window_batches,
                                          **EXACT) as tr:
        for w in range(args.windows):
            severity = w / (args.windows - 1)
            xs = x_raw[w * per_window:(w + 1) * per_window]
            ys = y[w * per_window:(w + 1) * per_window]
            correct = 0
            for b in range(args.window_batches):
                sl = slice(b * args.batch_size, (b + 1) * args.batch_size)
                xb = corrupt(xs[sl], kind, severity, args, gen).to(device)
                correct += int((model(xb).argmax(1).cpu() == ys[sl]).sum())
            accs.append(100.0 * correct / per_window)
    return tr, accs


def summarize(series: list[dict], methods: list[str], corruptions: list[str],
              horizon: int) -> dict:
    """Tables of a run: MAE per horizon over all series, MAE per corruption (all horizons) and
    over the longer horizons (the second half), and the series each forecaster won."""
    table = {m: [statistics.fmean(s["abs_errors"][m][h] for s in series) for h in range(horizon)]
             for m in methods}
    lines = ["| forecaster | " + " | ".join(f"h={h + 1}" for h in range(horizon)) + " | mean |",
             "|---|" + "---|" * (horizon + 1)]
    for m in methods:
        row = table[m]
        lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in row)
                     + f" | {statistics.fmean(row):.4f} |")
    long_from = horizon // 2
    by_corruption = {m: {kind: statistics.fmean(e for s in series if s["corruption"] == kind
                                                for e in s["abs_errors"][m])
                         for kind in corruptions} for m in methods}
    long_horizon = {m: statistics.fmean(e for s in series for e in s["abs_errors"][m][long_from:])
                    for m in methods}
    corr_lines = ["| forecaster | " + " | ".join(corruptions) + f" | all, h ≥ {long_from + 1} |",
                  "|---|" + "---|" * (len(corruptions) + 1)]
    for m in methods:
        corr_lines.append(f"| {m} | " + " | ".join(f"{by_corruption[m][k]:.4f}"
                                                   for k in corruptions)
                          + f" | {long_horizon[m]:.4f} |")
    wins = {m: sum(1 for s in series
                   if sum(s["abs_errors"][m]) <= min(sum(s["abs_errors"][q]) for q in methods))
            for m in methods}
    return dict(mae_by_horizon=table, markdown="\n".join(lines), mae_by_corruption=by_corruption,
                mae_long_horizon=long_horizon, markdown_by_corruption="\n".join(corr_lines),
                series_won=wins)


def print_summary(title: str, summary: dict) -> None:
    """Print the tables of :func:`summarize` under ``title``."""
    print(title)
    print(summary["markdown"])
    print("\nmean MAE per corruption (all horizons), and over all series at the longer horizons:")
    print(summary["markdown_by_corruption"])
    print("series won (lowest mean error): "
          + ", ".join(f"{m} {c}" for m, c in summary["series_won"].items()))


def render(path: Path) -> None:
    """Print the tables of a saved run (``--render``)."""
    result = json.loads(path.read_text())
    cfg = result["config"]
    methods = ["last value", "linear"] + [f"lindblad:{v}" for v in cfg["variants"]]
    summary = summarize(result["series"], methods, cfg["corruptions"], cfg["horizon"])
    print_summary(f"{path}: MAE of forecast d_FS(ψ_t, ψ_0) vs horizon, "
                  f"{len(result['series'])} series", summary)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="print the tables of a saved run and exit")
    p.add_argument("--corruptions", nargs="+", default=["rotation", "noise", "classmix"],
                   choices=["rotation", "noise", "classmix"])
    p.add_argument("--layers", nargs="+", default=["features.4", "features.8"])
    p.add_argument("--windows", type=int, default=24, help="windows in all")
    p.add_argument("--window-batches", type=int, default=2, help="batches per window")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--fit", type=int, default=12, help="windows seen at the first origin")
    p.add_argument("--horizon", type=int, default=6)
    p.add_argument("--origins", type=int, default=3, help="forecast origins, 3 windows apart")
    p.add_argument("--origin-stride", type=int, default=3)
    p.add_argument("--linear-window", type=int, default=4)
    p.add_argument("--max-angle", type=float, default=45.0, help="degrees at the last window")
    p.add_argument("--max-noise", type=float, default=1.0, help="noise std (raw [0,1] pixel "
                   "units) at the last window")
    p.add_argument("--max-mix", type=float, default=0.9, help="classmix: share of the last "
                   "window's images drawn from classes 0-4 is (1 + this) / 2")
    p.add_argument("--rank", type=int, default=8, help="reduced basis size for the predictor")
    p.add_argument("--n-jump", type=int, default=2)
    p.add_argument("--steps", type=int, default=300, help="Adam steps")
    p.add_argument("--polish-steps", type=int, default=200, help="L-BFGS steps")
    p.add_argument("--dt", type=float, default=1.0, help="integration sub-step (windows); for "
                   "H(t) variants 1.0 = one midpoint exponential per window")
    p.add_argument("--variants", nargs="+",
                   default=["rollout", "one_step@4", "one_step_ramp", "rollout_ramp"],
                   help="Lindblad variants '<rollout|one_step>[_linearH|_ramp][@W]': objective, "
                   "H(t) = H0 + t·H1, fit on the last W windows only (default: all)")
    p.add_argument("--overhead-iters", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="processes for the predictor fits "
                   "(each single-threaded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.render is not None:
        render(args.render)
        return {}
    for v in args.variants:
        try:
            parse_variant(v)
        except argparse.ArgumentTypeError as exc:
            p.error(str(exc))
    last_origin = args.fit - 1 + (args.origins - 1) * args.origin_stride
    if last_origin + args.horizon > args.windows - 1:
        p.error(f"--windows {args.windows} too few for fit/origins/horizon "
                f"(need {last_origin + args.horizon + 1})")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    env = environment(str(device))

    model, info = get_baseline("small_cnn")
    model = model.to(device).eval()
    n_images = args.windows * args.window_batches * args.batch_size
    x_raw, y = load_fashion_mnist("test", limit=n_images, normalize=False)
    order = torch.randperm(x_raw.shape[0], generator=torch.Generator().manual_seed(args.seed))
    x_raw, y = x_raw[order], y[order]

    methods = ["last value", "linear"] + [f"lindblad:{v}" for v in args.variants]
    series: list[dict] = []
    drift: dict[str, dict] = {}
    jobs = []
    pool = (ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"))
            if args.workers > 1 else _Inline())
    for kind in args.corruptions:
        t0 = time.perf_counter()
        xs, ys = classmix_stream(args) if kind == "classmix" else (x_raw, y)
        tr, accs = track(model, xs, ys, kind, args, device)
        print(f"[{kind}] tracked {args.windows} windows in {time.perf_counter() - t0:.1f}s; "
              f"accuracy {accs[0]:.1f}% -> {accs[-1]:.1f}%", flush=True)
        for layer in args.layers:
            traj = tr.trajectory(layer).cpu()
            d_ref = tr.distances(layer)["ref"]
            print(f"  {layer}: d={traj.shape[-1]}, d_FS to window 0: "
                  + " ".join(f"{v:.3f}" for v in d_ref.tolist()), flush=True)
            for k in range(args.origins):
                o = args.fit - 1 + k * args.origin_stride
                target = d_ref[o + 1:o + 1 + args.horizon]
                preds: dict[str, list[float]] = {
                    "last value": d_ref[o].expand(args.horizon).tolist(),
                    "linear": linear_forecast(d_ref[:o + 1], args.horizon,
                                              args.linear_window).tolist(),
                }
                entry = dict(corruption=kind, layer=layer, origin=o, target=target,
                             forecasts=preds, fits={})
                series.append(entry)
                for variant in args.variants:
                    jobs.append((entry, variant, pool.submit(
                        lindblad_forecast, traj[:o + 1].clone(), variant, args)))
        drift[kind] = dict(accuracy_per_window=accs,
                           d_ref_per_layer={layer: tr.distances(layer)["ref"].tolist()
                                            for layer in args.layers})
    for entry, variant, fut in jobs:
        forecast, info_fit = fut.result()
        entry["forecasts"][f"lindblad:{variant}"] = forecast
        entry["fits"][variant] = info_fit
    pool.shutdown()
    for entry in series:
        target = entry["target"]
        entry["abs_errors"] = {m: (torch.tensor(v, dtype=torch.float64) - target).abs().tolist()
                               for m, v in entry["forecasts"].items()}
        entry["target"] = target.tolist()
        print(f"  {entry['corruption']} {entry['layer']} origin {entry['origin']}: MAE "
              + ", ".join(f"{m} {sum(e) / len(e):.4f}" for m, e in entry["abs_errors"].items())
              + " | fit s: " + ", ".join(f"{v['seconds']:.1f}" for v in entry["fits"].values()),
              flush=True)

    summary = summarize(series, methods, args.corruptions, args.horizon)

    batch = corrupt(x_raw[:256], "noise", 0.0, args, torch.Generator())
    overhead = {}
    for dev in ([device, torch.device("cpu")] if device.type != "cpu" else [device]):
        m, b = model.to(dev), batch.to(dev)
        overhead[f"{dev.type}, tracked layers, exact"] = tracker_overhead(
            m, b, args.overhead_iters, modules=args.layers, window=args.window_batches, **EXACT)
        overhead[f"{dev.type}, all Conv/Linear, exact"] = tracker_overhead(
            m, b, args.overhead_iters, window=args.window_batches, **EXACT)
        overhead[f"{dev.type}, all Conv/Linear, defaults"] = tracker_overhead(
            m, b, args.overhead_iters)
    model.to(device)
    print()
    print_summary(f"MAE of forecast d_FS(ψ_t, ψ_0) vs horizon (windows), mean over {len(series)} "
                  f"series ({len(args.corruptions)} corruptions × {len(args.layers)} layers × "
                  f"{args.origins} origins):", summary)
    print("tracker throughput ratio tracked/untracked (batch 256): "
          + ", ".join(f"{k} {v:.3f}" for k, v in overhead.items()))
    result = dict(
        config=vars(args),  # write_results writes paths as text
        baseline=info, **summary,
        overhead_ratio=overhead, drift=drift, series=series, seconds=time.perf_counter() - start,
        env=env,
    )
    if args.out is not None:
        print(f"wrote {write_results(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
