"""The ZTF adapter (transcene.surveys.ztf) against a synthetic IRSA on loopback.

The fake archive serves ~128x128 "quadrants" with a TAN WCS (1.01"/px): sky + a Gaussian host +
field stars + a point source of known AB magnitude + noise, their bit masks, DAOPHOT-like PSF
stamps, references with uncertainty images, and IBE CSV search answers. Cutouts are made with
astropy's Cutout2D (clipped at the edge like IRSA; HTTP 400 when they miss the image).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.nddata.utils import NoOverlapError
from astropy.time import Time
from astropy.wcs import WCS

from archive_server import Reply, html_error
from transcene.io import read_epoch
from transcene.psf import psf_fwhm
from transcene.surveys import (AuthRequired, DownloadError, EpochRef, HttpClient, ProductError, RetryPolicy,
                               ServiceChanged, SurveyError, fetch_epochs, make_adapter, ztf)
from transcene.surveys.descriptor import read_descriptor
from transcene.ztf_alerts import _shape_matrix, moffat_image, moffat_psf

POLICY = RetryPolicy(attempts=2, backoff_s=0.01, budget_s=5)
DESCRIPTORS = {"ztf": read_descriptor(Path(__file__).resolve().parents[1] / "surveys" / "ztf.toml")}
TARGET = SkyCoord(150.10, 2.20, unit="deg")
SCALE = 1.01  # arcsec/px
NQ = 128  # quadrant side, px
GAIN, READNOI, SKY, SATURATE, EXPTIME = 6.2, 9.0, 180.0, 50000.0, 30.0
SN_MAG, HOST_MAG, HOST_SIGMA = 17.5, 16.5, 2.5
SCI_PSF = (2.3, 2.1, 0.1, 3.0)  # fwhm_1, fwhm_2 (px), correlation, beta
REF_PSF = (2.9, 2.6, -0.15, 3.4)
REF_NFRAMES = 15
# star offsets from the target (arcsec) and AB magnitudes: >= 12 px apart, >= 20 px from the target
STARS = [(-40, -35, 15.8), (-40, 5, 16.2), (-42, 42, 16.6), (0, -45, 16.0), (2, 48, 15.6), (35, -38, 16.4),
         (40, 0, 15.9), (38, 40, 16.8), (-20, -60, 16.3), (22, 62, 16.1), (-62, -15, 16.5), (60, 22, 16.0)]
DATA = "/ibe/data/ztf/products"


def njy(mag: float) -> float:
    return 10 ** (-0.4 * (mag - 31.4))


def smat(p):
    return _shape_matrix(p[0], p[1], p[2], p[3])


def quad_wcs(target_px: tuple[float, float], rot_deg: float = 0.4) -> WCS:
    """TAN WCS with the target at 0-based pixel ``target_px``."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [TARGET.ra.deg, TARGET.dec.deg]
    w.wcs.crpix = [target_px[0] + 1, target_px[1] + 1]
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    w.wcs.cd = SCALE / 3600 * np.array([[-c, s], [s, c]])
    return w


def add_point(model, x, y, flux, psf):
    """Add a pixel-integrated Moffat of ``flux`` at (x, y) on a 41x41 stamp (clipped at the edges)."""
    ix, iy, h = int(round(x)), int(round(y)), 20
    stamp = moffat_image((2 * h + 1, 2 * h + 1), x - ix + h, y - iy + h, smat(psf), psf[3], flux=flux, oversample=5)
    ny, nx = model.shape
    y0, x0 = iy - h, ix - h
    ys, xs = slice(max(y0, 0), min(y0 + 2 * h + 1, ny)), slice(max(x0, 0), min(x0 + 2 * h + 1, nx))
    if ys.start < ys.stop and xs.start < xs.stop:
        model[ys, xs] += stamp[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0]


def convolve_moffat(img, psf, half=20):
    """``img`` through the pixel-integrated elliptical Moffat ``psf`` (unit sum)."""
    from scipy.signal import fftconvolve

    k = moffat_image((2 * half + 1, 2 * half + 1), half, half, smat(psf), psf[3], oversample=5)
    return fftconvolve(img, k / k.sum(), mode="same")


def render(wcs, psf, zp, sn_mag):
    """Noiseless quadrant (DN): sky + host + stars (+ the transient), all through ``psf`` (a host
    drawn without it would differ between the sharp science and the broad reference images like
    no real galaxy does, and a joint fit would put the difference into the transient)."""
    model = np.full((NQ, NQ), SKY)
    tx, ty = (float(v) for v in wcs.world_to_pixel(TARGET))
    yy, xx = np.mgrid[:NQ, :NQ]
    host = np.exp(-0.5 * ((xx - tx - 1.5) ** 2 + (yy - ty + 1.0) ** 2) / HOST_SIGMA**2)
    model += convolve_moffat(host / host.sum() * 10 ** (-0.4 * (HOST_MAG - zp)), psf)
    for dra, ddec, mag in STARS:
        c = SkyCoord(TARGET.ra.deg + dra / 3600 / math.cos(TARGET.dec.rad), TARGET.dec.deg + ddec / 3600, unit="deg")
        sx, sy = (float(v) for v in wcs.world_to_pixel(c))
        add_point(model, sx, sy, 10 ** (-0.4 * (mag - zp)), psf)
    if sn_mag is not None:
        add_point(model, tx, ty, 10 ** (-0.4 * (sn_mag - zp)), psf)
    return model


