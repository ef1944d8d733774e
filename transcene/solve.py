"""Gauss-Newton with the per-epoch parameters eliminated exactly, and the flux covariance.

The model is linear in the host pixels, fluxes and sky levels and mildly non-linear in the
positions and shifts. Each Gauss-Newton step solves the normal equations of *all* parameters
at once: every epoch's local block ``[flux, sky, shift, zp, psf_width]`` (6 x 6) is eliminated in closed form
(Schur complement), and the reduced system in the global parameters (host pixels, transient
position, static sources) is solved by preconditioned conjugate gradients, matrix-free through
JAX's ``linearize``/``linear_transpose`` (or densely when it is small, e.g. a Sersic host). The
preconditioner is the reduced system's Fourier-diagonal approximation for the host pixels and
the exact dense block for the few other global parameters.

At convergence the same algebra gives the Gaussian covariance of the fluxes marginalised over
the host, the positions and the shifts: ``Cov(f_e, f_e') = delta N_e^-1 + z_e^T S^-1 z_e'``,
evaluated through a low-rank basis of the ``z_e`` (exact up to singular values below 1e-10 of
the largest).
"""

from __future__ import annotations

import dataclasses
import logging
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .dataset import PINNED, Dataset, EpochStack, ModelGrid
from .host import PixelHost, SersicHost, host_prior_spectrum
from .render import batched
from .scene import LOCAL_FLUX, LOCAL_NONLINEAR, LOCAL_PSF, LOCAL_SHIFT, LOCAL_ZP, Scene, SceneGlobal, epoch_sources, \
    host_spectrum, local_jacobian, render_epoch, render_stack, with_psf_width

__all__ = ["Priors", "objective", "gauss_newton_step", "flux_covariance", "local_variances", "PriorArrays",
           "prior_arrays", "posterior_energy", "freeze_geometry", "keep_linear", "linear_solution",
           "standardized_residuals", "flux_estimator_variance"]

log = logging.getLogger(__name__)

_DENSE_MAX = 96  # global parameters up to which the reduced system is formed densely


@dataclasses.dataclass(frozen=True)
class Priors:
    """Prior widths (Gaussian), in the units of each parameter.

    position: transient offset from the target, arcsec. star_position: static sources, arcsec
    about their initial positions. host_strength: PixelHost high-frequency penalty relative to
    the data's precision at zero frequency. sersic_*: weak priors on the Sersic shape.
    """

    position: float = 0.5
    star_position: float = 0.3
    host_strength: float = 1e-3
    sersic_centre: float = 3.0
    sersic_log_re: float = 3.0
    sersic_n_raw: float = 3.0
    sersic_e_raw: float = 2.0


class PriorArrays(eqx.Module):
    """Traced prior and preconditioner arrays derived from the data (one per fit)."""

    host_prec: jax.Array  # [band, m, m//2+1] prior precision per Fourier mode
    host_precond: jax.Array  # [band, m, m//2+1] data + prior precision per mode (approx.)
    host_pedestal: jax.Array  # [band, host, host] unit norm per band: see _host_pedestal
    position_prec: jax.Array
    position_centre: jax.Array
    star_centre: jax.Array
    star_prec: jax.Array
    sersic_centre_prec: jax.Array
    sersic_re_centre: jax.Array
    sersic_re_prec: jax.Array
    sersic_n_prec: jax.Array
    sersic_e_prec: jax.Array


