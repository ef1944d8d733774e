"""A small injection-recovery campaign (slow: several minutes; run with ``pytest -m slow``).

The full campaign is scripts/injection_recovery.py; this runs the same code on three seeds of
20 science + 5 reference epochs, so that a change that breaks calibration fails a test.
"""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import numpy as np
import pytest
from astropy.table import vstack

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "injection_recovery.py"


@pytest.mark.slow
def test_injection_recovery_is_calibrated():
    mod = runpy.run_path(str(SCRIPT))
    args = argparse.Namespace(epochs=20, references=5, size=32, host="sersic", host_mag=18.0, first_seed=100,
                              crb_seeds=1)
    tables, infos = [], []
    for seed in range(100, 103):
        t, info = mod["run_seed"](seed, args)
        tables.append(t)
        infos.append(info)
    t = vstack(tables)
    assert all(i["status"] == "converged" for i in infos)
    white = np.asarray(t["white"])
    assert len(white) == 60
    # whitened pulls are independent N(0, 1) if the fluxes and their covariance are right:
    # mean within ~3 sigma (1/sqrt(60)), std within ~2.8 sigma (1/sqrt(120))
    assert abs(white.mean()) < 0.4
    assert 0.75 < white.std() < 1.25
    ratio = np.asarray(t["flux_err"] / t["crb"])
    ratio = ratio[np.isfinite(ratio)]
    assert ratio.size == 20
    assert np.median(ratio) <= 1.10
    assert ratio.min() > 0.95  # an error below the bound would be an underestimate


CAMPAIGN = Path(__file__).resolve().parents[1] / "scripts" / "validate.py"


@pytest.mark.slow
def test_validation_campaign_small_grid(tmp_path):
    """Three cells of the campaign grid without systematics (fast-mode data sets, 2 seeds each,
    ~6 min): loose calibration bounds that a broken error model cannot meet, and the report."""
    mod = runpy.run_path(str(CAMPAIGN))
    assert mod["main"]([str(tmp_path), "--mode", "fast", "--cells", "baseline:-,sb:15,offset:0.0fwhm",
                        "--seeds", "2"]) == 0
    from astropy.table import Table

    table = Table.read(tmp_path / "cells.ecsv")
    assert list(table["cell"]) == ["baseline:-", "sb:15", "offset:0.0fwhm", "pooled:no-systematic"]
    cells, pooled = table[:3], table[3]
    assert pooled["n"] == 72 and pooled["converged"] == 6
    assert 0.75 < pooled["pull_std"] < 1.25, pooled  # 72 correlated pulls from 6 fits: ~2.5 sigma
    for r in cells:
        assert r["converged"] == 2 and r["n"] == 24, r
        assert 0.7 < r["pull_std"] < 1.3, r  # 24 correlated pulls: loose
        assert abs(r["bias_crb"]) < 0.5, r
        assert r["err_over_crb"] < 1.05, r
    # the control-variate estimates take out most of the noise: tighter bounds on the same
    # quantities (the fit's (flux - true - z) / CRB scatters ~0.25 per flux)
    assert abs(pooled["bias_cv"]) < 0.15, pooled
    assert 0.88 < pooled["pull_rms_cv"] < 1.12, pooled
    fluxes = Table.read(tmp_path / "fluxes.ecsv")
    d = (np.asarray(fluxes["flux"] - fluxes["flux_true"] - fluxes["oracle"]) / np.asarray(fluxes["crb"]))
    assert np.std(d) < 0.5 * np.std(np.asarray(fluxes["flux"] - fluxes["flux_true"]) / np.asarray(fluxes["crb"]))
    for name in ("report.md", "fluxes.ecsv", "pulls.png", "coverage.png", "bias_vs_sb.png"):
        assert (tmp_path / name).stat().st_size > 500, name


PRIOR_BIAS = Path(__file__).resolve().parents[1] / "scripts" / "prior_bias.py"
HSC_BLEND = Path(__file__).resolve().parents[2] / "shared" / "data" / "hsc-blend" / "Cut_HST.fits"


@pytest.mark.slow
def test_the_host_prior_biases_a_sharp_host_and_not_a_smooth_one():
    """scripts/prior_bias.py on noiseless data: the smooth Sersic baseline comes out unbiased
    at the default prior, the crowded HSC blend low, and a 10x weaker prior shrinks that."""
    mod = runpy.run_path(str(PRIOR_BIAS), run_name="prior_bias")
    V = mod["_validate_module"]()
    cells = {c.name: c for c in V.CELLS}
    assert abs(np.mean(mod["noiseless_bias"](cells["baseline:-"], 0, 1e-3))) < 0.005
    if not HSC_BLEND.exists():
        pytest.skip(f"the HSC blend's image is absent ({HSC_BLEND}); the Sersic half ran")
    default = np.mean(mod["noiseless_bias"](cells["host:hsc-blend"], 0, 1e-3))
    weak = np.mean(mod["noiseless_bias"](cells["host:hsc-blend"], 0, 1e-4))
    assert default < -0.015  # seed 0: -0.025
    assert abs(weak) < 0.5 * abs(default)  # seed 0: -0.005
