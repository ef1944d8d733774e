"""The epoch record: one image of the sky with everything needed to model it.

An :class:`Epoch` is plain numpy + astropy (never traced by JAX). It holds the pixels in the
file's own units; the conversion to nJy happens once, when epochs are stacked into a
:class:`~transcene.dataset.Dataset`.

Conventions: arrays are ``[y, x]``; pixel centres sit at integer coordinates (astropy origin 0);
``mask`` is True where a pixel must not be used; the PSF is odd-sized, centred on its central
pixel and sampled on the image grid times ``psf_oversample``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

__all__ = ["Epoch", "write_epoch", "NJY_AB_ZEROPOINT"]

#: AB magnitude of 1 nJy: m_AB = 31.4 - 2.5 log10(f / nJy).
NJY_AB_ZEROPOINT = 31.4


@dataclasses.dataclass(frozen=True, eq=False)
class Epoch:
    """One epoch: image, variance, mask, PSF, WCS, time and photometric calibration.

    Attributes:
        image: ``[y, x]`` pixel values in the file's units (counts or DN).
        variance: ``[y, x]`` variance of ``image`` (same units squared); ``inf`` where unknown.
        mask: ``[y, x]`` bool, True where the pixel must not be used.
        psf: odd-sized PSF image, centred on its central pixel, unit sum.
        psf_oversample: integer k: the PSF is sampled on the image grid refined k times. Give
            k >= 2 whenever the PSF's FWHM is below ~2 pixels: point sources are then shifted on
            the fine grid (a native-sampled undersampled PSF rings between pixel centres).
        wcs: celestial WCS of ``image`` (astropy, any projection/distortion astropy reads).
        mjd: mid-exposure modified Julian date in time scale ``timesys``.
        timesys: time scale of ``mjd`` (``"UTC"`` or ``"TAI"``...).
        band: filter name as written in the file (e.g. ``"ztfr"``, ``"g"``).
        zeropoint: AB zero point: m_AB = zeropoint - 2.5 log10(sum of pixel values).
        survey: survey name (free text, e.g. ``"ZTF"``).
        exposure_id: identifier that lets a light-curve row be matched to its input.
        is_reference: True for an image known to contain no transient light.
        gain: electrons per image unit, if known.
        saturate: saturation level in image units, if known.
        path: file the epoch was read from (provenance), if any.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    psf: np.ndarray
    wcs: WCS
    mjd: float
    band: str
    zeropoint: float
    psf_oversample: int = 1
    timesys: str = "UTC"
    survey: str = ""
    exposure_id: str = ""
    is_reference: bool = False
    gain: float | None = None
    saturate: float | None = None
    path: str | None = None

    def __post_init__(self):
        where = f" (epoch {self.exposure_id or self.path or '?'})"
        if self.image.ndim != 2:
            raise ValueError(f"image must be 2-D, got shape {self.image.shape}{where}")
        for name in ("variance", "mask"):
            arr = getattr(self, name)
            if arr.shape != self.image.shape:
                raise ValueError(
                    f"{name} shape {arr.shape} differs from image shape {self.image.shape}{where}"
                )
        if self.psf.ndim != 2 or self.psf.shape[0] % 2 == 0 or self.psf.shape[1] % 2 == 0:
            raise ValueError(f"psf must be 2-D with odd sides, got shape {self.psf.shape}{where}")
        if int(self.psf_oversample) < 1:
            raise ValueError(f"psf_oversample must be >= 1, got {self.psf_oversample}{where}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    @property
    def njy_per_unit(self) -> float:
        """Factor turning image units into nJy (from the AB zero point)."""
        return float(10.0 ** (-0.4 * (self.zeropoint - NJY_AB_ZEROPOINT)))

    @property
    def weight(self) -> np.ndarray:
        """Inverse variance in image units^-2, zero where masked, non-finite or variance <= 0."""
        with np.errstate(divide="ignore", invalid="ignore"):
            w = 1.0 / self.variance
        good = (~self.mask) & np.isfinite(self.image) & np.isfinite(w) & (self.variance > 0)
        return np.where(good, w, 0.0)

    def replace(self, **changes) -> "Epoch":
        return dataclasses.replace(self, **changes)


def write_epoch(path: str | Path, epoch: Epoch, *, overwrite: bool = False) -> Path:
    """Write ``epoch`` as an epoch file (HDUs SCI, VAR, MASK, PSF; see the README)."""
    path = Path(path)
    hdr = epoch.wcs.to_header(relax=True)
    hdr["MJD-OBS"] = (float(epoch.mjd), "mid-exposure MJD")
    hdr["TIMESYS"] = (epoch.timesys, "time scale of MJD-OBS")
    hdr["BAND"] = (epoch.band, "filter")
    hdr["MAGZP"] = (float(epoch.zeropoint), "AB zero point")
    if epoch.survey:
        hdr["SURVEY"] = epoch.survey
    if epoch.exposure_id:
        hdr["EXPID"] = epoch.exposure_id
    if epoch.gain is not None:
        hdr["GAIN"] = (float(epoch.gain), "e-/unit")
    if epoch.saturate is not None:
        hdr["SATURATE"] = (float(epoch.saturate), "saturation level, image units")
    hdr["REFEPOCH"] = (bool(epoch.is_reference), "T: image contains no transient light")
    hdr["BUNIT"] = "adu"
    sci = fits.ImageHDU(np.asarray(epoch.image, dtype=np.float32), header=hdr, name="SCI")
    var = fits.ImageHDU(np.asarray(epoch.variance, dtype=np.float32), name="VAR")
    mask = fits.ImageHDU(np.asarray(epoch.mask, dtype=np.uint8), name="MASK")
    psf_hdr = fits.Header()
    psf_hdr["PSFSAMP"] = (int(epoch.psf_oversample), "PSF oversampling factor")
    psf = fits.ImageHDU(np.asarray(epoch.psf, dtype=np.float32), header=psf_hdr, name="PSF")
    fits.HDUList([fits.PrimaryHDU(), sci, var, mask, psf]).writeto(path, overwrite=overwrite)
    return path
