"""Plots (matplotlib). Each function returns a Figure and never calls ``show()``."""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from matplotlib.figure import Figure

from .result import Flag

__all__ = ["plot_lightcurve"]

_BAND_COLOURS = {"g": "tab:green", "r": "tab:red", "i": "tab:brown", "z": "tab:purple", "u": "tab:blue", "y": "k"}


def _colour(band: str, k: int) -> str:
    key = band[-1].lower() if band else ""
    return _BAND_COLOURS.get(key, f"C{k}")


def _focus_on_science(ax, mjd: np.ndarray, ref: np.ndarray) -> None:
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
        ax.text(0.01, 0.90, f"{outside.size} reference epoch(s) off axis, MJD {outside.min():.0f}-{outside.max():.0f}",
                transform=ax.transAxes, va="top", fontsize=8, color="0.3")


def plot_lightcurve(
    lc: Table,
    *,
    reference: Table | None = None,
    reference_label: str = "external",
    title: str | None = None,
) -> Figure:
    """Flux (nJy) against MJD per band, reference epochs marked, optional external overlay.

    ``reference``: a table with ``mjd``, ``band``, ``flux``, ``flux_err`` (nJy) to overlay, e.g.
    a survey's own difference-image photometry; a residual panel is added for matching epochs.
    """
    fig = Figure(figsize=(8, 5.5 if reference is not None else 4.5), layout="constrained")
    if reference is not None:
        ax, axr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, axr = fig.subplots(1, 1), None
    flags = np.asarray(lc["flags"])
    ref = (flags & int(Flag.REFERENCE)) > 0
    mjd = np.asarray(lc["mjd"], float)
    flux = np.asarray(lc["flux"], float)
    err = np.asarray(lc["flux_err"], float)
    for k, band in enumerate(sorted(set(lc["band"]))):
        sel = (np.asarray(lc["band"]) == band) & ~ref
        col = _colour(band, k)
        ax.errorbar(mjd[sel], flux[sel], err[sel], fmt="o", ms=4, color=col, label=f"{band} (transcene)")
        rsel = (np.asarray(lc["band"]) == band) & ref
        if rsel.any():
            ax.plot(mjd[rsel], np.zeros(rsel.sum()), "x", color=col, ms=6, label=f"{band} reference (flux = 0)")
        if reference is not None:
            rb = np.asarray(reference["band"]) == band
            if rb.any():
                ax.errorbar(np.asarray(reference["mjd"])[rb], np.asarray(reference["flux"])[rb],
                            np.asarray(reference["flux_err"])[rb], fmt="s", mfc="none", ms=5, color=col,
                            alpha=0.7, label=f"{band} ({reference_label})")
                rm = np.asarray(reference["mjd"], float)[rb]
                rf = np.asarray(reference["flux"], float)[rb]
                for x, f, e in zip(mjd[sel], flux[sel], err[sel]):
                    j = np.argmin(np.abs(rm - x)) if rm.size else None
                    if j is not None and abs(rm[j] - x) < 1e-3 and np.isfinite(rf[j]) and rf[j] != 0:
                        axr.errorbar(x, f / rf[j] - 1.0, e / abs(rf[j]), fmt="o", ms=3, color=col)
    _focus_on_science(ax, mjd, ref)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylabel("flux [nJy]")
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title)
    status = lc.meta.get("status", "")
    method = lc.meta.get("method", "")
    ax.text(0.01, 0.98, f"{method}, {status}", transform=ax.transAxes, va="top", fontsize=8, color="0.3")
    if axr is not None:
        axr.axhline(0, color="0.5", lw=0.8)
        axr.set_ylabel(f"ratio - 1\nvs {reference_label}")
        axr.set_xlabel("MJD")
    else:
        ax.set_xlabel("MJD")
    return fig
