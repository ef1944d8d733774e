"""Plots (matplotlib). Each function returns a Figure and never calls ``show()``.

Every plot of a fit takes a :class:`~transcene.FitResult` or a result directory (the
light-curve table plus the ``--scene-out`` products), so the same pictures come from a fresh
fit in a notebook and from ``transcene plot RESULT_DIR`` later.
"""

from .diagnostics import plot_diagnostics
from .lightcurve import plot_lightcurve
from .mosaic import default_mosaic_epochs, plot_epoch_mosaic
from .posterior import plot_corner, plot_rank, plot_trace
from .scene import plot_scene
from .write import write_plots

__all__ = [
    "plot_lightcurve", "plot_epoch_mosaic", "default_mosaic_epochs", "plot_scene", "plot_diagnostics",
    "plot_trace", "plot_rank", "plot_corner", "write_plots",
]
