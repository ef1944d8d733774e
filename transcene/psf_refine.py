"""Finer samples for an undersampled PSF given at native sampling (numpy, dataset-build time).

An effective PSF (optics + atmosphere + pixel response) with a FWHM below ~2.5 pixels is not
determined between pixel centres by its native samples: the band-limited (sinc) interpolant the
renderer would otherwise use rings and puts too little light where a source between pixel centres
has it, so a least-squares flux comes out low (2-8 % at 1.25 pixels, ~1 % at 1.75,
``scripts/psf_sampling_bias.py``). Survey PSFs of good-seeing frames (ZTF's DAOPHOT PSFs, often
1.6-2.5 pixels) are of this kind.

The remedy is DAOPHOT's: a smooth analytic profile carries the core and a residual table the rest.
Here the profile is a pixel-integrated elliptical Moffat with free index plus a concentric
Gaussian, fitted to the native samples; the finer samples are that profile evaluated between
pixel centres plus the residual (native samples minus profile) interpolated trigonometrically. The result passes exactly through
the native samples, so it is an interpolant of what the file says, only a better-informed one
than sinc; the residual is small, so its own interpolation error is second order.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from .psf import _dirichlet, normalise_psf

__all__ = ["RefinedPsf", "refine_factor", "refine_undersampled_psf", "REFINE_BELOW_FWHM"]

log = logging.getLogger(__name__)

# peak_fwhm below which a native PSF is refined (native pixels): 3.0 reads as a true FWHM of
# 2.3-2.8 pixels, above which sinc interpolation loses < 0.05 % of the flux
# (scripts/psf_sampling_bias.py)
REFINE_BELOW_FWHM = 3.0

_LO = np.array([-5.0, -3.0, -3.0, -5.0, -20.0, -5.0, -4.0, -30.0, -5.0])
_HI = np.array([5.0, 3.0, 3.0, 5.0, 20.0, 5.0, 12.0, 30.0, 5.0])
_nodes, _weights = np.polynomial.legendre.leggauss(6)
_GL_T, _GL_W = _nodes / 2.0, _weights / 2.0  # pixel-box quadrature on [-1/2, 1/2]


def peak_fwhm(native: np.ndarray) -> float:
    """FWHM (native pixels) of the Gaussian with the same peak as the unit-sum stamp ``native``.

    The central sample of a centred ePSF is its maximum, so this needs no fit; it reads
    8-30 % above the true FWHM of pixel-integrated Gaussian to Moffat (beta 2.5) profiles
    at 1.75 pixels.
    """
    native = normalise_psf(native)
    peak = float(native[native.shape[0] // 2, native.shape[1] // 2])
    return 2.3548 / math.sqrt(2.0 * math.pi * max(peak, 1e-12))


def refine_factor(fwhm_px: float, threshold: float = REFINE_BELOW_FWHM) -> int:
    """Fine samples per native pixel for a PSF of ``peak_fwhm`` ``fwhm_px`` (1: leave it native)."""
    if not math.isfinite(fwhm_px) or fwhm_px >= threshold:
        return 1
    return int(min(4, math.ceil(threshold / max(fwhm_px, 1e-3))))


@dataclasses.dataclass(frozen=True)
class RefinedPsf:
    """A native PSF resampled ``oversample`` times finer, and the profile fit behind it.

    ``psf`` equals the unit-sum native stamp at the native sample positions (every
    ``oversample``-th sample through the centre); its sum is ``oversample**2`` up to the wings
    the stamp truncates. ``residual_rms``: rms of native samples minus profile relative to the
    PSF's peak (how much the table carries);
    ``converged``: whether the profile fit converged (if not, the table carries more, and the
    result is still an interpolant of the native samples).
    """

    psf: np.ndarray
    oversample: int
    residual_rms: float
    converged: bool


def _profile_epsf(params: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Pixel-integrated profile at pixel-centre offsets ``dx, dy`` (native pixels).

    An elliptical Moffat plus a concentric Gaussian of the same shape: together they follow
    Gaussian, Moffat and Kolmogorov (seeing-limited) cores to ~1e-4 of the peak, which a Moffat
    alone does not (its residual, left to the sinc interpolation, costs 0.1-0.5 % of the flux
    at FWHM 1.25-1.5 pixels). ``params``: log amplitude, centre x, centre y, log l11, l21,
    log l22, log(beta - 1), logit of the Gaussian's share, log of its scale relative to the
    Moffat's; ``L = [[l11, 0], [l21, l22]]``; Moffat ``(beta - 1) |L| / pi (1 + |L^T d|^2)^-beta``,
    Gaussian ``s^2 |L| / pi exp(-s^2 |L^T d|^2)``, both of unit integral.
    """
    return _profile_and_jacobian(params, dx, dy, jacobian=False)[0]


