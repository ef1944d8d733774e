"""Legacy Surveys adapter (transcene/surveys/legacy.py) against synthetic viewer products.

The products follow the viewer's formats (legacysurvey/imagine ``exposures_common`` and
``write_cutout``): an exposures-tgz tarball ``data_<ra>_<dec>/{images,calib/psfex}/...`` plus
``survey-ccds-cutout.fits.gz``, a ``subimage`` coadd cutout (image + invvar HDU per brick and
band) in nanomaggies, and a coadd-psf file (one HDU per band). Each holds a point source of known
AB magnitude, so the tests check fluxes, positions and variances against ground truth.
"""

from __future__ import annotations

import gzip
import io
import math
import tarfile

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from archive_server import Reply, html_error
from transcene.surveys import (HttpClient, NoCoverage, ProductError, RetryPolicy, ServiceChanged, SurveyError,
                               fetch_epochs, make_adapter)
from transcene.surveys.legacy import (DQ_BITS, canonical_band, ccd_zeropoint, dq_mask, exposure_id, is_north,
                                      nanomaggy_to_njy, psfex_eval, psfex_psf_from_hdul)

RA, DEC = 150.1, 2.2
TARGET = SkyCoord(RA, DEC, unit="deg")
MAG = 19.0                      # injected AB magnitude
NJY = 10 ** (-0.4 * (MAG - 31.4))
SIGMA_PSF = 1.3                 # px
POLICY = RetryPolicy(attempts=2, backoff_s=0.01, budget_s=5)
CAMERAS = {"decam": {"band_prefix": "decam", "zp_adds_exptime": True},
           "mosaic": {"band_prefix": "mzls", "zp_adds_exptime": False},
           "90prime": {"band_prefix": "bass", "zp_adds_exptime": False}}


# ---------------------------------------------------------------------------- synthesis


def tan_header(crval, crpix, scale_arcsec=0.262) -> fits.Header:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = crval
    w.wcs.crpix = crpix
    w.wcs.cd = np.array([[-scale_arcsec / 3600, 0], [0, scale_arcsec / 3600]])
    return w.to_header()


def gaussian(shape, x0, y0, sigma=SIGMA_PSF):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    g = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    return g / (2 * np.pi * sigma**2)


def target_xy(header):
    return (float(v) for v in WCS(header).world_to_pixel(TARGET))


def psf_stamp(n=25):
    return gaussian((n, n), n // 2, n // 2).astype(np.float32) * 7.0  # not normalised, like the server's


def psfex_file(stamp=None, **override) -> bytes:
    """legacypipe merged-PSFEx row with a constant model (POLNAXIS 0), as exposures-tgz writes it."""
    stamp = psf_stamp() if stamp is None else stamp
    n = stamp.shape[0]
    vals = dict(expnum=123456, ccdname="N4", polnaxis=0, poldeg1=0, polzero1=0.0, polzero2=0.0, polscal1=1.0,
                polscal2=1.0, psf_samp=1.0, psfaxis1=n, psfaxis2=n, psfaxis3=1)
    vals.update(override)
    cols = [fits.Column(name="psf_mask", format=f"{n * n}E", dim=f"({n},{n},1)", array=stamp[None, None])]
    for k, v in vals.items():
        fmt = "J" if isinstance(v, int) else ("D" if isinstance(v, float) else "8A")
        cols.append(fits.Column(name=k, format=fmt, array=np.array([v])))
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(buf)
    return buf.getvalue()


def image_file(data, header, extname) -> bytes:
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=header, name=extname)]).writeto(buf)
    return buf.getvalue()


