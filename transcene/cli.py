"""The ``transcene`` command line. Only this module decides how progress and errors look."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Light curves of transients on their host galaxies by joint scene modelling.\n\n"
    "Example: transcene demo transcene-demo && transcene plot transcene-demo",
)
# soft_wrap: never break a path or a message across lines (people copy them)
err = Console(stderr=True, soft_wrap=True, highlight=False)

EXIT_OK, EXIT_NOT_CONVERGED, EXIT_BAD_INPUT, EXIT_ERROR = 0, 1, 2, 3


class _ConsoleHandler(logging.Handler):
    """Log lines through the console that draws the progress bars, so neither tears the other
    (and through whatever stderr is now, not the stream the first call saw); never wrapped."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err.print(escape(self.format(record)), soft_wrap=True, highlight=False)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _setup(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("jax", "absl", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def show(message, category, filename, lineno, file=None, line=None):
        err.print(f"[yellow]warning:[/yellow] {escape(str(message))}")

    warnings.showwarning = show
    # compiled programs from disk: a new process skips most of a first fit's compilation
    from .compile_cache import enable_compile_cache

    enable_compile_cache()


def _fail(exc: BaseException, verbose: bool) -> None:
    from .errors import TransceneError

    if verbose:
        err.print_exception()
    code = EXIT_BAD_INPUT if isinstance(exc, (TransceneError, ValueError, FileNotFoundError)) else EXIT_ERROR
    err.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(code)


def _progress(quiet: bool):
    if quiet or not err.is_terminal:
        return None
    return lambda step, total, msg: err.print(f"  iteration {step}: {msg}")


def _run_fit(paths, target, zero_before, host, output, scene_out, plot, fit_radius, verbose, quiet,
             **fit_options) -> int:
    from .api import fit_files, write_outputs

    with err.status("fitting the scene...", spinner="dots") if (err.is_terminal and not quiet) else _null():
        result = fit_files(paths, target=target, zero_before=zero_before, host=host, fit_radius=fit_radius,
                           progress=_progress(quiet), **fit_options)
    out = write_outputs(result, lightcurve=output, scene_dir=scene_out, plot=plot)
    _print_fit(result, out, quiet)
    return EXIT_OK if result.converged else EXIT_NOT_CONVERGED


