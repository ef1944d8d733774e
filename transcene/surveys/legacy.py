"""DESI Legacy Imaging Surveys through the legacysurvey.org viewer.

Science epochs are per-CCD cutouts from one ``exposures-tgz`` tarball per (position, size): each
CCD gives a sky-subtracted image in native units, its inverse variance, DQ bits (legacypipe
codes) and a constant PSFEx model evaluated at the cutout centre. :meth:`query` downloads the
tarball once (through the product cache: a data release is frozen) and lists its CCDs;
:meth:`fetch` reads one CCD's members from the cached tarball.

Reference epochs are the deep coadd, one per band: ``fits-cutout`` with ``subimage`` (native
brick pixels, so the per-pixel inverse variance stays exact; the resampled mode would correlate
the noise a second time) in nanomaggies (ZP 22.5), with the ``coadd-psf`` PSF. The coadd spans
years, so calling it transient-free is an assumption (true for a transient that starts after
the coadd epochs); ``coadd_is_reference = false`` (descriptor or ``[surveys.ls]`` config) makes
it an ordinary epoch. Its ``mjd`` is the mean mid-exposure time of that band's CCDs in the
tarball (an epoch file needs a finite time; it only matters when the coadd is not a reference).

Zero points (AB, image units): DECam ``ccdzpt + 2.5 log10(exptime)`` (CP counts); 90Prime and
Mosaic3 ``ccdzpt`` (e-/s); coadd 22.5. Times are UTC, mid-exposure. Exposure ids are
``{camera}-{expnum:08d}-{ccdname}`` and ``coadd-{layer}-{band}``.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import tarfile
from pathlib import PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from transcene.epoch import Epoch
from transcene.surveys.base import (EpochRef, NoCoverage, ServiceChanged, SurveyAdapter, SurveyError, celestial_wcs,
                                    target_pixel)
from transcene.surveys.cache import ProductError

__all__ = ["LegacySurveyAdapter", "DQ_BITS", "psfex_eval", "psfex_psf_from_hdul", "ccd_zeropoint",
           "is_north", "canonical_band", "exposure_id", "dq_mask", "nanomaggy_to_njy"]

log = logging.getLogger(__name__)

#: legacypipe DQ bits of the exposures-tgz ``*-sub_ood_.fits`` images (legacypipe ``bits.DQ_BITS``).
DQ_BITS = dict(badpix=1, satur=2, interp=4, cr=16, bleed=64, trans=128, edge=256, edge2=512, outlier=2048)

#: Columns of ``survey-ccds-cutout.fits.gz`` the adapter relies on.
CCD_COLUMNS = ("camera", "expnum", "ccdname", "filter", "mjd_obs", "exptime", "ccdzpt")

_CCD_TABLE = "survey-ccds-cutout.fits.gz"


# ---------------------------------------------------------------------------- pure functions


def exposure_id(camera: str, expnum: int, ccdname: str) -> str:
    """``{camera}-{expnum:08d}-{ccdname}``: the viewer's file stem for one CCD."""
    return f"{camera.strip()}-{int(expnum):08d}-{ccdname.strip()}"


def canonical_band(camera: str, filt: str, cameras: Mapping[str, Mapping[str, Any]]) -> str:
    """``<prefix>_<filter>`` from the descriptor's camera table (``decam`` + ``g`` -> ``decam_g``)."""
    cam = camera.strip().lower()
    if cam not in cameras:
        raise SurveyError(f"camera {camera!r} is not in the ls descriptor's [cameras] table "
                          f"(known: {', '.join(sorted(cameras))})")
    return f"{cameras[cam]['band_prefix']}_{filt.strip()}"