def make_ccd(camera, expnum, ccdname, filt, *, mjd_obs, exptime, ccdzpt, crpix, shape=(40, 40), noise=2.0,
             seed=0, with_psf=True):
    """One CCD's members + table row; the source has AB magnitude MAG in this CCD's units."""
    rng = np.random.default_rng(seed)
    hdr = tan_header([RA, DEC], crpix)
    zp = ccdzpt + (2.5 * math.log10(exptime) if camera == "decam" else 0.0)
    flux_units = 10 ** (-0.4 * (MAG - zp))
    x0, y0 = target_xy(hdr)
    img = flux_units * gaussian(shape, x0, y0) + rng.normal(0, noise, shape)
    ivar = np.full(shape, 1 / noise**2, np.float32)
    dq = np.zeros(shape, np.int16)
    dq[0, :] = DQ_BITS["edge"]
    dq[5, 5] = DQ_BITS["cr"]
    dq[6, 6] = DQ_BITS["trans"]     # kept: it may flag the transient itself
    ivar[1, :] = 0                  # no-data row
    stem = f"{camera}-{expnum:08d}-{ccdname}"
    members = {
        f"images/{stem}-sub_ooi_.fits": image_file(img.astype(np.float32), hdr, ccdname),
        f"images/{stem}-sub_oow_.fits": image_file(ivar, hdr, ccdname),
        f"images/{stem}-sub_ood_.fits": image_file(dq, hdr, ccdname),
    }
    if with_psf:
        members[f"calib/psfex/{stem}-sub_ooi_-psfex.fits"] = psfex_file()
    row = dict(camera=camera, expnum=expnum, ccdname=ccdname, filter=filt, mjd_obs=mjd_obs, exptime=exptime,
               ccdzpt=ccdzpt, ccd_x0=100, ccd_y0=200, fwhm=3.5, sig1=0.01)
    return members, row, dict(zp=zp, x=x0, y=y0, noise=noise)


def ccd_table(rows, drop=()) -> bytes:
    cols = []
    for k in rows[0] if rows else ["camera", "expnum", "ccdname", "filter", "mjd_obs", "exptime", "ccdzpt"]:
        if k in drop:
            continue
        vals = [r[k] for r in rows]
        if k in ("camera", "ccdname", "filter"):
            cols.append(fits.Column(name=k, format="10A", array=np.array(vals, dtype="U10")))
        elif k in ("expnum", "ccd_x0", "ccd_y0"):
            cols.append(fits.Column(name=k, format="K", array=np.array(vals, dtype=np.int64)))
        else:
            cols.append(fits.Column(name=k, format="D", array=np.array(vals, dtype=float)))
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(buf)
    return gzip.compress(buf.getvalue())


def tarball(members: dict[str, bytes], table: bytes) -> bytes:
    buf = io.BytesIO()
    top = f"data_{RA:.4f}_{DEC:.4f}"
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in {**members, "survey-ccds-cutout.fits.gz": table}.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def standard_ccds():
    """decam g (target off-centre, near the cutout edge), decam r, and a decam z CCD that misses it."""
    g = make_ccd("decam", 123456, "N4", "g", mjd_obs=58000.1, exptime=90.0, ccdzpt=25.0, crpix=[9.3, 31.1], seed=1)
    r = make_ccd("decam", 123457, "S7", "r", mjd_obs=58001.2, exptime=60.0, ccdzpt=25.3, crpix=[20.5, 20.5], seed=2)
    z = make_ccd("decam", 123458, "S8", "z", mjd_obs=58002.0, exptime=80.0, ccdzpt=24.9, crpix=[-30, 20.5], seed=3)
    return [g, r, z]