def _check_fit_options(host: str, method: str, student_t: float | None, shift_prior: float | None,
                       max_iter: int, position_prior: float = 0.5, position: str = "auto") -> None:
    """The fit options shared by ``fit`` and ``lightcurve``, checked before any work starts."""
    from .fit import METHODS, POSITION_MODES

    if host not in ("pixel", "sersic"):
        raise ValueError(f"--host must be 'pixel' or 'sersic', got {host!r}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if student_t is not None and not student_t > 0:
        raise ValueError(f"--student-t must be a positive number of degrees of freedom, got {student_t}")
    if (shift_prior is not None and shift_prior < 0) or max_iter < 1:
        raise ValueError(f"need --shift-prior >= 0 (got {shift_prior}) and --max-iter >= 1 (got {max_iter})")
    if position not in POSITION_MODES:
        raise ValueError(f"--position must be one of {', '.join(POSITION_MODES)}, got {position!r}")
    if not (math.isfinite(position_prior) and position_prior > 0):
        raise ValueError(f"--position-prior must be a width in arcsec > 0, got {position_prior}")


def _priors(position_prior: float) -> dict:
    """``fit`` keyword arguments for the transient-position prior (none at the default)."""
    from .solve import Priors

    return {} if position_prior == Priors().position else dict(priors=Priors(position=position_prior))


# options shared by ``fit`` and ``lightcurve`` (one definition each)
_ZP_JITTER = typer.Option(0.0, help="Prior rms of each epoch's zero-point error, mag (e.g. 0.01); 0: zero points "
                          "taken as exact. Fits a calibration factor per epoch against the host.")
_PSF_WIDTH_JITTER = typer.Option(0.0, help="Prior rms of each epoch's fractional PSF FWHM error (e.g. 0.02); "
                                 "0: PSFs taken as exact. Fits a PSF-width change per epoch for the point sources.")
_POSITION_PRIOR = typer.Option(0.5, help="Prior width of the transient's position about RA/Dec, arcsec: the "
                                "coordinate's precision. For a faint transient (summed S/N below ~10) whose "
                                "position is known, give it (e.g. 0.05): a free position then wanders to the "
                                "noise and the errors come out ~5-15 % small (docs/validation.md).")
_POSITION = typer.Option("auto", help="Transient position: auto (fitted if the transient's summed S/N is at least "
                         "10, else held at RA/Dec: forced photometry), free (always fitted) or fixed (always "
                         "held). The light curve's metadata 'position' says which.")
_NUTS_SAMPLES = typer.Option(1000, help="--method nuts: draws per chain after warm-up.")
_NUTS_WARMUP = typer.Option(500, help="--method nuts: warm-up (adaptation) draws per chain.")
_NUTS_CHAINS = typer.Option(2, help="--method nuts: chains (R-hat needs at least 2).")
_SEED = typer.Option(0, help="--method nuts: random seed (a run is reproducible given it).")
_FORCE = typer.Option(False, help="--method nuts: write the light curve even if the chains did not converge "
                      "(rows flagged NOT_CONVERGED); without it the command fails.")


def _nuts_options(method: str, samples: int, warmup: int, chains: int, seed: int, force: bool) -> dict:
    """``fit`` keyword arguments for ``--method nuts`` (none otherwise)."""
    if method != "nuts":
        return {}
    import jax

    from .nuts import NutsOptions

    return dict(nuts=NutsOptions(num_samples=samples, num_warmup=warmup, num_chains=chains, force=force),
                key=jax.random.key(seed))


def _print_fit(result, out: dict, quiet: bool) -> None:
    """The fit's status, detection and null-test lines and the files written."""
    if not quiet:
        lc = result.lightcurve()
        err.print(
            f"fit [bold]{result.status}[/bold] in {result.n_iter} iterations ({result.elapsed:.1f} s, "
            f"errors: {result.method}): "
            f"{len(lc)} epochs ({int(sum(lc['is_reference']))} transient-free), bands {', '.join(result.dataset.bands)}"
        )
        if result.posterior is not None:
            d = result.posterior.diagnostics()
            err.print(f"  NUTS: {d['chains']} chains, {d['draws']} draws, max R-hat {d['max_rhat']:.3f}, "
                      f"min ESS {d['min_ess']:.0f}, {d['divergent']} divergent, {d['seconds']:.0f} s"
                      + ("" if d["converged"] else " [red]NOT CONVERGED[/red]: " + "; ".join(d["problems"])))
        det = result.detection()
        err.print("  detection (no transient in any measured epoch rejected at): "
                  + ", ".join(f"{b} {d['sigma']:.1f} sigma ({d['dof']} epochs)" for b, d in det.items() if d["dof"]))
        for b, d in (result.reference_null or {}).items():
            verdict = "n/a (fewer than 2 references)" if not d["dof"] else (
                f"chi2 {d['chi2']:.1f} / {d['dof']} dof, p = {d['p_value']:.2g}"
                + (f" [red]FAILED[/red]: most deviant {escape(d['worst_exposure'])}" if d["p_value"] < 1e-3 else " ok"))
            err.print(f"  reference null test, {b}: {verdict}")
        for k, v in out.items():
            err.print(f"  {k}: {v}")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@app.command("fit")
def fit_cmd(
    epoch_files: List[Path] = typer.Argument(..., help="Epoch FITS files (or directories of them)."),
    ra: Optional[str] = typer.Option(None, help="Target RA (degrees or hh:mm:ss); default: first epoch's centre."),
    dec: Optional[str] = typer.Option(None, help="Target Dec (degrees or dd:mm:ss)."),
    zero_before: Optional[float] = typer.Option(None, help="MJD: epochs before it are transient-free."),
    host: str = typer.Option("pixel", help="Host model: pixel (non-parametric) or sersic."),
    output: Path = typer.Option(Path("lightcurve.ecsv"), "-o", "--output", help="Light curve (.ecsv, .csv, .parquet)."),
    scene_out: Optional[Path] = typer.Option(None, help="Directory for host FITS, parameters and epoch images."),
    plot: Optional[Path] = typer.Option(None, help="Light-curve plot (PNG/PDF); epoch mosaic, scene and diagnostics plots go next to it."),
    fit_radius: Optional[float] = typer.Option(None, help="Half-side of the fitted region, arcsec."),
    method: str = typer.Option("laplace", help="Flux errors: laplace (marginal over host, position and shifts), "
                               "linear (geometry fixed at the MAP), nuts (posterior draws; slow: minutes for "
                               "a few epochs) or map (conditional, quick look)."),
    shift_prior: float = typer.Option(0.1, help="Prior width of each epoch's astrometric shift, arcsec (0: no shifts)."),
    position: str = _POSITION,
    position_prior: float = _POSITION_PRIOR,
    zp_jitter: float = _ZP_JITTER,
    psf_width_jitter: float = _PSF_WIDTH_JITTER,
    max_iter: int = typer.Option(50, help="Gauss-Newton iterations before the fit is declared not converged."),
    student_t: Optional[float] = typer.Option(None, help="Student-t pixel likelihood with this many degrees of freedom "
                                              "(e.g. 5) for cosmic rays and bad columns the masks missed; "
                                              "default Gaussian. Errors grow by 3 % at 5."),
    null_test: bool = typer.Option(False, help="Also test the transient-free epochs for transient light (refits "
                                   "their fluxes; about the covariance's cost again)."),
    nuts_samples: int = _NUTS_SAMPLES,
    nuts_warmup: int = _NUTS_WARMUP,
    nuts_chains: int = _NUTS_CHAINS,
    seed: int = _SEED,
    force: bool = _FORCE,
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging and tracebacks."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors."),
) -> None:
    """Fit a scene to epoch files and write the forced-photometry light curve.

    Example: transcene fit epochs/*.fits --zero-before 60010 -o lc.ecsv --scene-out scene --plot lc.png
    """
    _setup(verbose, quiet)
    try:
        _check_fit_options(host, method, student_t, shift_prior, max_iter, position_prior, position)
        target = None
        if (ra is None) != (dec is None):
            raise ValueError("give both --ra and --dec, or neither")
        if ra is not None:
            from .geometry import parse_coord

            target = parse_coord(ra, dec)
        code = _run_fit(epoch_files, target, zero_before, host, output, scene_out, plot, fit_radius, verbose, quiet,
                        method=method, shift_prior=shift_prior, zp_jitter=zp_jitter, psf_width_jitter=psf_width_jitter, max_iter=max_iter, null_test=null_test, student_t=student_t,
                        position=position, **_priors(position_prior), **_nuts_options(method, nuts_samples, nuts_warmup, nuts_chains, seed, force))
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to an exit code with a clear message
        _fail(exc, verbose)
    raise typer.Exit(code)


