"""One-call workflows on top of the core: files in, light curve and scene out."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Sequence

from astropy.coordinates import SkyCoord
from astropy.table import Table

from .dataset import make_dataset
from .fit import fit
from .io import read_epochs
from .result import FitResult, write_table

if TYPE_CHECKING:
    from .surveys import FetchReport

__all__ = ["fit_files", "write_outputs", "default_target", "lightcurve", "LightCurveRun", "with_fetch_failures"]

log = logging.getLogger(__name__)


def default_target(epochs) -> SkyCoord:
    """The sky position of the centre of the first epoch's image."""
    ep = epochs[0]
    ny, nx = ep.shape
    return ep.wcs.pixel_to_world((nx - 1) / 2.0, (ny - 1) / 2.0)


def fit_files(
    paths: Sequence[str | Path],
    *,
    target: SkyCoord | None = None,
    zero_before: float | None = None,
    host: Literal["pixel", "sersic"] = "pixel",
    fit_radius: float | None = None,
    shift_prior: float = 0.1,
    zp_jitter: float = 0.0,
    psf_width_jitter: float = 0.0,
    progress: Callable[[int, int, str], None] | None = None,
    **fit_options,
) -> FitResult:
    """Read epoch files, fit the scene and return the result.

    ``shift_prior``: prior width (arcsec) of each epoch's astrometric shift (0: no shifts).
    ``zp_jitter``: prior width (mag) of each epoch's zero-point error (0: zero points exact).
    ``psf_width_jitter``: prior width of each epoch's fractional PSF FWHM error (0: PSFs exact).
    ``fit_options`` go to :func:`transcene.fit` (``method``, ``max_iter``, ``priors``, ...).
    """
    epochs = read_epochs(paths, target=target)
    if target is None:
        target = default_target(epochs)
        log.info("target defaults to the centre of the first epoch: %s", target.to_string("hmsdms"))
    ds = make_dataset(epochs, target, fit_radius=fit_radius, zero_before=zero_before, shift_prior=shift_prior,
                      zp_jitter=zp_jitter, psf_width_jitter=psf_width_jitter)
    return fit(ds, host=host, progress=progress, **fit_options)


def write_outputs(
    result: FitResult,
    *,
    lightcurve: str | Path | None = None,
    scene_dir: str | Path | None = None,
    plot: str | Path | None = None,
    fetch_report: "FetchReport | None" = None,
) -> dict[str, Path]:
    """Write the light curve (ECSV/CSV/Parquet by extension) with its covariance (and, for NUTS,
    the flux draws as ``<stem>_samples.fits``), the scene, and
    the plots (``plot``: the light curve; the epoch mosaic, scene and diagnostics next to it).
    With ``fetch_report``, epochs that could not be fetched are rows flagged ``FETCH_FAILED``."""
    out: dict[str, Path] = {}
    lc = result.lightcurve()
    if fetch_report is not None:
        lc = with_fetch_failures(lc, fetch_report)
    if lightcurve is not None:
        out["lightcurve"] = write_table(lc, lightcurve)
        cov_path = Path(lightcurve).with_name(Path(lightcurve).stem + "_covariance.ecsv")
        out["covariance"] = write_table(result.covariance_table(), cov_path)
        samples = result.samples_table()
        if samples is not None:
            path = Path(lightcurve).with_name(Path(lightcurve).stem + "_samples.fits")
            samples.write(path, format="fits", overwrite=True)
            out["samples"] = path
    if scene_dir is not None:
        from .outputs import write_scene

        out["scene"] = write_scene(result, scene_dir)
    if plot is not None:
        from .plot import write_plots

        out.update(write_plots(result, plot))
    return out


@dataclasses.dataclass(frozen=True)
class LightCurveRun:
    """What :func:`lightcurve` did: the fit (None when no epoch could be fetched) and the fetch
    report (epochs found, downloaded, cached, failed)."""

    result: FitResult
    report: "FetchReport"

    def lightcurve(self) -> Table:
        """The fit's light curve plus one flagged row per epoch that could not be fetched."""
        return with_fetch_failures(self.result.lightcurve(), self.report)