def _profile_and_jacobian(params: np.ndarray, dx: np.ndarray, dy: np.ndarray, jacobian: bool = True):
    """``_profile_epsf`` and its derivatives ``[..., 9]`` with respect to ``params`` (0 for a
    parameter outside the clipping range, as the clipped function is flat there). Analytic:
    the profile fit with finite-difference Jacobians was 80 % of building a 100-epoch dataset."""
    # clipped so that Levenberg-Marquardt's unbounded trial steps stay finite
    inside = (params > _LO) & (params < _HI)
    log_a, x0, y0, log_l11, l21, log_l22, log_bm1, logit_g, log_s = np.clip(params, _LO, _HI)
    l11, l22, beta = math.exp(log_l11), math.exp(log_l22), 1.0 + math.exp(log_bm1)
    share, s2 = 1.0 / (1.0 + math.exp(-logit_g)), math.exp(2.0 * log_s)
    x = (dx - x0)[..., None, None] + _GL_T[None, :]  # [..., y-node, x-node]
    y = (dy - y0)[..., None, None] + _GL_T[:, None]
    u, v = l11 * x + l21 * y, l22 * y  # L^T d
    r2 = u * u + v * v
    norm = l11 * l22 / math.pi  # |det L| / pi: the Jacobian of d -> L^T d
    moffat = (beta - 1.0) * norm * (1.0 + r2) ** (-beta)
    gauss = s2 * norm * np.exp(-s2 * r2)
    prof = (1.0 - share) * moffat + share * gauss
    amp = math.exp(log_a)

    def integrate(node_values):  # the pixel box's quadrature
        return amp * np.einsum("...ij,i,j->...", node_values, _GL_W, _GL_W)

    value = integrate(prof)
    if not jacobian:
        return value, None
    d_r2 = -(1.0 - share) * beta * moffat / (1.0 + r2) - share * s2 * gauss  # d prof / d r2
    cols = [
        prof,
        -d_r2 * 2.0 * u * l11,  # x0
        -d_r2 * (2.0 * u * l21 + 2.0 * v * l22),  # y0
        prof + d_r2 * 2.0 * u * x * l11,  # log l11 (through |L| and r2)
        d_r2 * 2.0 * u * y,  # l21
        prof + d_r2 * 2.0 * v * y * l22,  # log l22
        (1.0 - share) * moffat * (1.0 - (beta - 1.0) * np.log1p(r2)),  # log(beta - 1)
        share * (1.0 - share) * (gauss - moffat),  # logit share
        2.0 * share * gauss * (1.0 - s2 * r2),  # log s
    ]
    jac = np.stack([integrate(c) for c in cols], axis=-1)
    return value, jac * inside


