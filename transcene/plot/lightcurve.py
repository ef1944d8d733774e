"""The light-curve plot: flux (or magnitude) against MJD per band."""

from __future__ import annotations

from typing import Literal

import numpy as np
from astropy.table import Table
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..epoch import NJY_AB_ZEROPOINT
from ..result import Flag
from ._source import Source, lightcurve_of
from ._style import band_colour, bands_blue_to_red, focus_on_science

__all__ = ["plot_lightcurve"]

# epochs whose flux the code stands behind only with a caveat: drawn with open symbols
_CAVEAT = int(Flag.HIGH_CHI2 | Flag.MASKED_AT_TRANSIENT | Flag.NOT_CONVERGED | Flag.BASELINE_UNDEFINED)


def _mag(flux: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, NJY_AB_ZEROPOINT - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)


def plot_lightcurve(
    source: Source | Table,
    *,
    reference: Table | None = None,
    reference_label: str = "external",
    residual: Literal["ratio", "sigma"] = "sigma",
    magnitudes: bool = False,
    limits: bool = True,
    title: str | None = None,
) -> Figure:
    """Flux (nJy) against MJD per band, with the 16-84 % posterior band and flags shown.

    ``source``: a light-curve table, a :class:`~transcene.FitResult` or a result directory.
    Science epochs are points with 1-sigma error bars over a shaded band from ``flux_lo`` to
    ``flux_hi``; epochs with snr < 3 are drawn as 3-sigma upper limits (``limits=False`` draws
    them as measurements); flagged epochs (chi2/dof > 2, transient masked, not converged,
    baseline undefined) have open symbols; reference epochs are crosses at zero flux.

    ``reference``: a table with ``mjd``, ``band``, ``flux``, ``flux_err`` (nJy) to overlay, e.g.
    a survey's own difference-image photometry; a residual panel shows, for epochs at the same
    MJD (within 1.5 minutes), ``(transcene - reference) / combined sigma`` (``residual="sigma"``)
    or ``transcene / reference - 1`` for reference epochs with S/N > 5 (``residual="ratio"``).

    ``magnitudes=True`` plots AB magnitudes (snr >= 3) and ``mag_lim`` limits instead of fluxes.
    """
    lc = lightcurve_of(source)
    fig = Figure(figsize=(9.5, 5.5 if reference is not None else 4.5), layout="constrained")
    if reference is not None:
        ax, axr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, axr = fig.subplots(1, 1), None
    flags = np.asarray(lc["flags"], int)
    ref = (flags & int(Flag.REFERENCE)) > 0
    low = ((flags & int(Flag.LOW_SNR)) > 0) & ~ref & limits
    caveat = (flags & _CAVEAT) > 0
    mjd = np.asarray(lc["mjd"], float)
    flux = np.asarray(lc["flux"], float)
    err = np.asarray(lc["flux_err"], float)
    lo = np.asarray(lc["flux_lo"], float) if "flux_lo" in lc.colnames else flux - err
    hi = np.asarray(lc["flux_hi"], float) if "flux_hi" in lc.colnames else flux + err
    bands = np.asarray(lc["band"]).astype(str)
    if magnitudes:
        y, ylo, yhi = _mag(flux), _mag(hi), _mag(lo)
        ylim_val = NJY_AB_ZEROPOINT - 2.5 * np.log10(np.where(err > 0, 3 * err, np.nan))
        yerr = 2.5 / np.log(10) * err / np.where(flux > 0, flux, np.nan)
        low = low | (~ref & ~(flux > 3 * err))
    else:
        y, ylo, yhi, ylim_val, yerr = flux, lo, hi, 3 * err, err
    used: set[str] = set()
    handles = []
    for k, band in enumerate(bands_blue_to_red(bands)):
        col = band_colour(band, k)
        handles.append(Line2D([], [], color=col, marker="o", ls="", ms=5, label=band))
        b = bands == band
        sci = b & ~ref
        # magnitudes of undetected epochs are undefined: their band would run off to infinity
        shade = sci & ~low if magnitudes else sci
        order = np.argsort(mjd[shade])
        if shade.sum() > 1:
            ax.fill_between(mjd[shade][order], ylo[shade][order], yhi[shade][order], color=col, alpha=0.15, lw=0)
            used.add("band")
        for sel, mfc in ((sci & ~low & ~caveat, col), (sci & ~low & caveat, "white")):
            if sel.any():
                ax.errorbar(mjd[sel], y[sel], yerr[sel], fmt="o", ms=4, color=col, mfc=mfc)
        used |= {"flagged"} if (sci & ~low & caveat).any() else set()
        lim = sci & low
        if lim.any():
            ax.plot(mjd[lim], ylim_val[lim], "v", color=col, ms=5, alpha=0.6)
            used.add("limit")
        rsel = b & ref
        if rsel.any() and not magnitudes:
            ax.plot(mjd[rsel], np.zeros(rsel.sum()), "x", color=col, ms=6)
            used.add("reference")
        if reference is not None and _overlay(ax, axr, reference, band, col, mjd[sci], flux[sci], err[sci], residual,
                                              magnitudes):
            used.add("overlay")
    grey = "0.35"
    styles = {
        "band": Patch(color=grey, alpha=0.3, label="16-84 % posterior"),
        "flagged": Line2D([], [], color=grey, marker="o", mfc="white", ls="", ms=5, label="flagged (see flags)"),
        "limit": Line2D([], [], color=grey, marker="v", ls="", ms=5, label="3-sigma upper limit"),
        "reference": Line2D([], [], color=grey, marker="x", ls="", ms=6, label="reference (flux = 0)"),
        "overlay": Line2D([], [], color=grey, marker="s", mfc="none", ls="", ms=5, label=reference_label),
    }
    handles += [h for key, h in styles.items() if key in used]
    _limit_y(ax, y, yerr, ylim_val, measured=~ref & ~low, low=low & ~ref, magnitudes=magnitudes)
    focus_on_science(ax, mjd, ref)
    if magnitudes:
        ax.invert_yaxis()
        ax.set_ylabel("AB magnitude")
    else:
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_ylabel("flux [nJy]")
    method = lc.meta.get("method", "")
    status = lc.meta.get("status", "")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              title=f"{method} fit, {status}" if (method or status) else None, title_fontsize=7)
    if title:
        ax.set_title(title)
    if axr is not None:
        axr.axhline(0, color="0.5", lw=0.8)
        axr.set_ylabel(f"ratio - 1\nvs {reference_label}" if residual == "ratio" else f"difference [sigma]\nvs {reference_label}")
        axr.set_xlabel("MJD")
    else:
        ax.set_xlabel("MJD")
    return fig


