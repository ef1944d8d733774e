"""Speed and memory benchmark of the core fit (not a test: machines are shared and noisy).

For each epoch count N (default 10 100 1000) it simulates N epochs of SIZE x SIZE cutouts and
reports: dataset build time, compile time of one Gauss-Newton step, time per
likelihood+gradient evaluation, time to a converged fit with flux uncertainties, and the peak
resident memory of the process.

Usage: python scripts/benchmark.py [--epochs 10 100 1000] [--size 64] [--out bench.ecsv]
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table
import astropy.units as u

import transcene as ts
from transcene.fit import initial_scene
from transcene.simulate import SimulationConfig, simulate
from transcene.solve import Priors, gauss_newton_step, objective, prior_arrays


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(n: int, size: int) -> dict:
    cfg = SimulationConfig(n_epochs=max(n - max(n // 10, 1), 1), n_reference=max(n // 10, 1), size=size,
                           bands=("g", "r"), psf_size=25, seed=n)
    eps, truth = simulate(cfg)
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    t0 = time.perf_counter()
    ds = ts.make_dataset(eps, target)
    t_build = time.perf_counter() - t0
    scene = initial_scene(ds)
    pa = prior_arrays(ds, Priors(), np.zeros((0, 2)))
    vg = jax.jit(jax.value_and_grad(lambda s: objective(s, ds.stacks, ds.grid, pa)))
    t0 = time.perf_counter()
    jax.block_until_ready(vg(scene))
    t_compile_vg = time.perf_counter() - t0
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        jax.block_until_ready(vg(scene))
    t_vg = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    jax.block_until_ready(gauss_newton_step.lower(scene, ds.stacks, ds.grid, pa).compile())
    t_compile_gn = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = ts.fit(ds)
    t_fit = time.perf_counter() - t0
    lc = res.lightcurve()
    sel = ~np.asarray(lc["is_reference"])
    pulls = (np.asarray(lc["flux"]) - np.asarray(truth["flux_true"]))[sel] / np.asarray(lc["flux_err"])[sel]
    return dict(n_epochs=n, size=size, grid=ds.grid.size, build_s=t_build, compile_value_grad_s=t_compile_vg,
                value_grad_s=t_vg, compile_gn_step_s=t_compile_gn, fit_with_errors_s=t_fit,
                gn_iterations=res.n_iter, status=res.status, peak_rss_mb=_peak_mb(),
                pull_mean=float(np.mean(pulls)), pull_std=float(np.std(pulls)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for n in args.epochs:
        r = run(n, args.size)
        rows.append(r)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if args.out:
        Table(rows=rows).write(args.out, format="ascii.ecsv", overwrite=True)


if __name__ == "__main__":
    main()