def coadd_file(bands=("g", "r"), *, missing_invvar=False, outside=False) -> bytes:
    """subimage cutout: per band, brick A (target clipped near its edge) and brick B (inside)."""
    hdus = [fits.PrimaryHDU()]
    rng = np.random.default_rng(5)
    nmgy = 10 ** (-0.4 * (MAG - 22.5))
    for band in bands:
        for brick, crpix, shape in (("1501p022", [3.0, 30.0], (40, 12)), ("1500p022", [24.7, 21.2], (44, 48))):
            if outside:
                crpix = [-40.0, 20.0]
            hdr = tan_header([RA, DEC], crpix)
            x, y = target_xy(hdr)
            img = nmgy * gaussian(shape, x, y) + rng.normal(0, 0.02, shape)
            for k, v in (("BRICK", brick), ("BRICK_X0", 1000), ("BRICK_Y0", 2000), ("BAND", band),
                         ("IMAGETYP", "image")):
                hdr[k] = v
            hdus.append(fits.ImageHDU(img.astype(np.float32), header=hdr.copy()))
            if not missing_invvar:
                hdr["IMAGETYP"] = "invvar"
                hdus.append(fits.ImageHDU(np.full(shape, 1 / 0.02**2, np.float32), header=hdr.copy()))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def coadd_psf_file(bands) -> bytes:
    hdus = []
    for i, b in enumerate(bands):
        h = fits.Header()
        h["BAND"] = b
        data = gaussian((63, 63), 31, 31, 1.5).astype(np.float32)
        hdus.append(fits.PrimaryHDU(data, header=h) if i == 0 else fits.ImageHDU(data, header=h))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def serve(server, *, ccds=None, tgz=None, coadd=None, psf=True):
    ccds = standard_ccds() if ccds is None else ccds
    members = {k: v for m, _, _ in ccds for k, v in m.items()}
    body = tgz if tgz is not None else tarball(members, ccd_table([r for _, r, _ in ccds]))
    server.route("/viewer/exposures-tgz/",
                 lambda req: body if isinstance(body, Reply) else Reply(200, body, "application/gzip"))
    server.route("/viewer/fits-cutout", coadd or (lambda req: Reply(200, coadd_file((req.query["bands"],)),
                                                                      "image/fits")))
    if psf:
        server.route("/viewer/coadd-psf/", lambda req: Reply(200, coadd_psf_file(req.query["bands"]), "image/fits"))
    return ccds


@pytest.fixture
def ls(archive_server, survey_env, monkeypatch):
    monkeypatch.setenv("TRANSCENE_LS_URL", archive_server.url)
    # no rate limit against the local server (the descriptor's 1 request/s would make tests slow)
    return make_adapter("ls", client=HttpClient(policy=POLICY))


def aperture_njy(ep, r=7.0):
    x, y = (float(v) for v in ep.wcs.world_to_pixel(TARGET))
    yy, xx = np.mgrid[: ep.shape[0], : ep.shape[1]]
    sel = ((xx - x) ** 2 + (yy - y) ** 2 <= r**2) & ~ep.mask
    return float(ep.image[sel].sum() * ep.njy_per_unit)


# ---------------------------------------------------------------------------- pure functions


def test_psfex_eval_matches_hand_computed_degree2_polynomial():
    # PSFEx term order for degree 2: 1, x, x^2, y, xy, y^2
    basis = np.arange(1, 7, dtype=float)[:, None, None] * np.ones((6, 3, 3))
    x, y = 110.0, 60.0
    dx, dy = (x - 100.0) / 20.0, (y - 50.0) / 40.0     # 0.5, 0.25
    want = 1 + 2 * dx + 3 * dx**2 + 4 * dy + 5 * dx * dy + 6 * dy**2
    got = psfex_eval(basis, 2, (100.0, 50.0), (20.0, 40.0), x, y)
    assert got.shape == (3, 3)
    assert np.allclose(got, want)
    with pytest.raises(SurveyError, match="needs 6"):
        psfex_eval(basis[:3], 2, (0, 0), (1, 1), 0, 0)


def test_psfex_file_is_read_and_normalised_and_resampled():
    with fits.open(io.BytesIO(psfex_file())) as h:
        psf = psfex_psf_from_hdul(h, 10.0, 20.0, "psfex")
    assert psf.shape == (25, 25) and psf.sum() == pytest.approx(1.0)
    assert np.unravel_index(np.argmax(psf), psf.shape) == (12, 12)
    # PSF_SAMP = 0.5: sampled every half pixel -> about half the width on the image grid
    with fits.open(io.BytesIO(psfex_file(psf_samp=0.5))) as h:
        half = psfex_psf_from_hdul(h, 10.0, 20.0, "psfex")
    assert half.shape == (13, 13) and half.sum() == pytest.approx(1.0)
    assert half[6, 6] > psf[12, 12] * 3


