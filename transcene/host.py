"""Static host models: images on the model grid, one per band, in nJy per model pixel.

``PixelHost`` is non-parametric: every model pixel of every band is a free linear parameter
(a real galaxy with a dust lane, arms or a bulge). It is regularised by a Gaussian prior that
penalises only spatial frequencies the PSFs cannot see (see :func:`host_prior_spectrum`), so it
neither shrinks the light the data constrain nor forbids negative values: a positivity
constraint would bias the host low where the data are noisy and break the exact linear
marginalisation of the transient fluxes over the host.

``SersicHost`` is parametric: one elliptical Sersic profile, shared by all bands with a total flux
per band, pixel-integrated on the model grid by supersampling (finer near the centre, where
the profile is steep).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln
from jaxtyping import Array, Float

from .dataset import ModelGrid

__all__ = ["PixelHost", "SersicHost", "sersic_bn", "host_prior_spectrum"]


class PixelHost(eqx.Module):
    """Free host image per band on the model grid's host window, nJy per model pixel."""

    image: Float[Array, "band h h"]

    def images(self, grid: ModelGrid) -> Float[Array, "band m m"]:
        return grid.embed(self.image)


def sersic_bn(n: Array) -> Array:
    """b_n such that r_e encloses half the light (Ciotti & Bertin 1999 expansion)."""
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n**2) + 131.0 / (1148175.0 * n**3)


class SersicHost(eqx.Module):
    """Elliptical Sersic profile, shared shape, per-band total flux (nJy).

    Unconstrained parameters: ``centre`` (xi, eta) in arcsec; ``log_re`` (ln arcsec);
    ``n_raw`` with n = 0.3 + 7.7 sigmoid(n_raw); ``e_raw`` (2,) with ellipticity
    e = tanh(|e_raw|) in direction e_raw (q = (1 - e) / (1 + e)).
    """

    flux: Float[Array, "band"]
    centre: Float[Array, "2"]
    log_re: Float[Array, ""]
    n_raw: Float[Array, ""]
    e_raw: Float[Array, "2"]

    @property
    def n(self) -> Array:
        return 0.3 + 7.7 * jax.nn.sigmoid(self.n_raw)

    def shape_params(self) -> tuple[Array, Array, Array]:
        """(q, position angle East of North in radians, re in arcsec)."""
        mag = jnp.sqrt(jnp.sum(self.e_raw**2) + 1e-24)
        e = jnp.tanh(mag)
        q = (1.0 - e) / (1.0 + e)
        pa = 0.5 * jnp.arctan2(self.e_raw[1], self.e_raw[0])
        return q, pa, jnp.exp(self.log_re)

    def profile(self, xi: Array, eta: Array) -> Array:
        """Surface brightness per arcsec^2 of a unit-total-flux profile at offsets (arcsec)."""
        n = self.n
        q, pa, re = self.shape_params()
        dx = xi - self.centre[0]
        dy = eta - self.centre[1]
        # major axis at position angle pa, measured from North towards East
        u = dx * jnp.sin(pa) + dy * jnp.cos(pa)
        v = -dx * jnp.cos(pa) + dy * jnp.sin(pa)
        r = jnp.sqrt(u**2 + (v / q) ** 2 + 1e-12)
        bn = sersic_bn(n)
        log_norm = (
            jnp.log(2.0 * jnp.pi * q * n) + 2.0 * jnp.log(re) + bn + gammaln(2.0 * n) - 2.0 * n * jnp.log(bn)
        )
        return jnp.exp(-bn * ((r / re) ** (1.0 / n) - 1.0) - log_norm)

    def images(self, grid: ModelGrid, *, sub: int = 4, core_sub: int = 16, core_half: int = 2) -> Float[Array, "band m m"]:
        m = grid.size
        c = grid.centre
        s = grid.scale
        area = s * s
        # supersampled pixel integration everywhere
        off = (jnp.arange(sub) + 0.5) / sub - 0.5
        idx = jnp.arange(m) - c
        xs = (idx[:, None] + off[None, :]).reshape(-1)  # model x offsets (pixels)
        X, Y = jnp.meshgrid(xs, xs)
        img = self.profile(-X * s, Y * s) * area
        img = img.reshape(m, sub, m, sub).mean(axis=(1, 3))
        # finer integration of the pixels around the profile centre (steep cusp for high n)
        ccx = jnp.round(c - self.centre[0] / s).astype(jnp.int32)
        ccy = jnp.round(c + self.centre[1] / s).astype(jnp.int32)
        k = 2 * core_half + 1
        offc = (jnp.arange(core_sub) + 0.5) / core_sub - 0.5
        loc = jnp.arange(k) - core_half
        cx = ((ccx - c + loc)[:, None] + offc[None, :]).reshape(-1)
        cy = ((ccy - c + loc)[:, None] + offc[None, :]).reshape(-1)
        CX, CY = jnp.meshgrid(cx, cy)
        core = self.profile(-CX * s, CY * s) * area
        core = core.reshape(k, core_sub, k, core_sub).mean(axis=(1, 3))
        img = jax.lax.dynamic_update_slice(img, core, (ccy - core_half, ccx - core_half))
        return self.flux[:, None, None] * img[None, :, :]


def host_prior_spectrum(m: int, strength: Array, floor: float = 1e-3) -> Array:
    """Prior precision per rfft2 mode, ``strength * (floor + (|k| / k_nyquist)^4)``.

    Penalises the spatial frequencies near the model grid's Nyquist limit, which no PSF passes,
    and barely touches the low frequencies that carry the host's light.
    """
    fy = jnp.fft.fftfreq(m)[:, None]
    fx = jnp.fft.rfftfreq(m)[None, :]
    k2 = (fx**2 + fy**2) / 0.25
    return strength * (floor + k2**2)