def ccd_zeropoint(camera: str, ccdzpt: float, exptime: float, cameras: Mapping[str, Mapping[str, Any]]) -> float:
    """AB zero point of one CCD's native units: ``ccdzpt`` (+ 2.5 log10(exptime) for DECam)."""
    cam = camera.strip().lower()
    if cam not in cameras:
        raise SurveyError(f"camera {camera!r} is not in the ls descriptor's [cameras] table")
    if not (math.isfinite(ccdzpt) and ccdzpt > 0):
        raise SurveyError(f"ccdzpt={ccdzpt!r}, expected a positive zero point (0 means not calibrated)")
    if not (math.isfinite(exptime) and exptime > 0):
        raise SurveyError(f"exptime={exptime!r}, expected a positive exposure time in s")
    return float(ccdzpt + (2.5 * math.log10(exptime) if cameras[cam]["zp_adds_exptime"] else 0.0))


def nanomaggy_to_njy(zeropoint: float = 22.5) -> float:
    """nJy per image unit for an AB zero point (1 nanomaggy = 3631 nJy at ZP 22.5)."""
    return 10.0 ** (-0.4 * (zeropoint - 31.4))


def is_north(layer: str, ra: float, dec: float, *, split_layers: Sequence[str], split_dec: float) -> bool:
    """Whether the viewer serves ``layer`` at (ra, dec) from the north (BASS/MzLS) data.

    Split layers go north iff ``dec > split_dec`` and galactic latitude ``b > 0`` (the viewer's
    ``LegacySurveySplitLayer``); ``*-north``/``*-south`` layers say it in their name.
    """
    if layer.endswith("-north"):
        return True
    if layer in split_layers:
        if dec <= split_dec:
            return False
        from astropy.coordinates import SkyCoord

        b = SkyCoord(ra=ra, dec=dec, unit="deg").galactic.b.deg
        return bool(b > 0)
    return False