def with_fetch_failures(lc: Table, report: "FetchReport") -> Table:
    """``lc`` with a row per failed epoch of ``report`` (flag ``FETCH_FAILED``, no numbers), sorted
    by time, and the fetch summary and failure reasons in the metadata."""
    import numpy as np
    from astropy.table import vstack

    from .result import Flag

    failed = [f for f in report.failures if f.exposure_id]
    out = lc
    if failed:
        rows = Table(masked=True)
        for name in lc.colnames:
            col = lc[name]
            n = len(failed)
            if name in ("band", "survey", "exposure_id"):
                vals = [getattr(f, name) for f in failed]
                rows[name] = np.array(vals, dtype=f"U{max(8, *(len(v) for v in vals))}")
            elif name == "mjd":
                rows[name] = np.array([f.mjd for f in failed]) * col.unit
            elif name == "flags":
                rows[name] = np.full(n, int(Flag.FETCH_FAILED))
            elif name == "is_reference":
                rows[name] = np.array([f.kind == "reference" for f in failed])
            else:
                rows[name] = np.ma.masked_all(n, dtype=float)
                if getattr(col, "unit", None) is not None:
                    rows[name].unit = col.unit
        out = vstack([lc, rows], metadata_conflicts="silent")
        out.meta = dict(lc.meta)
        order = np.argsort(np.asarray(out["mjd"], float), kind="stable")
        out = out[order]
    out.meta["fetch"] = report.summary()
    out.meta["fetch_failures"] = [f"{f.survey} {f.exposure_id or '(query)'}: {f.reason}" for f in report.failures]
    return out


def lightcurve(
    coord: SkyCoord,
    *,
    surveys: Sequence[str],
    bands: Sequence[str] | None = None,
    start: float | None = None,
    end: float | None = None,
    size_pix: int | None = None,
    refresh: bool = False,
    local_dir: str | Path | None = None,
    zero_before: float | None = None,
    host: Literal["pixel", "sersic"] = "pixel",
    fit_radius: float | None = None,
    shift_prior: float | None = None,
    zp_jitter: float = 0.0,
    psf_width_jitter: float = 0.0,
    fetch_progress: Callable | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    config=None,
    descriptors=None,
    policy=None,
    **fit_options,
) -> LightCurveRun:
    """From a sky position to a light curve: fetch every epoch of ``surveys`` that covers
    ``coord`` (through the cache), fit the scene, and keep the failed epochs for the table.

    ``shift_prior`` (arcsec) defaults to the largest ``astrometric_precision_arcsec`` of the
    surveys used; ``zp_jitter`` (mag, default 0: off) is the prior width of each epoch's zero-point
    error and ``psf_width_jitter`` (default 0: off) of its fractional PSF FWHM error (see
    :func:`~transcene.dataset.make_dataset`). Raises :class:`~transcene.errors.DatasetError` when no epoch could be fetched.
    """
    from .errors import DatasetError
    from .surveys import fetch_epochs, load_descriptors

    descriptors = descriptors if descriptors is not None else load_descriptors()
    report = fetch_epochs(coord, surveys=surveys, bands=bands, start=start, end=end, size_pix=size_pix,
                          refresh=refresh, local_dir=local_dir, config=config, descriptors=descriptors,
                          policy=policy, progress=fetch_progress)
    if not report.epochs:
        why = "; ".join(f"{f.survey} {f.exposure_id or '(query)'}: {f.reason}" for f in report.failures[:5])
        raise DatasetError(f"no epoch could be fetched at {coord.to_string('hmsdms')} from {', '.join(surveys)}"
                           + (f" ({why})" if why else " (no survey has an image there)"))
    if shift_prior is None:
        used = {e.survey for e in report.epochs}
        shift_prior = max((d.astrometric_precision_arcsec for n, d in descriptors.items() if n in used), default=0.1)
        log.info("shift prior %.3f arcsec (the surveys' astrometric precision)", shift_prior)
    ds = make_dataset(report.epochs, coord, fit_radius=fit_radius, zero_before=zero_before, shift_prior=shift_prior,
                      zp_jitter=zp_jitter, psf_width_jitter=psf_width_jitter)
    result = fit(ds, host=host, progress=progress, **fit_options)
    return LightCurveRun(result, report)
