"""Plots: each renders from a FitResult and from a result directory, shows what it claims
(positions, limits, flags, stretch), and never needs a display."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.table import Table
from matplotlib.collections import PolyCollection
from matplotlib.patches import Ellipse
from typer.testing import CliRunner

from transcene.cli import EXIT_BAD_INPUT, app
from transcene.errors import TransceneError
from transcene.plot import (
    default_mosaic_epochs, plot_corner, plot_diagnostics, plot_epoch_mosaic, plot_lightcurve, plot_rank, plot_scene,
    plot_trace, write_plots,
)
from transcene.plot._source import epoch_panels, host_panel
from transcene.result import Flag


def _lc(ref_mjd: list[float], sci_mjd: list[float]) -> Table:
    n_ref, n_sci = len(ref_mjd), len(sci_mjd)
    t = Table()
    t["mjd"] = np.array(ref_mjd + sci_mjd)
    t["band"] = ["r"] * (n_ref + n_sci)
    t["flux"] = np.r_[np.zeros(n_ref), np.linspace(1e4, 2e4, n_sci)]
    t["flux_err"] = np.full(n_ref + n_sci, 100.0)
    t["flags"] = np.r_[np.full(n_ref, int(Flag.REFERENCE)), np.zeros(n_sci, int)]
    t.meta.update(status="converged", method="linear")
    return t


def test_far_references_are_left_off_the_axis_and_said_so():
    fig = plot_lightcurve(_lc([58300.0, 58310.0], [59400.0 + k for k in range(30)]))
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert 59390.0 < lo < 59400.0 and 59429.0 < hi < 59440.0
    assert any("2 reference epoch(s) off axis" in t.get_text() for t in ax.texts)


def test_nearby_references_stay_on_the_axis():
    fig = plot_lightcurve(_lc([59390.0], [59400.0 + k for k in range(30)]))
    lo, _ = fig.axes[0].get_xlim()
    assert lo < 59390.0
    assert not any("off axis" in t.get_text() for t in fig.axes[0].texts)


def _markers(ax, marker):
    return [ln for ln in ax.lines if ln.get_marker() == marker and len(ln.get_xdata())]


def test_low_snr_epochs_are_drawn_as_3_sigma_limits_and_flagged_ones_open():
    t = _lc([59390.0], [59400.0 + k for k in range(6)])
    t["flux"][1] = 50.0  # snr 0.5
    t["flags"][1] = int(Flag.LOW_SNR)
    t["flags"][2] = int(Flag.HIGH_CHI2)
    ax = plot_lightcurve(t).axes[0]
    (lim,) = _markers(ax, "v")
    assert np.allclose(lim.get_xdata(), [59400.0]) and np.allclose(lim.get_ydata(), [300.0])
    open_pts = [ln for ln in _markers(ax, "o") if ln.get_markerfacecolor() == "white"]
    assert len(open_pts) == 1 and np.allclose(open_pts[0].get_xdata(), [59401.0])
    assert any(isinstance(c, PolyCollection) for c in ax.collections)  # the 16-84 % band
    # without limits the same epoch is a measurement
    ax = plot_lightcurve(t, limits=False).axes[0]
    assert not _markers(ax, "v")


def test_one_unconstrained_limit_does_not_flatten_the_light_curve():
    t = _lc([59390.0], [59400.0 + k for k in range(6)])
    t["flux_err"][3] = 1e6
    t["flux"][3] = 0.0
    t["flags"][3] = int(Flag.LOW_SNR)
    ax = plot_lightcurve(t).axes[0]
    assert ax.get_ylim()[1] < 3e4
    assert any("off the axis" in x.get_text() for x in ax.texts)


def test_magnitude_view_is_inverted_and_matches_the_ab_scale():
    t = _lc([], [59400.0, 59401.0])
    t["flux"] = [3631e9 * 10 ** (-0.4 * 20.0), 3631e9 * 10 ** (-0.4 * 21.0)]  # 20 and 21 AB mag
    t["flux_err"] = t["flux"] / 50
    ax = plot_lightcurve(t, magnitudes=True).axes[0]
    lo, hi = ax.get_ylim()
    assert lo > hi  # bright at the top
    (pts,) = _markers(ax, "o")
    assert np.allclose(pts.get_ydata(), [20.0, 21.0], atol=1e-3)


def test_overlay_residual_panel_in_sigma_and_ratio():
    t = _lc([], [59400.0, 59401.0])
    ext = Table({"mjd": [59400.0, 59401.0], "band": ["r", "r"], "flux": [9000.0, 20000.0], "flux_err": [100.0, 100.0]})
    fig = plot_lightcurve(t, reference=ext, reference_label="ZTF")
    assert len(fig.axes) == 2
    ys = np.concatenate([ln.get_ydata() for ln in _markers(fig.axes[1], "o")])
    assert np.allclose(np.sort(ys), np.sort([(1e4 - 9000) / np.hypot(100, 100), 0.0]))
    fig = plot_lightcurve(t, reference=ext, residual="ratio")
    assert fig.axes[1].get_ylabel().startswith("ratio")


def test_per_band_baseline(fitted_three_bands):
    """A band without a transient-free epoch is flagged, with a warning naming it."""
    lc = fitted_three_bands.result.lightcurve()
    undefined = (np.asarray(lc["flags"]) & int(Flag.BASELINE_UNDEFINED)) > 0
    assert np.array_equal(undefined, np.asarray(lc["band"]) == "i")
    assert any("['i']" in w for w in fitted_three_bands.warnings)


def test_epoch_panels_from_result_and_from_directory_agree(fitted_three_bands):
    f = fitted_three_bands
    ids = default_mosaic_epochs(f.result)
    assert 3 <= len(ids) <= 5 and len(set(ids)) == len(ids)
    mem = epoch_panels(f.result, ids)
    disk = epoch_panels(f.result_dir, ids)
    for a, b in zip(mem, disk):
        assert a.exposure_id == b.exposure_id and a.band == b.band
        assert np.allclose(a.transient_xy, b.transient_xy)
        assert np.isclose(a.sky, b.sky)
        for name in ("DATA", "MODEL", "HOST", "TRANSIENT"):
            scale = np.nanmax(np.abs(a.images[name])) + 1e-30
            assert np.allclose(a.images[name], b.images[name], atol=1e-6 * scale, equal_nan=True), name


def test_transient_marker_sits_on_the_rendered_transient(fitted_three_bands):
    f = fitted_three_bands
    lc = f.result.lightcurve()
    brightest = str(lc["exposure_id"][int(np.nanargmax(np.ma.filled(lc["snr"], np.nan)))])
    (p,) = epoch_panels(f.result, [brightest])
    y, x = np.unravel_index(np.argmax(p.images["TRANSIENT"]), p.images["TRANSIENT"].shape)
    assert np.hypot(x - p.transient_xy[0], y - p.transient_xy[1]) < 1.0
    fig = plot_epoch_mosaic(f.result, [brightest])
    assert [ax.get_title() for ax in fig.axes[:5]] == ["data - sky", "model - sky", "host", "transient", "residual [sigma]"]
    # the mosaic shows the fitted region only; its marker is still on the transient's peak
    shown = fig.axes[3].get_images()[0].get_array()
    assert shown.shape[0] <= p.images["TRANSIENT"].shape[0] and shown.shape[1] <= p.images["TRANSIENT"].shape[1]
    assert np.all(np.isfinite(fig.axes[0].get_images()[0].get_array()[[0, -1], :].filled(np.nan)).any(axis=1))
    ys, xs = np.unravel_index(np.argmax(shown), shown.shape)
    circles = [ln for ln in fig.axes[3].lines if ln.get_marker() == "o"]
    assert np.hypot(circles[0].get_xdata()[0] - xs, circles[0].get_ydata()[0] - ys) < 1.0
    with pytest.raises(ValueError, match="not in the light curve"):
        plot_epoch_mosaic(f.result, ["no-such-epoch"])


def test_scene_plot_orientation_ellipse_and_colour(fitted_three_bands):
    f = fitted_three_bands
    fig = plot_scene(f.result)
    image_axes = [ax for ax in fig.axes if ax.get_images() and ax.get_xlabel()]
    assert len(image_axes) == 4  # g, r, i and the colour composite
    assert [ax.get_title().split(",")[1].split()[0] for ax in image_axes[:3]] == ["g", "r", "i"]
    assert image_axes[3].get_images()[0].get_array().ndim == 3
    for ax in image_axes:
        lo, hi = ax.get_xlim()
        assert lo > hi  # East to the left
    hp = host_panel(f.result)
    (ell,) = [p for p in image_axes[0].patches if isinstance(p, Ellipse)]
    assert np.allclose(ell.center, hp.offset)
    major = 2 * np.sqrt(np.linalg.eigvalsh(hp.cov).max())
    mag = ell.width / major
    assert mag >= 1 and np.isclose(np.log10(mag), round(np.log10(mag)))
    # the same picture from the directory (covariance stored in the table's metadata)
    hd = host_panel(f.result_dir)
    assert hd.bands == hp.bands and np.allclose(hd.cov, hp.cov) and np.allclose(hd.extent, hp.extent)
    assert np.allclose(hd.images, hp.images, rtol=1e-5, atol=1e-6 * np.abs(hp.images).max())
    raw = plot_scene(f.result_dir, resolution=0, colour=False)
    assert sum(1 for ax in raw.axes if ax.get_images() and ax.get_xlabel()) == 3
    assert "model grid" in raw.axes[0].get_title()


def test_host_extent_is_east_left_in_arcsec(fitted_three_bands):
    hp = host_panel(fitted_three_bands.result)
    n = hp.images.shape[-1]
    left, right, bottom, top = hp.extent
    assert left > 0 > right and bottom < 0 < top
    assert np.isclose(left - right, n * hp.scale, rtol=1e-6) and np.isclose(top - bottom, n * hp.scale, rtol=1e-6)


def test_diagnostics_from_table(fitted_three_bands):
    lc = fitted_three_bands.result.lightcurve()
    fig = plot_diagnostics(lc)
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    assert labels == [("MJD", "residual chi2 / dof"), ("PSF FWHM [arcsec]", "residual chi2 / dof"),
                      ("MJD", "astrometric shift [mas]"), ("shift RA [mas]", "shift Dec [mas]")]
    n_pts = sum(len(ln.get_xdata()) for ln in fig.axes[0].lines if ln.get_marker() in ("o", "x"))
    assert n_pts == len(lc)
    with pytest.raises(ValueError, match="chi2_dof"):
        plot_diagnostics(lc[["mjd", "band"]])


def test_write_plots_and_cli(fitted_three_bands, tmp_path, caplog):
    d = fitted_three_bands.result_dir
    res = CliRunner().invoke(app, ["plot", str(d), "-o", str(tmp_path / "lc.png"), "-q"])
    assert res.exit_code == 0, res.output
    for name in ("lc.png", "lc_epochs.png", "lc_scene.png", "lc_diagnostics.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
    # a directory with the table only: the two table plots, and a warning about the rest
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "lightcurve.ecsv").write_bytes((d / "lightcurve.ecsv").read_bytes())
    with caplog.at_level(logging.WARNING):
        out = write_plots(tmp_path / "only", tmp_path / "only" / "lc.pdf")
    assert set(out) == {"lightcurve_plot", "diagnostics_plot"} and out["diagnostics_plot"].suffix == ".pdf"
    assert "no scene products" in caplog.text
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "nothing-here")])
    assert res.exit_code == EXIT_BAD_INPUT and "not a directory" in res.output
    with pytest.raises(TransceneError, match="lightcurve.ecsv"):
        write_plots(tmp_path, tmp_path / "x.png")


def _chains(rng, n_chains=4, n_draws=500, offset=0.0):
    return {"flux": rng.normal(size=(n_chains, n_draws)) + offset * np.arange(n_chains)[:, None],
            "x": rng.normal(size=(n_chains, n_draws))}


def test_posterior_plots_shapes_and_rank_histograms():
    rng = np.random.default_rng(0)
    s = _chains(rng)
    fig = plot_trace(s)
    assert len(fig.axes) == 4 and len(fig.axes[0].lines) == 4
    fig = plot_corner(s, truths={"flux": 0.0, "x": 0.0})
    assert sum(ax.get_visible() for ax in fig.axes) == 3
    # ranks: mixed chains spread evenly, a shifted chain piles up at the top
    def top_bin_fraction(samples):
        ax = plot_rank(samples, bins=10).axes[0]
        counts = [p.get_data()[0] for p in ax.patches]
        return max(c[-1] for c in counts) / samples["flux"].shape[1]

    assert abs(top_bin_fraction(s) - 0.1) < 0.05  # 10 bins: 10 % each, +- 2.7 % (binomial)
    # chains 3 sigma apart: the top chain holds the top quarter of all ranks, 2.5 of 10 bins
    assert abs(top_bin_fraction(_chains(rng, offset=3.0)) - 0.4) < 0.03
    with pytest.raises(ValueError, match="chains, draws"):
        plot_trace({"flux": np.zeros((2, 2, 2))})
