"""The Pan-STARRS1 adapter (transcene.surveys.ps1) against a synthetic ps1images server.

The server holds a 200x200 px "skycell" per product at 0.25"/px with a TAN WCS in the PS1 header
style (PC00i00j, reference pixel shifted for cutouts), stars and a host drawn with a known
elliptical Moffat PSF, a transient of known AB magnitude, Gaussian noise of known variance (the
.wt product) and a mask with named bits (MSKNUM/MSKNAMnn/MSKVALnn). fitscut.cgi cuts, and clips at
the skycell edge, like the real service.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from archive_server import Reply, html_error
from transcene.epoch import NJY_AB_ZEROPOINT
from transcene.surveys import NoCoverage, RetryPolicy, ServiceChanged, SurveyError, make_adapter
from transcene.surveys.fetch import fetch_epochs
from transcene.surveys.ps1 import (bad_pixels, companion_name, empirical_psf, find_psf_stars, fitscut_params,
                                   linearise, mask_bit_values, mid_exposure_mjd, parse_filenames_table,
                                   parse_product_name, zeropoint)
from transcene.ztf_alerts import moffat_image

PIX_DEG = 0.25 / 3600.0
N_SKY = 200
CENTRE = (150.0, 2.2)  # skycell tangent point, deg
TARGET_PIX = (96.3, 103.6)  # 0-based skycell pixel of the transient
NOISE_VAR = 16.0  # counts^2, the .wt value
EXPTIME = 45.0
FPA_ZP = 28.0
BITS = {"DETECTOR": 1, "FLAT": 2, "DARK": 4, "BLANK": 8, "CTE": 16, "SAT": 32, "CR": 64, "STARCORE": 128}
STARS = [(30, 30), (60, 25), (150, 35), (175, 70), (40, 80), (160, 120), (25, 150), (70, 170), (130, 175),
         (175, 170), (110, 40), (35, 115)]
POLICY = RetryPolicy(attempts=2, backoff_s=0.01, budget_s=5)
FITSCUT = "/cgi-bin/fitscut.cgi"
FILENAMES = "/cgi-bin/ps1filenames.py"
# small cutouts keep the test fast: 40 px stamps cropped from 160 px PSF cutouts
CONFIG = {"surveys": {"ps1": {"psf_cutout_pix": 160, "psf_max_stars": 8}}}
SIZE = 40


def _alpha(beta):
    return 1.0 / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def shape_matrix(f1, f2, rho, beta):
    a1, a2 = f1 * _alpha(beta), f2 * _alpha(beta)
    return np.array([[a1 * a1, rho * a1 * a2], [rho * a1 * a2, a2 * a2]])


def add_moffat(img, x, y, flux, smat, beta, r=24):
    """Add a pixel-integrated Moffat of ``flux`` counts at (x, y) into ``img`` (local box)."""
    ix, iy = int(round(x)), int(round(y))
    x0, y0 = max(ix - r, 0), max(iy - r, 0)
    x1, y1 = min(ix + r + 1, img.shape[1]), min(iy + r + 1, img.shape[0])
    img[y0:y1, x0:x1] += moffat_image((y1 - y0, x1 - x0), x - x0, y - y0, smat, beta, flux=flux, oversample=5)


def sky_wcs_header():
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"] = CENTRE
    h["CRPIX1"], h["CRPIX2"] = 100.5, 100.5
    h["CDELT1"], h["CDELT2"] = -PIX_DEG, PIX_DEG
    for key, val in (("PC001001", 1.0), ("PC001002", 0.0), ("PC002001", 0.0), ("PC002002", 1.0)):
        h[key] = val
    return h


def sky_wcs():
    h = sky_wcs_header()
    h.remove("PC001001"), h.remove("PC001002"), h.remove("PC002001"), h.remove("PC002002")
    return WCS(h)


def target_coord(pix=TARGET_PIX):
    ra, dec = sky_wcs().pixel_to_world_values(*pix)
    return SkyCoord(float(ra) * u.deg, float(dec) * u.deg)


@dataclasses.dataclass
class Product:
    """One skycell product: the noiseless components and the served arrays/headers."""

    truth: dict
    image: np.ndarray
    header: fits.Header
    wt: np.ndarray
    wt_header: fits.Header
    mask: np.ndarray
    mask_header: fits.Header
    psf: tuple  # (smat, beta)


def make_product(*, seed, kind="wrp", mag=19.0, fwhm=(5.0, 4.2), rho=0.2, beta=3.2, stars=STARS,
                 target_pix=TARGET_PIX, mjd=55500.25, drop=()):
    rng = np.random.default_rng(seed)
    smat = shape_matrix(*fwhm, rho, beta)
    zp = FPA_ZP + 2.5 * math.log10(EXPTIME) if kind == "wrp" else 25.0 + 2.5 * math.log10(EXPTIME)
    host = np.zeros((N_SKY, N_SKY))
    yy, xx = np.mgrid[:N_SKY, :N_SKY]
    hx, hy = target_pix[0] + 3.0, target_pix[1] - 2.0
    host += 30000.0 / (2 * np.pi * 36.0) * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / 72.0)
    transient = np.zeros_like(host)
    if mag is not None:
        add_moffat(transient, *target_pix, 10 ** (-0.4 * (mag - zp)), smat, beta)
    starimg = np.zeros_like(host)
    for i, (x, y) in enumerate(stars):
        add_moffat(starimg, x + 0.3 * (i % 3), y - 0.2 * (i % 2), 20000.0 + 3000.0 * i, smat, beta)
    noise = rng.normal(0.0, math.sqrt(NOISE_VAR), host.shape)
    linear = host + transient + starimg + noise
    hdr = sky_wcs_header()
    hdr["EXPTIME"] = EXPTIME
    hdr["MJD-OBS"] = mjd
    hdr["HIERARCH FPA.ZP"] = FPA_ZP if kind == "wrp" else 25.0
    hdr["HIERARCH FPA.FILTER"] = "g.00000"
    hdr["HIERARCH CELL.GAIN"] = 1.0
    for key in drop:
        hdr.remove(key)
    image = linear
    if kind == "stk":  # full stacks are asinh-scaled
        soft, off = 50.0, 3.0
        image = 2.5 * math.log10(math.e) * np.arcsinh((linear - off) / (2 * soft))
        hdr["BSOFTEN"], hdr["BOFFSET"] = soft, off
    mask = np.zeros(host.shape, np.int16)
    for x, y in stars:  # STARCORE on every star core: ignored by the adapter
        mask[y - 1:y + 2, x - 1:x + 2] |= BITS["STARCORE"]
    tx, ty = int(round(target_pix[0])), int(round(target_pix[1]))
    mask[ty - 1:ty + 2, tx - 1:tx + 2] |= BITS["STARCORE"]  # STARCORE on a host nucleus: ignored too
    cr = (int(target_pix[0]) - 8, int(target_pix[1]) + 6)
    mask[cr[1], cr[0]] |= BITS["CR"]
    mhdr = fits.Header()
    mhdr["MSKNUM"] = len(BITS)
    for i, (name, val) in enumerate(BITS.items()):
        mhdr[f"MSKNAM{i:02d}"] = name
        mhdr[f"MSKVAL{i:02d}"] = val
    for h in (mhdr,):
        h.update(sky_wcs_header())
    wt_hdr = sky_wcs_header()
    truth = {"host": host, "transient": transient, "stars": starimg, "noise": noise, "zp": zp, "cr": cr}
    return Product(truth, image, hdr, np.full(host.shape, NOISE_VAR), wt_hdr, mask, mhdr, (smat, beta))


def fits_bytes(data, header):
    buf = io.BytesIO()
    fits.PrimaryHDU(np.asarray(data, dtype=np.float32 if data.dtype.kind == "f" else data.dtype),
                    header=header).writeto(buf)
    return buf.getvalue()


def cut(data, header, ra, dec, size):
    """Cut like fitscut: a size x size box around (ra, dec), clipped at the skycell edge."""
    x, y = sky_wcs().world_to_pixel_values(ra, dec)
    x0, y0 = int(round(float(x))) - size // 2, int(round(float(y))) - size // 2
    xs = slice(max(x0, 0), max(min(x0 + size, N_SKY), 0))
    ys = slice(max(y0, 0), max(min(y0 + size, N_SKY), 0))
    h = header.copy()
    h["CRPIX1"] = header["CRPIX1"] - xs.start
    h.comments["CRPIX1"] = "Reference pixel shifted for cutout"
    h["CRPIX2"] = header["CRPIX2"] - ys.start
    return data[ys, xs], h


WARP_MJDS = {"g": [55200.31, 55560.41, 55930.22], "r": [55210.27, 55601.35]}


def warp_name(f, mjd):
    tok = f"{mjd:.5f}".replace(".", "_")
    return f"/rings.v3.skycell/1405/053/rings.v3.skycell.1405.053.wrp.{f}.{tok}.fits"


def stack_name(f):
    return f"/rings.v3.skycell/1405/053/rings.v3.skycell.1405.053.stk.{f}.unconv.fits"


class FakePs1:
    """Products by file name and the two routes; ``edit`` hooks let a test break one product."""

    def __init__(self, server, products=None, **kw):
        self.products = products if products is not None else default_products(**kw)
        self.table_override = None
        self.broken: dict[str, Reply] = {}
        server.route(FILENAMES, self.filenames)
        server.route(FITSCUT, self.fitscut)

    def table(self):
        lines = ["projcell subcell ra dec filter mjd type filename shortname badflag"]
        for name in self.products:
            prod = parse_product_name(name)
            mjd = float(prod.token.replace("_", ".")) if prod.kind == "wrp" else 0.0
            typ = "warp" if prod.kind == "wrp" else "stack"
            for suffix, t in (("", typ), ("wt", typ + ".wt"), ("mask", typ + ".mask")):
                fn = companion_name(name, suffix) if suffix else name
                lines.append(f"1405 053 {CENTRE[0]} {CENTRE[1]} {prod.filter} {mjd} {t} {fn} "
                             f"{fn.rsplit('/', 1)[1]} 0")
        return "\n".join(lines) + "\n"

    def filenames(self, req):
        if self.table_override is not None:
            return Reply(200, self.table_override.encode(), "text/plain")
        wanted = req.query.get("filters", "grizy")
        rows = self.table().splitlines()
        keep = [rows[0]] + [r for r in rows[1:] if r.split()[4] in wanted]
        return Reply(200, ("\n".join(keep) + "\n").encode(), "text/plain")

    def fitscut(self, req):
        red = req.query["red"]
        if red in self.broken:
            return self.broken[red]
        base = red.replace(".wt.fits", ".fits").replace(".mask.fits", ".fits")
        p = self.products.get(base)
        if p is None:
            return Reply(404, b"no such file", "text/plain")
        if red.endswith(".wt.fits"):
            data, hdr = p.wt, p.wt_header
        elif red.endswith(".mask.fits"):
            data, hdr = p.mask, p.mask_header
        else:
            data, hdr = p.image, p.header
        data, hdr = cut(data, hdr, float(req.query["ra"]), float(req.query["dec"]), int(req.query["size"]))
        return Reply(200, fits_bytes(data, hdr), "application/fits")


def default_products(**kw):
    prods = {}
    seed = 0
    for f, mjds in WARP_MJDS.items():
        for i, mjd in enumerate(mjds):
            seed += 1
            prods[warp_name(f, mjd)] = make_product(seed=seed, mjd=mjd, mag=18.5 + 0.5 * i,
                                                    fwhm=(4.6 + 0.3 * i, 4.0 + 0.2 * i), **kw)
        seed += 1
        prods[stack_name(f)] = make_product(seed=seed, kind="stk", mag=None, mjd=55800.0, fwhm=(4.4, 4.4),
                                            rho=0.0, **kw)
    return prods


@pytest.fixture
def ps1(archive_server, survey_env, monkeypatch):
    monkeypatch.setenv("TRANSCENE_PS1_URL", archive_server.url)
    return FakePs1(archive_server)


def adapter():
    return make_adapter("ps1", policy=POLICY, config=CONFIG)


def stamp_offset(sky, ep):
    """Skycell pixel of stamp pixel (0, 0), via the two WCSs (must be integers)."""
    ox, oy = sky.world_to_pixel(ep.wcs.pixel_to_world(0, 0))
    assert abs(ox - round(float(ox))) < 1e-6 and abs(oy - round(float(oy))) < 1e-6
    return int(round(float(ox))), int(round(float(oy)))


# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------


def test_parse_filenames_table_and_schema_guards():
    text = ("projcell subcell ra dec filter mjd type filename shortname badflag\n"
            f"1405 053 150.0 2.2 g 55200.31 warp {warp_name('g', 55200.31)} x.fits 0\n")
    rows = parse_filenames_table(text)
    assert rows[0]["filename"] == warp_name("g", 55200.31) and rows[0]["type"] == "warp"
    assert parse_filenames_table("projcell subcell ra dec filter mjd type filename shortname\n") == []
    with pytest.raises(ServiceChanged, match="filename"):
        parse_filenames_table("projcell subcell ra dec filter mjd type shortname\n1 2 3 4 g 5 warp x\n", "U")
    with pytest.raises(ServiceChanged, match="markup"):
        parse_filenames_table("<!DOCTYPE html><html>oops</html>")
    with pytest.raises(ServiceChanged, match="line 2"):
        parse_filenames_table("projcell subcell ra dec filter mjd type filename\n1 2 3\n")


def test_product_names_and_exposure_ids():
    w = parse_product_name(warp_name("r", 55210.27))
    assert (w.kind, w.filter, w.band, w.exposure_id) == ("wrp", "r", "ps1_r", "1405.053.r.55210_27000")
    s = parse_product_name(stack_name("z"))
    assert (s.kind, s.band, s.exposure_id) == ("stk", "ps1_z", "1405.053.z.stk")
    assert companion_name(stack_name("z"), "wt").endswith("stk.z.unconv.wt.fits")
    with pytest.raises(ServiceChanged, match="does not look like"):
        parse_product_name("/some/other/file.fits")


def test_fitscut_params():
    c = SkyCoord(150.1234567891 * u.deg, -2.5 * u.deg)
    p = fitscut_params("/a/b.fits", c, 120)
    assert p == {"red": "/a/b.fits", "format": "fits", "ra": "150.1234568", "dec": "-2.5000000", "size": 120}


def test_zeropoints_and_njy():
    h = fits.Header()
    h["EXPTIME"] = 40.0
    h["HIERARCH FPA.ZP"] = 28.2
    zp = zeropoint(h, "wrp")
    assert zp == pytest.approx(28.2 + 2.5 * math.log10(40.0))
    # 1 count at this zero point, in nJy
    assert 10 ** (-0.4 * (zp - NJY_AB_ZEROPOINT)) == pytest.approx(10 ** (-0.4 * (28.2 - 31.4)) / 40.0)
    assert zeropoint(h, "stk") == pytest.approx(25.0 + 2.5 * math.log10(40.0))
    del h["FPA.ZP"]
    with pytest.raises(ServiceChanged, match="FPA.ZP"):
        zeropoint(h, "wrp", "cutout X")
    h["EXPTIME"] = 0.0
    with pytest.raises(ServiceChanged, match="EXPTIME"):
        zeropoint(h, "stk")


def test_mid_exposure_time():
    h = fits.Header()
    h["MJD-OBS"], h["EXPTIME"] = 55000.0, 43.2
    assert mid_exposure_mjd(h) == (pytest.approx(55000.0 + 21.6 / 86400.0, abs=1e-9), "UTC")
    del h["MJD-OBS"]
    with pytest.raises(ServiceChanged, match="MJD-OBS"):
        mid_exposure_mjd(h)


def test_mask_bits_starcore_ignored():
    h = fits.Header()
    h["MSKNUM"] = len(BITS)
    for i, (name, val) in enumerate(BITS.items()):
        h[f"MSKNAM{i:02d}"], h[f"MSKVAL{i:02d}"] = name, val
    bits = mask_bit_values(h)
    assert bits["SAT"] == 32 and bits["STARCORE"] == 128
    m = np.array([0, BITS["STARCORE"], BITS["SAT"], BITS["CR"], BITS["FLAT"] | BITS["STARCORE"], 256])
    assert bad_pixels(m, bits).tolist() == [False, False, True, True, True, False]
    del h["MSKVAL03"]
    with pytest.raises(ServiceChanged, match="MSKVAL03"):
        mask_bit_values(h)
    with pytest.raises(ServiceChanged, match="MSKNUM"):
        mask_bit_values(fits.Header())
    h["MSKNUM"] = "many"
    with pytest.raises(ServiceChanged, match="not integers"):
        mask_bit_values(h)


def test_asinh_linearisation():
    h = fits.Header()
    h["BSOFTEN"], h["BOFFSET"] = 221.9, 7.17
    x = np.array([-50.0, 0.0, 10.0, 1e3, 1e5])
    v = 2.5 * math.log10(math.e) * np.arcsinh((x - 7.17) / (2 * 221.9))
    assert np.allclose(linearise(v, h), x, rtol=1e-9, atol=1e-8)
    assert linearise(x, fits.Header()) is x  # warps: untouched
    del h["BOFFSET"]
    with pytest.raises(ServiceChanged, match="BOFFSET"):
        linearise(v, h)


def test_empirical_psf_recovers_injected_moffat():
    p = make_product(seed=5, fwhm=(5.2, 4.3), rho=0.25, beta=3.0)
    img = p.truth["host"] + p.truth["stars"] + p.truth["transient"] + p.truth["noise"]
    bad = np.zeros(img.shape, bool)
    bad[150, 25] = True  # a masked pixel on the star at (25, 150) removes it from the candidates
    var = np.full(img.shape, NOISE_VAR)
    stars = find_psf_stars(img, var, bad, box=9, min_snr=20, avoid_xy=TARGET_PIX, avoid_radius=20)
    assert (25, 150) not in [(s.x, s.y) for s in stars] and len(stars) >= 8
    psf, info = empirical_psf(img, var, bad, avoid_xy=TARGET_PIX, avoid_radius=20, box=9)
    true_fwhm = np.linalg.det(p.psf[0]) ** 0.25 / _alpha(3.0)  # geometric-mean FWHM
    assert info["fwhm_pix"] == pytest.approx(true_fwhm, rel=0.02)
    assert info["beta"] == pytest.approx(3.0, rel=0.15)
    assert psf.shape[0] % 2 == 1 and psf.sum() == pytest.approx(1.0)
    # the shape (ellipticity and orientation), not only the size
    want = p.psf[0] / _alpha(3.0) ** 2
    got = info["smat"] / _alpha(info["beta"]) ** 2
    assert np.allclose(got, want, rtol=0.08, atol=0.4)
    # centred on its central pixel
    c = psf.shape[0] // 2
    yy, xx = np.mgrid[: psf.shape[0], : psf.shape[1]]
    assert abs((psf * xx).sum() - c) < 0.01 and abs((psf * yy).sum() - c) < 0.01
    with pytest.raises(SurveyError, match="no PSF"):
        empirical_psf(p.truth["host"] + p.truth["noise"], var, bad, avoid_xy=TARGET_PIX, avoid_radius=20)


# --------------------------------------------------------------------------------------------
# adapter against the synthetic server
# --------------------------------------------------------------------------------------------


def test_query_lists_warps_and_one_stack_per_band(ps1, archive_server):
    refs = adapter().query(target_coord(), size_pix=SIZE)
    sci = [r for r in refs if r.kind == "science"]
    refs_ = [r for r in refs if r.kind == "reference"]
    assert sorted(r.band for r in refs_) == ["ps1_g", "ps1_r"]
    assert len(sci) == 5 and {r.band for r in sci} == {"ps1_g", "ps1_r"}
    assert all(math.isnan(r.mjd) for r in refs_)
    assert sorted(r.mjd for r in sci) == sorted(m for ms in WARP_MJDS.values() for m in ms)
    r0 = next(r for r in sci if r.band == "ps1_r")
    assert r0.locator["wt"].endswith(".wt.fits") and r0.locator["mask"].endswith(".mask.fits")
    assert len({r.exposure_id for r in refs}) == len(refs)
    only_g = adapter().query(target_coord(), size_pix=SIZE, bands=["g"], start=55300, end=56000)
    assert sorted((r.kind, r.mjd) for r in only_g if r.kind == "science") == [("science", 55560.41),
                                                                                ("science", 55930.22)]
    assert archive_server.requests[-1].query["filters"] == "g"
    assert "warp" in archive_server.requests[-1].query["type"]


def test_empty_table_is_no_coverage_and_html_is_a_failed_query(ps1):
    ps1.table_override = "projcell subcell ra dec filter mjd type filename shortname badflag\n"
    with pytest.raises(NoCoverage):
        adapter().query(target_coord(), size_pix=SIZE)
    report = fetch_epochs(target_coord(), surveys=["ps1"], policy=POLICY, config=CONFIG)
    assert report.failures == [] and report.epochs == []
    ps1.table_override = "<html><body>Server error</body></html>"
    report = fetch_epochs(target_coord(), surveys=["ps1"], policy=POLICY, config=CONFIG, refresh=True)
    # the cache refuses an HTML page where a table was asked for (nothing is cached for an hour)
    assert [f.error for f in report.failures] == ["ProductError"] and "HTML" in report.failures[0].reason


def test_warp_epoch_flux_position_variance_mask(ps1):
    coord = target_coord()
    ad = adapter()
    ref = next(r for r in ad.query(coord, size_pix=SIZE) if r.exposure_id.endswith("g.55560_41000"))
    (ep,) = ad.fetch(ref, coord, size_pix=SIZE)
    prod = ps1.products[warp_name("g", 55560.41)]
    assert ep.shape == (SIZE, SIZE) and ep.survey == "ps1" and ep.band == "ps1_g" and not ep.is_reference
    assert ep.zeropoint == pytest.approx(FPA_ZP + 2.5 * math.log10(EXPTIME))
    assert ep.mjd == pytest.approx(55560.41 + EXPTIME / 2 / 86400, abs=1e-9) and ep.timesys == "UTC"
    # the target lands where the transient was injected
    tx, ty = (float(v) for v in ep.wcs.world_to_pixel(coord))
    ox, oy = stamp_offset(sky_wcs(), ep)
    assert (tx + ox, ty + oy) == (pytest.approx(TARGET_PIX[0], abs=1e-6), pytest.approx(TARGET_PIX[1], abs=1e-6))
    assert abs(tx - SIZE / 2) <= 0.5 and abs(ty - SIZE / 2) <= 0.5  # centred when not clipped
    region = (slice(oy, oy + SIZE), slice(ox, ox + SIZE))
    # pixels are served counts; variance is the .wt; the noise matches it
    expected = sum(prod.truth[k] for k in ("host", "transient", "stars", "noise"))[region]
    good = ~ep.mask
    assert np.allclose(ep.image[good], expected[good], atol=1e-2)
    assert np.all(ep.variance[good] == NOISE_VAR)
    resid = (ep.image - sum(prod.truth[k] for k in ("host", "transient", "stars"))[region])[good]
    assert np.std(resid) / math.sqrt(NOISE_VAR) == pytest.approx(1.0, abs=0.06)
    # transient flux: aperture on the host-subtracted stamp, corrected by the true PSF's aperture fraction
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ap = np.hypot(xx - tx, yy - ty) < 15
    smat, beta = prod.psf
    cx0, cy0 = 50 + tx % 1, 50 + ty % 1
    model = moffat_image((101, 101), cx0, cy0, smat, beta, oversample=5)
    my, mx = np.mgrid[:101, :101]
    frac = model[np.hypot(mx - cx0, my - cy0) < 15].sum()
    sub = np.where(ep.mask, prod.truth["transient"][region], ep.image - prod.truth["host"][region])
    flux_njy = sub[ap].sum() * ep.njy_per_unit / frac
    assert flux_njy == pytest.approx(10 ** (-0.4 * (19.0 - NJY_AB_ZEROPOINT)), rel=0.01)
    # mask: the CR pixel is masked (variance inf), STARCORE pixels are not
    cx, cy = prod.truth["cr"]
    assert ep.mask[cy - oy, cx - ox] and np.isinf(ep.variance[cy - oy, cx - ox])
    assert ep.mask.sum() == 1
    # the PSF is the injected one (FWHM to a few percent)
    from transcene.ztf_alerts import fit_moffat

    c = ep.psf.shape[0] // 2
    f = fit_moffat(ep.psf, np.full(ep.psf.shape, 1e-8), np.zeros(ep.psf.shape, bool), c, c, radius=c, beta=None)
    assert f.fwhm == pytest.approx(np.linalg.det(smat) ** 0.25 / _alpha(beta), rel=0.02)


def test_stack_reference_is_linearised(ps1):
    coord = target_coord()
    ad = adapter()
    ref = next(r for r in ad.query(coord, size_pix=SIZE, bands=["ps1_r"]) if r.kind == "reference")
    (ep,) = ad.fetch(ref, coord, size_pix=SIZE)
    prod = ps1.products[stack_name("r")]
    assert ep.is_reference and ep.exposure_id == "1405.053.r.stk"
    assert ep.zeropoint == pytest.approx(25.0 + 2.5 * math.log10(EXPTIME))
    ox, oy = stamp_offset(sky_wcs(), ep)
    linear = sum(prod.truth[k] for k in ("host", "stars", "noise"))[oy:oy + SIZE, ox:ox + SIZE]
    good = ~ep.mask
    # float32 asinh values on the wire: ~1e-7 relative in v, i.e. ~1e-6 relative in the flux
    assert np.allclose(ep.image[good], linear[good], rtol=1e-4, atol=2e-3)


def test_clipped_cutout_and_target_outside(ps1):
    near_edge = (6.4, 100.2)
    coord = target_coord(near_edge)
    ad = adapter()
    ref = next(r for r in ad.query(coord, size_pix=SIZE) if r.kind == "science")
    (ep,) = ad.fetch(ref, coord, size_pix=SIZE)
    tx, ty = (float(v) for v in ep.wcs.world_to_pixel(coord))
    assert ep.shape[1] < SIZE and ep.shape[0] == SIZE  # clipped on the left
    assert tx == pytest.approx(6.4, abs=1e-6) and 0 <= tx < ep.shape[1]
    ox, oy = stamp_offset(sky_wcs(), ep)
    assert (ox, ty + oy) == (0, pytest.approx(100.2, abs=1e-6))
    # a cutout that does not contain the target: clear error naming where it fell
    outside = target_coord((-30.0, 100.0))
    with pytest.raises(SurveyError, match="outside"):
        ad.fetch(ref, outside, size_pix=SIZE)


def test_bad_products_become_flagged_failures(ps1):
    coord = target_coord()
    g1, g2, g3 = (warp_name("g", m) for m in WARP_MJDS["g"])
    ps1.broken[g1] = html_error(200)                                  # HTML page with status 200
    ps1.broken[companion_name(g2, "mask")] = html_error(200, "maintenance")
    p3 = ps1.products[g3]
    del p3.header["FPA.ZP"]                                           # missing zero point
    del ps1.products[stack_name("r")].header["MJD-OBS"]               # missing time
    nostars = make_product(seed=9, stars=[], mjd=55210.27)            # no PSF star at all
    ps1.products[warp_name("r", 55210.27)] = nostars
    report = fetch_epochs(coord, surveys=["ps1"], policy=POLICY, config=CONFIG)
    by_id = {f.exposure_id: f for f in report.failures}
    assert set(by_id) == {"1405.053.g.55200_31000", "1405.053.g.55560_41000", "1405.053.g.55930_22000",
                          "1405.053.r.stk", "1405.053.r.55210_27000"}
    assert by_id["1405.053.g.55200_31000"].error == "ProductError" and "HTML" in by_id["1405.053.g.55200_31000"].reason
    assert "mask" in by_id["1405.053.g.55560_41000"].reason
    no_zp = by_id["1405.053.g.55930_22000"]
    assert no_zp.error == "ServiceChanged" and "FPA.ZP" in no_zp.reason
    assert "MJD-OBS" in by_id["1405.053.r.stk"].reason
    assert "no PSF" in by_id["1405.053.r.55210_27000"].reason
    assert {e.exposure_id for e in report.epochs} == {"1405.053.g.stk", "1405.053.r.55601_35000"}


def test_fetch_epochs_with_injected_failures_leaves_a_clean_cache(ps1, archive_server, survey_env):
    coord = target_coord()
    archive_server.fail_fraction(0.2, prefix=FITSCUT)
    report = fetch_epochs(coord, surveys=["ps1"], policy=POLICY, config=CONFIG)
    assert report.n_found == 7
    failed = {f.exposure_id for f in report.failures}
    got = {e.exposure_id for e in report.epochs}
    assert failed and got and failed.isdisjoint(got) and len(failed | got) == 7
    assert all(f.error == "DownloadError" and "503" in f.reason for f in report.failures)
    for path in (survey_env / "cache").rglob("*"):
        if path.is_file() and path.suffix == ".fits":
            with fits.open(path) as hdul:
                hdul.verify("exception")
        assert not path.name.startswith(".part-")
    # second run: the successes come from the cache, the failures are tried again (and fail again)
    n_before = archive_server.count(FITSCUT)
    again = fetch_epochs(coord, surveys=["ps1"], policy=POLICY, config=CONFIG)
    assert again.n_cached == len(got) and {f.exposure_id for f in again.failures} == failed
    assert archive_server.count(FITSCUT) - n_before <= 3 * 2 * len(failed)
    ep = next(e for e in again.epochs if not e.is_reference)
    assert ep.psf.sum() == pytest.approx(1.0, rel=1e-5) and ep.zeropoint > 30


@pytest.mark.remote_data
def test_live_ps1_query_and_one_warp(survey_env):
    coord = SkyCoord(150.0 * u.deg, 2.2 * u.deg)
    ad = make_adapter("ps1")
    refs = ad.query(coord, size_pix=120, bands=["r"])
    warps = [r for r in refs if r.kind == "science"]
    assert warps and any(r.kind == "reference" for r in refs)
    (ep,) = ad.fetch(warps[0], coord, size_pix=120)
    assert ep.band == "ps1_r" and 25 < ep.zeropoint < 40 and np.isfinite(ep.mjd)
    assert ep.psf.shape[0] >= 15 and ep.psf.sum() == pytest.approx(1.0) and (~ep.mask).any()
