"""The ztf-alerts adapter: ZTF alert packets (a directory, or ALeRCE over HTTP) -> epochs.

Synthetic packets (written here with a subset of the ZTF schema) test the conversion, the
ground truth (injected AB magnitude, position, noise) and the bad responses; the real SN 2021rhu
packets (skipped when ../shared/data is absent) test that the adapter gives exactly the epochs of
:func:`transcene.ztf_alerts.ztf_sn2021rhu_epochs` on the published cutout files.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from alert_broker import serve_alerts
from archive_server import html_error
from transcene.surveys import (HttpClient, NoCoverage, ProductError, RetryPolicy, SurveyError, fetch_epochs,
                               make_adapter)
from transcene.surveys.alerts import (angular_sep_arcsec, check_packet, cutout_filename, cutout_wcs_header,
                                      decode_stamp, packet_to_cutout, read_packets)

NAME = "ztf-alerts"
POLICY = RetryPolicy(attempts=2, backoff_s=0.01, budget_s=5)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RHU = DATA / "ztf-sn2021rhu"
SAMPLES = DATA / "ztf-alert-samples"
RHU_COORD = SkyCoord(0.814293, 16.1456989, unit="deg")

# --------------------------------------------------------------------------------------------
# Synthetic packets
# --------------------------------------------------------------------------------------------

_OPT = ("pid", "xpos", "ypos", "magzpsci", "exptime", "rfid", "nframesref", "jdstartref", "jdendref",
        "magpsf", "sigmapsf", "fwhm", "field", "rcid")
_CUTOUT = {"type": "record", "name": "cutout", "namespace": "ztf.alert",
           "fields": [{"name": "fileName", "type": "string"}, {"name": "stampData", "type": "bytes"}]}
_CANDIDATE = {"type": "record", "name": "candidate", "namespace": "ztf.alert", "fields": [
    {"name": "jd", "type": "double"}, {"name": "fid", "type": "int"}, {"name": "candid", "type": "long"},
    {"name": "ra", "type": "double"}, {"name": "dec", "type": "double"},
    {"name": "isdiffpos", "type": ["null", "string"], "default": None},
] + [{"name": k, "type": ["null", "double"], "default": None} for k in _OPT]}
SCHEMA = {"type": "record", "name": "alert", "namespace": "ztf", "fields": [
    {"name": "schemavsn", "type": "string"}, {"name": "publisher", "type": "string"},
    {"name": "objectId", "type": "string"}, {"name": "candid", "type": "long"},
    {"name": "candidate", "type": _CANDIDATE},
    {"name": "cutoutScience", "type": ["null", _CUTOUT], "default": None},
    {"name": "cutoutTemplate", "type": ["null", "ztf.alert.cutout"], "default": None},
    {"name": "cutoutDifference", "type": ["null", "ztf.alert.cutout"], "default": None},
]}
RA0, DEC0 = 150.1234567, 20.7654321
ZP = 26.2
SN_MAG = 15.5
SIGMA_SCI, SIGMA_TMPL = 8.0, 2.0
FWHM_SCI, FWHM_TMPL = 2.2, 2.6


def _gauss(shape, x0, y0, fwhm, flux, k=5):
    """Pixel-integrated round Gaussian (mean of k x k sub-pixel samples)."""
    s = fwhm / 2.3548
    sub = (np.arange(k) + 0.5) / k - 0.5
    ny, nx = shape
    xs = (np.arange(nx)[:, None] + sub).ravel() - x0
    ys = (np.arange(ny)[:, None] + sub).ravel() - y0
    g = np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2) / s**2) / (2 * np.pi * s**2)
    return flux * g.reshape(ny, k, nx, k).mean(axis=(1, 3))


def _stamp(image: np.ndarray, name: str, *, gz: bool = True) -> dict:
    buf = io.BytesIO()
    fits.PrimaryHDU(np.asarray(image, np.float32)).writeto(buf)
    data = buf.getvalue()
    return {"fileName": name, "stampData": gzip.compress(data) if gz else data}


GAIN = 6.2  # e-/DN (ZTF)


def make_record(candid: int, *, fid=1, jd=2459400.8, xpos=1200.37, ypos=845.81, shape=(63, 63), seed=0,
                sn_mag=SN_MAG, drop=(), rfid=None, gal_flux=3e6, gal_fwhm=30.0, **cand_over) -> dict:
    """A ZTF alert record: a host galaxy (``gal_flux`` DN, Gaussian of ``gal_fwhm`` px, 4 px from
    the SN, filling the stamp by default as NGC 7814 does for SN 2021rhu) + the SN (SN_MAG, AB,
    at the candidate) + sky 30 DN, with Gaussian noise of variance SIGMA**2 + galaxy/GAIN."""
    rng = np.random.default_rng(seed)
    x0 = xpos - max(1, round(xpos) - 31)  # 0-based stamp pixel of the candidate
    y0 = ypos - max(1, round(ypos) - 31)
    sn = _gauss(shape, x0, y0, FWHM_SCI, 10 ** (-0.4 * (sn_mag - ZP)))
    gal = _gauss(shape, x0 + 3.2, y0 - 2.1, gal_fwhm, gal_flux)
    sci = gal + 30.0 + sn + rng.normal(0, 1, shape) * np.sqrt(SIGMA_SCI**2 + gal / GAIN)
    tmpl = (_gauss(shape, x0 + 3.2, y0 - 2.1, np.hypot(gal_fwhm, 1.0), gal_flux) + 30.0
            + rng.normal(0, 1, shape) * np.sqrt(SIGMA_TMPL**2 + gal / GAIN / 15))
    diff = sn + rng.normal(0, SIGMA_SCI, shape)
    cand = {"jd": jd, "fid": fid, "candid": candid, "ra": RA0, "dec": DEC0, "isdiffpos": "t", "pid": 1.0,
            "xpos": xpos, "ypos": ypos, "magzpsci": ZP, "exptime": 30.0,
            "rfid": float(rfid if rfid is not None else 700120000 + 100 * fid), "nframesref": 15.0,
            "jdstartref": 2458300.5, "jdendref": 2458400.5, "magpsf": sn_mag, "sigmapsf": 0.01, "fwhm": 2.0,
            "field": 700.0, "rcid": 12.0, **cand_over}
    rec = {"schemavsn": "3.3", "publisher": "ZTF (www.ztf.caltech.edu)", "objectId": "ZTF21synthet",
           "candid": candid, "candidate": cand,
           "cutoutScience": _stamp(sci, f"candid{candid}_sci.fits.gz"),
           "cutoutTemplate": _stamp(tmpl, f"candid{candid}_ref.fits.gz"),
           "cutoutDifference": _stamp(diff, f"candid{candid}_diff.fits.gz")}
    for k in drop:
        rec[k] = None
    return rec


def injected_variance(shape, xpos, ypos, gal_flux=3e6, gal_fwhm=30.0):
    """(science, template) noise variance that :func:`make_record` injected, DN^2."""
    x0 = xpos - max(1, round(xpos) - 31)
    y0 = ypos - max(1, round(ypos) - 31)
    gal = _gauss(shape, x0 + 3.2, y0 - 2.1, gal_fwhm, gal_flux)
    return SIGMA_SCI**2 + gal / GAIN, SIGMA_TMPL**2 + gal / GAIN / 15


def write_packet(directory: Path, rec: dict, name: str | None = None) -> Path:
    import fastavro

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"{rec['objectId']}.{rec['candid']}.avro")
    with open(path, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(SCHEMA), [rec])
    return path


def synthetic_dir(directory: Path, n: int = 4) -> list[int]:
    """``n`` g-band alerts of one object (a few days apart, on the same pixel grid, so that one
    template subtracts from all of them); returns their candids."""
    candids = []
    for i in range(n):
        c = 1700000000015015000 + i
        write_packet(directory, make_record(c, jd=2459400.8 + 3 * i, seed=i))
        candids.append(c)
    return candids


def assert_cache_intact(root: Path) -> int:
    """Every file under the cache opens as what its name says; no partial file left. Returns the count."""
    import fastavro

    n = 0
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        assert not p.name.startswith(".part-"), p
        n += 1
        if p.suffix == ".fits":
            with fits.open(p) as h:
                h.verify("exception")
                assert any(hdu.data is not None for hdu in h)
        elif p.suffix == ".avro":
            assert list(fastavro.reader(io.BytesIO(p.read_bytes())))
        elif p.suffix == ".bin":
            json.loads(p.read_bytes())
    return n


def unthrottled() -> dict:
    """The adapter with a client without the descriptor's rate limit (the test server needs none)."""
    return {NAME: make_adapter(NAME, client=HttpClient(policy=POLICY))}


