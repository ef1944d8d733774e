"""Command-line behaviour: outputs, exit codes and error messages (no tracebacks)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from typer.testing import CliRunner

import transcene  # noqa: F401  (enables float64)
from transcene.cli import EXIT_BAD_INPUT, app
from transcene.simulate import SimulationConfig, write_simulation

runner = CliRunner()


@pytest.fixture(scope="module")
def small_sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    cfg = SimulationConfig(n_epochs=5, n_reference=2, bands=("r",), size=20, psf_size=15,
                           seeing_fwhm=(2.2, 3.0), seed=5, transient_peak_mag=18.5)
    write_simulation(out, cfg)
    return out


@pytest.fixture(scope="module")
def fitted(small_sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    truth = Table.read(small_sim / "truth.ecsv")
    res = runner.invoke(app, [
        "fit", *[str(p) for p in sorted(small_sim.glob("epoch_*.fits"))],
        "--ra", str(truth.meta["transient_ra"]), "--dec", str(truth.meta["transient_dec"]),
        "-o", str(out / "lc.ecsv"), "--scene-out", str(out / "scene"), "--plot", str(out / "lc.png"), "-q",
    ])
    return out, truth, res


def test_fit_writes_outputs(fitted):
    out, truth, res = fitted
    assert res.exit_code in (0, 1), res.output
    lc = Table.read(out / "lc.ecsv")
    assert len(lc) == len(truth)
    for col in ("mjd", "band", "survey", "exposure_id", "flux", "flux_err", "flux_lo", "flux_hi", "mag",
                "mag_err", "mag_lim", "snr", "chi2_dof", "flags"):
        assert col in lc.colnames
    assert str(lc["flux"].unit) == "nJy"
    assert lc.meta["method"] == "laplace"
    assert set(lc["exposure_id"]) == set(truth["exposure_id"])
    # reference rows are flagged and pinned to zero
    ref = np.asarray(lc["is_reference"])
    assert np.all(np.asarray(lc["flags"])[ref] & 1)
    assert np.all(np.asarray(lc["flux"])[ref] == 0)
    # every measured flux is within 5 sigma of the truth (loose: 5 epochs only)
    tr = {str(e): float(f) for e, f in zip(truth["exposure_id"], truth["flux_true"])}
    pulls = [(float(f) - tr[str(e)]) / float(s) for e, f, s, r in
             zip(lc["exposure_id"], lc["flux"], lc["flux_err"], ref) if not r]
    assert np.all(np.abs(pulls) < 5), pulls
    assert (out / "lc_covariance.ecsv").exists()
    assert (out / "lc.png").stat().st_size > 1000


def test_fit_method_linear_writes_every_output(small_sim, fitted, tmp_path):
    """--method linear: same fluxes as the default (laplace), errors not larger, no position
    error, and every output (scene table, plots with a fixed position) still written."""
    out0, truth, _ = fitted
    res = runner.invoke(app, [
        "fit", str(small_sim), "--ra", str(truth.meta["transient_ra"]), "--dec", str(truth.meta["transient_dec"]),
        "--method", "linear", "--null-test", "-o", str(tmp_path / "lc.ecsv"), "--scene-out", str(tmp_path / "scene"),
        "--plot", str(tmp_path / "lc.png"), "-q",
    ])
    assert res.exit_code in (0, 1), res.output
    lin = Table.read(tmp_path / "lc.ecsv")
    lap = Table.read(out0 / "lc.ecsv")
    assert lin.meta["method"] == "linear"
    assert lin.meta["reference_null_test"]["r"]["dof"] == 1  # two references, one anchor
    np.testing.assert_allclose(np.asarray(lin["flux"]), np.asarray(lap["flux"]), rtol=1e-6, atol=1e-6)
    sci = ~np.asarray(lin["is_reference"])
    assert np.all(np.asarray(lin["flux_err"])[sci] <= np.asarray(lap["flux_err"])[sci] * (1 + 1e-4))
    assert np.all(np.isnan(lin.meta["transient_offset_err_arcsec"]))
    assert (tmp_path / "lc_scene.png").stat().st_size > 1000


def test_fit_rejects_bad_student_t(small_sim):
    res = runner.invoke(app, ["fit", str(small_sim), "--student-t", "-1", "-q"])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "--student-t must be a positive number of degrees of freedom, got -1.0" in res.output


def test_fit_rejects_bad_position_prior(small_sim):
    res = runner.invoke(app, ["fit", str(small_sim), "--position-prior", "0", "-q"])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "--position-prior must be a width in arcsec > 0, got 0.0" in res.output


def test_fit_rejects_bad_position_mode(small_sim):
    res = runner.invoke(app, ["fit", str(small_sim), "--position", "forced", "-q"])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "--position must be one of auto, free, fixed, got 'forced'" in res.output


def test_position_prior_holds_the_transient_at_the_coordinate(small_sim, fitted, tmp_path):
    """A prior of 1 mas pins the fitted position to RA/Dec; the default (0.5") lets it move."""
    out, truth, _ = fitted
    res = runner.invoke(app, [
        "fit", *[str(p) for p in sorted(small_sim.glob("epoch_*.fits"))],
        "--ra", str(truth.meta["transient_ra"] + 0.3 / 3600), "--dec", str(truth.meta["transient_dec"]),
        "--position-prior", "0.001", "--position", "free", "-o", str(tmp_path / "lc.ecsv"), "-q",
    ])
    assert res.exit_code == 0, res.output
    pinned = Table.read(tmp_path / "lc.ecsv").meta["transient_offset_arcsec"]
    assert max(abs(v) for v in pinned) < 0.002, pinned
    free = Table.read(out / "lc.ecsv").meta
    assert free["position"] == "fitted"  # detected: the default fit located it, off its coordinate
    assert max(abs(v) for v in free["transient_offset_arcsec"]) > 0.002, free["transient_offset_arcsec"]


def test_fit_rejects_unknown_method(small_sim):
    res = runner.invoke(app, ["fit", str(small_sim), "--method", "mcmc", "-q"])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "--method must be one of linear, map, laplace, nuts, got 'mcmc'" in res.output
    # nuts options are checked before any work too
    res = runner.invoke(app, ["fit", str(small_sim), "--method", "nuts", "--nuts-chains", "0", "-q"])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "NutsOptions.num_chains must be a positive integer" in res.output


def test_scene_outputs_have_wcs(fitted):
    out, truth, res = fitted
    with fits.open(out / "scene" / "host_r.fits") as h:
        assert h[0].header["CTYPE1"] == "RA---TAN"
        assert h[0].data.ndim == 2
    files = sorted((out / "scene" / "epochs").glob("*.fits"))
    assert len(files) == len(truth)
    with fits.open(files[0]) as h:
        assert [x.name for x in h[1:]] == ["DATA", "MODEL", "HOST", "TRANSIENT", "RESID"]
        assert h["DATA"].header["CTYPE1"].startswith("RA---")
    scene = Table.read(out / "scene" / "scene.ecsv")
    assert "transient_ra" in list(scene["parameter"])


def test_bad_file_exit_code_and_message(tmp_path):
    bad = tmp_path / "broken.fits"
    fits.HDUList([fits.PrimaryHDU()]).writeto(bad)
    res = runner.invoke(app, ["fit", str(bad), "-q"])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "broken.fits" in res.output
    assert "SCI" in res.output
    assert "Traceback" not in res.output


@pytest.mark.filterwarnings("ignore::transcene.errors.EpochSkippedWarning")  # one per epoch, expected
def test_target_outside_every_epoch(small_sim):
    files = [str(p) for p in sorted(small_sim.glob("epoch_*.fits"))]
    res = runner.invoke(app, ["fit", *files, "--ra", "10.0", "--dec", "-45.0", "-q"])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "footprint" in res.output
    assert "Traceback" not in res.output


def test_only_ra_is_an_error(small_sim):
    res = runner.invoke(app, ["fit", str(small_sim), "--ra", "10.0", "-q"])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "--dec" in res.output


def test_sexagesimal_coordinates():
    from transcene.geometry import parse_coord

    c = parse_coord("00:03:15.43", "+16:08:44.5")
    assert abs(c.ra.deg - 0.8143) < 1e-3 and abs(c.dec.deg - 16.1457) < 1e-3
    with pytest.raises(ValueError, match="RA"):
        parse_coord("nonsense", "also")


@pytest.mark.parametrize("command", [[], ["fit"], ["simulate"], ["demo"], ["plot"]])
def test_every_command_has_help_with_an_example(command):
    res = runner.invoke(app, [*command, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example: transcene" in res.output


# -- transcene lightcurve / fetch / surveys with the local-directory adapter -------------------

@pytest.fixture
def sim_dir_with_broken_file(small_sim, tmp_path, monkeypatch):
    import shutil

    for var in ("TRANSCENE_FITS_URL", "TRANSCENE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TRANSCENE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRANSCENE_CONFIG", str(tmp_path / "none.toml"))
    d = tmp_path / "epochs"
    shutil.copytree(small_sim, d)
    (d / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)  # truncated header
    return d


def test_lightcurve_reproduces_fit_and_flags_the_unreadable_epoch(fitted, sim_dir_with_broken_file, tmp_path):
    out, truth, _ = fitted
    res = runner.invoke(app, ["lightcurve", str(truth.meta["transient_ra"]), str(truth.meta["transient_dec"]),
                              "--survey", "fits", "--dir", str(sim_dir_with_broken_file), "-o", str(tmp_path / "lc.ecsv"),
                              "--shift-prior", "0.1"])
    assert res.exit_code == 0, res.output
    assert "1 failed" in res.output and "broken" in res.output and "FETCH_FAILED" in res.output
    lc, ref = Table.read(tmp_path / "lc.ecsv"), Table.read(out / "lc.ecsv")
    bad = lc[lc["exposure_id"] == "broken"]
    assert len(bad) == 1 and bad["flags"][0] == 64 and np.ma.is_masked(bad["flux"][0])
    assert any(s.startswith("fits broken:") and "FITS" in s for s in lc.meta["fetch_failures"])
    good = lc[lc["flags"] != 64]
    good.sort("exposure_id")
    ref.sort("exposure_id")
    assert list(good["exposure_id"]) == list(ref["exposure_id"])
    # the same epochs through the adapter give the same fit as `transcene fit` on the files
    np.testing.assert_allclose(good["flux"], ref["flux"], rtol=1e-6, atol=1e-6 * np.max(ref["flux_err"]))
    np.testing.assert_allclose(good["flux_err"], ref["flux_err"], rtol=1e-6)


def test_fetch_writes_epoch_files_then_serves_them_from_the_cache(sim_dir_with_broken_file, small_sim, tmp_path):
    truth = Table.read(small_sim / "truth.ecsv")
    args = ["fetch", str(truth.meta["transient_ra"]), str(truth.meta["transient_dec"]), "--survey", "fits",
            "--dir", str(sim_dir_with_broken_file), "--size", "11"]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "7 downloaded, 0 from the cache, 1 failed" in first.output
    files = sorted((tmp_path / "a").glob("*.fits"))
    assert len(files) == 7
    from transcene.io import read_epoch

    ep = read_epoch(files[0])
    assert ep.shape == (11, 11)  # cut to --size around the target
    x, y = ep.wcs.world_to_pixel_values(float(truth.meta["transient_ra"]), float(truth.meta["transient_dec"]))
    assert abs(x - 5) <= 0.5 and abs(y - 5) <= 0.5
    fails = Table.read(tmp_path / "a" / "fetch_failures.ecsv")
    assert list(fails["exposure_id"]) == ["broken"] and fails["error"][0] == "EpochFileError"
    second = runner.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert "0 downloaded, 7 from the cache, 1 failed" in second.output
    third = runner.invoke(app, [*args, "-o", str(tmp_path / "c"), "--refresh", "--bands", "g"])
    assert third.exit_code == EXIT_BAD_INPUT and "0 epochs found" in third.output  # the simulation is r only


def test_negative_declination_needs_no_quoting(sim_dir_with_broken_file, tmp_path):
    res = runner.invoke(app, ["fetch", "150.1", "-2.2", "--survey", "fits", "--dir", str(sim_dir_with_broken_file),
                              "-o", str(tmp_path / "x")])
    assert "No such option" not in res.output and res.exit_code == EXIT_BAD_INPUT
    # only the unreadable file is "found": the simulated epochs, at Dec +2.2, do not contain Dec -2.2
    assert "1 epochs found" in res.output and "no epoch could be fetched" in res.output


def test_surveys_lists_every_descriptor_with_its_override():
    from transcene.surveys import load_descriptors

    res = runner.invoke(app, ["surveys", "-v"], env={"TRANSCENE_PS1_URL": "http://127.0.0.1:1"})
    assert res.exit_code == 0, res.output
    for name in load_descriptors():
        assert name in res.output
    assert "http://127.0.0.1:1" in res.output and "TRANSCENE_ZTF_URL" in res.output


def test_unknown_survey_and_bad_options_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCENE_CACHE_DIR", str(tmp_path))
    res = runner.invoke(app, ["lightcurve", "150", "2", "--survey", "nonesuch", "-o", str(tmp_path / "lc.ecsv")])
    assert res.exit_code == EXIT_BAD_INPUT and "unknown survey 'nonesuch'" in res.output
    res = runner.invoke(app, ["fetch", "150", "2", "--survey", "fits", "--start", "60000", "--end", "59000"])
    assert res.exit_code == EXIT_BAD_INPUT and "--end (59000.0) is before --start" in res.output
    res = runner.invoke(app, ["fetch", "150", "2", "--survey", "fits", "--dir", str(tmp_path / "nope")])
    assert res.exit_code == EXIT_BAD_INPUT and "no such directory" in res.output


def test_fetch_progress_on_a_terminal_counts_and_stops_before_the_fit(monkeypatch):
    import io

    from rich.console import Console

    from transcene import cli
    from transcene.surveys import FetchEvent

    buf = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=buf, force_terminal=True, width=120))
    with cli._FetchDisplay(quiet=False) as display:
        assert display.enabled
        display(FetchEvent("query", "ztf"))
        display(FetchEvent("found", "ztf", 0, 3, message="3 epochs"))
        for i, status in enumerate(["downloaded", "cached", "failed"]):
            display(FetchEvent("epoch", "ztf", i + 1, 3, status=status, message=f"e{i}"))
        display(FetchEvent("done", "", 3, 3))
        assert display._progress is None  # stopped: the fit's lines print below it
    text = buf.getvalue()
    assert "ztf: 3 epochs" in text and "1 downloaded, 1 cached" in text and "1 failed" in text
    monkeypatch.setattr(cli, "err", Console(file=io.StringIO(), force_terminal=False))
    assert not cli._FetchDisplay(quiet=False).enabled and not cli._FetchDisplay(quiet=True).enabled


def test_log_lines_reach_each_invocations_stderr(sim_dir_with_broken_file, small_sim, tmp_path):
    """Logs go through the console (never torn by the progress bars) and follow the current stderr:
    the second command in one process still shows its log lines."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []  # as in a fresh process (pytest installs its own capture handlers)
    try:
        truth = Table.read(small_sim / "truth.ecsv")
        args = ["fetch", str(truth.meta["transient_ra"]), str(truth.meta["transient_dec"]), "--survey", "fits",
                "--dir", str(sim_dir_with_broken_file)]
        for i in range(2):
            res = runner.invoke(app, [*args, "-o", str(tmp_path / f"o{i}")])
            assert "WARNING transcene.surveys.fetch: fits broken:" in res.output, res.output
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])


def test_compile_cache_writes_compiled_programs_and_can_be_turned_off(tmp_path):
    """In a fresh process (the setting is process-wide): programs land in the directory; with
    TRANSCENE_COMPILE_CACHE=0 nothing is enabled."""
    import os
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp, sys\n"
        "from transcene.compile_cache import enable_compile_cache\n"
        "d = enable_compile_cache(sys.argv[1], min_compile_s=0)\n"
        "print(d)\n"
        "jax.block_until_ready(jax.jit(lambda x: jnp.fft.rfft(x) * 2)(jnp.ones(64)))\n"
    )
    env = dict(os.environ, TRANSCENE_COMPILE_CACHE="1")
    on = subprocess.run([sys.executable, "-c", code, str(tmp_path / "on")], env=env, capture_output=True, text=True)
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip() == str(tmp_path / "on")
    assert any((tmp_path / "on").iterdir())
    env["TRANSCENE_COMPILE_CACHE"] = "0"
    off = subprocess.run([sys.executable, "-c", code, str(tmp_path / "off")], env=env, capture_output=True, text=True)
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "None"
    assert not (tmp_path / "off").exists()
