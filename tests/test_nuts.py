"""NUTS (``fit(..., method="nuts")``) on an analytic case: an isolated point source on flat sky.

- The whitening map is exact where it claims to be: at ``z = 0`` it is the MAP, and the
  posterior energy of a small step is ``|z|^2`` (Gauss-Newton Hessian whitened to the identity).
- The posterior standard deviation of each science flux equals the closed-form bound with a free
  static scene, ``sigma0 sqrt(1 + 1/n_ref)`` (shown in test_geometry_render to be what Laplace
  reaches), within the Monte-Carlo error; so does the transient position's.
- Chains that miss the convergence criteria are refused, or flagged when forced.
"""

from __future__ import annotations

import warnings

import transcene  # noqa: F401  (first: enables float64)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.table import Table
from jax.flatten_util import ravel_pytree

from test_geometry_render import FWHM_TO_SIGMA, TARGET, astropy_tangent_offsets_to_sky, gaussian_image, make_wcs, \
    std_cd, world_to_pixel
from transcene.api import write_outputs
from transcene.dataset import make_dataset
from transcene.epoch import Epoch
from transcene.errors import ConvergenceWarning, FitError
from transcene.fit import fit
from transcene.nuts import NutsOptions, _pseudo_prior, to_scene, whitening
from transcene.psf import gaussian_psf
from transcene.result import Flag
from transcene.scene import render_stack
from transcene.solve import Priors, _local_prec, global_prior, prior_arrays

FWHM = 3.0  # px
NOISE = 20.0  # nJy per pixel
SIZE = 15
OFFSET = np.array([0.3, -0.2])  # arcsec
FLUX = np.array([0.0, 0.0, 3000.0, 1500.0])  # two references first
RADIUS = 3.5  # arcsec
#: draws for the accuracy test: ESS ~ 1000-1500, so the Monte-Carlo error of a standard
#: deviation is ~2-3 % and of a mean ~3 % of a sigma
OPTIONS = NutsOptions(num_warmup=200, num_samples=500, num_chains=2)


def _epochs(seed: int) -> list[Epoch]:
    rng = np.random.default_rng(seed)
    wcs = make_wcs(TARGET, std_cd(1.0), (8.0, 8.0))
    pos = world_to_pixel(wcs, astropy_tangent_offsets_to_sky(TARGET, OFFSET))[0]
    psf = gaussian_psf(fwhm=FWHM, size=21)
    out = []
    for k, f in enumerate(FLUX):
        truth = gaussian_image((SIZE, SIZE), pos[0], pos[1], f, FWHM * FWHM_TO_SIGMA) + rng.uniform(50.0, 200.0)
        out.append(Epoch(
            image=truth + rng.normal(0.0, NOISE, truth.shape), variance=np.full(truth.shape, NOISE**2),
            mask=np.zeros(truth.shape, bool), psf=psf, wcs=wcs, mjd=60100.0 + k, band="r", zeropoint=31.4,
            exposure_id=f"e{k}", is_reference=(k < 2),
        ))
    return out


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(_epochs(5), TARGET, fit_radius=RADIUS, pad_epochs=False)


@pytest.fixture(scope="module")
def laplace(dataset):
    return fit(dataset)


@pytest.fixture(scope="module")
def nuts(dataset):
    return fit(dataset, method="nuts", key=jax.random.key(3), nuts=OPTIONS)


def _closed_form_bound(ds) -> float:
    """sigma0 sqrt(1 + 1/n_ref): [flux, sky] Fisher bound of one science epoch, inflated by the
    free static scene (measured relative to the references)."""
    from transcene.render import point_sources
    from test_geometry_render import epoch_slice

    st = ds.stacks[0]
    w = np.asarray(st.weight[2])
    p = np.asarray(point_sources(epoch_slice(st, 2), jnp.asarray([OFFSET]), jnp.ones(1), jnp.zeros(2)))
    fisher = np.array([[np.sum(w * p * p), np.sum(w * p)], [np.sum(w * p), np.sum(w)]])
    return float(np.sqrt(np.linalg.inv(fisher)[0, 0] * (1.0 + 1.0 / 2)))


