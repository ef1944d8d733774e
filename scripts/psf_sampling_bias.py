"""Flux lost by a PSF given at native sampling when it is undersampled (docs/validation.md).

The renderer shifts a PSF stamp to a source's sub-pixel position by band-limited (sinc)
interpolation of its samples. When the FWHM is below ~2.5 pixels the native samples do not
determine the pixel-integrated PSF (ePSF) between pixel centres, and a least-squares fit of the
shifted stamp to a source drawn with the true ePSF returns less than its flux. ``make_dataset``
therefore refines such PSFs (``transcene.psf_refine``: a fitted Moffat + Gaussian profile plus a
residual table, sampled 2-4x finer). This prints the flux ratio (flat weights: sky-dominated
noise) by FWHM and sub-pixel phase for both interpolants, for the simulator's Moffat (beta 3)
and for a Kolmogorov seeing disc, which is outside the refinement's profile family.

Usage: python scripts/psf_sampling_bias.py [--fwhm 1.25 1.5 ...]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.special import j0

from transcene.psf import _dirichlet
from transcene.psf_refine import peak_fwhm, refine_factor, refine_undersampled_psf
from transcene.simulate import _Psf

PHASES = [(0.5, 0.5), (0.5, 0.0), (0.25, 0.25), (0.33, 0.1)]  # sub-pixel shifts (x, y), pixels
SIZE = 21
PERIOD = 64  # native pixels: the trigonometric interpolation's period (an FFT size)
_T, _W = np.polynomial.legendre.leggauss(8)
_T, _W = _T / 2.0, _W / 2.0


def kolmogorov_epsf(fwhm_px: float):
    """Pixel-integrated long-exposure seeing disc (MTF exp(-(f/f0)^(5/3))) of FWHM ``fwhm_px``."""
    r = np.linspace(0.0, 40.0, 4001)
    f = np.linspace(0.0, 8.0, 4001)
    prof = np.trapezoid(2 * np.pi * f * j0(2 * np.pi * f * r[:, None]) * np.exp(-f ** (5.0 / 3.0)), f, axis=1)
    s = fwhm_px / (2.0 * r[np.argmin(np.abs(prof - prof[0] / 2))])

    def epsf(dx, dy):
        dx, dy = np.broadcast_arrays(np.asarray(dx, float), np.asarray(dy, float))
        out = np.zeros(dx.shape)
        for ty, wy in zip(_T, _W):
            rr = np.hypot(dx[..., None] + _T, dy[..., None] + ty) / s
            out += wy * (np.interp(rr, r, prof, right=0.0) @ _W)
        return out

    return epsf


def _shifted(samples: np.ndarray, k: int, shift) -> np.ndarray:
    d = np.arange(SIZE) - SIZE // 2
    f = np.arange(samples.shape[0]) - samples.shape[0] // 2
    kx = _dirichlet(k * (d[:, None] - shift[0]) - f[None, :], k * PERIOD)
    ky = _dirichlet(k * (d[:, None] - shift[1]) - f[None, :], k * PERIOD)
    return ky @ samples @ kx.T


def flux_ratios(epsf, shift) -> tuple[float, float, int]:
    """Least-squares flux / true flux with the sinc-shifted native stamp and with the refined one."""
    d = np.arange(SIZE) - SIZE // 2
    native = epsf(d[None, :], d[:, None])
    norm = native.sum()  # the same at every sub-pixel phase: the pixel box's zeros
    native = native / norm
    truth = epsf(d[None, :] - shift[0], d[:, None] - shift[1]) / norm
    k = max(refine_factor(peak_fwhm(native)), 2)
    out = []
    for model in (_shifted(native, 1, shift), _shifted(refine_undersampled_psf(native, k).psf, k, shift)):
        out.append(float(np.sum(model * truth) / np.sum(model * model)))
    return out[0], out[1], k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fwhm", type=float, nargs="+", default=[1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0],
                   help="PSF FWHM values in pixels")
    args = p.parse_args(argv)
    print("profile     FWHM [px] | sinc-shifted native stamp at shifts " + " ".join(f"({x}, {y})" for x, y in PHASES)
          + " | refined (k x finer)")
    for fwhm in args.fwhm:
        for name, epsf in (("moffat 3", _Psf("moffat", fwhm, SIZE).epsf), ("kolmogorov", kolmogorov_epsf(fwhm))):
            r = [flux_ratios(epsf, s) for s in PHASES]
            print(f"{name:11s} {fwhm:9.2f} | " + " ".join(f"{a:.4f}" for a, _, _ in r) + " | "
                  + " ".join(f"{b:.4f}" for _, b, _ in r) + f" (k={r[0][2]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
