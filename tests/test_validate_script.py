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
Z_SD, EXTRA_SD = 10.0, 1.0  # nJy: the control variate's share of a fake flux error, and the rest


def _fake_noise(cell_name: str, seed: int):
    """A fake fit's noise response shared with its control variate, and the fit's own extra."""
    rng = np.random.default_rng(1000 * len(cell_name) + seed)
    return Z_SD * rng.normal(size=N_FLUX), EXTRA_SD * rng.normal(size=N_FLUX)


def _campaign(calls: list, with_oracle: bool = True, oracle_calls: list | None = None):
    mod = runpy.run_path(str(CAMPAIGN))

    def fake_run_one(cell, mode, seed):
        calls.append((cell.name, seed))
        z, extra = _fake_noise(cell.name, seed)
        true = np.full(N_FLUX, 100.0)
        err = np.full(N_FLUX, np.hypot(Z_SD, EXTRA_SD))
        flux = true + z + extra  # pulls ~ N(0, 1), errors equal to the CRB
        t = Table({
            "cell": [cell.name] * N_FLUX, "seed": np.full(N_FLUX, seed), "exposure_id": np.arange(N_FLUX),
            "band": ["r"] * N_FLUX, "flux": flux * u.nJy, "flux_err": err * u.nJy, "flux_true": true * u.nJy,
            "crb": err * u.nJy, "chi2_dof": np.ones(N_FLUX), "sb_mag": np.full(N_FLUX, 21.0) * u.mag / u.arcsec**2,
        })
        t["pull"] = (t["flux"] - t["flux_true"]) / t["flux_err"]
        if with_oracle:
            t["oracle"], t["oracle_sd"] = z * u.nJy, np.full(N_FLUX, Z_SD) * u.nJy
        return t, dict(cell=cell.name, seed=seed, status="converged", elapsed=1.5, n_iter=7)

    def fake_simulate_cell(cell, mode, seed):
        return None, None, None, (cell.name, seed)

    def fake_oracle(cell, noise, target, exposure_ids):
        oracle_calls.append(noise)
        z, _ = _fake_noise(*noise)
        n = len(exposure_ids)
        return z[np.asarray(exposure_ids, int)], np.full(n, Z_SD), np.full(n, np.hypot(Z_SD, EXTRA_SD))

    # main() looks these up in its own module globals (runpy returns a copy of them)
    g = mod["main"].__globals__
    g["run_one"], g["simulate_cell"], g["oracle"] = fake_run_one, fake_simulate_cell, fake_oracle
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
        # the control variate takes out all but EXTRA_SD of the noise: the same statistics,
        # known ~10x better
        assert abs(r["bias_cv"]) < 4.0 * EXTRA_SD / 10.0 / np.sqrt(n), r
        assert r["bias_cv_sd"] < 0.3 * r["bias_crb_sd"], r
        assert abs(r["pull_rms_cv"] - 1.0) < 0.02 and r["pull_rms_cv_sd"] < 0.3 * r["pull_std_sd"], r
        assert abs(r["coverage68_cv"] - 0.6827) < 0.03 and r["coverage68_cv_sd"] < 0.8 * r["coverage68_sd"], r
    # a few hundred fluxes cannot resolve a 0.05 CRB bias goal from the raw statistics; with the
    # control variate they can
    assert "unresolved" not in summary[0]["goals"].split("(")[-1] or "bias" not in summary[0]["goals"].split("(")[-1]
    assert "+bias<0.05CRB" in summary[0]["goals"]
    assert "pooled:no-systematic" in (tmp_path / "report.md").read_text()


def test_resume_adds_the_control_variate_to_fits_made_without_it(tmp_path):
    oracle_calls: list = []
    main = _campaign([], with_oracle=False, oracle_calls=oracle_calls)
    assert main([str(tmp_path), "--mode", "fast", "--cells", "baseline:-", "--seeds", "4"]) == 0
    before = Table.read(tmp_path / "cells.ecsv")[0]
    assert not np.isfinite(before["bias_cv"]) and "unresolved: bias" in before["goals"]

    main = _campaign([], with_oracle=True, oracle_calls=oracle_calls)
    assert main([str(tmp_path), "--mode", "fast", "--cells", "baseline:-", "--seeds", "5", "--resume"]) == 0
    assert sorted(oracle_calls) == [("baseline:-", s) for s in range(4)]  # the 5th fit brought its own
    fluxes = Table.read(tmp_path / "fluxes.ecsv")
    assert np.all(np.isfinite(np.asarray(fluxes["oracle_sd"], float)))
    after = Table.read(tmp_path / "cells.ecsv")[0]
    assert after["bias_cv_sd"] < 0.3 * after["bias_crb_sd"]
    assert "+bias<0.05CRB" in after["goals"]


def test_resume_refuses_a_campaign_of_another_mode(tmp_path):
    main = _campaign([])
    assert main([str(tmp_path), "--mode", "fast", "--cells", "baseline:-", "--seeds", "1"]) == 0
    with pytest.raises(SystemExit, match="fast.*not 'full'"):
        main([str(tmp_path), "--mode", "full", "--cells", "baseline:-", "--seeds", "1", "--resume"])
