"""The scene: static host + point sources + per-epoch calibration nuisances (parameters only).

Parameters split in two:

- global (``SceneGlobal``): the host, the transient's position (arcsec offsets from the target),
  static point sources (positions and per-band fluxes);
- local, one row per epoch (``[flux, sky, shift_xi, shift_eta, zp, psf_width]``): the transient
  flux (nJy), the sky level (nJy per pixel), the astrometric shift (arcsec), the zero-point error
  (a fractional calibration factor ``1 + zp`` on everything but the sky) and the PSF-width error
  (the PSF's sigma^2 times ``1 + 2 psf_width``) of that epoch. The last two are pinned at 0
  unless the dataset has a prior for them.

Data live in the ``Dataset``; nothing here closes over data arrays.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .dataset import EpochStack, ModelGrid
from .host import PixelHost, SersicHost
from .render import batched, host_on_epoch, line_spectra, point_sources, psf_frequencies

__all__ = ["SceneGlobal", "Scene", "render_stack", "LOCAL_FLUX", "LOCAL_SKY", "N_LOCAL"]

LOCAL_FLUX, LOCAL_SKY, LOCAL_SHIFT, LOCAL_ZP, LOCAL_PSF = 0, 1, slice(2, 4), 4, 5
#: the local parameters that enter the model non-linearly (shifts, zero point, PSF width)
LOCAL_NONLINEAR = slice(2, 6)
N_LOCAL = 6


class SceneGlobal(eqx.Module):
    """Parameters shared by all epochs."""

    host: PixelHost | SersicHost
    position: Float[Array, "2"]  # transient offset (xi, eta) from the target, arcsec
    star_position: Float[Array, "s 2"]  # static point sources, arcsec offsets
    star_flux: Float[Array, "s band"]  # nJy


class Scene(eqx.Module):
    """Global parameters plus one ``[flux, sky, shift_xi, shift_eta, zp, psf_width]`` row per epoch per stack."""

    glob: SceneGlobal
    local: tuple[Float[Array, "epoch 6"], ...]


def render_epoch(
    host_ft: Array, glob: SceneGlobal, loc: Float[Array, "6"], ep: EpochStack, grid: ModelGrid
) -> Float[Array, "y x"]:
    """Model image (nJy per pixel) of one epoch (``ep`` without its epoch axis)."""
    img = epoch_sources(host_ft, glob, loc[LOCAL_FLUX], loc[LOCAL_SHIFT], loc[LOCAL_PSF], ep, grid)
    return ep.scale * (1.0 + loc[LOCAL_ZP]) * img + loc[LOCAL_SKY]


def epoch_sources(host_ft: Array, glob: SceneGlobal, flux: Array, shift: Float[Array, "2"], width: Array,
                  ep: EpochStack, grid: ModelGrid) -> Float[Array, "y x"]:
    """One epoch's host and point sources before its calibration and sky (nJy per pixel), for the
    transient ``flux`` (nJy), the epoch's ``shift`` (arcsec) and PSF ``width`` (used only when
    ``ep.fit_psf_width``)."""
    band = ep.band.astype(jnp.int32)
    if ep.fit_psf_width:  # static: the PSF-width nuisance costs nothing when off
        ep = with_psf_width(ep, width)
    offsets = jnp.concatenate([glob.position[None, :], glob.star_position], axis=0)
    fluxes = jnp.concatenate([flux[None], glob.star_flux[:, band]])
    return host_on_epoch(host_ft[band], ep, grid, shift) + point_sources(ep, offsets, fluxes, shift)


def with_psf_width(ep: EpochStack, width: Array) -> EpochStack:
    """``ep`` (one epoch, or a stack with one ``width`` per epoch) with its point-source PSF's
    sigma^2 times ``1 + 2 width``: the PSF spectrum times the Fourier transform of a Gaussian of
    variance ``2 width sigma^2`` (a deconvolution for negative ``width``).

    The host keeps the written PSF: a free width on a pixel host's rendering is degenerate with
    its weakly constrained high frequencies (sharpening an epoch lets them fit its noise; the
    MAP ran to widths of -0.2 at a prior of 0.015; docs/model.md, robustness options)."""
    a = jnp.asarray(ep.amat)
    w = jnp.asarray(width)[..., None, None]
    var = 2.0 * w * jnp.asarray(ep.psf_var)[..., None, None]  # arcsec^2
    k, nf = ep.psf_hat.shape[-4], ep.psf_hat.shape[-2]
    fy, fx = psf_frequencies(nf, k, a.dtype)
    fy, fx = fy[:, None, :, None], fx[None, :, None, :]  # the [b, a, qy, qx] layout of psf_hat
    # pixel frequencies (cycles/px) to cycles/arcsec: k_sky = A^T k_px
    def entry(i, j):  # A[i, j] broadcast against [b, a, qy, qx]
        return a[..., i, j, None, None, None, None]

    kx = entry(0, 0) * fx + entry(1, 0) * fy
    ky = entry(0, 1) * fx + entry(1, 1) * fy
    psf_hat = ep.psf_hat * jnp.exp(-2.0 * jnp.pi**2 * var[..., None, None] * (kx**2 + ky**2))
    return eqx.tree_at(lambda e: e.psf_hat, ep, psf_hat)


def host_spectrum(glob: SceneGlobal, grid: ModelGrid) -> Array:
    """The host's ``render.line_spectra`` ``[band, 2, m/2 + 1, m]``, what ``render_epoch`` takes."""
    return line_spectra(glob.host.images(grid))


