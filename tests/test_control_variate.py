"""The validation campaign's control variate (transcene.validation.linear_oracle) against the
dense linear algebra it stands for, and control_variate_metrics on draws with a known answer."""

from __future__ import annotations

import dataclasses
import math
import warnings

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from jax.flatten_util import ravel_pytree

import transcene as ts
from transcene.fit import initial_scene
from transcene.scene import Scene, render_stack
from transcene.simulate import SimulationConfig, simulate
from transcene.solve import Priors, _local_prec, freeze_geometry, global_prior, linear_solution, prior_arrays
from transcene.validation import ORACLE_TOL, control_variate_metrics, coverage_sd_floor, linear_oracle

FIT_RADIUS = 4.0  # arcsec: a small problem (~600 parameters) whose normal matrix is formed densely


@pytest.fixture(scope="module")
def problem():
    cfg = SimulationConfig(n_epochs=6, n_reference=2, size=14, psf_size=15, bands=("r",), seeing_fwhm=(2.0, 3.0),
                           rotate=True, host_mag=18.0, transient_offset=(0.6, 1.0), transient_peak_mag=19.0, seed=1)
    eps, truth = simulate(cfg)
    clean, _ = simulate(cfg, noiseless=True)
    noise = [dataclasses.replace(e, image=np.where(e.mask, 0.0, e.image - c.image)) for e, c in zip(eps, clean)]
    # the noiseless simulation draws the same epochs: what is left is white noise of the given variance
    std = np.concatenate([(e.image / np.sqrt(e.variance))[~e.mask] for e in noise])
    assert abs(std.mean()) < 4.0 / np.sqrt(std.size) and abs(std.std() - 1.0) < 4.0 / np.sqrt(2 * std.size)
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.errors.BaselineWarning)
        ds = ts.make_dataset(clean, target, fit_radius=FIT_RADIUS)
        ds_noise = ts.make_dataset(noise, target, fit_radius=FIT_RADIUS)
    assert len(ds.stacks) == 1  # one shape bucket: the flux of slot e is row e below
    # the linearisation point linear_oracle uses: the linear solution on the noiseless data
    scene = initial_scene(ds)
    pa = prior_arrays(ds, Priors(), np.asarray(scene.glob.star_position))
    scene0, frozen, pa_frozen = freeze_geometry(scene, ds.stacks, pa, ds.grid)
    theta0, _, _ = linear_solution(scene0, frozen, ds.grid, pa_frozen, mixed=False, tol=ORACLE_TOL)
    stacks = ds.stacks
    flat0, unravel = ravel_pytree(theta0)

    def weighted_model(v):
        s = unravel(v)
        return jnp.concatenate([(jnp.sqrt(st.weight) * render_stack(s.glob, loc, st, ds.grid)).ravel()
                                for loc, st in zip(s.local, stacks)])

    def prior(v):
        s = unravel(v)
        e = global_prior(s.glob, pa, ds.grid)
        return e + sum(jnp.sum(_local_prec(st) * loc**2) for loc, st in zip(s.local, stacks))

    jac = np.asarray(jax.jacfwd(weighted_model)(flat0))
    prec = 0.5 * np.asarray(jax.hessian(prior)(flat0))  # the energies are -2 log densities
    fisher = jac.T @ jac
    # the pinned parameters (reference epochs' shifts, the unused zero points and PSF widths:
    # precision 1e16) and those nothing constrains (padded slots' skies) are fixed; they would
    # only ruin the dense inverse's conditioning
    keep = (np.diag(prec) < 1e6) & (np.diag(fisher + prec) > 0)
    h_inv = np.zeros_like(fisher)
    h_inv[np.ix_(keep, keep)] = np.linalg.inv((fisher + prec)[np.ix_(keep, keep)])
    marker = jax.tree_util.tree_map(jnp.zeros_like, theta0)
    marker = Scene(glob=marker.glob, local=tuple(loc.at[:, 0].set(1.0 + jnp.arange(loc.shape[0]))
                                                   for loc in marker.local))
    flat = np.asarray(ravel_pytree(marker)[0])
    flux_idx = np.array([np.flatnonzero(flat == k + 1.0)[0] for k in range(stacks[0].n_epochs)])
    shift_free = np.sum(keep) - np.sum(keep[: ravel_pytree(theta0.glob)[0].size])  # local parameters kept
    noise_data = np.concatenate([(np.sqrt(st.weight) * st.data).ravel() for st in ds_noise.stacks])
    free = np.asarray(stacks[0].free_flux * stacks[0].valid) > 0
    return dict(noise=noise, clean=clean, target=target, ds=ds, theta0=theta0, pa=pa, h_inv=h_inv, fisher=fisher,
                jac=jac, noise_data=noise_data, flux_idx=flux_idx, free=free, n_local_free=shift_free)