@pytest.fixture
def broker(archive_server, survey_env, monkeypatch):
    monkeypatch.setenv("TRANSCENE_ZTF_ALERTS_URL", archive_server.url)
    return archive_server


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pos", "crpix"), [(1865.8095703125, 31.8095703125), (2819.01123046875, 32.01123046875),
                                            (12.3, 12.3), (31.6, 31.6), (33.4, 32.4)])
def test_wcs_crpix_full_and_clipped_stamps(pos, crpix):
    """32 + (pos - round(pos)) for a full stamp (the README's rule); a stamp clipped at the CCD's
    low edge starts at CCD pixel 1, so the candidate is at CRPIX = pos."""
    hdr = cutout_wcs_header({"ra": RA0, "dec": DEC0, "xpos": pos, "ypos": 1000.0}, 1.012)
    assert hdr["CRPIX1"] == pytest.approx(crpix, abs=1e-9)
    w = WCS(hdr)
    x, y = w.world_to_pixel(SkyCoord(RA0, DEC0, unit="deg"))
    assert float(x) == pytest.approx(crpix - 1, abs=1e-9)
    # North down, East left, 1.012"/px
    x1, y1 = w.world_to_pixel(SkyCoord(RA0, DEC0 + 10 / 3600, unit="deg"))
    assert float(y1 - y) == pytest.approx(-10 / 1.012, rel=1e-4)
    x2, _ = w.world_to_pixel(SkyCoord(RA0 + 10 / 3600 / np.cos(np.radians(DEC0)), DEC0, unit="deg"))
    assert float(x2 - x) == pytest.approx(-10 / 1.012, rel=1e-3)


