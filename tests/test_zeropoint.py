"""The per-epoch zero-point nuisance (``make_dataset(..., zp_jitter=...)``).

- Analytic: on flat sky nothing but its prior constrains an epoch's zero point, so the flux
  error grows in quadrature by exactly ``flux * 0.4 ln(10) zp_jitter``.
- Injection (slow): on a bright host with 20 mmag zero-point errors, the fitted offsets follow
  the injected ones and the pulls are restored; without the nuisance they are not.
"""

from __future__ import annotations

import math
import warnings

import transcene  # noqa: F401  (first: enables float64)

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from test_nuts import RADIUS, TARGET, _epochs
from transcene.dataset import make_dataset
from transcene.errors import BaselineWarning
from transcene.fit import fit
from transcene.simulate import SimulationConfig, simulate

ZP_JITTER = 0.02  # mag


@pytest.fixture(scope="module")
def flat_sky_fits():
    eps = _epochs(5)
    return {zj: fit(make_dataset(eps, TARGET, fit_radius=RADIUS, pad_epochs=False, zp_jitter=zj))
            for zj in (0.0, ZP_JITTER)}


def test_zero_point_error_adds_in_quadrature_on_flat_sky(flat_sky_fits):
    off, on = (flat_sky_fits[z].lightcurve() for z in (0.0, ZP_JITTER))
    assert all(r.converged for r in flat_sky_fits.values())
    sci = ~np.asarray(on["is_reference"])
    sd_eps = 0.4 * math.log(10.0) * ZP_JITTER
    flux = np.asarray(on["flux"])[sci]
    # (on the errors themselves: the zero-point term is small against the photon noise here, so
    # the difference of squares would amplify the 0.3 % by which the MAP geometry moves them)
    expected = np.sqrt(np.asarray(off["flux_err"])[sci] ** 2 + (flux * sd_eps) ** 2)
    np.testing.assert_allclose(np.asarray(on["flux_err"])[sci], expected, rtol=5e-3)
    assert np.all(np.asarray(on["flux_err"])[sci] > 1.005 * np.asarray(off["flux_err"])[sci])
    # nothing but the noise the free host fits measures the offsets here: they stay near their
    # prior mean (measured: up to 1.6 mmag against the prior's 20)
    assert np.all(np.abs(np.asarray(on["zp_offset"])) < 0.25 * ZP_JITTER)
    assert "zp_offset" not in off.colnames and "zp_offset" in on.meta["columns"]
    # the fluxes barely move
    np.testing.assert_allclose(flux, np.asarray(off["flux"])[sci], atol=0.05 * float(np.min(off["flux_err"][sci])))
    # one more free parameter per epoch in the chi2's degrees of freedom
    n_pix = np.asarray(flat_sky_fits[0.0].dataset.epochs["n_pixels"], float)
    for zj, lc, n_local in ((0.0, off, np.where(sci, 4, 3)), (ZP_JITTER, on, np.where(sci, 5, 4))):
        res = flat_sky_fits[zj]
        chi2 = np.concatenate(res.chi2)[res._slots()]
        np.testing.assert_allclose(np.asarray(lc["chi2_dof"]), chi2 / (n_pix - n_local), rtol=1e-12)


def test_zp_jitter_must_be_a_nonnegative_rms():
    with pytest.raises(ValueError, match="zp_jitter must be a zero-point rms in mag >= 0; got -0.01"):
        make_dataset(_epochs(5), TARGET, fit_radius=RADIUS, zp_jitter=-0.01)


@pytest.mark.slow
def test_zero_point_nuisance_restores_pulls_on_a_bright_host():
    cfg = SimulationConfig(n_epochs=8, n_reference=3, size=20, psf_size=21, bands=("r",), seeing_fwhm=(1.5, 2.5),
                           host_mag=15.0, transient_peak_mag=19.0, zeropoint_jitter=ZP_JITTER, seed=4)
    eps, truth = simulate(cfg)
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    injected = np.asarray(truth["zeropoint_written"] - truth["zeropoint"])
    pulls = {}
    for zj in (0.0, ZP_JITTER):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BaselineWarning)
            ds = make_dataset(eps, target, zp_jitter=zj)
        res = fit(ds)
        assert res.converged
        lc = res.lightcurve()
        idx = np.asarray(ds.epochs["index"])
        sci = ~np.asarray(lc["is_reference"])
        pulls[zj] = (np.asarray(lc["flux"])[sci] - np.asarray(truth["flux_true"])[idx][sci]) / np.asarray(lc["flux_err"])[sci]
        if zj:
            # the offsets are measured against the shared host, up to their common mean (which
            # the host's own brightness absorbs)
            fitted = np.asarray(lc["zp_offset"])
            true = injected[idx]
            diff = (fitted - fitted.mean()) - (true - true.mean())
            sd = np.sqrt(res.local_var[res._slots(), 4]) / (0.4 * math.log(10.0))
            assert np.all(np.abs(diff) < 3.5 * sd + 1e-3), (diff, sd)
            assert np.corrcoef(fitted, true)[0, 1] > 0.8
    # measured: rms pull 1.98 without the nuisance (|pull| up to 3.1), 0.78 with it
    rms = {k: float(np.sqrt(np.mean(v**2))) for k, v in pulls.items()}
    assert rms[ZP_JITTER] < 1.3 and np.all(np.abs(pulls[ZP_JITTER]) < 3.0), pulls
    assert rms[0.0] > 1.5 * rms[ZP_JITTER], rms