def test_linear_oracle_is_the_dense_linearised_estimate_of_the_noise(problem):
    """z = H^-1 J^T W n, its sampling sd sqrt(diag(H^-1 F H^-1)) and the bound sqrt(diag(H^-1))
    (flux_estimator_variance) against the dense algebra."""
    p = problem
    # the science epochs' shifts are free here: their priors enter the sandwich too
    assert p["n_local_free"] > 3 * p["free"].sum()
    z, sd, crb = linear_oracle(p["noise"], p["clean"], p["target"], fit_radius=FIT_RADIUS)
    rows = np.asarray(p["ds"].epochs["index"])  # input epoch of each data-set row
    slots = np.asarray(p["ds"].epochs["slot"])
    dense = (p["h_inv"] @ p["jac"].T @ p["noise_data"])[p["flux_idx"]]
    dense_sd = np.sqrt(np.diag(p["h_inv"] @ p["fisher"] @ p["h_inv"]))[p["flux_idx"]]
    dense_crb = np.sqrt(np.diag(p["h_inv"]))[p["flux_idx"]]
    free = p["free"][slots]
    # ORACLE_TOL (1e-6, float64, linearisation point included): within 1e-6 here; the fits'
    # tolerances (1e-4 solves, the 1e-3 final linear step) left 1.9e-4 and 5.3e-4
    np.testing.assert_allclose(z[rows][free], dense[slots][free], rtol=1e-5, atol=1e-5 * dense_sd[slots][free].max())
    # CG to 1e-4 relative residual: the quadratic forms to a few 1e-5
    np.testing.assert_allclose(sd[rows][free], dense_sd[slots][free], rtol=3e-5)
    np.testing.assert_allclose(crb[rows][free], dense_crb[slots][free], rtol=3e-5)
    # the prior makes the estimate scatter less than the posterior says
    assert np.all(sd[rows][free] < crb[rows][free])
    # reference epochs have no free flux: no control variate
    assert all(np.all(np.isnan(v[rows][~free])) for v in (z, sd, crb))


def test_control_variate_metrics_are_unbiased_and_sharper():
    """Draws with known answers: fit errors = z + an extra part, in CRB units; a biased and a
    mis-scaled estimator; over many repetitions the cv estimates centre on the truth with a
    smaller scatter than the raw ones."""
    rng = np.random.default_rng(3)
    n, reps, bias, scale = 200, 400, 0.1, 1.1  # scale: true error / reported error
    cv, raw = [], []
    for _ in range(reps):
        z = rng.normal(size=n)
        err_true = z + 0.3 * rng.normal(size=n)  # var 1.09
        flux = 100.0 + bias + err_true
        reported = np.full(n, math.sqrt(1.09) / scale)
        m = control_variate_metrics(flux, reported, np.full(n, 100.0), np.ones(n), z, np.ones(n))
        cv.append([m["bias_cv"], m["pull_rms_cv"], m["coverage68_cv"]])
        pull = err_true / reported
        raw.append([np.mean(flux - 100.0), np.sqrt(np.mean(pull**2)), np.mean(np.abs(pull) < 1)])
    cv, raw = np.array(cv), np.array(raw)
    expect = [bias, math.sqrt(scale**2 + bias**2 / (1.09 / scale**2)),
              math.erf(1.0 / (scale * math.sqrt(2.0)))]  # coverage of a pull N(0, scale^2), bias ~ negligible
    for k in range(3):
        se = cv[:, k].std(ddof=1) / math.sqrt(reps)
        assert abs(cv[:, k].mean() - expect[k]) < 4 * se + (0.003 if k == 2 else 0.0), (k, cv[:, k].mean(), expect[k])
        # coverage gains least: an indicator differs wholly wherever the two pulls straddle 1
        assert cv[:, k].std() < (0.85 if k == 2 else 0.7) * raw[:, k].std(), k
    assert cv[:, 0].std() < 0.35 * raw[:, 0].std()  # the bias: sd 0.3 / sqrt(1.09) of the raw one



