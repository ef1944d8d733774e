"""scripts/nightly.py: a target list in, one light curve per target and a summary out; a target
that cannot be fitted is a summary row, not a crash."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from astropy.table import Table

import transcene  # noqa: F401  (enables float64)
from transcene.simulate import SimulationConfig, write_simulation

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "nightly.py"


def _load():
    spec = importlib.util.spec_from_file_location("nightly", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_nightly_fits_each_target_and_reports_the_ones_it_cannot(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCENE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRANSCENE_CONFIG", str(tmp_path / "none.toml"))
    sim = tmp_path / "sim"
    write_simulation(sim, SimulationConfig(n_epochs=5, n_reference=2, bands=("r",), size=20, psf_size=15,
                                           seeing_fwhm=(2.2, 3.0), seed=5, transient_peak_mag=18.5))
    truth = Table.read(sim / "truth.ecsv")
    cat = Table({"name": ["SN sim", "nothing here"],
                 "ra": [float(truth.meta["transient_ra"]), 10.0],
                 "dec": [float(truth.meta["transient_dec"]), -30.0]})
    cat.write(tmp_path / "targets.ecsv")
    code = _load().main([str(tmp_path / "targets.ecsv"), "-o", str(tmp_path / "out"), "--survey", "fits",
                         "--dir", str(sim), "--method", "linear"])
    assert code == 1  # one target failed
    summary = Table.read(tmp_path / "out" / "summary.ecsv")
    good, bad = summary[0], summary[1]
    assert good["status"] == "converged" and good["n_epochs"] == 7 and good["n_failed"] == 0
    assert bad["status"] == "failed" and "no epoch could be fetched" in bad["message"]
    lc = Table.read(tmp_path / "out" / "SN_sim" / "lightcurve.ecsv")
    sci = lc[~np.asarray(lc["is_reference"])]
    flux_true = {str(e): float(f) for e, f in zip(truth["exposure_id"], truth["flux_true"])}
    pulls = [(float(r["flux"]) - flux_true[str(r["exposure_id"])]) / float(r["flux_err"]) for r in sci]
    assert np.all(np.abs(pulls) < 4)
    last = sci[np.argmax(np.asarray(sci["mjd"]))]
    assert float(good["last_flux"]) == float(last["flux"]) and summary["last_flux"].unit == "nJy"
    assert (tmp_path / "out" / "SN_sim" / "lightcurve.png").exists()