def fits_bytes(data, header) -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(data, header=header).writeto(buf)
    return buf.getvalue()


class FakeIrsa:
    """Products and IBE tables of a synthetic ZTF archive, served by ``archive_server``."""

    def __init__(self, server):
        self.server = server
        self.files: dict[str, tuple[np.ndarray, fits.Header, WCS | None]] = {}
        self.sci_rows: list[tuple[dict, WCS]] = []  # (IBE row, WCS of its image)
        self.ref_rows: list[tuple[dict, WCS]] = []
        self.truth: dict[str, dict] = {}
        server.route("/ibe/search/ztf/products/sci", lambda req: self._search(req, self.sci_rows))
        server.route("/ibe/search/ztf/products/ref", lambda req: self._search(req, self.ref_rows))
        server.route(DATA + "/", self._data)

    # -- building ------------------------------------------------------------------------
    def add_science(self, *, ffd="20210705401528", field=600, ccd=5, qid=2, fc="zr", target_px=(60.3, 66.7),
                    zp=26.3, sn_mag=SN_MAG, seed=0, even_psf=False, drop=(), infobits=0, with_psf=True,
                    in_metadata=True):
        w = quad_wcs(target_px)
        model = render(w, SCI_PSF, zp, sn_mag)
        rng = np.random.default_rng(seed)
        var = np.maximum(model, 0) / GAIN + (READNOI / GAIN) ** 2
        sci = model + rng.normal(size=model.shape) * np.sqrt(var)
        tx, ty = int(round(target_px[0])), int(round(target_px[1]))
        bits = np.zeros((NQ, NQ), np.int16)
        bits[max(ty - 2, 0): ty + 3, max(tx - 2, 0): tx + 3] |= 1 << 1  # sexsources: not a defect
        bits[:, min(tx + 7, NQ - 1)] |= 1 << 4  # a noisy column: a defect
        bits[max(ty - 10, 0), max(tx - 12, 0)] |= 1 << 11  # psfsources: not a defect
        sat = (min(ty + 12, NQ - 1), max(tx - 15, 0))
        sci[sat] = 60000.0
        nan = (max(ty - 20, 0), min(tx + 20, NQ - 1))
        sci[nan] = np.nan
        start = Time(f"{ffd[:4]}-{ffd[4:6]}-{ffd[6:8]}", scale="utc").mjd + int(ffd[8:]) / 1e6
        hdr = fits.Header()
        values = {"MAGZP": zp, "MAGZPUNC": 1e-5, "CLRCOEFF": -0.05, "GAIN": GAIN, "READNOI": READNOI,
                  "SATURATE": SATURATE, "EXPTIME": EXPTIME, "OBSMJD": start,
                  "DATE-OBS": Time(start, format="mjd", scale="utc").isot, "FIELDID": field, "CCDID": ccd,
                  "QID": qid, "FILTER": {"zg": "ZTF_g", "zr": "ZTF_r", "zi": "ZTF_i"}[fc]}
        for k, v in values.items():
            if k not in drop:
                hdr[k] = v
        base = f"{DATA}/sci/{ffd[:4]}/{ffd[4:8]}/{ffd[8:]}/ztf_{ffd}_{field:06d}_{fc}_c{ccd:02d}_o_q{qid}_"
        self.files[base + "sciimg.fits"] = (sci.astype(np.float32), hdr, w)
        self.files[base + "mskimg.fits"] = (bits, fits.Header(), w)
        if with_psf:
            if even_psf:
                psf = moffat_image((24, 24), 11.5, 11.5, smat(SCI_PSF), SCI_PSF[3])
            else:
                psf = moffat_psf(smat(SCI_PSF), SCI_PSF[3], size=25)
            self.files[base + "sciimgdaopsfcent.fits"] = ((psf * 3.7).astype(np.float32), fits.Header(), None)
        row = {"field": field, "ccdid": ccd, "qid": qid, "rcid": 4 * (ccd - 1) + qid - 1, "fid": "gri".index(fc[1]) + 1,
               "filtercode": fc, "pid": 1000 + seed, "expid": 2000 + seed, "imgtypecode": "o",
               "obsdate": Time(start, format="mjd").iso + "+00", "obsjd": f"{start + 2400000.5:.7f}",
               "exptime": EXPTIME, "filefracday": ffd, "seeing": 2.2, "airmass": 1.2, "maglimit": 20.5,
               "infobits": infobits, "ipac_pub_date": "2022-01-01 00:00:00+00"}
        if in_metadata:
            self.sci_rows.append((row, w))
        eid = f"{ffd}_{field:06d}_{fc}_c{ccd:02d}_q{qid}"
        self.truth[eid] = {"model": model, "noSN": render(w, SCI_PSF, zp, None), "sci": sci, "wcs": w,
                           "start": start, "zp": zp, "base": base, "row": row}
        return eid

    def add_reference(self, *, field=600, ccd=5, qid=2, fc="zr", target_px=(60.0, 67.1), zp=26.0, seed=100,
                      rfid=777, drop=()):
        w = quad_wcs(target_px)
        model = render(w, REF_PSF, zp, None)
        var = (np.maximum(model, 0) / GAIN + (READNOI / GAIN) ** 2) / REF_NFRAMES
        img = model + np.random.default_rng(seed).normal(size=model.shape) * np.sqrt(var)
        hdr = fits.Header()
        for k, v in {"MAGZP": zp, "NFRAMES": REF_NFRAMES}.items():
            if k not in drop:
                hdr[k] = v
        f6 = f"{field:06d}"
        base = f"{DATA}/ref/{f6[:3]}/field{f6}/{fc}/ccd{ccd:02d}/q{qid}/ztf_{f6}_{fc}_c{ccd:02d}_q{qid}_"
        self.files[base + "refimg.fits"] = (img.astype(np.float32), hdr, w)
        self.files[base + "refunc.fits"] = (np.sqrt(var).astype(np.float32), fits.Header(), w)
        self.ref_rows.append(({"field": field, "ccdid": ccd, "qid": qid, "rcid": 4 * (ccd - 1) + qid - 1,
                              "fid": "gri".index(fc[1]) + 1, "filtercode": fc, "rfid": rfid, "nframes": REF_NFRAMES,
                              "maglimit": 21.5, "startobsdate": "2018-03-20 05:00:00+00",
                              "endobsdate": "2018-06-19 05:00:00+00"}, w))
        return {"model": model, "var": var, "wcs": w, "zp": zp, "base": base}

    # -- serving -------------------------------------------------------------------------
    @staticmethod
    def _contains(w: WCS, ra: float, dec: float) -> bool:
        x, y = (float(v) for v in w.world_to_pixel(SkyCoord(ra, dec, unit="deg")))
        return -0.5 <= x <= NQ - 0.5 and -0.5 <= y <= NQ - 0.5

    def _search(self, req, rows) -> Reply:
        ra, dec = (float(v) for v in req.query["POS"].split(","))
        assert req.query.get("INTERSECT") == "CENTER" and req.query.get("ct") == "csv"
        hits = [row for row, w in rows if self._contains(w, ra, dec)]
        buf = io.StringIO()
        cols = list(rows[0][0]) if rows else ["field", "ccdid", "qid", "filtercode"]
        writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        writer.writeheader()
        writer.writerows(hits)
        return Reply(200, buf.getvalue().encode(), "text/csv")

    def _data(self, req) -> Reply:
        if req.path not in self.files:
            return Reply(404, f"{req.path} not found".encode(), "text/plain")
        data, meta, w = self.files[req.path]
        if "center" not in req.query:
            hdr = meta.copy()
            if w is not None:
                hdr.update(w.to_header())
            return Reply(200, fits_bytes(data, hdr), "image/fits")
        assert req.query.get("gzip") == "false"
        ra, dec = (float(v) for v in req.query["center"].split(","))
        n = int(req.query["size"].removesuffix("px"))
        try:
            cut = Cutout2D(data, SkyCoord(ra, dec, unit="deg"), (n, n), wcs=w, mode="trim")
        except NoOverlapError:
            return Reply(400, b"cutout does not intersect the image", "text/plain")
        hdr = meta.copy()
        hdr.update(cut.wcs.to_header())
        return Reply(200, fits_bytes(np.ascontiguousarray(cut.data), hdr), "image/fits")


