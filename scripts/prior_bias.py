"""The host prior's deterministic flux bias in a validation cell, from noiseless data.

For each seed, the cell is simulated without noise and solved linearly with the transient at its
true position and no shifts (the control variate's linearisation point,
``transcene.validation.linear_oracle``). Noise cannot bias these fluxes, so their mean error in
units of the Cramer-Rao bound (the posterior sd there, priors included) is what the priors alone
do: chiefly the pixel host's high-frequency prior smoothing a sharp host under the transient.
Run it for several ``--host-strength`` values to see how the bias scales with the prior.

    python scripts/prior_bias.py host:hsc-blend --seeds 5 --host-strength 1e-3 1e-4

Prints one line per seed and strength; a few seconds to a minute per line on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np


def _validate_module():
    path = Path(__file__).resolve().parent / "validate.py"
    spec = importlib.util.spec_from_file_location("validate", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["validate"] = mod
    spec.loader.exec_module(mod)
    return mod


def noiseless_bias(cell, seed: int, host_strength: float) -> np.ndarray:
    """(flux - true) / CRB per free epoch of the noiseless linear solution at the truth."""
    from transcene.solve import Priors, flux_estimator_variance
    from transcene.validation import truth_linearisation

    V = sys.modules["validate"]
    _, truth, target, (_, clean) = V.simulate_cell(cell, V.MODES["full"], seed)
    ds, pa, theta = truth_linearisation(clean, target, Priors(host_strength=host_strength), **cell.dataset_options)
    post, _ = flux_estimator_variance(theta, ds.stacks, ds.grid, pa, mixed=False)
    rows = ds.stack_rows()
    flux = np.concatenate([np.asarray(loc[:, 0]) for loc in theta.local])[rows]
    crb = np.sqrt(np.maximum(post[rows], 0.0))
    true = {str(r["exposure_id"]): float(r["flux_true"]) for r in truth}
    ftrue = np.array([true[str(x)] for x in ds.epochs["exposure_id"]])
    ok = crb > 0
    return (flux - ftrue)[ok] / crb[ok]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cell", help="a validation cell by name, as in scripts/validate.py (e.g. baseline:- or host:hsc-blend)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--host-strength", type=float, nargs="+", default=[1e-3])
    args = p.parse_args()
    V = _validate_module()
    cells = {c.name: c for c in V.CELLS}
    if args.cell not in cells:
        p.error(f"unknown cell {args.cell!r}; known: {', '.join(cells)}")
    for seed in range(args.seeds):
        for hs in args.host_strength:
            b = noiseless_bias(cells[args.cell], seed, hs)
            print(f"{args.cell} seed {seed} host_strength {hs:g}: noiseless bias mean {np.mean(b):+.4f} CRB, "
                  f"median {np.median(b):+.4f} ({b.size} epochs)", flush=True)


if __name__ == "__main__":
    main()