def prior_arrays(ds: Dataset, priors: Priors, star_centre: np.ndarray) -> PriorArrays:
    """Set up the prior precisions and the Fourier preconditioner from the data."""
    m = ds.grid.size
    nb = len(ds.bands)
    dens = np.zeros((nb, m, m // 2 + 1))
    inv_to_model = np.linalg.inv(np.asarray(ds.grid.to_model))
    for st in ds.stacks:
        w = np.asarray(st.weight)
        valid = np.asarray(st.valid)
        q_line = np.asarray(st.q_line)
        swap = np.asarray(st.swap)
        for e in range(st.n_epochs):
            if valid[e] == 0:
                continue
            good = w[e] > 0
            wbar = w[e][good].mean()
            det_b = abs(np.linalg.det(np.asarray(st.amat[e]) @ inv_to_model))
            dens[int(st.band[e])] += wbar * det_b * _rfft2_power(q_line[e], bool(swap[e]))
    d0 = dens[:, 0, 0]
    spec = np.stack([np.asarray(host_prior_spectrum(m, priors.host_strength * d0[b])) for b in range(nb)])
    return PriorArrays(
        host_prec=jnp.asarray(spec),
        host_precond=jnp.asarray(dens + spec),
        host_pedestal=_host_pedestal(jnp.asarray(dens), jnp.asarray(spec), ds.grid),
        position_prec=jnp.asarray(1.0 / priors.position**2),
        position_centre=jnp.zeros(2),
        star_centre=jnp.asarray(star_centre, dtype=float).reshape(-1, 2),
        star_prec=jnp.asarray(1.0 / priors.star_position**2),
        sersic_centre_prec=jnp.asarray(1.0 / priors.sersic_centre**2),
        sersic_re_centre=jnp.asarray(np.log(max(ds.fit_radius / 4.0, 0.5))),
        sersic_re_prec=jnp.asarray(1.0 / priors.sersic_log_re**2),
        sersic_n_prec=jnp.asarray(1.0 / priors.sersic_n_raw**2),
        sersic_e_prec=jnp.asarray(1.0 / priors.sersic_e_raw**2),
    )


#: conjugate-gradient iterations and relative residual of ``_host_pedestal``'s solve (it
#: converges in ~20: its operator is the Fourier preconditioner's, but for the window)
_PEDESTAL_MAXITER = 100
_PEDESTAL_TOL = 1e-6


@eqx.filter_jit
def _host_pedestal(dens: jax.Array, spec: jax.Array, grid: ModelGrid) -> jax.Array:
    """Per band, the pixel-host image (unit norm) whose rendering is flattest over the fitted
    region: the least-squares fit of a uniform image under a proxy of the data term (one
    transfer function ``sqrt(dens)``, the Fourier preconditioner's, seen through the host
    window only) plus the host prior. ``[band, host_size, host_size]``; compiled once per grid
    shape.

    Why: every epoch's sky is free, so a host pedestal that renders flat over the region is
    constrained by the prior alone. That pedestal is not the constant image (which renders
    dimmer at the region's edges, where the PSF spreads it outside) but one with a brightened
    rim and corners, and the Fourier preconditioner, which assumes the data extend forever,
    gets its curvature wrong by a factor ~4000 (the preconditioned system's smallest
    eigenvalues, one per band, 6e-4 against ~1 for the rest). CG finds it only after ~100
    iterations, and finds it again in every Gauss-Newton step: it carried half of a Newton
    step's quadratic-model decrease (scripts/benchmark.py's 100 epochs). ``_make_solver``
    deflates it."""
    k = grid.host_size
    window = grid.embed(jnp.ones((k, k)))

    def one(d, s):
        tr = jnp.sqrt(jnp.maximum(d, 0.0))

        def apply(h):
            e = grid.embed(h.reshape(k, k))
            return grid.crop(_fourier_filter(window * _fourier_filter(e, tr), tr) + _fourier_filter(e, s)).reshape(-1)

        rhs = grid.crop(_fourier_filter(window, tr)).reshape(-1)
        x, _, _ = _pcg(apply, rhs, lambda r: _host_precond(r, d + s, grid), jnp.zeros_like(rhs), _PEDESTAL_TOL,
                       _PEDESTAL_MAXITER)
        norm = jnp.linalg.norm(x)
        return (x / jnp.where(norm > 0, norm, 1.0)).reshape(k, k)

    return jax.vmap(one)(dens, spec)


def _rfft2_power(q_line: np.ndarray, swap: bool) -> np.ndarray:
    """``|rfft2(q)|^2`` ``[m, m/2 + 1]`` of a kernel given as its ``render.line_spectra`` layout
    (``swap``: the transposed one); the lower rows by Hermitian symmetry."""
    k, m = q_line.shape
    if swap:
        return np.abs(q_line.T) ** 2
    power = np.abs(q_line) ** 2  # rows ky = 0 .. m/2, all kx
    kx = np.arange(k)
    lower = power[m - np.arange(k, m)][:, (-kx) % m]  # ky = m/2 + 1 .. m - 1: |F(-ky, -kx)|^2
    return np.concatenate([power[:, :k], lower], axis=0)


def _fourier_filter(img: jax.Array, spec: jax.Array) -> jax.Array:
    """``F^-1 diag(spec) F img`` for real ``[..., m, m]`` images on the model grid and a real
    ``spec`` ``[..., m, m//2 + 1]`` (a circular convolution, via rfft2)."""
    m = img.shape[-1]
    return jnp.fft.irfft2(spec * jnp.fft.rfft2(img), s=(m, m))


def _host_precond(r: jax.Array, host_precond: jax.Array, grid: ModelGrid) -> jax.Array:
    """The Fourier preconditioner of the host pixels: ``r`` (flat, ``[band, host, host]``) embedded
    in the model grid, divided by the data + prior precision per mode, cropped back (flat)."""
    k = grid.host_size
    rh = grid.embed(r.reshape(-1, k, k))
    return grid.crop(_fourier_filter(rh, 1.0 / host_precond)).reshape(-1)


def _fourier_quad(img: jax.Array, spec: jax.Array) -> jax.Array:
    """sum over bands of img . F^-1 diag(spec) F img (symmetric, via rfft2)."""
    return jnp.sum(img * _fourier_filter(img, spec))


def global_prior(glob: SceneGlobal, pa: PriorArrays, grid: ModelGrid) -> jax.Array:
    """Quadratic prior energy (-2 log prior + const) of the global parameters."""
    e = pa.position_prec * jnp.sum((glob.position - pa.position_centre) ** 2)
    e = e + pa.star_prec * jnp.sum((glob.star_position - pa.star_centre) ** 2)
    h = glob.host
    if isinstance(h, PixelHost):
        e = e + _fourier_quad(h.images(grid), pa.host_prec)
    elif isinstance(h, SersicHost):
        e = e + pa.sersic_centre_prec * jnp.sum(h.centre**2)
        e = e + pa.sersic_re_prec * (h.log_re - pa.sersic_re_centre) ** 2
        e = e + pa.sersic_n_prec * h.n_raw**2 + pa.sersic_e_prec * jnp.sum(h.e_raw**2)
    return e


def _local_prec(stack: EpochStack) -> jax.Array:
    """Prior precision of [flux, sky, shift_xi, shift_eta, zp, psf_width]: flux pinned to 0 where not free."""
    pinned = 1.0 - stack.free_flux * stack.valid
    z = jnp.zeros_like(pinned)
    return jnp.stack([pinned, z, stack.shift_prec, stack.shift_prec, stack.zp_prec, stack.psf_prec], axis=-1)


def _chi2_terms(scene: Scene, stacks: tuple[EpochStack, ...], grid: ModelGrid) -> tuple[jax.Array, ...]:
    """Residual chi^2 per epoch slot, per stack."""
    out = []
    for loc, st in zip(scene.local, stacks):
        model = render_stack(scene.glob, loc, st, grid)
        out.append(jnp.sum(st.weight * (st.data - model) ** 2, axis=(1, 2)))
    return tuple(out)


def _posterior_energy(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, chi2: tuple[jax.Array, ...]):
    total = global_prior(scene.glob, pa, grid)
    for loc, st, c in zip(scene.local, stacks, chi2):
        total = total + jnp.sum(c) + jnp.sum(_local_prec(st) * loc**2)
    return total


@eqx.filter_jit
def objective(scene: Scene, stacks: tuple[EpochStack, ...], grid: ModelGrid, pa: PriorArrays) -> jax.Array:
    """-2 log posterior (up to a constant): chi^2 plus the prior energies."""
    return _posterior_energy(scene, stacks, grid, pa, _chi2_terms(scene, stacks, grid))


@eqx.filter_jit
def objective_and_chi2(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays):
    """``objective`` and the per-epoch chi^2 (per stack) from one rendering pass."""
    chi2 = _chi2_terms(scene, stacks, grid)
    return _posterior_energy(scene, stacks, grid, pa, chi2), chi2


@eqx.filter_jit
def posterior_energy(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, chi2: tuple[jax.Array, ...]):
    """``objective`` from per-epoch chi^2 already computed (e.g. under reweighted pixels)."""
    return _posterior_energy(scene, stacks, grid, pa, chi2)


def freeze_geometry(scene: Scene, stacks, pa: PriorArrays, grid: ModelGrid):
    """The same problem with the geometry fixed at ``scene``: the shifts baked into the epochs'
    reference pixels, the zero points into their scale and the PSF widths into their PSFs (all
    then pinned at zero), the
    position priors centred on the current positions and made rigid. Returns ``(scene with zero
    shifts and zero points, stacks, prior arrays)``."""
    frozen = tuple(
        eqx.tree_at(lambda s: (s.p0, s.shift_prec, s.scale, s.zp_prec, s.psf_prec), with_psf_width(st, loc[:, LOCAL_PSF]),
                    (st.p0 + jnp.einsum("eij,ej->ei", st.amat, loc[:, LOCAL_SHIFT]), jnp.full_like(st.shift_prec, PINNED),
                     st.scale * (1.0 + loc[:, LOCAL_ZP]), jnp.full_like(st.zp_prec, PINNED),
                     jnp.full_like(st.psf_prec, PINNED)))
        for st, loc in zip(stacks, scene.local)
    )
    scene0 = Scene(glob=scene.glob, local=tuple(loc.at[:, LOCAL_NONLINEAR].set(0.0) for loc in scene.local))
    pa_frozen = eqx.tree_at(
        lambda p: (p.position_prec, p.position_centre, p.star_prec, p.star_centre), pa,
        (jnp.asarray(PINNED), scene.glob.position, jnp.asarray(PINNED), scene.glob.star_position),
    )
    return scene0, frozen, pa_frozen


def keep_linear(step: Scene) -> Scene:
    """Zero the (numerically tiny, pinned) non-linear entries of a step: positions, shifts, zero points."""
    glob = eqx.tree_at(lambda g: (g.position, g.star_position), step.glob,
                       (jnp.zeros_like(step.glob.position), jnp.zeros_like(step.glob.star_position)))
    local = tuple(loc.at[:, LOCAL_NONLINEAR].set(0.0) for loc in step.local)
    return Scene(glob=glob, local=local)


def linear_solution(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, *, mixed: bool = True,
                    tol: float | None = None) -> tuple[Scene, int, float]:
    """With the geometry fixed (``freeze_geometry``) the problem is linear: one exact
    Gauss-Newton step (CG to ``tol``, by default ``POLISH_TOL``) solves it. Returns (solution,
    CG iterations, residual)."""
    # tol and eta as arrays, as the fit's phase-1 steps pass them: the same compiled step (a
    # Python float is a static argument, and a second compilation costs 4-10 s of a cold fit)
    tol = POLISH_TOL if tol is None else tol
    step, _, cg_it, cg_res = gauss_newton_step(scene, stacks, grid, pa, jnp.asarray(tol), jnp.asarray(0.0),
                                               mixed=mixed)
    return jax.tree_util.tree_map(lambda a, d: a + d, scene, keep_linear(step)), int(cg_it), float(cg_res)


@eqx.filter_jit
def standardized_residuals(scene: Scene, stacks: tuple[EpochStack, ...], grid: ModelGrid) -> tuple[jax.Array, ...]:
    """``sqrt(weight) * (data - model)`` per stack (0 where masked)."""
    return tuple(jnp.sqrt(st.weight) * (st.data - render_stack(scene.glob, loc, st, grid))
                 for loc, st in zip(scene.local, stacks))


@eqx.filter_jit
def chi2_per_epoch(scene: Scene, stacks: tuple[EpochStack, ...], grid: ModelGrid) -> tuple[jax.Array, ...]:
    """Residual chi^2 per epoch slot, per stack."""
    return _chi2_terms(scene, stacks, grid)


#: CG relative residual of the exact variances (``flux_estimator_variance``), and the default of
#: ``gauss_newton_step``
LINEAR_TOL = 1e-4
#: ...and of ``linear_solution`` (the fit's final, geometry-frozen step). That step starts at the
#: converged point, so its residual is relative to a small right-hand side: against 1e-6, 1e-3
#: leaves the fluxes within 1.9e-3 sigma (baseline cell, seed 0; 2.3e-4 on sb:21 seed 1; 2.8e-4
#: on scripts/benchmark.py's 100 epochs), errors within 6e-6, in 18 CG iterations instead of 154
#: at 1e-4 (22 instead of 101; 63 instead of 97). A fit's own stopping rule leaves ~0.015 sigma
#: between two paths to the same optimum.
POLISH_TOL = 1e-3
#: ``flux_covariance``'s defaults (measured there): exact up to this many free epochs, beyond it
#: a Nystrom approximation from this many probes, and from this many epoch slots on (the padded
#: shape, so that one shape keeps one compiled covariance) from ``COV_PROBES_MANY`` (the
#: covariance is the largest cost of a long light curve), block CG to this relative residual
COV_EXACT_MAX = 16
COV_PROBES = 8
COV_MANY_EPOCHS = 64
COV_PROBES_MANY = 4
COV_TOL = 2e-2
#: ...and the position rows to this one (or ``tol`` where smaller): the position's variance is
#: more sensitive to it. Against 1e-6, on six validation cells (baseline, offset 0, HSC blend,
#: sb:21, snr 22.5, nref 1; seed 0) the position's sd comes out low by at most 2.6e-3 at 3e-3
#: (1.6e-3 at 1e-3, 3.4e-2 at 1e-2), far below what a campaign can resolve in a position's
#: pulls, in 0-7 fewer block iterations of its 2 rows (the 100-epoch benchmark: 27 instead of
#: 34 with the probes', ~0.35 s)
COV_POSITION_TOL = 3e-3
CG_MAXITER = 1000


def _pcg(apply_a, b, precond, x0, tol, maxiter, eta=0.0):
    """Preconditioned conjugate gradients on flat vectors; returns (x, iterations, rel. residual).

    Stops when the relative residual is below ``tol`` or, with ``eta > 0`` (truncated Newton;
    Nash & Sofer 1990), when ``k (q_k - q_{k-1}) <= eta |q_k|`` for the quadratic model
    ``q(x) = x.A x / 2 - b.x`` (from ``x0 = 0``): the iterations no longer buy a decrease of the
    objective worth having relative to the one already made. Unlike a residual test this does not
    tighten as the right-hand side shrinks near the optimum, where a fixed relative residual asks
    for ever more iterations in the directions the preconditioner handles worst.
    """
    bnorm = jnp.sqrt(jnp.vdot(b, b)) + 1e-300
    r0 = b - apply_a(x0)
    z0 = precond(r0)
    rz0 = jnp.vdot(r0, z0)
    state = (x0, r0, z0, z0, rz0, 0, jnp.zeros(()), jnp.full((), jnp.inf))

    def cond(s):
        _, r, _, _, _, k, q, dq = s
        unsettled = jnp.sqrt(jnp.vdot(r, r)) > tol * bnorm
        truncated = (eta > 0) & (k * dq <= eta * jnp.abs(q))
        return unsettled & ~truncated & (k < maxiter)

    def body(s):
        x, r, z, p, rz, k, q, _ = s
        ap = apply_a(p)
        pap = jnp.vdot(p, ap)
        # non-positive curvature (only a Newton system can have it): stop before the step, and
        # report it as a non-finite residual
        alpha = jnp.where(pap > 0, rz / pap, 0.0)
        r = jnp.where(pap > 0, r, jnp.nan)
        x = x + alpha * p
        r = r - alpha * ap
        z = precond(r)
        rz_new = jnp.vdot(r, z)
        p = z + (rz_new / rz) * p
        dq = 0.5 * alpha * rz  # decrease of the quadratic model in this iteration
        return x, r, z, p, rz_new, k + 1, q - dq, dq

    x, r, _, _, _, k, _, _ = jax.lax.while_loop(cond, body, state)
    return x, k, jnp.sqrt(jnp.vdot(r, r)) / bnorm


def _rowwise(apply_a):
    """``apply_a`` over the rows of a matrix, one row at a time. Not ``vmap``: batched through the
    whole rendering, the operator's intermediates outgrow the caches. Measured (``scripts/benchmark.py``'s
    100 epochs of 64x64, 2 cores, per row): 29 ms one at a time, 32 ms batched by 2, 38 by 4, 42 by 6."""
    return lambda rows: jax.lax.map(apply_a, rows)


def _block_pcg(apply_a, b, precond, tol, maxiter):
    """Block preconditioned conjugate gradients for several right-hand sides (rows of ``b``).

    All the solves share one block Krylov space, so a slow mode of the operator that one
    right-hand side has found is removed from all of them: far fewer iterations than
    independent solves, for the same operator applications per iteration. The search block is
    orthonormalised each iteration and dependent directions are dropped (the breakdown-free
    variant), so converged or zero right-hand sides are harmless. Returns ``(x, iterations,
    largest relative residual)``.
    """
    apply_rows = _rowwise(apply_a)
    precond_rows = jax.vmap(precond)
    bnorm = jnp.sqrt(jnp.sum(b * b, axis=1)) + 1e-300

    def rel_res(r):
        return jnp.max(jnp.sqrt(jnp.sum(r * r, axis=1)) / bnorm)

    def orthonormal(p):
        # rows scaled to unit norm first, so that a direction is dropped for being dependent on
        # the others, never for being small (a nearly converged right-hand side keeps its own)
        norm = jnp.sqrt(jnp.sum(p * p, axis=1))
        nonzero = norm > 0.0
        p = p / jnp.where(nonzero, norm, 1.0)[:, None]
        q, rr = jnp.linalg.qr(p.T)  # Householder: stable where a Gram matrix would square the conditioning
        keep = (jnp.abs(jnp.diagonal(rr)) > 1e-10) & nonzero
        return jnp.where(keep, 1.0, 0.0)[:, None] * q.T, keep

    x0 = jnp.zeros_like(b)
    z0 = precond_rows(b)
    state = (x0, b, z0, 0)

    def cond(s):
        _, r, _, k = s
        return (rel_res(r) > tol) & (k < maxiter)

    def body(s):
        x, r, p, k = s
        p, keep = orthonormal(p)
        q = apply_rows(p)
        # P^T A P; a unit diagonal where a direction was dropped (its rows are zero); no
        # eigenvalue cut: S spans many decades, and every kept direction carries information
        pq = 0.5 * (p @ q.T + q @ p.T) + jnp.diag(jnp.where(keep, 0.0, 1.0))
        cho = jax.scipy.linalg.cho_factor(pq)
        alpha = jax.scipy.linalg.cho_solve(cho, p @ r.T)  # [directions, right-hand sides]
        x = x + alpha.T @ p
        r = r - alpha.T @ q
        z = precond_rows(r)
        beta = -jax.scipy.linalg.cho_solve(cho, q @ z.T)
        return x, r, z + beta.T @ p, k + 1

    x, r, _, k = jax.lax.while_loop(cond, body, state)
    return x, k, rel_res(r)


def _pixel_dot(jl: jax.Array, img: jax.Array) -> jax.Array:
    """``sum_yx jl[e, y, x, a] img[e, y, x]``. A broadcast product and sum: XLA on CPUs lowers the
    einsum to a transpose of ``jl`` and a batched dot, 3x slower (in every operator application)."""
    return jnp.sum(jl * img[..., None], axis=(1, 2))


def _local_blocks(loc, st: EpochStack, glob: SceneGlobal, grid: ModelGrid, single: bool = False):
    """Model, local Jacobian (flux column zeroed where pinned), residual, normal blocks of one stack.

    ``single``: the model and its Jacobian rendered in float32 (then float64 again, as is all
    that follows), for a step's or the covariance's set-up in mixed precision
    (``_linearised_model`` says why float32 is safe there: the residuals' rounding, ~1e-7 of the
    model, stays far below the noise and the solves' tolerances). Half the cost of the set-up's largest fixed term:
    measured on ``scripts/benchmark.py``'s 100 epochs of 64x64, 89 instead of 180 ms."""
    if single:
        model, jl = _double(local_jacobian(*_single((glob, loc, st, grid))))
    else:
        model, jl = local_jacobian(glob, loc, st, grid)
    jl = jl.at[..., 0].multiply(st.free_flux[:, None, None])
    w = st.weight
    r = st.data - model
    prec = _local_prec(st)
    n_mat = jnp.einsum("eyxa,eyx,eyxb->eab", jl, w, jl) + jax.vmap(jnp.diag)(prec)
    # keeps a block invertible when a parameter has no data (e.g. the transient off an epoch)
    ridge = 1e-12 * jnp.diagonal(n_mat, axis1=1, axis2=2) + 1e-30
    n_mat = n_mat + jax.vmap(jnp.diag)(ridge)
    b = _pixel_dot(jl, w * r) - prec * loc
    return dict(jl=jl, w=w, r=r, n_mat=n_mat, ninv=jnp.linalg.inv(n_mat), b=b)


@eqx.filter_jit
def local_variances(scene: Scene, stacks, grid: ModelGrid) -> jax.Array:
    """Variances ``[E, 6]`` of each epoch's ``[flux, sky, shift, zp, psf_width]`` conditional on the global
    parameters (host, positions) at ``scene``; stacks concatenated, padded slots included."""
    return jnp.concatenate([jax.vmap(jnp.diag)(_local_blocks(loc, st, scene.glob, grid)["ninv"])
                            for loc, st in zip(scene.local, stacks)], axis=0)


def _cast(tree, real, cplx):
    """``tree`` with its floating arrays as ``real`` and complex ones as ``cplx`` (others kept)."""
    def one(x):
        if not isinstance(x, (jax.Array, np.ndarray)) or not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        return x.astype(cplx if jnp.iscomplexobj(x) else real)
    return jax.tree_util.tree_map(one, tree)


def _single(tree):
    """``tree`` in single precision (float32, complex64): the mixed-precision parts of a solve."""
    return _cast(tree, jnp.float32, jnp.complex64)


def _double(tree):
    """``tree`` back in double precision (float64, complex128)."""
    return _cast(tree, jnp.float64, jnp.complex128)


def _linearised_model(scene: Scene, stacks, grid: ModelGrid, single: bool):
    """The rendering of all stacks linearised in the global parameters at ``scene``: ``(jvp,
    vjp)`` with ``vjp`` returning a 1-tuple, as ``jax.linear_transpose`` does. Both take and
    return float64; with ``single`` they compute in float32 (complex64).

    Why single precision is safe here: the linearised rendering only ever enters the reduced
    operator ``S`` inside conjugate gradients and the right-hand side ``J^T W r``, whose float32
    errors (~1e-7 of each term; phases good to ~1e-5 px) are far below the tolerances the solves
    stop at (1e-2 .. 1e-4). The objective (its renders and residuals) and the prior stay
    float64; so does the local blocks' algebra, from float32 renders of the model and its local
    Jacobian since the fifteenth session (``_local_blocks``). Measured (before that, on
    ``scripts/benchmark.py``'s 100 epochs of 64x64): the same Gauss-Newton path (iterations
    and CG counts), fluxes within 2.4e-5 sigma and flux errors within 5e-7 (relative) of the
    float64 fit; an operator application 63 -> 50 ms, a
    Gauss-Newton step 1.31 -> 0.93 s, the warm Laplace fit 47 -> 34 s (``--no-mixed-precision``
    against the default, same code otherwise). Over 416 validation fluxes (faint hosts, where
    the two take different Gauss-Newton paths) the fits differ by their stopping tolerance only:
    at most 0.021 sigma (docs/validation.md).
    """
    local, glob = scene.local, scene.glob
    if single:
        local, stacks, grid, glob = _single((local, stacks, grid, glob))

    def model_all(g):
        return tuple(render_stack(g, loc, st, grid) for loc, st in zip(local, stacks))

    _, jvp = jax.linearize(model_all, glob)
    vjp = jax.linear_transpose(jvp, glob)
    if not single:
        return jvp, vjp
    return (lambda v: _double(jvp(_single(v)))), (lambda ys: _double(vjp(_single(ys))))


def _residual_curvature(scene: Scene, stacks, grid: ModelGrid, parts, single: bool):
    """The second-order terms that Gauss-Newton drops, ``R = sum_pixels W r d^2 model`` (residual
    ``r`` held fixed), where they are not zero: per epoch its local-local block ``[e, 6, 6]`` and
    its local-global block ``[e, 6, n_g]`` (flat), and the block ``[n_s, n_s]`` of the global
    parameters that are not host pixels (positions, static sources). Host-host and host-position
    terms vanish: a pixel host renders linearly and independently of the point sources.

    The local-global block couples each epoch's shift to the host pixels through the noise in
    the residual: Gauss-Newton, blind to it, converges only linearly in the shifts (ratio ~0.8
    per iteration on noisy simulations), Newton with it quadratically.
    ``single``: computed in float32 (it only enters the CG operator and the right-hand side).

    Cost: the model is ``cal (host + point sources) + sky`` with ``cal = scale (1 + zp)``, so
    only the two shift directions need forward-over-reverse passes through the host rendering;
    the flux and PSF-width directions go through the point sources only (their other tangents
    are symbolic zeros), the zero-point ones are the gradient itself and the sky's vanish."""
    glob = scene.glob
    flat, unravel = ravel_pytree(glob)
    local = scene.local
    wrs = tuple(p["w"] * p["r"] for p in parts)
    if single:
        flat, glob, local, stacks, grid, wrs = _single((flat, glob, local, stacks, grid, wrs))
    out = []
    for loc, st, wr in zip(local, stacks, wrs):
        def one(args):
            l, ep, c = args

            def grads(fl, sh, w):  # gradient of c . sources over (flat glob, flux, shift, width)
                def f(gflat, fl2, sh2, w2):
                    g = unravel(gflat)
                    return jnp.sum(c * epoch_sources(host_spectrum(g, grid), g, fl2, sh2, w2, ep, grid))
                return jax.grad(f, argnums=(0, 1, 2, 3))(flat, fl, sh, w)

            fl, sh, w = l[LOCAL_FLUX], l[LOCAL_SHIFT], l[LOCAL_PSF]
            prim, d_fl = jax.jvp(lambda x: grads(x, sh, w), (fl,), (jnp.ones_like(fl),))
            d_sh = jax.vmap(lambda t: jax.jvp(lambda x: grads(fl, x, w), (sh,), (t,))[1])(jnp.eye(2, dtype=sh.dtype))
            if ep.fit_psf_width:
                d_w = jax.jvp(lambda x: grads(fl, sh, x), (w,), (jnp.ones_like(w),))[1]
            else:  # pinned: its terms do not matter
                d_w = jax.tree_util.tree_map(jnp.zeros_like, prim)

            def row6(t):  # [..., 6] in the local order from (glob, flux, shift, width) derivatives
                z = jnp.zeros_like(t[1])
                return jnp.stack([t[1], z, t[2][..., 0], t[2][..., 1], z, t[3]], axis=-1)

            cal = ep.scale * (1.0 + l[LOCAL_ZP])
            zero_g = jnp.zeros_like(prim[0])
            rg = jnp.stack([cal * d_fl[0], zero_g, cal * d_sh[0][0], cal * d_sh[0][1], ep.scale * prim[0],
                            cal * d_w[0]])  # [6, n_g]
            zp_row = ep.scale * row6(prim)  # d2/dzp da = scale dG/da
            sh_rows = cal * row6(d_sh)
            rl = jnp.stack([cal * row6(d_fl), jnp.zeros(6, prim[0].dtype), sh_rows[0], sh_rows[1], zp_row, cal * row6(d_w)])
            rl = rl.at[:, LOCAL_ZP].set(zp_row)  # and its column (symmetric)
            return rg, rl

        rg, rl = batched(one, st.n_epochs)((loc, st, wr))
        out.append((rg, rl.astype(jnp.float64)))
    # the small global block, differentiating through the point sources only (the host held fixed)
    small_leaves = (glob.position, glob.star_position, glob.star_flux)
    xs0, unravel_s = ravel_pytree(small_leaves)
    if xs0.size != _small_indices(scene.glob).size:
        raise AssertionError("unexpected parameter layout")

    def total(xs):
        g = eqx.tree_at(lambda g: (g.position, g.star_position, g.star_flux), glob, unravel_s(xs))
        return sum(jnp.sum(c * render_stack(g, l, st, grid)) for l, st, c in zip(local, stacks, wrs))

    r_small = jax.hessian(total)(xs0)
    return out, r_small.astype(jnp.float64)


def _coupling(p, vflat: jax.Array) -> jax.Array:
    """``R_e v`` ``[e, 6]``: a stack's second-order local-global coupling (``p["rc"]``, from
    ``_build(newton=True)``) applied to a flat global vector; in ``rc``'s precision."""
    return jnp.einsum("eag,g->ea", p["rc"], vflat.astype(p["rc"].dtype)).astype(vflat.dtype)


def _coupling_t(p, t: jax.Array) -> jax.Array:
    """``sum_e R_e^T t_e`` ``[n_g]``: the transpose of ``_coupling``."""
    return jnp.einsum("eag,ea->g", p["rc"], t.astype(p["rc"].dtype)).astype(t.dtype)


#: smallest eigenvalue, relative to the Gauss-Newton block's diagonal, that an epoch's Newton
#: local block may have; below it the epoch keeps its Gauss-Newton block (no second-order terms)
NEWTON_LOCAL_MIN_EIG = 0.05


def _build(scene: Scene, stacks, grid, pa: PriorArrays, mixed: bool = True, newton: bool = False):
    """Residuals, local blocks and the reduced operator at ``scene``; ``mixed``: the linearised
    rendering in single precision (``_linearised_model``) where the reduced system is solved by
    CG (a dense Cholesky factorisation, which would see the rounding, always gets float64).

    ``newton``: the exact Hessian instead of the Gauss-Newton one, i.e. with the second-order
    residual terms of ``_residual_curvature`` (pixel hosts only). An epoch whose local block
    would then not be safely positive definite keeps its Gauss-Newton block and couplings. The
    local parts keep the Gauss-Newton ``ninv`` as ``ninv_gn`` (the conditional variances)."""
    glob = scene.glob
    flat0, unravel = ravel_pytree(glob)
    n_g = flat0.shape[0]
    single = mixed and n_g > _DENSE_MAX
    parts = [_local_blocks(loc, st, glob, grid, single) for loc, st in zip(scene.local, stacks)]
    jvp_fn, vjp_fn = _linearised_model(scene, stacks, grid, single)
    small = _small_indices(glob)
    r_small = None
    for p in parts:
        p["ninv_gn"] = p["ninv"]
    if newton:
        if not isinstance(glob.host, PixelHost):
            raise ValueError("newton=True needs a pixel host")
        curv, r_small = _residual_curvature(scene, stacks, grid, parts, single)
        for p, (rg, rl) in zip(parts, curv):
            n_mat = p["n_mat"] - 0.5 * (rl + jnp.swapaxes(rl, 1, 2))
            d = jnp.sqrt(jnp.diagonal(p["n_mat"], axis1=1, axis2=2))
            lam = jnp.linalg.eigvalsh(n_mat / (d[:, :, None] * d[:, None, :]))
            ok = jnp.min(lam, axis=1) > NEWTON_LOCAL_MIN_EIG
            p["ninv"] = jnp.linalg.inv(jnp.where(ok[:, None, None], n_mat, p["n_mat"]))
            p["rc"] = rg * ok.astype(rg.dtype)[:, None, None]

    prior_grad = jax.grad(lambda g: global_prior(g, pa, grid))

    def apply_s(vflat):
        v = unravel(vflat)
        pix = []
        second_order = []  # the Newton terms, R_e^T t_e and the small block's
        for y, p in zip(jvp_fn(v), parts):
            wy = p["w"] * y
            c = _pixel_dot(p["jl"], wy)
            if newton:
                c = c - _coupling(p, vflat)
            t = jnp.einsum("eab,eb->ea", p["ninv"], c)
            pix.append(wy - p["w"] * jnp.einsum("eyxa,ea->eyx", p["jl"], t))
            if newton:
                second_order.append(_coupling_t(p, t))
        g = vjp_fn(tuple(pix))[0]
        hv = jax.jvp(prior_grad, (glob,), (v,))[1]
        out = ravel_pytree(g)[0] + 0.5 * ravel_pytree(hv)[0]
        if newton:
            out = sum(second_order, out).at[small].add(-(r_small @ vflat[small]))
        return out

    # right-hand side
    ys = []
    second_order = []
    for p in parts:
        t = jnp.einsum("eab,eb->ea", p["ninv"], p["b"])
        ys.append(p["w"] * p["r"] - p["w"] * jnp.einsum("eyxa,ea->eyx", p["jl"], t))
        if newton:
            second_order.append(_coupling_t(p, t))
    grad_prior = jax.grad(lambda g: global_prior(g, pa, grid))(glob)
    rhs = sum(second_order, ravel_pytree(vjp_fn(tuple(ys))[0])[0] - 0.5 * ravel_pytree(grad_prior)[0])

    return dict(
        parts=parts, apply_s=apply_s, rhs=rhs, unravel=unravel, n_g=n_g,
        jvp_fn=jvp_fn, vjp_fn=vjp_fn, newton=newton, single=single,
    )


def _small_indices(glob: SceneGlobal) -> np.ndarray:
    """Flat indices of the global parameters that are not PixelHost pixels (static)."""
    mask = jax.tree_util.tree_map(lambda x: np.ones(np.shape(x), bool), glob)
    if isinstance(glob.host, PixelHost):
        mask = eqx.tree_at(lambda g: g.host.image, mask, np.zeros(np.shape(glob.host.image), bool))
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(mask)])
    return np.flatnonzero(flat)


