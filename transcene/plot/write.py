"""Writing every plot of a fit next to each other (``--plot`` and ``transcene plot``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from astropy.table import Table

from ._source import Source, has_scene, lightcurve_of
from .diagnostics import plot_diagnostics
from .lightcurve import plot_lightcurve
from .mosaic import plot_epoch_mosaic
from .scene import plot_scene

__all__ = ["write_plots"]

log = logging.getLogger(__name__)


def write_plots(
    source: Source,
    path: str | Path,
    *,
    exposure_ids: Sequence[str] | None = None,
    reference: Table | None = None,
    reference_label: str = "external",
    magnitudes: bool = False,
    dpi: int = 120,
) -> dict[str, Path]:
    """Write the light curve to ``path`` and, next to it, ``<stem>_diagnostics``, and, when the
    scene is available (a FitResult, or a result directory with ``--scene-out`` products),
    ``<stem>_epochs`` (mosaic of ``exposure_ids``, default a selection) and ``<stem>_scene``;
    all in the format of ``path``'s suffix (PNG when it has none)."""
    path = Path(path)
    images = not isinstance(source, (str, Path)) or has_scene(Path(source))
    if not images:
        log.warning("%s: no scene products (host_<band>.fits); only the light-curve and diagnostics plots "
                    "are written (fit with --scene-out for the rest)", source)
    suffix = path.suffix or ".png"
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"lightcurve_plot": path}
    lc = lightcurve_of(source)  # read (or built) once for the two plots drawn from the table
    plot_lightcurve(lc, reference=reference, reference_label=reference_label,
                    magnitudes=magnitudes).savefig(path, dpi=dpi, bbox_inches="tight")
    figs = {"diagnostics_plot": lambda: plot_diagnostics(lc)}
    if images:
        figs["epochs_plot"] = lambda: plot_epoch_mosaic(source, exposure_ids)
        figs["scene_plot"] = lambda: plot_scene(source)
    for key, make in figs.items():
        p = path.with_name(f"{path.stem}_{key.split('_')[0]}{suffix}")
        make().savefig(p, dpi=dpi, bbox_inches="tight")
        out[key] = p
    log.info("plots written next to %s", path)
    return out
