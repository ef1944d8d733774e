"""Speed and memory benchmark of the core fit (not a test: machines are shared and noisy).

For each epoch count N (default 10 100 1000) it simulates N epochs of SIZE x SIZE cutouts (10 %
of them transient-free references, 2 bands, seeing 1.5-3", rotated epochs) and reports:

* build_s: reading the epochs into a Dataset;
* compile_value_grad_s / value_grad_s: first call (compilation + one evaluation) and time per
  likelihood+gradient;
* compile_gn_step_s / gn_step_s, gn_cg_iterations: first call and a repeat of one Gauss-Newton step (a CG solve of the
  reduced normal equations, tolerance as in a fit's first phase);
* fit_with_errors_s, gn_iterations, status: a whole fit with uncertainties, compilation
  included (only for N <= --max-fit-epochs; above it the fit time is not measured);
* warm_laplace_s, warm_linear_s: whole fits of a second simulated data set of the same shapes
  (another seed), after compilation (the linear fit's own programs compiled by a linear fit of
  the first data set): what a nightly run over many targets pays per target;
* peak_rss_mb: the process's peak resident memory (each N runs in its own process).

Usage: python scripts/benchmark.py [--epochs 10 100 1000] [--size 64] [--max-fit-epochs 200]
       [--out bench.ecsv] [--no-mixed-precision] [--no-newton]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, reps: int = 1):
    import jax

    t0 = time.perf_counter()
    for _ in range(reps):
        out = jax.block_until_ready(fn())
    return out, (time.perf_counter() - t0) / reps


def run(n: int, size: int, do_fit: bool, mixed: bool = True, newton: bool = True) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from astropy.coordinates import SkyCoord
    import astropy.units as u

    import transcene as ts
    from transcene.fit import PHASE1_TOL, initial_scene
    from transcene.simulate import SimulationConfig, simulate
    from transcene.solve import Priors, gauss_newton_step, objective, prior_arrays

    n_ref = max(n // 10, 1)
    cfg = SimulationConfig(n_epochs=max(n - n_ref, 1), n_reference=n_ref, size=size, bands=("g", "r"),
                           psf_size=25, seed=n)
    eps, truth = simulate(cfg)
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    t0 = time.perf_counter()
    ds = ts.make_dataset(eps, target)
    row = dict(n_epochs=n, size=size, grid=ds.grid.size, fit_radius_arcsec=ds.fit_radius, mixed_precision=str(mixed),
               newton=str(newton),
               build_s=time.perf_counter() - t0)
    scene = initial_scene(ds)
    pa = prior_arrays(ds, Priors(), np.zeros((0, 2)))
    # data passed as arguments, not closed over: closed-over arrays become compile-time
    # constants and make compilation grow with N
    vg = jax.jit(jax.value_and_grad(lambda s, st, p: objective(s, st, ds.grid, p)))
    _, row["compile_value_grad_s"] = _timed(lambda: vg(scene, ds.stacks, pa))
    _, row["value_grad_s"] = _timed(lambda: vg(scene, ds.stacks, pa), reps=3)
    tol = jnp.asarray(PHASE1_TOL)
    _, row["compile_gn_step_s"] = _timed(lambda: gauss_newton_step(scene, ds.stacks, ds.grid, pa, tol, mixed=mixed))
    out, row["gn_step_s"] = _timed(lambda: gauss_newton_step(scene, ds.stacks, ds.grid, pa, tol, mixed=mixed))
    row["gn_cg_iterations"] = int(out[2])
    if do_fit:
        t0 = time.perf_counter()
        res = ts.fit(ds, mixed_precision=mixed, newton=newton)
        row["fit_with_errors_s"] = time.perf_counter() - t0
        row["gn_iterations"] = res.n_iter
        row["status"] = res.status
        lc = res.lightcurve()
        sel = ~np.asarray(lc["is_reference"])
        pulls = (np.asarray(lc["flux"]) - np.asarray(truth["flux_true"]))[sel] / np.asarray(lc["flux_err"])[sel]
        row["pull_mean"] = float(np.mean(pulls))
        row["pull_std"] = float(np.std(pulls))
        eps2, truth2 = simulate(dataclasses.replace(cfg, seed=n + 1))
        # the same fitted region, so the same shapes (the default radius follows the seeing)
        ds2 = ts.make_dataset(eps2, SkyCoord(truth2.meta["transient_ra"] * u.deg, truth2.meta["transient_dec"] * u.deg),
                              fit_radius=ds.fit_radius)
        if ds2.grid.size != ds.grid.size:
            raise RuntimeError("second data set has another model grid: the warm fits would compile")
        for method in ("laplace", "linear"):
            if method != "laplace":
                # its own programs (the geometry-frozen covariance) compiled first: "after
                # compilation", as for the Laplace fit above
                ts.fit(ds, method=method, mixed_precision=mixed, newton=newton)
            t0 = time.perf_counter()
            res2 = ts.fit(ds2, method=method, mixed_precision=mixed, newton=newton)
            row[f"warm_{method}_s"] = time.perf_counter() - t0
            row[f"warm_{method}_status"] = res2.status
    row["peak_rss_mb"] = _peak_mb()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--max-fit-epochs", type=int, default=200, help="run whole fits only up to this N")
    p.add_argument("--out", default=None)
    p.add_argument("--no-mixed-precision", dest="mixed", action="store_false",
                   help="float64 throughout (fit(mixed_precision=False)), for comparison")
    p.add_argument("--no-newton", dest="newton", action="store_false",
                   help="Gauss-Newton steps only (fit(newton=False)), for comparison")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.one is not None:
        row = run(args.one, args.size, args.one <= args.max_fit_epochs, args.mixed, args.newton)
        print(json.dumps(row), flush=True)
        return
    rows = []
    for n in args.epochs:
        cmd = ([sys.executable, __file__, "--one", str(n), "--size", str(args.size),
                "--max-fit-epochs", str(args.max_fit_epochs)] + ([] if args.mixed else ["--no-mixed-precision"])
               + ([] if args.newton else ["--no-newton"]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"N={n}: failed\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if args.out and rows:
        from astropy.table import Table

        keys = list(dict.fromkeys(k for r in rows for k in r))
        text = {k for r in rows for k, v in r.items() if isinstance(v, str)}
        cols = {k: [r.get(k, "" if k in text else float("nan")) for r in rows] for k in keys}
        Table(cols).write(args.out, format="ascii.ecsv", overwrite=True)


if __name__ == "__main__":
    main()
