"""What the plots need, read from a :class:`FitResult` in memory or from a result directory.

Both paths produce the same small records, so every plot works on a fresh fit and on files
written by ``transcene fit`` alike. A result directory holds the light-curve table
(``lightcurve.ecsv``, or the only ``*.ecsv`` that is not a covariance file) and the scene
products of ``--scene-out`` (in ``scene/`` or in the directory itself).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
import astropy.units as u

from ..errors import TransceneError
from ..result import FitResult

Source = Union[FitResult, str, Path]

_EPOCH_HDUS = ("DATA", "MODEL", "HOST", "TRANSIENT", "RESID")


@dataclasses.dataclass(frozen=True)
class EpochPanel:
    """Images of one epoch (nJy/pixel; RESID in sigma) and the fitted transient pixel (x, y)."""

    exposure_id: str
    band: str
    mjd: float
    images: dict[str, np.ndarray]
    transient_xy: tuple[float, float]
    sky: float


@dataclasses.dataclass(frozen=True)
class HostPanel:
    """Host model per band on the model grid and the transient position with its covariance.

    ``extent`` (left, right, bottom, top) is in arcsec offsets from the target, East left;
    ``offset`` (xi, eta) arcsec and ``cov`` (arcsec^2) are the fitted transient position.
    """

    bands: tuple[str, ...]
    images: np.ndarray
    extent: tuple[float, float, float, float]
    offset: np.ndarray
    cov: np.ndarray
    scale: float


def _result_dir(path: Path) -> tuple[Path, Path]:
    """(light-curve file, scene directory) of a result directory, with a clear error if absent."""
    if not path.is_dir():
        raise TransceneError(f"{path}: not a directory (expected the output directory of a fit)")
    lc = path / "lightcurve.ecsv"
    if not lc.exists():
        cands = [p for p in sorted(path.glob("*.ecsv")) if not p.stem.endswith("_covariance") and p.name != "scene.ecsv"]
        if len(cands) != 1:
            raise TransceneError(
                f"{path}: expected a light-curve table 'lightcurve.ecsv' (or exactly one *.ecsv that is not a "
                f"covariance file), found {[p.name for p in cands] or 'none'}"
            )
        lc = cands[0]
    scene = path / "scene" if (path / "scene").is_dir() else path
    return lc, scene


def has_scene(path: Path) -> bool:
    """Whether a result directory holds the scene products of ``--scene-out``."""
    _, scene = _result_dir(path)
    return any(scene.glob("host_*.fits"))


def lightcurve_of(source: Source | Table) -> Table:
    """The light-curve table of a result, a result directory, or a table given as is."""
    if isinstance(source, Table):
        return source
    if isinstance(source, FitResult):
        return source.lightcurve()
    lc, _ = _result_dir(Path(source))
    return Table.read(lc)


def host_panel(source: Source) -> HostPanel:
    """The fitted host images and transient position, from a result or a result directory."""
    if isinstance(source, FitResult):
        from ..outputs import host_wcs

        ds = source.dataset
        images = np.asarray(source.scene.glob.host.images(ds.grid))
        wcs = host_wcs(source)
        return HostPanel(tuple(ds.bands), images, _extent(wcs, images.shape[-1], ds.target),
                         np.asarray(source.transient_offset, float), np.asarray(source.position_cov, float),
                         float(ds.grid.scale))
    lc_path, scene = _result_dir(Path(source))
    files = sorted(scene.glob("host_*.fits"))
    if not files:
        raise TransceneError(f"{scene}: no host_<band>.fits (write them with transcene fit --scene-out)")
    images, bands, wcs = [], [], None
    for f in files:
        with fits.open(f) as hdul:
            hdr = hdul[0].header
            images.append(np.asarray(hdul[0].data, float))
            bands.append(str(hdr.get("BAND", f.stem[5:])))
            wcs = WCS(hdr)
    meta = Table.read(lc_path).meta
    target = SkyCoord(float(meta["ra"]) * u.deg, float(meta["dec"]) * u.deg)
    offset = np.asarray(meta.get("transient_offset_arcsec", [0.0, 0.0]), float)
    if "transient_offset_cov_arcsec2" in meta:
        cov = np.asarray(meta["transient_offset_cov_arcsec2"], float)
    else:
        cov = np.diag(np.asarray(meta.get("transient_offset_err_arcsec", [0.0, 0.0]), float) ** 2)
    scale = float(abs(wcs.pixel_scale_matrix[1, 1]) * 3600.0)
    return HostPanel(tuple(bands), np.stack(images), _extent(wcs, images[0].shape[-1], target), offset, cov, scale)


def _extent(wcs: WCS, n: int, target: SkyCoord) -> tuple[float, float, float, float]:
    """Offsets (arcsec, xi East, eta North) of the outer pixel edges along the grid axes."""
    edge = np.array([-0.5, n - 0.5])
    world = wcs.pixel_to_world(edge, np.array([(n - 1) / 2.0] * 2))
    dxi, _ = target.spherical_offsets_to(world)
    world = wcs.pixel_to_world(np.array([(n - 1) / 2.0] * 2), edge)
    _, deta = target.spherical_offsets_to(world)
    xi = dxi.to_value(u.arcsec)
    eta = deta.to_value(u.arcsec)
    return float(xi[0]), float(xi[1]), float(eta[0]), float(eta[1])


def epoch_panels(source: Source, exposure_ids: list[str]) -> list[EpochPanel]:
    """Data, model, host, transient and residual images of the given epochs."""
    if isinstance(source, FitResult):
        from ..outputs import epoch_images

        from ..scene import host_spectrum

        ds = source.dataset
        ids = [str(v) for v in ds.epochs["exposure_id"]]
        lc = source.lightcurve()
        hft = host_spectrum(source.scene.glob, ds.grid)
        out = []
        for eid in exposure_ids:
            i = ids.index(eid)
            row = ds.epochs[i]
            out.append(EpochPanel(eid, str(row["band"]), float(row["mjd"]), epoch_images(source, i, host_ft=hft),
                                  source.transient_pixel(i), float(lc["sky"][i])))
        return out
    _, scene = _result_dir(Path(source))
    from ..outputs import safe_name

    out = []
    for eid in exposure_ids:
        f = scene / "epochs" / f"{safe_name(eid)}.fits"
        if not f.exists():
            raise TransceneError(f"{f}: missing (epoch images are written by transcene fit --scene-out)")
        with fits.open(f) as hdul:
            missing = [n for n in _EPOCH_HDUS if n not in hdul]
            if missing:
                raise TransceneError(f"{f}: HDU(s) {missing} missing; expected {list(_EPOCH_HDUS)}")
            hdr = hdul["DATA"].header
            for key in ("TRANSX", "TRANSY"):
                if key not in hdr:
                    raise TransceneError(f"{f}: header keyword {key} (fitted transient pixel) missing in HDU DATA")
            out.append(EpochPanel(eid, str(hdr.get("BAND", "")), float(hdr.get("MJD-OBS", np.nan)),
                                  {n: np.asarray(hdul[n].data, float) for n in _EPOCH_HDUS},
                                  (float(hdr["TRANSX"]), float(hdr["TRANSY"])), float(hdr.get("SKY", 0.0))))
    return out

