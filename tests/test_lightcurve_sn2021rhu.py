"""End to end on real data: `transcene lightcurve` on the ZTF alert packets of SN 2021rhu served
by a fake ALeRCE broker on loopback (20 % of packet downloads failing), against ZTF's own
difference-image photometry and against `transcene fit` on the same epochs.

The default run fits the late epochs (MJD 59440-59462, 10 science epochs + 2 templates) in a
12" radius to stay within a few minutes; the slow test fits all 34 epochs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from typer.testing import CliRunner

import transcene  # noqa: F401  (enables float64)
from transcene.cli import app

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ztf-sn2021rhu"
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not (DATA / "avro").is_dir(), reason=f"SN 2021rhu packets not found in {DATA}/avro")]
runner = CliRunner()


@pytest.fixture
def broker(archive_server, survey_env, monkeypatch):
    from alert_broker import serve_alerts

    serve_alerts(archive_server, DATA / "avro")
    monkeypatch.setenv("TRANSCENE_ZTF_ALERTS_URL", archive_server.url)
    config = survey_env / "config.toml"
    # a local server needs no throttling, and its injected failures no real backoff
    config.write_text('[http]\nbackoff_s = 0.01\n\n[surveys.ztf-alerts]\nrate_limit_per_s = 0\n')
    monkeypatch.setenv("TRANSCENE_CONFIG", str(config))
    cand = Table.read(DATA / "alerts_candidates.csv")
    return archive_server, f"{np.median(cand['ra']):.7f}", f"{np.median(cand['dec']):.7f}"


def _ztf_photometry() -> Table:
    t = Table.read(DATA / "lightcurve_ztf_alert_psf.csv")
    det = np.asarray(t["detected"]).astype(str) == "True"
    return t[det]


def _compare_with_ztf(lc: Table) -> np.ndarray:
    """transcene / ZTF - 1 for each fitted science epoch with S/N > 20."""
    ztf = _ztf_photometry()
    ratios = []
    for row in lc[(lc["flags"] & (1 | 64)) == 0]:
        sel = (np.asarray(ztf["band"]) == row["band"]) & (np.abs(np.asarray(ztf["mjd"]) - float(row["mjd"])) < 1e-3)
        assert sel.sum() == 1, f"no single ZTF row for {row['exposure_id']}"
        if float(row["snr"]) > 20:
            ratios.append(float(row["flux"]) / (float(ztf["flux_ujy"][sel][0]) * 1e3) - 1)
    return np.array(ratios)


def _all_cache_files_open(root: Path) -> None:
    import fastavro

    for p in root.rglob("*"):
        if not p.is_file():
            continue
        assert not p.name.startswith(".part-"), p
        if p.suffix == ".fits":
            with fits.open(p) as h:
                h.verify("exception")
        elif p.suffix == ".avro":
            with open(p, "rb") as fh:
                assert list(fastavro.reader(fh))


def test_lightcurve_from_the_broker_matches_ztf_and_transcene_fit(broker, tmp_path):
    server, ra, dec = broker
    server.fail_fraction(0.2, prefix="/get_avro", seed=1)
    args = ["lightcurve", ra, dec, "--survey", "ztf-alerts", "--start", "59440", "--end", "59462",
            "--fit-radius", "12", "--shift-prior", "0.2", "-q"]
    t0 = time.perf_counter()
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "lc.ecsv")])
    t_first = time.perf_counter() - t0
    assert first.exit_code == 0, first.output
    lc = Table.read(tmp_path / "lc.ecsv")
    failed = lc[(lc["flags"] & 64) > 0]
    fitted = lc[(lc["flags"] & 64) == 0]
    # the packets the server refused are flagged rows, the rest is a light curve
    asked = {r.query["candid"] for r in server.requests if r.path == "/get_avro"}
    assert 1 <= len(failed) <= len(asked) // 2 and set(failed["exposure_id"].astype(str)) <= asked
    assert all("503" in s for s in lc.meta["fetch_failures"])
    assert np.all(np.ma.getmaskarray(failed["flux"]))  # no number for an epoch that never arrived
    assert int(np.sum(fitted["is_reference"])) == 2 and len(fitted) >= 8
    _all_cache_files_open(Path(transcene_cache()))
    # against ZTF's difference-image PSF photometry (late epochs: S/N 30-60)
    r = _compare_with_ztf(fitted)
    assert len(r) >= 5
    assert abs(np.median(r)) < 0.04 and np.std(r) < 0.06, r

    # the second run: epochs from the cache, metadata within the hour; only refused packets retried
    n = len(server.requests)
    t0 = time.perf_counter()
    second = runner.invoke(app, [*args, "-o", str(tmp_path / "lc2.ecsv")])
    t_second_total = time.perf_counter() - t0
    assert second.exit_code == 0, second.output
    new = server.requests[n:]
    from collections import Counter

    tries = Counter(q.query["candid"] for q in server.requests[:n] if q.path == "/get_avro")
    refused = {c for c, k in tries.items() if k == 5}  # 5 attempts: the server said 503 every time
    assert all(q.path == "/get_avro" for q in new)  # no search (an hour's reuse), no cached packet
    assert {q.query["candid"] for q in new} == refused and len(new) == 5 * len(refused)
    lc2 = Table.read(tmp_path / "lc2.ecsv")
    assert "from the cache" in lc2.meta["fetch"]
    np.testing.assert_allclose(np.asarray(lc2["flux"].filled(np.nan)), np.asarray(lc["flux"].filled(np.nan)),
                               rtol=1e-9, equal_nan=True)

    # transcene fetch writes the same epochs as files; transcene fit on them gives the same fluxes
    fetched = runner.invoke(app, ["fetch", ra, dec, "--survey", "ztf-alerts", "--start", "59440", "--end", "59462",
                                  "-o", str(tmp_path / "epochs"), "-q"])
    assert fetched.exit_code == 0, fetched.output
    fit = runner.invoke(app, ["fit", str(tmp_path / "epochs"), "--ra", ra, "--dec", dec, "--fit-radius", "12",
                              "--shift-prior", "0.2", "-o", str(tmp_path / "fit.ecsv"), "-q"])
    assert fit.exit_code == 0, fit.output
    ref = Table.read(tmp_path / "fit.ecsv")
    ref.sort("exposure_id")
    fitted.sort("exposure_id")
    assert list(ref["exposure_id"]) == list(fitted["exposure_id"])
    # the same pixels and the same model; the linear solves are conjugate gradients to a 1e-4
    # relative residual and the epochs come in another order (fetch order vs file names), so the
    # two agree to that level: measured 5e-6 of the flux (< 0.003 flux_err) and 2e-4 of the error
    err = np.asarray(fitted["flux_err"], float)
    assert np.all(np.abs(np.asarray(ref["flux"], float) - np.asarray(fitted["flux"], float)) <= 0.01 * np.maximum(err, 1))
    np.testing.assert_allclose(ref["flux_err"], fitted["flux_err"], rtol=1e-3)
    print(f"\nSN 2021rhu via the broker: first run {t_first:.1f} s, second (cached) {t_second_total:.1f} s")


def transcene_cache() -> str:
    import os

    return os.environ["TRANSCENE_CACHE_DIR"]


@pytest.mark.slow
def test_all_34_epochs_through_the_broker_match_ztf(broker, tmp_path):
    """The whole light curve (about 6 minutes on 2 cores): measured median -0.9 %, robust scatter
    2.1 % against ZTF over the 34 epochs with S/N > 20, as scripts/sn2021rhu.py finds from files."""
    server, ra, dec = broker
    res = runner.invoke(app, ["lightcurve", ra, dec, "--survey", "ztf-alerts", "-o", str(tmp_path / "lc.ecsv"), "-q"])
    assert res.exit_code == 0, res.output
    lc = Table.read(tmp_path / "lc.ecsv")
    assert len(lc) == 36 and int(np.sum(lc["is_reference"])) == 2 and not np.any(lc["flags"] & 64)
    r = _compare_with_ztf(lc)
    assert len(r) == 34
    robust = 1.4826 * np.median(np.abs(r - np.median(r)))
    assert abs(np.median(r)) < 0.02 and robust < 0.04, (np.median(r), robust)