def test_check_packet_errors_name_the_field():
    rec = make_record(1)
    assert check_packet(rec, "p")["candid"] == 1
    with pytest.raises(SurveyError, match=r"candidate\.magzpsci missing"):
        check_packet(make_record(1, magzpsci=None), "p")
    with pytest.raises(SurveyError, match=r"candidate\.exptime missing"):
        check_packet(make_record(1, exptime=None), "p")
    with pytest.raises(SurveyError, match=r"candidate\.fid = 4"):
        check_packet(make_record(1, fid=4), "p")
    with pytest.raises(SurveyError, match="not a ZTF alert packet"):
        check_packet({"objectid": "DC21baaa", "ra": 1.0, "dec": 2.0, "sources": []}, "decat.avro")
    with pytest.raises(SurveyError, match="not a ZTF alert packet"):
        check_packet({**rec, "publisher": "DECAT", "objectId": "DC21x"}, "p")


def test_decode_stamp_gzipped_plain_and_bad():
    img = np.arange(63 * 63, dtype=np.float32).reshape(63, 63)
    for gz in (True, False):
        out, name = decode_stamp(_stamp(img, "a.fits.gz", gz=gz), "p", "cutoutScience")
        assert np.array_equal(out, img) and name == "a.fits.gz"
    with pytest.raises(SurveyError, match="has no cutoutTemplate"):
        decode_stamp(None, "p", "cutoutTemplate")
    with pytest.raises(SurveyError, match="does not open as"):
        decode_stamp({"fileName": "x", "stampData": b"\x1f\x8b garbage"}, "p", "cutoutScience")


def test_read_packets_corrupt_and_roundtrip(tmp_path):
    with pytest.raises(ProductError, match="not a readable Avro alert packet"):
        read_packets(b"Obj\x01 this is not avro", "bad.avro")
    path = write_packet(tmp_path, make_record(7))
    (rec,) = read_packets(path.read_bytes(), str(path))
    assert rec["candidate"]["candid"] == 7 and cutout_filename(rec) == "ZTF21synthet_7_ztfg.fits"


def test_packet_to_cutout_layout():
    rec = make_record(11, fid=2, jd=2459401.25)
    hdul = packet_to_cutout(rec, "p", source_name="x.avro")
    assert [h.name for h in hdul] == ["PRIMARY", "SCIENCE", "TEMPLATE", "DIFFERENCE"]
    h = hdul[0].header
    assert h["FILTER"] == "ztfr" and h["CANDID"] == 11 and h["MAGZPSCI"] == ZP and h["RFID"] == 700120200
    assert h["MJD"] == 2459401.25 - 2400000.5 and h["ALRTFILE"] == "x.avro"
    sci = hdul["SCIENCE"]
    assert sci.data.shape == (63, 63) and sci.header["CRPIX1"] == pytest.approx(32 + 0.37)
    with pytest.raises(SurveyError, match="cutoutTemplate shape"):
        bad = make_record(12)
        bad["cutoutTemplate"] = _stamp(np.zeros((40, 63)), "t")
        packet_to_cutout(bad, "p")
    with pytest.raises(SurveyError, match="outside the 20x63 stamp"):
        bad = make_record(13, xpos=500.2)
        for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
            bad[k] = _stamp(np.zeros((63, 20)), "t")
        packet_to_cutout(bad, "p")