@pytest.fixture
def irsa(archive_server, survey_env, monkeypatch):
    monkeypatch.setenv("TRANSCENE_ZTF_URL", archive_server.url)
    return FakeIrsa(archive_server)


def adapter():
    # no rate limit: the tests send ~30 requests
    return make_adapter("ztf", descriptors=DESCRIPTORS, config={}, client=HttpClient(policy=POLICY))


def sci_ref(irsa, eid) -> EpochRef:
    refs = adapter().query(TARGET, size_pix=64)
    return next(r for r in refs if r.exposure_id == eid)


def cutout_origin(ep, truth) -> tuple[int, int]:
    """Integer offset of the epoch's pixel grid in the quadrant, from the returned WCS."""
    qx, qy = (float(v) for v in truth["wcs"].world_to_pixel(TARGET))
    ex, ey = (float(v) for v in ep.wcs.world_to_pixel(TARGET))
    ox, oy = qx - ex, qy - ey
    assert ox == pytest.approx(round(ox), abs=1e-6) and oy == pytest.approx(round(oy), abs=1e-6)
    return int(round(ox)), int(round(oy))


# ------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------


def test_product_urls_and_exposure_ids():
    row = {"filefracday": "20180329141887", "field": "719", "filtercode": "zr", "ccdid": "10",
           "imgtypecode": "o", "qid": "3", "rfid": "123"}
    base = "https://irsa.ipac.caltech.edu/ibe/data/ztf/products"
    assert ztf.sci_product_base(base, row) + "sciimg.fits" == (
        base + "/sci/2018/0329/141887/ztf_20180329141887_000719_zr_c10_o_q3_sciimg.fits")
    assert ztf.ref_product_base(base + "/", row) + "refimg.fits" == (
        base + "/ref/000/field000719/zr/ccd10/q3/ztf_000719_zr_c10_q3_refimg.fits")
    assert ztf.science_exposure_id(row) == "20180329141887_000719_zr_c10_q3"
    assert ztf.reference_exposure_id(row) == "ref_000719_zr_c10_q3_123"
    with pytest.raises(ServiceChanged, match="filefracday"):
        ztf.sci_product_base(base, row | {"filefracday": "2018-03-29"})


