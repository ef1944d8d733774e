"""PSF preparation at dataset-build time (numpy): normalise, decimate, resample, Fourier-transform.

A file's PSF is the effective PSF (optics + atmosphere + pixel response) sampled on the image
grid, or ``k`` times finer. Two forms are derived per epoch:

- the *epoch-frame* PSF, used to render point sources by an exact Fourier shift: at native
  sampling (sinc interpolation of the PSF samples), or, when the file's PSF is ``k`` times finer,
  shifted on that finer grid and decimated to the pixels (``alias_spectrum``). An undersampled
  ePSF (FWHM below ~2 pixels) is not the sinc interpolant of its native samples; its finer
  samples are what makes a point source between pixel centres look right;
- the *model-frame* PSF: the same function evaluated on the model grid's pixel offsets through the
  epoch's affine map (trigonometric interpolation of the finest samples available), used to
  convolve the host before it is sampled at the epoch's pixel centres.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "gaussian_psf",
    "moffat_psf",
    "normalise_psf",
    "native_psf",
    "psf_to_model_frame",
    "centred_fft",
    "alias_spectrum",
    "psf_fwhm",
]


def normalise_psf(psf: np.ndarray) -> np.ndarray:
    psf = np.asarray(psf, dtype=float)
    return psf / psf.sum()


def native_psf(psf: np.ndarray, oversample: int) -> np.ndarray:
    """The PSF at native sampling: every ``oversample``-th sample through the centre, unit sum.

    Exact for an effective PSF (pixel response included), which is what epoch files carry.
    """
    k = int(oversample)
    if k == 1:
        return normalise_psf(psf)
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    my, mx = cy // k, cx // k
    out = psf[cy - my * k : cy + my * k + 1 : k, cx - mx * k : cx + mx * k + 1 : k]
    return normalise_psf(out)


def crop_psf(psf: np.ndarray, half: int) -> np.ndarray:
    """Crop to at most ``2 * half + 1`` pixels a side about the centre (no renormalisation)."""
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    hy, hx = min(cy, half), min(cx, half)
    return psf[cy - hy : cy + hy + 1, cx - hx : cx + hx + 1]


def _dirichlet(t: np.ndarray, n: int) -> np.ndarray:
    """Periodic sinc of period ``n`` (even): the kernel of trigonometric interpolation on n samples."""
    t = np.asarray(t, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.sin(np.pi * t) / (n * np.tan(np.pi * t / n))
    return np.where(np.abs(np.sin(np.pi * t / n)) < 1e-12, 1.0, out)


def psf_to_model_frame(psf: np.ndarray, epoch_px_per_model_px: np.ndarray, half: int, period: int,
                       oversample: int = 1) -> np.ndarray:
    """The ePSF on model-grid offsets: ``Q[a] = ePSF(B @ (a - centre))``, ``(2 half + 1)^2``.

    ``psf`` is the PSF sampled ``oversample`` times finer than the epoch's pixels, normalised to
    unit sum at native sampling (``oversample**2`` over its samples). Values between its samples
    come from the same trigonometric (sinc) interpolation, with the same period (``period``
    native pixels), that the point-source renderer applies through its FFT, so host light and
    point sources see one and the same PSF. ``B``
    (2, 2) maps model-pixel offsets ``(dx, dy)`` to epoch-pixel offsets. Values keep the epoch
    normalisation, so convolving a host in nJy per model pixel with ``Q`` and sampling at the
    epoch's pixel centres gives nJy per epoch pixel.
    """
    psf = np.asarray(psf, dtype=float)
    k = int(oversample)
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    off = np.arange(-half, half + 1, dtype=float)
    dx, dy = np.meshgrid(off, off)
    # offsets in units of the PSF's sample spacing
    ex = k * (epoch_px_per_model_px[0, 0] * dx + epoch_px_per_model_px[0, 1] * dy).ravel()
    ey = k * (epoch_px_per_model_px[1, 0] * dx + epoch_px_per_model_px[1, 1] * dy).ravel()
    kx = _dirichlet(ex[:, None] - (np.arange(psf.shape[1]) - cx)[None, :], k * period)
    ky = _dirichlet(ey[:, None] - (np.arange(psf.shape[0]) - cy)[None, :], k * period)
    q = np.einsum("pi,ij,pj->p", ky, psf, kx)
    return q.reshape(dx.shape)


def centred_fft(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Full 2-D DFT (``fft2``) of ``stamp`` placed in an array of ``shape`` with its centre at index (0, 0)."""
    ny, nx = shape
    big = np.zeros(shape)
    sy, sx = stamp.shape
    cy, cx = sy // 2, sx // 2
    if sy > ny or sx > nx:
        raise ValueError(f"PSF stamp {stamp.shape} larger than FFT grid {shape}")
    big[:sy, :sx] = stamp
    big = np.roll(big, (-cy, -cx), axis=(0, 1))
    return np.fft.fft2(big)


