"""The validation campaign: an injection-recovery grid on the simulator (VALIDATION.md).

Each cell changes one thing from a baseline (a one-at-a-time design: a full factorial grid of
surface brightness x seeing x S/N x offset x references x host x systematics would take weeks on
two cores):

    sb        host magnitude 15 .. 23 (surface brightness at the transient ~18 .. 26 mag/arcsec^2)
    seeing    FWHM ranges 0.8-1.2" (PSFs written 4x finer), 1.5-3.0" (baseline), 2.5-4.0"
    snr       transient peak 17, 19 (baseline), 21, 22.5 mag
    offset    transient-host offset 0 (on the nucleus), 0.5, 1, 2 FWHM
    nref      0, 1, 5 (baseline), 20 transient-free epochs
    host      Sersic (baseline), the HST COSMOS galaxy, the HST view of the HSC blend (crowded)
    sys       1.5 % PSF-width error, 75 mas misregistration, 5 mmag zero-point jitter

Every fit is blind and uses the production path (``make_dataset`` + ``fit``, pixel host), so
the Sersic cells are not an "inverse crime". Per cell: bias in CRB units, pull std and robust
std, 68 % / 95 % coverage, median flux_err / CRB, median chi2/dof, surface brightness at the
transient, run time; plus the VALIDATION.md goals each cell meets.

Usage:
    python scripts/validate.py OUTDIR --mode fast     # 6 cells x 1 seed, small data sets: ~6 min
    python scripts/validate.py OUTDIR --mode full     # 33 cells x 8 seeds (~35 s per seed: ~3-4 h)
    python scripts/validate.py OUTDIR --cells sb:15,nref:1 --seeds 3
    python scripts/validate.py OUTDIR --mode full --resume   # go on where a stopped run left off
    python scripts/validate.py OUTDIR --compare-nuts  # Laplace vs NUTS errors (~15 min)
Writes OUTDIR/cells.ecsv (one row per cell), OUTDIR/fluxes.ecsv (one row per epoch flux),
OUTDIR/runs.ecsv (one row per fit: status, time, git commit), OUTDIR/report.md and
OUTDIR/{pulls,coverage,bias_vs_sb}.png. The tables and the report are rewritten after every fit
(meta ``complete: false`` until the end), the plots at the end; ``--resume`` reads them back and
skips the (cell, seed) fits already done, so a campaign of hours can run across sessions.

The cell table gives each statistic's uncertainty from a bootstrap over seeds (the fluxes of one
seed share a host fit and are correlated; the cells use the same seeds, so they share noise
realisations too): with 8 seeds of 26 fluxes a raw pull std is known to about +-0.07 and a raw
bias to about +-0.16 CRB, more than the goals' widths. So every fit also records a control
variate (``transcene.validation.linear_oracle``): the flux errors that the fitted model,
linearised at a noise-free point near the truth, makes on the same noise. Its mean (0) and
variance are known exactly, and it reproduces most of the fit's noise response, so subtracting
it leaves unbiased estimates of the same bias, pull rms and coverage with a fraction of the
scatter (the "cv" columns; the goals are judged on them). It needs only the simulation: ``--resume`` adds it to fits made without it.
A cell "meets" a goal on its point estimate; the report flags the goals that the uncertainty
cannot resolve. The last row pools the cells without a systematic.

--compare-nuts fits the same data with method="laplace" and "nuts" in a few cells where the
posterior should be Gaussian (baseline: bright transient off the nucleus) and where it may not
be (a faint transient; a transient on the nucleus), on smaller data sets (NUTS renders the scene
tens of thousands of times), and writes OUTDIR/nuts_vs_laplace.ecsv (one row per epoch),
OUTDIR/nuts_vs_laplace.md and OUTDIR/nuts_vs_laplace.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table, vstack
import astropy.units as u

import transcene as ts
from transcene.epoch import NJY_AB_ZEROPOINT
from transcene.simulate import SimulationConfig, add_outliers, simulate
from transcene.validation import COVERAGE_LEVELS, cell_metrics, control_variate_metrics, coverage_sd_floor, \
    linear_oracle

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HST = DATA / "hst-cosmos-galaxy" / "147246.0_150.416558_1.998697_masknoise.fits"
HSC_BLEND_HST = DATA / "hsc-blend" / "Cut_HST.fits"
MEAN_FWHM = 2.25  # arcsec, the middle of the baseline seeing range
log = logging.getLogger("validate")


@dataclasses.dataclass(frozen=True)
class Cell:
    group: str
    value: str
    changes: dict
    systematic: str = ""
    fit_options: dict = dataclasses.field(default_factory=dict)  # to ts.fit
    dataset_options: dict = dataclasses.field(default_factory=dict)  # to ts.make_dataset
    outliers: dict | None = None  # to simulate.add_outliers (near: the transient)

    @property
    def name(self) -> str:
        return f"{self.group}:{self.value}"


def _offset(k_fwhm: float) -> tuple[float, float]:
    """Transient offset (arcsec) along the baseline Sersic's major axis (30 deg E of N)."""
    r = k_fwhm * MEAN_FWHM
    return (r * np.sin(np.radians(30.0)), r * np.cos(np.radians(30.0)))