def test_search_and_cutout_params():
    p = ztf.search_params(150.1, 2.2, filtercodes=["zr", "zg"], jd_start=2459000.5, jd_end=2459100.5)
    assert p["POS"] == "150.1000000,2.2000000" and p["INTERSECT"] == "CENTER" and p["ct"] == "csv"
    assert p["WHERE"] == "filtercode IN ('zg','zr') AND obsjd>=2459000.500000 AND obsjd<=2459100.500000"
    assert "WHERE" not in ztf.search_params(1.0, 2.0, filtercodes=["zg", "zr", "zi"])
    assert ztf.cutout_params(150.1, -2.5, 64) == {"center": "150.1000000,-2.5000000", "size": "64px", "gzip": "false"}


def test_parse_ibe_csv():
    url = "http://x/ibe/search/ztf/products/sci"
    assert ztf.parse_ibe_csv(b"field,ccdid,qid,filtercode\n", ztf.REF_COLUMNS, url) == []
    assert ztf.parse_ibe_csv(b"", ztf.REF_COLUMNS, url) == []
    rows = ztf.parse_ibe_csv(b"field,ccdid,qid,filtercode,x\n600,5,2,zr, 1 \n", ztf.REF_COLUMNS, url)
    assert rows == [{"field": "600", "ccdid": "5", "qid": "2", "filtercode": "zr", "x": "1"}]
    with pytest.raises(ServiceChanged, match=r"sci: IBE table lacks column\(s\) qid"):
        ztf.parse_ibe_csv(b"field,ccdid,filtercode\n600,5,zr\n", ztf.REF_COLUMNS, url)
    with pytest.raises(ServiceChanged, match="expected an IBE CSV table"):
        ztf.parse_ibe_csv(b"<html><body>maintenance</body></html>", ztf.REF_COLUMNS, url)


def test_mask_bits():
    for bit in range(13):
        assert ztf.bad_pixels(np.array([1 << bit]))[0] == (bit not in (1, 11)), bit
    assert ztf.bad_pixels(np.array([(1 << 1) | (1 << 11), (1 << 1) | (1 << 8), 0])).tolist() == [False, True, False]


def test_variance_and_zero_point():
    sci = np.array([-50.0, 0.0, 620.0])
    assert ztf.science_variance(sci, 6.2, 12.4).tolist() == pytest.approx([4.0, 4.0, 104.0])
    from transcene.epoch import Epoch

    ep = Epoch(image=np.zeros((3, 3)), variance=np.ones((3, 3)), mask=np.zeros((3, 3), bool),
               psf=np.ones((1, 1)), wcs=WCS(naxis=2), mjd=0.0, band="ztfr", zeropoint=26.3)
    # m = zp - 2.5 log10(DN) and 1 nJy is AB 31.4: 1 DN is 10**(0.4 * 5.1) nJy
    assert ep.njy_per_unit == pytest.approx(10 ** (0.4 * 5.1))
    assert 1000 * ep.njy_per_unit == pytest.approx(njy(26.3 - 7.5))


