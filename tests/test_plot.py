"""The light-curve plot keeps science epochs readable when the references are far older."""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from transcene.plot import plot_lightcurve
from transcene.result import Flag


def _lc(ref_mjd: list[float], sci_mjd: list[float]) -> Table:
    n_ref, n_sci = len(ref_mjd), len(sci_mjd)
    t = Table()
    t["mjd"] = np.array(ref_mjd + sci_mjd)
    t["band"] = ["r"] * (n_ref + n_sci)
    t["flux"] = np.r_[np.zeros(n_ref), np.linspace(1e4, 2e4, n_sci)]
    t["flux_err"] = np.full(n_ref + n_sci, 100.0)
    t["flags"] = np.r_[np.full(n_ref, int(Flag.REFERENCE)), np.zeros(n_sci, int)]
    t.meta.update(status="converged", method="linear")
    return t


def test_far_references_are_left_off_the_axis_and_said_so():
    fig = plot_lightcurve(_lc([58300.0, 58310.0], [59400.0 + k for k in range(30)]))
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert 59390.0 < lo < 59400.0 and 59429.0 < hi < 59440.0
    assert any("2 reference epoch(s) off axis" in t.get_text() for t in ax.texts)


def test_nearby_references_stay_on_the_axis():
    fig = plot_lightcurve(_lc([59390.0], [59400.0 + k for k in range(30)]))
    lo, _ = fig.axes[0].get_xlim()
    assert lo < 59390.0
    assert not any("off axis" in t.get_text() for t in fig.axes[0].texts)