@app.command("simulate")
def simulate_cmd(
    outdir: Path = typer.Argument(..., help="Directory to write epoch files and truth.ecsv into."),
    epochs: int = typer.Option(40, help="Number of science epochs."),
    references: int = typer.Option(6, help="Number of transient-free reference epochs."),
    bands: str = typer.Option("g,r", help="Comma-separated bands."),
    host: str = typer.Option("sersic", help="sersic, none, or image:FILE (a galaxy image with WCS)."),
    size: int = typer.Option(48, help="Cutout side, pixels."),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, help="Overwrite existing files."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging and tracebacks."),
) -> None:
    """Write a realistic synthetic data set (epoch files + truth table).

    Example: transcene simulate sim --epochs 30 --bands g,r --host sersic --seed 1
    """
    _setup(verbose, False)
    try:
        from .simulate import SimulationConfig, write_simulation

        cfg = SimulationConfig(n_epochs=epochs, n_reference=references,
                               bands=tuple(b.strip() for b in bands.split(",") if b.strip()),
                               host=host, size=size, seed=seed)
        out = write_simulation(outdir, cfg, overwrite=overwrite)
        from astropy.table import Table

        meta = Table.read(out / "truth.ecsv").meta
        err.print(f"wrote {epochs + references} epoch files and truth.ecsv to {out}; transient at "
                  f"RA {float(meta['transient_ra']):.6f}, Dec {float(meta['transient_dec']):+.6f} (deg)")
    except Exception as exc:  # noqa: BLE001
        _fail(exc, verbose)


