"""scripts/validate.py's bookkeeping without fits: saving after every fit, --resume, the
bootstrap uncertainties over seeds and the pooled row (the fits are replaced by draws with a
known pull distribution, so the statistics have a known answer)."""

from __future__ import annotations

import runpy
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table

CAMPAIGN = Path(__file__).resolve().parents[1] / "scripts" / "validate.py"
N_FLUX = 30  # fluxes per fake fit


def _campaign(calls: list):
    mod = runpy.run_path(str(CAMPAIGN))

    def fake_run_one(cell, mode, seed):
        calls.append((cell.name, seed))
        rng = np.random.default_rng(1000 * len(cell.name) + seed)
        true = np.full(N_FLUX, 100.0)
        err = np.full(N_FLUX, 10.0)
        flux = true + err * rng.normal(size=N_FLUX)  # pulls ~ N(0, 1), errors equal to the CRB
        t = Table({
            "cell": [cell.name] * N_FLUX, "seed": np.full(N_FLUX, seed), "exposure_id": np.arange(N_FLUX),
            "band": ["r"] * N_FLUX, "flux": flux * u.nJy, "flux_err": err * u.nJy, "flux_true": true * u.nJy,
            "crb": err * u.nJy, "chi2_dof": np.ones(N_FLUX), "sb_mag": np.full(N_FLUX, 21.0) * u.mag / u.arcsec**2,
        })
        t["pull"] = (t["flux"] - t["flux_true"]) / t["flux_err"]
        return t, dict(cell=cell.name, seed=seed, status="converged", elapsed=1.5, n_iter=7)

    # main() looks run_one up in its own module globals (runpy returns a copy of them)
    mod["main"].__globals__["run_one"] = fake_run_one
    return mod["main"]


def test_resume_runs_only_the_missing_fits_and_keeps_the_earlier_ones(tmp_path):
    calls: list = []
    main = _campaign(calls)
    cells = "baseline:-,snr:21"
    assert main([str(tmp_path), "--mode", "fast", "--cells", cells, "--seeds", "2"]) == 0
    assert calls == [("baseline:-", 0), ("baseline:-", 1), ("snr:21", 0), ("snr:21", 1)]
    first = Table.read(tmp_path / "fluxes.ecsv")
    assert len(first) == 4 * N_FLUX

    calls.clear()
    assert main([str(tmp_path), "--mode", "fast", "--cells", cells, "--seeds", "4", "--resume"]) == 0
    assert calls == [("baseline:-", 2), ("baseline:-", 3), ("snr:21", 2), ("snr:21", 3)]
    fluxes = Table.read(tmp_path / "fluxes.ecsv")
    runs = Table.read(tmp_path / "runs.ecsv")
    assert len(fluxes) == 8 * N_FLUX and len(runs) == 8
    # the earlier fits' fluxes are kept as they were
    old = fluxes[np.asarray(fluxes["seed"]) < 2]
    np.testing.assert_array_equal(np.sort(np.asarray(old["flux"])), np.sort(np.asarray(first["flux"])))
    assert set(runs["commit"]) and all(isinstance(c, str) for c in runs["commit"])

    summary = Table.read(tmp_path / "cells.ecsv")
    assert list(summary["cell"]) == ["baseline:-", "snr:21", "pooled:no-systematic"]
    assert summary.meta["complete"] is True
    pooled = summary[summary["cell"] == "pooled:no-systematic"][0]
    assert pooled["n"] == 8 * N_FLUX and pooled["seeds"] == 8
    # N(0, 1) pulls: the statistics and their bootstrap sd have known sizes
    for r in summary:
        n = r["n"]
        assert r["err_over_crb"] == pytest.approx(1.0)
        assert 0.3 / np.sqrt(n) < r["pull_std_sd"] < 3.0 / np.sqrt(n), r
        assert abs(r["pull_std"] - 1.0) < 4.0 / np.sqrt(2 * n), r
        assert 0.3 / np.sqrt(n) < r["bias_crb_sd"] < 4.0 / np.sqrt(n), r
    # a few hundred fluxes cannot resolve a 0.05 CRB bias goal: the report says so
    assert "unresolved: bias" in summary[0]["goals"]
    assert "pooled:no-systematic" in (tmp_path / "report.md").read_text()


def test_resume_refuses_a_campaign_of_another_mode(tmp_path):
    main = _campaign([])
    assert main([str(tmp_path), "--mode", "fast", "--cells", "baseline:-", "--seeds", "1"]) == 0
    with pytest.raises(SystemExit, match="fast.*not 'full'"):
        main([str(tmp_path), "--mode", "full", "--cells", "baseline:-", "--seeds", "1", "--resume"])
