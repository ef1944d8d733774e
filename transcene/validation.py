"""Injection-recovery metrics: the Cramer-Rao bound at the truth and the per-cell summary.

Used by ``scripts/validate.py`` (the validation campaign) and ``scripts/injection_recovery.py``.
Definitions follow VALIDATION.md: pull = (flux - true) / flux_err; robust std = 1.4826 MAD;
coverage = fraction of central 68.3 % / 95.4 % intervals containing the truth; CRB = sqrt of the
flux diagonal of the inverse Fisher matrix of the full model (all parameters, priors included)
evaluated at the truth.
"""

from __future__ import annotations

import math
import warnings

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table

from .dataset import make_dataset
from .epoch import Epoch
from .fit import initial_scene
from .result import FitResult
from .scene import render_stack
from .solve import Priors, flux_covariance, flux_estimator_variance, freeze_geometry, gauss_newton_step, \
    linear_solution, prior_arrays

__all__ = ["crb_at_truth", "cell_metrics", "linear_oracle", "truth_linearisation", "control_variate_metrics",
           "coverage_sd_floor", "COVERAGE_LEVELS"]

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
    return np.sqrt(np.diag(cov)[ds.stack_rows()])


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


#: CG relative residual of ``linear_oracle``'s two Gauss-Newton solves (float64). Each solve is
#: a whole step from ``theta0`` and the oracle is their difference, so the residual tolerance of
#: a fit (1e-4) leaves errors of its own: measured on validation cell sb:21 seed 1 against 1e-7,
#: up to 0.015 CRB (mean 0.004) in float64 and 0.08 CRB (mean 0.055) with the mixed-precision
#: operator, whose float32 rounding slows CG's last digits; float64 to 1e-6: < 5e-4 CRB
ORACLE_TOL = 1e-6


def truth_linearisation(clean: list[Epoch], target: SkyCoord, priors: Priors = Priors(), **dataset_options):
    """``linear_oracle``'s linearisation point: the noiseless epochs ``clean`` built into a data
    set like the fitted one (``dataset_options`` as given to ``make_dataset``), solved linearly
    with the transient at ``target`` (the truth) and no shifts, in float64 to ``ORACLE_TOL``.
    Its fluxes differ from the truth only by what the ``priors`` do (``scripts/prior_bias.py``).
    Returns ``(dataset, prior arrays, theta0)``."""
    with warnings.catch_warnings():
        # the fitted data set raised these already (no references, skipped epochs)
        warnings.simplefilter("ignore")
        ds = make_dataset(clean, target, **dataset_options)
    scene = initial_scene(ds)  # position at the target; no shifts
    pa = prior_arrays(ds, priors, np.asarray(scene.glob.star_position))
    scene0, frozen, pa_frozen = freeze_geometry(scene, ds.stacks, pa, ds.grid)
    # float64 throughout (mixed=False): the oracle is a reference, its rounding must not matter
    theta0, _, _ = linear_solution(scene0, frozen, ds.grid, pa_frozen, mixed=False, tol=ORACLE_TOL)  # zero shifts: valid unfrozen too
    return ds, pa, theta0


