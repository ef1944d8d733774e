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
