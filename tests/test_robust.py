"""The Student-t pixel likelihood: its efficiency on Gaussian data, and fluxes that survive
cosmic rays and bad columns a Gaussian fit is wrecked by (injected with known truth)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

import transcene as ts
from transcene.errors import ConvergenceWarning
from transcene.fit import student_t_efficiency
from transcene.simulate import SimulationConfig, add_outliers, simulate


def test_student_t_efficiency_analytic_limits():
    # nu = 5: E[psi']^2 / E[psi^2] by quadrature, checked against a Monte-Carlo estimate
    z = np.random.default_rng(0).normal(size=2_000_000)
    nu = 5.0
    mc = np.mean((nu + 1) * (nu - z * z) / (nu + z * z) ** 2) ** 2 / np.mean(((nu + 1) * z / (nu + z * z)) ** 2)
    np.testing.assert_allclose(student_t_efficiency(5.0), mc, rtol=2e-3)
    effs = [student_t_efficiency(v) for v in (2.0, 5.0, 20.0, 1e4)]
    assert np.all(np.diff(effs) > 0) and effs[-1] == pytest.approx(1.0, abs=1e-3)


@pytest.fixture(scope="module")
def robust_fits():
    cfg = SimulationConfig(n_epochs=6, n_reference=3, bands=("r",), size=22, psf_size=15, seeing_fwhm=(1.8, 2.6),
                           seed=31, transient_peak_mag=20.0)
    eps, truth = simulate(cfg)
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    rng = np.random.default_rng(5)
    hit = []
    for e in eps:
        x, y = e.wcs.world_to_pixel(target)
        # one hit within 3 pixels of the transient in every epoch, plus random hits and columns
        b, _ = add_outliers([e], rng=rng, cosmic_rays=1.0, near=(float(x), float(y)))
        b, _ = add_outliers(b, rng=rng, cosmic_rays=3.0, bad_column_fraction=0.3)
        hit.append(b[0])
    fits = {}
    for name, data in (("clean", eps), ("hit", hit)):
        ds = ts.make_dataset(data, target)
        with warnings.catch_warnings():
            # the Gaussian fit to outlier-hit data may not converge: that is the point
            warnings.simplefilter("ignore", ConvergenceWarning)
            fits[name, "gauss"] = ts.fit(ds)
        fits[name, "t"] = ts.fit(ds, student_t=5.0)
    return fits, np.asarray(truth["flux_true"])


def _pulls(res, truth):
    lc = res.lightcurve()
    sci = ~np.asarray(lc["is_reference"])
    return (np.asarray(lc["flux"]) - truth)[sci] / np.asarray(lc["flux_err"])[sci]


def test_student_t_costs_its_efficiency_on_clean_data(robust_fits):
    fits, truth = robust_fits
    g, t = fits["clean", "gauss"], fits["clean", "t"]
    assert g.converged and t.converged
    lg, lt = g.lightcurve(), t.lightcurve()
    sci = ~np.asarray(lg["is_reference"])
    ratio = np.asarray(lt["flux_err"])[sci] / np.asarray(lg["flux_err"])[sci]
    np.testing.assert_allclose(ratio, 1.0 / np.sqrt(student_t_efficiency(5.0)), rtol=0.01)
    # the same measurement: the Gaussian fit is efficient, so the difference of the two
    # estimates has variance var_t - var_g = (1 / efficiency - 1) var_g (0.25 sigma for nu = 5)
    diff = (np.asarray(lt["flux"]) - np.asarray(lg["flux"]))[sci] / np.asarray(lg["flux_err"])[sci]
    assert np.all(np.abs(diff) < 4 * np.sqrt(1 / student_t_efficiency(5.0) - 1)), diff
    assert lt.meta["likelihood"].startswith("student-t (nu=5)")


def test_student_t_survives_cosmic_rays_on_the_transient(robust_fits):
    fits, truth = robust_fits
    g, t = fits["hit", "gauss"], fits["hit", "t"]
    assert t.converged
    assert np.max(np.abs(_pulls(g, truth))) > 10  # the Gaussian fit is wrecked...
    pulls = _pulls(t, truth)
    assert np.all(np.abs(pulls) < 4), pulls  # ...the Student-t one is not
    # and agrees with the clean data's fit within the errors
    clean = np.asarray(fits["clean", "t"].lightcurve()["flux"])
    lc = t.lightcurve()
    sci = ~np.asarray(lc["is_reference"])
    assert np.all(np.abs((np.asarray(lc["flux"]) - clean)[sci] / np.asarray(lc["flux_err"])[sci]) < 3)


def test_student_t_rejects_bad_degrees_of_freedom(robust_fits):
    fits, _ = robust_fits
    with pytest.raises(ValueError, match="student_t must be a positive number"):
        ts.fit(fits["clean", "gauss"].dataset, student_t=-1.0)