def linear_oracle(noise: list[Epoch], clean: list[Epoch], target: SkyCoord,
                  **dataset_options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A control variate for injection-recovery: the flux errors that the fitted model,
    linearised at a point that does not depend on the noise, makes on the noise alone.

    ``clean``: the noiseless simulation; ``noise``: the same epochs with their images replaced by
    the injected noise (data minus ``clean``, outliers left out). Both are built into data sets
    exactly like the fitted one (``dataset_options`` as given to ``make_dataset``). The
    linearisation point ``theta0`` is the linear solution on the noiseless data with the transient
    at ``target`` (the truth) and no shifts: host pixels, fluxes and skies close to the truth.
    There the fitted model's Gauss-Newton system (every free parameter: host, position, shifts,
    and zero points or PSF widths where the data set fits them; the same priors) gives
    ``z = H^-1 J^T W n``. Linear in the noise ``n`` with a design that does not depend on it, ``z``
    has mean exactly 0 and known variance, yet it follows the fit's first-order response to the
    noise, shifts and position included; ``fit error - z`` measures the fit's bias and error
    calibration with several times less variance (``control_variate_metrics``).

    The posterior sd at ``theta0`` is the Cramer-Rao bound of the full model at the truth,
    priors included (VALIDATION.md), with the host at its noise-free value; ``crb_at_truth``
    has to stand in the fitted (noisy) host, which makes the shifts look better measured: its
    bound is 0-8 % lower (median 0-2 %) on the campaign's cells.

    Returns ``(z, sd, crb)`` in nJy, one entry per epoch (input order; NaN where the epoch is
    skipped or its flux is not free): ``sd`` the exact sampling sd of ``z``, ``crb`` the bound
    (``flux_estimator_variance``'s two variances).
    """
    ds, pa, theta0 = truth_linearisation(clean, target, **dataset_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in truth_linearisation
        ds_noise = make_dataset(noise, target, **dataset_options)
    models = [render_stack(theta0.glob, loc, st, ds.grid) for loc, st in zip(theta0.local, ds.stacks)]

    def step_fluxes(with_noise: bool) -> np.ndarray:
        stacks = tuple(
            eqx.tree_at(lambda s: s.data, st, jnp.where(st.weight > 0, m + (st_n.data if with_noise else 0.0), 0.0))
            for m, st, st_n in zip(models, ds.stacks, ds_noise.stacks))
        step, *_ = gauss_newton_step(theta0, stacks, ds.grid, pa, ORACLE_TOL, mixed=False)
        return np.concatenate([np.asarray(loc[:, 0]) for loc in step.local])

    # the step is affine in the residual: its noise-free part (the prior's pull, the shifts'
    # gradient at theta0) does not depend on the noise and cancels
    flux = step_fluxes(True) - step_fluxes(False)
    post, samp = flux_estimator_variance(theta0, ds.stacks, ds.grid, pa, mixed=False)
    rows = ds.stack_rows()
    free = np.concatenate([np.asarray(st.free_flux * st.valid) for st in ds.stacks])[rows] > 0
    z, sd, crb = (np.full(len(noise), np.nan) for _ in range(3))
    idx = np.asarray(ds.epochs["index"])
    z[idx] = np.where(free, flux[rows], np.nan)
    sd[idx] = np.where(free, np.sqrt(np.maximum(samp[rows], 0.0)), np.nan)
    crb[idx] = np.where(free, np.sqrt(np.maximum(post[rows], 0.0)), np.nan)
    return z, sd, crb


def control_variate_metrics(flux, err, true, crb, z, z_sd) -> dict[str, float]:
    """``cell_metrics``' bias, pull width and coverage measured against a control variate ``z``
    (``linear_oracle``: zero mean, sampling sd ``z_sd``, same noise as the fluxes):

        bias_cv       mean((flux - true - z) / crb)                           -> E[(flux - true) / crb]
        pull_rms_cv   sqrt(mean(pull^2) - mean((z / err)^2) + mean(r^2))       -> sqrt(E[pull^2])
        coverageX_cv  mean(|pull| < k) - mean(|z / err| < k) + mean(P_k(r))    -> E[coverage]

    with ``r = z_sd / err`` and ``P_k(r) = P(|N(0, r^2)| < k)``, the known expectations of the
    subtracted terms. Each is an unbiased estimate (the pull rms: its square) of the quantity on
    the right, whatever the correlation; the variance falls by the share of the fit's noise
    response that ``z`` reproduces. ``z`` enters in the fit's units (over ``err``, not over its
    own sd): where the prior dominates (no or one transient-free epoch) the estimator scatters
    less than its posterior error (``z_sd / err`` 0.58 with no reference epoch), and ``z / z_sd``
    would then track the pull badly (cell nref:0: pull rms 0.88 +- 0.04 that way, where the raw
    pulls and this form give ~0.6). The bias is
    a mean rather than VALIDATION.md's median: the mean of a difference is the difference of
    means, so only the mean can be corrected exactly (the two agree for symmetric errors).
    """
    flux, err, true, crb, z, z_sd = (np.asarray(v, float) for v in (flux, err, true, crb, z, z_sd))
    ok = np.isfinite(z) & np.isfinite(z_sd) & (z_sd > 0) & np.isfinite(crb) & (crb > 0)
    if not ok.any():
        return {"bias_cv": np.nan, "pull_rms_cv": np.nan, "coverage68_cv": np.nan, "coverage95_cv": np.nan}
    e, pull, pz, r = (flux - true)[ok], ((flux - true) / err)[ok], (z / err)[ok], (z_sd / err)[ok]
    ms = np.mean(pull**2) - np.mean(pz**2) + np.mean(r**2)
    out = {"bias_cv": float(np.mean((e - z[ok]) / crb[ok])), "pull_rms_cv": float(np.sqrt(ms)) if ms > 0 else np.nan}
    for name, k in (("coverage68_cv", 1.0), ("coverage95_cv", 2.0)):
        expected = np.mean([math.erf(k / (math.sqrt(2.0) * ri)) for ri in r])  # E[1{|z / err| < k}]
        out[name] = float(np.mean(np.abs(pull) < k) - np.mean(np.abs(pz) < k) + expected)
    return out


def coverage_sd_floor(flux, err, true, z=None, z_sd=None) -> dict[str, float]:
    """Standard deviations of the coverage estimates as if every flux were an independent draw:
    ``coverageX`` (binomial) and, with a control variate, ``coverageX_cv`` (the sd of the
    per-flux indicator difference ``1{|pull| < k} - 1{|z / err| < k}`` over sqrt(n)).

    A floor for the bootstrap over seeds, which with few seeds underestimates: with 4 seeds its
    sd of the cv coverage (cell offset:0.0fwhm, 104 fluxes) was 0.8 points where the indicator
    differences alone give 1.6: fluxes near the interval's edge fall on opposite sides of it
    for the fit and the control variate.
    """
    flux, err, true = (np.asarray(v, float) for v in (flux, err, true))
    pull = (flux - true) / err
    n = pull.size
    out = {}
    for name, k in (("coverage68", 1.0), ("coverage95", 2.0)):
        c = np.mean(np.abs(pull) < k) if n else np.nan
        out[name] = float(np.sqrt(c * (1.0 - c) / n)) if n else np.nan
    if z is None:
        return out
    z, z_sd = np.asarray(z, float), np.asarray(z_sd, float)
    ok = np.isfinite(z) & np.isfinite(z_sd) & (z_sd > 0)
    for name, k in (("coverage68_cv", 1.0), ("coverage95_cv", 2.0)):
        d = (np.abs(pull[ok]) < k).astype(float) - (np.abs(z[ok] / err[ok]) < k)  # as control_variate_metrics
        out[name] = float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else np.nan
    return out