def test_zeropoints_bands_ids_and_mask_bits():
    assert ccd_zeropoint("decam", 25.0, 100.0, CAMERAS) == pytest.approx(30.0)
    assert ccd_zeropoint("mosaic", 26.1, 100.0, CAMERAS) == pytest.approx(26.1)
    with pytest.raises(SurveyError, match="ccdzpt"):
        ccd_zeropoint("decam", 0.0, 100.0, CAMERAS)
    with pytest.raises(SurveyError, match="exptime"):
        ccd_zeropoint("decam", 25.0, 0.0, CAMERAS)
    assert canonical_band("90prime", "g", CAMERAS) == "bass_g"
    assert canonical_band("decam ", "z", CAMERAS) == "decam_z"
    assert exposure_id("decam", 123456, "N4") == "decam-00123456-N4"
    assert nanomaggy_to_njy() == pytest.approx(3631.0, rel=1e-3)
    dq = np.array([0, 1, 2, 128, 2048, 256 | 128])
    assert dq_mask(dq, ["badpix", "satur", "edge"]).tolist() == [False, True, True, False, False, True]
    with pytest.raises(SurveyError, match="unknown DQ"):
        dq_mask(dq, ["nonsense"])


def test_north_south_split():
    kw = dict(split_layers=["ls-dr9", "ls-dr10"], split_dec=32.375)
    assert is_north("ls-dr10", 180.0, 40.0, **kw)            # NGC, above the split
    assert not is_north("ls-dr10", 180.0, 30.0, **kw)        # below the split
    assert not is_north("ls-dr10", 10.0, 40.0, **kw)         # SGC (b < 0) stays south
    assert is_north("ls-dr9-north", 10.0, 0.0, **kw)
    assert not is_north("ls-dr10-south", 180.0, 40.0, **kw)


# ---------------------------------------------------------------------------- adapter against the server


def test_query_lists_ccds_and_coadds_and_downloads_the_tarball_once(ls, archive_server):
    serve(archive_server)
    refs = ls.query(TARGET, size_pix=64)
    ids = {r.exposure_id: r for r in refs}
    # the z CCD only touches the requested box: not an epoch of the target
    assert set(ids) == {"decam-00123456-N4", "decam-00123457-S7", "coadd-ls-dr10-decam_g", "coadd-ls-dr10-decam_r"}
    g = ids["decam-00123456-N4"]
    assert g.band == "decam_g" and g.kind == "science" and g.timesys == "UTC"
    assert g.mjd == pytest.approx(58000.1 + 45.0 / 86400)
    ref = ids["coadd-ls-dr10-decam_g"]
    assert ref.kind == "reference" and ref.mjd == pytest.approx(g.mjd)
    q = archive_server.requests[0].query
    assert q["layer"] == "ls-dr10" and q["size"] == "64" and float(q["ra"]) == pytest.approx(RA)
    epochs = [e for r in refs for e in ls.fetch(r, TARGET, size_pix=64)]
    assert archive_server.count("/viewer/exposures-tgz/") == 1
    assert len(epochs) == 4
    # band and time filters
    assert {r.band for r in ls.query(TARGET, size_pix=64, bands=["r"])} == {"decam_r"}
    assert [r.exposure_id for r in ls.query(TARGET, size_pix=64, start=58001.0) if r.kind == "science"] == \
        ["decam-00123457-S7"]


def test_ccd_epoch_has_the_injected_flux_position_variance_and_mask(ls, archive_server):
    ccds = serve(archive_server)
    refs = {r.exposure_id: r for r in ls.query(TARGET, size_pix=64)}
    truth = ccds[0][2]
    [ep] = ls.fetch(refs["decam-00123456-N4"], TARGET, size_pix=64)
    assert ep.zeropoint == pytest.approx(25.0 + 2.5 * math.log10(90.0))
    assert ep.band == "decam_g" and not ep.is_reference and ep.survey == "ls"
    assert ep.exposure_id == "decam-00123456-N4" and ep.timesys == "UTC"
    x, y = (float(v) for v in ep.wcs.world_to_pixel(TARGET))
    assert (x, y) == pytest.approx((truth["x"], truth["y"]), abs=1e-6)
    assert (x, y) == pytest.approx((8.3, 30.1), abs=1e-6)          # off-centre, as clipped at a CCD edge
    noise_njy = truth["noise"] * ep.njy_per_unit * math.sqrt(math.pi * 49)
    assert aperture_njy(ep) == pytest.approx(NJY, abs=4 * noise_njy)
    good = ~ep.mask
    assert np.allclose(ep.variance[good], truth["noise"] ** 2)
    assert np.isinf(ep.variance[1]).all() and ep.mask[1].all()     # ivar 0 row
    assert ep.mask[0].all() and ep.mask[5, 5] and not ep.mask[6, 6]  # edge, cr masked; trans kept
    assert ep.psf.shape == (25, 25) and ep.psf.sum() == pytest.approx(1.0)