def test_angular_sep():
    assert angular_sep_arcsec(10, 0, 10 + 1 / 3600, 0) == pytest.approx(1.0, rel=1e-6)
    assert angular_sep_arcsec(10, 60, 10 + 2 / 3600, 60) == pytest.approx(1.0, rel=1e-4)


# --------------------------------------------------------------------------------------------
# Adapter against the fake broker, synthetic packets (ground truth)
# --------------------------------------------------------------------------------------------


def test_broker_synthetic_ground_truth(broker, tmp_path):
    candids = synthetic_dir(tmp_path / "pk", 4)
    serve_alerts(broker, tmp_path / "pk")
    coord = SkyCoord(RA0 + 0.3 / 3600, DEC0, unit="deg")  # 0.3" off: still the object
    ad = unthrottled()[NAME]
    refs = ad.query(coord, size_pix=63)
    assert sorted(r.exposure_id for r in refs) == sorted(map(str, candids)) + ["ref_700120100"]
    ref_of = {r.exposure_id: r for r in refs}
    assert ref_of["ref_700120100"].kind == "reference"
    assert ref_of[str(candids[1])].mjd == pytest.approx(2459403.8 - 2400000.5 + 15 / 86400, abs=1e-9)

    report = fetch_epochs(SkyCoord(RA0, DEC0, unit="deg"), surveys=[NAME], policy=POLICY, adapters=unthrottled())
    assert not report.failures and len(report.epochs) == 5
    assert broker.count("/get_avro") == 4  # each packet once, for all epochs
    truth_njy = 10 ** (-0.4 * (SN_MAG - 31.4))
    eps = {e.exposure_id: e for e in report.epochs}
    tmpl = eps["ref_700120100"]
    assert tmpl.is_reference and tmpl.band == "ztfg" and tmpl.zeropoint == ZP and tmpl.survey == NAME
    assert tmpl.mjd == pytest.approx(2458350.5 - 2400000.5)
    for i, c in enumerate(candids):
        ep = eps[str(c)]
        assert not ep.is_reference and ep.survey == NAME and ep.band == "ztfg" and ep.timesys == "UTC"
        assert ep.mjd == pytest.approx(2459400.8 + 3 * i - 2400000.5 + 15 / 86400, abs=1e-7)
        # the candidate lands where the source was injected
        x, y = (float(v) for v in ep.wcs.world_to_pixel(SkyCoord(RA0, DEC0, unit="deg")))
        assert x == pytest.approx(31.37, abs=1e-4) and y == pytest.approx(30.81, abs=1e-4)
        d = ep.image - tmpl.image
        yy, xx = np.indices(d.shape)
        r = np.hypot(xx - x, yy - y)
        flux = d[r <= 6].sum() * ep.njy_per_unit  # noise ~1 % of the SN flux in this aperture
        assert flux == pytest.approx(truth_njy, rel=0.04)
        box = r <= 3
        cx, cy = (xx[box] * d[box]).sum() / d[box].sum(), (yy[box] * d[box]).sum() / d[box].sum()
        assert abs(cx - x) < 0.15 and abs(cy - y) < 0.15
        # noise model: away from the SN, the variance is the injected one (sky + host Poisson)
        v_sci, v_tmpl = injected_variance(d.shape, 1200.37, 845.81)
        far = r > 8
        assert np.median(ep.variance[far] / v_sci[far]) == pytest.approx(1.0, abs=0.15)
        assert np.median(tmpl.variance[far] / v_tmpl[far]) == pytest.approx(1.0, abs=0.35)
        # estimated PSF: unit sum, centred, FWHM of the injected Gaussian
        psf = ep.psf
        assert psf.sum() == pytest.approx(1.0, abs=1e-9) and psf.shape[0] % 2 == 1
        c0 = (psf.shape[0] - 1) / 2
        py, px = np.indices(psf.shape)
        assert abs((px * psf).sum() - c0) < 0.05 and abs((py * psf).sum() - c0) < 0.05
        core = np.hypot(px - c0, py - c0) <= 4
        sig2 = (((px - c0) ** 2 + (py - c0) ** 2) * psf)[core].sum() / psf[core].sum() / 2
        assert 2.3548 * np.sqrt(sig2) == pytest.approx(FWHM_SCI, rel=0.2)
    assert_cache_intact(tmp_path / "cache")