@app.command("demo")
def demo_cmd(
    outdir: Path = typer.Argument(Path("transcene-demo"), help="Where to put the simulated data and the results."),
    epochs: int = typer.Option(16, help="Number of science epochs."),
    seed: int = typer.Option(1, help="Random seed."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging and tracebacks."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors."),
) -> None:
    """Simulate a transient on a galaxy, fit it, and compare with the truth (offline).

    Example: transcene demo transcene-demo
    """
    _setup(verbose, quiet)
    try:
        import numpy as np
        from astropy.table import Table

        from .simulate import SimulationConfig, write_simulation

        data = outdir / "epochs"
        cfg = SimulationConfig(n_epochs=epochs, n_reference=4, bands=("g", "r"), size=32, psf_size=21, seed=seed)
        write_simulation(data, cfg, overwrite=True)
        truth = Table.read(data / "truth.ecsv")
        from .geometry import parse_coord

        target = parse_coord(truth.meta["transient_ra"], truth.meta["transient_dec"])
        code = _run_fit(sorted(data.glob("epoch_*.fits")), target, None, "pixel", outdir / "lightcurve.ecsv",
                        outdir / "scene", outdir / "lightcurve.png", None, verbose, quiet)
        from .plot import plot_lightcurve

        ref = truth[["mjd", "band", "flux_true"]]
        ref.rename_column("flux_true", "flux")
        ref["flux_err"] = 0.0
        plot_lightcurve(outdir, reference=ref, reference_label="truth").savefig(outdir / "lightcurve_vs_truth.png", dpi=120)
        lc = Table.read(outdir / "lightcurve.ecsv")
        tr = {str(e): float(f) for e, f in zip(truth["exposure_id"], truth["flux_true"])}
        sel = ~np.asarray(lc["is_reference"])
        pulls = np.array([(float(f) - tr[str(e)]) / float(s) for e, f, s in
                          zip(lc["exposure_id"][sel], lc["flux"][sel], lc["flux_err"][sel])])
        err.print(f"demo: {sel.sum()} epoch fluxes vs truth: pull mean {pulls.mean():+.2f}, std {pulls.std():.2f}")
        err.print(f"outputs in {outdir}/ (lightcurve.ecsv, lightcurve*.png, scene/); redraw with: transcene plot {outdir}")
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001
        _fail(exc, verbose)
    raise typer.Exit(code)


@app.command("plot")
def plot_cmd(
    result_dir: Path = typer.Argument(..., help="A fit's output directory: lightcurve.ecsv and (from --scene-out) scene/."),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="Light-curve plot path; the others go next to it. Default RESULT_DIR/lightcurve.png."),
    epochs: Optional[str] = typer.Option(None, help="Comma-separated exposure ids for the epoch mosaic (default: a selection)."),
    reference: Optional[Path] = typer.Option(None, help="External light curve to overlay: a table with mjd, band, flux, flux_err (nJy)."),
    reference_label: str = typer.Option("external", help="Legend label of --reference."),
    magnitudes: bool = typer.Option(False, help="Light curve in AB magnitudes instead of nJy."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging and tracebacks."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors."),
) -> None:
    """Draw the light curve, epoch mosaic, scene and diagnostics of a finished fit.

    Example: transcene plot transcene-demo --epochs sim1_004,sim1_010 --magnitudes
    """
    _setup(verbose, quiet)
    try:
        from astropy.table import Table

        from .plot import write_plots

        ref = None
        if reference is not None:
            ref = Table.read(reference)
            missing = [c for c in ("mjd", "band", "flux", "flux_err") if c not in ref.colnames]
            if missing:
                raise ValueError(f"{reference}: column(s) {missing} missing; expected mjd, band, flux, flux_err (nJy)")
        ids = [e.strip() for e in epochs.split(",") if e.strip()] if epochs else None
        out = write_plots(result_dir, output or result_dir / "lightcurve.png", exposure_ids=ids, reference=ref,
                          reference_label=reference_label, magnitudes=magnitudes)
        if not quiet:
            for k, v in out.items():
                err.print(f"  {k}: {v}")
    except Exception as exc:  # noqa: BLE001
        _fail(exc, verbose)