def test_coadd_reference_picks_the_brick_holding_the_target_in_nanomaggies(ls, archive_server):
    serve(archive_server)
    ref = next(r for r in ls.query(TARGET, size_pix=64) if r.exposure_id == "coadd-ls-dr10-decam_g")
    [ep] = ls.fetch(ref, TARGET, size_pix=64)
    assert ep.is_reference and ep.zeropoint == 22.5 and ep.band == "decam_g"
    assert ep.njy_per_unit == pytest.approx(3631.0, rel=1e-3)
    assert ep.shape == (44, 48)                                   # brick B, not the clipped brick A
    x, y = (float(v) for v in ep.wcs.world_to_pixel(TARGET))
    assert (x, y) == pytest.approx((23.7, 20.2), abs=1e-6)
    assert aperture_njy(ep) == pytest.approx(NJY, rel=0.05)
    assert np.allclose(ep.variance, 0.02**2) and not ep.mask.any()
    assert ep.psf.shape == (63, 63) and ep.psf.sum() == pytest.approx(1.0)
    q = next(r.query for r in archive_server.requests if r.path == "/viewer/fits-cutout")
    assert "subimage" in q and q["bands"] == "g" and q["layer"] == "ls-dr10"


def test_coadd_is_reference_can_be_switched_off(archive_server, survey_env, monkeypatch):
    monkeypatch.setenv("TRANSCENE_LS_URL", archive_server.url)
    config = {"surveys": {"ls": {"coadd_is_reference": False}}}
    adapter = make_adapter("ls", client=HttpClient(policy=POLICY), config=config)
    serve(archive_server)
    ref = next(r for r in adapter.query(TARGET, size_pix=64) if r.kind == "reference")
    [ep] = adapter.fetch(ref, TARGET, size_pix=64)
    assert not ep.is_reference and math.isfinite(ep.mjd)


def test_html_page_instead_of_the_tarball_is_a_product_error(ls, archive_server):
    serve(archive_server, tgz=html_error(200))
    with pytest.raises(ProductError, match="HTML"):
        ls.query(TARGET, size_pix=64)
    assert not list(ls.ctx.cache.root.rglob("*.tgz"))


def test_html_page_instead_of_the_coadd_cutout(ls, archive_server):
    serve(archive_server, coadd=lambda req: html_error(200))
    ref = next(r for r in ls.query(TARGET, size_pix=64) if r.kind == "reference")
    with pytest.raises(ProductError, match="HTML"):
        ls.fetch(ref, TARGET, size_pix=64)


def test_empty_ccd_table_is_no_coverage(ls, archive_server):
    serve(archive_server, tgz=tarball({}, ccd_table([])))
    with pytest.raises(NoCoverage):
        ls.query(TARGET, size_pix=64)


def test_missing_ccd_column_is_service_changed(ls, archive_server):
    ccds = standard_ccds()
    members = {k: v for m, _, _ in ccds for k, v in m.items()}
    serve(archive_server, tgz=tarball(members, ccd_table([r for _, r, _ in ccds], drop=("ccdzpt",))))
    with pytest.raises(ServiceChanged, match="ccdzpt"):
        ls.query(TARGET, size_pix=64)


def test_missing_psf_and_missing_zero_point_fail_that_epoch_only(ls, archive_server):
    g = make_ccd("decam", 1, "N1", "g", mjd_obs=58000.0, exptime=90.0, ccdzpt=25.0, crpix=[20, 20], with_psf=False)
    r = make_ccd("decam", 2, "N2", "r", mjd_obs=58000.0, exptime=90.0, ccdzpt=0.0, crpix=[20, 20])
    serve(archive_server, ccds=[g, r])
    refs = {x.exposure_id: x for x in ls.query(TARGET, size_pix=64)}
    with pytest.raises(ProductError, match="no PSF"):
        ls.fetch(refs["decam-00000001-N1"], TARGET, size_pix=64)
    with pytest.raises(SurveyError, match="decam-00000002-N2.*ccdzpt"):
        ls.fetch(refs["decam-00000002-N2"], TARGET, size_pix=64)