def dq_mask(dq: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """True where ``dq`` has any of the named legacypipe DQ bits."""
    unknown = [n for n in names if n not in DQ_BITS]
    if unknown:
        raise SurveyError(f"unknown DQ bit name(s) {unknown}; known: {', '.join(DQ_BITS)}")
    bits = 0
    for n in names:
        bits |= DQ_BITS[n]
    return (np.asarray(dq).astype(np.int64) & bits) != 0


def psfex_eval(psf_mask: np.ndarray, degree: int, polzero: tuple[float, float], polscal: tuple[float, float],
               x: float, y: float) -> np.ndarray:
    """PSFEx model at CCD pixel (x, y): ``sum_k dx**j dy**k psf_mask[i]`` in PSFEx term order.

    ``psf_mask`` is ``[n_terms(, padding), ny, nx]``; ``dx = (x - polzero1)/polscal1`` and the
    same in y. Returns the unnormalised stamp.
    """
    psf_mask = np.asarray(psf_mask, dtype=np.float64)
    if psf_mask.ndim == 2:
        psf_mask = psf_mask[None]
    n_terms = (degree + 1) * (degree + 2) // 2
    if psf_mask.shape[0] < n_terms:
        raise SurveyError(f"PSFEx PSF_MASK has {psf_mask.shape[0]} basis images, polynomial degree {degree} "
                          f"needs {n_terms}")
    dx = (x - polzero[0]) / polscal[0]
    dy = (y - polzero[1]) / polscal[1]
    out = np.zeros(psf_mask.shape[1:])
    for d in range(degree + 1):
        for j in range(d + 1):
            k = d - j
            i = j + (degree + 1) * k - k * (k - 1) // 2
            out += dx**j * dy**k * psf_mask[i]
    return out


def _resample_psf(stamp: np.ndarray, samp: float) -> np.ndarray:
    """A PSF sampled every ``samp`` image pixels, put on the image grid (odd, same centre)."""
    from scipy.ndimage import map_coordinates

    ny, nx = stamp.shape
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    hy, hx = int(cy * samp), int(cx * samp)
    yy, xx = np.mgrid[-hy:hy + 1, -hx:hx + 1].astype(float)
    # one image pixel = 1/samp PSF samples; the flux per image pixel scales by samp**2 (normalised later)
    return map_coordinates(stamp, [cy + yy / samp, cx + xx / samp], order=3, mode="constant", cval=0.0)


def _finish_psf(psf: np.ndarray, what: str) -> np.ndarray:
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise ProductError(what, f"PSF stamp has shape {psf.shape}, expected 2-D with odd sides")
    if not np.all(np.isfinite(psf)):
        raise ProductError(what, "PSF stamp has NaN or infinite values")
    total = psf.sum()
    if not total > 0:
        raise ProductError(what, f"PSF stamp sums to {total:g}, expected a positive sum")
    return psf / total


def psfex_psf_from_hdul(hdul: fits.HDUList, x: float, y: float, what: str) -> np.ndarray:
    """Unit-sum PSF from a PSFEx file (merged-table row or single-CCD HDU) at CCD pixel (x, y).

    Reads ``PSF_MASK`` and ``POLDEG1``/``POLZERO1,2``/``POLSCAL1,2``/``PSF_SAMP`` from the table
    columns (legacypipe merged format) or the HDU header (PSFEx format); ``POLNAXIS = 0`` means a
    constant model. Resamples to the image grid when ``PSF_SAMP != 1``.
    """
    hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
    if hdu is None or hdu.data is None or len(hdu.data) == 0:
        raise ProductError(what, "no PSFEx table (binary table with a PSF_MASK column)")
    cols = {c.lower() for c in hdu.columns.names}
    if "psf_mask" not in cols:
        raise ServiceChanged(f"{what}: PSFEx table lacks column PSF_MASK (has {', '.join(sorted(cols))})")
    row = hdu.data[0]
    hdr = hdu.header

    def get(key: str, default=None):
        if key in cols:
            return row[key]
        if key.upper() in hdr:
            return hdr[key.upper()]
        return default

    constant = int(get("polnaxis", 2) or 0) == 0
    degree = 0 if constant else int(get("poldeg1", 0))
    try:
        zero = (float(get("polzero1", 0.0)), float(get("polzero2", 0.0)))
        scal = (float(get("polscal1", 1.0)), float(get("polscal2", 1.0)))
        samp = float(get("psf_samp", 1.0))
    except (TypeError, ValueError) as exc:
        raise ProductError(what, f"PSFEx polynomial keywords unreadable: {exc}") from exc
    if not (np.all(np.isfinite(scal)) and scal[0] != 0 and scal[1] != 0 and math.isfinite(samp) and samp > 0):
        raise ProductError(what, f"PSFEx POLSCAL={scal} / PSF_SAMP={samp}, expected non-zero / positive")
    stamp = psfex_eval(np.asarray(row["psf_mask"]), degree, zero, scal, x, y)
    if abs(samp - 1.0) > 1e-6:
        stamp = _resample_psf(stamp, samp)
    return _finish_psf(stamp, what)


def _image_hdu(hdul: fits.HDUList, what: str):
    for h in hdul:
        if h.is_image and h.data is not None and np.ndim(h.data) == 2:
            return h
    raise ProductError(what, "no 2-D image HDU")


# ---------------------------------------------------------------------------- tarball access


class _Tarball:
    """The members of one exposures-tgz tarball, keyed by their path below ``data_<ra>_<dec>/``."""

    def __init__(self, path, what: str):
        self.what = what
        try:
            with tarfile.open(path) as tf:
                self.members = {}
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    rel = str(PurePosixPath(*PurePosixPath(m.name).parts[1:])) if "/" in m.name else m.name
                    self.members[rel] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ProductError(what, f"unreadable tar archive: {exc}") from exc

    def get(self, rel: str) -> bytes | None:
        return self.members.get(rel)

    def fits(self, rel: str) -> fits.HDUList:
        raw = self.members.get(rel)
        if raw is None:
            raise ProductError(self.what, f"member {rel!r} missing from the tarball")
        if rel.endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise ProductError(f"{self.what} member {rel}", f"bad gzip data: {exc}") from exc
        try:
            hdul = fits.open(io.BytesIO(raw), memmap=False)
            hdul.verify("exception")
            return hdul
        except Exception as exc:  # noqa: BLE001 - any failure to parse is a bad member
            raise ProductError(f"{self.what} member {rel}", f"does not open as FITS: {exc}") from exc


def _read_ccd_table(tar: _Tarball) -> np.ndarray:
    hdul = tar.fits(_CCD_TABLE)
    hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
    if hdu is None:
        raise ServiceChanged(f"{tar.what} member {_CCD_TABLE}: no binary table")
    names = {n.lower() for n in hdu.columns.names}
    missing = [c for c in CCD_COLUMNS if c not in names]
    if missing:
        raise ServiceChanged(f"{tar.what} member {_CCD_TABLE}: column(s) {', '.join(missing)} missing "
                             f"(expected {', '.join(CCD_COLUMNS)})")
    return hdu.data


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------- the adapter


class LegacySurveyAdapter(SurveyAdapter):
    """Legacy Surveys: per-CCD science epochs (exposures-tgz) + coadd reference epochs."""

    # -- settings --------------------------------------------------------------------------
    def _opt(self, key: str, default=None):
        section = ((self.ctx.config or {}).get("surveys", {}) or {}).get(self.name, {}) or {}
        if key in section:
            return section[key]
        return self.ctx.descriptor.extra.get(key, default)

    @property
    def layer(self) -> str:
        return str(self._opt("layer", "ls-dr10"))

    @property
    def cameras(self) -> Mapping[str, Mapping[str, Any]]:
        return self.ctx.descriptor.extra.get("cameras", {})

    def _north(self, coord) -> bool:
        c = coord.icrs
        return is_north(self.layer, c.ra.deg, c.dec.deg, split_layers=self._opt("split_layers", ()),
                        split_dec=float(self._opt("split_dec", 32.375)))

    def coadd_band(self, coord, filt: str) -> str:
        """Canonical band of the coadd in filter ``filt`` at ``coord`` (north/south from the layer)."""
        side = "north" if self._north(coord) else "south"
        cams = self.ctx.descriptor.extra.get("coadd_cameras", {}).get(side, {})
        if filt not in cams:
            raise SurveyError(f"ls layer {self.layer} ({side}) has no {filt!r} coadd (has {', '.join(cams)})")
        return canonical_band(cams[filt], filt, self.cameras)

    # -- request builders -------------------------------------------------------------------
    def tgz_request(self, coord, size_pix: int) -> tuple[str, dict[str, Any]]:
        c = coord.icrs
        size = min(int(size_pix), int(self._opt("max_tgz_size_pix", 500)))
        if size < size_pix:
            log.info("ls: exposures-tgz serves at most %d px; asking for %d instead of %d", size, size, size_pix)
        return self.ctx.endpoint("exposures"), {"ra": f"{c.ra.deg:.7f}", "dec": f"{c.dec.deg:.7f}",
                                                "layer": self.layer, "size": size}

    def cutout_request(self, coord, size_pix: int, filt: str) -> tuple[str, dict[str, Any]]:
        c = coord.icrs
        size = min(int(size_pix), int(self._opt("max_coadd_size_pix", 3000)))
        return self.ctx.endpoint("cutout"), {
            "ra": f"{c.ra.deg:.7f}", "dec": f"{c.dec.deg:.7f}", "layer": self.layer,
            "pixscale": self.ctx.descriptor.pixel_scale_arcsec, "size": size, "bands": filt, "subimage": ""}

    def psf_request(self, coord, filt: str) -> tuple[str, dict[str, Any]]:
        c = coord.icrs
        return self.ctx.endpoint("coadd_psf"), {"ra": f"{c.ra.deg:.7f}", "dec": f"{c.dec.deg:.7f}",
                                                "layer": self.layer, "bands": filt}

    def _tarball(self, url: str, params: Mapping[str, Any]) -> _Tarball:
        path, _ = self.ctx.cache.product(self.ctx.client, self.name, url, params, kind="tar", ext="tgz",
                                         what=f"ls exposures-tgz {url}")
        return _Tarball(path, f"ls exposures-tgz {url}?ra={params['ra']}&dec={params['dec']}")

    # -- query ------------------------------------------------------------------------------
    def query(self, coord, *, size_pix: int, bands: Sequence[str] | None = None,
              start: float | None = None, end: float | None = None) -> list[EpochRef]:
        from transcene.surveys.fetch import band_matches

        url, params = self.tgz_request(coord, size_pix)
        tar = self._tarball(url, params)
        table = _read_ccd_table(tar)
        if len(table) == 0:
            raise NoCoverage(f"ls: no CCD of layer {self.layer} covers {coord.icrs.to_string('decimal')}")
        science: list[EpochRef] = []
        t_by_filter: dict[str, list[float]] = {}
        for row in table:
            camera, ccdname, filt = _s(row["camera"]).strip(), _s(row["ccdname"]).strip(), _s(row["filter"]).strip()
            try:
                eid = exposure_id(camera, int(row["expnum"]), ccdname)
                band = canonical_band(camera, filt, self.cameras)
                mjd_obs, exptime = float(row["mjd_obs"]), float(row["exptime"])
            except (SurveyError, ValueError, TypeError) as exc:
                log.warning("ls: skipping CCD row %s/%s: %s", _s(row["expnum"]), ccdname, exc)
                continue
            t_mid = mjd_obs + exptime / 2.0 / 86400.0
            if not self._ccd_contains(tar, eid, coord):
                continue
            # a coadd band is listed only where some CCD of that filter covers the target
            t_by_filter.setdefault(filt, []).append(t_mid)
            if not band_matches(band, bands) or (start is not None and t_mid < start) or \
                    (end is not None and t_mid > end):
                continue
            row_info = {"camera": camera, "filter": filt, "mjd_obs": mjd_obs, "exptime": exptime,
                        "ccdzpt": float(row["ccdzpt"]),
                        "ccd_x0": _col(row, "ccd_x0", 0), "ccd_y0": _col(row, "ccd_y0", 0)}
            meta = {k: _col(row, k, math.nan) for k in ("fwhm", "sig1", "airmass")}
            science.append(EpochRef(self.name, eid, band, t_mid, "science", "UTC",
                                    locator={"url": url, "params": dict(params), "stem": eid, "row": row_info},
                                    meta=meta))
        refs: list[EpochRef] = []
        for filt, times in t_by_filter.items():
            try:
                band = self.coadd_band(coord, filt)
            except SurveyError as exc:
                log.warning("%s", exc)
                continue
            if not band_matches(band, bands):
                continue
            url_c, params_c = self.cutout_request(coord, size_pix, filt)
            url_p, params_p = self.psf_request(coord, filt)
            refs.append(EpochRef(self.name, f"coadd-{self.layer}-{band}", band, float(np.mean(times)), "reference",
                                 "UTC", locator={"url": url_c, "params": params_c, "psf_url": url_p,
                                                 "psf_params": params_p, "filter": filt},
                                 meta={"n_ccds": len(times)}))
        log.info("ls: %d CCD epochs and %d coadd references at %s", len(science), len(refs),
                 coord.icrs.to_string("decimal"))
        return refs + sorted(science, key=lambda r: r.mjd)

    def _ccd_contains(self, tar: _Tarball, eid: str, coord) -> bool:
        """False when the CCD cutout (which only touches the requested box) misses the target."""
        rel = f"images/{eid}-sub_ooi_.fits"
        try:
            with tar.fits(rel) as hdul:
                hdu = _image_hdu(hdul, rel)
                wcs, shape = celestial_wcs(hdu.header, rel), hdu.data.shape
        except (ProductError, SurveyError):
            return True  # let fetch report the damaged member against this epoch
        try:
            target_pixel(wcs, coord, shape, rel)
        except (ProductError, SurveyError) as exc:
            log.info("ls: %s does not contain the target: %s", eid, exc)
            return False
        return True

    # -- fetch ------------------------------------------------------------------------------
    def fetch(self, ref: EpochRef, coord, *, size_pix: int) -> list[Epoch]:
        try:
            if ref.kind == "reference":
                return [self._fetch_coadd(ref, coord)]
            return [self._fetch_ccd(ref, coord)]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            if isinstance(exc, ProductError):
                raise
            raise ProductError(f"ls {ref.exposure_id}", f"unexpected product content: "
                                                        f"{type(exc).__name__}: {exc}") from exc

    def _fetch_ccd(self, ref: EpochRef, coord) -> Epoch:
        loc = ref.locator
        tar = self._tarball(loc["url"], loc["params"])
        stem, row = loc["stem"], loc["row"]
        what = f"{tar.what} CCD {stem}"
        with tar.fits(f"images/{stem}-sub_ooi_.fits") as h:
            hdu = _image_hdu(h, f"{what} image")
            image = np.asarray(hdu.data, dtype=np.float64)
            header = hdu.header.copy()
        with tar.fits(f"images/{stem}-sub_oow_.fits") as h:
            ivar = np.asarray(_image_hdu(h, f"{what} invvar").data, dtype=np.float64)
        with tar.fits(f"images/{stem}-sub_ood_.fits") as h:
            dq = np.asarray(_image_hdu(h, f"{what} DQ").data)
        for name, arr in (("invvar", ivar), ("DQ", dq)):
            if arr.shape != image.shape:
                raise ProductError(what, f"{name} shape {arr.shape} differs from the image shape {image.shape}")
        wcs = celestial_wcs(header, f"{what} image header")
        tx, ty = target_pixel(wcs, coord, image.shape, what)
        psf = self._ccd_psf(tar, stem, what, row["ccd_x0"] + tx, row["ccd_y0"] + ty)
        try:
            zp = ccd_zeropoint(row["camera"], row["ccdzpt"], row["exptime"], self.cameras)
        except SurveyError as exc:
            raise SurveyError(f"{what}: {_CCD_TABLE}: {exc}") from exc
        bad = dq_mask(dq, self._opt("mask_dq_bits", list(DQ_BITS)))
        variance, mask = _variance_and_mask(image, ivar, bad)
        return Epoch(image=np.where(np.isfinite(image), image, 0.0), variance=variance, mask=mask, psf=psf,
                     wcs=wcs, mjd=ref.mjd, timesys="UTC", band=ref.band, zeropoint=zp, survey=self.name,
                     exposure_id=ref.exposure_id, is_reference=False)

    def _ccd_psf(self, tar: _Tarball, stem: str, what: str, x: float, y: float) -> np.ndarray:
        rel = f"calib/psfex/{stem}-sub_ooi_-psfex.fits"
        if tar.get(rel) is not None:
            with tar.fits(rel) as h:
                return psfex_psf_from_hdul(h, x, y, f"{what} {rel}")
        rel = f"{stem}-sub-psfimg.fits"  # the same constant PSF as a plain image
        if tar.get(rel) is not None:
            with tar.fits(rel) as h:
                return _finish_psf(_image_hdu(h, rel).data, f"{what} {rel}")
        raise ProductError(what, f"no PSF: neither calib/psfex/{stem}-sub_ooi_-psfex.fits nor {stem}-sub-psfimg.fits "
                                 "in the tarball")

    def _fetch_coadd(self, ref: EpochRef, coord) -> Epoch:
        loc = ref.locator
        filt = loc["filter"]
        path, _ = self.ctx.cache.product(self.ctx.client, self.name, loc["url"], loc["params"], kind="fits",
                                         what=f"ls coadd cutout {loc['url']}")
        what = f"ls coadd cutout {loc['url']} (band {filt}, layer {self.layer})"
        with fits.open(path, memmap=False) as hdul:
            image, ivar, wcs = _pick_subimage(hdul, filt, coord, what)
        psf_path, _ = self.ctx.cache.product(self.ctx.client, self.name, loc["psf_url"], loc["psf_params"],
                                             kind="fits", what=f"ls coadd PSF {loc['psf_url']}")
        with fits.open(psf_path, memmap=False) as hdul:
            psf = _coadd_psf(hdul, filt, f"ls coadd PSF {loc['psf_url']} (band {filt})")
        variance, mask = _variance_and_mask(image, ivar, np.zeros(image.shape, bool))
        if mask.all():
            raise SurveyError(f"{what}: every pixel has invvar 0 (no coadd data at the target)")
        is_ref = self._opt("coadd_is_reference", True)
        if not isinstance(is_ref, bool):
            raise SurveyError(f"ls setting coadd_is_reference={is_ref!r}, expected true or false")
        return Epoch(image=np.where(np.isfinite(image), image, 0.0), variance=variance, mask=mask, psf=psf, wcs=wcs,
                     mjd=ref.mjd, timesys="UTC", band=ref.band, zeropoint=float(self._opt("coadd_zero_point", 22.5)),
                     survey=self.name, exposure_id=ref.exposure_id, is_reference=is_ref)


def _col(row, name: str, default):
    try:
        return float(row[name])
    except (KeyError, ValueError, TypeError):
        return default


def _variance_and_mask(image: np.ndarray, ivar: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variance ``1/ivar`` (``inf`` where ``ivar <= 0`` or non-finite) and the mask of unusable pixels."""
    ok = np.isfinite(ivar) & (ivar > 0) & np.isfinite(image)
    with np.errstate(divide="ignore"):
        variance = np.where(ok, 1.0 / np.where(ok, ivar, 1.0), np.inf)
    return variance, bad | ~ok


def _pick_subimage(hdul: fits.HDUList, filt: str, coord, what: str) -> tuple[np.ndarray, np.ndarray, WCS]:
    """The ``subimage`` cutout of band ``filt`` that holds ``coord`` farthest from its edge.

    The viewer writes, per overlapping brick and band, an image HDU (``IMAGETYP='image'``) then
    its inverse variance (``'invvar'``), each with ``BRICK``, ``BAND`` and the brick sub-WCS; a
    cutout near a brick edge is clipped there.
    """
    images, invvars = [], {}
    for h in hdul:
        if not (h.is_image and h.data is not None and np.ndim(h.data) == 2):
            continue
        kind = str(h.header.get("IMAGETYP", "")).strip().lower()
        if kind not in ("image", "invvar"):
            raise ServiceChanged(f"{what}: HDU IMAGETYP={h.header.get('IMAGETYP')!r}, expected 'image' or "
                                 "'invvar' (is the subimage flag still honoured?)")
        if str(h.header.get("BAND", "")).strip() != filt:
            continue
        key = str(h.header.get("BRICK", "")).strip()
        if kind == "image":
            images.append((key, h))
        else:
            invvars[key] = h
    if not images:
        raise SurveyError(f"{what}: no image HDU with BAND={filt!r} (no coadd at the target in this band)")
    best, best_margin, last_err = None, -np.inf, None
    for key, h in images:
        try:
            wcs = celestial_wcs(h.header, f"{what} brick {key}")
            x, y = target_pixel(wcs, coord, h.data.shape, f"{what} brick {key}")
        except (SurveyError, ProductError) as exc:
            last_err = exc
            continue
        ny, nx = h.data.shape
        margin = min(x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y)
        if margin > best_margin:
            best, best_margin = (key, h, wcs), margin
    if best is None:
        raise last_err if last_err is not None else SurveyError(f"{what}: target outside every brick")
    key, h, wcs = best
    if key not in invvars:
        raise ProductError(what, f"brick {key!r} band {filt}: no invvar HDU (IMAGETYP='invvar')")
    ivar = np.asarray(invvars[key].data, dtype=np.float64)
    if ivar.shape != h.data.shape:
        raise ProductError(what, f"brick {key!r}: invvar shape {ivar.shape} differs from image {h.data.shape}")
    return np.asarray(h.data, dtype=np.float64), ivar, wcs


def _coadd_psf(hdul: fits.HDUList, filt: str, what: str) -> np.ndarray:
    """The band's PSF stamp from a coadd-psf file (one HDU per band, keyword ``BAND``)."""
    stamps = [h for h in hdul if h.is_image and h.data is not None and np.ndim(h.data) == 2]
    for h in stamps:
        if str(h.header.get("BAND", "")).strip() == filt:
            return _finish_psf(h.data, what)
    bands = [str(h.header.get("BAND", "?")).strip() for h in stamps]
    raise ProductError(what, f"no PSF HDU with BAND={filt!r} (has {bands})")
