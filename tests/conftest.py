"""Shared fixtures: one small fitted three-band scene, reused by the plot and output tests."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from astropy.table import Table

import transcene  # noqa: F401  (enables float64)

# the CLI caches compiled programs on disk (transcene.compile_cache); tests run it in-process and
# must not write to the user's cache (the run's own cache, under its tmp directory, is set below)
os.environ["TRANSCENE_COMPILE_CACHE"] = "0"


@pytest.fixture(scope="session", autouse=True)
def _shared_compile_cache(tmp_path_factory):
    """One persistent compilation cache for this test run, under its temporary directory and
    shared by the xdist workers (the parent of a worker's basetemp is common to all of them):
    many tests compile the same fitting programs (same shapes, new Python closures), and a
    program compiled once is loaded by the other worker and by later modules. Compiled programs
    are keyed by their HLO and compiler options, so results are unchanged; only compile time is
    saved (measured on 2 cores: the default run 7m36s -> 7m11s)."""
    import jax

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = root / "jax-compile-cache"
    cache.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield cache


@dataclasses.dataclass(frozen=True)
class Fitted:
    result: "transcene.FitResult"
    truth: Table
    result_dir: Path  # lightcurve.ecsv + scene/ as written by transcene fit
    warnings: tuple[str, ...]


@pytest.fixture(scope="session")
def fitted_three_bands(tmp_path_factory) -> Fitted:
    """g, r and i on a Sersic galaxy: 6 science epochs, 2 references (one in g, one in r, none
    in i, so the i band's baseline is undefined). About a minute on 2 cores."""
    from transcene.api import fit_files, write_outputs
    from transcene.errors import BaselineWarning
    from transcene.geometry import parse_coord
    from transcene.simulate import SimulationConfig, write_simulation

    sim = tmp_path_factory.mktemp("sim3")
    cfg = SimulationConfig(n_epochs=6, n_reference=2, bands=("g", "r", "i"), size=20, psf_size=15,
                           seeing_fwhm=(1.6, 2.6), seed=3, transient_peak_mag=19.0)
    write_simulation(sim, cfg)
    truth = Table.read(sim / "truth.ecsv")
    target = parse_coord(str(truth.meta["transient_ra"]), str(truth.meta["transient_dec"]))
    with pytest.warns(BaselineWarning) as rec:
        result = fit_files(sorted(sim.glob("epoch_*.fits")), target=target)
    out = tmp_path_factory.mktemp("result3")
    write_outputs(result, lightcurve=out / "lightcurve.ecsv", scene_dir=out / "scene")
    return Fitted(result, truth, out, tuple(str(w.message) for w in rec))


@pytest.fixture
def archive_server():
    """A started :class:`tests.archive_server.ArchiveServer` on loopback (stopped afterwards)."""
    from archive_server import ArchiveServer

    with ArchiveServer() as server:
        yield server


@pytest.fixture
def survey_env(tmp_path, monkeypatch):
    """An isolated environment for adapter tests: the cache under tmp_path, no user config file,
    and no TRANSCENE_* URL or credential variables from the caller's shell."""
    import os

    for var in list(os.environ):
        if var.startswith("TRANSCENE_") and var != "TRANSCENE_SURVEYS_DIR":
            monkeypatch.delenv(var)
    monkeypatch.setenv("TRANSCENE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRANSCENE_CONFIG", str(tmp_path / "no-config.toml"))
    return tmp_path


def pytest_collection_modifyitems(config, items):
    """Tests marked remote_data talk to the real archives: skipped unless TRANSCENE_REMOTE_TESTS=1
    (CI and our machines reach no survey)."""
    import os

    if os.environ.get("TRANSCENE_REMOTE_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="talks to a real survey archive; set TRANSCENE_REMOTE_TESTS=1 to run")
    for item in items:
        if "remote_data" in item.keywords:
            item.add_marker(skip)
