"""Reading and validating epoch files (one FITS file per epoch; format in the README).

:func:`read_epoch` turns one file into an :class:`~transcene.epoch.Epoch` or raises an
:class:`~transcene.errors.EpochFileError` naming the file, the HDU/keyword and what was expected.
:func:`read_epochs` reads many files and checks them against each other (duplicates, time
systems) and, optionally, against a target position.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from transcene.epoch import Epoch
from transcene.errors import DatasetError, EpochFileError, EpochSkippedWarning

if TYPE_CHECKING:
    from astropy.coordinates import SkyCoord

__all__ = ["read_epoch", "read_epochs", "TIME_SYSTEMS", "EPOCH_FILE_SUFFIXES"]

logger = logging.getLogger(__name__)

#: Time scales accepted in ``TIMESYS`` (``MJD-OBS`` is in this scale; UTC when absent).
TIME_SYSTEMS = ("UTC", "TAI", "TT", "GPS")
#: File names a directory argument of :func:`read_epochs` expands to.
EPOCH_FILE_SUFFIXES = (".fits", ".fits.gz", ".fit")

PathLike = str | os.PathLike


def read_epoch(path: PathLike) -> Epoch:
    """Read and validate one epoch file.

    Pixel handling: a non-zero ``MASK`` pixel is masked. ``IVAR`` is turned into variance
    (``1/ivar``; ``ivar == 0``, the usual "no data" marker, becomes ``inf`` and is masked
    silently). Unmasked pixels with an unusable variance (``<= 0`` or non-finite, or ``ivar``
    negative or non-finite), a non-finite image value, or an image value ``>= SATURATE`` are
    masked too, and one :class:`EpochSkippedWarning` per file says how many and why. Masked
    pixels with a non-finite image value are set to 0 and unusable variances to ``inf`` so
    that nothing downstream meets a NaN. A file whose every pixel is masked is an error.

    ``Epoch.image``/``variance`` are float64 in the file's units (and units squared); ``psf``
    is float64 with unit sum; ``mjd`` is in days in the scale ``TIMESYS`` (upper-cased).
    ``exposure_id`` is ``EXPID``, or the file name when absent.

    Raises:
        EpochFileError: the file is unreadable or breaks the epoch-file format.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh, fits.open(fh, memmap=False) as hdul:  # own handle: astropy leaks it on a truncated header
            return _read_hdul(path, hdul)
    except EpochFileError:
        raise
    except (OSError, ValueError, fits.VerifyError) as exc:
        # astropy raises these for missing, empty, truncated or non-FITS files.
        raise EpochFileError(path, f"cannot read as FITS: {' '.join(str(exc).split())}") from exc


def read_epochs(
    paths: PathLike | Iterable[PathLike], *, target: SkyCoord | None = None
) -> list[Epoch]:
    """Read many epoch files (directories expand to their sorted ``*.fits``, ``*.fits.gz``,
    ``*.fit`` files) and check them as a set. Returns epochs in the order given.

    With ``target`` (a scalar SkyCoord), epochs whose image does not contain it
    (``-0.5 <= x <= nx - 0.5`` and the same in y, pixel centres at integers) are skipped with an
    :class:`EpochSkippedWarning`.

    The set checks (duplicates, time systems) apply to the epochs kept. Time systems are never
    converted: files with different ``TIMESYS`` are refused, because silently mixing scales
    shifts times by tens of seconds (TAI - UTC = 37 s) and the user should choose the
    conversion knowingly.

    Raises:
        EpochFileError: a file is unreadable or invalid.
        DatasetError: no files; the target lies outside every epoch; duplicate epochs (same
            ``EXPID``, or same MJD, band and image); mixed time systems.
    """
    files = _expand(paths)
    epochs = [read_epoch(f) for f in files]
    if target is not None:
        epochs = _on_target(epochs, target)
    _check_duplicates(epochs)
    _check_time_systems(epochs)
    return epochs


# --------------------------------------------------------------------------- one file