def test_centre_psf_odd_even_and_bad():
    odd = moffat_psf(smat(SCI_PSF), SCI_PSF[3], size=25) * 5.0
    got = ztf.centre_psf(odd)
    assert got.shape == (25, 25) and got.sum() == pytest.approx(1.0)
    assert np.allclose(got, odd / odd.sum())
    even = moffat_image((24, 24), 11.5, 11.5, smat(SCI_PSF), SCI_PSF[3])
    got = ztf.centre_psf(even)
    assert got.shape == (23, 23) and got.sum() == pytest.approx(1.0)
    yy, xx = np.mgrid[:23, :23]
    core = np.clip(got[8:15, 8:15], 0, None)
    assert (core * xx[8:15, 8:15]).sum() / core.sum() == pytest.approx(11.0, abs=0.01)
    assert (core * yy[8:15, 8:15]).sum() / core.sum() == pytest.approx(11.0, abs=0.01)
    assert psf_fwhm(got) == pytest.approx(psf_fwhm(odd), rel=0.02)
    with pytest.raises(ProductError, match="non-finite"):
        ztf.centre_psf(np.where(odd > odd.max() / 2, np.nan, odd), "http://x/psf.fits")
    with pytest.raises(ProductError, match="2-D"):
        ztf.centre_psf(np.ones(9))


def test_mid_exposure_mjd():
    start = 59400.4015280
    iso = Time(start, format="mjd", scale="utc").isot
    half = 15.0 / 86400
    assert ztf.mid_exposure_mjd({"DATE-OBS": iso, "OBSMJD": start}, 30.0, "x") == pytest.approx(start + half, abs=2e-8)
    assert ztf.mid_exposure_mjd({"DATE-OBS": iso, "OBSMJD": start + half}, 30.0, "x") == pytest.approx(
        start + half, abs=1e-9)
    assert ztf.mid_exposure_mjd({"OBSMJD": start}, 30.0, "x") == pytest.approx(start + half, abs=2e-8)
    with pytest.raises(SurveyError, match="neither DATE-OBS nor OBSMJD"):
        ztf.mid_exposure_mjd({"EXPTIME": 30.0}, 30.0, "http://x/sciimg.fits")


def test_psf_from_stars_recovers_known_width():
    w = quad_wcs((60.0, 67.0))
    model = render(w, REF_PSF, 26.0, None)
    var = (np.maximum(model, 0) / GAIN + (READNOI / GAIN) ** 2) / REF_NFRAMES
    img = model + np.random.default_rng(5).normal(size=model.shape) * np.sqrt(var)
    psf, info = ztf.psf_from_stars(img, var, np.zeros(img.shape, bool), exclude_xy=(60.0, 67.0))
    truth = moffat_psf(smat(REF_PSF), REF_PSF[3], size=25)
    assert info["n_stars"] >= 6
    assert psf.shape == (25, 25) and psf.sum() == pytest.approx(1.0)
    assert psf_fwhm(psf) == pytest.approx(psf_fwhm(truth), rel=0.03)
    assert np.abs(psf - truth).sum() < 0.05
    with pytest.raises(SurveyError, match="need 3"):
        ztf.psf_from_stars(np.full((80, 80), SKY) + np.random.default_rng(1).normal(size=(80, 80)),
                           np.ones((80, 80)), np.zeros((80, 80), bool), what="http://x/refimg.fits")


# ------------------------------------------------------------------------------------------
# query
# ------------------------------------------------------------------------------------------


def standard_archive(irsa):
    eids = [irsa.add_science(ffd=f"2021070{d}40{d}528", fc=fc, seed=d, zp=26.3 + 0.01 * d)
            for d, fc in [(1, "zr"), (2, "zg"), (3, "zr"), (4, "zg"), (5, "zr"), (6, "zr")]]
    irsa.add_science(ffd="20210708401528", fc="zr", seed=9, infobits=1 << 25)
    irsa.add_reference(fc="zr")
    irsa.add_reference(fc="zg", seed=101)
    irsa.add_reference(fc="zi", seed=102)  # no science epoch in zi: not listed
    return eids


def test_query_lists_science_and_references(irsa):
    eids = standard_archive(irsa)
    refs = adapter().query(TARGET, size_pix=64)
    sci = [r for r in refs if r.kind == "science"]
    ref = [r for r in refs if r.kind == "reference"]
    assert [r.exposure_id for r in sci] == eids  # sorted by time; the infobits-bad one is left out
    assert [r.band for r in sci] == ["ztfr", "ztfg", "ztfr", "ztfg", "ztfr", "ztfr"]
    t = irsa.truth[eids[0]]
    assert sci[0].mjd == pytest.approx(t["start"] + 15 / 86400, abs=2e-7) and sci[0].timesys == "UTC"
    assert sci[0].locator["sciimg"] == irsa.server.url + t["base"] + "sciimg.fits"
    assert sorted(r.exposure_id for r in ref) == ["ref_000600_zg_c05_q2_777", "ref_000600_zr_c05_q2_777"]
    mid = 0.5 * (Time("2018-03-20T05:00:00").mjd + Time("2018-06-19T05:00:00").mjd)
    assert all(r.mjd == pytest.approx(mid) for r in ref)
    # bands and time windows: the server gets a WHERE, the adapter also filters itself
    g = adapter().query(TARGET, size_pix=64, bands=["g"])
    assert {r.band for r in g} == {"ztfg"} and sum(r.kind == "reference" for r in g) == 1
    win = adapter().query(TARGET, size_pix=64, start=sci[2].mjd - 1e-3, end=sci[3].mjd + 1e-3)
    assert [r.exposure_id for r in win if r.kind == "science"] == eids[2:4]
    wheres = [r.query.get("WHERE", "") for r in irsa.server.requests if r.path.endswith("/sci")]
    assert "filtercode IN ('zg')" in wheres[1] and "obsjd>=" in wheres[2]


