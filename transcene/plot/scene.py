"""The static scene: the fitted host per band (or a colour composite) and the transient position."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from ._source import Source, host_panel, lightcurve_of
from ._style import asinh_norm, label_asinh_colorbar, bands_blue_to_red

__all__ = ["plot_scene"]


def _ellipse(cov: np.ndarray, nsig: float = 1.0) -> tuple[float, float, float]:
    """Full width, full height (arcsec) and angle (deg, from +x) of the n-sigma ellipse."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, float))
    vals = np.clip(vals, 0, None)
    angle = float(np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1])))
    return 2 * nsig * float(np.sqrt(vals[1])), 2 * nsig * float(np.sqrt(vals[0])), angle


def plot_scene(
    source: Source,
    *,
    resolution: float | None = None,
    colour: bool | None = None,
    zoom: float | None = None,
) -> Figure:
    """The fitted host, one panel per band (nJy per model pixel, asinh stretch), plus a colour
    composite (the bluest three bands as B, G, R) when there are three or more bands.

    ``resolution`` (arcsec FWHM): the host is shown convolved with a Gaussian of this FWHM;
    default the sharpest epoch's PSF FWHM, i.e. the host as the best epoch sees it. A pixel
    host is a deconvolved image: its finest scales are constrained only by the sharpest epochs
    and look like noise at the model grid's resolution; ``resolution=0`` shows them anyway.

    Axes are offsets from the target in arcsec, East left, North up, limited to the fitted
    region (``zoom``: half-width in arcsec). The fitted transient is a cross with its 1-sigma
    position ellipse; an ellipse smaller than a model pixel is drawn magnified (the legend
    says by how much).
    """
    hp = host_panel(source)
    if resolution is None:
        lc = lightcurve_of(source)
        fw = np.asarray(lc["psf_fwhm"], float) if "psf_fwhm" in lc.colnames else np.zeros(1)
        resolution = float(np.nanmin(fw)) if np.isfinite(fw).any() else 0.0
    images = hp.images
    if resolution > 0:
        from scipy.ndimage import gaussian_filter

        sig = resolution / (2 * np.sqrt(2 * np.log(2))) / hp.scale
        images = np.stack([gaussian_filter(im, sig, mode="constant") for im in hp.images])
    order = [hp.bands.index(b) for b in bands_blue_to_red(hp.bands)]
    nb = len(hp.bands)
    colour = nb >= 3 if colour is None else colour
    if colour and nb < 3:
        raise ValueError(f"colour: a colour composite needs three bands, this scene has {list(hp.bands)}")
    npan = nb + (1 if colour else 0)
    fig = Figure(figsize=(3.6 * npan + 0.6, 3.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, npan, squeeze=False)[0])
    # no ellipse where the position was held fixed (method "linear"/"map": covariance NaN)
    has_cov = bool(np.all(np.isfinite(hp.cov)))
    w, h, ang = _ellipse(hp.cov) if has_cov else (0.0, 0.0, 0.0)
    mag = 1.0
    if has_cov and max(w, h) < hp.scale:
        mag = float(10 ** np.ceil(np.log10(hp.scale / max(max(w, h), 1e-6))))
    res_txt = f"at {resolution:.2f}\" FWHM" if resolution > 0 else "model grid"
    for ax, b in zip(axes, order):
        im = ax.imshow(images[b], origin="lower", extent=hp.extent, cmap="magma", norm=_host_norm(images[b]),
                       interpolation="nearest")
        cb = fig.colorbar(im, ax=ax, shrink=0.8, label=f"{hp.bands[b]}: nJy / model pixel")
        label_asinh_colorbar(cb, im.norm)
        ax.set_title(f"host, {hp.bands[b]} ({res_txt})", fontsize=9)
    if colour:
        order = order[:3]
        # a pixel host's constant level is degenerate with the epochs' sky levels: take each
        # band's median over the fitted region as its zero before combining the bands
        rgb = np.stack([np.clip(images[i] - np.median(images[i][hp.images[i] != 0]), 0, None)
                        for i in order[::-1]], axis=-1)
        from astropy.visualization import make_lupton_rgb

        top = np.percentile(rgb, 99.5)
        with np.errstate(invalid="ignore", divide="ignore"):  # astropy divides by the zero intensity of empty pixels
            img = make_lupton_rgb(rgb[..., 0], rgb[..., 1], rgb[..., 2], minimum=0.0, stretch=max(top, 1e-12) / 4, Q=8)
        axes[-1].imshow(img, origin="lower", extent=hp.extent, interpolation="nearest")
        axes[-1].set_title(f"colour ({', '.join(hp.bands[i] for i in order)} as B, G, R)", fontsize=9)
    for ax in axes:
        ax.plot(*hp.offset, "+", color="cyan", ms=12, mew=1.2,
                label="transient" if has_cov else "transient (position fixed)")
        if has_cov:
            ax.add_patch(Ellipse(tuple(hp.offset), w * mag, h * mag, angle=ang, fill=False, ec="cyan", lw=1.0,
                                 label="1-sigma" + (f" (x{mag:g})" if mag > 1 else "")))
        ax.set_xlabel("East offset [arcsec]")
        half = zoom if zoom is not None else _support(hp)
        ax.set_xlim(half, -half)
        ax.set_ylim(-half, half)
    axes[0].set_ylabel("North offset [arcsec]")
    axes[0].legend(fontsize=7, loc="lower left")
    return fig


def _support(hp) -> float:
    """Half-width (arcsec) of the square about the target that holds the non-zero host pixels."""
    nz = np.argwhere(np.any(hp.images != 0, axis=0))
    if nz.size == 0:
        return float(max(abs(v) for v in hp.extent))
    n = hp.images.shape[-1]
    half_pix = float(np.max(np.abs(nz - (n - 1) / 2.0))) + 1.0
    return half_pix * hp.scale


def _host_norm(img: np.ndarray):
    """Asinh stretch of a host model: linear up to its scatter about zero (the model's own
    noise for a pixel host, estimated robustly) or 1e-3 of the peak, whichever is larger."""
    vals = img[np.isfinite(img) & (img != 0)]
    peak = float(np.max(np.abs(vals))) if vals.size else 1.0
    mad = 1.4826 * float(np.median(np.abs(vals))) if vals.size else 0.0
    return asinh_norm([img], noise=max(1e-3 * peak, 0.5 * mad), hi=100.0)