def _deflation(apply_s, u_rows: jax.Array):
    """Coarse-space pieces for a balancing preconditioner: ``(U, S U, E^+)`` with the columns of
    U the rows of ``u_rows`` and ``E = U^T S U`` (pseudo-inverse: padded zero rows are fine)."""
    su = _rowwise(apply_s)(u_rows)  # [k, n]
    e = u_rows @ su.T
    e = 0.5 * (e + e.T)
    # scaled to a unit diagonal first: rows of very different sizes (the transient rows carry
    # the data's units, the pedestal rows unit norm) must not look dependent to the cut
    d = jnp.sqrt(jnp.maximum(jnp.diagonal(e), 1e-300))
    lam, vec = jnp.linalg.eigh(e / (d[:, None] * d[None, :]))
    keep = lam > 1e-10 * jnp.max(lam)
    e_pinv = (vec * jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)) @ vec.T
    return u_rows, su, e_pinv / (d[:, None] * d[None, :])


def _make_solver(sysd, glob: SceneGlobal, grid: ModelGrid, pa: PriorArrays, deflate=None):
    """Functions solving S x = rhs (flat), dense for small systems, PCG otherwise: ``(solve,
    S if dense else None, block solve of the rows of a matrix)``.

    ``deflate``: rows spanning directions that the Fourier preconditioner handles badly (the
    host light under the transient, which only transient-free epochs constrain); with them the
    preconditioner becomes the balancing (BNN) one, ``(I - QS) P^-1 (I - SQ) + Q`` with
    ``Q = U (U^T S U)^-1 U^T``, which solves S exactly on that span. A pixel host's pedestal
    (``_host_pedestal``, one row per band) is always deflated.
    """
    n_g = sysd["n_g"]
    apply_s = sysd["apply_s"]
    small = _small_indices(glob)
    if n_g <= _DENSE_MAX:
        s_dense = jax.vmap(apply_s)(jnp.eye(n_g))
        s_dense = 0.5 * (s_dense + s_dense.T)
        cho = jax.scipy.linalg.cho_factor(s_dense)
        solve = lambda rhs, tol=None, eta=None: (jax.scipy.linalg.cho_solve(cho, rhs), 0, 0.0)  # noqa: E731
        block = lambda rows, tol=None: (jax.scipy.linalg.cho_solve(cho, rows.T).T, 0, 0.0)  # noqa: E731
        return solve, s_dense, block

    host_shape = glob.host.image.shape
    n_host = int(np.prod(host_shape))
    # host pixels come first in the flattened SceneGlobal (field order); checked here
    if not np.array_equal(small, np.arange(n_host, n_g)):
        raise AssertionError("unexpected parameter layout")
    n_s = n_g - n_host
    if n_s > 0:
        eye = jnp.zeros((n_s, n_g)).at[jnp.arange(n_s), n_host + jnp.arange(n_s)].set(1.0)
        block = _rowwise(apply_s)(eye)[:, n_host:]
        block_inv = jnp.linalg.inv(0.5 * (block + block.T))
    else:
        block_inv = jnp.zeros((0, 0))

    def precond0(r):
        return jnp.concatenate([_host_precond(r[:n_host], pa.host_precond, grid), block_inv @ r[n_host:]])

    n_bands = host_shape[0]
    pedestal = (jnp.eye(n_bands)[:, :, None, None] * pa.host_pedestal[None]).reshape(n_bands, n_host)
    pedestal = jnp.concatenate([pedestal, jnp.zeros((n_bands, n_s), pedestal.dtype)], axis=1)
    u, su, e_pinv = _deflation(apply_s, pedestal if deflate is None else jnp.concatenate([deflate, pedestal], axis=0))

    def precond(r):
        qr = e_pinv @ (u @ r)
        y = precond0(r - su.T @ qr)
        y = y - u.T @ (e_pinv @ (su @ y))
        return y + u.T @ qr

    def solve(rhs, tol=LINEAR_TOL, eta=0.0):
        return _pcg(apply_s, rhs, precond, jnp.zeros_like(rhs), tol, CG_MAXITER, eta)

    def block(rows, tol=LINEAR_TOL):
        return _block_pcg(apply_s, rows, precond, tol, CG_MAXITER)

    return solve, None, block