def _limit_y(ax, y, yerr, ylim_val, *, measured, low, magnitudes) -> None:
    """Scale the y axis to the measured points and to the limits near them.

    One epoch with almost no constraint (a 3-sigma limit ten times the peak) would otherwise
    flatten the whole light curve; such limits are left off the axis, and the plot says so."""
    meas = measured & np.isfinite(y)
    if not meas.any():
        return
    e = np.nan_to_num(yerr[meas])
    lim = ylim_val[low & np.isfinite(ylim_val)]
    if magnitudes:  # the axis is inverted afterwards: faint = large magnitudes at the bottom
        bright, faint = np.min(y[meas] - e), np.max(y[meas] + e)
        near = lim[lim < faint + 2.0]
        faint = max(faint, float(near.max())) if near.size else faint
        ax.set_ylim(bright - 0.2, faint + 0.2)
        off = int((lim >= faint + 2.0).sum())
    else:
        top, bot = np.max(y[meas] + e), min(float(np.min(y[meas] - e)), 0.0)
        near = lim[lim < 3 * max(top, 1e-30)]
        top = max(top, float(near.max())) if near.size else top
        pad = 0.08 * (top - bot)
        ax.set_ylim(bot - pad, top + pad)
        off = int((lim > top + pad).sum())
    if off:
        ax.text(0.01, 0.04, f"{off} 3-sigma limit(s) off the axis (epochs with little constraint)",
                transform=ax.transAxes, fontsize=7, color="0.3")


def _overlay(ax, axr, reference, band, col, mjd, flux, err, residual, magnitudes) -> bool:
    rb = np.asarray(reference["band"]).astype(str) == band
    if not rb.any():
        return False
    rm = np.asarray(reference["mjd"], float)[rb]
    rf = np.asarray(reference["flux"], float)[rb]
    re = np.asarray(reference["flux_err"], float)[rb]
    if magnitudes:
        ok = rf > 3 * re
        ax.errorbar(rm[ok], _mag(rf[ok]), 2.5 / np.log(10) * re[ok] / rf[ok], fmt="s", mfc="none", ms=5,
                    color=col, alpha=0.7)
    else:
        ax.errorbar(rm, rf, re, fmt="s", mfc="none", ms=5, color=col, alpha=0.7)
    for x, f, e in zip(mjd, flux, err):
        j = int(np.argmin(np.abs(rm - x)))
        if abs(rm[j] - x) > 1e-3 or not np.isfinite(rf[j]):
            continue
        if residual == "ratio":
            if rf[j] > 5 * re[j]:
                axr.errorbar(x, f / rf[j] - 1.0, e / rf[j], fmt="o", ms=3, color=col)
        else:
            axr.plot(x, (f - rf[j]) / np.hypot(e, re[j]), "o", ms=3, color=col)
    return True