def test_variance_on_sky_dominated_stamp(survey_env, tmp_path):
    """A small host on sky: the modelled variance matches the injected one (the noise estimate
    once ranked pixels on the noisy science image and came out ~2x low in sigma here)."""
    pk = tmp_path / "pk"
    for i in range(3):
        write_packet(pk, make_record(500 + i, jd=2459400.8 + i, seed=i, gal_flux=6e4, gal_fwhm=5.0))
    ad = make_adapter(NAME, local_dir=pk)
    coord = SkyCoord(RA0, DEC0, unit="deg")
    ep = ad.fetch(next(r for r in ad.query(coord, size_pix=63) if r.kind == "science"), coord, size_pix=63)[0]
    v_sci, _ = injected_variance(ep.image.shape, 1200.37, 845.81, gal_flux=6e4, gal_fwhm=5.0)
    yy, xx = np.indices(ep.image.shape)
    far = np.hypot(xx - 31.37, yy - 30.81) > 10
    assert np.median(ep.variance[far] / v_sci[far]) == pytest.approx(1.0, abs=0.2)


def test_broker_bad_packets_become_failures(broker, tmp_path):
    pk = tmp_path / "pk"
    candids = synthetic_dir(pk, 4)
    write_packet(pk, make_record(1700000000015015100, jd=2459420.8, seed=9, drop=("cutoutTemplate",)))
    write_packet(pk, make_record(1700000000015015101, jd=2459421.8, seed=10, magzpsci=None))
    packets = serve_alerts(broker, pk)
    html_candid = str(candids[2])
    real = broker.routes["/get_avro"]
    broker.route("/get_avro", lambda req: html_error(200) if req.query["candid"] == html_candid else real(req))
    report = fetch_epochs(SkyCoord(RA0, DEC0, unit="deg"), surveys=[NAME], policy=POLICY, adapters=unthrottled())
    fails = {f.exposure_id: f for f in report.failures}
    assert set(fails) == {html_candid, "1700000000015015100", "1700000000015015101"}
    assert fails[html_candid].error == "ProductError" and "HTML" in fails[html_candid].reason
    assert "get_avro" in fails[html_candid].reason
    assert "cutoutTemplate" in fails["1700000000015015100"].reason
    assert "candidate.magzpsci" in fails["1700000000015015101"].reason
    assert sorted(e.exposure_id for e in report.epochs) == sorted(
        [str(c) for c in candids if str(c) != html_candid] + ["ref_700120100"])
    assert len(packets) == 6
    assert assert_cache_intact(tmp_path / "cache") > 0


def test_broker_empty_and_malformed_answers(broker, tmp_path):
    broker.route("/ztf/v1/objects", lambda req: __import__("archive_server").Reply(
        200, b'{"total": 0, "items": []}', "application/json"))
    ad = make_adapter(NAME, policy=POLICY)
    with pytest.raises(NoCoverage, match="no ZTF object within 2 arcsec"):
        ad.query(SkyCoord(RA0, DEC0, unit="deg"), size_pix=63)
    report = fetch_epochs(SkyCoord(RA0, DEC0, unit="deg"), surveys=[NAME], policy=POLICY, adapters=unthrottled())
    assert not report.failures and not report.epochs  # no object there is not an error

    broker.route("/ztf/v1/objects", lambda req: html_error(200))
    report = fetch_epochs(SkyCoord(RA0, DEC0 + 0.01, unit="deg"), surveys=[NAME], policy=POLICY, adapters=unthrottled())
    (f,) = report.failures
    assert f.exposure_id == "" and f.error == "ProductError" and "/ztf/v1/objects" in f.reason

    broker.route("/ztf/v1/objects", lambda req: __import__("archive_server").Reply(
        200, b'{"objects": []}', "application/json"))
    report = fetch_epochs(SkyCoord(RA0, DEC0 + 0.02, unit="deg"), surveys=[NAME], policy=POLICY, adapters=unthrottled())
    (f,) = report.failures
    assert f.error == "ServiceChanged" and "'items'" in f.reason