def _flux_cotangent(p) -> jax.Array:
    """Per epoch, the pixel cotangent whose transpose through the model gives ``z_e``, the coupling
    of that epoch's (eliminated) flux to the global parameters; ``p``: a stack's ``_local_blocks``."""
    return p["w"] * jnp.einsum("eyxa,ea->eyx", p["jl"], p["ninv"][:, :, 0])


def _transient_rows(sysd, stacks, glob: SceneGlobal) -> jax.Array | None:
    """Deflation rows for a Gauss-Newton step: per band, the host pattern that the band's free
    epoch fluxes are coupled to (the sum of their ``z_e``: the host light under the transient).

    Each epoch's flux absorbs that pattern, so only the transient-free epochs constrain it and
    the Fourier preconditioner, which assumes every epoch does, gets it badly wrong: it is the
    slowest direction of the reduced system. Measured (20 epochs of 28x28, 2 bands, at the MAP):
    a tolerance-1e-4 solve of the step's right-hand side in 111 CG iterations without these
    rows, 36 with them (deflating the host's constant, the sky's partner, instead: 60; both: 36),
    for 3 more operator applications (one transpose per band, one ``S u`` per row). None where
    the system is solved densely."""
    if sysd["n_g"] <= _DENSE_MAX or not isinstance(glob.host, PixelHost):
        return None
    n_bands = glob.host.image.shape[0]
    rows = []
    for b in range(n_bands):
        cots = []
        second_order = []
        for st, p in zip(stacks, sysd["parts"]):
            sel = st.free_flux * st.valid * (st.band == b)
            cots.append(sel[:, None, None] * _flux_cotangent(p))
            if sysd["newton"]:  # z_e's second-order part (see _build)
                second_order.append(-_coupling_t(p, sel[:, None] * p["ninv"][:, :, 0]))
        rows.append(sum(second_order, ravel_pytree(sysd["vjp_fn"](tuple(cots))[0])[0]))
    return jnp.stack(rows)


