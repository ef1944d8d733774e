"""Detection significance and the reference-epoch null test: analytic cases and simulations
with a known answer (a transient that is not there; transient light in a "reference")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy import units as u
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import transcene as ts
from transcene.significance import chi2_test
from transcene.simulate import SimulationConfig, simulate


def test_chi2_test_single_flux_is_the_gaussian_significance():
    res = chi2_test(np.array([3.0]), np.array([[1.0]]))
    assert res["dof"] == 1
    np.testing.assert_allclose(res["chi2"], 9.0)
    np.testing.assert_allclose(res["sigma"], 3.0, rtol=1e-9)
    np.testing.assert_allclose(res["p_value"], 2 * stats.norm.sf(3.0), rtol=1e-9)
    assert chi2_test(np.zeros(0), np.zeros((0, 0)))["dof"] == 0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_chi2_test_is_the_mahalanobis_distance(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    cov = a @ a.T + n * np.eye(n)
    f = rng.normal(size=n) * 3
    res = chi2_test(f, cov)
    np.testing.assert_allclose(res["chi2"], f @ np.linalg.solve(cov, f), rtol=1e-8)
    assert res["dof"] == n


def test_chi2_test_drops_a_degenerate_direction():
    """A direction with no information (infinite-variance limit handled as a zero eigenvalue of
    a rank-deficient covariance) costs a degree of freedom, not a division by zero."""
    cov = np.array([[1.0, 1.0], [1.0, 1.0]])
    res = chi2_test(np.array([2.0, 2.0]), cov)
    assert res["dof"] == 1
    np.testing.assert_allclose(res["chi2"], 4.0)


def _sim(**kw):
    cfg = SimulationConfig(**({"n_epochs": 6, "n_reference": 5, "bands": ("r",), "size": 20, "psf_size": 15,
                               "seeing_fwhm": (1.8, 2.6), "seed": 21, "transient_peak_mag": 19.5} | kw))
    eps, truth = simulate(cfg)
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    return eps, truth, target


@pytest.fixture(scope="module")
def clean_and_contaminated():
    eps, truth, target = _sim()
    clean = ts.fit(ts.make_dataset(eps, target), null_test=True)
    # the brightest science epoch wrongly labelled transient-free (a zero_before too late)
    bright = int(np.argmax(np.asarray(truth["flux_true"])))
    bad = [dataclasses.replace(e, is_reference=True) if i == bright else e for i, e in enumerate(eps)]
    contaminated = ts.fit(ts.make_dataset(bad, target), null_test=True)
    return clean, contaminated, str(truth["exposure_id"][bright])


def test_reference_null_test_passes_on_clean_references(clean_and_contaminated):
    clean, _, _ = clean_and_contaminated
    res = clean.reference_null["r"]
    assert res["n_references"] == 5 and res["dof"] == 4  # one anchor: the host absorbs a common flux
    assert res["p_value"] > 1e-3, res
    lc = clean.lightcurve()
    assert lc.meta["reference_null_test"]["r"]["dof"] == 4


def test_tests_survive_the_ecsv_round_trip(clean_and_contaminated, tmp_path):
    from astropy.table import Table

    clean, _, _ = clean_and_contaminated
    path = ts.write_table(clean.lightcurve(), tmp_path / "lc.ecsv")
    meta = Table.read(path).meta
    back, orig = meta["reference_null_test"]["r"], clean.reference_null["r"]
    assert back["chi2"] == pytest.approx(orig["chi2"]) and back["worst_exposure"] == orig["worst_exposure"]
    assert meta["detection"]["all"]["dof"] == 6


def test_reference_null_test_finds_transient_light_in_a_reference(clean_and_contaminated, caplog):
    _, bad, bright_id = clean_and_contaminated
    res = bad.reference_null["r"]
    assert res["dof"] == 5
    assert res["p_value"] < 1e-6, res
    # the culprit is named: the most deviant reference, or the anchor others are measured from
    assert bright_id in (res["worst_exposure"], res["anchor"]), res


def test_detection_is_significant_for_a_transient_and_not_without_one(clean_and_contaminated):
    clean, _, _ = clean_and_contaminated
    det = clean.detection()
    assert det["all"]["dof"] == 6 and det["all"]["sigma"] > 10, det
    eps, _, target = _sim(transient_peak_mag=60.0, seed=22)  # no transient at all
    none = ts.fit(ts.make_dataset(eps, target), method="linear")
    det0 = none.detection()
    assert det0["all"]["dof"] == 6
    assert det0["all"]["p_value"] > 1e-3, det0
    assert none.lightcurve().meta["detection"]["r"]["dof"] == 6