def test_whitening_is_exact_at_the_map(dataset, laplace):
    """z = 0 is the MAP, and the map takes the Gauss-Newton Hessian to the identity (dense mode)."""
    ds, res = dataset, laplace
    pa = prior_arrays(ds, Priors(), np.zeros((0, 2)))
    w = whitening(res.scene, ds.stacks, ds.grid, pa)
    assert w.n_host == 0  # few enough globals for the exact (dense) whitening
    unravel = ravel_pytree(res.scene.glob)[1]
    z0 = jnp.zeros(w.size)
    at_map = to_scene(w, z0, unravel, ds.grid)
    for a, b in zip(jax.tree_util.tree_leaves(at_map), jax.tree_util.tree_leaves(res.scene)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Gauss-Newton Hessian of -log p in z: J^T J (J: Jacobian of the weighted model) plus the
    # quadratic priors' Hessian. The exact Hessian also has the residuals' curvature in the
    # positions and shifts, which NUTS samples and Laplace leaves out.
    def weighted_model(z):
        sc = to_scene(w, z, unravel, ds.grid)
        return jnp.concatenate([(jnp.sqrt(st.weight) * render_stack(sc.glob, loc, st, ds.grid)).ravel()
                                for loc, st in zip(sc.local, ds.stacks)])

    def prior_energy(z):
        sc = to_scene(w, z, unravel, ds.grid)
        e = global_prior(sc.glob, pa, ds.grid) + _pseudo_prior(w, z)
        return e + sum(jnp.sum(_local_prec(st) * loc**2) for loc, st in zip(sc.local, ds.stacks))

    jac = np.asarray(jax.jacfwd(weighted_model)(z0))
    gn = jac.T @ jac + 0.5 * np.asarray(jax.hessian(prior_energy)(z0))
    np.testing.assert_allclose(gn, np.eye(w.size), atol=1e-6)


def test_nuts_flux_errors_reach_the_closed_form_bound(dataset, laplace, nuts):
    post = nuts.posterior
    assert nuts.method == "nuts" and nuts.converged and post.converged, post.diagnostics()
    lc, lap = nuts.lightcurve(), laplace.lightcurve()
    sci = ~np.asarray(lc["is_reference"])
    bound = _closed_form_bound(dataset)
    err = np.asarray(lc["flux_err"])[sci]
    lap_err = np.asarray(lap["flux_err"])[sci]
    # Laplace is the bound up to the position/shift inflation (< 10 %, test_geometry_render);
    # NUTS agrees with Laplace within the Monte-Carlo error of a standard deviation
    assert np.all((lap_err / bound > 0.999) & (lap_err / bound < 1.10)), lap_err / bound
    np.testing.assert_allclose(err, lap_err, rtol=0.10)
    # the posterior mean is the MAP up to a small fraction of a sigma (a near-Gaussian posterior)
    flux = np.asarray(lc["flux"])[sci]
    assert np.all(np.abs(flux - np.asarray(lap["flux"])[sci]) < 0.2 * lap_err)
    # and the truth is within the errors
    assert np.all(np.abs(flux - FLUX[sci]) < 4 * err)
    # percentiles bracket the mean like a Gaussian's one-sigma interval
    lo, hi = np.asarray(lc["flux_lo"])[sci], np.asarray(lc["flux_hi"])[sci]
    np.testing.assert_allclose((hi - lo) / 2, err, rtol=0.12)
    assert np.all((lo < flux) & (flux < hi))
    # references: exactly zero in every draw
    assert np.all(nuts.flux_samples()[~sci] == 0.0)
    assert np.all(np.asarray(lc["flux_rhat"])[sci] < 1.01) and np.all(np.asarray(lc["flux_ess"])[sci] > 400)
    # the transient position: posterior sd vs Laplace's
    pos_sd = post.position.std(axis=0)
    np.testing.assert_allclose(pos_sd, np.sqrt(np.diag(laplace.position_cov)), rtol=0.15)
    assert np.all(np.abs(post.position.mean(axis=0) - OFFSET) < 4 * pos_sd)


def test_nuts_products(nuts, tmp_path):
    out = write_outputs(nuts, lightcurve=tmp_path / "lc.ecsv")
    samples = Table.read(out["samples"])
    assert samples["flux_samples"].shape == (len(FLUX), nuts.posterior.n_draws)
    assert str(samples["flux_samples"].unit) == "nJy"
    assert list(samples["exposure_id"]) == [f"e{k}" for k in range(len(FLUX))]
    assert samples.meta["NCHAINS"] == 2 and samples.meta["CONVERGD"] is True
    lc = Table.read(out["lightcurve"])
    assert lc.meta["method"] == "nuts" and "NUTS" in lc.meta["uncertainty"]
    assert lc.meta["nuts"]["converged"] and lc.meta["nuts"]["divergent"] == 0
    # the covariance file is the draws' covariance
    cov = Table.read(out["covariance"])
    draws = nuts.flux_samples()
    np.testing.assert_allclose(np.asarray(cov["e2"]), np.cov(draws)[:, 2], rtol=1e-6, atol=1e-6)


def test_unconverged_chains_are_refused_or_flagged(dataset, laplace):
    short = NutsOptions(num_warmup=10, num_samples=20, num_chains=2)
    # started at the MAP (a test-time saving: the refusal is about the chains, not the optimiser)
    with pytest.raises(FitError, match="did not converge: .*effective sample size"):
        fit(dataset, method="nuts", key=jax.random.key(0), nuts=short, init=laplace.scene)
    with pytest.warns(ConvergenceWarning, match="NUTS chains did not converge"):
        res = fit(dataset, method="nuts", key=jax.random.key(0), init=laplace.scene, nuts=NutsOptions(
            num_warmup=10, num_samples=20, num_chains=2, force=True))
    assert res.status == "nuts_not_converged" and not res.converged
    flags = np.asarray(res.lightcurve()["flags"])
    assert np.all(flags & Flag.NOT_CONVERGED)


def test_nuts_needs_an_explicit_key_and_a_gaussian_likelihood(dataset):
    with pytest.raises(ValueError, match="needs an explicit PRNG key"):
        fit(dataset, method="nuts")
    with pytest.raises(ValueError, match="student_t must be None"):
        fit(dataset, method="nuts", key=jax.random.key(0), student_t=5.0)
    with pytest.raises(ValueError, match="NutsOptions.num_chains must be a positive integer"):
        NutsOptions(num_chains=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="target_accept must be in"):
            NutsOptions(target_accept=1.5)