def render_stack(glob: SceneGlobal, local: Float[Array, "epoch 6"], stack: EpochStack, grid: ModelGrid) -> Array:
    """Model images ``[epoch, y, x]`` of every epoch in ``stack``."""
    host_ft = host_spectrum(glob, grid)
    fn = lambda args: render_epoch(host_ft, glob, args[0], args[1], grid)  # noqa: E731
    return batched(fn, stack.n_epochs)((local, stack))


def local_jacobian(glob: SceneGlobal, local: Array, stack: EpochStack, grid: ModelGrid) -> tuple[Array, Array]:
    """Model images and their derivatives with respect to each epoch's local parameters.

    Returns ``(model [e, y, x], jac [e, y, x, 6])``. The flux, sky and zero-point columns are
    written down (the model is linear in the first two and proportional to ``1 + zp``); only
    the shifts (and the PSF width, when fitted) go through forward-mode differentiation, which
    renders the whole epoch once per column (a Gauss-Newton step's largest fixed cost).
    """
    host_ft = host_spectrum(glob, grid)
    n_nl = 3 if stack.fit_psf_width else 2  # shift_xi, shift_eta (, psf_width)

    def one(args):
        loc, ep = args

        def sources(nl):  # of the non-linear locals: shift_xi, shift_eta (, psf_width)
            width = nl[2] if ep.fit_psf_width else loc[LOCAL_PSF]
            return epoch_sources(host_ft, glob, loc[LOCAL_FLUX], nl[:2], width, ep, grid)

        nl = jnp.concatenate([loc[LOCAL_SHIFT], loc[LOCAL_PSF:LOCAL_PSF + 1]])[:n_nl]
        img, jvp_fn = jax.linearize(sources, nl)
        d_nl = jax.vmap(jvp_fn, out_axes=-1)(jnp.eye(n_nl, dtype=nl.dtype))
        e = with_psf_width(ep, loc[LOCAL_PSF]) if ep.fit_psf_width else ep
        unit = point_sources(e, glob.position[None, :], jnp.ones(1, loc.dtype), loc[LOCAL_SHIFT])  # d/d flux
        cal = ep.scale * (1.0 + loc[LOCAL_ZP])
        psf_col = cal * d_nl[..., 2] if ep.fit_psf_width else jnp.zeros_like(img)
        jac = jnp.stack([cal * unit, jnp.ones_like(img), cal * d_nl[..., 0], cal * d_nl[..., 1], ep.scale * img, psf_col],
                        axis=-1)
        return cal * img + loc[LOCAL_SKY], jac

    return batched(one, stack.n_epochs)((local, stack))