def _read_hdul(path: Path, hdul: fits.HDUList) -> Epoch:
    sci = _image_hdu(path, hdul, "SCI", required=True)
    image = np.asarray(sci.data, dtype=np.float64)
    if image.ndim != 2 or image.size == 0:
        raise EpochFileError(
            path, f"SCI image must be 2-D and non-empty, got shape {image.shape}", field="SCI"
        )
    hdr = sci.header
    mjd = _number(path, hdr, "MJD-OBS", "mid-exposure MJD, a finite number", required=True)
    timesys = _timesys(path, hdr)
    band = _band(path, hdr)
    zeropoint = _number(path, hdr, "MAGZP", "AB zero point, a finite number", required=True)
    gain = _number(path, hdr, "GAIN", "electrons per image unit, a positive number")
    if gain is not None and gain <= 0:
        raise EpochFileError(path, f"SCI header GAIN={gain}, expected > 0", field="SCI:GAIN")
    saturate = _number(path, hdr, "SATURATE", "saturation level in image units, a number")
    is_reference = _flag(path, hdr, "REFEPOCH")
    survey = str(_get(hdr, "SURVEY") or "").strip()
    expid = _get(hdr, "EXPID")
    expid = (str(expid).strip() if expid is not None else "") or path.name
    wcs = _celestial_wcs(path, hdul, sci, image.shape)
    psf, oversample = _psf(path, hdul, hdr)

    variance, bad_var, nodata = _variance(path, hdul, image.shape)
    mask = np.zeros(image.shape, dtype=bool)
    mask_hdu = _image_hdu(path, hdul, "MASK", required=False)
    if mask_hdu is not None:
        mask = _same_shape(path, mask_hdu, "MASK", image.shape) != 0
    mask |= nodata
    checks = [("unusable variance", bad_var), ("non-finite image value", ~np.isfinite(image))]
    if saturate is not None:
        checks.append((f"image >= SATURATE={saturate:g}", image >= saturate))
    reasons: dict[str, int] = {}
    for why, bad in checks:
        new = bad & ~mask
        if new.any():
            reasons[why] = int(new.sum())
            mask |= new
    if mask.all():
        raise EpochFileError(
            path, "every pixel is masked (MASK, VAR/IVAR, non-finite or saturated pixels)",
            field="MASK",
        )
    if reasons:
        detail = ", ".join(f"{n} with {why}" for why, n in reasons.items())
        warnings.warn(
            EpochSkippedWarning(f"{path}: masked {sum(reasons.values())} pixels ({detail})"),
            stacklevel=3,
        )
    image = np.where(np.isfinite(image), image, 0.0)
    variance = np.where(bad_var | nodata, np.inf, variance)

    logger.debug(
        "read %s: %s px, band %s, MJD %.6f %s, psf %s x%d, %d masked",
        path, image.shape, band, mjd, timesys, psf.shape, oversample, int(mask.sum()),
    )
    return Epoch(
        image=image, variance=variance, mask=mask, psf=psf, wcs=wcs, mjd=mjd, band=band,
        zeropoint=zeropoint, psf_oversample=oversample, timesys=timesys, survey=survey,
        exposure_id=expid, is_reference=is_reference, gain=gain, saturate=saturate,
        path=str(path),
    )


def _image_hdu(path: Path, hdul: fits.HDUList, name: str, *, required: bool):
    if name not in hdul:
        if required:
            raise EpochFileError(path, f"missing HDU {name}", field=name)
        return None
    hdu = hdul[name]
    if not hdu.is_image or hdu.data is None:
        raise EpochFileError(path, f"HDU {name} must be an image with data", field=name)
    return hdu


def _same_shape(path: Path, hdu, name: str, shape: tuple[int, ...]) -> np.ndarray:
    data = np.asarray(hdu.data)
    if data.shape != shape:
        raise EpochFileError(
            path, f"HDU {name} has shape {data.shape}, expected the SCI shape {shape}", field=name
        )
    return data


def _get(hdr: fits.Header, key: str) -> Any:
    """Header value, None when absent or without a value."""
    value = hdr.get(key)
    return None if value is None or isinstance(value, fits.card.Undefined) else value


