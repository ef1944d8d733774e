"""Shared fixtures: one small fitted three-band scene, reused by the plot and output tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from astropy.table import Table

import transcene  # noqa: F401  (enables float64)


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
