"""Fitting a scene to a dataset: MAP by Gauss-Newton, then the exact Gaussian flux covariance."""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Callable, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from astropy.coordinates import SkyCoord

from .dataset import Dataset
from .errors import ConvergenceWarning, FitError
from .geometry import sky_to_offsets
from .host import PixelHost, SersicHost
from .result import FitResult
from .scene import N_LOCAL, Scene, SceneGlobal
from .solve import Priors, chi2_per_epoch, flux_covariance, gauss_newton_step, objective, prior_arrays

__all__ = ["fit", "initial_scene"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]


def initial_scene(ds: Dataset, host: Literal["pixel", "sersic"] = "pixel", stars: SkyCoord | None = None) -> Scene:
    """A starting point: empty host, transient at the target, no shifts, zero fluxes and skies."""
    nb = len(ds.bands)
    if host == "pixel":
        h = PixelHost(image=jnp.zeros((nb, ds.grid.host_size, ds.grid.host_size)))
    elif host == "sersic":
        n0 = 1.0
        h = SersicHost(
            flux=jnp.zeros(nb),
            centre=jnp.zeros(2),
            log_re=jnp.asarray(math.log(max(ds.fit_radius / 4.0, 0.5))),
            n_raw=jnp.asarray(math.log((n0 - 0.3) / (8.0 - n0))),
            e_raw=jnp.asarray([0.05, 0.0]),
        )
    else:
        raise ValueError(f"host must be 'pixel' or 'sersic', got {host!r}")
    if stars is not None and len(np.atleast_1d(stars)) > 0:
        star_pos = sky_to_offsets(ds.target, stars.reshape(-1))
    else:
        star_pos = np.zeros((0, 2))
    glob = SceneGlobal(
        host=h,
        position=jnp.zeros(2),
        star_position=jnp.asarray(star_pos, dtype=float),
        star_flux=jnp.zeros((len(star_pos), nb)),
    )
    local = tuple(jnp.zeros((st.n_epochs, N_LOCAL)) for st in ds.stacks)
    return Scene(glob=glob, local=local)


def _nonlinear_step(step: Scene) -> float:
    """Largest step in the non-linear parameters (arcsec or unconstrained units)."""
    vals = [jnp.max(jnp.abs(step.glob.position))]
    if step.glob.star_position.size:
        vals.append(jnp.max(jnp.abs(step.glob.star_position)))
    for loc in step.local:
        vals.append(jnp.max(jnp.abs(loc[:, 2:])))
    h = step.glob.host
    if isinstance(h, SersicHost):
        vals += [jnp.max(jnp.abs(h.centre)), jnp.abs(h.log_re), jnp.abs(h.n_raw), jnp.max(jnp.abs(h.e_raw))]
    return float(max(vals))


def fit(
    ds: Dataset,
    *,
    host: Literal["pixel", "sersic"] = "pixel",
    priors: Priors = Priors(),
    stars: SkyCoord | None = None,
    fit_shifts: bool = True,
    max_iter: int = 20,
    init: Scene | None = None,
    progress: ProgressCallback | None = None,
) -> FitResult:
    """Fit the scene to ``ds`` and return the light curve with Gaussian flux errors.

    The MAP is found by Gauss-Newton over all parameters (exact in the linear ones); flux errors
    come from the inverse of the same normal matrix, marginalised over the host, the transient
    position and the per-epoch sky and shifts.

    Args:
        host: ``"pixel"`` (non-parametric, default) or ``"sersic"``.
        priors: prior widths; see :class:`~transcene.solve.Priors`.
        stars: static point sources (stars, a constant nucleus) to model, as sky coordinates.
        fit_shifts: fit a per-epoch astrometric shift (prior width set in the dataset).
        progress: called as ``progress(step, total, message)``.
    """
    t0 = time.perf_counter()
    scene = init if init is not None else initial_scene(ds, host, stars)
    star_centre = np.asarray(scene.glob.star_position)
    pa = prior_arrays(ds, priors, star_centre)
    stacks = ds.stacks
    if not fit_shifts:
        # a prior of 1e-8 arcsec pins the shifts at zero without changing the algebra
        stacks = tuple(eqx.tree_at(lambda s: s.shift_prec, st, jnp.full_like(st.shift_prec, 1e16)) for st in stacks)
    grid = ds.grid
    obj = float(objective(scene, stacks, grid, pa))
    history = [obj]
    status = "not_converged"
    n_iter = 0
    cg_total = 0
    for it in range(1, max_iter + 1):
        step, fvar, cg_it, cg_res = gauss_newton_step(scene, stacks, grid, pa)
        cg_total += int(cg_it)
        if not np.isfinite(float(cg_res)) or float(cg_res) > 1e-4:
            log.warning("linear solve reached relative residual %.2e after %d iterations", float(cg_res), int(cg_it))
        alpha = 1.0
        accepted = False
        for _ in range(12):
            trial = jax.tree_util.tree_map(lambda a, d: a + alpha * d, scene, step)
            new = float(objective(trial, stacks, grid, pa))
            if np.isfinite(new) and new <= obj + 1e-9 * abs(obj):
                accepted = True
                break
            alpha *= 0.5
        n_iter = it
        if not accepted:
            status = "line_search_failed"
            break
        dnl = alpha * _nonlinear_step(step)
        # largest flux change in units of its (conditional) standard deviation
        dflux = max(
            float(jnp.max(jnp.abs(alpha * d[:, 0]) / jnp.sqrt(v + 1e-300) * st.free_flux))
            for d, v, st in zip(step.local, fvar, stacks)
        )
        decrease = obj - new
        scene, obj = trial, new
        history.append(obj)
        log.debug(
            "GN iteration %d: objective %.6f (decrease %.3g, flux step %.2e sigma, non-linear step %.2e, "
            "alpha %.3g, cg %d, res %.1e)", it, obj, decrease, dflux, dnl, alpha, int(cg_it), float(cg_res),
        )
        if progress is not None:
            progress(it, max_iter, f"objective {obj:.1f}")
        # converged when a further step could not change any flux by more than 2 % of its error
        # nor the fit's chi^2 by a statistically meaningful amount
        if (dflux < 0.02 and decrease < 0.5) or (decrease < 1e-3 and dnl < 1e-4):
            status = "converged"
            break
    if status != "converged":
        warnings.warn(
            f"the fit did not converge ({status}) after {n_iter} Gauss-Newton iterations; "
            "the light curve is flagged",
            ConvergenceWarning,
            stacklevel=2,
        )
    cov, local_var, pos_cov, cov_cg = flux_covariance(scene, stacks, grid, pa)
    cov = np.asarray(cov)
    if not np.all(np.isfinite(np.diag(cov))):
        raise FitError("the flux covariance is not finite: the problem is degenerate (check the inputs)")
    chi2 = [np.asarray(c) for c in chi2_per_epoch(scene, stacks, grid)]
    elapsed = time.perf_counter() - t0
    log.info("fit %s in %d iterations (%.1f s, %d CG iterations)", status, n_iter, elapsed, cg_total)
    return FitResult(
        dataset=ds,
        scene=scene,
        status=status,
        n_iter=n_iter,
        history=tuple(history),
        flux_cov=cov,
        local_var=np.asarray(local_var),
        position_cov=np.asarray(pos_cov),
        chi2=chi2,
        host_kind=host,
        elapsed=elapsed,
    )
