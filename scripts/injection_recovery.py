"""Injection-recovery on the simulator: pulls, interval coverage and flux_err / CRB.

Each seed simulates an independent data set (transient on a Sersic or a real HST host, seeing
varying by 2x, rotated and rescaled WCS per epoch, reference epochs), fits it blind with the
production path (``make_dataset`` + ``fit``, PixelHost), and compares every measured epoch flux
with the truth.

* pull = (flux - true) / flux_err, its mean, standard deviation and robust width;
* whitened pulls: the host couples the epochs of one data set (the light under the transient is
  known only from the transient-free epochs), so raw pulls within a seed are correlated and
  their mean scatters from seed to seed by much more than 1/sqrt(N). With the fitted covariance
  C = L L^T, L^-1 (flux - true) are independent N(0, 1) if the errors are right; their
  mean/std are the sharp test. The expected scatter of the raw pull mean is reported too;
* CRB: the Cramer-Rao bound of the same model (PixelHost with its prior) at the truth: the
  inverse Fisher matrix (all parameters) evaluated with the true fluxes, true position and zero
  shifts (the simulation has none), and the host at its fitted pixel values (the Fisher matrix
  does not depend on the linear host values except through the shift derivatives).

Usage: python scripts/injection_recovery.py [--seeds 7] [--epochs 30] [--references 6]
       [--host sersic|image:FILE] [--out ir.ecsv] [--plot ir.png]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table, vstack
import astropy.units as u

import transcene as ts
from transcene.simulate import SimulationConfig, simulate
from transcene.validation import crb_at_truth


def run_seed(seed: int, args) -> tuple[Table, dict]:
    cfg = SimulationConfig(n_epochs=args.epochs, n_reference=args.references, size=args.size, psf_size=21,
                           host=args.host, host_mag=args.host_mag, seeing_fwhm=(1.5, 3.0),
                           pixel_scale_jitter=0.05, rotate=True, seed=seed)
    eps, truth = simulate(cfg)
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.errors.ConvergenceWarning)
        res = ts.fit(ts.make_dataset(eps, target))
    elapsed = time.perf_counter() - t0
    lc = res.lightcurve()
    sel = ~np.asarray(lc["is_reference"])
    flux = np.asarray(lc["flux"])[sel]
    err = np.asarray(lc["flux_err"])[sel]
    true = np.asarray(truth["flux_true"])[sel]
    crb = crb_at_truth(res, truth)[sel] if seed < args.first_seed + args.crb_seeds else np.full(sel.sum(), np.nan)
    cov = res.epoch_covariance()[np.ix_(np.flatnonzero(sel), np.flatnonzero(sel))]
    chol = np.linalg.cholesky(cov)
    white = np.linalg.solve(chol, flux - true)
    corr = cov / np.outer(err, err)
    mean_sd = float(np.sqrt(corr.sum()) / sel.sum())  # std of the mean of N correlated unit pulls
    t = Table(dict(seed=np.full(sel.sum(), seed), exposure_id=np.asarray(lc["exposure_id"])[sel], flux=flux,
                   flux_err=err, flux_true=true, crb=crb, pull=(flux - true) / err, white=white,
                   chi2_dof=np.asarray(lc["chi2_dof"])[sel]))
    info = dict(seed=seed, status=res.status, n_iter=res.n_iter, elapsed=elapsed, mean_sd=mean_sd)
    return t, info


def summarise(t: Table, infos: list[dict]) -> str:
    pull = np.asarray(t["pull"])
    white = np.asarray(t["white"])
    mad = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    cov68 = np.mean(np.abs(pull) < 1.0)
    cov95 = np.mean(np.abs(pull) < 2.0)
    ratio = np.asarray(t["flux_err"]) / np.asarray(t["crb"])
    ratio = ratio[np.isfinite(ratio)]
    n_seed = len(infos)
    mean_sd = np.sqrt(np.sum([i["mean_sd"] ** 2 for i in infos])) / n_seed
    lines = [
        f"{len(pull)} epoch fluxes from {n_seed} data sets ({sum(i['status'] == 'converged' for i in infos)} converged; "
        f"median fit time {np.median([i['elapsed'] for i in infos]):.0f} s)",
        f"pull mean {pull.mean():+.3f} (expected scatter of this mean from the host-induced correlation: "
        f"{mean_sd:.3f}), std {pull.std():.3f}, robust std {mad:.3f}",
        f"whitened pulls: mean {white.mean():+.3f} (+- {1 / np.sqrt(len(white)):.3f}), std {white.std():.3f}",
        f"coverage 68.3%: {100 * cov68:.1f} %, 95.4%: {100 * cov95:.1f} %",
        f"flux_err / CRB ({ratio.size} epochs): median {np.median(ratio):.4f}, max {ratio.max():.4f}",
        f"median chi2/dof {np.median(t['chi2_dof']):.3f}",
    ]
    return "\n".join(lines)


def plot(t: Table, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    x = np.linspace(-4, 4, 200)
    for a, col, label in ((ax[0], "pull", "pull"), (ax[1], "white", "whitened pull")):
        a.hist(np.asarray(t[col]), bins=30, range=(-4, 4), density=True, alpha=0.6)
        a.plot(x, np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi), "k-", lw=1)
        a.set_xlabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=7)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--references", type=int, default=6)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--host", default="sersic")
    p.add_argument("--host-mag", type=float, default=18.0)
    p.add_argument("--crb-seeds", type=int, default=1000, help="compute the CRB for the first N seeds only")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    tables, infos = [], []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        t, info = run_seed(seed, args)
        tables.append(t)
        infos.append(info)
        print(f"seed {seed}: {info['status']} in {info['n_iter']} it, {info['elapsed']:.0f} s; "
              f"pull mean {np.mean(t['pull']):+.2f} (+- {info['mean_sd']:.2f}) std {np.std(t['pull']):.2f}; "
              f"whitened std {np.std(t['white']):.2f}; flux_err/CRB {np.median(t['flux_err'] / t['crb']):.4f}",
              flush=True)
    t = vstack(tables)
    print(summarise(t, infos))
    if args.out:
        t.meta["summary"] = summarise(t, infos)
        t.write(args.out, format="ascii.ecsv", overwrite=True)
    if args.plot:
        plot(t, args.plot)


if __name__ == "__main__":
    main()