def _number(path: Path, hdr: fits.Header, key: str, what: str, *, required: bool = False):
    value, field = _get(hdr, key), f"SCI:{key}"
    if value is None:
        if required:
            raise EpochFileError(path, f"missing SCI header keyword {key} ({what})", field=field)
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EpochFileError(path, f"SCI header {key}={value!r}, expected {what}", field=field)
    return float(value)


def _timesys(path: Path, hdr: fits.Header) -> str:
    value = _get(hdr, "TIMESYS")
    if value is None:
        return "UTC"
    scale = str(value).strip().upper()
    if not isinstance(value, str) or scale not in TIME_SYSTEMS:
        raise EpochFileError(
            path, f"SCI header TIMESYS={value!r}, expected one of {', '.join(TIME_SYSTEMS)}",
            field="SCI:TIMESYS",
        )
    return scale


def _band(path: Path, hdr: fits.Header) -> str:
    for key in ("BAND", "FILTER"):
        value = _get(hdr, key)
        if value is not None and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    raise EpochFileError(
        path, "missing SCI header keyword BAND (or FILTER): the filter name", field="SCI:BAND"
    )


def _flag(path: Path, hdr: fits.Header, key: str) -> bool:
    value = _get(hdr, key)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().upper() in ("T", "F", "TRUE", "FALSE"):
        return value.strip().upper().startswith("T")
    raise EpochFileError(
        path, f"SCI header {key}={value!r}, expected a boolean (T/F)", field=f"SCI:{key}"
    )


def _celestial_wcs(path: Path, hdul: fits.HDUList, sci, shape: tuple[int, int]) -> WCS:
    ny, nx = shape
    try:
        with warnings.catch_warnings():
            # Archive headers routinely trigger FITSFixedWarning (e.g. DATE-OBS or RADECSYS
            # fixes); astropy repairs them and the warning is noise for users.
            warnings.simplefilter("ignore", FITSFixedWarning)
            full = WCS(sci.header, fobj=hdul)
            if not full.has_celestial:
                raise EpochFileError(
                    path, "SCI header has no celestial WCS (CTYPE1/2 RA/DEC, CRVAL, CRPIX, CD...)",
                    field="SCI:WCS",
                )
            wcs = full.celestial
            wcs.pixel_shape = (nx, ny)
            centre = wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
    except EpochFileError:
        raise
    except Exception as exc:  # wcslib/astropy raise many unrelated exception types
        problem = " ".join(str(exc).split())  # wcslib messages span several lines
        raise EpochFileError(
            path, f"SCI header WCS cannot be used: {problem}", field="SCI:WCS"
        ) from exc
    if not np.all(np.isfinite(centre)):
        raise EpochFileError(
            path, "SCI header WCS gives no finite RA/Dec at the image centre", field="SCI:WCS"
        )
    return wcs


