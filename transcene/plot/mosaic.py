"""The epoch mosaic: data | model | host | transient | residual, one row per epoch."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..result import Flag
from ._source import Source, epoch_panels, lightcurve_of
from ._style import asinh_norm, label_asinh_colorbar

__all__ = ["plot_epoch_mosaic", "default_mosaic_epochs"]

_COLUMNS = ("DATA", "MODEL", "HOST", "TRANSIENT", "RESID")
_TITLES = ("data - sky", "model - sky", "host", "transient", "residual [sigma]")


def default_mosaic_epochs(source: Source, n: int = 5) -> list[str]:
    """Exposure ids worth looking at: the brightest transient epoch, the worst-fitting epoch,
    a transient-free epoch, then epochs spread in S/N; at most ``n``, in time order."""
    lc = lightcurve_of(source)
    ids = np.asarray(lc["exposure_id"]).astype(str)
    flags = np.asarray(lc["flags"], int)
    ref = (flags & int(Flag.REFERENCE)) > 0
    snr = np.ma.filled(np.ma.asarray(lc["snr"], dtype=float), np.nan)
    chi2 = np.asarray(lc["chi2_dof"], float)
    picks: list[int] = []

    def add(i):
        if i is not None and i not in picks and len(picks) < n:
            picks.append(int(i))

    sci = np.flatnonzero(~ref)
    if sci.size:
        add(sci[np.nanargmax(np.where(np.isfinite(snr[sci]), snr[sci], -np.inf))])
        add(sci[np.nanargmax(chi2[sci])])
    if ref.any():
        add(np.flatnonzero(ref)[0])
    if sci.size:
        by_snr = sci[np.argsort(np.where(np.isfinite(snr[sci]), snr[sci], -np.inf))]
        for q in np.linspace(0, 1, max(n, 2)):
            add(by_snr[int(round(q * (by_snr.size - 1)))])
    picks.sort(key=lambda i: float(lc["mjd"][i]))
    return [str(ids[i]) for i in picks]


def plot_epoch_mosaic(
    source: Source,
    exposure_ids: Sequence[str] | None = None,
    *,
    resid_range: float = 5.0,
) -> Figure:
    """One row per epoch: data - sky, model - sky, host only, transient only (one shared asinh
    stretch, nJy/pixel) and the residual (data - model)/sigma on a fixed +-``resid_range``
    scale. The fitted transient position is marked with a circle; masked pixels are grey.

    ``source``: a :class:`~transcene.FitResult` or a result directory written with
    ``--scene-out``; ``exposure_ids`` default to :func:`default_mosaic_epochs`.
    """
    ids = list(exposure_ids) if exposure_ids is not None else default_mosaic_epochs(source)
    if not ids:
        raise ValueError("exposure_ids: no epochs to show")
    lc = lightcurve_of(source)
    row_of = {str(e): i for i, e in enumerate(np.asarray(lc["exposure_id"]).astype(str))}
    unknown = [e for e in ids if e not in row_of]
    if unknown:
        raise ValueError(f"exposure_ids: {unknown} not in the light curve")
    panels = [_crop_to_data(p) for p in epoch_panels(source, ids)]
    # noise from the residuals (data - model): robust to the host and the transient
    resid = np.concatenate([(p.images["DATA"] - p.images["MODEL"]).ravel() for p in panels])
    resid = resid[np.isfinite(resid)]
    noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid)))) if resid.size else None
    norm = asinh_norm([p.images["MODEL"] - p.sky for p in panels], noise=noise)
    n = len(panels)
    fig = Figure(figsize=(10.5, 2.15 * n + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, 5, squeeze=False))
    cmap_img = _with_bad("magma")
    cmap_res = _with_bad("RdBu_r")
    for r, p in enumerate(panels):
        row = lc[row_of[p.exposure_id]]
        for c, name in enumerate(_COLUMNS):
            ax = axes[r, c]
            img = p.images[name]
            if name in ("DATA", "MODEL"):
                img = img - p.sky
            if name == "RESID":
                im_res = ax.imshow(img, origin="lower", cmap=cmap_res, vmin=-resid_range, vmax=resid_range,
                                   interpolation="nearest")
            else:
                im_img = ax.imshow(img, origin="lower", cmap=cmap_img, norm=norm, interpolation="nearest")
            ax.plot(*p.transient_xy, "o", mfc="none", mec="cyan", ms=10, mew=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(_TITLES[c], fontsize=9)
        flux = float(row["flux"])
        err = float(row["flux_err"])
        label = "reference" if int(row["flags"]) & int(Flag.REFERENCE) else f"{flux:.3g} +- {err:.2g} nJy"
        axes[r, 0].set_ylabel(f"{p.band}  MJD {p.mjd:.2f}\n{label}\nchi2/dof {float(row['chi2_dof']):.2f}", fontsize=8)
    cb = fig.colorbar(im_img, ax=axes[:, :4].ravel().tolist(), shrink=0.6, label="nJy / pixel (asinh)",
                      location="bottom", aspect=50)
    label_asinh_colorbar(cb, norm)
    fig.colorbar(im_res, ax=axes[:, 4].ravel().tolist(), shrink=0.8, label="sigma", location="bottom")
    return fig


def _crop_to_data(p):
    """The panel cut to the bounding box of its usable data pixels (the fitted region): the
    model is rendered on a padded frame whose outer part no data constrain."""
    good = np.isfinite(p.images["DATA"])
    if not good.any():
        return p
    ys, xs = np.flatnonzero(good.any(axis=1)), np.flatnonzero(good.any(axis=0))
    sl = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    return dataclasses.replace(p, images={k: v[sl] for k, v in p.images.items()},
                               transient_xy=(p.transient_xy[0] - xs[0], p.transient_xy[1] - ys[0]))


def _with_bad(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="0.6")