@eqx.filter_jit
def gauss_newton_step(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, tol: jax.Array | float = LINEAR_TOL,
                      eta: jax.Array | float = 0.0, *, mixed: bool = True, newton: bool = False):
    """One Gauss-Newton step for all parameters; ``tol``: CG relative residual, ``eta``: CG
    truncation on the quadratic model's decrease (0: off; see ``_pcg``). Pass arrays to reuse
    the compiled step for other values. ``mixed``: the linearised rendering in single precision
    (``_linearised_model``). ``newton``: a Newton step instead, with the exact Hessian
    (``_residual_curvature``; pixel hosts only); a reduced system that is not positive definite
    there stops CG at the negative curvature (its iterate so far is the step) and returns a NaN
    residual.

    Returns (step as a Scene, Gauss-Newton conditional variances ``[e, 6]`` of the local
    parameters per stack, cg iterations, cg residual).
    """
    sysd = _build(scene, stacks, grid, pa, mixed, newton)
    solve, _, _ = _make_solver(sysd, scene.glob, grid, pa, deflate=_transient_rows(sysd, stacks, scene.glob))
    dg, iters, res = solve(sysd["rhs"], tol, eta)
    dglob = sysd["unravel"](dg)
    u = sysd["jvp_fn"](dglob)
    dlocal = []
    for ui, p in zip(u, sysd["parts"]):
        c = _pixel_dot(p["jl"], p["w"] * ui)
        if newton:
            c = c - _coupling(p, dg)
        dlocal.append(jnp.einsum("eab,eb->ea", p["ninv"], p["b"] - c))
    fvar = tuple(jax.vmap(jnp.diag)(p["ninv_gn"]) for p in sysd["parts"])
    return Scene(glob=dglob, local=tuple(dlocal)), fvar, iters, res