def test_local_clipped_stamp_inside_and_target_outside(survey_env, tmp_path):
    """A stamp clipped at the CCD's low edge (xpos 12.3: 43 px wide, candidate at x = 11.3)."""
    pk = tmp_path / "pk"
    write_packet(pk, make_record(42, fid=2, xpos=12.3, ypos=845.81, shape=(63, 43)))
    ad = make_adapter(NAME, local_dir=pk, policy=POLICY)
    coord = SkyCoord(RA0, DEC0, unit="deg")
    refs = ad.query(coord, size_pix=63)
    sci = next(r for r in refs if r.kind == "science")
    (ep,) = ad.fetch(sci, coord, size_pix=63)
    assert ep.image.shape == (63, 43)
    x, y = (float(v) for v in ep.wcs.world_to_pixel(coord))
    assert x == pytest.approx(11.3, abs=1e-6) and y == pytest.approx(30.81, abs=1e-6)
    d = ep.image - ad.fetch(next(r for r in refs if r.kind == "reference"), coord, size_pix=63)[0].image
    yy, xx = np.indices(d.shape)
    box = np.hypot(xx - x, yy - y) <= 3
    assert abs((xx[box] * d[box]).sum() / d[box].sum() - x) < 0.15
    far = SkyCoord(RA0 + 25 / 3600 / np.cos(np.radians(DEC0)), DEC0, unit="deg")  # 25" east: x < 0
    with pytest.raises(SurveyError, match=r"outside the 43x63 stamp"):
        ad.fetch(sci, far, size_pix=63)


def test_local_directory_selection(survey_env, tmp_path):
    """Position (one object), band and time selection; other objects and bands are left out."""
    pk = tmp_path / "pk"
    synthetic_dir(pk, 3)
    write_packet(pk, make_record(900, fid=2, jd=2459402.9, seed=5))
    other = make_record(901, seed=6)
    other["objectId"], other["candidate"]["ra"] = "ZTF21other", RA0 + 1.5 / 3600  # 1.4" away
    write_packet(pk, other)
    write_packet(pk, {**make_record(902, seed=7), "objectId": "ZTF21far"} | {
        "candidate": {**make_record(902)["candidate"], "dec": DEC0 + 0.1}})
    ad = make_adapter(NAME, local_dir=pk)
    refs = ad.query(SkyCoord(RA0, DEC0, unit="deg"), size_pix=63)
    assert {r.meta["objectId"] for r in refs} == {"ZTF21synthet"}
    assert sorted(r.band for r in refs if r.kind == "reference") == ["ztfg", "ztfr"]
    refs = ad.query(SkyCoord(RA0, DEC0, unit="deg"), size_pix=63, bands=["r"], start=59402.0, end=59403.0)
    assert [(r.exposure_id, r.kind) for r in refs] == [("900", "science"), ("ref_700120200", "reference")]
    with pytest.raises(NoCoverage):
        ad.query(SkyCoord(RA0 + 0.01, DEC0, unit="deg"), size_pix=63)


# --------------------------------------------------------------------------------------------
# Real packets
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rhu_truth():
    from transcene.ztf_alerts import ztf_sn2021rhu_epochs

    return {e.exposure_id: e for e in ztf_sn2021rhu_epochs(RHU / "cutouts")}


@pytest.mark.realdata
@pytest.mark.skipif(not (RHU / "avro").is_dir(), reason=f"ZTF SN 2021rhu packets absent ({RHU})")
def test_rhu_conversion_equals_cutout_files(tmp_path):
    """Every SN 2021rhu packet -> the same pixels and reader-relevant header values as its cutout."""
    keys = ("CANDID", "MJD", "FILTER", "MAGZPSCI", "EXPTIME", "RA", "DEC", "RFID", "NFRMREF", "JDSTRREF",
            "JDENDREF", "XPOS", "YPOS", "JD", "FID")
    wcs_keys = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2")
    packets = sorted((RHU / "avro").glob("*.avro"))
    assert len(packets) == 34
    for p in packets:
        (rec,) = read_packets(p.read_bytes(), str(p))
        out = tmp_path / cutout_filename(rec)
        packet_to_cutout(rec, str(p), source_name=p.name).writeto(out)
        ref = RHU / "cutouts" / out.name
        assert ref.exists(), out.name
        with fits.open(out) as a, fits.open(ref) as b:
            for k in keys:
                assert a[0].header[k] == b[0].header[k], (p.name, k)
            for ext in ("SCIENCE", "TEMPLATE", "DIFFERENCE"):
                assert np.array_equal(a[ext].data, b[ext].data, equal_nan=True), (p.name, ext)
                for k in wcs_keys:
                    assert a[ext].header[k] == b[ext].header[k], (p.name, ext, k)