def _variance(
    path: Path, hdul: fits.HDUList, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(variance, unusable, no-data): from VAR, else IVAR (ivar == 0 is no-data)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if "VAR" in hdul:
            var = _same_shape(path, _image_hdu(path, hdul, "VAR", required=True), "VAR", shape)
            var = np.asarray(var, dtype=np.float64)
            return var, ~(np.isfinite(var) & (var > 0)), np.zeros(shape, dtype=bool)
        if "IVAR" in hdul:
            ivar = _same_shape(path, _image_hdu(path, hdul, "IVAR", required=True), "IVAR", shape)
            ivar = np.asarray(ivar, dtype=np.float64)
            nodata = ivar == 0
            return 1.0 / ivar, ~(np.isfinite(ivar) & (ivar >= 0)), nodata
    raise EpochFileError(
        path, "missing HDU VAR (variance) or IVAR (inverse variance)", field="VAR"
    )


def _psf(path: Path, hdul: fits.HDUList, sci_hdr: fits.Header) -> tuple[np.ndarray, int]:
    hdu = _image_hdu(path, hdul, "PSF", required=True)
    psf = np.asarray(hdu.data, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise EpochFileError(
            path, f"PSF must be a 2-D image with odd sides, got shape {psf.shape}", field="PSF"
        )
    if not np.all(np.isfinite(psf)):
        raise EpochFileError(path, "PSF has NaN or infinite values", field="PSF")
    total = psf.sum()
    if not np.any(psf):
        raise EpochFileError(path, "PSF is all zero, expected a positive sum", field="PSF")
    if total <= 0:
        raise EpochFileError(path, f"PSF sum is {total:g}, expected a positive sum", field="PSF")
    where, value = "PSF", _get(hdu.header, "PSFSAMP")
    if value is None:
        where, value = "SCI", _get(sci_hdr, "PSFSAMP")
    if value is None:
        return psf / total, 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 1 and float(value).is_integer()
    ):
        raise EpochFileError(
            path, f"{where} header PSFSAMP={value!r}, expected a positive integer",
            field=f"{where}:PSFSAMP",
        )
    return psf / total, int(value)


# --------------------------------------------------------------------------- many files


def _expand(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(
                p for p in item.iterdir()
                if p.is_file() and p.name.lower().endswith(EPOCH_FILE_SUFFIXES)
            )
            if not found:
                raise DatasetError(
                    f"{item}: directory holds no epoch files ({', '.join(EPOCH_FILE_SUFFIXES)})"
                )
            files.extend(found)
        else:
            files.append(item)
    if not files:
        raise DatasetError("no epoch files given")
    return files


def _on_target(epochs: list[Epoch], target: SkyCoord) -> list[Epoch]:
    if not target.isscalar:
        raise ValueError(f"target must be a single position, got shape {target.shape}")
    kept = []
    for ep in epochs:
        ny, nx = ep.shape
        try:
            x, y = (float(v) for v in ep.wcs.world_to_pixel(target))
        except Exception as exc:  # e.g. SIP inversion not converging far off the image
            logger.debug("%s: world_to_pixel failed (%s)", ep.path, exc)
            x = y = math.nan
        if -0.5 <= x <= nx - 0.5 and -0.5 <= y <= ny - 0.5:
            kept.append(ep)
        else:
            warnings.warn(
                EpochSkippedWarning(
                    f"{ep.path}: skipped, target outside the image (pixel x={x:.1f}, y={y:.1f};"
                    f" image {nx}x{ny})"
                ),
                stacklevel=3,
            )
    if not kept:
        icrs = target.icrs
        raise DatasetError(
            f"target RA/Dec ({icrs.ra.deg:.6f}, {icrs.dec.deg:.6f}) deg outside every epoch's"
            f" footprint ({len(epochs)} epochs)"
        )
    return kept


def _check_duplicates(epochs: list[Epoch]) -> None:
    by_id: dict[str, Epoch] = {}
    by_content: dict[tuple, Epoch] = {}
    for ep in epochs:
        if ep.exposure_id in by_id:
            raise DatasetError(
                f"duplicate epoch: {by_id[ep.exposure_id].path} and {ep.path} share EXPID"
                f" {ep.exposure_id!r} (give each file a unique EXPID)"
            )
        by_id[ep.exposure_id] = ep
        key = (ep.mjd, ep.band, ep.shape, hashlib.sha1(ep.image.tobytes()).hexdigest())
        if key in by_content:
            raise DatasetError(
                f"duplicate epoch: {by_content[key].path} and {ep.path} have the same MJD-OBS,"
                f" band and image"
            )
        by_content[key] = ep


def _check_time_systems(epochs: list[Epoch]) -> None:
    first: dict[str, Epoch] = {}
    for ep in epochs:
        first.setdefault(ep.timesys, ep)
    if len(first) > 1:
        listing = ", ".join(f"{ts} (e.g. {ep.path})" for ts, ep in first.items())
        raise DatasetError(
            f"epochs use different time systems: {listing}; convert MJD-OBS to one TIMESYS"
            " first (transcene does not mix time scales: they differ by tens of seconds)"
        )
