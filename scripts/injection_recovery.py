"""Injection-recovery on the simulator: pulls of the recovered epoch fluxes against the truth.

Usage: python scripts/injection_recovery.py [--seeds 5] [--epochs 30] [--host sersic|image:FILE]
Prints pull mean, standard deviation and robust width over all measured epochs, and the
median chi2/dof. (The CRB comparison of VALIDATION.md is not implemented yet.)
"""

from __future__ import annotations

import argparse

import numpy as np
from astropy.coordinates import SkyCoord
import astropy.units as u

import transcene as ts
from transcene.simulate import SimulationConfig, simulate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--references", type=int, default=6)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--host", default="sersic")
    args = p.parse_args()
    pulls, chi2 = [], []
    for seed in range(args.seeds):
        cfg = SimulationConfig(n_epochs=args.epochs, n_reference=args.references, size=args.size, psf_size=21,
                               host=args.host, seed=seed)
        eps, truth = simulate(cfg)
        target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
        res = ts.fit(ts.make_dataset(eps, target))
        lc = res.lightcurve()
        sel = ~np.asarray(lc["is_reference"])
        pl = (np.asarray(lc["flux"]) - np.asarray(truth["flux_true"]))[sel] / np.asarray(lc["flux_err"])[sel]
        pulls.append(pl)
        chi2.append(np.asarray(lc["chi2_dof"]))
        print(f"seed {seed}: {res.status} in {res.n_iter} it, {res.elapsed:.0f} s; pull mean {pl.mean():+.2f} std {pl.std():.2f}", flush=True)
    pl = np.concatenate(pulls)
    mad = 1.4826 * np.median(np.abs(pl - np.median(pl)))
    print(f"{pl.size} epoch fluxes: pull mean {pl.mean():+.3f}, std {pl.std():.3f}, robust std {mad:.3f}; "
          f"median chi2/dof {np.median(np.concatenate(chi2)):.3f}")


if __name__ == "__main__":
    main()