def test_query_empty_table_and_south(irsa):
    standard_archive(irsa)
    a = adapter()
    assert a.query(SkyCoord(200.0, 30.0, unit="deg"), size_pix=64) == []  # header-only CSV
    assert a.covers(TARGET) and not a.covers(SkyCoord(10.0, -60.0, unit="deg"))


def test_query_missing_column_is_service_changed(irsa):
    irsa.server.route("/ibe/search/ztf/products/sci", lambda req: Reply(
        200, b"field,ccdid,qid,filtercode,imgtypecode,obsjd\n600,5,2,zr,o,2459400.9\n", "text/csv"))
    with pytest.raises(ServiceChanged, match=r"ibe/search/ztf/products/sci: IBE table lacks column\(s\) filefracday"):
        adapter().query(TARGET, size_pix=64)


def test_query_refused_is_auth_required(irsa):
    irsa.server.route("/ibe/search/ztf/products/sci", lambda req: Reply(401, b"login", "text/plain"))
    with pytest.raises(AuthRequired, match="TRANSCENE_ZTF_USER"):
        adapter().query(TARGET, size_pix=64)


# ------------------------------------------------------------------------------------------
# fetch: science
# ------------------------------------------------------------------------------------------


def check_science_epoch(ep, truth, *, flux_sigmas=4.0):
    """Pixels, WCS, mask, variance and calibration of a fetched epoch against the truth."""
    ox, oy = cutout_origin(ep, truth)
    ny, nx = ep.shape
    sl = (slice(oy, oy + ny), slice(ox, ox + nx))
    sci = truth["sci"][sl]
    good = ~ep.mask
    assert np.array_equal(ep.image[good], sci.astype(np.float32)[good])  # same pixels where the WCS says
    # mask: NaN and saturated pixels and the noisy column (bit 4); source bits 1 and 11 are kept
    assert ep.mask[~np.isfinite(sci)].all() and ep.mask[sci >= SATURATE].all()
    assert np.all(np.isinf(ep.variance[ep.mask])) and np.all(ep.image[ep.mask] == ep.image[ep.mask])
    tx, ty = (float(v) for v in ep.wcs.world_to_pixel(TARGET))
    assert not ep.mask[int(round(ty)), int(round(tx))]
    # variance: normalised residuals about the noiseless truth have unit scatter
    chi = ((ep.image - truth["model"][sl]) / np.sqrt(ep.variance))[good]
    assert np.std(chi) == pytest.approx(1.0, abs=0.03)
    # flux of the transient in nJy: PSF-weighted fit at the WCS position on image - (sky+host+stars)
    psf = moffat_image(ep.shape, tx, ty, smat(SCI_PSF), SCI_PSF[3])
    w = np.where(good, 1.0 / ep.variance, 0.0)
    d = ep.image - truth["noSN"][sl]
    flux = (psf * d * w).sum() / (psf**2 * w).sum()
    err = 1.0 / math.sqrt((psf**2 * w).sum())
    assert abs(flux * ep.njy_per_unit - njy(SN_MAG)) < flux_sigmas * err * ep.njy_per_unit
    assert err / flux < 0.02  # the test can tell a 5 % error
    # PSF, calibration, time
    assert ep.psf.shape[0] % 2 == 1 and ep.psf.sum() == pytest.approx(1.0)
    assert ep.zeropoint == truth["zp"] and ep.mjd == pytest.approx(truth["start"] + 15 / 86400, abs=2e-8)
    assert ep.timesys == "UTC" and ep.gain == GAIN and ep.saturate == SATURATE and not ep.is_reference


def test_fetch_science_ground_truth(irsa):
    eids = standard_archive(irsa)
    ref = sci_ref(irsa, eids[0])
    (ep,) = adapter().fetch(ref, TARGET, size_pix=64)
    assert ep.shape == (64, 64) and ep.band == "ztfr" and ep.survey == "ztf" and ep.exposure_id == eids[0]
    check_science_epoch(ep, irsa.truth[eids[0]])
    assert ep.mask.sum() >= 64 + 2  # the column, the saturated and the NaN pixel
    assert ep.psf.shape == (25, 25)
    cut = [r for r in irsa.server.requests if r.path.endswith("sciimg.fits")][-1]
    assert cut.query == {"center": "150.1000000,2.2000000", "size": "64px", "gzip": "false"}


