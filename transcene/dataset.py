"""From epoch records to the traced arrays the likelihood consumes.

``EpochStack`` (traced, an equinox Module) holds a batch of epochs of one shape bucket with a
leading epoch axis, in nJy. ``ModelGrid`` (traced) is the host's pixel grid on the tangent plane
at the target. ``Dataset`` (plain Python, never traced) holds the stacks, the grid, the target and
the per-epoch metadata table. Shapes are padded to buckets (image side to a multiple of 16, epoch
count to the next of a few sizes per doubling, ``_epoch_bucket``) so that compiled programs are
reused across targets and nights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.time import Time
from jaxtyping import Array, Complex, Float

from .epoch import Epoch
from .errors import BaselineWarning, DatasetError, EpochSkippedWarning
from .geometry import local_affine
from .psf import alias_spectrum, centred_fft, crop_psf, psf_fwhm, psf_to_model_frame
from .psf_refine import peak_fwhm, refine_factor, refine_undersampled_psf

__all__ = ["EpochStack", "ModelGrid", "Dataset", "make_dataset"]

log = logging.getLogger(__name__)

#: prior precision (arcsec^-2) that pins an astrometric shift at zero
PINNED = 1e16
#: default fitted half-side: this many times the largest PSF FWHM, at least DEFAULT_RADIUS_MIN arcsec
DEFAULT_RADIUS_FWHM = 4.0
DEFAULT_RADIUS_MIN = 8.0
#: FWHM / sigma of a Gaussian
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


class EpochStack(eqx.Module):
    """A batch of epochs of one shape: data in nJy, weights, PSFs and geometry (traced).

    Pixel coordinates are those of the (cropped) epoch image. ``p0`` is the target's pixel
    position, ``amat`` the local Jacobian in pixels per arcsec (columns: d/d xi, d/d eta).
    """

    data: Float[Array, "epoch y x"]
    weight: Float[Array, "epoch y x"]
    psf_hat: Complex[Array, "epoch k k fy fxh"]  # psf.alias_spectrum (k: the PSF's oversampling)
    #: the PSF resampled into the model frame, as its ``render.line_spectra`` layout for this
    #: epoch (``[..., 1]`` where ``swap``, else ``[..., 0]``)
    q_line: Complex[Array, "epoch mh m"]
    swap: Float[Array, "epoch"]  # 1 where the sampler runs with the model axes swapped (render.axes_swapped)
    p0: Float[Array, "epoch 2"]
    amat: Float[Array, "epoch 2 2"]
    ainv: Float[Array, "epoch 2 2"]
    band: Float[Array, "epoch"]
    free_flux: Float[Array, "epoch"]
    valid: Float[Array, "epoch"]
    shift_prec: Float[Array, "epoch"]
    zp_prec: Float[Array, "epoch"]  # prior precision of the zero-point nuisance (PINNED: off)
    psf_prec: Float[Array, "epoch"]  # prior precision of the PSF-width nuisance (PINNED: off)
    psf_var: Float[Array, "epoch"]  # the PSF's sigma^2 in arcsec^2 (Gaussian-equivalent, from its FWHM)
    scale: Float[Array, "epoch"]  # calibration factor fixed into the epoch (1; a frozen fit's zero point)
    #: whether the PSF-width nuisance is rendered at all (static: off keeps it out of the hot path)
    fit_psf_width: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if self.data.ndim != 3:  # a single-epoch slice
            return
        n = self.data.shape[0]
        for name in ("weight", "psf_hat", "q_line", "swap", "p0", "amat", "ainv", "band"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"EpochStack.{name} has {getattr(self, name).shape[0]} epochs, expected {n}")

    @property
    def n_epochs(self) -> int:
        return self.data.shape[0]

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.data.shape[1:]


class ModelGrid(eqx.Module):
    """The host's pixel grid: ``size`` x ``size`` pixels centred on the target.

    Host parameters live in the central ``host_size`` window; the rest is zero padding for the
    FFT convolutions. Model pixel coordinates: ``X = c - xi / scale``, ``Y = c + eta / scale`` with ``c = size // 2``
    (East to the left, North up, as a FITS image with a standard WCS).
    """

    to_model: Float[Array, "2 2"]  # model pixels per arcsec
    scale: Float[Array, ""]  # arcsec per model pixel
    size: int = eqx.field(static=True)  # FFT grid side (host window + zero padding)
    host_size: int = eqx.field(static=True)  # side of the window holding host parameters (odd)

    @property
    def centre(self) -> int:
        return self.size // 2

    def embed(self, window: Array) -> Array:
        """Place ``[..., host_size, host_size]`` arrays in the centre of the FFT grid."""
        lo = self.centre - self.host_size // 2
        hi = self.size - lo - self.host_size
        pad = [(0, 0)] * (window.ndim - 2) + [(lo, hi), (lo, hi)]
        return jnp.pad(window, pad)

    def crop(self, full: Array) -> Array:
        """Inverse of :meth:`embed` (the host window of a full-grid array)."""
        lo = self.centre - self.host_size // 2
        return full[..., lo : lo + self.host_size, lo : lo + self.host_size]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Everything a fit needs: traced stacks and grid, plus metadata that never enters JAX.

    ``epochs`` has one row per input epoch (in input order) with its ``stack`` and ``slot``.
    """

    stacks: tuple[EpochStack, ...]
    grid: ModelGrid
    target: SkyCoord
    bands: tuple[str, ...]
    epochs: Table
    mjd_ref: float
    fit_radius: float  # arcsec
    baseline_defined: bool
    records: tuple[Epoch, ...] = dataclasses.field(repr=False, default=())

    @property
    def n_epochs(self) -> int:
        return len(self.epochs)

    def stack_rows(self) -> np.ndarray:
        """Each epoch's row (``epochs`` order) in the per-slot arrays of all stacks concatenated."""
        offsets = np.cumsum([0] + [st.n_epochs for st in self.stacks])
        return offsets[np.asarray(self.epochs["stack"], int)] + np.asarray(self.epochs["slot"], int)


