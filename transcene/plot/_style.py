"""Colours and stretches shared by the plots."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import AsinhNorm

_BAND_COLOURS = {"u": "tab:blue", "g": "tab:green", "r": "tab:red", "i": "tab:brown", "z": "tab:purple", "y": "k"}


def band_colour(band: str, k: int) -> str:
    """A colour per band from its last letter (ZTF 'ztfg', DECam 'g', ...), else the k-th cycle colour."""
    key = band[-1].lower() if band else ""
    return _BAND_COLOURS.get(key, f"C{k}")


_BLUE_TO_RED = "ugrizy"


def bands_blue_to_red(bands) -> list[str]:
    """Distinct band names sorted blue to red by their last letter; unknown bands last, by name."""

    def rank(band: str) -> tuple[int, str]:
        k = _BLUE_TO_RED.find(band[-1].lower()) if band else -1
        return (k if k >= 0 else len(_BLUE_TO_RED), band)

    return sorted(set(bands), key=rank)


def asinh_norm(images: list[np.ndarray], *, noise: float | None = None, hi: float = 99.8) -> AsinhNorm:
    """One asinh stretch for a set of images (nJy/pixel): linear within a few noise sigma of
    zero, so faint wings and the noise stay visible, logarithmic up to the bright cores.

    ``noise``: the pixel noise (same units); default a robust estimate from the images
    themselves. The top of the range is the ``hi`` percentile of the finite pixels.
    """
    vals = np.concatenate([np.asarray(im, float)[np.isfinite(im)].ravel() for im in images] + [np.zeros(1)])
    if noise is None:
        med = np.median(vals)
        noise = 1.4826 * float(np.median(np.abs(vals - med)))
    noise = noise if np.isfinite(noise) and noise > 0 else 1.0
    vmax = max(float(np.percentile(vals, hi)), 10 * noise)
    return AsinhNorm(linear_width=noise, vmin=-3 * noise, vmax=vmax)


def label_asinh_colorbar(cb, norm: AsinhNorm) -> None:
    """Put :func:`asinh_ticks` on a colour bar, labelled plainly (no minor ticks)."""
    ticks = asinh_ticks(norm)
    cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    cb.minorticks_off()


def asinh_ticks(norm: AsinhNorm, n: int = 4) -> list[float]:
    """Readable colour-bar ticks for :func:`asinh_norm`: zero and ``n`` values evenly spaced in
    the stretched scale above it, rounded to one significant figure."""
    ticks = {0.0}
    z = float(norm(0.0))
    for p in np.linspace(z, 1.0, n + 1)[1:]:
        v = float(norm.inverse(p))
        if v > 0:
            mag = 10 ** np.floor(np.log10(v))
            ticks.add(float(np.floor(v / mag) * mag))
    return sorted(ticks)


def focus_on_science(ax, mjd: np.ndarray, ref: np.ndarray) -> None:
    """Keep the science epochs readable when the references (e.g. templates) are years older.

    If including the reference epochs would squeeze the science epochs into less than a third
    of the axis, the axis shows the science epochs only and says where the references are.
    """
    sci = mjd[~ref]
    if sci.size == 0 or not ref.any():
        return
    span = max(float(sci.max() - sci.min()), 1.0)
    full = float(max(mjd.max(), sci.max()) - min(mjd.min(), sci.min()))
    if full <= 3.0 * span:
        return
    ax.set_xlim(sci.min() - 0.05 * span, sci.max() + 0.05 * span)
    outside = mjd[ref][(mjd[ref] < sci.min()) | (mjd[ref] > sci.max())]
    if outside.size:
        ax.text(0.01, 0.97, f"{outside.size} reference epoch(s) off axis, MJD {outside.min():.0f}-{outside.max():.0f}",
                transform=ax.transAxes, va="top", fontsize=8, color="0.3")