@pytest.mark.realdata
@pytest.mark.skipif(not (RHU / "cutouts").is_dir(), reason=f"ZTF SN 2021rhu packets/cutouts absent ({RHU})")
def test_rhu_directory_epochs_equal_existing_reader(survey_env, rhu_truth):
    ad = make_adapter(NAME, local_dir=RHU / "avro")
    refs = ad.query(RHU_COORD, size_pix=63)
    assert len(refs) == 36 and sum(r.kind == "reference" for r in refs) == 2
    got = {}
    for r in refs:
        (ep,) = ad.fetch(r, RHU_COORD, size_pix=63)
        assert ep.exposure_id == r.exposure_id and ep.survey == NAME
        assert r.mjd == pytest.approx(ep.mjd, abs=1e-9)
        got[ep.exposure_id] = ep
    assert sorted(got) == sorted(rhu_truth)
    for k, t in rhu_truth.items():
        e = got[k]
        for f in ("image", "variance", "psf"):
            np.testing.assert_allclose(getattr(e, f), getattr(t, f), rtol=1e-12, atol=0, err_msg=f"{k} {f}")
        assert np.array_equal(e.mask, t.mask)
        assert (e.zeropoint, e.mjd, e.is_reference, e.band, e.timesys) == (
            t.zeropoint, t.mjd, t.is_reference, t.band, t.timesys)
        assert e.saturate == t.saturate and e.gain == t.gain
        assert np.allclose(e.wcs.wcs.crpix, t.wcs.wcs.crpix) and np.allclose(e.wcs.wcs.crval, t.wcs.wcs.crval)


@pytest.mark.realdata
@pytest.mark.skipif(not (RHU / "avro").is_dir(), reason=f"ZTF SN 2021rhu packets absent ({RHU})")
def test_rhu_broker_with_injected_failures(broker, tmp_path):
    packets = serve_alerts(broker, RHU / "avro")
    assert len(packets) == 34
    broker.fail_fraction(0.2, prefix="/get_avro")
    report = fetch_epochs(RHU_COORD, surveys=[NAME], policy=POLICY, adapters=unthrottled())
    assert report.n_found == 36
    failed = {f.exposure_id for f in report.failures}
    assert 2 <= len(failed) <= 14, failed  # ~20 % of 34
    assert all(f.error == "DownloadError" and "503" in f.reason and "get_avro" in f.reason for f in report.failures)
    assert failed <= set(packets)
    got = {e.exposure_id for e in report.epochs}
    assert got | failed == set(packets) | {"ref_550120108", "ref_550120208"} and not got & failed
    assert assert_cache_intact(tmp_path / "cache") >= len(got)
    # second run: the good epochs come from the cache, the failed ones fail again
    n_avro = broker.count("/get_avro")
    again = fetch_epochs(RHU_COORD, surveys=[NAME], policy=POLICY, adapters=unthrottled())
    assert again.n_cached == len(got) and {f.exposure_id for f in again.failures} == failed
    assert broker.count("/get_avro") - n_avro == 2 * len(failed)  # only the failing ones are asked again
    assert_cache_intact(tmp_path / "cache")