def test_fetch_science_even_psf_and_clipped_cutout(irsa):
    # the target 9 px from the quadrant's left edge: IRSA returns a clipped, off-centre cutout
    eid = irsa.add_science(target_px=(9.2, 70.4), even_psf=True, seed=3)
    (ep,) = adapter().fetch(sci_ref(irsa, eid), TARGET, size_pix=64)
    assert ep.shape[0] == 64 and ep.shape[1] < 50
    tx, _ = (float(v) for v in ep.wcs.world_to_pixel(TARGET))
    assert tx == pytest.approx(9.2, abs=1e-6)  # off-centre, and the WCS says where
    check_science_epoch(ep, irsa.truth[eid])
    assert ep.psf.shape == (23, 23)


def test_fetch_target_outside_the_cutout(irsa):
    # the metadata claims the image; the returned (clipped) cutout does not contain the target
    eid = irsa.add_science(target_px=(-20.0, 60.0), in_metadata=False)
    base = irsa.server.url + irsa.truth[eid]["base"]
    ref = EpochRef("ztf", eid, "ztfr", 59400.4, locator={"sciimg": base + "sciimg.fits", "mskimg": base + "mskimg.fits",
                                                          "psf": base + "sciimgdaopsfcent.fits", "exptime": 30.0})
    with pytest.raises(SurveyError, match=r"sciimg.fits\?center=.*outside the 12x\d+ cutout"):
        adapter().fetch(ref, TARGET, size_pix=64)
    # no overlap at all: IRSA answers HTTP 400
    eid = irsa.add_science(ffd="20210709401528", target_px=(-80.0, 60.0), in_metadata=False)
    base = irsa.server.url + irsa.truth[eid]["base"]
    ref = EpochRef("ztf", eid, "ztfr", 59400.4, locator={"sciimg": base + "sciimg.fits", "mskimg": base + "mskimg.fits",
                                                          "psf": base + "sciimgdaopsfcent.fits", "exptime": 30.0})
    with pytest.raises(SurveyError, match="does not intersect the image"):
        adapter().fetch(ref, TARGET, size_pix=64)


def cache_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_fetch_html_page_instead_of_fits(irsa, survey_env):
    eids = standard_archive(irsa)
    ref = sci_ref(irsa, eids[1])
    path = irsa.truth[eids[1]]["base"] + "mskimg.fits"
    irsa.server.route(path, lambda req: html_error(200))
    with pytest.raises(ProductError, match="mskimg.fits.*expected FITS, got an HTML"):
        adapter().fetch(ref, TARGET, size_pix=64)
    assert not any("mskimg" in str(p) or p.name.startswith(".part") for p in cache_files(survey_env / "cache"))


def test_fetch_truncated_download(irsa, survey_env):
    eids = standard_archive(irsa)
    irsa.server.truncate(prefix=irsa.truth[eids[2]]["base"] + "sciimg.fits")
    # requests sees the broken promise of Content-Length; retried, then given up
    with pytest.raises(DownloadError, match=r"sciimg.fits\?center=.*IncompleteRead"):
        adapter().fetch(sci_ref(irsa, eids[2]), TARGET, size_pix=64)
    assert not any(p.suffix == ".fits" or p.name.startswith(".part") for p in cache_files(survey_env / "cache"))


def test_fetch_missing_psf_or_zero_point(irsa):
    no_psf = irsa.add_science(with_psf=False)
    no_zp = irsa.add_science(ffd="20210710401528", drop=("MAGZP",))
    with pytest.raises(DownloadError, match=r"sciimgdaopsfcent.fits: HTTP 404"):
        adapter().fetch(sci_ref(irsa, no_psf), TARGET, size_pix=64)
    with pytest.raises(SurveyError, match=r"sciimg.fits\?center=.*header keyword MAGZP is missing; expected the AB"):
        adapter().fetch(sci_ref(irsa, no_zp), TARGET, size_pix=64)


def test_fetch_without_gain_and_readnoise_falls_back(irsa, caplog):
    eid = irsa.add_science(drop=("GAIN", "READNOI", "DATE-OBS"), seed=11)
    with caplog.at_level(logging.WARNING, logger="transcene.surveys.ztf"):
        (ep,) = adapter().fetch(sci_ref(irsa, eid), TARGET, size_pix=64)
    assert "nominal 6.20 e-/DN" in caplog.text and "read noise" in caplog.text
    check_science_epoch(ep, irsa.truth[eid])  # OBSMJD alone gives the same mid-exposure time


# ------------------------------------------------------------------------------------------
# fetch: reference
# ------------------------------------------------------------------------------------------