@eqx.filter_jit
def _covariance_solves(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, probes_t: jax.Array,
                       e_pos: jax.Array | None, tol: float, deflate: bool = True, mixed: bool = True):
    """The ``z_e`` (how each epoch's flux couples to the global parameters), the local
    variances, and ``S^-1`` applied to ``probes_t @ Z`` and to the rows of ``e_pos`` (none when
    ``e_pos`` is None), all from one linearisation (S: the reduced global normal matrix)."""
    sysd = _build(scene, stacks, grid, pa, mixed)
    glob = scene.glob
    zs = []
    local_var = []
    for loc, st, p in zip(scene.local, stacks, sysd["parts"]):
        # the z rows only enter the solves' right-hand sides and M's Nystrom products, so they
        # are as safe in single precision as the solves' linearisation (``_linearised_model``)
        args = (glob, grid, loc, st, _flux_cotangent(p))
        g0, grid0, loc0, st0, cot0 = _single(args) if sysd["single"] else args

        def one(args):
            l, ep, c = args
            f = lambda g: render_epoch(host_spectrum(g, grid0), g, l, ep, grid0)  # noqa: E731
            _, vjp = jax.vjp(f, g0)
            return ravel_pytree(vjp(c)[0])[0]

        zs.append(batched(one, st.n_epochs)((loc0, st0, cot0)).astype(jnp.float64))
        local_var.append(jax.vmap(jnp.diag)(p["ninv"]))
    z = jnp.concatenate(zs, axis=0)  # [E, n_g]
    b_rows = probes_t @ z
    _, _, block = _make_solver(sysd, glob, grid, pa, deflate=b_rows if deflate else None)
    # the position rows in a block of their own: together with the probes of the exact path
    # (26 epochs of 32x32) they held the block at 113 iterations, apart it is 27 + 23. They keep
    # the probes' deflation: without it the position solve met the residual tolerance with its
    # standard deviation 10 % off (the residual of a unit vector says little here)
    xs, its, _ = block(b_rows, tol)
    if e_pos is None:
        return z, jnp.concatenate(local_var, axis=0), xs, its
    xs_pos, its_pos, _ = block(e_pos, min(tol, COV_POSITION_TOL))
    return z, jnp.concatenate(local_var, axis=0), jnp.concatenate([xs, xs_pos], axis=0), its + its_pos


