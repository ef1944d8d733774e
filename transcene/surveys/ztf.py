"""ZTF science images and references from IRSA: IBE metadata search, then cutouts of the image,
its bit mask and its PSF, turned into epochs.

Conventions (SURVEYS.md §3; tags in ``surveys/ztf.toml``):

- one science epoch per ``sci`` row, exposure id ``{filefracday}_{field:06d}_{filtercode}_c{ccdid:02d}_q{qid}``;
  one reference epoch per ``(field, ccdid, qid, filtercode)`` that has science epochs;
- pixels in DN with the sky left in (the fit has a free sky level); variance
  ``max(sci, 0)/GAIN + (READNOI/GAIN)^2`` in DN^2; reference variance ``refunc^2``;
- zero point ``MAGZP`` (AB, PS1 colour term not applied); times are UTC mid-exposure MJD;
- PSF: ``sciimgdaopsfcent.fits`` (the PSF at the quadrant centre) made odd, centred and unit-sum;
  references have no PSF product, so an elliptical Moffat is fitted to stars in a wider cutout.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from astropy.io import fits

from transcene.epoch import Epoch
from transcene.surveys.base import (AuthRequired, EpochRef, ServiceChanged, SurveyAdapter, SurveyError, celestial_wcs,
                                    target_pixel)
from transcene.ztf_alerts import FIT_RADIUS, _mad_std, fit_moffat, moffat_psf
from transcene.surveys.cache import ProductError
from transcene.surveys.fetch import band_matches
from transcene.surveys.http import DownloadError

__all__ = [
    "ZtfAdapter", "FILTERS", "BAD_MASK_BITS", "bad_pixels", "science_variance", "centre_psf",
    "psf_from_stars", "search_params", "cutout_params", "parse_ibe_csv", "sci_product_base",
    "ref_product_base", "science_exposure_id", "reference_exposure_id", "mid_exposure_mjd",
]

log = logging.getLogger(__name__)

#: IBE filtercode -> canonical band (the alert reader writes the same names).
FILTERS = {"zg": "ztfg", "zr": "ztfr", "zi": "ztfi"}
#: mskimg bits that flag defects: all of 0-12 except 1 (sexsources) and 11 (psfsources), which
#: flag astrophysical sources (ztfimg's default).
BAD_MASK_BITS = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12)
BAD_MASK = sum(1 << b for b in BAD_MASK_BITS)
#: infobits at or above 2**25 flag an image the pipeline calls bad (client quality cut).
INFOBITS_BAD = 1 << 25
JD_MJD = 2400000.5

SCI_COLUMNS = ("field", "ccdid", "qid", "filtercode", "filefracday", "imgtypecode", "obsjd")
REF_COLUMNS = ("field", "ccdid", "qid", "filtercode")
_SCI_META = ("exptime", "seeing", "maglimit", "airmass", "infobits", "pid", "expid")
_REF_META = ("rfid", "nframes", "maglimit", "startobsdate", "endobsdate")


# --------------------------------------------------------------------------------------------
# URLs and query parameters
# --------------------------------------------------------------------------------------------


def science_exposure_id(row: Mapping[str, Any]) -> str:
    return (f"{row['filefracday']}_{int(row['field']):06d}_{row['filtercode']}"
            f"_c{int(row['ccdid']):02d}_q{int(row['qid'])}")


def reference_exposure_id(row: Mapping[str, Any]) -> str:
    """``ref_{field:06d}_{filtercode}_c{ccdid:02d}_q{qid}[_rfid]``: the rfid keeps the derived
    epochs of a rebuilt reference apart."""
    rid = f"ref_{int(row['field']):06d}_{row['filtercode']}_c{int(row['ccdid']):02d}_q{int(row['qid'])}"
    rfid = str(row.get("rfid") or "").strip()
    return f"{rid}_{rfid}" if rfid else rid


def sci_product_base(data_url: str, row: Mapping[str, Any]) -> str:
    """URL of a science product without its suffix (append ``sciimg.fits``...)."""
    ffd = str(row["filefracday"]).strip()
    if len(ffd) != 14 or not ffd.isdigit():
        raise ServiceChanged(f"IBE sci row: filefracday {ffd!r} is not YYYYMMDDdddddd")
    return (f"{data_url.rstrip('/')}/sci/{ffd[:4]}/{ffd[4:8]}/{ffd[8:]}/ztf_{ffd}_{int(row['field']):06d}"
            f"_{row['filtercode']}_c{int(row['ccdid']):02d}_{row['imgtypecode']}_q{int(row['qid'])}_")


def ref_product_base(data_url: str, row: Mapping[str, Any]) -> str:
    """URL of a reference product without its suffix (append ``refimg.fits``...)."""
    f6 = f"{int(row['field']):06d}"
    fc, c, q = row["filtercode"], f"{int(row['ccdid']):02d}", int(row["qid"])
    return f"{data_url.rstrip('/')}/ref/{f6[:3]}/field{f6}/{fc}/ccd{c}/q{q}/ztf_{f6}_{fc}_c{c}_q{q}_"


def search_params(ra: float, dec: float, *, filtercodes: Sequence[str] | None = None,
                  jd_start: float | None = None, jd_end: float | None = None) -> dict[str, str]:
    """IBE search parameters: images that contain the point (``INTERSECT=CENTER``), as CSV, with
    a ``WHERE`` on filter and start-of-exposure JD when those are restricted."""
    params = {"POS": f"{ra:.7f},{dec:.7f}", "INTERSECT": "CENTER", "ct": "csv"}
    where = []
    if filtercodes is not None and set(filtercodes) != set(FILTERS):
        where.append("filtercode IN (" + ",".join(f"'{fc}'" for fc in sorted(filtercodes)) + ")")
    if jd_start is not None:
        where.append(f"obsjd>={jd_start:.6f}")
    if jd_end is not None:
        where.append(f"obsjd<={jd_end:.6f}")
    if where:
        params["WHERE"] = " AND ".join(where)
    return params


def cutout_params(ra: float, dec: float, size_pix: int) -> dict[str, str]:
    """IRSA cutout query: centre in ICRS degrees, square side in pixels, plain FITS."""
    return {"center": f"{ra:.7f},{dec:.7f}", "size": f"{int(size_pix)}px", "gzip": "false"}


def parse_ibe_csv(content: bytes | str, required: Iterable[str], url: str) -> list[dict[str, str]]:
    """Rows of an IBE ``ct=csv`` answer (header line, then one line per image; empty = no rows).

    Raises :class:`ServiceChanged` naming ``url`` when the answer is not a CSV table or lacks a
    ``required`` column.
    """
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    if lines[0].lstrip().startswith("<"):
        raise ServiceChanged(f"{url}: expected an IBE CSV table, got markup: {lines[0][:120]!r}")
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in columns]
    if missing:
        raise ServiceChanged(f"{url}: IBE table lacks column(s) {', '.join(missing)} "
                             f"(has {', '.join(columns[:40])})")
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


# --------------------------------------------------------------------------------------------
# Pixels: mask, variance, PSF, time
# --------------------------------------------------------------------------------------------


def bad_pixels(bits: np.ndarray) -> np.ndarray:
    """True where the mskimg value has a defect bit (:data:`BAD_MASK_BITS`) set."""
    return (np.asarray(bits).astype(np.int64) & BAD_MASK) != 0


def science_variance(sci: np.ndarray, gain: float, read_noise_e: float) -> np.ndarray:
    """Per-pixel variance in DN^2 of a sky-included image in DN: Poisson ``max(sci, 0)/gain``
    (gain in e-/DN) plus read noise ``(read_noise_e/gain)^2``."""
    return np.maximum(sci, 0.0) / gain + (read_noise_e / gain) ** 2


def centre_psf(psf: np.ndarray, what: str = "PSF") -> np.ndarray:
    """Unit-sum, odd-sided PSF whose centroid sits on the central pixel.

    The centroid (Gaussian-windowed, sigma 1.5 px, about the peak) is moved onto a pixel centre by a
    cubic-spline shift when it is off by more than 0.001 px (e.g. an even-sided stamp), then the
    largest odd square about it is kept. Raises :class:`ProductError` for a PSF that is not 2-D,
    not finite or has no positive flux.
    """
    from scipy import ndimage

    psf = np.asarray(psf, dtype=float)
    if psf.ndim != 2 or min(psf.shape) < 3:
        raise ProductError(what, f"PSF must be a 2-D image of at least 3x3 pixels, got shape {psf.shape}")
    if not np.all(np.isfinite(psf)) or psf.sum() <= 0:
        raise ProductError(what, "PSF has non-finite values or no positive flux")
    cy, cx = (float(v) for v in np.unravel_index(np.argmax(psf), psf.shape))
    yy, xx = np.indices(psf.shape, dtype=float)
    pos = np.clip(psf, 0, None)
    for _ in range(30):  # Gaussian-windowed centroid (SExtractor XWIN): a symmetric profile's centre
        w = pos * np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / 1.5**2)
        dy, dx = (w * yy).sum() / w.sum() - cy, (w * xx).sum() / w.sum() - cx
        cy, cx = cy + 2.0 * dy, cx + 2.0 * dx
        if abs(dx) < 1e-5 and abs(dy) < 1e-5:
            break
    iy, ix = int(round(cy)), int(round(cx))
    if abs(cy - iy) > 1e-3 or abs(cx - ix) > 1e-3:
        psf = ndimage.shift(psf, (iy - cy, ix - cx), order=3, mode="constant")
    half = min(iy, psf.shape[0] - 1 - iy, ix, psf.shape[1] - 1 - ix)
    if half < 1:
        raise ProductError(what, f"PSF peak at ({cx:.1f}, {cy:.1f}) lies on the stamp edge")
    out = psf[iy - half: iy + half + 1, ix - half: ix + half + 1]
    if out.sum() <= 0:
        raise ProductError(what, "PSF has no positive flux about its centre")
    return out / out.sum()


def mid_exposure_mjd(header: Mapping[str, Any], exptime_s: float, what: str) -> float:
    """UTC mid-exposure MJD from a ZTF science header.

    Start of exposure = ``DATE-OBS`` (FITS: start of the observation); ``OBSMJD`` is read as the
    start too (the alert schema's ``jd``, taken from the image, is the start of exposure) unless
    it equals ``DATE-OBS + EXPTIME/2``, in which case it already is the midpoint. Without
    ``DATE-OBS``, ``OBSMJD`` + ``EXPTIME``/2. Raises :class:`SurveyError` when neither is present.
    """
    half = 0.5 * exptime_s / 86400.0
    start = None
    if header.get("DATE-OBS"):
        from astropy.time import Time

        try:
            start = float(Time(str(header["DATE-OBS"]).strip(), scale="utc").mjd)
        except ValueError as exc:
            raise SurveyError(f"{what}: header DATE-OBS={header['DATE-OBS']!r} is not an ISO date ({exc})") from exc
    obsmjd = _float(header.get("OBSMJD"))
    if start is None and obsmjd is None:
        raise SurveyError(f"{what}: header has neither DATE-OBS nor OBSMJD (expected the exposure start)")
    if start is None:
        return obsmjd + half
    if obsmjd is not None:
        tol = 1.0 / 86400.0
        if abs(obsmjd - (start + half)) < tol and abs(obsmjd - start) >= tol:
            return obsmjd  # this header's OBSMJD is already the midpoint
        if abs(obsmjd - start) >= tol:
            log.warning("%s: OBSMJD %.6f matches neither DATE-OBS %.6f nor its midpoint; using DATE-OBS",
                        what, obsmjd, start)
    return start + half


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _pixel_noise(image: np.ndarray, good: np.ndarray) -> float | None:
    """Per-pixel noise from differences of horizontal neighbours (robust MAD / sqrt 2): smooth
    light (sky, host) cancels, so the scatter is the noise, not the scene."""
    both = good[:, 1:] & good[:, :-1]
    if both.sum() < 50:
        return None
    return _mad_std((image[:, 1:] - image[:, :-1])[both]) / math.sqrt(2.0)


def psf_from_stars(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, *,
                   exclude_xy: tuple[float, float] | None = None, exclude_radius: float = 12.0,
                   saturate: float | None = None, size: int = 25, min_stars: int = 3,
                   max_stars: int = 25, detect_sigma: float = 15.0, what: str = "image"
                   ) -> tuple[np.ndarray, dict[str, float]]:
    """Unit-sum PSF stamp (``size`` px, odd) from isolated stars: an elliptical, pixel-integrated
    Moffat (:func:`transcene.ztf_alerts.fit_moffat`) fitted to each, the shape matrix and beta
    taken as medians over the stars whose FWHM lies within 15 % of the narrowest group (galaxies
    and blends are broader).

    Candidates: local maxima ``detect_sigma`` sigma above the median level, at least 7 px from
    the edge, ``exclude_radius`` px from ``exclude_xy`` (the target and its host), without
    another peak within 12 px or a masked/near-saturated pixel in the 13x13 fit box.
    Returns ``(psf, info)`` with info ``n_stars``, ``fwhm`` (px), ``beta``. Raises
    :class:`SurveyError` naming ``what`` when fewer than ``min_stars`` stars fit.
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=float)
    var = np.asarray(variance, dtype=float)
    good = (~mask) & np.isfinite(img) & np.isfinite(var) & (var > 0)
    if good.sum() < 100:
        raise SurveyError(f"{what}: too few usable pixels ({int(good.sum())}) to find PSF stars")
    level = float(np.median(img[good]))
    sigma = float(np.sqrt(np.median(var[good])))
    filled = np.where(good, img, level) - level
    smooth = ndimage.gaussian_filter(filled, 1.0)
    peak = (smooth == ndimage.maximum_filter(smooth, size=5))
    faint = np.argwhere(peak & (filled > 5.0 * sigma))
    bright = np.argwhere(peak & (filled > detect_sigma * sigma))
    r = FIT_RADIUS
    ny, nx = img.shape
    cands = []
    for y, x in bright:
        if not (r + 1 <= y < ny - r - 1 and r + 1 <= x < nx - r - 1):
            continue
        if exclude_xy is not None and math.hypot(x - exclude_xy[0], y - exclude_xy[1]) < exclude_radius:
            continue
        d = np.hypot(faint[:, 0] - y, faint[:, 1] - x)
        if np.any((d > 0) & (d < 2 * r)):
            continue
        box = (slice(y - r, y + r + 1), slice(x - r, x + r + 1))
        if not good[box].all() or (saturate is not None and img[box].max() >= 0.8 * saturate):
            continue
        cands.append((filled[y, x], int(x), int(y)))
    cands.sort(reverse=True)
    fits_ = []
    for _, x, y in cands[:max_stars]:
        try:
            f = fit_moffat(img, var, ~good, float(x), float(y), radius=r)
        except (ValueError, np.linalg.LinAlgError):
            continue
        if f.flux > 0 and 0.5 < f.fwhm < 20.0 and f.reduced_chi2 < 5.0 and np.all(np.linalg.eigvalsh(f.smat) > 0):
            fits_.append(f)
    if len(fits_) >= min_stars:
        fw = np.array([f.fwhm for f in fits_])
        core = float(np.median(np.sort(fw)[: max(min_stars, (len(fw) + 1) // 2)]))
        fits_ = [f for f in fits_ if abs(f.fwhm / core - 1.0) <= 0.15]
    if len(fits_) < min_stars:
        raise SurveyError(f"{what}: only {len(fits_)} isolated, unsaturated stars with a good Moffat fit "
                          f"({len(cands)} candidates); need {min_stars} to estimate the reference PSF")
    smat = np.median(np.stack([f.smat for f in fits_]), axis=0)
    if np.any(np.linalg.eigvalsh(smat) <= 0):  # medians of elements need not be positive definite
        smat = np.mean(np.stack([f.smat for f in fits_]), axis=0)
    beta = float(np.median([f.beta for f in fits_]))
    psf = moffat_psf(smat, beta, size=size)
    fwhm = float(np.median([f.fwhm for f in fits_]))
    return psf, {"n_stars": float(len(fits_)), "fwhm": fwhm, "beta": beta}


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


class ZtfAdapter(SurveyAdapter):
    """ZTF through IRSA: ``query`` searches the IBE ``sci`` and ``ref`` tables at the target;
    ``fetch`` cuts out the science image, mask and PSF (or the reference image and its
    uncertainty) and builds one epoch."""

    def _extra(self, key: str, default: Any) -> Any:
        return self.ctx.descriptor.extra.get(key, default)

    def covers(self, coord) -> bool:
        return float(coord.icrs.dec.deg) > float(self._extra("min_dec_deg", -90.0))

    # -- query -------------------------------------------------------------------------------
    def _search(self, endpoint: str, params: Mapping[str, str], required: Sequence[str]) -> list[dict[str, str]]:
        url = self.ctx.endpoint(endpoint)
        try:
            body = self.ctx.cache.metadata(self.ctx.client, self.name, url, params, kind="text")
        except DownloadError as exc:
            if exc.status in (401, 403):
                raise AuthRequired(f"{url}: IRSA refused the search ({exc.reason}); set "
                                   "TRANSCENE_ZTF_USER/TRANSCENE_ZTF_PASSWORD for proprietary data") from exc
            raise
        return parse_ibe_csv(body, required, url)

    def query(self, coord, *, size_pix: int, bands: Sequence[str] | None = None,
              start: float | None = None, end: float | None = None) -> list[EpochRef]:
        icrs = coord.icrs
        ra, dec = float(icrs.ra.deg), float(icrs.dec.deg)
        fcs = [fc for fc, b in FILTERS.items() if band_matches(b, bands)]
        if not fcs:
            return []
        # obsjd is the exposure start: widen the server-side window, then cut on mid-exposure.
        pad = 0.01
        params = search_params(ra, dec, filtercodes=fcs,
                               jd_start=None if start is None else start + JD_MJD - pad,
                               jd_end=None if end is None else end + JD_MJD + pad)
        data = self.ctx.endpoint("data")
        sci_url = self.ctx.endpoint("search_sci")
        out: list[EpochRef] = []
        groups: set[tuple[int, int, int, str]] = set()
        n_bad = 0
        for row in self._search("search_sci", params, SCI_COLUMNS):
            fc = row["filtercode"]
            if fc not in fcs:
                continue
            try:
                key = (int(row["field"]), int(row["ccdid"]), int(row["qid"]), fc)
                jd = float(row["obsjd"])
            except ValueError as exc:
                raise ServiceChanged(f"{sci_url}: sci row with non-numeric field/ccdid/qid/obsjd: {exc}") from exc
            infobits = _float(row.get("infobits"))
            if infobits is not None and infobits >= INFOBITS_BAD:
                n_bad += 1
                continue
            exptime = _float(row.get("exptime"))
            mjd = jd - JD_MJD + (0.5 * exptime / 86400.0 if exptime else 0.0)
            if (start is not None and mjd < start) or (end is not None and mjd > end):
                continue
            base = sci_product_base(data, row)
            out.append(EpochRef(
                survey=self.name, exposure_id=science_exposure_id(row), band=FILTERS[fc], mjd=mjd,
                kind="science", timesys="UTC",
                locator={"sciimg": base + "sciimg.fits", "mskimg": base + "mskimg.fits",
                         "psf": base + "sciimgdaopsfcent.fits", "exptime": exptime},
                meta={k: row[k] for k in _SCI_META if row.get(k)} | {"field": key[0], "ccdid": key[1], "qid": key[2]},
            ))
            groups.add(key)
        if n_bad:
            log.info("ztf: skipped %d science images flagged bad (infobits >= 2^25)", n_bad)
        if not out:
            return []
        out.sort(key=lambda r: (r.mjd, r.exposure_id))
        return out + self._references(ra, dec, fcs, groups, start)

    def _references(self, ra: float, dec: float, fcs: Sequence[str], groups: set,
                    start: float | None) -> list[EpochRef]:
        data = self.ctx.endpoint("data")
        chosen: dict[tuple[int, int, int, str], dict[str, str]] = {}
        for row in self._search("search_ref", search_params(ra, dec, filtercodes=fcs), REF_COLUMNS):
            try:
                key = (int(row["field"]), int(row["ccdid"]), int(row["qid"]), row["filtercode"])
            except ValueError as exc:
                raise ServiceChanged(f"{self.ctx.endpoint('search_ref')}: ref row with non-numeric "
                                     f"field/ccdid/qid: {exc}") from exc
            if key not in groups:
                continue
            if key in chosen:  # keep the newest build
                if (_float(row.get("rfid")) or 0) <= (_float(chosen[key].get("rfid")) or 0):
                    continue
            chosen[key] = row
        for key in sorted(groups - set(chosen)):
            log.info("ztf: no reference image for field %d ccd %d q%d %s", *key)
        refs = []
        for key, row in sorted(chosen.items()):
            t0, t1 = _iso_mjd(row.get("startobsdate")), _iso_mjd(row.get("endobsdate"))
            mjd = 0.5 * (t0 + t1) if t0 is not None and t1 is not None else math.nan
            if t1 is not None and start is not None and t1 >= start:
                log.warning("ztf: reference %s includes images up to MJD %.1f, after the requested start "
                            "%.1f: it may contain transient light", reference_exposure_id(row), t1, start)
            base = ref_product_base(data, row)
            refs.append(EpochRef(
                survey=self.name, exposure_id=reference_exposure_id(row), band=FILTERS[key[3]], mjd=mjd,
                kind="reference", timesys="UTC",
                locator={"refimg": base + "refimg.fits", "refunc": base + "refunc.fits"},
                meta={k: row[k] for k in _REF_META if row.get(k)} | {"field": key[0], "ccdid": key[1], "qid": key[2]},
            ))
        return refs

    # -- fetch -------------------------------------------------------------------------------
    def fetch(self, ref: EpochRef, coord, *, size_pix: int) -> list[Epoch]:
        if ref.kind == "reference":
            return [self._fetch_reference(ref, coord, int(size_pix))]
        return [self._fetch_science(ref, coord, int(size_pix))]

    def _image(self, url: str, params: Mapping[str, str] | None, what: str) -> tuple[np.ndarray, fits.Header, str]:
        """Download (through the cache) and read the first image HDU: ``(data, header, shown_url)``."""
        shown = url + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")
        try:
            path, _ = self.ctx.cache.product(self.ctx.client, self.name, url, params, kind="fits", what=shown)
        except DownloadError as exc:
            if exc.status in (401, 403):
                raise AuthRequired(f"{shown}: IRSA refused the {what} ({exc.reason}); set "
                                   "TRANSCENE_ZTF_USER/TRANSCENE_ZTF_PASSWORD for proprietary data") from exc
            if exc.status == 400 and params:
                raise SurveyError(f"{shown}: IRSA refused the {what} cutout (HTTP 400: the cutout does not "
                                  "intersect the image, i.e. the image does not cover the target)") from exc
            raise
        try:
            with fits.open(path, memmap=False) as hdul:
                hdu = next((h for h in hdul if h.data is not None and h.data.ndim == 2), None)
                data = None if hdu is None else (np.array(hdu.data, dtype=float), hdu.header.copy())
        except (OSError, ValueError) as exc:
            raise ProductError(shown, f"{what} does not read as FITS: {exc}") from exc
        if data is None:
            raise ProductError(shown, f"{what}: no 2-D image HDU")
        return data[0], data[1], shown

    @staticmethod
    def _keyword(header: fits.Header, key: str, shown: str, meaning: str, *, positive: bool = False) -> float:
        value = _float(header.get(key))
        if value is None or (positive and value <= 0):
            got = "missing" if key not in header else f"{header[key]!r}"
            raise SurveyError(f"{shown}: header keyword {key} is {got}; expected {meaning}")
        return value

    def _fetch_science(self, ref: EpochRef, coord, size: int) -> Epoch:
        loc = ref.locator
        icrs = coord.icrs
        params = cutout_params(float(icrs.ra.deg), float(icrs.dec.deg), size)
        sci, hdr, shown = self._image(loc["sciimg"], params, "science image")
        bits, _, mshown = self._image(loc["mskimg"], params, "mask image")
        psf_raw, _, pshown = self._image(loc["psf"], None, "PSF")
        if bits.shape != sci.shape:
            raise ProductError(mshown, f"mask cutout shape {bits.shape} differs from the science cutout {sci.shape}")
        wcs = celestial_wcs(hdr, shown)
        target_pixel(wcs, coord, sci.shape, shown)
        zp = self._keyword(hdr, "MAGZP", shown, "the AB zero point of the image (MAGZP, mag)")
        exptime = _float(hdr.get("EXPTIME")) or _float(loc.get("exptime"))
        if not exptime or exptime <= 0:
            raise SurveyError(f"{shown}: header keyword EXPTIME is missing (and no exptime in the metadata); "
                              "expected the exposure time in s")
        mjd = mid_exposure_mjd(hdr, exptime, shown)
        psf = centre_psf(psf_raw, pshown)

        finite = np.isfinite(sci)
        mask = bad_pixels(np.where(np.isfinite(bits), bits, 0)) | ~finite | ~np.isfinite(bits)
        saturate = _float(hdr.get("SATURATE"))
        if saturate is not None:
            mask |= finite & (sci >= saturate)
        else:
            log.info("%s: no SATURATE keyword; only mask bit 8 flags saturation", shown)
        image = np.where(finite, sci, 0.0)
        gain = _float(hdr.get("GAIN"))
        if gain is None or gain <= 0:
            gain = float(self._extra("nominal_gain_e_per_dn", 6.2))
            log.warning("%s: no valid GAIN keyword; using the nominal %.2f e-/DN", shown, gain)
        read_noise = _float(hdr.get("READNOI"))
        good = ~mask
        noise = _pixel_noise(image, good)
        if read_noise is None or read_noise < 0:
            # read-noise variance = the pixel scatter beyond the Poisson term of the sky
            sky = float(np.median(np.maximum(image[good], 0))) if good.any() else 0.0
            read_noise = math.sqrt(max((noise or 0.0) ** 2 - sky / gain, 0.0)) * gain
            log.warning("%s: no READNOI keyword; read noise %.2f e- estimated from the pixel scatter",
                        shown, read_noise)
        variance = science_variance(image, gain, read_noise)
        if noise is not None:
            ratio = noise**2 / float(np.median(variance[good]))
            if not 0.5 < ratio < 2.0:
                log.warning("%s: pixel scatter^2 / modelled variance = %.2f (GAIN=%.3g, READNOI=%.3g)",
                            shown, ratio, gain, read_noise)
        variance = np.where(mask, np.inf, variance)
        return Epoch(image=image, variance=variance, mask=mask, psf=psf, wcs=wcs, mjd=mjd, band=ref.band,
                     zeropoint=zp, timesys="UTC", survey=self.name, exposure_id=ref.exposure_id,
                     is_reference=False, gain=gain, saturate=saturate)

    def _fetch_reference(self, ref: EpochRef, coord, size: int) -> Epoch:
        from astropy.nddata import Cutout2D

        loc = ref.locator
        icrs = coord.icrs
        # One wider cutout serves both the PSF stars and (trimmed) the epoch itself.
        big = max(size, int(self._extra("ref_psf_size_pix", 151)))
        params = cutout_params(float(icrs.ra.deg), float(icrs.dec.deg), big)
        img, hdr, shown = self._image(loc["refimg"], params, "reference image")
        unc, _, ushown = self._image(loc["refunc"], params, "reference uncertainty image")
        if unc.shape != img.shape:
            raise ProductError(ushown, f"uncertainty cutout shape {unc.shape} differs from the image {img.shape}")
        wcs = celestial_wcs(hdr, shown)
        x, y = target_pixel(wcs, coord, img.shape, shown)
        zp = self._keyword(hdr, "MAGZP", shown, "the AB zero point of the reference image (MAGZP, mag)")
        if not math.isfinite(ref.mjd):
            raise SurveyError(f"reference {ref.exposure_id}: the IBE ref row has no startobsdate/endobsdate; "
                              "expected the dates of the images it coadds")
        finite = np.isfinite(img)
        good_unc = np.isfinite(unc) & (unc > 0)
        mask = ~finite | ~good_unc
        saturate = _float(hdr.get("SATURATE"))
        if saturate is not None:
            mask |= finite & (img >= saturate)
        image = np.where(finite, img, 0.0)
        variance = np.where(mask, np.inf, np.where(good_unc, unc, 1.0) ** 2)
        psf, info = psf_from_stars(image, variance, mask, exclude_xy=(x, y), saturate=saturate,
                                   size=int(self._extra("psf_size_pix", 25)), what=shown)
        log.info("%s: reference PSF from %d stars, FWHM %.2f px, beta %.2f", shown, info["n_stars"],
                 info["fwhm"], info["beta"])
        if big > size:
            cut = Cutout2D(image, (x, y), (size, size), wcs=wcs, mode="trim")
            sl = cut.slices_original
            image, variance, mask, wcs = cut.data, variance[sl], mask[sl], cut.wcs
            target_pixel(wcs, coord, image.shape, shown)
        if mask.all():
            raise SurveyError(f"{shown}: every pixel of the reference cutout is unusable (refunc <= 0 or NaN)")
        return Epoch(image=np.array(image), variance=np.array(variance), mask=np.array(mask), psf=psf, wcs=wcs,
                     mjd=float(ref.mjd), band=ref.band, zeropoint=zp, timesys="UTC", survey=self.name,
                     exposure_id=ref.exposure_id, is_reference=True, gain=None, saturate=saturate)


def _iso_mjd(value: str | None) -> float | None:
    """MJD (UTC) of an IBE date string such as ``2018-03-22 09:59:31.234+00`` (None if absent/unreadable)."""
    if not value:
        return None
    from astropy.time import Time

    text = str(value).strip().replace(" ", "T", 1)
    for suffix in ("+00:00", "+00", "Z"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    try:
        return float(Time(text, scale="utc").mjd)
    except ValueError:
        log.warning("ztf: unreadable IBE date %r", value)
        return None
