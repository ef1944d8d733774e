"""One-call workflows on top of the core: files in, light curve and scene out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Literal, Sequence

from astropy.coordinates import SkyCoord

from .dataset import make_dataset
from .fit import fit
from .io import read_epochs
from .result import FitResult, write_table

__all__ = ["fit_files", "write_outputs", "default_target"]

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
    progress: Callable[[int, int, str], None] | None = None,
    **fit_options,
) -> FitResult:
    """Read epoch files, fit the scene and return the result.

    ``shift_prior``: prior width (arcsec) of each epoch's astrometric shift (0: no shifts).
    ``fit_options`` go to :func:`transcene.fit` (``method``, ``max_iter``, ``priors``, ...).
    """
    epochs = read_epochs(paths, target=target)
    if target is None:
        target = default_target(epochs)
        log.info("target defaults to the centre of the first epoch: %s", target.to_string("hmsdms"))
    ds = make_dataset(epochs, target, fit_radius=fit_radius, zero_before=zero_before, shift_prior=shift_prior)
    return fit(ds, host=host, progress=progress, **fit_options)


def write_outputs(
    result: FitResult,
    *,
    lightcurve: str | Path | None = None,
    scene_dir: str | Path | None = None,
    plot: str | Path | None = None,
) -> dict[str, Path]:
    """Write the light curve (ECSV/CSV/Parquet by extension) with its covariance, the scene, and
    the plots (``plot``: the light curve; the epoch mosaic, scene and diagnostics next to it)."""
    out: dict[str, Path] = {}
    lc = result.lightcurve()
    if lightcurve is not None:
        out["lightcurve"] = write_table(lc, lightcurve)
        cov_path = Path(lightcurve).with_name(Path(lightcurve).stem + "_covariance.ecsv")
        out["covariance"] = write_table(result.covariance_table(), cov_path)
    if scene_dir is not None:
        from .outputs import write_scene

        out["scene"] = write_scene(result, scene_dir)
    if plot is not None:
        from .plot import write_plots

        out.update(write_plots(result, plot))
    return out