def _bucket(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def _epoch_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (below 8: 2^k and
    1.5 x 2^k; from 8: 2^k times 1, 1.25, 1.5 and 1.75) that holds ``n``.

    Few distinct shapes (compiled programs are reused, four per doubling of the epoch count) and
    at most 20 % padded slots from 8 epochs on (padded slots cost as much as real epochs in
    every pass: 100 epochs are 112 slots, not 128).
    """
    b = 1
    while True:
        sizes = (b, b * 5 // 4, b * 3 // 2, b * 7 // 4) if b >= 8 else (b, max(b * 3 // 2, b))
        for c in sizes:
            if c >= n:
                return c
        b *= 2


def _fft_size(n: int) -> int:
    """Smallest size >= n whose prime factors are 2, 3 and 5 (fast FFTs), even."""
    m = max(int(n), 2)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1 and m % 2 == 0:
            return m
        m += 1


def make_dataset(
    epochs: Sequence[Epoch],
    target: SkyCoord,
    *,
    fit_radius: float | None = None,
    model_oversample: float = 2.0,
    zero_before: float | None = None,
    shift_prior: float = 0.1,
    zp_jitter: float = 0.0,
    psf_width_jitter: float = 0.0,
    refine_psf: bool = True,
    pad_epochs: bool = True,
) -> Dataset:
    """Stack ``epochs`` around ``target`` for fitting.

    Args:
        epochs: epoch records (any mix of surveys, sizes, orientations, bands).
        target: the transient's (prior) position; the model grid's tangent point.
        fit_radius: half-side in arcsec of the square region fitted (default: 4 x the largest
            PSF FWHM, at least 8 arcsec, at most the median over epochs of the largest square
            about the target that fits in the image).
        model_oversample: model pixels per finest epoch pixel (side).
        zero_before: MJD; epochs before it are treated as transient-free (flux fixed to 0).
        shift_prior: prior standard deviation of each epoch's astrometric shift, arcsec.
        zp_jitter: prior standard deviation of each epoch's zero-point error, mag; 0 (default)
            takes the zero points as exact. When > 0 every epoch gets a free calibration factor
            ``1 + eps`` (prior sd ``0.4 ln(10) zp_jitter``) multiplying its whole scene but the sky,
            measured against the host that all epochs share; the fluxes are then calibrated to
            the epochs' common scale and their errors include the zero-point uncertainty.
        psf_width_jitter: prior standard deviation of each epoch's fractional PSF-width error
            (e.g. 0.02 for 2 % in FWHM); 0 (default) takes the PSFs as exact. When > 0 every epoch's
            PSF is convolved with (or, for a negative value, deconvolved by) a Gaussian that
            changes its FWHM by a free fraction ``w``: ``sigma^2 -> sigma^2 (1 + 2 w)``, exact for
            Gaussian PSFs, a core-width change for others. It applies to the point sources (the
            transient, static stars); the host keeps the written PSF (``scene.with_psf_width``).
        refine_psf: give native-sampled PSFs sharper than ~2.5 pixels FWHM finer samples from a
            fitted Moffat + Gaussian profile plus a residual table (``psf_refine``), so that point
            sources between pixel centres are rendered with the right profile. Off, such PSFs are
            sinc-interpolated and fluxes come out 1-8 % low at FWHM 1.25-1.75 pixels
            (``scripts/psf_sampling_bias.py``).
        pad_epochs: pad epoch counts to buckets (``_epoch_bucket``: 100 epochs are 112 slots) so compiled
            programs are reused.
    """
    if len(epochs) == 0:
        raise DatasetError("no epochs to fit")
    if not (np.isfinite(zp_jitter) and zp_jitter >= 0):
        raise ValueError(f"zp_jitter must be a zero-point rms in mag >= 0; got {zp_jitter!r}")
    if not (np.isfinite(psf_width_jitter) and 0 <= psf_width_jitter < 0.25):
        raise ValueError(f"psf_width_jitter must be a fractional FWHM rms in [0, 0.25); got {psf_width_jitter!r}")
    if not (np.isfinite(shift_prior) and shift_prior >= 0):
        raise ValueError(f"shift_prior must be an rms in arcsec >= 0; got {shift_prior!r}")
    geo = []
    kept = []
    for ep in epochs:
        p0, a = local_affine(ep.wcs, target)
        ny, nx = ep.shape
        if not (np.all(np.isfinite(p0)) and -0.5 <= p0[0] <= nx - 0.5 and -0.5 <= p0[1] <= ny - 0.5):
            warnings.warn(
                f"{ep.path or ep.exposure_id}: target {target.to_string('decimal')} is outside "
                f"this epoch's footprint (pixel {p0}); epoch skipped",
                EpochSkippedWarning,
                stacklevel=2,
            )
            continue
        scale = 1.0 / math.sqrt(abs(np.linalg.det(a)))
        edge = min(p0[0] + 0.5, nx - 0.5 - p0[0], p0[1] + 0.5, ny - 0.5 - p0[1]) * scale
        geo.append((p0, a, scale, edge))
        kept.append(ep)
    if not kept:
        raise DatasetError(f"target {target.to_string('hmsdms')} is outside every epoch's footprint")
    epochs = kept
    if fit_radius is None:
        # The transient's flux is informed by the pixels within a few PSF widths of it; a wider
        # region adds host pixels (cost grows as its area) and little information.
        fwhm_max = max(psf_fwhm(ep.psf, ep.psf_oversample) * g[2] for ep, g in zip(epochs, geo))
        fit_radius = min(float(np.median([g[3] for g in geo])), max(DEFAULT_RADIUS_MIN, DEFAULT_RADIUS_FWHM * fwhm_max))
    fit_radius = float(fit_radius)
    if not fit_radius > 0:
        raise DatasetError(f"fit_radius must be > 0 arcsec, got {fit_radius}")

    bands = tuple(sorted({ep.band for ep in epochs}))
    min_scale = min(g[2] for g in geo)
    scale_m = min_scale / float(model_oversample)
    to_model = np.diag([-1.0 / scale_m, 1.0 / scale_m])

    # PSF half-sizes (native pixels): the whole PSF, but never beyond the fitted region + margin
    psf_half = [
        min(ep.psf.shape[0] // 2 // int(ep.psf_oversample), int(math.ceil(fit_radius / g[2])) + 2)
        for ep, g in zip(epochs, geo)
    ]
    rq = max(int(math.ceil(h * g[2] / scale_m)) + 1 for h, g in zip(psf_half, geo))
    # Host parameters cover exactly the fitted region: host pixels outside it would be seen only
    # through PSF wings, and such weakly constrained pixels make the linear solves converge
    # 1000 times slower. Light from just outside is absorbed by the edge pixels. Beyond the
    # window the FFT grid is zero padding wide enough for the PSF, so nothing wraps around.
    half_host = int(math.ceil(fit_radius / scale_m))
    m_size = _fft_size(2 * (half_host + rq + 6) + 1)
    grid = ModelGrid(
        to_model=jnp.asarray(to_model), scale=jnp.asarray(scale_m), size=m_size, host_size=2 * half_host + 1
    )

    # crop each epoch to the fitted region
    items = []
    for ep, g, h in zip(epochs, geo, psf_half):
        p0, a, scale, _ = g
        hw = int(math.ceil(fit_radius / scale * math.sqrt(2))) + 1
        ny, nx = ep.shape
        x0 = max(int(math.floor(p0[0])) - hw, 0)
        x1 = min(int(math.floor(p0[0])) + hw + 2, nx)
        y0 = max(int(math.floor(p0[1])) - hw, 0)
        y1 = min(int(math.floor(p0[1])) + hw + 2, ny)
        img = ep.image[y0:y1, x0:x1].astype(float)
        w = ep.weight[y0:y1, x0:x1].astype(float)
        pc = p0 - np.array([x0, y0], float)
        ainv = np.linalg.inv(a)
        yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
        off = np.einsum("ij,jyx->iyx", ainv, np.stack([xx - pc[0], yy - pc[1]]))
        inside = (np.abs(off[0]) <= fit_radius) & (np.abs(off[1]) <= fit_radius)
        w = np.where(inside, w, 0.0)
        if not np.any(w > 0):
            warnings.warn(
                f"{ep.path or ep.exposure_id}: every pixel within {fit_radius:.1f} arcsec of the "
                "target is masked; epoch skipped",
                EpochSkippedWarning,
                stacklevel=2,
            )
            continue
        c = ep.njy_per_unit
        img = np.where(w > 0, img * c, 0.0)
        w = w / c**2
        psf, k_psf = np.asarray(ep.psf, float), int(ep.psf_oversample)
        k_refine = refine_factor(peak_fwhm(psf)) if refine_psf and k_psf == 1 else 1
        if k_refine > 1:
            psf, k_psf = refine_undersampled_psf(psf, k_refine).psf, k_refine
        items.append(dict(ep=ep, img=img, w=w, p0=pc, a=a, ainv=ainv, scale=scale, h=h, x0=x0, y0=y0,
                          psf=psf, k_psf=k_psf, refined=k_refine > 1))
    if not items:
        raise DatasetError("every epoch is fully masked within the fitted region")

    refs = [
        it["ep"].is_reference or (zero_before is not None and it["ep"].mjd < zero_before) for it in items
    ]
    baseline_defined = any(refs)
    # The astrometric frame is defined by the transient-free epochs (their shifts are pinned to
    # zero), or by the deepest epoch when there is none. Otherwise a common shift of every epoch
    # plus a translation of the host is constrained by the shift priors alone, a curved valley
    # in which Gauss-Newton crawls when the host is bright.
    anchors = list(refs) if baseline_defined else [
        i == int(np.argmax([it["w"].sum() for it in items])) for i in range(len(items))
    ]
    if not baseline_defined:
        warnings.warn(
            "no transient-free epochs (no REFEPOCH = T, no zero_before): transient fluxes are "
            "relative to an undefined baseline; the light curve is flagged 'baseline undefined'",
            BaselineWarning,
            stacklevel=2,
        )
    if all(refs):
        raise DatasetError("every epoch is a reference (transient-free) epoch: nothing to measure")
    unanchored = sorted({it["ep"].band for it in items} - {it["ep"].band for it, r in zip(items, refs) if r})
    if baseline_defined and unanchored:
        warnings.warn(
            f"band(s) {unanchored} have no transient-free epoch: their host and transient fluxes are "
            "degenerate, so their fluxes are relative to an undefined baseline (rows flagged "
            "'baseline undefined', errors large)",
            BaselineWarning,
            stacklevel=2,
        )

    from .render import axes_swapped  # render imports this module's types

    # group into shape buckets
    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        side = _bucket(max(it["img"].shape), 16)
        nf = _fft_size(side + it["h"] + 1)
        it["side"], it["nf"] = side, nf
        groups.setdefault((side, nf), []).append(i)

    stacks = []
    rows = []
    band_index = {b: k for k, b in enumerate(bands)}
    for s_idx, ((side, nf), members) in enumerate(sorted(groups.items())):
        n = len(members)
        n_pad = _epoch_bucket(n) if pad_epochs else n
        data = np.zeros((n_pad, side, side))
        weight = np.zeros((n_pad, side, side))
        # the stack's PSF sampling: the finest any member has (coarser ones are interpolated)
        k_s = max(items[i]["k_psf"] for i in members)
        psf_hat = np.zeros((n_pad, k_s, k_s, nf, nf // 2 + 1), complex)
        q_line = np.zeros((n_pad, m_size // 2 + 1, m_size), complex)
        swap = np.zeros(n_pad)
        p0 = np.zeros((n_pad, 2))
        amat = np.tile(np.eye(2), (n_pad, 1, 1))
        ainv = np.tile(np.eye(2), (n_pad, 1, 1))
        band = np.zeros(n_pad)
        free = np.zeros(n_pad)
        valid = np.zeros(n_pad)
        shift_prec = np.full(n_pad, 1.0 / shift_prior**2 if shift_prior > 0 else PINNED)
        zp_sd = 0.4 * math.log(10.0) * zp_jitter
        zp_prec = np.full(n_pad, 1.0 / zp_sd**2 if zp_sd > 0 else PINNED)
        psf_prec = np.full(n_pad, 1.0 / psf_width_jitter**2 if psf_width_jitter > 0 else PINNED)
        psf_var = np.zeros(n_pad)
        for slot, i in enumerate(members):
            it = items[i]
            ep = it["ep"]
            ny, nx = it["img"].shape
            data[slot, :ny, :nx] = it["img"]
            weight[slot, :ny, :nx] = it["w"]
            k_e = it["k_psf"]
            # the file's samples, or their refinement (unit sum at native sampling: k_e^2 over
            # the finer samples)
            src = crop_psf(it["psf"], it["h"] * k_e)
            # a refined PSF keeps the native stamp's convention: unit sum over the samples at
            # native positions (the centre is one), whatever wings the stamp truncates
            src = src / src[::k_e, ::k_e].sum() if it["refined"] else src * (k_e**2 / src.sum())
            fine = src
            if k_e != k_s:  # a coarser member of a finer stack: its samples interpolated
                fine = psf_to_model_frame(src, np.eye(2) / k_s, it["h"] * k_s, nf, oversample=k_e)
                fine = fine * (k_s**2 / fine.sum())
            psf_hat[slot] = alias_spectrum(fine, k_s, nf)  # k_s = 1: the rfft2 of the stamp
            b_mat = it["a"] @ np.linalg.inv(to_model)  # epoch px per model px
            b_inv = to_model @ it["ainv"]  # model px per epoch px: the sampler's map (render.host_on_epoch)
            hq = min(int(math.ceil(it["h"] * it["scale"] / scale_m)) + 1, m_size // 2 - 1)
            q = psf_to_model_frame(src, b_mat, hq, nf, oversample=k_e)
            full = centred_fft(q, (m_size, m_size))
            swap[slot] = float(axes_swapped(b_inv))  # the sampler's own criterion, fixed per epoch
            q_line[slot] = full[:, : m_size // 2 + 1].T if swap[slot] else full[: m_size // 2 + 1, :]
            p0[slot] = it["p0"]
            amat[slot] = it["a"]
            ainv[slot] = it["ainv"]
            band[slot] = band_index[ep.band]
            free[slot] = 0.0 if refs[i] else 1.0
            valid[slot] = 1.0
            psf_var[slot] = (psf_fwhm(ep.psf, ep.psf_oversample) * it["scale"] / FWHM_PER_SIGMA) ** 2
            if anchors[i]:
                shift_prec[slot] = PINNED
            rows.append(
                dict(
                    index=i,
                    stack=s_idx,
                    slot=slot,
                    exposure_id=ep.exposure_id,
                    mjd=_utc_mjd(ep),
                    band=ep.band,
                    survey=ep.survey,
                    is_reference=bool(refs[i]),
                    zeropoint=ep.zeropoint,
                    njy_per_unit=ep.njy_per_unit,
                    pixel_scale=it["scale"],
                    psf_fwhm=psf_fwhm(ep.psf, ep.psf_oversample) * it["scale"],
                    n_pixels=int(np.count_nonzero(it["w"] > 0)),
                    x0=it["x0"],
                    y0=it["y0"],
                    path=ep.path or "",
                )
            )
        stacks.append(
            EpochStack(
                data=jnp.asarray(data),
                weight=jnp.asarray(weight),
                psf_hat=jnp.asarray(psf_hat),
                q_line=jnp.asarray(q_line),
                swap=jnp.asarray(swap),
                p0=jnp.asarray(p0),
                amat=jnp.asarray(amat),
                ainv=jnp.asarray(ainv),
                band=jnp.asarray(band),
                free_flux=jnp.asarray(free),
                valid=jnp.asarray(valid),
                shift_prec=jnp.asarray(shift_prec),
                zp_prec=jnp.asarray(zp_prec),
                psf_prec=jnp.asarray(psf_prec),
                psf_var=jnp.asarray(psf_var),
                fit_psf_width=psf_width_jitter > 0,
                scale=jnp.ones(n_pad),
            )
        )
    rows.sort(key=lambda r: r["index"])
    table = Table(rows=rows)
    table["mjd"].unit = u.d
    table["pixel_scale"].unit = u.arcsec / u.pix
    table["psf_fwhm"].unit = u.arcsec
    table.meta["time_scale"] = "UTC"
    mjd_ref = float(np.floor(np.min(table["mjd"])))
    log.info(
        "dataset: %d epochs in %d stack(s), %d band(s), model grid %d^2 at %.3f arcsec/px, fit radius %.1f arcsec",
        len(table), len(stacks), len(bands), m_size, scale_m, fit_radius,
    )
    return Dataset(
        stacks=tuple(stacks),
        grid=grid,
        target=target,
        bands=bands,
        epochs=table,
        mjd_ref=mjd_ref,
        fit_radius=fit_radius,
        baseline_defined=baseline_defined,
        records=tuple(it["ep"] for it in items),
    )


def _utc_mjd(ep: Epoch) -> float:
    """Mid-exposure MJD of ``ep`` converted to UTC."""
    ts = ep.timesys.upper()
    if ts == "GPS":  # GPS = TAI - 19 s
        return float((Time(ep.mjd, format="mjd", scale="tai") + 19 * u.s).utc.mjd)
    return float(Time(ep.mjd, format="mjd", scale=ts.lower()).utc.mjd)
