"""Writing a fit's products: the static scene (FITS with WCS + parameter table) and per-epoch
data / model / residual images."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from .host import SersicHost
from .result import FitResult
from .scene import host_spectrum, render_epoch

__all__ = ["host_wcs", "write_scene", "epoch_images", "safe_name"]

log = logging.getLogger(__name__)


def host_wcs(result: FitResult) -> WCS:
    """TAN WCS of the model grid (East left, North up), tangent point at the target."""
    ds = result.dataset
    s = float(ds.grid.scale) / 3600.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ds.target.ra.deg, ds.target.dec.deg]
    w.wcs.crpix = [ds.grid.centre + 1.0, ds.grid.centre + 1.0]
    w.wcs.cd = np.array([[-s, 0.0], [0.0, s]])
    w.wcs.cunit = ["deg", "deg"]
    return w


def epoch_images(result: FitResult, index: int, *, host_ft=None) -> dict[str, np.ndarray]:
    """Data, full model, host-only, transient-only and residual images (nJy/pixel) of one epoch.

    ``index`` is the row in ``result.dataset.epochs``. Masked pixels are NaN in data/residual.
    ``host_ft``: the host's spectrum (``scene.host_spectrum``), to compute it once for many epochs.
    """
    ds = result.dataset
    row = ds.epochs[index]
    st = ds.stacks[int(row["stack"])]
    k = int(row["slot"])
    ep = jax.tree_util.tree_map(lambda x: x[k], st)  # one epoch (static fields kept)
    loc = result.scene.local[int(row["stack"])][k]
    glob = result.scene.glob
    hft = host_spectrum(glob, ds.grid) if host_ft is None else host_ft
    full = np.asarray(render_epoch(hft, glob, loc, ep, ds.grid))
    no_tr = np.asarray(render_epoch(hft, glob, loc.at[0].set(0.0), ep, ds.grid))
    host_only = no_tr - float(loc[1])
    if glob.star_flux.size:
        no_stars = glob.__class__(host=glob.host, position=glob.position, star_position=glob.star_position,
                                  star_flux=jnp.zeros_like(glob.star_flux))
        host_only = np.asarray(render_epoch(hft, no_stars, loc.at[0].set(0.0), ep, ds.grid)) - float(loc[1])
    w = np.asarray(st.weight[k])
    data = np.where(w > 0, np.asarray(st.data[k]), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        resid = (data - full) * np.sqrt(w)
    rec = ds.records[int(row["index"])] if ds.records else None
    ny, nx = rec.image.shape if rec is not None else data.shape
    h = min(ny - int(row["y0"]), data.shape[0])
    wdt = min(nx - int(row["x0"]), data.shape[1])
    crop = (slice(0, h), slice(0, wdt))
    return {
        "DATA": data[crop],
        "MODEL": full[crop],
        "HOST": host_only[crop],
        "TRANSIENT": (full - no_tr)[crop],
        "RESID": resid[crop],
    }


def safe_name(name: str) -> str:
    """A file-name-safe version of an exposure id or band name."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def write_scene(result: FitResult, outdir: str | Path, *, epoch_images_too: bool = True) -> Path:
    """Write the static scene and per-epoch images to ``outdir``.

    Files: ``host_<band>.fits`` (host model on the model grid, nJy per model pixel, with WCS),
    ``scene.ecsv`` (fitted parameters with uncertainties and units), and, per epoch,
    ``epochs/<exposure_id>.fits`` with HDUs DATA, MODEL, HOST, TRANSIENT (nJy/pixel) and RESID
    (data - model in units of sigma), each with the epoch's WCS.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ds = result.dataset
    wcs = host_wcs(result)
    images = np.asarray(result.scene.glob.host.images(ds.grid))
    for b, band in enumerate(ds.bands):
        hdr = wcs.to_header()
        hdr["BUNIT"] = ("nJy", "per model pixel")
        hdr["BAND"] = band
        hdr["HOSTKIND"] = result.host_kind
        fits.PrimaryHDU(images[b].astype(np.float32), header=hdr).writeto(
            outdir / f"host_{safe_name(band)}.fits", overwrite=True
        )
    _scene_table(result).write(outdir / "scene.ecsv", format="ascii.ecsv", overwrite=True)
    if epoch_images_too:
        edir = outdir / "epochs"
        edir.mkdir(exist_ok=True)
        sky = np.asarray(result.lightcurve()["sky"], float)
        hft = host_spectrum(result.scene.glob, ds.grid)
        for i, row in enumerate(ds.epochs):
            imgs = epoch_images(result, i, host_ft=hft)
            tx, ty = result.transient_pixel(i)
            rec = ds.records[int(row["index"])] if ds.records else None
            hdus = [fits.PrimaryHDU()]
            for name, arr in imgs.items():
                hdr = fits.Header()
                if rec is not None:
                    sub = rec.wcs.slice((slice(int(row["y0"]), int(row["y0"]) + arr.shape[0]),
                                         slice(int(row["x0"]), int(row["x0"]) + arr.shape[1])))
                    hdr.update(sub.to_header())
                hdr["BUNIT"] = "sigma" if name == "RESID" else "nJy"
                hdr["MJD-OBS"] = float(row["mjd"])
                hdr["BAND"] = row["band"]
                hdr["EXPID"] = row["exposure_id"]
                hdr["TRANSX"] = (tx, "fitted transient x, 0-based pixel")
                hdr["TRANSY"] = (ty, "fitted transient y, 0-based pixel")
                hdr["SKY"] = (float(sky[i]), "fitted sky in DATA, MODEL [nJy/pixel]")
                hdus.append(fits.ImageHDU(arr.astype(np.float32), header=hdr, name=name))
            fits.HDUList(hdus).writeto(edir / f"{safe_name(str(row['exposure_id']))}.fits", overwrite=True)
    log.info("scene written to %s", outdir)
    return outdir


def _scene_table(result: FitResult) -> Table:
    ds = result.dataset
    off = result.transient_offset
    err = np.sqrt(np.clip(np.diag(result.position_cov), 0, None))
    coord = result.transient_coord
    rows = [
        ("transient_ra", float(coord.ra.deg), float(err[0] / 3600.0 / np.cos(np.radians(coord.dec.deg))), "deg"),
        ("transient_dec", float(coord.dec.deg), float(err[1] / 3600.0), "deg"),
        ("transient_offset_ra", float(off[0]), float(err[0]), "arcsec"),
        ("transient_offset_dec", float(off[1]), float(err[1]), "arcsec"),
    ]
    h = result.scene.glob.host
    images = np.asarray(h.images(ds.grid))
    for b, band in enumerate(ds.bands):
        rows.append((f"host_flux_{band}", float(images[b].sum()), np.nan, "nJy"))
    if isinstance(h, SersicHost):
        q, pa, re_ = (float(v) for v in h.shape_params())
        rows += [
            ("sersic_centre_ra", float(h.centre[0]), np.nan, "arcsec"),
            ("sersic_centre_dec", float(h.centre[1]), np.nan, "arcsec"),
            ("sersic_re", re_, np.nan, "arcsec"),
            ("sersic_n", float(h.n), np.nan, ""),
            ("sersic_q", q, np.nan, ""),
            ("sersic_pa", float(np.degrees(pa)), np.nan, "deg"),
        ]
    sp = np.asarray(result.scene.glob.star_position)
    sf = np.asarray(result.scene.glob.star_flux)
    for j in range(len(sp)):
        rows += [(f"star{j}_offset_ra", float(sp[j, 0]), np.nan, "arcsec"), (f"star{j}_offset_dec", float(sp[j, 1]), np.nan, "arcsec")]
        rows += [(f"star{j}_flux_{band}", float(sf[j, b]), np.nan, "nJy") for b, band in enumerate(ds.bands)]
    t = Table(rows=rows, names=("parameter", "value", "error", "unit"))
    t.meta.update(result.summary())
    t.meta["note"] = "errors are Gaussian (inverse normal matrix at the MAP); NaN where not computed"
    return t
