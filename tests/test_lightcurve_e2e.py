"""``transcene lightcurve`` end to end against the fake archives of the adapter tests.

For each adapter (ztf, ls, ps1) the real command runs through ``typer.testing.CliRunner``:
query the loopback server, download through the cache, fit host + point source, write the
ECSV light curve. The checks: exit code 0, one row per fetched epoch, the reference epochs
flagged REFERENCE, each science epoch's flux equal to the injected one (from the fake's AB
magnitude, in nJy) within a few flux_err, and a second run served entirely from the cache (no
request reaches the server: neither products nor metadata, which are reused for an hour). One
more test injects HTTP 503s into a fraction of the ZTF cutouts: the light curve still comes out,
with FETCH_FAILED rows for exactly the epochs whose downloads failed, and the cache holds no
broken file.

Marked slow (about 150 s on 2 cores): run with ``pytest -m slow tests/test_lightcurve_e2e.py``.

Fakes come from the adapter test modules; where an adapter's standard fake is not a
well-posed host + transient problem this module builds its own scene (see each test).
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from scipy.signal import fftconvolve
from scipy.special import erf
from typer.testing import CliRunner

import test_survey_legacy as LS
import test_survey_ps1 as PS1
import test_survey_ztf as ZTF
from archive_server import Reply
from test_survey_ztf import irsa  # noqa: F401  (fixture: the ZTF fake on the archive server)
from transcene.cli import app
from transcene.epoch import NJY_AB_ZEROPOINT
from transcene.result import Flag
from transcene.ztf_alerts import moffat_image

# a local server needs no throttling, and its injected failures no real backoff (the default
# waits 1+2+4+8 s for every request that always fails)
NO_THROTTLE = """
[http]
backoff_s = 0.01
[surveys.ztf]
rate_limit_per_s = 0
[surveys.ls]
rate_limit_per_s = 0
[surveys.ps1]
rate_limit_per_s = 0
psf_cutout_pix = 160   # the PS1 fake's skycell is 200 px: one 160 px cutout per product
psf_max_stars = 8
"""

# Four fits of different shapes, each compiled afresh (~15-30 s of JAX compilation apiece on 2
# cores), plus the cached re-runs: ~150 s in all, too long for the default run.
pytestmark = pytest.mark.slow

#: |fitted - true| / flux_err allowed for every science epoch
MAX_PULL = 4.0


def ab_to_njy(mag: float) -> float:
    return 10 ** (-0.4 * (mag - NJY_AB_ZEROPOINT))


@pytest.fixture
def env(survey_env, monkeypatch):
    """survey_env (cache under tmp_path, no user config) plus a config without rate limits."""
    cfg = survey_env / "config.toml"
    cfg.write_text(NO_THROTTLE)
    monkeypatch.setenv("TRANSCENE_CONFIG", str(cfg))
    return survey_env


def run_lightcurve(coord: SkyCoord, survey: str, out: Path, *extra: str):
    """Invoke ``transcene lightcurve`` and return (result, table, seconds)."""
    args = ["lightcurve", f"{coord.ra.deg:.8f}", f"{coord.dec.deg:.8f}", "--survey", survey, "-o", str(out), "-q",
            *extra]
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, args)
    dt = time.perf_counter() - t0
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}"
    return res, Table.read(out), dt


def check_lightcurve(lc: Table, truth_njy: dict[str, float], references: set[str]) -> None:
    """One row per epoch, references flagged, science fluxes equal to the truth within MAX_PULL."""
    ids = [str(e) for e in lc["exposure_id"]]
    assert sorted(ids) == sorted(set(truth_njy) | references), ids  # one row per fetched epoch
    flags = np.asarray(lc["flags"], int)
    is_ref = np.asarray(lc["is_reference"], bool)
    for eid, f, ref in zip(ids, flags, is_ref):
        assert ref == (eid in references), eid
        assert bool(f & Flag.REFERENCE) == ref, (eid, f)
        assert not f & (Flag.FETCH_FAILED | Flag.NOT_CONVERGED | Flag.BASELINE_UNDEFINED), (eid, f)
    pulls = {}
    for row in lc:
        eid = str(row["exposure_id"])
        if eid in references:
            assert row["flux"] == 0 and row["flux_err"] == 0
            continue
        flux, err = float(row["flux"]), float(row["flux_err"])
        assert lc["flux"].unit == "nJy" and err > 0
        pulls[eid] = (flux - truth_njy[eid]) / err
        assert err < 0.1 * truth_njy[eid], (eid, err)  # the test can see a 10 % error
    print("pulls:", {k: round(v, 2) for k, v in pulls.items()})
    assert all(abs(p) < MAX_PULL for p in pulls.values()), pulls


def check_cached_rerun(server, coord, survey, out, first: Table, *extra: str):
    """The second run: no request reaches the server, the same light curve comes out."""
    n = len(server.requests)
    _, again, dt = run_lightcurve(coord, survey, out, *extra)
    assert len(server.requests) == n, [r.path for r in server.requests[n:]]
    assert again.meta["fetch"].startswith(f"{len(first)} epochs found, 0 downloaded, {len(first)} from the cache")
    assert list(again["exposure_id"]) == list(first["exposure_id"])
    np.testing.assert_allclose(np.asarray(again["flux"], float), np.asarray(first["flux"], float),
                               rtol=1e-6, atol=1e-6 * float(np.max(first["flux_err"])))
    return dt


# ------------------------------------------------------------------------------------------ ZTF


def convolve_moffat(img, smat, beta, half=20):
    """``img`` through a pixel-integrated elliptical Moffat PSF (unit sum)."""
    k = moffat_image((2 * half + 1, 2 * half + 1), half, half, smat, beta, oversample=5)
    return fftconvolve(img, k / k.sum(), mode="same")


def ztf_archive(irsa):
    """ZTF's standard archive: 4 zr + 2 zg science epochs with the transient at 17.5 AB and one
    transient-free reference per band, the host seen through each image's PSF."""
    return ZTF.standard_archive(irsa)


