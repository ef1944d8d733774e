"""Per-epoch diagnostics: residual chi2/dof against time and seeing, astrometric shifts."""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from matplotlib.figure import Figure

from ..result import Flag
from ._source import Source, lightcurve_of
from ._style import band_colour, bands_blue_to_red, focus_on_science

__all__ = ["plot_diagnostics"]


def plot_diagnostics(source: Source | Table, *, chi2_flag: float = 2.0) -> Figure:
    """Four panels from the light-curve table: chi2/dof against MJD and against PSF FWHM (the
    HIGH_CHI2 threshold dashed), the astrometric shifts against MJD, and shift_dec against
    shift_ra. Reference epochs (shifts pinned to zero) are crosses.

    A healthy fit has chi2/dof near 1 everywhere, no trend with seeing or brightness, and
    shifts scattered about zero within the survey's astrometric precision.
    """
    lc = lightcurve_of(source)
    missing = [c for c in ("mjd", "band", "chi2_dof", "flags", "shift_ra", "shift_dec") if c not in lc.colnames]
    if missing:
        raise ValueError(f"light-curve table: column(s) {missing} missing; expected the table of a transcene fit")
    mjd = np.asarray(lc["mjd"], float)
    chi2 = np.asarray(lc["chi2_dof"], float)
    ref = (np.asarray(lc["flags"], int) & int(Flag.REFERENCE)) > 0
    bands = np.asarray(lc["band"]).astype(str)
    sra = np.asarray(lc["shift_ra"], float) * 1e3
    sdec = np.asarray(lc["shift_dec"], float) * 1e3
    fwhm = np.asarray(lc["psf_fwhm"], float) if "psf_fwhm" in lc.colnames else None
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    (a_t, a_s), (a_sh, a_xy) = fig.subplots(2, 2)
    for k, band in enumerate(bands_blue_to_red(bands)):
        col = band_colour(band, k)
        for sel, m, lab in (((bands == band) & ~ref, "o", band), ((bands == band) & ref, "x", f"{band} reference")):
            if not sel.any():
                continue
            a_t.plot(mjd[sel], chi2[sel], m, color=col, ms=4, label=lab)
            if fwhm is not None:
                a_s.plot(fwhm[sel], chi2[sel], m, color=col, ms=4, label=lab)
            if m == "o":
                a_sh.plot(mjd[sel], sra[sel], "o", color=col, ms=4, label=f"{band} RA")
                a_sh.plot(mjd[sel], sdec[sel], "s", color=col, ms=4, mfc="none", label=f"{band} Dec")
                a_xy.plot(sra[sel], sdec[sel], "o", color=col, ms=4, label=band)
    for ax in (a_t, a_s):
        ax.axhline(1.0, color="0.5", lw=0.8)
        ax.axhline(chi2_flag, color="0.3", lw=0.8, ls="--")
        ax.set_ylabel("residual chi2 / dof")
        if np.nanmax(chi2, initial=0) > 10 * chi2_flag:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, max(np.nanmax(chi2, initial=0), chi2_flag) * 1.1)
    focus_on_science(a_t, mjd, ref)
    a_t.set_xlabel("MJD")
    a_t.legend(fontsize=7)
    if fwhm is None:
        a_s.text(0.5, 0.5, "no psf_fwhm column in this table", ha="center", transform=a_s.transAxes)
    a_s.set_xlabel("PSF FWHM [arcsec]")
    a_sh.axhline(0, color="0.5", lw=0.8)
    a_sh.set_xlabel("MJD")
    a_sh.set_ylabel("astrometric shift [mas]")
    a_sh.legend(fontsize=7, ncol=2)
    a_xy.axhline(0, color="0.5", lw=0.8)
    a_xy.axvline(0, color="0.5", lw=0.8)
    a_xy.set_xlabel("shift RA [mas]")
    a_xy.set_ylabel("shift Dec [mas]")
    a_xy.set_aspect("equal", adjustable="datalim")
    if ref.any():
        a_xy.text(0.02, 0.02, f"{ref.sum()} reference epochs pinned at 0", transform=a_xy.transAxes, fontsize=7,
                  color="0.3")
    return fig