def test_fetch_reference(irsa):
    irsa.add_science()
    truth = irsa.add_reference()
    refs = adapter().query(TARGET, size_pix=96)
    (r,) = [r for r in refs if r.kind == "reference"]
    (ep,) = adapter().fetch(r, TARGET, size_pix=96)
    assert ep.is_reference and ep.band == "ztfr" and ep.zeropoint == 26.0 and ep.shape == (96, 96)
    assert ep.mjd == pytest.approx(r.mjd) and math.isfinite(ep.mjd)
    ox, oy = cutout_origin(ep, truth)
    sl = (slice(oy, oy + 96), slice(ox, ox + 96))
    assert np.allclose(ep.variance, truth["var"][sl], rtol=1e-5)  # refunc^2
    chi = (ep.image - truth["model"][sl]) / np.sqrt(ep.variance)
    assert np.std(chi) == pytest.approx(1.0, abs=0.03)
    fw_true = psf_fwhm(moffat_psf(smat(REF_PSF), REF_PSF[3], size=25))
    assert psf_fwhm(ep.psf) == pytest.approx(fw_true, rel=0.03)
    # the reference PSF is not the science one (2.2 vs 2.75 px): the estimate tells them apart
    assert abs(psf_fwhm(ep.psf) - psf_fwhm(moffat_psf(smat(SCI_PSF), SCI_PSF[3], size=25))) > 0.3
    # flux scale: a field star in nJy from the reference matches its magnitude
    dra, ddec, mag = STARS[1]
    c = SkyCoord(TARGET.ra.deg + dra / 3600 / math.cos(TARGET.dec.rad), TARGET.dec.deg + ddec / 3600, unit="deg")
    sx, sy = (float(v) for v in ep.wcs.world_to_pixel(c))
    model_star = moffat_image(ep.shape, sx, sy, smat(REF_PSF), REF_PSF[3])
    d = ep.image - SKY
    near = np.hypot(*np.meshgrid(np.arange(96) - sx, np.arange(96) - sy)) < 6
    f = (model_star * d)[near].sum() / (model_star**2)[near].sum()
    assert f * ep.njy_per_unit == pytest.approx(njy(mag), rel=0.02)


def test_fetch_reference_missing_zero_point(irsa):
    irsa.add_science()
    irsa.add_reference(drop=("MAGZP",))
    (r,) = [r for r in adapter().query(TARGET, size_pix=48) if r.kind == "reference"]
    with pytest.raises(SurveyError, match=r"refimg.fits\?center=.*MAGZP is missing"):
        adapter().fetch(r, TARGET, size_pix=48)


# ------------------------------------------------------------------------------------------
# the driver, with failures
# ------------------------------------------------------------------------------------------


def test_fetch_epochs_with_failures_leaves_a_clean_cache(irsa, survey_env):
    eids = standard_archive(irsa)
    irsa.server.fail_fraction(0.2, prefix=DATA + "/sci/")
    kw = dict(surveys=["ztf"], size_pix=40, descriptors=DESCRIPTORS, policy=POLICY, config={})
    report = fetch_epochs(TARGET, adapters={"ztf": adapter()}, **kw)
    failed = {f.exposure_id for f in report.failures}
    assert failed and failed < set(eids)  # some, not all
    assert all(f.error == "DownloadError" and "HTTP 503" in f.reason and DATA + "/sci/" in f.reason
               for f in report.failures)
    got = {e.exposure_id for e in report.epochs}
    assert got == (set(eids) - failed) | {"ref_000600_zr_c05_q2_777", "ref_000600_zg_c05_q2_777"}
    root = survey_env / "cache"
    files = cache_files(root)
    assert not any(".part" in str(p) for p in files)
    for p in files:
        if p.suffix == ".fits":
            with fits.open(p) as hdul:
                hdul.verify("exception")
            if "epochs" in p.parts:
                assert read_epoch(p).exposure_id in got
    # a second run reads the good epochs from the cache and fails the same ones again
    n = irsa.server.count(DATA)
    again = fetch_epochs(TARGET, adapters={"ztf": adapter()}, **kw)
    assert again.n_cached == len(got) and {f.exposure_id for f in again.failures} == failed
    assert irsa.server.count(DATA) - n <= 3 * 2 * len(failed)


def test_descriptor_rate_limit_reaches_the_client(survey_env):
    a = make_adapter("ztf", descriptors=DESCRIPTORS, config={})
    assert a.ctx.client.rate_limit_per_s == DESCRIPTORS["ztf"].rate_limit_per_s > 0
    assert DESCRIPTORS["ztf"].bands == ("ztfg", "ztfr", "ztfi")


@pytest.mark.remote_data
def test_live_irsa_sn2021rhu(survey_env):
    """One public r-band epoch of SN 2021rhu (NGC 7814) from the real IRSA."""
    coord = SkyCoord(0.814293, 16.1456989, unit="deg")  # alert candidate position (../shared/data)
    a = make_adapter("ztf", config={})
    refs = a.query(coord, size_pix=32, bands=["ztfr"], start=59396.0, end=59397.0)
    sci = [r for r in refs if r.kind == "science"]
    assert sci and all(r.band == "ztfr" for r in sci)
    (ep,) = a.fetch(sci[0], coord, size_pix=32)
    assert 20 < ep.zeropoint < 30 and ep.psf.sum() == pytest.approx(1.0)
