"""Injection-recovery metrics: the Cramer-Rao bound at the truth and the per-cell summary.

Used by ``scripts/validate.py`` (the validation campaign) and ``scripts/injection_recovery.py``.
Definitions follow VALIDATION.md: pull = (flux - true) / flux_err; robust std = 1.4826 MAD;
coverage = fraction of central 68.3 % / 95.4 % intervals containing the truth; CRB = sqrt of the
flux diagonal of the inverse Fisher matrix of the full model (all parameters, priors included)
evaluated at the truth.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from .result import FitResult
from .solve import Priors, flux_covariance, prior_arrays

__all__ = ["crb_at_truth", "cell_metrics", "COVERAGE_LEVELS"]

# nominal two-sided Gaussian levels: 1 sigma and 2 sigma
COVERAGE_LEVELS = (0.6827, 0.9545)


def crb_at_truth(result: FitResult, truth: Table) -> np.ndarray:
    """sqrt(diag(Fisher^-1)) of every epoch flux (nJy) at the true fluxes and position, zero
    shifts, and the host at its fitted values, in the row order of ``result.dataset.epochs``.

    The Fisher matrix depends on the linear host values only through the shift derivatives, so
    the fitted host stands in for the true one. ``truth`` rows must be in the order of the
    epochs given to ``make_dataset`` (as :func:`transcene.simulate.simulate` returns them).
    """
    ds = result.dataset
    scene = result.scene
    true_flux = np.asarray(truth["flux_true"], float)[np.asarray(ds.epochs["index"])]
    local = []
    for s_idx, loc in enumerate(scene.local):
        loc = np.array(loc)
        loc[:, 2:] = 0.0  # shifts and zero-point errors
        rows = np.flatnonzero(np.asarray(ds.epochs["stack"]) == s_idx)
        loc[np.asarray(ds.epochs["slot"])[rows], 0] = true_flux[rows]
        local.append(jnp.asarray(loc))
    truth_scene = eqx.tree_at(lambda s: (s.glob.position, s.local), scene, (jnp.zeros(2), tuple(local)))
    pa = prior_arrays(ds, Priors(), np.asarray(scene.glob.star_position))
    cov, *_ = flux_covariance(truth_scene, ds.stacks, ds.grid, pa, probes=128)  # 128 probes: exact here
    offsets = np.cumsum([0] + [st.n_epochs for st in ds.stacks])
    idx = offsets[np.asarray(ds.epochs["stack"])] + np.asarray(ds.epochs["slot"])
    return np.sqrt(np.diag(cov)[idx])


def cell_metrics(flux: np.ndarray, err: np.ndarray, true: np.ndarray, crb: np.ndarray) -> dict[str, float]:
    """Summary of one grid cell's epoch fluxes (nJy): bias in CRB units, pull widths, coverage
    and efficiency. NaN CRBs are left out of the CRB-based numbers."""
    flux, err, true, crb = (np.asarray(v, float) for v in (flux, err, true, crb))
    pull = (flux - true) / err
    med = np.median(pull)
    ok = np.isfinite(crb) & (crb > 0)
    return {
        "n": int(pull.size),
        "bias_crb": float(np.median((flux - true)[ok] / crb[ok])) if ok.any() else np.nan,
        "pull_mean": float(pull.mean()),
        "pull_std": float(pull.std(ddof=1)) if pull.size > 1 else np.nan,
        "pull_robust_std": float(1.4826 * np.median(np.abs(pull - med))),
        "coverage68": float(np.mean(np.abs(pull) < 1.0)),
        "coverage95": float(np.mean(np.abs(pull) < 2.0)),
        "err_over_crb": float(np.median(err[ok] / crb[ok])) if ok.any() else np.nan,
    }