ZTF_REFS = {"ref_000600_zr_c05_q2_777", "ref_000600_zg_c05_q2_777"}
ZTF_SIZE = "32"


def test_ztf_lightcurve_end_to_end_and_cached(irsa, archive_server, env, tmp_path, monkeypatch, record_property):
    eids = ztf_archive(irsa)
    out = tmp_path / "lc.ecsv"
    _, lc, t1 = run_lightcurve(ZTF.TARGET, "ztf", out, "--size", ZTF_SIZE)
    check_lightcurve(lc, {e: ab_to_njy(ZTF.SN_MAG) for e in eids}, ZTF_REFS)
    assert archive_server.count(ZTF.DATA) > 0
    t2 = check_cached_rerun(archive_server, ZTF.TARGET, "ztf", out, lc, "--size", ZTF_SIZE)
    record_property("seconds", (round(t1, 1), round(t2, 1)))
    print(f"ztf: first run {t1:.1f} s, cached run {t2:.1f} s")


# ------------------------------------------------------------------------------------------ PS1


PS1_WARP_NOISE = 300.0   # counts (warp zero point FPA_ZP + 2.5 log10(EXPTIME))
PS1_STACK_NOISE = 3.0    # counts (stack zero point 25 + 2.5 log10(EXPTIME)): deeper than a warp
PS1_HOST_SCALE = 20.0    # host 600 000 warp counts (~18.0 AB), 1.5" Gaussian
PS1_STAR_SCALE = 30.0    # PSF stars bright enough at this noise