CELLS = [
    Cell("baseline", "-", {}),
    *[Cell("sb", str(m), {"host_mag": float(m)}) for m in (15, 17, 21, 23)],
    # seeing below 2 pixels: the PSF is written 4x finer than the pixels (as PSFEx would); from
    # native samples an undersampled PSF rings between pixel centres (docs/model.md)
    Cell("seeing", "0.8-1.2", {"seeing_fwhm": (0.8, 1.2), "psf_oversample": 4}),
    Cell("seeing", "2.5-4.0", {"seeing_fwhm": (2.5, 4.0)}),
    *[Cell("snr", str(m), {"transient_peak_mag": float(m)}) for m in (17, 21, 22.5)],
    *[Cell("offset", f"{k}fwhm", {"transient_offset": _offset(k)}) for k in (0.0, 0.5, 1.0, 2.0)],
    *[Cell("nref", str(k), {"n_reference": k}) for k in (0, 1, 20)],
    Cell("host", "hst", {"host": f"image:{HST}"}),
    Cell("host", "hsc-blend", {"host": f"image:{HSC_BLEND_HST}", "host_mag": 17.0}),
    Cell("sys", "psf1.5%", {"psf_fwhm_error": 0.015}, systematic="PSF width"),
    Cell("sys", "psf1.5%-nuis", {"psf_fwhm_error": 0.015}, systematic="PSF width (nuisance on)",
         dataset_options={"psf_width_jitter": 0.015}),
    # a bright transient (17 mag) magnifies PSF-width errors: the nuisance off and on
    Cell("sys", "psf2%-snr17", {"psf_fwhm_error": 0.02, "transient_peak_mag": 17.0}, systematic="PSF width, bright"),
    Cell("sys", "psf2%-snr17-nuis", {"psf_fwhm_error": 0.02, "transient_peak_mag": 17.0},
         systematic="PSF width, bright (nuisance on)", dataset_options={"psf_width_jitter": 0.02}),
    Cell("sys", "misreg75mas", {"wcs_jitter_arcsec": 0.075}, systematic="misregistration"),
    Cell("sys", "zp5mmag", {"zeropoint_jitter": 0.005}, systematic="zero point"),
    Cell("sys", "zp5mmag-nuis", {"zeropoint_jitter": 0.005}, systematic="zero point (nuisance on)",
         dataset_options={"zp_jitter": 0.005}),
    # a bright host (15 mag) magnifies zero-point errors: the nuisance off and on
    Cell("sys", "zp20mmag-sb15", {"zeropoint_jitter": 0.02, "host_mag": 15.0}, systematic="zero point, bright host"),
    Cell("sys", "zp20mmag-sb15-nuis", {"zeropoint_jitter": 0.02, "host_mag": 15.0},
         systematic="zero point, bright host (nuisance on)", dataset_options={"zp_jitter": 0.02}),
    # the zero-point nuisance on clean data: what it costs when it is not needed
    Cell("likelihood", "zp-nuis", {}, dataset_options={"zp_jitter": 0.005}),
    # ...and the PSF-width nuisance's (its default, off, rests on this and the PSF cells)
    Cell("likelihood", "psf-nuis", {}, dataset_options={"psf_width_jitter": 0.015}),
    # cosmic rays (one within 3 px of the transient per epoch, ~2 elsewhere) and bad columns in
    # 20 % of the epochs, fitted with the Student-t likelihood; the same data fitted as Gaussian
    Cell("sys", "cosmics-t5", {}, systematic="outliers (Student-t 5)", fit_options={"student_t": 5.0},
         outliers={"near_rate": 1.0, "cosmic_rays": 2.0, "bad_column_fraction": 0.2}),
    # the Student-t likelihood on clean data: what robustness costs when it is not needed
    Cell("likelihood", "t5", {}, fit_options={"student_t": 5.0}),
    Cell("sys", "cosmics-gauss", {}, systematic="outliers (Gaussian fit)",
         outliers={"near_rate": 1.0, "cosmic_rays": 2.0, "bad_column_fraction": 0.2}),
]
FAST = ["baseline:-", "sb:15", "offset:0.0fwhm", "nref:1", "host:hst", "sys:misreg75mas"]

MODES = {
    # epochs, references, cutout side (px), seeds per cell
    "fast": dict(n_epochs=12, n_reference=4, size=24, seeds=1, cells=FAST),
    "full": dict(n_epochs=26, n_reference=5, size=32, seeds=8, cells=[c.name for c in CELLS]),
}


#: --compare-nuts: cells and the (smaller) data sets
COMPARE = ["baseline:-", "snr:22.5", "offset:0.0fwhm"]
COMPARE_MODE = dict(n_epochs=8, n_reference=3, size=20, seeds=1, bands=("r",), seeing_fwhm=(1.5, 2.5))


