"""Fitting a scene to a dataset: MAP by Gauss-Newton, then the Gaussian flux covariance."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from typing import Callable, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from astropy.coordinates import SkyCoord

from .dataset import PINNED, Dataset
from .errors import ConvergenceWarning, FitError
from .nuts import NutsOptions, sample_posterior
from .geometry import sky_to_offsets
from .host import PixelHost, SersicHost
from .result import FitResult
from .scene import LOCAL_NONLINEAR as NL, N_LOCAL, Scene, SceneGlobal
from .significance import reference_null_test
from .solve import (CG_MAXITER, LINEAR_TOL, POLISH_TOL, Priors, flux_covariance, freeze_geometry, gauss_newton_step, linear_solution, local_variances,
                    objective_and_chi2, posterior_energy, prior_arrays, standardized_residuals)

__all__ = ["fit", "initial_scene", "METHODS"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
Method = Literal["linear", "map", "laplace", "nuts"]
METHODS: tuple[str, ...] = ("linear", "map", "laplace", "nuts")


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


#: Gauss-Newton steps remembered by the Anderson acceleration
ANDERSON_DEPTH = 4
#: phase-1 stopping rule: every shift step below this many conditional standard deviations
#: (times sqrt(chi2/dof) of the epoch where that is > 1)...
NL_TOL = 0.03
#: ...and the transient/star position steps below this many arcsec
POS_TOL = 1e-3
#: CG relative residual of the phase-1 steps (inexact Gauss-Newton: a step only has to be good
#: to a fraction of itself; phase 2 solves to POLISH_TOL, the covariance to COV_TOL). Measured on 32 epochs:
#: 522 CG iterations instead of 1281 at 1e-4, the same 12-13 GN iterations, fluxes within
#: 0.01 sigma and flux errors within 1e-4 of the 1e-4 fit.
PHASE1_TOL = 1e-2
#: ...or truncated earlier on the quadratic model's decrease (``solve._pcg``'s eta; 0: off).
#: Measured (warm fits): 100 epochs of 64x64, CG iterations 528 -> 255 and the fit 167 -> 134 s
#: (13 GN iterations instead of 11); 31 epochs of 32x32, CG 726 -> 488, 38 -> 30 s, fluxes within
#: 0.005 sigma and errors within 2e-5 of the untruncated fit (eta 0.5: 346 CG, 25 s, but fluxes
#: 0.04 sigma off: the geometry stops short)
PHASE1_ETA = 0.25
#: ...but only in the first iterations: a slow fit (validation cell sb:21, seed 7: 27 GN iterations
#: untruncated) crawled with truncated steps and did not converge in 50; from here on every step
#: is solved to PHASE1_TOL (a forcing term that goes to zero, as truncated Newton needs to converge
#: fast). With it that fit converges in 27 iterations, 1011 CG iterations instead of 1316, 54 s
#: instead of 68 s.
PHASE1_ETA_ITERATIONS = 12
#: Gauss-Newton iteration from which a pixel-host fit takes Newton steps (the exact Hessian,
#: ``solve._residual_curvature``; ``None``: never). Gauss-Newton first: from the empty initial
#: scene the residuals are the whole galaxy and their curvature terms would make the system
#: indefinite. Newton steps are solved to ``phase1_tol`` untruncated (eta 0): truncated
#: Newton steps converged more slowly (30 epochs of 48x48: 9 iterations and 28 s instead of 7
#: and 15.5 s). Measured: see ``fit``'s phase-1 comment.
NEWTON_FROM = 3
#: A fit whose last step was a whole Newton step (CG converged, no line-search shortening) with
#: every flux step below this many (conditional) standard deviations skips phase 2's linear
#: solve: that step already solved the whole problem, linear parameters included, to
#: ``phase1_tol``, and the next would change the fluxes by a small fraction of this. Measured:
#: see ``fit``'s phase-2 comment.
NEWTON_POLISH_SKIP_FLUX = 0.05


def _check_cg(cg_it, cg_res, tol: float = LINEAR_TOL) -> None:
    if not np.isfinite(float(cg_res)) or float(cg_res) > 10 * tol or int(cg_it) >= CG_MAXITER:
        log.warning("linear solve reached relative residual %.2e after %d iterations", float(cg_res), int(cg_it))


def _nonlinear_weights(step: Scene, lvar) -> Scene:
    """1/sigma for the non-linear parameters (shifts, zero points: conditional sigma; positions:
    0.01"), else 0."""
    w = jax.tree_util.tree_map(jnp.zeros_like, step)
    local = tuple(
        jnp.zeros_like(d).at[:, NL].set(1.0 / jnp.sqrt(v[:, NL] + 1e-300)) for d, v in zip(step.local, lvar)
    )
    glob = eqx.tree_at(lambda g: (g.position, g.star_position), w.glob,
                       (jnp.full_like(w.glob.position, 100.0), jnp.full_like(w.glob.star_position, 100.0)))
    if isinstance(glob.host, SersicHost):
        h = jax.tree_util.tree_map(jnp.ones_like, glob.host)
        glob = eqx.tree_at(lambda g: g.host, glob, eqx.tree_at(lambda x: x.flux, h, jnp.zeros_like(h.flux)))
    return Scene(glob=glob, local=local)


def _anderson_point(hist, wnl, unravel):
    """Anderson-mixed point from the (x, GN step) history, or None."""
    xs = np.stack([h[0] for h in hist])
    fs = np.stack([h[1] for h in hist])
    dx = np.diff(xs, axis=0).T  # [n, k]
    df = np.diff(fs, axis=0).T
    sel = wnl > 0
    if not np.any(sel):
        return None
    gamma, *_ = np.linalg.lstsq(df[sel] * wnl[sel, None], fs[-1][sel] * wnl[sel], rcond=1e-10)
    x_new = xs[-1] + fs[-1] - (dx + df) @ gamma
    return unravel(jnp.asarray(x_new)) if np.all(np.isfinite(x_new)) else None


def _line_search(scene, step, obj, stacks, grid, pa, extra=None):
    """Backtracking: the largest of 1, 1/2, 1/4... that does not increase the objective.

    ``extra`` (an alternative point, e.g. Anderson-mixed) is tried alongside the full step and
    the lower of the two is taken. Returns ``(point, objective, per-epoch chi2, alpha,
    took_extra)``; point and chi2 are None when no step was accepted.
    """
    alpha = 1.0
    for _ in range(12):
        trial = jax.tree_util.tree_map(lambda a, d: a + alpha * d, scene, step)
        new, chi2 = objective_and_chi2(trial, stacks, grid, pa)
        new = float(new)
        if alpha == 1.0 and extra is not None:
            new_x, chi2_x = objective_and_chi2(extra, stacks, grid, pa)
            new_x = float(new_x)
            if np.isfinite(new_x) and new_x <= obj + 1e-9 * abs(obj) and not new < new_x:
                return extra, new_x, chi2_x, alpha, True
        if np.isfinite(new) and new <= obj + 1e-9 * abs(obj):
            return trial, new, chi2, alpha, False
        alpha *= 0.5
    return None, obj, None, 0.0, False


def _misfit(chi2, npix) -> tuple[jax.Array, ...]:
    """Per epoch max(1, chi2/dof): how much larger than the formal errors the real ones are."""
    return tuple(jnp.maximum(1.0, c / jnp.maximum(n - N_LOCAL, 1)) for c, n in zip(chi2, npix))


def _step_sizes(step: Scene, lvar, stacks, alpha: float, misfit) -> tuple[float, float, float]:
    """(largest flux step / sigma, largest shift step / sigma, largest position step in arcsec).

    sigma: the conditional error scaled by sqrt(max(1, chi2/dof)) of the epoch. Where the model
    does not describe an epoch (a bright source with an imperfect PSF), Gauss-Newton keeps
    moving its shift by amounts that are tiny against the real error but not against the
    formal one, and a test against the formal one would never be met.
    """
    dflux = max(
        float(jnp.max(jnp.abs(alpha * d[:, 0]) / jnp.sqrt(v[:, 0] * m + 1e-300) * st.free_flux))
        for d, v, st, m in zip(step.local, lvar, stacks, misfit)
    )
    dshift = max(
        float(jnp.max(jnp.abs(alpha * d[:, NL]) / jnp.sqrt(v[:, NL] * m[:, None] + 1e-300) * st.valid[:, None]))
        for d, v, st, m in zip(step.local, lvar, stacks, misfit)
    )
    vals = [jnp.max(jnp.abs(step.glob.position))]
    if step.glob.star_position.size:
        vals.append(jnp.max(jnp.abs(step.glob.star_position)))
    h = step.glob.host
    if isinstance(h, SersicHost):
        vals += [jnp.max(jnp.abs(h.centre)), jnp.abs(h.log_re), jnp.abs(h.n_raw), jnp.max(jnp.abs(h.e_raw))]
    return dflux, dshift, alpha * float(max(vals))


#: Gauss-Newton iteration at which a Student-t fit starts reweighting
IRLS_START = 3
#: residuals beyond this many sigma count as outliers in a Student-t fit's reported chi2
OUTLIER_SIGMA = 5.0


def _with_weights(stacks, weights):
    return tuple(eqx.tree_at(lambda s: s.weight, st, w) for st, w in zip(stacks, weights))


def _student_t_reweight(scene: Scene, gaussian_stacks, grid, pa, nu: float):
    """IRLS weights of a Student-t pixel likelihood with ``nu`` degrees of freedom and scale the
    epoch's sigma, ``w (nu + 1) / (nu + z^2)`` (z: the standardized residual at ``scene``), and
    the objective and per-epoch chi2 under them, from one rendering. A Gauss-Newton step with
    these weights decreases a quadratic majorizer of the Student-t objective, so a step that
    lowers it lowers the Student-t objective too. Returns ``(stacks, objective, chi2)``."""
    zs = standardized_residuals(scene, gaussian_stacks, grid)
    us = [(nu + 1.0) / (nu + z * z) for z in zs]
    stacks = _with_weights(gaussian_stacks, [st.weight * u for st, u in zip(gaussian_stacks, us)])
    chi2 = tuple(jnp.sum(u * z * z, axis=(1, 2)) for u, z in zip(us, zs))
    return stacks, float(posterior_energy(scene, stacks, grid, pa, chi2)), chi2


def student_t_efficiency(nu: float) -> float:
    """``E[psi']^2 / E[psi^2]`` under Gaussian noise for the Student-t score ``psi(z) = (nu + 1)
    z / (nu + z^2)``: the inverse of the factor by which a Student-t fit's variances exceed a
    Gaussian fit's on Gaussian data (M-estimator sandwich; 0.942 for nu = 5)."""
    from scipy import integrate, stats

    def expect(f):
        return integrate.quad(lambda z: f(z) * stats.norm.pdf(z), -np.inf, np.inf)[0]

    dpsi = expect(lambda z: (nu + 1.0) * (nu - z * z) / (nu + z * z) ** 2)
    psi2 = expect(lambda z: ((nu + 1.0) * z / (nu + z * z)) ** 2)
    return dpsi**2 / psi2


def _student_t_final(scene: Scene, gaussian_stacks, grid, nu: float):
    """From one rendering at the solution: the weights of a Student-t fit's covariance, the
    per-epoch chi2 with each pixel capped at ``OUTLIER_SIGMA**2``, and the number of pixels
    beyond ``OUTLIER_SIGMA``.

    The covariance is the sandwich (M-estimator) one ``A^-1 B A^-1`` for Gaussian inliers,
    ``w * efficiency(nu)``, with no information from outliers. The expectations are taken over
    the noise, not the realised residuals: those are smaller than sigma exactly where the model
    has many free parameters (the pixel host under the transient), and would feign information
    there. The Student-t model's own Fisher matrix would inflate the variances by (nu+3)/(nu+1)
    (1.33 for nu = 5) instead of the 1.06 a robust fit to Gaussian data really costs."""
    zs = standardized_residuals(scene, gaussian_stacks, grid)
    kappa = student_t_efficiency(nu)
    inlier = [jnp.abs(z) <= OUTLIER_SIGMA for z in zs]
    cov_stacks = _with_weights(gaussian_stacks, [st.weight * kappa * i for st, i in zip(gaussian_stacks, inlier)])
    chi2 = tuple(jnp.sum(jnp.minimum(z * z, OUTLIER_SIGMA**2), axis=(1, 2)) for z in zs)
    n_out = sum(int(jnp.sum(~i & (st.weight > 0))) for i, st in zip(inlier, gaussian_stacks))
    return cov_stacks, chi2, n_out


def _uncertainties(method: str, scene: Scene, stacks, grid, pa, mixed: bool):
    """``(flux covariance [E, E], local conditional variances [E, 6], position covariance)``."""
    if method == "laplace":
        cov, local_var, pos_cov, _ = flux_covariance(scene, stacks, grid, pa, mixed=mixed)
    elif method == "linear":
        scene0, frozen, pa_frozen = freeze_geometry(scene, stacks, pa, grid)
        cov, local_var, _, _ = flux_covariance(scene0, frozen, grid, pa_frozen, mixed=mixed)
        pos_cov = np.full((2, 2), np.nan)  # fixed, not estimated
    else:  # map
        scene0, frozen, _ = freeze_geometry(scene, stacks, pa, grid)
        local_var = np.asarray(local_variances(scene0, frozen, grid))
        cov = np.diag(local_var[:, 0])
        pos_cov = np.full((2, 2), np.nan)
    return np.asarray(cov), np.asarray(local_var), np.asarray(pos_cov)


#: summed S/N of the transient (``sqrt(chi2 - dof)`` of the joint detection test) below which
#: ``position="auto"`` holds its position at the target; from the campaign's faint cells
#: (docs/validation.md): at summed S/N 2-8 a free position wanders to the noise and the
#: errors come out 5-15 % small, at the baseline's ~30 it is harmless
POSITION_MIN_SNR = 10.0
#: prior width (arcsec) that holds the position: 0.1 mas, far below any measurable offset
_HELD_POSITION_SD = 1e-4
POSITION_MODES = ("auto", "free", "fixed")


def fit(
    ds: Dataset,
    *,
    host: Literal["pixel", "sersic"] = "pixel",
    priors: Priors = Priors(),
    stars: SkyCoord | None = None,
    fit_shifts: bool = True,
    max_iter: int = 50,
    init: Scene | None = None,
    progress: ProgressCallback | None = None,
    phase1_tol: float = PHASE1_TOL,
    method: Method = "laplace",
    null_test: bool = False,
    student_t: float | None = None,
    nuts: NutsOptions = NutsOptions(),
    key: jax.Array | None = None,
    position: Literal["auto", "free", "fixed"] = "auto",
    mixed_precision: bool = True,
    newton: bool = True,
) -> FitResult:
    """Fit the scene to ``ds`` and return the light curve with Gaussian flux errors.

    The MAP is found by Gauss-Newton over all parameters (exact in the linear ones). The flux
    errors depend on ``method`` (all three cost about the same, one CG solve per probe of the
    covariance, except ``map``):

    * ``"laplace"`` (default): Gaussian over all free parameters at the MAP (Gauss-Newton
      Hessian): the fluxes marginalised over the host, the transient position, the static
      sources, and each epoch's sky and shift. This is what the validation campaign calibrates.
    * ``"linear"``: the geometry (transient and star positions, shifts; for a Sersic host its
      shape stays free) fixed at the MAP; the fluxes marginalised over the host and the skies
      only. Exact for the linear model, smaller than ``laplace`` by the position and
      registration uncertainty; the transient position gets no error.
    * ``"nuts"``: the full posterior sampled by NUTS (numpyro) from the MAP, every parameter
      free (:mod:`transcene.nuts`); fluxes are posterior means, errors posterior standard
      deviations, ``flux_lo``/``flux_hi`` the 16th/84th percentiles, the covariance the draws'
      one, with split R-hat and effective sample sizes per epoch. Chains that miss
      ``nuts``'s convergence criteria raise :class:`~transcene.errors.FitError` unless
      ``nuts.force``. Far slower than the others (thousands of renderings); needs ``key``.
    * ``"map"``: no covariance solve; each epoch's error is conditional on the host and the
      geometry (a lower bound, far too small wherever the host under the transient is
      uncertain), and epochs are uncorrelated. For quick looks only.

    Args:
        host: ``"pixel"`` (non-parametric, default) or ``"sersic"``.
        priors: prior widths; see :class:`~transcene.solve.Priors`.
        stars: static point sources (stars, a constant nucleus) to model, as sky coordinates.
        fit_shifts: fit a per-epoch astrometric shift (prior width set in the dataset).
        max_iter: (Gauss-)Newton iterations before giving up (with Newton steps simulations
            converge in 5-11, faint hosts in up to ~20; the real SN 2021rhu data, whose bright
            epochs the PSF models only approximately, in 9; Gauss-Newton alone took 10-38 and 14).
        progress: called as ``progress(step, total, message)``.
        phase1_tol: CG tolerance of the Gauss-Newton steps before the geometry is frozen.
        method: ``"laplace"``, ``"linear"`` or ``"map"`` (above).
        null_test: also refit the transient-free epochs' fluxes and test them against zero
            (:func:`transcene.significance.reference_null_test`; about the cost of the
            covariance again). The result goes into ``FitResult.reference_null`` and the table's
            metadata, and a failure is logged as a warning.
        student_t: degrees of freedom ``nu`` of a Student-t pixel likelihood (scale: each
            pixel's sigma) for cosmic rays, bad columns and other outliers the masks missed;
            ``None`` (default): Gaussian. The Gaussian fit is converged first and then
            iteratively reweighted; the errors are the sandwich (M-estimator) ones. The
            reported chi2 caps each pixel at 5 sigma.
        position: the transient's position. ``"auto"`` (default): fitted (prior ``priors.position``
            about the target), unless the transient's summed S/N (``sqrt(chi2 - dof)`` of the
            joint detection test over the measured epochs) is below ``POSITION_MIN_SNR`` (10):
            then it is refitted held at the target (forced photometry), because a free position
            that the data barely constrain wanders to the noise and the errors come out 5-15 %
            small (docs/validation.md). ``"free"``: always fitted. ``"fixed"``: always held at the
            target. A held position's uncertainty is not propagated into the flux errors; the
            light curve's metadata ``position`` says which happened. ``method="nuts"`` samples
            the position and is never held under ``"auto"``.
        mixed_precision: evaluate the linearised rendering inside the conjugate-gradient solves
            (Gauss-Newton steps, covariance) in float32; everything else (renders, residuals,
            objective, the final numbers) stays float64. Default on: ~1.4x faster fits of a
            pixel host (100 epochs of 64x64: 47 -> 34 s), the same fluxes and errors as
            float64 to far below their uncertainties (``solve._linearised_model``). ``False``:
            float64 throughout.
        newton: take Newton steps (the exact Hessian) after the first Gauss-Newton ones, for a
            pixel host and a Gaussian likelihood (``NEWTON_FROM``); ``False``: Gauss-Newton
            throughout (slower to converge, and on faint hosts it stops short of the optimum).
    """
    if position not in POSITION_MODES:
        raise ValueError(f"position must be one of {', '.join(POSITION_MODES)}; got {position!r}")
    if position == "fixed":
        priors = dataclasses.replace(priors, position=_HELD_POSITION_SD)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if student_t is not None and not (np.isfinite(student_t) and student_t > 0):
        raise ValueError(f"student_t must be a positive number of degrees of freedom or None; got {student_t!r}")
    if method == "nuts":
        if key is None:
            raise ValueError("method='nuts' needs an explicit PRNG key: fit(..., key=jax.random.key(seed))")
        if student_t is not None:
            raise ValueError("method='nuts' samples the Gaussian pixel likelihood only; student_t must be None")
    t0 = time.perf_counter()
    scene = init if init is not None else initial_scene(ds, host, stars)
    star_centre = np.asarray(scene.glob.star_position)
    pa = prior_arrays(ds, priors, star_centre)
    stacks = ds.stacks
    if not fit_shifts:
        # a rigid prior pins the shifts at zero without changing the algebra
        stacks = tuple(eqx.tree_at(lambda s: s.shift_prec, st, jnp.full_like(st.shift_prec, PINNED)) for st in stacks)
    grid = ds.grid
    obj, chi2 = objective_and_chi2(scene, stacks, grid, pa)
    obj = float(obj)
    history = [obj]
    status = "not_converged"
    n_iter = 0
    cg_total = 0
    n_anderson = 0
    n_newton = 0
    hist: list[tuple[np.ndarray, np.ndarray]] = []
    unravel = ravel_pytree(scene)[1]
    npix = tuple(jnp.sum(st.weight > 0, axis=(1, 2)) for st in stacks)
    # Phase 1: steps on everything until the non-linear parameters (shifts, positions) have
    # settled. Gauss-Newton converges only linearly here: it drops the second-order coupling
    # between the shifts and the weakly constrained host modes that fit the noise, so it crawls
    # (ratio ~0.7-0.8 per iteration on noisy data; 2 iterations on noiseless data). From
    # iteration NEWTON_FROM a pixel-host Gaussian fit therefore takes Newton steps, which keep
    # those terms (solve._residual_curvature) and converge quadratically: on 12 epochs of 24x24
    # with dense Hessians, the largest shift error (in its sigma) went 0.80 -> 0.055 -> 0.0024 ->
    # 1e-6 in Newton steps, 0.80 -> 0.42 -> 0.25 -> 0.15 -> ... -> 0.0012 in 24 Gauss-Newton
    # steps. Where the Newton system is indefinite (away from the optimum; on faint hosts, where
    # it is nearly singular, float32 rounding can tip it) CG stops at the negative curvature
    # and its iterate so far is the step; a Newton step the line search shortens is followed by
    # a Gauss-Newton one. On faint hosts Gauss-Newton also stopped short of the optimum: sb:21
    # seed 0 "converged" at an objective 2.9 above the one Newton reaches (31 iterations; Newton
    # 10). Phase 2 freezes the geometry once its steps
    # are < NL_TOL of its conditional standard deviations and solves the then *linear* problem
    # exactly in one step. The Gauss-Newton steps (Sersic hosts, Student-t fits, the first
    # iterations) are accelerated by Anderson mixing of the last ANDERSON_DEPTH steps
    # (coefficients from the non-linear parameters in units of their errors, applied to all
    # parameters, which follow the geometry), kept only when it lowers the objective.
    gaussian_stacks = stacks
    irls_from = None  # iteration at which Student-t reweighting started
    newton_paused = False  # the last Newton step was not taken whole: one Gauss-Newton step first
    n_truncated = 0
    n_rejected = 0  # Newton steps that failed the line search (replaced by Gauss-Newton ones)
    newton_polished = False  # converged by a small, whole Newton step: no phase 2 (NEWTON_POLISH_SKIP_FLUX)
    for it in range(1, max_iter + 1):
        if irls_from is not None:
            stacks, obj, chi2 = _student_t_reweight(scene, gaussian_stacks, grid, pa, student_t)
        want_newton = (newton and NEWTON_FROM is not None and it >= NEWTON_FROM and not newton_paused
                       and student_t is None and isinstance(scene.glob.host, PixelHost))
        newton_paused = False
        # a Newton step that fails the line search (far from the optimum its quadratic model can
        # be useless: validation cell sys:zp20mmag-sb15-nuis seed 6, a 15 mag host, failed its
        # first Newton step and with it the whole fit) is replaced by a Gauss-Newton step
        for take_newton in ((True, False) if want_newton else (False,)):
            eta = PHASE1_ETA if it <= PHASE1_ETA_ITERATIONS and not take_newton else 0.0
            step, lvar, cg_it, cg_res = gauss_newton_step(scene, stacks, grid, pa, jnp.asarray(phase1_tol),
                                                          jnp.asarray(eta), mixed=mixed_precision, newton=take_newton)
            cg_total += int(cg_it)
            truncated = take_newton and not np.isfinite(float(cg_res))
            if truncated:
                # CG met non-positive curvature (Newton's system is indefinite away from the
                # optimum, and nearly singular on faint hosts, where float32 rounding can tip it):
                # its iterate so far still lowers the quadratic model (Steihaug), so it is the step
                n_truncated += 1
                log.debug("GN iteration %d: Newton CG truncated at negative curvature after %d iterations", it,
                          int(cg_it))
            # a truncated step stops above the residual tolerance by design; only a blow-up or the
            # iteration cap is a problem there
            if not truncated:
                _check_cg(cg_it, cg_res, phase1_tol if eta == 0 else np.inf)
            if take_newton:
                # Anderson mixing accelerates a linearly converging sequence; Newton's is not one
                hist.clear()
            else:
                hist.append((np.asarray(ravel_pytree(scene)[0]), np.asarray(ravel_pytree(step)[0])))
                del hist[: -(ANDERSON_DEPTH + 1)]
            mixed = None
            if len(hist) >= 2:
                mixed = _anderson_point(hist, np.asarray(ravel_pytree(_nonlinear_weights(step, lvar))[0]), unravel)
            trial, new, trial_chi2, alpha, took_mixed = _line_search(scene, step, obj, stacks, grid, pa, extra=mixed)
            if trial is not None or not take_newton:
                break
            n_rejected += 1
            log.debug("GN iteration %d: the Newton step failed the line search; a Gauss-Newton step instead", it)
        n_newton += int(take_newton)
        n_anderson += int(took_mixed)
        if alpha != 1.0:
            hist.clear()
        # a whole step: not shortened by the line search, nor truncated at negative curvature
        # (such a CG can stop after one iteration: the step is small because the system is
        # indefinite there, not because the point is optimal; validation cell sb:15 seed 7
        # "converged" on two, 35.7 above the optimum, fluxes 0.28 sigma off). Only a whole
        # step certifies convergence, and after a Newton step that was not one (or none was
        # taken) the next step is a Gauss-Newton one
        whole = alpha == 1.0 and not truncated
        newton_paused = want_newton and not (take_newton and whole)
        n_iter = it
        if trial is None:
            status = "line_search_failed"
            break
        dflux, dnl_sigma, dpos = _step_sizes(step, lvar, stacks, alpha, _misfit(trial_chi2, npix))
        decrease = obj - new
        scene, obj, chi2 = trial, new, trial_chi2
        history.append(obj)
        log.debug(
            "GN iteration %d: objective %.6f (decrease %.3g, flux step %.2e sigma, shift step %.2e sigma, "
            "position step %.2e arcsec, alpha %.3g, cg %d, res %.1e%s)",
            it, obj, decrease, dflux, dnl_sigma, dpos, alpha, int(cg_it), float(cg_res), ", Newton" if take_newton else "",
        )
        if progress is not None:
            progress(it, max_iter, f"objective {obj:.1f}")
        # a Sersic host is non-linear itself, so there the fluxes must have settled too
        # (and so must they under reweighting, whose weights follow the fluxes)
        linear_host = isinstance(scene.glob.host, PixelHost) and irls_from is None
        if student_t is not None and irls_from is None and it >= IRLS_START - 1:
            # reweighting starts from a Gaussian solution, not from the empty initial scene
            # (where every pixel of the galaxy would look like an outlier); the first step
            # already solves the linear parameters nearly exactly
            irls_from = it + 1
            hist.clear()
            log.debug("Student-t (nu = %g) reweighting from iteration %d", student_t, irls_from)
            continue
        first = 1 if irls_from is None else irls_from
        if it >= first + 1 and whole and dnl_sigma < NL_TOL and dpos < POS_TOL and (linear_host or dflux < 0.02):
            status = "converged"
            newton_polished = take_newton and float(cg_res) <= phase1_tol and dflux < NEWTON_POLISH_SKIP_FLUX
            break
    if status == "converged" and isinstance(scene.glob.host, PixelHost) and not newton_polished:
        # Phase 2: geometry frozen (the shifts baked into the epochs' reference pixels, the
        # position priors centred on the current positions and made rigid), the linear
        # parameters solved exactly in one step. Not after a small, whole Newton step
        # (NEWTON_POLISH_SKIP_FLUX), which has done the same for all parameters: against fits
        # that run this solve, 21 validation fits (baseline, sb:15, sb:21, offset 0, HSC blend,
        # snr 17 and 22.5, nref 0 and 1; 2-3 seeds each) differ by at most 3.8e-3 sigma in a
        # flux and 1.2e-4 (relative) in an error, their objectives by < 1.5e-3; the 100-epoch
        # benchmark saves 1.3 s (28 CG iterations). Tried and dropped: solving such a last
        # step loosely as well (relative residual 0.1; 3-4 CG iterations instead of 19-26 on
        # the benchmark) stopped nref:1 and sb:15 fits 0.1-0.15 above their optimum with fluxes
        # 0.3 sigma off: a loose CG leaves the slow directions unexplored and its step looks small.
        scene0, frozen, pa_frozen = freeze_geometry(scene, stacks, pa, grid)
        solved, cg_it, cg_res = linear_solution(scene0, frozen, grid, pa_frozen, mixed=mixed_precision)
        cg_total += cg_it
        _check_cg(cg_it, cg_res, POLISH_TOL)
        # the linear parameters from the frozen problem, the shifts kept as they were
        trial = Scene(glob=solved.glob, local=tuple(s.at[:, NL].set(l[:, NL]) for s, l in zip(solved.local, scene.local)))
        new, trial_chi2 = objective_and_chi2(trial, stacks, grid, pa)
        new = float(new)
        log.debug("linear polish: objective %.6f -> %.6f (cg %d, res %.1e)", obj, new, int(cg_it), float(cg_res))
        if new <= obj + 1e-9 * abs(obj):
            scene, obj, chi2 = trial, new, trial_chi2
            history.append(obj)
    if status != "converged":
        warnings.warn(
            f"the fit did not converge ({status}) after {n_iter} Gauss-Newton iterations; "
            "the light curve is flagged",
            ConvergenceWarning,
            stacklevel=2,
        )
    cov_stacks = stacks
    if student_t is not None:
        cov_stacks, chi2, n_out = _student_t_final(scene, gaussian_stacks, grid, student_t)
        log.info("Student-t fit: %d pixels beyond %g sigma", n_out, OUTLIER_SIGMA)
    posterior = None
    if method == "nuts":
        posterior = sample_posterior(scene, stacks, grid, pa, key=key, options=nuts, progress=progress)
        if not posterior.converged:
            msg = "the NUTS chains did not converge: " + "; ".join(posterior.problems)
            if not nuts.force:
                raise FitError(msg + " (more draws, NutsOptions(num_samples=..., num_warmup=...), usually help; "
                               "NutsOptions(force=True) returns the light curve flagged NOT_CONVERGED)")
            warnings.warn(msg + "; the light curve is flagged", ConvergenceWarning, stacklevel=2)
            status = "nuts_not_converged" if status == "converged" else status
        cov = np.atleast_2d(np.cov(posterior.flux))
        pos_cov = np.atleast_2d(np.cov(posterior.position.T))
        scene0, frozen, _ = freeze_geometry(scene, stacks, pa, grid)
        local_var = np.asarray(local_variances(scene0, frozen, grid))
    else:
        cov, local_var, pos_cov = _uncertainties(method, scene, cov_stacks, grid, pa, mixed_precision)
    if not np.all(np.isfinite(np.diag(cov))):
        raise FitError("the flux covariance is not finite: the problem is degenerate (check the inputs)")
    null = None
    if null_test:
        null = reference_null_test(scene, cov_stacks, grid, pa, ds.epochs, mixed=mixed_precision)
    chi2 = [np.asarray(c) for c in chi2]  # of the final scene, from its last objective evaluation
    elapsed = time.perf_counter() - t0
    log.info("fit %s in %d iterations (%d Newton, %d of them truncated at negative curvature, %d more rejected for "
             "Gauss-Newton; %d Anderson-accelerated; %.1f s, %d CG iterations)", status, n_iter, n_newton, n_truncated,
             n_rejected, n_anderson, elapsed, cg_total)
    result = FitResult(
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
        method=method,
        reference_null=null,
        posterior=posterior,
        likelihood="gaussian" if student_t is None else f"student-t (nu={student_t:g}); chi2 capped at 5 sigma per pixel",
        position_mode="held at the target (position='fixed')" if position == "fixed" else "fitted",
        mixed_precision=mixed_precision,
        n_newton=n_newton,
    )
    if position != "auto" or method == "nuts":
        return result
    det = result.detection()["all"]
    snr = math.sqrt(max(float(det["chi2"]) - float(det["dof"]), 0.0))
    if not snr < POSITION_MIN_SNR:
        return result
    log.info("transient summed S/N %.1f < %g: refitting with its position held at the target", snr, POSITION_MIN_SNR)
    start = eqx.tree_at(lambda s: s.glob.position, scene, jnp.zeros_like(scene.glob.position))
    held = fit(ds, host=host, priors=priors, stars=stars, fit_shifts=fit_shifts, max_iter=max_iter, init=start,
               progress=progress, phase1_tol=phase1_tol, method=method, null_test=null_test, student_t=student_t,
               nuts=nuts, key=key, position="fixed", mixed_precision=mixed_precision, newton=newton)
    return dataclasses.replace(
        held, elapsed=result.elapsed + held.elapsed,
        position_mode=f"held at the target (summed S/N {snr:.1f} < {POSITION_MIN_SNR:g}; position='auto')")