def ps1_products():
    """The PS1 fake's default products (g warps with the transient at 18.5, 19.0, 19.5 AB, r
    warps at 18.5, 19.0, a transient-free stack per band), made into one static scene.

    The fake draws host and stars with the same counts in the warps and the stacks although
    their zero points differ by 3 mag (the host is 16 times brighter in nJy in a stack), draws
    the host without the PSF, and has the transient at S/N ~ 6000 over a host 10 times fainter.
    Here host and stars have the same nJy in every product, the host is seen through each
    product's PSF, and the noise makes the transient S/N 40-100 (the .wt says so).
    """
    prods = PS1.default_products()
    zp_warp = PS1.FPA_ZP + 2.5 * math.log10(PS1.EXPTIME)
    for i, p in enumerate(prods.values()):
        smat, beta = p.psf
        stack = "BSOFTEN" in p.header
        scale = 10 ** (-0.4 * (zp_warp - p.truth["zp"]))  # warp counts -> this product's counts
        noise_sd = PS1_STACK_NOISE if stack else PS1_WARP_NOISE
        host = scale * PS1_HOST_SCALE * convolve_moffat(p.truth["host"], smat, beta, half=24)
        stars = scale * PS1_STAR_SCALE * p.truth["stars"]
        noise = np.random.default_rng(1000 + i).normal(0.0, noise_sd, host.shape)
        linear = host + p.truth["transient"] + stars + noise
        if stack:  # asinh-scaled like the fake's stacks
            soft, off = p.header["BSOFTEN"], p.header["BOFFSET"]
            p.image = 2.5 * math.log10(math.e) * np.arcsinh((linear - off) / (2 * soft))
        else:
            p.image = linear
        p.wt = np.full(host.shape, noise_sd**2)
        p.truth.update(host=host, stars=stars, noise=noise)
    return prods


def test_ps1_lightcurve_end_to_end_and_cached(archive_server, env, tmp_path, monkeypatch, record_property):
    monkeypatch.setenv("TRANSCENE_PS1_URL", archive_server.url)
    PS1.FakePs1(archive_server, products=ps1_products())
    truth = {}
    for f, mjds in PS1.WARP_MJDS.items():
        for i, mjd in enumerate(mjds):
            eid = PS1.parse_product_name(PS1.warp_name(f, mjd)).exposure_id
            truth[eid] = ab_to_njy(18.5 + 0.5 * i)
    refs = {PS1.parse_product_name(PS1.stack_name(f)).exposure_id for f in PS1.WARP_MJDS}
    coord = PS1.target_coord()
    out = tmp_path / "lc.ecsv"
    _, lc, t1 = run_lightcurve(coord, "ps1", out, "--size", str(PS1.SIZE))
    check_lightcurve(lc, truth, refs)
    t2 = check_cached_rerun(archive_server, coord, "ps1", out, lc, "--size", str(PS1.SIZE))
    record_property("seconds", (round(t1, 1), round(t2, 1)))
    print(f"ps1: first run {t1:.1f} s, cached run {t2:.1f} s")


# ------------------------------------------------------------------------------------------ Legacy

# The legacy fake's standard CCDs are two single epochs (g, r) of a point source, and its coadd
# "reference" holds the same point source: no host, and the transient in the reference, so the
# fit would (rightly) give zero transient flux. This scene: a host galaxy everywhere, four DECam
# g CCDs with the transient at known magnitudes, and a deep transient-free g coadd.

LS_HOST_MAG = 20.5
LS_HOST_SIGMA = 2.5          # px, Gaussian host (before the PSF)
LS_HOST_OFFSET = (1.2, -0.8)  # px from the target
LS_CCDS = [  # expnum, mjd_obs, transient AB mag, PSF sigma (px), target pixel (crpix), seed
    (300001, 59000.10, 20.6, 1.45, (20.3, 19.8), 11),
    (300002, 59010.20, 20.9, 1.30, (19.6, 20.4), 12),
    (300003, 59020.15, 21.3, 1.60, (20.9, 21.1), 13),
    (300004, 59030.25, 21.8, 1.40, (19.2, 19.5), 14),
]
LS_COADD_SIGMA = 1.2  # px: the coadd is sharper than every CCD
LS_CCD_NOISE = 6.0    # CCD counts
LS_COADD_NOISE = 0.004  # nanomaggies
LS_ZPT, LS_EXPTIME = 25.0, 90.0


def pix_gauss(shape, x0, y0, sigma):
    """Pixel-integrated unit-flux Gaussian centred at (x0, y0)."""
    s2 = math.sqrt(2.0) * sigma
    px = 0.5 * (erf((np.arange(shape[1]) - x0 + 0.5) / s2) - erf((np.arange(shape[1]) - x0 - 0.5) / s2))
    py = 0.5 * (erf((np.arange(shape[0]) - y0 + 0.5) / s2) - erf((np.arange(shape[0]) - y0 - 0.5) / s2))
    return np.outer(py, px)