def _fit_profile(native: np.ndarray) -> tuple[np.ndarray, bool]:
    """Least-squares profile parameters for the native samples, and whether the fit converged."""
    from scipy.optimize import least_squares

    n_y, n_x = native.shape
    dy, dx = np.indices(native.shape, dtype=float)
    dx -= n_x // 2
    dy -= n_y // 2
    # the core decides the interpolation; the wings are well sampled and left to the residual
    fwhm0 = peak_fwhm(native)
    core = (dx * dx + dy * dy) <= max(3.0 * fwhm0, 4.0) ** 2
    dx, dy, native = dx[core], dy[core], native[core]
    alpha0 = fwhm0 / (2.0 * math.sqrt(2.0 ** (1.0 / 3.0) - 1.0))  # a beta-3 Moffat of that FWHM

    def resid(p):
        return _profile_epsf(p, dx, dy) - native

    def jac(p):
        return _profile_and_jacobian(p, dx, dy)[1]

    def solve(fun, fun_jac, p0):
        # Levenberg-Marquardt (MINPACK) is ~5x faster than the bounded trust-region solver here,
        # but its first steps can leap into the clipped region; then the bounded solver
        lo, hi = _LO[: p0.size] + 1e-6, _HI[: p0.size] - 1e-6
        res = least_squares(fun, p0, jac=fun_jac, method="lm")
        if res.success and np.all((res.x > lo) & (res.x < hi)):
            return res
        return least_squares(fun, np.clip(p0, lo, hi), jac=fun_jac, bounds=(lo, hi), x_scale="jac", max_nfev=400)

    # a Moffat first (Gaussian share pinned near 0), then the pair from two starts: the
    # share/scale surface has separate basins for a narrow core and for broad wings
    p0 = np.array([0.0, 0.0, 0.0, -math.log(alpha0), 0.0, -math.log(alpha0), math.log(2.0)])
    pinned = np.array([-10.0, 0.0])
    moffat = solve(lambda q: resid(np.r_[q, pinned]), lambda q: jac(np.r_[q, pinned])[:, : q.size], p0)
    best = None
    for logit_g, log_s in ((-2.0, 0.7), (0.0, 0.7)):
        res = solve(resid, jac, np.r_[moffat.x, logit_g, log_s])
        if best is None or res.cost < best.cost:
            best = res
    return best.x, bool(best.success)


def refine_undersampled_psf(native: np.ndarray, oversample: int) -> RefinedPsf:
    """The PSF ``native`` (odd square-ish stamp, native sampling) on a grid ``oversample`` times finer.

    Fine sample ``j`` sits at native offset ``(j - oversample * (n // 2)) / oversample`` from the
    stamp's centre pixel, so every ``oversample``-th fine sample through the centre is a native
    one (``psf.native_psf`` recovers ``native``). The residual's trigonometric interpolation has
    a period of twice the stamp, so it does not wrap.
    """
    k = int(oversample)
    native = normalise_psf(native)
    if k == 1:
        return RefinedPsf(native, 1, 0.0, True)
    if native.shape[0] % 2 == 0 or native.shape[1] % 2 == 0:
        raise ValueError(f"native PSF stamp must have odd sides to be refined, got {native.shape}")
    params, ok = _fit_profile(native)
    n_y, n_x = native.shape
    dy, dx = np.indices(native.shape, dtype=float)
    model = _profile_epsf(params, dx - n_x // 2, dy - n_y // 2)
    resid = native - model
    fy = (np.arange(k * (n_y - 1) + 1) - k * (n_y // 2)) / k
    fx = (np.arange(k * (n_x - 1) + 1) - k * (n_x // 2)) / k
    fine_model = _profile_epsf(params, fx[None, :], fy[:, None])
    p = 2 * max(n_y, n_x)
    ky = _dirichlet(fy[:, None] - (np.arange(n_y) - n_y // 2)[None, :], p)
    kx = _dirichlet(fx[:, None] - (np.arange(n_x) - n_x // 2)[None, :], p)
    # no renormalisation: the native samples carry the stamp's flux convention (unit sum), and
    # the fine sum differs from k^2 where the stamp truncates heavy wings (0.1 % for a Moffat
    # beta 2 at 2.25 px in 21 px)
    fine = fine_model + ky @ resid @ kx.T
    rms = float(np.sqrt(np.mean(resid**2)) / native.max())
    if not ok:
        log.warning("PSF profile fit did not converge (peak FWHM %.2f px, residual %.1e of the peak); "
                    "the finer samples rest more on the residual's sinc interpolation", peak_fwhm(native), rms)
    return RefinedPsf(fine, k, rms, ok)

