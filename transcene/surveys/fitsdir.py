"""The generic adapter: a local directory of FITS images.

Two kinds of file are accepted: epoch files in the core format (HDUs SCI, VAR/IVAR, MASK, PSF;
see the README), and plain images (one image HDU with a celestial WCS and header keywords; what
is read from where is in ``surveys/fits.toml``). Each is cut to ``size_pix`` around the target.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS, FITSFixedWarning

from transcene.epoch import Epoch
from transcene.errors import EpochFileError, EpochSkippedWarning
from transcene.io import EPOCH_FILE_SUFFIXES, read_epoch
from transcene.surveys.base import EpochRef, NoCoverage, SurveyAdapter, SurveyError

__all__ = ["FitsDirAdapter", "read_plain_image", "gaussian_psf"]

log = logging.getLogger(__name__)

ZP_KEYS = ("MAGZP", "ZP", "MAGZERO")


def gaussian_psf(fwhm_pix: float, *, size: int | None = None) -> np.ndarray:
    """Pixel-integrated round Gaussian of FWHM ``fwhm_pix``, odd size (about 4 FWHM), unit sum."""
    from scipy.special import erf

    sigma = fwhm_pix / (2 * math.sqrt(2 * math.log(2)))
    half = size // 2 if size else max(3, int(math.ceil(2 * fwhm_pix)))
    edges = np.arange(-half - 0.5, half + 1.0)
    cdf = 0.5 * (1 + erf(edges / (math.sqrt(2) * sigma)))
    p1 = np.diff(cdf)
    psf = np.outer(p1, p1)
    return psf / psf.sum()


def _wcs(path: Path, header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)  # archive headers: astropy repairs them
        try:
            w = WCS(header)
        except Exception as exc:  # noqa: BLE001 - wcslib raises many types
            raise EpochFileError(path, f"WCS cannot be used: {' '.join(str(exc).split())}", field="WCS") from exc
    if not w.has_celestial:
        raise EpochFileError(path, "no celestial WCS (CTYPE1/2, CRVAL, CRPIX, CD...)", field="WCS")
    return w.celestial


def _science_hdu(path: Path, hdul: fits.HDUList):
    if "SCI" in hdul:
        return hdul["SCI"]
    for hdu in hdul:  # from the header: the pixels are read only when needed
        if hdu.is_image and hdu.header.get("NAXIS") == 2:
            return hdu
    raise EpochFileError(path, "no 2-D image HDU", field="SCI")


def _is_epoch_file(hdul: fits.HDUList) -> bool:
    return all(name in hdul for name in ("SCI", "PSF")) and ("VAR" in hdul or "IVAR" in hdul)


def _number(path: Path, hdr: fits.Header, keys: tuple[str, ...], what: str):
    for k in keys:
        v = hdr.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v), k
    raise EpochFileError(path, f"no {what}: expected one of the keywords {', '.join(keys)}", field=keys[0])


def _mid_mjd(path: Path, hdr: fits.Header) -> float:
    if isinstance(hdr.get("MJD-MID"), (int, float)):
        return float(hdr["MJD-MID"])
    start, _ = _number(path, hdr, ("MJD-OBS",), "observation time (MJD-MID, or MJD-OBS with EXPTIME)")
    exptime = hdr.get("EXPTIME")
    if not isinstance(exptime, (int, float)):
        raise EpochFileError(path, "MJD-OBS is the start of the exposure (FITS convention): EXPTIME is needed "
                             "to get mid-exposure, or give MJD-MID", field="EXPTIME")
    return start + float(exptime) / 2 / 86400


def read_plain_image(path: str | Path) -> Epoch:
    """An epoch from a plain FITS image (keywords and extensions as in ``surveys/fits.toml``)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, fits.open(fh, memmap=False) as hdul:
            sci = _science_hdu(path, hdul)
            hdr = sci.header
            image = np.asarray(sci.data, float)
            wcs = _wcs(path, hdr)
            zp, _ = _number(path, hdr, ZP_KEYS, "AB zero point")
            mjd = _mid_mjd(path, hdr)
            band = str(hdr.get("BAND") or hdr.get("FILTER") or "").strip()
            if not band:
                raise EpochFileError(path, "no band: expected keyword BAND or FILTER", field="BAND")
            gain = hdr.get("GAIN")
            gain = float(gain) if isinstance(gain, (int, float)) and gain > 0 else None
            finite = np.isfinite(image)
            if "VAR" in hdul:
                var = np.asarray(hdul["VAR"].data, float)
            elif "IVAR" in hdul or "WEIGHT" in hdul:
                with np.errstate(divide="ignore"):
                    var = 1.0 / np.asarray(hdul["IVAR" if "IVAR" in hdul else "WEIGHT"].data, float)
            else:
                _, sky, sigma = sigma_clipped_stats(image[finite], sigma=3.0)
                var = np.full(image.shape, sigma**2)
                if gain:
                    var = var + np.clip(image - sky, 0, None) / gain
                log.info("%s: no variance extension; sky sigma %.3g%s", path.name, sigma,
                         " plus Poisson noise with GAIN" if gain else " (no GAIN: no source Poisson term)")
            mask = ~finite | ~np.isfinite(var) | (var <= 0)
            for name in ("MASK", "DQ"):
                if name in hdul:
                    mask |= np.asarray(hdul[name].data) != 0
            if "SATURATE" in hdr:
                mask |= image >= float(hdr["SATURATE"])
            if "PSF" in hdul:
                psf = np.asarray(hdul["PSF"].data, float)
                if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0 or not psf.sum() > 0:
                    raise EpochFileError(path, f"PSF must be 2-D, odd-sized, positive sum; got {psf.shape}", field="PSF")
                psf = psf / psf.sum()
            elif isinstance(hdr.get("FWHM"), (int, float)) and hdr["FWHM"] > 0:
                psf = gaussian_psf(float(hdr["FWHM"]))
            elif isinstance(hdr.get("SEEING"), (int, float)) and hdr["SEEING"] > 0:
                scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600
                psf = gaussian_psf(float(hdr["SEEING"]) / scale)
            else:
                raise EpochFileError(path, "no PSF: add an extension PSF or a keyword FWHM (pixels) or SEEING "
                                     "(arcsec)", field="PSF")
    except EpochFileError:
        raise
    except (OSError, ValueError, fits.VerifyError) as exc:
        raise EpochFileError(path, f"cannot read as FITS: {' '.join(str(exc).split())}") from exc
    return Epoch(image=np.where(finite, image, 0.0), variance=np.where(mask, np.inf, var), mask=mask, psf=psf,
                 wcs=wcs, mjd=mjd, band=band, zeropoint=zp, timesys=str(hdr.get("TIMESYS", "UTC")).upper(),
                 survey=str(hdr.get("SURVEY", "")).strip(), exposure_id=str(hdr.get("EXPID") or path.stem),
                 is_reference=bool(hdr.get("REFEPOCH", False)), gain=gain, path=str(path))