def ls_scene(header, shape, psf_sigma, host_units, transient_units):
    x, y = LS.target_xy(header)
    host_sigma = math.hypot(LS_HOST_SIGMA, psf_sigma)  # Gaussian host through a Gaussian PSF
    img = host_units * pix_gauss(shape, x + LS_HOST_OFFSET[0], y + LS_HOST_OFFSET[1], host_sigma)
    if transient_units:
        img = img + transient_units * pix_gauss(shape, x, y, psf_sigma)
    return img


def ls_ccds():
    """(members, row, truth) per CCD, in the legacy fake's formats."""
    ccds = []
    zp = LS_ZPT + 2.5 * math.log10(LS_EXPTIME)
    for expnum, mjd, mag, sigma, crpix, seed in LS_CCDS:
        shape = (40, 40)
        hdr = LS.tan_header([LS.RA, LS.DEC], [crpix[0] + 1, crpix[1] + 1])
        img = ls_scene(hdr, shape, sigma, 10 ** (-0.4 * (LS_HOST_MAG - zp)), 10 ** (-0.4 * (mag - zp)))
        img = img + np.random.default_rng(seed).normal(0, LS_CCD_NOISE, shape)
        ivar = np.full(shape, 1 / LS_CCD_NOISE**2, np.float32)
        dq = np.zeros(shape, np.int16)
        dq[0, :] = LS.DQ_BITS["edge"]
        stem = f"decam-{expnum:08d}-N4"
        stamp = pix_gauss((25, 25), 12, 12, sigma).astype(np.float32) * 5.0
        members = {
            f"images/{stem}-sub_ooi_.fits": LS.image_file(img.astype(np.float32), hdr, "N4"),
            f"images/{stem}-sub_oow_.fits": LS.image_file(ivar, hdr, "N4"),
            f"images/{stem}-sub_ood_.fits": LS.image_file(dq, hdr, "N4"),
            f"calib/psfex/{stem}-sub_ooi_-psfex.fits": LS.psfex_file(stamp, expnum=expnum),
        }
        row = dict(camera="decam", expnum=expnum, ccdname="N4", filter="g", mjd_obs=mjd, exptime=LS_EXPTIME,
                   ccdzpt=LS_ZPT, ccd_x0=100, ccd_y0=200, fwhm=2.35 * sigma * 0.262, sig1=0.01)
        ccds.append((members, row, {"mag": mag}))
    return ccds


def ls_coadd(req) -> Reply:
    band = req.query["bands"]
    shape = (44, 44)
    hdr = LS.tan_header([LS.RA, LS.DEC], [22.6, 21.9])
    nmgy = 10 ** (-0.4 * (LS_HOST_MAG - 22.5))
    img = ls_scene(hdr, shape, LS_COADD_SIGMA, nmgy, 0.0)
    img = img + np.random.default_rng(7).normal(0, LS_COADD_NOISE, shape)
    for k, v in (("BRICK", "1500p022"), ("BRICK_X0", 1000), ("BRICK_Y0", 2000), ("BAND", band), ("IMAGETYP", "image")):
        hdr[k] = v
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(img.astype(np.float32), header=hdr.copy())]
    hdr["IMAGETYP"] = "invvar"
    hdus.append(fits.ImageHDU(np.full(shape, 1 / LS_COADD_NOISE**2, np.float32), header=hdr.copy()))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return Reply(200, buf.getvalue(), "image/fits")


def ls_coadd_psf(req) -> Reply:
    h = fits.Header()
    h["BAND"] = req.query["bands"]
    buf = io.BytesIO()
    fits.PrimaryHDU(pix_gauss((63, 63), 31, 31, LS_COADD_SIGMA).astype(np.float32), header=h).writeto(buf)
    return Reply(200, buf.getvalue(), "image/fits")


