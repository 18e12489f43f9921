"""Does :class:`~torch_qmprune.dynamics.LindbladPredictor` recover a known Lindblad system?
(arXiv 2512.00880 §3.3; issue #6: "on trajectories generated from a known Lindblad system, the fit
recovers them (error table vs horizon)").

Set-up: random d-level systems of each generator family the predictor offers — constant
(``False``), H(t) = H_0 + t·H_1 (``"linear"``) and a ramping dissipator 𝓛[H_0; L] + t·D[M]
(``"ramp"``) — with K = 2 jump operators, each simulated with matrix exponentials for
``--windows`` windows of ``--step`` time units from a random full-rank ρ_0 (exact for the
constant family; the time-dependent ones take midpoint sub-steps of 0.05). A predictor of the same
family, started from fresh random parameters, is fitted on the first ``--fit`` windows (optionally
with Hermitian Gaussian noise of std ``--noise`` added to every observed entry, then projected
back to a density matrix) and forecasts the next ``--horizon`` windows from the last observed
one. Reported per family and horizon: the Frobenius error ‖ρ̂ − ρ‖_F and the error of the forecast
d_FS(ψ_t, ψ_0), median over ``--systems`` systems, next to the same errors of the "last value"
forecast (ρ̂ = ρ_o) for scale.

Run: ``python benchmarks/lindblad_recovery.py --out docs/results/lindblad_recovery.json``
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from torch_qmprune.bench import environment, write_results
from torch_qmprune.dynamics import LindbladPredictor, _clip_density, spectral_state_of_density
from torch_qmprune.spectral import fubini_study

C128 = torch.complex128
FAMILIES = ("static", "linear", "ramp")
MODE = {"static": False, "linear": "linear", "ramp": "ramp"}


def random_system(d: int, family: str, seed: int) -> tuple[LindbladPredictor, torch.Tensor]:
    """A known system of ``family`` (operators of unit-ish scale) and a random full-rank ρ_0."""
    g = torch.Generator().manual_seed(seed)

    def herm(scale: float) -> torch.Tensor:
        a = torch.randn(d, d, dtype=C128, generator=g)
        return scale * (a + a.conj().T) / 2 / math.sqrt(d)

    def jumps(scale: float) -> torch.Tensor:
        return scale * torch.randn(2, d, d, dtype=C128, generator=g) / math.sqrt(d)

    H, L = herm(1.0), jumps(0.3)
    H1 = herm(0.2) if family == "linear" else None
    M = jumps(0.3) if family == "ramp" else None
    b = torch.randn(d, d, dtype=C128, generator=g)
    rho0 = b @ b.conj().T
    return LindbladPredictor.from_operators(H, L, H1, M, dt=0.05), rho0 / torch.trace(rho0)


def d_fs(rho: torch.Tensor, ref: torch.Tensor) -> float:
    return float(fubini_study(spectral_state_of_density(_clip_density(rho)),
                              spectral_state_of_density(ref)))


def one(family: str, seed: int, args: argparse.Namespace) -> dict:
    truth, rho0 = random_system(args.dim, family, seed)
    traj = torch.cat([rho0[None], truth.predict(rho0, args.windows - 1, step=args.step)])
    observed = traj[:args.fit].clone()
    if args.noise > 0:
        g = torch.Generator().manual_seed(10_000 + seed)
        e = args.noise * torch.randn(observed.shape, dtype=C128, generator=g)
        # (n + n†)/√2: every entry, diagonal or not, has standard deviation args.noise
        observed = torch.stack([_clip_density(r + (n + n.conj().T) / math.sqrt(2))
                                for r, n in zip(observed, e)])
    times = args.step * torch.arange(args.fit, dtype=torch.float64)
    t1 = time.perf_counter()
    model = LindbladPredictor(args.dim, n_jump=2, time_dependent=MODE[family],
                              objective=args.objective, dt=args.dt, steps=args.steps,
                              polish_steps=args.polish_steps, seed=seed)
    model.fit(observed, times)
    seconds = time.perf_counter() - t1
    o = args.fit - 1
    pred = model.predict(observed[-1], args.horizon, t0=float(times[-1]))
    future = traj[o + 1:o + 1 + args.horizon]
    last = observed[-1].expand_as(future)
    frob = lambda a, b: (a - b).abs().pow(2).sum((-2, -1)).sqrt().tolist()  # noqa: E731
    true_d = [d_fs(r, traj[0]) for r in future]
    return dict(
        family=family, seed=seed, seconds=seconds, fit_loss=model.fit_loss,
        frob=frob(pred, future), frob_last=frob(last, future),
        dfs=[abs(d_fs(p, traj[0]) - t) for p, t in zip(pred, true_d)],
        dfs_last=[abs(d_fs(observed[-1], traj[0]) - t) for t in true_d],
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--systems", type=int, default=5, help="random systems per family")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--fit", type=int, default=12, help="windows observed")
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--step", type=float, default=0.5, help="time between windows")
    p.add_argument("--noise", type=float, default=0.0, help="observation noise std per entry")
    p.add_argument("--objective", default="one_step", choices=["one_step", "rollout"])
    p.add_argument("--dt", type=float, default=0.1, help="integration sub-step of the fit "
                   "(the known systems are simulated with 0.05)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--polish-steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.fit + args.horizon > args.windows:
        p.error(f"--fit {args.fit} + --horizon {args.horizon} > --windows {args.windows}")
    start = time.perf_counter()
    env = environment("cpu")
    pool = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"))
    futures = [pool.submit(one, f, s, args) for f in FAMILIES for s in range(args.systems)]
    runs = [f.result() for f in futures]
    pool.shutdown()

    horizons = sorted(h for h in {1, 2, 4, args.horizon} if h <= args.horizon)
    lines = ["| system | error | " + " | ".join(f"h={h}" for h in horizons) + " |",
             "|---|---|" + "---|" * len(horizons)]
    table: dict[str, dict[str, list[float]]] = {}
    for family in FAMILIES:
        rs = [r for r in runs if r["family"] == family]
        table[family] = {}
        for key, label in (("frob", "‖ρ̂−ρ‖_F, Lindblad fit"), ("frob_last", "‖ρ̂−ρ‖_F, last value"),
                           ("dfs", "|Δd_FS|, Lindblad fit"), ("dfs_last", "|Δd_FS|, last value")):
            med = [statistics.median(r[key][h - 1] for r in rs) for h in horizons]
            table[family][key] = med
            lines.append(f"| {family} | {label} | " + " | ".join(f"{v:.1e}" for v in med) + " |")
    print(f"median over {args.systems} systems per family, d = {args.dim}, fitted on "
          f"{args.fit} windows, noise {args.noise}:")
    print("\n".join(lines))
    result = dict(
        config=vars(args),  # write_results writes paths as text
        horizons=horizons, median=table, markdown="\n".join(lines), runs=runs,
        seconds=time.perf_counter() - start,
        env=env,
    )
    if args.out is not None:
        print(f"wrote {write_results(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