class _FetchDisplay:
    """Rich progress on stderr for fetching: one bar per survey with downloaded/cached/failed
    counts; silent when quiet or when stderr is not a terminal (logs still say what happened)."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and err.is_terminal
        self.tasks: dict[str, int] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=err)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
        return False

    def __call__(self, ev) -> None:
        if self._progress is None:
            return
        p = self._progress
        if ev.stage == "done":  # fetching is over: the fit's own progress lines follow
            p.stop()
            self._progress = None
            return
        if ev.stage == "query":
            self.counts[ev.survey] = {"downloaded": 0, "cached": 0, "failed": 0}
            self.tasks[ev.survey] = p.add_task(f"{ev.survey}: querying", total=None, counts="")
        elif ev.stage == "found" and ev.survey in self.tasks:
            desc = f"{ev.survey}: {ev.total} epochs" if ev.status != "failed" else f"{ev.survey}: [red]query failed[/red]"
            p.update(self.tasks[ev.survey], description=desc, total=max(ev.total, 1),
                     completed=0 if ev.total else 1)
        elif ev.stage == "epoch" and ev.survey in self.tasks:
            c = self.counts[ev.survey]
            c[ev.status] = c.get(ev.status, 0) + 1
            text = f"{c['downloaded']} downloaded, {c['cached']} cached" + (
                f", [red]{c['failed']} failed[/red]" if c["failed"] else "")
            p.update(self.tasks[ev.survey], completed=ev.done, counts=text)


def _survey_options(survey, bands, start, end, size, directory):
    surveys = [s.strip() for item in (survey or ["ztf"]) for s in item.split(",") if s.strip()]
    band_list = [b.strip() for b in bands.split(",") if b.strip()] if bands else None
    if size is not None and size < 5:
        raise ValueError(f"--size must be at least 5 pixels, got {size}")
    if start is not None and end is not None and end < start:
        raise ValueError(f"--end ({end}) is before --start ({start})")
    if directory is not None and not directory.is_dir():
        raise FileNotFoundError(f"--dir {directory}: no such directory")
    return surveys, band_list


def _print_failures(report, quiet: bool) -> None:
    if quiet:
        return
    epoch_failures = [f for f in report.failures if f.exposure_id]
    for f in report.failures[:10]:
        err.print(f"  [red]failed[/red] {escape(f.survey)} {escape(f.exposure_id or '(query)')}: {escape(f.reason)}")
    if len(report.failures) > 10:
        err.print(f"  ... and {len(report.failures) - 10} more (all listed in the table's metadata)")
    if epoch_failures:
        err.print(f"  {len(epoch_failures)} epoch(s) could not be fetched: rows flagged FETCH_FAILED (64)")


@app.command("lightcurve", context_settings={"ignore_unknown_options": True})
def lightcurve_cmd(
    ra: str = typer.Argument(..., help="Target RA (degrees or hh:mm:ss)."),
    dec: str = typer.Argument(..., help="Target Dec (degrees or dd:mm:ss)."),
    survey: Optional[List[str]] = typer.Option(None, "--survey", "-s", help="Survey adapter (repeat or comma-separate; "
                                               "default ztf). See: transcene surveys."),
    start: Optional[float] = typer.Option(None, help="Earliest MJD of science epochs (references are always used)."),
    end: Optional[float] = typer.Option(None, help="Latest MJD of science epochs."),
    bands: Optional[str] = typer.Option(None, help="Comma-separated bands: one letter (g,r) or full names (ztfg,decam_r)."),
    size: Optional[int] = typer.Option(None, help="Cutout side in pixels (default: the survey's)."),
    zero_before: Optional[float] = typer.Option(None, help="MJD: epochs before it are transient-free."),
    method: str = typer.Option("laplace", help="Flux errors: laplace, linear, nuts or map (see transcene fit --help)."),
    output: Path = typer.Option(Path("lightcurve.ecsv"), "-o", "--output", help="Light curve (.ecsv, .csv, .parquet)."),
    plot: Optional[Path] = typer.Option(None, help="Light-curve plot (PNG/PDF); the other plots go next to it."),
    scene_out: Optional[Path] = typer.Option(None, help="Directory for host FITS, parameters and epoch images."),
    refresh: bool = typer.Option(False, help="Ignore the cache: query and download everything again."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Local directory for adapters that read files "
                                             "(ztf-alerts: Avro packets; fits: FITS images)."),
    host: str = typer.Option("pixel", help="Host model: pixel (non-parametric) or sersic."),
    fit_radius: Optional[float] = typer.Option(None, help="Half-side of the fitted region, arcsec."),
    shift_prior: Optional[float] = typer.Option(None, help="Prior width of each epoch's astrometric shift, arcsec "
                                                "(default: the surveys' astrometric precision)."),
    position: str = _POSITION,
    position_prior: float = _POSITION_PRIOR,
    zp_jitter: float = _ZP_JITTER,
    psf_width_jitter: float = _PSF_WIDTH_JITTER,
    max_iter: int = typer.Option(50, help="Gauss-Newton iterations before the fit is declared not converged."),
    student_t: Optional[float] = typer.Option(None, help="Student-t pixel likelihood with this many degrees of freedom."),
    nuts_samples: int = _NUTS_SAMPLES,
    nuts_warmup: int = _NUTS_WARMUP,
    nuts_chains: int = _NUTS_CHAINS,
    seed: int = _SEED,
    force: bool = _FORCE,
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging and tracebacks."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors."),
) -> None:
    """Fetch every epoch covering RA DEC from the surveys, fit the scene, write the light curve.

    Example: transcene lightcurve 0.81429 16.14568 --survey ztf --bands g,r --zero-before 59350 -o lc.ecsv --plot lc.png
    """
    _setup(verbose, quiet)
    code = EXIT_ERROR
    try:
        from .api import lightcurve, write_outputs
        from .geometry import parse_coord

        _check_fit_options(host, method, student_t, shift_prior, max_iter, position_prior, position)
        surveys, band_list = _survey_options(survey, bands, start, end, size, directory)
        coord = parse_coord(ra, dec)
        with _FetchDisplay(quiet) as display:
            run = lightcurve(coord, surveys=surveys, bands=band_list, start=start, end=end, size_pix=size,
                             refresh=refresh, local_dir=directory, zero_before=zero_before, host=host,
                             fit_radius=fit_radius, shift_prior=shift_prior, zp_jitter=zp_jitter,
                             psf_width_jitter=psf_width_jitter, fetch_progress=display,
                             progress=_progress(quiet), method=method, max_iter=max_iter, student_t=student_t,
                             position=position, **_priors(position_prior), **_nuts_options(method, nuts_samples, nuts_warmup, nuts_chains, seed, force))
        result, report = run.result, run.report
        if not quiet:
            err.print(f"fetch: {report.summary()}")
        _print_failures(report, quiet)
        out = write_outputs(result, lightcurve=output, scene_dir=scene_out, plot=plot, fetch_report=report)
        _print_fit(result, out, quiet)
        code = EXIT_OK if result.converged else EXIT_NOT_CONVERGED
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to an exit code with a clear message
        _fail(exc, verbose)
    raise typer.Exit(code)


@app.command("fetch", context_settings={"ignore_unknown_options": True})
def fetch_cmd(
    ra: str = typer.Argument(..., help="Target RA (degrees or hh:mm:ss)."),
    dec: str = typer.Argument(..., help="Target Dec (degrees or dd:mm:ss)."),
    survey: Optional[List[str]] = typer.Option(None, "--survey", "-s", help="Survey adapter (repeat or comma-separate; default ztf)."),
    start: Optional[float] = typer.Option(None, help="Earliest MJD of science epochs (references are always kept)."),
    end: Optional[float] = typer.Option(None, help="Latest MJD of science epochs."),
    bands: Optional[str] = typer.Option(None, help="Comma-separated bands (g,r or full names)."),
    size: Optional[int] = typer.Option(None, help="Cutout side in pixels (default: the survey's)."),
    output: Path = typer.Option(Path("epochs"), "-o", "--output", help="Directory for the epoch files."),
    refresh: bool = typer.Option(False, help="Ignore the cache: query and download everything again."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Local directory for adapters that read files."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging and tracebacks."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors."),
) -> None:
    """Download the epochs covering RA DEC and write them as epoch files (no fit); a table of the
    epochs that failed goes next to them (fetch_failures.ecsv).

    Example: transcene fetch 0.81429 16.14568 --survey ztf -o epochs/ && transcene fit epochs/ --ra 0.81429 --dec 16.14568
    """
    _setup(verbose, quiet)
    code = EXIT_ERROR
    try:
        from .geometry import parse_coord
        from .surveys import fetch_epochs

        surveys, band_list = _survey_options(survey, bands, start, end, size, directory)
        coord = parse_coord(ra, dec)
        with _FetchDisplay(quiet) as display:
            report = fetch_epochs(coord, surveys=surveys, bands=band_list, start=start, end=end, size_pix=size,
                                  refresh=refresh, local_dir=directory, out_dir=output, progress=display)
        if report.failures:
            from .result import write_table

            write_table(report.failure_table(), output / "fetch_failures.ecsv")
        if not quiet:
            err.print(f"fetch: {report.summary()}")
            err.print(f"  {len(report.paths)} epoch files in {output}/")
        _print_failures(report, quiet)
        code = EXIT_OK if report.epochs else EXIT_BAD_INPUT
        if not report.epochs:
            err.print("[red]error:[/red] no epoch could be fetched")
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001
        _fail(exc, verbose)
    raise typer.Exit(code)


@app.command("surveys")
def surveys_cmd(
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Also print each survey's notes."),
) -> None:
    """List the survey adapters: bands, pixel scale, credentials and the URL they would use.

    Example: TRANSCENE_ZTF_URL=http://localhost:8000 transcene surveys
    """
    _setup(False, True)
    try:
        from rich.table import Table as RichTable

        from .surveys import load_descriptors
        from .surveys.config import load_config
        from .surveys.descriptor import env_name

        config = load_config()
        table = RichTable(title="transcene survey adapters")
        for col in ("name", "bands", "pixel", "credentials", "URL"):
            table.add_column(col, overflow="fold")
        descs = load_descriptors()
        for name, d in sorted(descs.items()):
            table.add_row(name, " ".join(d.bands), f'{d.pixel_scale_arcsec:g}"', d.needs_credentials,
                          d.url(config) or "(local files)")
        out = Console()
        out.print(table)
        out.print("Override a URL with TRANSCENE_<NAME>_URL (e.g. " + env_name("ztf", "url") + ") or \\[surveys.<name>] url "
                  "in the config file; credentials: TRANSCENE_<NAME>_TOKEN / _USER / _PASSWORD. More: transcene surveys -v")
        for name, d in sorted(descs.items()):
            if verbose:
                out.print(f"\n[bold]{name}[/bold]: {d.title} ({d.path})\n  default cutout {d.default_size_pix} px; "
                          f"zero point: {d.zero_point}\n  time: {d.time}\n  astrometric precision: "
                          f"{d.astrometric_precision_arcsec} arcsec; credentials: {', '.join(d.credentials) or 'none'}\n"
                          f"{d.notes.strip()}")
    except Exception as exc:  # noqa: BLE001
        _fail(exc, False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