def config_for(cell: Cell, mode: dict, seed: int) -> SimulationConfig:
    base = dict(n_epochs=mode["n_epochs"], n_reference=mode["n_reference"], size=mode["size"], psf_size=21,
                bands=("g", "r"), seeing_fwhm=(1.5, 3.0), pixel_scale_jitter=0.05, rotate=True, host_mag=18.0,
                transient_offset=_offset(0.5), transient_peak_mag=19.0, seed=seed)
    base.update({k: mode[k] for k in ("bands", "seeing_fwhm") if k in mode})
    base.update(cell.changes)
    return SimulationConfig(**base)


def simulate_cell(cell: Cell, mode: dict, seed: int) -> tuple[list, Table, SkyCoord, tuple[list, list]]:
    """The cell's simulated epochs (outliers added), truth table, transient position, and the
    control variate's input: the noiseless simulation and the epochs with their images replaced
    by the Gaussian noise alone (data minus noiseless, before outliers)."""
    cfg = config_for(cell, mode, seed)
    eps, truth = simulate(cfg)
    clean, _ = simulate(cfg, noiseless=True)
    noise = [dataclasses.replace(e, image=np.where(e.mask, 0.0, e.image - c.image)) for e, c in zip(eps, clean)]
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    if cell.outliers is not None:
        rng = np.random.default_rng(10_000 + seed)
        hit = []
        for e in eps:
            x, y = e.wcs.world_to_pixel(target)
            b, _ = add_outliers([e], rng=rng, cosmic_rays=cell.outliers["near_rate"], near=(float(x), float(y)))
            b, _ = add_outliers(b, rng=rng, cosmic_rays=cell.outliers["cosmic_rays"],
                                bad_column_fraction=cell.outliers["bad_column_fraction"])
            hit.append(b[0])
        eps = hit
    return eps, truth, target, (noise, clean)


def oracle(cell: Cell, noise: tuple[list, list], target: SkyCoord, exposure_ids) -> tuple[np.ndarray, ...]:
    """``linear_oracle`` (the control variate, its sd and the CRB, nJy) for the epochs
    ``exposure_ids``; ``noise``: (noise-only epochs, noiseless epochs) from ``simulate_cell``."""
    out = linear_oracle(*noise, target, **cell.dataset_options)
    row = {e.exposure_id: i for i, e in enumerate(noise[0])}
    idx = np.array([row[str(x)] for x in exposure_ids], int)
    return tuple(v[idx] for v in out)