def test_ls_lightcurve_end_to_end_and_cached(archive_server, env, tmp_path, monkeypatch, record_property):
    monkeypatch.setenv("TRANSCENE_LS_URL", archive_server.url)
    ccds = ls_ccds()
    LS.serve(archive_server, ccds=ccds, coadd=ls_coadd)
    archive_server.route("/viewer/coadd-psf/", ls_coadd_psf)
    truth = {f"decam-{r['expnum']:08d}-N4": ab_to_njy(t["mag"]) for _, r, t in ccds}
    out = tmp_path / "lc.ecsv"
    _, lc, t1 = run_lightcurve(LS.TARGET, "ls", out, "--size", "40")
    check_lightcurve(lc, truth, {"coadd-ls-dr10-decam_g"})
    assert archive_server.count("/viewer/exposures-tgz/") == 1
    t2 = check_cached_rerun(archive_server, LS.TARGET, "ls", out, lc, "--size", "40")
    record_property("seconds", (round(t1, 1), round(t2, 1)))
    print(f"ls: first run {t1:.1f} s, cached run {t2:.1f} s")


# ------------------------------------------------------------------------------------------ failures


def injected_failure(req, fraction: float, seed: int = 0) -> bool:
    """The archive server's fail_fraction rule, applied to a recorded request."""
    h = int(hashlib.sha256(f"{seed}:{req.key}".encode()).hexdigest()[:8], 16) / 16**8
    return h < fraction


def test_ztf_failed_cutouts_become_fetch_failed_rows(irsa, archive_server, env, tmp_path, monkeypatch):
    eids = ztf_archive(irsa)
    prefix = ZTF.DATA + "/sci/"
    archive_server.fail_fraction(0.2, prefix=prefix)
    out = tmp_path / "lc.ecsv"
    _, lc, _ = run_lightcurve(ZTF.TARGET, "ztf", out, "--size", ZTF_SIZE)

    # which science epochs lost a download, from the server's side
    failed = set()
    for req in archive_server.requests:
        if req.path.startswith(prefix) and injected_failure(req, 0.2):
            failed |= {e for e in eids if req.path.startswith(irsa.truth[e]["base"])}
    assert failed and failed < set(eids), failed  # some, not all
    flags = {str(e): int(f) for e, f in zip(lc["exposure_id"], lc["flags"])}
    assert sorted(flags) == sorted(set(eids) | ZTF_REFS)
    assert {e for e, f in flags.items() if f & Flag.FETCH_FAILED} == failed
    assert all(flags[e] == Flag.FETCH_FAILED for e in failed)
    bad = np.isin(np.asarray(lc["exposure_id"], str), sorted(failed))
    assert np.all(np.ma.getmaskarray(lc["flux"])[bad]) and not np.any(np.ma.getmaskarray(lc["flux"])[~bad])
    assert len(lc.meta["fetch_failures"]) == len(failed)
    assert all("503" in m for m in lc.meta["fetch_failures"])
    # the epochs that were fetched are measured, and right
    good = lc[~bad]
    check_lightcurve(good, {e: ab_to_njy(ZTF.SN_MAG) for e in eids if e not in failed}, ZTF_REFS)
    assert list(lc["mjd"]) == sorted(lc["mjd"])

    # the cache: no partial file, every FITS file whole, one complete epoch entry per fetched epoch
    root = env / "cache"
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files and not any(p.name.startswith(".part") for p in root.rglob("*"))
    for p in files:
        if p.suffix == ".fits":
            with fits.open(p) as hdul:
                hdul.verify("exception")
    entries = [d for d in (root / "epochs" / "ztf").iterdir()]
    assert all((d / "COMPLETE").exists() for d in entries)
    cached = {read_id(p) for d in entries for p in d.glob("*.fits")}
    assert cached == (set(eids) - failed) | ZTF_REFS
    # a product file per successful download, none for a failed one
    ok = {r.key for r in archive_server.requests
          if r.path.startswith(ZTF.DATA) and not (r.path.startswith(prefix) and injected_failure(r, 0.2))}
    assert sum(1 for p in files if "products" in p.parts) == len(ok)


def read_id(path: Path) -> str:
    from transcene.io import read_epoch

    return read_epoch(path).exposure_id