def test_coadd_target_outside_and_missing_invvar_and_missing_psf_band(ls, archive_server):
    serve(archive_server, coadd=lambda req: Reply(200, coadd_file(("g",), outside=True), "image/fits"))
    ref = next(r for r in ls.query(TARGET, size_pix=64) if r.exposure_id == "coadd-ls-dr10-decam_g")
    with pytest.raises(SurveyError, match="outside"):
        ls.fetch(ref, TARGET, size_pix=64)
    serve(archive_server, coadd=lambda req: Reply(200, coadd_file(("g",), missing_invvar=True), "image/fits"))
    ref = next(r for r in ls.query(TARGET, size_pix=64) if r.exposure_id == "coadd-ls-dr10-decam_r")
    with pytest.raises(SurveyError, match="BAND='r'"):  # the server answered another band
        ls.fetch(ref, TARGET, size_pix=64)
    ref = next(r for r in ls.query(TARGET, size_pix=64) if r.exposure_id == "coadd-ls-dr10-decam_g")
    ls.ctx.cache.refresh = True
    with pytest.raises(ProductError, match="invvar"):
        ls.fetch(ref, TARGET, size_pix=64)


# a local server needs no throttling: the config's per-survey rate limit overrides the descriptor's
NO_THROTTLE = {"surveys": {"ls": {"rate_limit_per_s": 0}}}


def test_fetch_epochs_turns_failed_coadd_downloads_into_failures(archive_server, survey_env, monkeypatch):
    monkeypatch.setenv("TRANSCENE_LS_URL", archive_server.url)
    serve(archive_server)
    archive_server.fail_fraction(0.5, prefix="/viewer/fits-cutout", seed=3)
    report = fetch_epochs(TARGET, surveys=["ls"], size_pix=64, policy=POLICY, config=NO_THROTTLE)
    failed_bands = {r.query["bands"] for r in archive_server.requests
                    if r.path == "/viewer/fits-cutout"} - {
        e.band[-1] for e in report.epochs if e.is_reference}
    assert report.failures, "the seed must make at least one coadd fail"
    assert {f.exposure_id for f in report.failures} == {f"coadd-ls-dr10-decam_{b}" for b in failed_bands}
    assert all(f.kind == "reference" and "503" in f.reason for f in report.failures)
    assert {e.exposure_id for e in report.epochs} >= {"decam-00123456-N4", "decam-00123457-S7"}
    files = [p for p in (survey_env / "cache").rglob("*") if p.is_file() and p.name != "COMPLETE"]
    assert files
    for p in files:
        if p.suffix == ".tgz":
            with tarfile.open(p) as tf:
                assert tf.getmembers()
        else:
            with fits.open(p) as h:
                h.verify("exception")
    # a second run reads the epoch files and downloads nothing new
    n = len(archive_server.requests)
    again = fetch_epochs(TARGET, surveys=["ls"], size_pix=64, policy=POLICY, config=NO_THROTTLE)
    assert again.n_cached == len(report.epochs)
    assert archive_server.count("/viewer/exposures-tgz/") == 1
    # only the failed coadds are tried again
    assert {r.path for r in archive_server.requests[n:]} == {"/viewer/fits-cutout"}


@pytest.mark.remote_data
def test_live_legacy_survey_at_a_dr10_position(survey_env):
    adapter = make_adapter("ls")
    coord = SkyCoord(150.1, 2.2, unit="deg")
    refs = adapter.query(coord, size_pix=32, bands=["g"])
    assert refs
    for ref in refs[:2]:
        [ep] = adapter.fetch(ref, coord, size_pix=32)
        assert ep.psf.sum() == pytest.approx(1.0) and np.isfinite(ep.zeropoint)