def test_control_variate_metrics_where_the_estimator_scatters_less_than_its_error():
    """Prior-dominated fluxes (no transient-free epoch): the estimator's sampling sd z_sd is 0.6
    of the reported (posterior) error. The cv estimates still centre on the truth and, with z
    in the fit's units, scatter far less than the raw ones."""
    rng = np.random.default_rng(11)
    n, reps, r = 100, 400, 0.6
    cv, raw, own_units = [], [], []
    for _ in range(reps):
        z = r * rng.normal(size=n)
        e = z + 0.1 * rng.normal(size=n)
        m = control_variate_metrics(100.0 + e, np.ones(n), np.full(n, 100.0), np.ones(n), z, np.full(n, r))
        cv.append([m["pull_rms_cv"] ** 2, m["coverage68_cv"]])
        raw.append([np.mean(e**2), np.mean(np.abs(e) < 1.0)])
        own_units.append(np.mean(e**2) - np.mean((z / r) ** 2) + 1.0)  # z over its own sd
    cv, raw = np.array(cv), np.array(raw)
    assert cv[:, 0].std() < 0.3 * np.std(own_units)
    var = r**2 + 0.01
    expect = [var, math.erf(1.0 / math.sqrt(2.0 * var))]
    for k in range(2):
        se = cv[:, k].std(ddof=1) / math.sqrt(reps)
        assert abs(cv[:, k].mean() - expect[k]) < 4 * se, (k, cv[:, k].mean(), expect[k])
        assert cv[:, k].std() < (0.5 if k == 0 else 0.7) * raw[:, k].std(), (k, cv[:, k].std(), raw[:, k].std())

def test_control_variate_metrics_ignore_rows_without_a_control_variate():
    m = control_variate_metrics([1.0, 2.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [np.nan, 1.5], [np.nan, 1.0])
    assert m["bias_cv"] == pytest.approx(0.5)
    nan = control_variate_metrics([1.0], [1.0], [0.0], [1.0], [np.nan], [np.nan])
    assert all(np.isnan(v) for v in nan.values())


def test_coverage_sd_floor_is_the_scatter_of_independent_fluxes():
    """Independent draws: the floor matches the actual scatter of the raw and cv coverage
    estimates over repetitions (to 15 %), and grows as the fit departs from the control variate."""
    rng = np.random.default_rng(5)
    n, reps = 150, 600
    for extra in (0.15, 0.5):
        est, floors = [], []
        for _ in range(reps):
            z = rng.normal(size=n)
            flux = 100.0 + z + extra * rng.normal(size=n)
            err = np.full(n, math.sqrt(1.0 + extra**2))
            m = control_variate_metrics(flux, err, np.full(n, 100.0), np.ones(n), z, np.ones(n))
            raw = np.mean(np.abs(flux - 100.0) < err)
            est.append([raw, m["coverage68_cv"], m["coverage95_cv"]])
            f = coverage_sd_floor(flux, err, np.full(n, 100.0), z, np.ones(n))
            floors.append([f["coverage68"], f["coverage68_cv"], f["coverage95_cv"]])
        actual, floor = np.std(est, axis=0, ddof=1), np.mean(floors, axis=0)
        assert np.all(np.abs(floor / actual - 1) < 0.15), (extra, floor, actual)
        if extra == 0.15:
            small = floor[1]
    assert floor[1] > 1.5 * small  # a looser control variate: more indicator flips
    assert set(coverage_sd_floor([1.0, 2.0], [1.0, 1.0], [0.0, 0.0])) == {"coverage68", "coverage95"}