def cut(epoch: Epoch, coord, size_pix: int) -> Epoch:
    """``epoch`` trimmed to ``size_pix`` around ``coord`` (smaller at the image edge)."""
    ny, nx = epoch.shape
    if ny <= size_pix and nx <= size_pix:
        return epoch
    x, y = (float(v) for v in epoch.wcs.world_to_pixel(coord))
    c = Cutout2D(epoch.image, (x, y), (size_pix, size_pix), wcs=epoch.wcs, mode="trim")
    sl = c.slices_original
    return epoch.replace(image=c.data, variance=epoch.variance[sl], mask=epoch.mask[sl], wcs=c.wcs)


class FitsDirAdapter(SurveyAdapter):
    """Epochs from the FITS files in ``ctx.local_dir`` (or the config's ``directory``)."""

    def _dir(self) -> Path:
        d = self.ctx.local_dir or (self.ctx.config.get("surveys", {}).get(self.name, {}) or {}).get("directory")
        if not d:
            raise SurveyError(f"survey {self.name!r} reads a local directory: give one (--dir, or "
                              f"[surveys.{self.name}] directory in the config file)")
        d = Path(d)
        if not d.is_dir():
            raise SurveyError(f"{d}: not a directory")
        return d

    def query(self, coord, *, size_pix, bands=None, start=None, end=None) -> list[EpochRef]:
        files = sorted(p for p in self._dir().iterdir() if p.is_file() and p.name.lower().endswith(EPOCH_FILE_SUFFIXES))
        refs = []
        for p in files:
            try:
                # our own handle: astropy leaves its file open when a header is truncated
                with open(p, "rb") as fh, fits.open(fh, memmap=False) as hdul:
                    sci = _science_hdu(p, hdul)
                    hdr, shape = sci.header, (sci.header["NAXIS2"], sci.header["NAXIS1"])
                    epoch_file = _is_epoch_file(hdul)
                    w = _wcs(p, hdr)
                    x, y = (float(v) for v in w.world_to_pixel(coord))
                    if not (-0.5 <= x <= shape[1] - 0.5 and -0.5 <= y <= shape[0] - 0.5):
                        log.debug("%s does not contain the target", p.name)
                        continue  # a file of another field is not a failure, whatever it lacks
                    mjd = float(hdr["MJD-OBS"]) if epoch_file else _mid_mjd(p, hdr)
            except Exception as exc:  # noqa: BLE001 - any unreadable file (astropy raises many types)
                # an unreadable file becomes a failed epoch at fetch, with the reason
                why = exc.problem if isinstance(exc, EpochFileError) else f"cannot read as FITS: {' '.join(str(exc).split())}"
                refs.append(EpochRef(self.name, p.stem, "", math.nan, locator={"path": str(p), "error": why}))
                continue
            band = str(hdr.get("BAND") or hdr.get("FILTER") or "").strip()
            refs.append(EpochRef(self.name, str(hdr.get("EXPID") or p.stem), band, mjd,
                                 kind="reference" if hdr.get("REFEPOCH") else "science",
                                 timesys=str(hdr.get("TIMESYS", "UTC")).upper(),
                                 locator={"path": str(p), "epoch_file": epoch_file}))
        if not refs:
            raise NoCoverage(f"no FITS file in {self._dir()} contains {coord.to_string('hmsdms')}")
        return refs

    def fetch(self, ref: EpochRef, coord, *, size_pix: int) -> list[Epoch]:
        path = Path(ref.locator["path"])
        if "error" in ref.locator:
            raise EpochFileError(path, ref.locator["error"])
        with warnings.catch_warnings(record=True) as caught:
            # the reader warns about masked pixels; here that is a log line of the run, not a warning
            warnings.simplefilter("always", EpochSkippedWarning)
            ep = read_epoch(path) if ref.locator.get("epoch_file") else read_plain_image(path)
        for w in caught:
            log.info("%s", w.message)
        ep = cut(ep, coord, size_pix)
        return [ep.replace(survey=ep.survey or self.name)]
