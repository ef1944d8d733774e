"""The ``transcene`` command line. Only this module decides how progress and errors look."""

from __future__ import annotations

import logging
import sys
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


def _setup(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("jax", "absl", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def show(message, category, filename, lineno, file=None, line=None):
        err.print(f"[yellow]warning:[/yellow] {escape(str(message))}")

    warnings.showwarning = show


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
    lc = result.lightcurve()
    n_ref = int(sum(lc["is_reference"]))
    if not quiet:
        err.print(
            f"fit [bold]{result.status}[/bold] in {result.n_iter} iterations ({result.elapsed:.1f} s, "
            f"errors: {result.method}): "
            f"{len(lc)} epochs ({n_ref} transient-free), bands {', '.join(result.dataset.bands)}"
        )
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
    return EXIT_OK if result.converged else EXIT_NOT_CONVERGED


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
                               "linear (geometry fixed at the MAP) or map (conditional, quick look)."),
    shift_prior: float = typer.Option(0.1, help="Prior width of each epoch's astrometric shift, arcsec (0: no shifts)."),
    max_iter: int = typer.Option(50, help="Gauss-Newton iterations before the fit is declared not converged."),
    student_t: Optional[float] = typer.Option(None, help="Student-t pixel likelihood with this many degrees of freedom "
                                              "(e.g. 5) for cosmic rays and bad columns the masks missed; "
                                              "default Gaussian. Errors grow by 3 % at 5."),
    null_test: bool = typer.Option(False, help="Also test the transient-free epochs for transient light (refits "
                                   "their fluxes; about the covariance's cost again)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging and tracebacks."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors."),
) -> None:
    """Fit a scene to epoch files and write the forced-photometry light curve.

    Example: transcene fit epochs/*.fits --zero-before 60010 -o lc.ecsv --scene-out scene --plot lc.png
    """
    _setup(verbose, quiet)
    try:
        from .fit import METHODS

        if host not in ("pixel", "sersic"):
            raise ValueError(f"--host must be 'pixel' or 'sersic', got {host!r}")
        if method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
        if student_t is not None and not student_t > 0:
            raise ValueError(f"--student-t must be a positive number of degrees of freedom, got {student_t}")
        if shift_prior < 0 or max_iter < 1:
            raise ValueError(f"need --shift-prior >= 0 (got {shift_prior}) and --max-iter >= 1 (got {max_iter})")
        target = None
        if (ra is None) != (dec is None):
            raise ValueError("give both --ra and --dec, or neither")
        if ra is not None:
            from .geometry import parse_coord

            target = parse_coord(ra, dec)
        code = _run_fit(epoch_files, target, zero_before, host, output, scene_out, plot, fit_radius, verbose, quiet,
                        method=method, shift_prior=shift_prior, max_iter=max_iter, null_test=null_test, student_t=student_t)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