def run_one(cell: Cell, mode: dict, seed: int) -> tuple[Table, dict]:
    eps, truth, target, noise = simulate_cell(cell, mode, seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # expected in some cells (no references; low S/N); the cell table reports the outcome
        warnings.simplefilter("ignore", ts.errors.ConvergenceWarning)
        warnings.simplefilter("ignore", ts.errors.BaselineWarning)
        res = ts.fit(ts.make_dataset(eps, target, **cell.dataset_options), **cell.fit_options)
    elapsed = time.perf_counter() - t0
    lc = res.lightcurve()
    idx = np.asarray(res.dataset.epochs["index"])
    sel = ~np.asarray(lc["is_reference"])
    tr = truth[idx]
    with np.errstate(divide="ignore"):
        sb = NJY_AB_ZEROPOINT - 2.5 * np.log10(np.asarray(tr["host_sb"], float))
    t = Table({
        "cell": [cell.name] * int(sel.sum()), "seed": np.full(sel.sum(), seed),
        "exposure_id": np.asarray(lc["exposure_id"])[sel], "band": np.asarray(lc["band"])[sel],
        "flux": np.asarray(lc["flux"])[sel] * u.nJy, "flux_err": np.asarray(lc["flux_err"])[sel] * u.nJy,
        "flux_true": np.asarray(tr["flux_true"])[sel] * u.nJy,
        "chi2_dof": np.asarray(lc["chi2_dof"])[sel], "sb_mag": sb[sel] * u.mag / u.arcsec**2,
    })
    t["pull"] = (t["flux"] - t["flux_true"]) / t["flux_err"]
    z, z_sd, crb = oracle(cell, noise, target, t["exposure_id"])
    t["crb"], t["oracle"], t["oracle_sd"] = crb * u.nJy, z * u.nJy, z_sd * u.nJy
    info = dict(cell=cell.name, seed=seed, status=res.status, elapsed=elapsed, n_iter=res.n_iter)
    return t, info


def add_oracle(fluxes: Table, mode: dict, save=None) -> Table:
    """``fluxes`` with the control variate (and the CRB from the same linearisation, replacing
    ``crb_at_truth``'s) filled in for the (cell, seed) fits that lack it (campaigns begun before
    it existed), calling ``save(fluxes)`` after each. It needs only the simulation, not the fit."""
    fluxes = Table(fluxes, masked=False, copy=True)
    for name in ("oracle", "oracle_sd"):
        old = np.ma.filled(np.ma.asarray(fluxes[name], float), np.nan) if name in fluxes.colnames else np.nan
        fluxes[name] = np.broadcast_to(old, (len(fluxes),)) * u.nJy
    by_name = {c.name: c for c in CELLS}
    missing = ~np.isfinite(np.asarray(fluxes["oracle_sd"], float))
    todo = sorted({(str(c), int(s)) for c, s in zip(fluxes["cell"][missing], fluxes["seed"][missing])})
    for k, (name, seed) in enumerate(todo):
        sel = np.flatnonzero((np.asarray(fluxes["cell"]) == name) & (np.asarray(fluxes["seed"]) == seed))
        _, _, target, noise = simulate_cell(by_name[name], mode, seed)
        z, z_sd, crb = oracle(by_name[name], noise, target, fluxes["exposure_id"][sel])
        fluxes["oracle"][sel], fluxes["oracle_sd"][sel], fluxes["crb"][sel] = z, z_sd, crb
        if save is not None:
            save(fluxes)
        print(f"control variate added: {name} seed {seed} ({k + 1}/{len(todo)})", flush=True)
    return fluxes


#: the statistic each goal is judged on: the control-variate estimate where every fit has one
JUDGED = {"bias": ("bias_cv", "bias_crb"), "pull": ("pull_rms_cv", "pull_std"),
          "cov68": ("coverage68_cv", "coverage68"), "cov95": ("coverage95_cv", "coverage95")}


def judged(m: dict, goal: str) -> str:
    cv, raw = JUDGED[goal]
    return cv if np.isfinite(m.get(cv, np.nan)) else raw


def goals(m: dict, systematic: str) -> str:
    """The VALIDATION.md / issue goals this cell meets (+) or misses (-)."""
    b, p, c68, c95 = (m[judged(m, g)] for g in ("bias", "pull", "cov68", "cov95"))
    if systematic:
        checks = {"bias<0.2CRB": abs(b) < 0.2, "pullstd<=1.10": p <= 1.10}
    else:
        checks = {
            "bias<0.05CRB": abs(b) < 0.05,
            "pullstd[0.95,1.05]": 0.95 <= p <= 1.05,
            "cov68+-2": abs(c68 - COVERAGE_LEVELS[0]) <= 0.02,
            "cov95+-1": abs(c95 - COVERAGE_LEVELS[1]) <= 0.01,
            "err/CRB<=1.05": m["err_over_crb"] <= 1.05,
        }
    return " ".join(("+" if ok else "-") + k for k, ok in checks.items())


def unresolved(m: dict, systematic: str) -> str:
    """The goals whose band is narrower than twice the statistic's bootstrap sd (the seeds cannot
    tell a pass from a miss)."""
    if systematic:
        return ""
    out = []
    for goal, name, width in (("bias", "bias", 0.05), ("pull", "pullstd", 0.05), ("cov68", "cov68", 0.02),
                              ("cov95", "cov95", 0.01)):
        if not m.get(judged(m, goal) + "_sd", np.nan) * 2 <= width:
            out.append(name)
    return ",".join(out)


CV_STATS = ("bias_cv", "pull_rms_cv", "coverage68_cv", "coverage95_cv")
BOOTSTRAP = 200  # resamples of the seeds for the statistics' uncertainties


def _seed_bootstrap(f: Table, rng: np.random.Generator) -> dict[str, float]:
    """Standard deviations of the statistics over bootstrap resamples of the seeds, or {} with
    fewer than 3. The unit is the seed, not the fit: one seed's fluxes share a host fit, and
    every cell draws the same noise for the same seed (a paired design: differences between
    cells are measured better than each cell), so for the pooled row the fits of one seed are
    not independent either."""
    seed = np.asarray(f["seed"])
    seeds = np.unique(seed)
    if seeds.size < 3:
        return {}
    cols = [np.asarray(f[k], float) for k in ("flux", "flux_err", "flux_true", "crb")]
    cv = [np.asarray(f[k], float) for k in ("oracle", "oracle_sd")] if "oracle" in f.colnames else None
    rows_of = [np.flatnonzero(seed == s) for s in seeds]
    draws = []
    for _ in range(BOOTSTRAP):
        idx = np.concatenate([rows_of[i] for i in rng.integers(0, seeds.size, seeds.size)])
        d = cell_metrics(*(c[idx] for c in cols))
        if cv is not None:
            d.update(control_variate_metrics(*(c[idx] for c in cols + cv)))
        draws.append(d)
    return {k: float(np.nanstd([d[k] for d in draws], ddof=1)) for k in draws[0] if k != "n"}


def _row(f: Table, infos: list[dict], systematic: str, rng: np.random.Generator, **names) -> dict:
    """One row of the cell table: statistics of the fluxes ``f`` with their bootstrap sds, the
    fits' bookkeeping from ``infos``, and the goals met."""
    m = cell_metrics(f["flux"], f["flux_err"], f["flux_true"], f["crb"])
    has_cv = "oracle" in f.colnames and bool(np.all(np.isfinite(np.asarray(f["oracle_sd"], float))))
    # with the control variate missing for some fits the subsets would differ: all or none
    m.update(control_variate_metrics(f["flux"], f["flux_err"], f["flux_true"], f["crb"], f["oracle"], f["oracle_sd"])
             if has_cv else dict.fromkeys(CV_STATS, np.nan))
    boot = _seed_bootstrap(f if has_cv else f[[c for c in f.colnames if not c.startswith("oracle")]], rng)
    for k in ("bias_crb", "pull_std", "coverage68", "coverage95", *CV_STATS):
        m[f"{k}_sd"] = boot.get(k, np.nan)
    # a coverage's sd is at least its independent-flux one: a bootstrap over few seeds
    # underestimates it (transcene.validation.coverage_sd_floor); only with a bootstrap, so that
    # a single seed stays "indicative only" rather than looking resolved
    floor = coverage_sd_floor(f["flux"], f["flux_err"], f["flux_true"],
                              *((f["oracle"], f["oracle_sd"]) if has_cv else ()))
    for k, v in floor.items():
        if np.isfinite(m[f"{k}_sd"]):
            m[f"{k}_sd"] = max(m[f"{k}_sd"], v)
    m.update(names, systematic=systematic or "none", seeds=len(infos),
             converged=sum(i["status"] == "converged" for i in infos),
             chi2_dof=float(np.median(f["chi2_dof"])), sb_mag=float(np.median(f["sb_mag"])),
             fit_seconds=float(np.median([i["elapsed"] for i in infos])))
    m["goals"] = goals(m, systematic)
    u_goals = unresolved(m, systematic)
    if u_goals:
        m["goals"] += f" (unresolved: {u_goals})"
    return m


def summarise(fluxes: Table, infos: list[dict]) -> Table:
    """One row per cell, then (with two or more of them) the cells without a systematic pooled:
    the calibration of the error model as a whole."""
    rows = []
    rng = np.random.default_rng(0)
    clean = []
    cell_of = np.asarray(fluxes["cell"])
    for cell in CELLS:
        sel = cell_of == cell.name
        if not sel.any():
            continue
        inf = [i for i in infos if i["cell"] == cell.name]
        rows.append(_row(fluxes[sel], inf, cell.systematic, rng, cell=cell.name, group=cell.group))
        if not cell.systematic:
            clean.append(cell.name)
    if len(clean) >= 2:
        inf = [i for i in infos if i["cell"] in clean]
        rows.append(_row(fluxes[np.isin(cell_of, clean)], inf, "", rng, cell="pooled:no-systematic", group="pooled"))
    order = ["cell", "group", "systematic", "seeds", "converged", "n", "sb_mag", "bias_crb", "bias_crb_sd", "pull_mean",
             "pull_std", "pull_std_sd", "pull_robust_std", "coverage68", "coverage68_sd", "coverage95", "coverage95_sd",
             "err_over_crb", "chi2_dof", "fit_seconds",
             *[k + sfx for k in CV_STATS for sfx in ("", "_sd")], "goals"]
    t = Table(rows=[[r[k] for k in order] for r in rows], names=order)
    t["sb_mag"].unit = u.mag / u.arcsec**2
    t["fit_seconds"].unit = u.s
    return t


def plots(fluxes: Table, cells: Table, outdir: Path) -> None:
    from matplotlib.figure import Figure

    names = list(cells["cell"])
    clean = [str(r["cell"]) for r in cells if r["systematic"] == "none" and r["group"] != "pooled"]

    def of(name):
        group = clean if name == "pooled:no-systematic" else [name]
        return np.isin(np.asarray(fluxes["cell"]), group)

    ncol = min(4, len(names))
    nrow = int(np.ceil(len(names) / ncol))
    fig = Figure(figsize=(3.2 * ncol, 2.5 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    x = np.linspace(-4, 4, 200)
    for ax, name in zip(axes, names):
        p = np.asarray(fluxes["pull"][of(name)], float)
        ax.hist(np.clip(p, -4.9, 4.9), bins=20, range=(-5, 5), density=True, alpha=0.6)
        ax.plot(x, np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi), "k-", lw=0.8)
        ax.set_title(f"{name} (n={p.size})", fontsize=8)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.supxlabel("pull = (flux - true) / flux_err")
    fig.savefig(outdir / "pulls.png", dpi=110)

    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.subplots()
    from scipy.special import erf

    k = np.linspace(0.05, 3.0, 40)
    nominal = erf(k / np.sqrt(2))
    for name in names:
        p = np.abs(np.asarray(fluxes["pull"][of(name)], float))
        ax.plot(nominal, [np.mean(p < kk) for kk in k], lw=1, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("empirical coverage")
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(outdir / "coverage.png", dpi=110)

    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    sb = np.asarray(fluxes["sb_mag"], float)
    b = (np.asarray(fluxes["flux"], float) - np.asarray(fluxes["flux_true"], float)) / np.asarray(fluxes["crb"], float)
    ok = np.isfinite(sb) & np.isfinite(b)
    ax.plot(sb[ok], b[ok], ".", ms=3, alpha=0.5, color="0.5")
    bins = np.arange(np.floor(sb[ok].min()) if ok.any() else 18, (np.ceil(sb[ok].max()) if ok.any() else 26) + 1, 1.0)
    z = np.asarray(fluxes["oracle"], float) / np.asarray(fluxes["crb"], float) if "oracle" in fluxes.colnames else None
    for j, (lo, hi) in enumerate(zip(bins[:-1], bins[1:])):
        s = ok & (sb >= lo) & (sb < hi)
        if s.sum() >= 5:
            ax.errorbar((lo + hi) / 2 - 0.1, np.median(b[s]), 1.2533 * b[s].std() / np.sqrt(s.sum()), fmt="o", color="k",
                        label="median (raw)" if j == 0 else None)
        if z is not None and (s & np.isfinite(z)).sum() >= 5:
            d = (b - z)[s & np.isfinite(z)]
            ax.errorbar((lo + hi) / 2 + 0.1, d.mean(), d.std() / np.sqrt(d.size), fmt="s", color="tab:blue",
                        label="mean, control variate" if j == 0 else None)
    ax.axhline(0, color="0.3", lw=0.8)
    for y in (-0.05, 0.05):
        ax.axhline(y, color="tab:red", lw=0.6, ls="--")
    ax.set_ylim(-3, 3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_xlabel("host surface brightness at the transient [mag/arcsec^2]")
    ax.set_ylabel("(flux - true) / CRB")
    fig.savefig(outdir / "bias_vs_sb.png", dpi=110)


def report(cells: Table, mode: str, seconds: float) -> str:
    lines = [f"# Validation campaign ({mode} mode)", "",
             f"{len(cells)} cells, {int(np.sum(cells['n']))} epoch fluxes, {seconds / 60:.1f} min on this machine.",
             "Goals (no injected systematic): |bias| < 0.05 CRB, pull std in [0.95, 1.05], coverage within 2 / 1 "
             "points of 68.3 / 95.4 %, median flux_err/CRB <= 1.05. With a systematic: |bias| < 0.2 CRB, pull std <= 1.10.",
             "",
             "The goals are judged on the control-variate (cv) estimates: the same statistics with the noise "
             "response of the fitted model linearised at a noise-free point subtracted (transcene.validation.linear_oracle; "
             "its mean and variance are known exactly, so the estimates stay unbiased while their scatter over noise "
             "realisations falls several-fold; docs/validation.md). bias: mean (flux - true - z) / CRB; pull: rms pull. The raw "
             "statistics follow (bias: median (flux - true) / CRB as VALIDATION.md defines it). +- is the bootstrap "
             "sd over seeds (3 or more; for a coverage at least its independent-flux sd, since few seeds "
             "underestimate it); 'unresolved' lists the goals narrower than twice that sd. With one seed "
             "per cell (fast mode) the raw statistics are indicative only (a pull std from 16 fluxes scatters by "
             "~0.18).", "",
             "| cell | sb [mag/\"^2] | n | conv. | bias/CRB (cv) | pull rms (cv) | cov68 (cv) [%] | cov95 (cv) [%] | "
             "bias/CRB (raw) | pull std (raw) | robust | cov68 [%] | cov95 [%] | err/CRB | chi2/dof | fit [s] | goals |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pm(v, sd, fmt, scale=1.0):
        if not np.isfinite(v):
            return "-"
        text = format(scale * v, fmt)
        return text if not np.isfinite(sd) else f"{text} +- {format(scale * sd, fmt.lstrip('+'))}"

    for r in cells:
        lines.append(f"| {r['cell']} | {r['sb_mag']:.1f} | {r['n']} | {r['converged']}/{r['seeds']} | "
                     f"{pm(r['bias_cv'], r['bias_cv_sd'], '+.3f')} | {pm(r['pull_rms_cv'], r['pull_rms_cv_sd'], '.3f')} | "
                     f"{pm(r['coverage68_cv'], r['coverage68_cv_sd'], '.1f', 100)} | "
                     f"{pm(r['coverage95_cv'], r['coverage95_cv_sd'], '.1f', 100)} | "
                     f"{pm(r['bias_crb'], r['bias_crb_sd'], '+.3f')} | {pm(r['pull_std'], r['pull_std_sd'], '.3f')} | "
                     f"{r['pull_robust_std']:.3f} | {pm(r['coverage68'], r['coverage68_sd'], '.1f', 100)} | "
                     f"{pm(r['coverage95'], r['coverage95_sd'], '.1f', 100)} | {r['err_over_crb']:.3f} | "
                     f"{r['chi2_dof']:.3f} | {r['fit_seconds']:.0f} | {r['goals']} |")
    lines += ["", "Plots: pulls.png (per cell), coverage.png (empirical vs nominal), bias_vs_sb.png.", ""]
    return "\n".join(lines)


def compare_nuts(cell: Cell, seed: int) -> tuple[Table, dict]:
    """Laplace and NUTS flux errors on one simulated data set (one row per science epoch)."""
    import jax

    cfg = config_for(cell, COMPARE_MODE, seed)
    eps, truth = simulate(cfg)
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    ds = ts.make_dataset(eps, target)
    t0 = time.perf_counter()
    lap = ts.fit(ds)
    t_lap = time.perf_counter() - t0
    t0 = time.perf_counter()
    nuts = ts.fit(ds, init=lap.scene, method="nuts", key=jax.random.key(seed),
                  nuts=ts.NutsOptions(num_warmup=200, num_samples=500, num_chains=2, force=True))
    t_nuts = time.perf_counter() - t0
    a, b = lap.lightcurve(), nuts.lightcurve()
    sci = ~np.asarray(a["is_reference"])
    idx = np.asarray(ds.epochs["index"])
    true = np.asarray(truth["flux_true"], float)[idx][sci]
    t = Table({
        "cell": [cell.name] * int(sci.sum()), "seed": np.full(sci.sum(), seed),
        "exposure_id": np.asarray(a["exposure_id"])[sci],
        "snr": np.asarray(a["snr"].filled(np.nan))[sci],
        "laplace_err": np.asarray(a["flux_err"])[sci] * u.nJy, "nuts_err": np.asarray(b["flux_err"])[sci] * u.nJy,
        "laplace_pull": (np.asarray(a["flux"])[sci] - true) / np.asarray(a["flux_err"])[sci],
        "nuts_pull": (np.asarray(b["flux"])[sci] - true) / np.asarray(b["flux_err"])[sci],
        "nuts_rhat": np.asarray(b["flux_rhat"])[sci], "nuts_ess": np.asarray(b["flux_ess"])[sci],
    })
    t["ratio"] = t["nuts_err"] / t["laplace_err"]
    d = nuts.posterior.diagnostics()
    pos_ratio = nuts.posterior.position.std(axis=0) / np.sqrt(np.diag(lap.position_cov))
    info = dict(cell=cell.name, laplace_s=t_lap, nuts_s=t_nuts, converged=d["converged"], divergent=d["divergent"],
                step_size=d["step_size"], tree_depth=d["mean_tree_depth"], min_ess=d["min_ess"],
                max_rhat=d["max_rhat"], n_params=int(nuts.posterior.n_params), pos_ratio=pos_ratio)
    return t, info


def compare_report(rows: Table, infos: list[dict]) -> str:
    lines = ["# Laplace vs NUTS flux errors", "",
             "Same data, same MAP; NUTS: 2 chains x 500 draws after 200 warm-up. Goal: per-epoch errors agree to "
             "10 % where the posterior is Gaussian. The Monte-Carlo error of a NUTS standard deviation is about "
             "1/sqrt(2 ESS) (2-3 % here).", "",
             "| cell | params | epochs | median NUTS/Laplace | min | max | within 10 % | position sd ratio | "
             "min ESS | max R-hat | divergent | Laplace [s] | NUTS [s] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for inf in infos:
        r = rows[np.asarray(rows["cell"]) == inf["cell"]]
        ratio = np.asarray(r["ratio"])
        lines.append(f"| {inf['cell']} | {inf['n_params']} | {len(r)} | {np.median(ratio):.3f} | {ratio.min():.3f} | "
                     f"{ratio.max():.3f} | {np.mean(np.abs(ratio - 1) < 0.10) * 100:.0f} % | "
                     f"{', '.join(f'{v:.2f}' for v in inf['pos_ratio'])} | {inf['min_ess']:.0f} | {inf['max_rhat']:.3f} | "
                     f"{inf['divergent']} | {inf['laplace_s']:.0f} | {inf['nuts_s']:.0f} |")
    lines += ["", "Per epoch: nuts_vs_laplace.ecsv; plot: nuts_vs_laplace.png (ratio against S/N).", ""]
    return "\n".join(lines)


def run_compare(outdir: Path, seeds: int) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {c.name: c for c in CELLS}
    tables, infos = [], []
    for name in COMPARE:
        for seed in range(seeds):
            t, info = compare_nuts(by_name[name], seed)
            tables.append(t)
            infos.append(info)
            print(f"{name} seed {seed}: NUTS/Laplace error ratio median {np.median(t['ratio']):.3f} "
                  f"[{np.min(t['ratio']):.3f}, {np.max(t['ratio']):.3f}]; NUTS {info['nuts_s']:.0f} s", flush=True)
    rows = vstack(tables)
    rows.write(outdir / "nuts_vs_laplace.ecsv", overwrite=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in COMPARE:
        r = rows[np.asarray(rows["cell"]) == name]
        ax.scatter(np.abs(np.asarray(r["snr"])), r["ratio"], label=name, s=18)
    ax.axhspan(0.9, 1.1, color="0.9", zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("|S/N| of the epoch (Laplace)")
    ax.set_ylabel("NUTS / Laplace flux error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(outdir / "nuts_vs_laplace.png", dpi=120)
    plt.close(fig)
    text = compare_report(rows, infos)
    (outdir / "nuts_vs_laplace.md").write_text(text)
    print(text)
    return 0


RUN_COLUMNS = ["cell", "seed", "status", "elapsed", "n_iter", "commit"]


def _git_commit() -> str:
    """The checkout's commit (with '+' if it has uncommitted changes), or '' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+" if dirty else "")


def _read_back(outdir: Path, mode: str) -> tuple[list[Table], list[dict], float]:
    """The fluxes and runs of an earlier (stopped) campaign in ``outdir``, for --resume."""
    fpath, rpath = outdir / "fluxes.ecsv", outdir / "runs.ecsv"
    if not (fpath.exists() and rpath.exists()):
        return [], [], 0.0
    runs = Table.read(rpath)
    if runs.meta.get("mode") != mode:
        raise SystemExit(f"--resume: {rpath} holds a {runs.meta.get('mode')!r}-mode campaign, not {mode!r}")
    fluxes = Table.read(fpath)
    missing = [c for c in RUN_COLUMNS if c not in runs.colnames]
    if missing:
        raise SystemExit(f"--resume: {rpath} lacks the columns {missing}")
    infos = [{k: (r[k].item() if hasattr(r[k], "item") else r[k]) for k in RUN_COLUMNS} for r in runs]
    for i in infos:
        i["elapsed"] = float(i["elapsed"])
        i["commit"] = str(i["commit"])
    log.info("resuming: %d fits read from %s", len(infos), outdir)
    return [fluxes], infos, float(runs.meta.get("seconds", 0.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("outdir", type=Path)
    p.add_argument("--mode", choices=sorted(MODES), default="fast")
    p.add_argument("--cells", default=None, help="comma-separated cell names (default: the mode's cells)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the mode's)")
    p.add_argument("--compare-nuts", action="store_true", help="Laplace vs NUTS errors instead of the grid")
    p.add_argument("--resume", action="store_true",
                   help="read OUTDIR's tables and skip the (cell, seed) fits already in them")
    p.add_argument("--no-control-variate", action="store_true",
                   help="with --resume: leave fits read back without their control variate as they are")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.compare_nuts:
        args.outdir.mkdir(parents=True, exist_ok=True)
        return run_compare(args.outdir, args.seeds or 1)
    mode = dict(MODES[args.mode])
    names = args.cells.split(",") if args.cells else mode["cells"]
    by_name = {c.name: c for c in CELLS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        p.error(f"--cells: unknown {unknown}; known: {', '.join(by_name)}")
    needs_data = [n for n in names if by_name[n].group == "host" and not (HST.exists() and HSC_BLEND_HST.exists())]
    if needs_data:
        print(f"skipping {needs_data}: real host images not found under {DATA}", file=sys.stderr)
        names = [n for n in names if n not in needs_data]
    seeds = args.seeds or mode["seeds"]
    args.outdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tables, infos = [], []
    seconds_before = 0.0
    if args.resume:
        tables, infos, seconds_before = _read_back(args.outdir, args.mode)
    done = {(i["cell"], int(i["seed"])) for i in infos}
    commit = _git_commit()

    def write_tables(final: bool):
        fluxes = vstack(tables)
        cells = summarise(fluxes, infos)
        seconds = seconds_before + time.perf_counter() - t_start
        cells.meta.update(mode=args.mode, seeds=seeds, seconds=round(seconds, 1), version=ts.__version__,
                          complete=final)
        fluxes.write(args.outdir / "fluxes.ecsv", overwrite=True)
        cells.write(args.outdir / "cells.ecsv", overwrite=True)
        runs = Table(rows=[[i[k] for k in RUN_COLUMNS] for i in infos], names=RUN_COLUMNS)
        runs["elapsed"].unit = u.s
        runs.meta.update(mode=args.mode, seconds=round(seconds, 1))
        runs.write(args.outdir / "runs.ecsv", overwrite=True)
        text = report(cells, args.mode, seconds)
        (args.outdir / "report.md").write_text(text)
        return fluxes, cells, text

    if tables and not args.no_control_variate:

        def save(fluxes):  # after each fit's control variate: nothing is lost on a stop
            tables[:] = [fluxes]
            write_tables(final=False)

        tables[:] = [add_oracle(tables[0], mode, save)]

    for name in names:
        for seed in range(seeds):
            if (name, seed) in done:
                continue
            t, info = run_one(by_name[name], mode, seed)
            info["commit"] = commit
            tables.append(t)
            infos.append(info)
            m = cell_metrics(t["flux"], t["flux_err"], t["flux_true"], t["crb"])
            if "oracle" in t.colnames:
                m.update(control_variate_metrics(*(t[k] for k in ("flux", "flux_err", "flux_true", "crb", "oracle",
                                                                  "oracle_sd"))))
            print(f"{name} seed {seed}: {info['status']} in {info['elapsed']:.0f} s; pull std {m['pull_std']:.2f}, "
                  f"bias {m['bias_crb']:+.3f} CRB (cv {m.get('bias_cv', np.nan):+.3f}), err/CRB {m['err_over_crb']:.3f}", flush=True)
            # the tables so far after every fit: a campaign of hours can be stopped without loss
            write_tables(final=False)
    if not tables:
        p.error("nothing to summarise: no cells ran")
    fluxes, cells, text = write_tables(final=True)
    plots(fluxes, cells, args.outdir)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
