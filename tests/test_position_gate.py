"""The transient position's detection gate (``fit(position="auto" | "free" | "fixed")``).

A transient too faint to locate (summed S/N below ``POSITION_MIN_SNR``) is measured at the
target, as forced photometry does; a detected one has its position fitted. Flat sky, a point
source at a known offset from the target, 2 references + 6 science epochs.
"""

from __future__ import annotations

import importlib

import transcene  # noqa: F401  (first: enables float64)

import math

import numpy as np
import pytest
from astropy.table import Table

from test_geometry_render import FWHM_TO_SIGMA, TARGET, point_source_epochs
from transcene.dataset import make_dataset
from transcene.epoch import Epoch
from transcene.fit import POSITION_MIN_SNR, fit

FWHM_PX = 3.0
NOISE = 10.0
N_SCI = 6
# flux giving a per-epoch S/N of 1 for a Gaussian PSF on flat sky: sigma * sqrt(4 pi s^2)
UNIT = NOISE * math.sqrt(4.0 * math.pi) * FWHM_PX * FWHM_TO_SIGMA


def _epochs(flux: float, offset=(0.0, 0.0), seed: int = 0) -> list[Epoch]:
    return point_source_epochs([0.0, 0.0] + [flux] * N_SCI, fwhm_px=FWHM_PX, offset=offset, seed=seed, noise=NOISE)


def _summed_snr(res) -> float:
    det = res.detection()["all"]
    return math.sqrt(max(det["chi2"] - det["dof"], 0.0))


@pytest.fixture(scope="module")
def faint():
    # nominal per-epoch S/N 1.5 (the host and sky marginalised: less); summed S/N measured below 10
    ds = make_dataset(_epochs(1.5 * UNIT, seed=3), TARGET, fit_radius=6.0, pad_epochs=False, shift_prior=0.0)
    return {mode: fit(ds, position=mode) for mode in ("auto", "free", "fixed")}


def test_a_faint_transient_is_measured_at_the_target(faint):
    auto, free, fixed = faint["auto"], faint["free"], faint["fixed"]
    assert _summed_snr(free) < POSITION_MIN_SNR
    assert auto.position_mode.startswith("held at the target (summed S/N")
    np.testing.assert_allclose(auto.transient_offset, 0.0, atol=1e-6)
    # the held fit is the fixed one (same optimum; the auto one started from the free MAP)
    lc_auto, lc_fixed = auto.lightcurve(), fixed.lightcurve()
    np.testing.assert_allclose(lc_auto["flux"], lc_fixed["flux"], atol=1e-3 * np.max(lc_fixed["flux_err"]))
    np.testing.assert_allclose(lc_auto["flux_err"], lc_fixed["flux_err"], rtol=1e-3)
    assert lc_auto.meta["position"] == auto.position_mode and fixed.position_mode.endswith("(position='fixed')")
    # free, the position follows the noise: it moves off the target, by more than the held fit's
    assert free.position_mode == "fitted" and np.max(np.abs(free.transient_offset)) > 0.05
    assert auto.elapsed > free.elapsed  # the free fit came first and is counted


def test_the_held_refit_keeps_the_callers_options(faint, monkeypatch):
    """The position-held refit is a second ``fit`` call: it must not fall back to defaults."""
    ds = faint["auto"].dataset
    # Newton from the first step, so that the refit would try one at its first step if it lost
    # ``newton=False``; the step kinds are recorded as they are asked for (a Newton step the line
    # search rejects is replaced by a Gauss-Newton one and not counted in ``n_newton``)
    fit_module = importlib.import_module("transcene.fit")
    monkeypatch.setattr(fit_module, "NEWTON_FROM", 1)
    real = fit_module.gauss_newton_step
    kinds = []

    def spy(*args, newton=False, **kwargs):
        kinds.append(newton)
        return real(*args, newton=newton, **kwargs)

    monkeypatch.setattr(fit_module, "gauss_newton_step", spy)
    res = fit(ds, mixed_precision=False, method="linear", newton=False)
    assert res.position_mode.startswith("held at the target (summed S/N")
    assert not res.mixed_precision and res.method == "linear" and res.n_newton == 0
    # (``newton`` is keyword-only in gauss_newton_step, so the spy cannot miss it)
    assert kinds and not any(kinds)
    assert res.lightcurve().meta["solver_precision"] == "float64"


def test_a_detected_transient_has_its_position_fitted():
    offset = (0.4, -0.3)  # arcsec: a target 0.5" off the transient
    ds = make_dataset(_epochs(20 * UNIT, offset=offset, seed=4), TARGET, fit_radius=6.0, pad_epochs=False,
                      shift_prior=0.0)
    res = fit(ds)
    assert _summed_snr(res) > 2 * POSITION_MIN_SNR and res.position_mode == "fitted"  # measured 21
    err = np.sqrt(np.diag(res.position_cov))
    assert np.all(np.abs(res.transient_offset - np.asarray(offset)) < 4 * err), (res.transient_offset, err)
    meta = res.lightcurve().meta
    assert meta["position"] == "fitted"
    Table(res.lightcurve())  # the metadata stays a plain table's


def test_position_mode_is_checked():
    ds = make_dataset(_epochs(UNIT), TARGET, fit_radius=6.0, pad_epochs=False, shift_prior=0.0)
    with pytest.raises(ValueError, match="position must be one of auto, free, fixed; got 'forced'"):
        fit(ds, position="forced")