def _free_epochs(stacks) -> np.ndarray:
    """Indices (stacks concatenated) of the epoch slots whose flux is free."""
    return np.flatnonzero(np.concatenate([np.asarray(st.free_flux * st.valid) for st in stacks]) > 0)


def _probe_directions(stacks, free: np.ndarray) -> np.ndarray:
    """The leading directions of ``M = Z S^-1 Z^T`` (``flux_covariance``), known in advance, as
    Nystrom probes ``[E, k]``: per band, the indicator of its free epochs (the host light under
    the transient, which every epoch's flux shares), then per band the deviation of each epoch's
    PSF sharpness ``1 / sigma_PSF^2`` from the band's mean (sharp and blurred epochs see that
    host light differently). Measured (``scripts/benchmark.py``'s 100 epochs): M's eigenvalues
    relative to the top one are 1, 0.92 (the indicators), 9.3e-3, 7.3e-3 (the sharpness ones:
    their eigenvectors correlate with it to 0.98-0.99), then 2.9e-3 and a tail below 7e-4."""
    band = np.concatenate([np.asarray(st.band) for st in stacks])
    sharp = np.zeros(band.shape)
    sharp[free] = 1.0 / np.concatenate([np.asarray(st.psf_var) for st in stacks])[free]
    indicators, deviations = [], []
    for b in np.unique(band[free]):
        sel = free[band[free] == b]
        ind = np.zeros(band.shape)
        ind[sel] = 1.0
        indicators.append(ind)
        dev = np.zeros(band.shape)
        dev[sel] = sharp[sel] - sharp[sel].mean()
        if np.max(np.abs(dev)) > 1e-6 * sharp[sel].mean():  # not all epochs alike
            deviations.append(dev / np.max(np.abs(dev)))
    return np.stack(indicators + deviations, axis=1)


def _probe_solves(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, probes: int, tol: float, seed: int,
                  deflate: bool, position: bool, mixed: bool):
    """The probe matrix Omega ``[E, k]`` of ``flux_covariance`` and its solves: returns
    ``(omega, z [E, n_g], local_var [E, 6], xs [k, n_g], xs_pos [2, n_g] or None, cg_iterations)``
    as numpy arrays (``xs``: ``S^-1`` applied to the ``Omega^T Z`` rows; ``xs_pos`` to the
    position's unit rows, solved only with ``position``)."""
    # epochs whose flux is free (the z rows of the others are exactly zero)
    free = _free_epochs(stacks)
    n_e = sum(st.n_epochs for st in stacks)
    if free.size <= probes:
        # exact with any invertible square Omega on the free epochs. A random rotation rather
        # than the identity: the block solve stops when every right-hand side has converged
        # relative to its own norm, and one epoch's own row can be tiny and slow (measured:
        # 26 epochs, 170 block-CG iterations with the identity, 113 with a rotation)
        omega = np.zeros((n_e, max(free.size, 1)))
        if free.size:
            rot, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(free.size, free.size)))
            omega[free] = rot
    else:
        omega = np.zeros((n_e, probes))
        known = _probe_directions(stacks, free)[:, :probes]
        omega[:, :known.shape[1]] = known
        omega[free, known.shape[1]:] = np.random.default_rng(seed).normal(size=(free.size, probes - known.shape[1]))
    k = omega.shape[1]
    k_pad = 1 << max(k - 1, 0).bit_length()  # bucketed so compiled solves are reused
    omega_t = np.zeros((k_pad, n_e))
    omega_t[:k] = omega.T
    e_pos = None
    if position:
        n_g = ravel_pytree(scene.glob)[0].shape[0]
        pos_idx = _position_index(scene.glob)
        e_pos = np.zeros((2, n_g))
        e_pos[0, pos_idx] = e_pos[1, pos_idx + 1] = 1.0
        e_pos = jnp.asarray(e_pos)
    z, local_var, xs, its = _covariance_solves(scene, stacks, grid, pa, jnp.asarray(omega_t), e_pos, tol, deflate, mixed)
    xs = np.asarray(xs)
    return omega, np.asarray(z), np.asarray(local_var), xs[:k], (xs[k_pad:] if position else None), its


