"""Time-varying redundancy (paper §3.3): track a layer's activation density matrix over a drifting
stream and forecast where it goes with a learned Lindblad model.

A SmallCNN sees Fashion-MNIST test images with Gaussian noise that grows window by window.
A ``SpectralTracker`` streams the Gram of one layer's outputs (no activation is stored) and
reports, per window, the Fubini–Study distance d_FS(ψ_t, ψ_0) of the activation spectral state to
the first window. A ``LindbladPredictor`` is fitted on the first windows and forecasts the
distance of the later ones — once with a constant generator and once with
``time_dependent="ramp"``, whose dissipation rates grow with time as the noise does;
``forecast_channel_redundancy`` turns the forecast density matrix into per-channel redundancy
scores (what predictive pruning ranks by).

Run: python examples/tracker_predictor.py
     python examples/tracker_predictor.py --quick            (seconds)
"""

from __future__ import annotations

import argparse

import torch

import torch_qmprune as qmprune
from torch_qmprune.data import load_fashion_mnist
from torch_qmprune.dynamics import forecast_density_matrix
from torch_qmprune.models import small_cnn


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--fit", type=int, default=8, help="windows the predictor sees")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--layer", default="features.4")
    parser.add_argument("--rank", type=int, default=6, help="reduced basis of the predictor")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.windows, args.fit, args.batch_size, args.rank, args.steps = 8, 5, 64, 4, 60
    torch.manual_seed(0)
    model = small_cnn().eval()
    x, _ = load_fashion_mnist("test", limit=args.windows * 2 * args.batch_size)
    gen = torch.Generator().manual_seed(1)

    # one window = 2 forward calls, both processed (the default, every=4, is the cheap setting
    # for long streams: one call in four)
    with torch.no_grad(), qmprune.SpectralTracker(model, [args.layer], window=2,
                                                  every=1) as tracker:
        for w, batch in enumerate(x.split(args.batch_size)):
            noise = 1.5 * (w // 2) / max(args.windows - 1, 1)
            model(batch + noise * torch.randn(batch.shape, generator=gen))
    d_fs = tracker.distances(args.layer)["ref"].tolist()
    print("d_FS(ψ_t, ψ_0) per window: " + " ".join(f"{v:.4f}" for v in d_fs))

    trajectory = tracker.trajectory(args.layer)  # (T, d, d) density matrices
    horizon = args.windows - args.fit
    actual = d_fs[args.fit:]
    print("actual:          " + " ".join(f"{v:.4f}" for v in actual))
    last_value = sum(abs(d_fs[args.fit - 1] - a) for a in actual) / horizon
    maes = {}
    for time_dependent in (False, "ramp"):
        # dt=1: one exponential per window for the ramp's time-dependent generator
        predictor = qmprune.LindbladPredictor(args.rank, time_dependent=time_dependent,
                                              objective="one_step", steps=args.steps,
                                              polish_steps=args.steps // 4, dt=1.0)
        predictor.fit(trajectory[:args.fit])
        forecast = predictor.forecast_distance(trajectory[:args.fit], horizon,
                                               reference=trajectory[0]).tolist()
        name = "ramp" if time_dependent else "constant"
        maes[name] = sum(abs(f - a) for f, a in zip(forecast, actual)) / horizon
        print(f"forecast {name:>8}: " + " ".join(f"{v:.4f}" for v in forecast))
    print(f"MAE Lindblad constant {maes['constant']:.4f}, ramp {maes['ramp']:.4f} vs "
          f"'last value' {last_value:.4f}")

    rho = forecast_density_matrix(trajectory[:args.fit], horizon, predictor=predictor)
    scores = qmprune.forecast_channel_redundancy(tracker, args.layer, 2, rank=args.rank,
                                                 steps=args.steps, objective="one_step")
    print(f"forecast ρ: trace {float(rho.trace()):.6f}; most redundant channels 2 windows "
          f"ahead: {scores.argsort()[:5].tolist()}")
    return {"d_fs": d_fs, "forecast": forecast, "actual": actual, "mae": maes,
            "mae_last_value": last_value, "rho_trace": float(rho.trace()),
            "redundancy": scores, "windows": len(d_fs)}


if __name__ == "__main__":
    main()