@pytest.mark.realdata
@pytest.mark.skipif(not (RHU / "avro").is_dir() or not SAMPLES.is_dir(), reason=f"shared alert data absent ({DATA})")
def test_local_directory_bad_files_and_v4(survey_env, tmp_path):
    """DECAT packet, corrupt file, packet without cutouts, missing zero point -> failure rows that
    name the file and the field; the good packets still give epochs; a v4_02 packet works."""
    import fastavro

    pk = tmp_path / "pk"
    pk.mkdir()
    g = [p for p in sorted((RHU / "avro").glob("*.avro"))
         if read_packets(p.read_bytes(), str(p))[0]["candidate"]["fid"] == 1][:3]
    for p in g:
        shutil.copy(p, pk / p.name)
    decat = SAMPLES / "pitt-google" / "DC21baaa.570349.decat_20210414_2021A-0113__7a771ff.avro"
    shutil.copy(decat, pk / decat.name)
    (pk / "corrupt.avro").write_bytes(g[0].read_bytes()[:3000])
    with open(g[1], "rb") as fh:
        reader = fastavro.reader(fh)
        schema, rec = reader.writer_schema, next(reader)
    nocut = {**rec, "cutoutScience": None, "cutoutTemplate": None, "cutoutDifference": None,
             "candid": rec["candid"] + 1, "candidate": {**rec["candidate"], "candid": rec["candid"] + 1}}
    nozp = {**rec, "candid": rec["candid"] + 2, "candidate": {**rec["candidate"], "candid": rec["candid"] + 2,
                                                               "magzpsci": None}}
    for name, r in (("nocut.avro", nocut), ("nozp.avro", nozp)):
        with open(pk / name, "wb") as fh:
            fastavro.writer(fh, schema, [r])
    report = fetch_epochs(RHU_COORD, surveys=[NAME], local_dir=pk, policy=POLICY)
    fails = {f.exposure_id: f.reason for f in report.failures}
    assert fails[f"unreadable_{decat.name}"].startswith(str(pk / decat.name))
    assert "not a ZTF alert packet" in fails[f"unreadable_{decat.name}"]
    assert "not a readable Avro alert packet" in fails["unreadable_corrupt.avro"]
    assert "candidate.magzpsci" in fails["unreadable_nozp.avro"]
    assert "no cutoutScience" in fails[str(rec["candid"] + 1)] and "nocut.avro" in fails[str(rec["candid"] + 1)]
    assert len(fails) == 4
    assert sorted(e.exposure_id for e in report.epochs) == sorted(
        [p.name.split(".")[1] for p in g] + ["ref_550120108"])

    v4 = SAMPLES / "pittgoogle-client" / "ztf_20250302_programid1_ZTF17aaarzyp_2982177112815010003.v4_02.avro"
    (rec4,) = read_packets(v4.read_bytes(), str(v4))
    assert rec4["schemavsn"].startswith("4")
    c4 = SkyCoord(rec4["candidate"]["ra"], rec4["candidate"]["dec"], unit="deg")
    d4 = tmp_path / "v4"
    d4.mkdir()
    shutil.copy(v4, d4 / v4.name)
    ad = make_adapter(NAME, local_dir=d4)
    eps = [e for r in ad.query(c4, size_pix=63) for e in ad.fetch(r, c4, size_pix=63)]
    assert sorted(e.exposure_id for e in eps) == ["2982177112815010003", f"ref_{rec4['candidate']['rfid']}"]
    assert all(np.isfinite(e.zeropoint) and e.psf.sum() == pytest.approx(1.0) for e in eps)


@pytest.mark.remote_data
def test_remote_alerce_sn2021rhu(survey_env):
    """Live ALeRCE: SN 2021rhu (ZTF21abiuvdk) lists alerts and one packet gives an epoch."""
    ad = make_adapter(NAME)
    refs = ad.query(RHU_COORD, size_pix=63, end=59400.0)
    sci = [r for r in refs if r.kind == "science"]
    assert sci and all(r.meta["objectId"] == "ZTF21abiuvdk" for r in sci)
    (ep,) = ad.fetch(sci[0], RHU_COORD, size_pix=63)
    assert ep.image.shape == (63, 63) and ep.band in ("ztfg", "ztfr")


def test_a_new_alert_rebuilds_the_cached_epochs_of_its_group(survey_env, tmp_path):
    """The band-level PSF uses every alert of a (band, reference) group, so the group's membership
    is part of each epoch's cache key: a new packet means fresh epochs, not stale cached ones."""
    pk = tmp_path / "pk"
    synthetic_dir(pk, 3)
    coord = SkyCoord(RA0, DEC0, unit="deg")
    first = fetch_epochs(coord, surveys=[NAME], local_dir=pk, config={})
    again = fetch_epochs(coord, surveys=[NAME], local_dir=pk, config={})
    assert again.n_cached == len(first.refs) and again.n_downloaded == 0
    write_packet(pk, make_record(1700000000015015999, jd=2459430.8, seed=42))
    grown = fetch_epochs(coord, surveys=[NAME], local_dir=pk, config={})
    assert grown.n_cached == 0 and grown.n_downloaded == len(grown.refs) == len(first.refs) + 1