def flux_covariance(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, *, probes: int | None = None,
                    tol: float = COV_TOL, seed: int = 0, deflate: bool = True, mixed: bool = True):
    """Covariance of the epoch fluxes over all epochs (stacks concatenated), marginalised.

    ``Cov = diag(N_e^-1) + M`` with ``M = Z S^-1 Z^T`` (Z: the rows ``z_e``). M is exact when at
    most ``probes`` epochs have a free flux (one solve per epoch); otherwise it is the Nystrom
    approximation ``Y (Omega^T Y)^-1 Y^T``, ``Y = M Omega``. Omega holds M's leading directions
    known in advance (``_probe_directions``: per band the indicator of its free epochs and their
    PSF sharpness's deviation from the band's mean) and Gaussian columns (fixed ``seed``) for the
    rest. M has one dominant direction per band (the host light exactly under the transient,
    which only transient-free epochs constrain: the band indicator is close to it), one more per
    band along the sharpness at ~1e-2 of the top, and then a tail. The numbers that follow, up to
    the defaults, are from before the sharpness probes (fourteenth session; with them, see
    ``_probe_directions`` and docs/model.md). Largest relative error of a flux error against the exact
    covariance (seeing 1.5-3", rotated epochs, 2 bands): 26 free epochs, 1.8e-3 with 8 probes,
    1.4e-3 with 12, 4.5e-4 with 16 (random probes only: 4.4e-3, 1.1e-3, 5.9e-4); 90 free epochs
    of 64x64 (``scripts/benchmark.py``'s 100), 2.3e-3 with 8 (median 7e-5), 1.4e-3 with 12,
    1.8e-3 with 16, correlations within 4.6e-3 with 8. The probes (and the two position rows)
    are solved by block CG (``_block_pcg``), which shares one Krylov space: on 31 epochs of
    32x32 px, 16 probes take 27 block iterations and the position rows another 28, instead of
    146 for the slowest of 18 independent solves. Its tolerance hardly matters next to the
    Nystrom error: at 90 epochs, 1e-3 instead of 1e-4 leaves the flux errors' largest and median
    errors as they were (1.8e-3 and 2.8e-5 with 16 probes) and moves the position's by 1.8e-4,
    in 44 block iterations of 8 probes instead of 54 (16 probes at 1e-4: 47 iterations, twice
    the operator applications of 8 at 1e-3). With the position rows held at 1e-3, the probes'
    tolerance (against 1e-5, same 8 probes, mixed precision) moves the largest flux error by
    1.4e-6 at 1e-3, 1.4e-4 at 1e-2, 3.5e-4 at 3e-2 (correlations by 2e-6, 1.5e-4, 5e-4), in 45,
    39 and 34 block iterations of probes and position rows together. Hence the defaults
    (``probes=None``): exact up to ``COV_EXACT_MAX`` (16) free epochs, where it is cheap, and 8
    probes (``COV_PROBES``) beyond, solved to a residual of 2e-2 (``COV_TOL``), the position rows
    to 3e-3 (``COV_POSITION_TOL``): the covariance was half of a 100-epoch fit's time. Against
    1e-2, 2e-2 leaves the largest flux-error, correlation and position-error differences from the
    exact covariance (64 probes at 1e-6) as they were to 2e-5 (validation cells baseline, sb:21,
    offset 0, HSC blend, seed 0: 8 probes, 23-36 block iterations instead of 24-43; the 100
    epochs: 4 probes, 20 instead of 25). From ``COV_MANY_EPOCHS`` (64) epoch slots on, 4 probes
    (``COV_PROBES_MANY``), at half the cost: measured on the 90 free epochs above (against 96
    probes at 1e-4), flux errors within 5.4e-3 (median 2.3e-4) with 4 probes, 2.3e-3 (9.5e-5)
    with 8, and the covariance 15.2 -> 6.8 s on one core. Fewer epochs keep 8: with 32 free
    epochs (validation cells baseline, sb:21, offset:0.0fwhm, seed 0) 4 probes leave errors
    within 0.9-1.4e-2 and correlations within 6-8e-3, 8 probes 0.6-2.4e-3 and 0.5-2.0e-3,
    and there the covariance is a few seconds either way.
    The Nystrom term is never larger than the exact one (Loewner order), so an error it makes is
    a slight underestimate (tests/test_geometry_render.py checks the approximation against the
    exact covariance). ``mixed``: the solves' linearised rendering in single precision
    (``_linearised_model``).

    Returns ``(cov [E, E], local_var [E, 6], position_cov [2, 2], cg_iterations)`` where E is the
    total number of (padded) epoch slots in stack order.
    """
    if probes is None:
        n_slots = sum(st.n_epochs for st in stacks)
        probes = (COV_EXACT_MAX if _free_epochs(stacks).size <= COV_EXACT_MAX
                  else COV_PROBES if n_slots < COV_MANY_EPOCHS else COV_PROBES_MANY)
    omega, z, local_var, xs, xs_pos, its = _probe_solves(scene, stacks, grid, pa, probes, tol, seed, deflate, True,
                                                         mixed)
    pos_idx = _position_index(scene.glob)
    y = z @ xs.T  # [E, k] = M Omega
    core = omega.T @ y
    core = 0.5 * (core + core.T)
    # pseudo-inverse through the eigen-decomposition (the core is PSD up to round-off)
    lam, vec = np.linalg.eigh(core)
    good = lam > 1e-12 * max(lam.max(initial=0.0), 1e-300)
    yv = y @ vec[:, good]
    m_mat = (yv / lam[good]) @ yv.T
    cov = np.diag(local_var[:, 0]) + 0.5 * (m_mat + m_mat.T)
    pos_cov = xs_pos[:, [pos_idx, pos_idx + 1]]
    log.debug("flux covariance: %d probe solves for %d free epochs, %d CG iterations", omega.shape[1],
              int(omega.any(axis=1).sum()), int(its))
    return cov, local_var, pos_cov, int(its)


@eqx.filter_jit
def _prior_share(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, x_glob: jax.Array, mixed: bool = True
                 ) -> jax.Array:
    """``x_e^T P x_e`` for ``x_e = H^-1 u_e`` and every epoch e (stack order), given the global
    parts ``x_glob [E, n_g]`` (``-S^-1 z_e``). The global priors are quadratic, so their share is
    a symmetric second difference of the prior energy; the local parts follow by
    back-substitution, ``l_e' = N_e'^-1 (delta_ee' u - B_e'^T x_glob)``, as in a Gauss-Newton step."""
    sysd = _build(scene, stacks, grid, pa, mixed)
    theta, unravel = ravel_pytree(scene.glob)
    precs = [_local_prec(st) for st in stacks]
    flux_unit = jnp.eye(6)[0]

    def prior(v):
        return global_prior(unravel(v), pa, grid)

    p0 = prior(theta)

    def one(args):
        xg, e = args
        total = 0.5 * (prior(theta + xg) + prior(theta - xg)) - p0
        start = 0
        for ui, p, prec in zip(sysd["jvp_fn"](unravel(xg)), sysd["parts"], precs):
            c = _pixel_dot(p["jl"], p["w"] * ui)
            own = (jnp.arange(c.shape[0]) + start == e)[:, None] * flux_unit[None, :]
            loc = jnp.einsum("eab,eb->ea", p["ninv"], own - c)
            total = total + jnp.sum(prec * loc**2)
            start += c.shape[0]
        return total

    return jax.lax.map(one, (x_glob, jnp.arange(x_glob.shape[0])))


def flux_estimator_variance(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, *, tol: float = LINEAR_TOL,
                            seed: int = 0, mixed: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Posterior and sampling variances of every epoch flux of the problem linearised at ``scene``.

    The Gauss-Newton estimate of a linear(ised) Gaussian problem, ``x = H^-1 (J^T W d + ...)``
    with ``H = F + P`` (F = J^T W J, P the prior precision), scatters over noise realisations
    with covariance ``H^-1 F H^-1 = H^-1 - H^-1 P H^-1``: less than the posterior ``H^-1`` by the
    prior's share ``x_e^T P x_e`` with ``x_e = H^-1 u_e`` (u_e: epoch e's flux). Its global part
    is ``-S^-1 z_e``, its local parts follow by back-substitution; every prior counts (host,
    position, shifts, zero points, PSF widths; pinned ones contribute ~1/pin). Exact (one probe
    per free epoch). ``mixed``: as in ``flux_covariance``.

    Returns ``(posterior_var [E], sampling_var [E])`` in nJy^2, stack order (0 where not free).
    """
    n_free = _free_epochs(stacks).size
    omega, z, local_var, xs, _, _ = _probe_solves(scene, stacks, grid, pa, max(n_free, 1), tol, seed, True, False,
                                                mixed)
    g = omega @ xs  # [E, n_g]: S^-1 z_e for the free epochs (Omega orthonormal on them)
    post = local_var[:, 0] + np.einsum("ej,ej->e", z, g)
    share = np.asarray(_prior_share(scene, stacks, grid, pa, -jnp.asarray(g), mixed))
    free = omega.any(axis=1)
    return np.where(free, post, 0.0), np.where(free, post - share, 0.0)


def _position_index(glob: SceneGlobal) -> int:
    """Flat index of position[0] in ravel_pytree(glob) (static)."""
    marker = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x)), glob)
    marker = eqx.tree_at(lambda g: g.position, marker, np.array([1.0, 2.0]))
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(marker)])
    return int(np.flatnonzero(flat == 1.0)[0])