def alias_spectrum(fine: np.ndarray, k: int, nf: int) -> np.ndarray:
    """The spectrum of a PSF sampled ``k`` times finer than the pixels, folded for decimation:
    ``[k, k, nf, nf // 2 + 1]`` complex, ``A[b, a, qy, qx] = F[qy + b nf, qx + a nf] / k^2`` with
    ``F`` the full 2-D DFT of ``fine`` centred on a ``k nf`` square grid.

    A point source at native-pixel position ``p`` then has the native-grid spectrum
    ``sum_ab A[b, a] exp(-2 pi i (fy[b] p_y + fx[a] p_x))`` (``fy``, ``fx``: the fine grid's
    signed frequencies in cycles per native pixel, ``render.psf_frequencies``): the fine PSF
    shifted exactly and sampled at the pixel centres, in a ``nf`` FFT. ``fine`` sums to ``k^2``
    for a unit-flux source (unit sum at native sampling).
    """
    n = k * nf
    ny, nx = fine.shape
    if ny > n or nx > n:
        raise ValueError(f"PSF stamp {fine.shape} larger than the fine FFT grid {n}")
    big = np.zeros((n, n))
    big[:ny, :nx] = fine
    big = np.roll(big, (-(ny // 2), -(nx // 2)), axis=(0, 1))
    f = np.fft.fft2(big).reshape(k, nf, k, nf).transpose(0, 2, 1, 3)
    return f[..., : nf // 2 + 1] / k**2


def psf_fwhm(psf: np.ndarray, oversample: int = 1) -> float:
    """FWHM in native pixels from the second moments (Gaussian-equivalent)."""
    psf = normalise_psf(psf)
    y, x = np.indices(psf.shape, dtype=float)
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    w = np.clip(psf, 0, None)
    w = w / w.sum()
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) * w
    # only the core: the moments of Moffat wings diverge
    core = ((x - cx) ** 2 + (y - cy) ** 2) < (psf.shape[0] / 4.0) ** 2
    sig2 = r2[core].sum() / max(w[core].sum(), 1e-30) / 2.0
    return float(2.3548 * np.sqrt(sig2) / oversample)


def gaussian_psf(fwhm: float, size: int = 25, oversample: int = 1) -> np.ndarray:
    """Pixel-integrated circular Gaussian ePSF, ``fwhm`` in native pixels.

    Samples are ``1/oversample`` native pixels apart; unit sum at native sampling.
    """
    from scipy.special import erf

    sigma = fwhm / 2.3548
    t = (np.arange(size) - size // 2) / oversample
    s2 = np.sqrt(2.0) * sigma
    prof = 0.5 * (erf((t + 0.5) / s2) - erf((t - 0.5) / s2))
    img = np.outer(prof, prof)
    return img / img.sum() * oversample**2


def moffat_psf(fwhm: float, beta: float = 3.0, size: int = 25, sub: int = 9) -> np.ndarray:
    """Pixel-integrated circular Moffat ePSF (native sampling), ``fwhm`` in pixels, unit sum."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    s = (np.arange(size * sub) - (size * sub) // 2) / sub  # sub-sample offsets from the centre
    xx, yy = np.meshgrid(s, s)
    img = (1.0 + (xx**2 + yy**2) / alpha**2) ** (-beta)
    img = img.reshape(size, sub, size, sub).sum(axis=(1, 3))
    return img / img.sum()
