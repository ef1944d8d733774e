"""Geometry and rendering against astropy and closed forms.

- ``local_affine`` reproduces astropy's ``world_to_pixel`` near the target for shifted, rotated,
  flipped, rescaled and SIP-distorted WCSs; the tangent-plane offsets round-trip.
- A point source placed at a sky position lands where astropy's WCS says, to 0.01 px, in every
  epoch (checked with an analytic pixel-integrated Gaussian, a least-squares position fit and
  the centroid), and keeps its flux.
- The host path (model-grid convolution + Fourier sampling) agrees with the point-source path
  and with the analytic convolution of a Gaussian blob with the Gaussian ePSF.
- The affine sampler interpolates band-limited images to < 3e-4 at any rotation (FWHM >= 4 px).
- ``transcene.fit`` on an isolated point source reaches the closed-form photometric bound.
"""

from __future__ import annotations

import dataclasses

import time

import transcene  # noqa: F401  (first: enables float64)

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS, Sip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import optimize
from scipy.special import erf

from transcene.dataset import make_dataset
from transcene.epoch import Epoch
from transcene.fit import fit
from transcene.geometry import local_affine, offsets_to_sky, parse_coord, sky_to_offsets
from transcene.host import PixelHost
from transcene.psf import gaussian_psf
from transcene.render import host_on_epoch, line_spectra, point_sources, sample_affine

PSF_FWHM = 2.5  # native pixels
FWHM_TO_SIGMA = 1.0 / 2.3548  # the constant gaussian_psf uses


# ----------------------------------------------------------------------------------- helpers
def rot(angle_deg: float) -> np.ndarray:
    t = np.radians(angle_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def std_cd(scale: float, angle_deg: float = 0.0) -> np.ndarray:
    """CD (deg/px) of a North-up East-left image rotated by ``angle_deg``, ``scale`` arcsec/px."""
    return scale / 3600.0 * rot(angle_deg) @ np.diag([-1.0, 1.0])


def make_wcs(crval: SkyCoord, cd: np.ndarray, crpix, sip: tuple[np.ndarray, np.ndarray] | None = None) -> WCS:
    w = WCS(naxis=2)
    w.wcs.crval = [crval.ra.deg, crval.dec.deg]
    w.wcs.crpix = list(crpix)
    w.wcs.cd = cd
    w.wcs.radesys = "ICRS"
    if sip is None:
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    else:
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.sip = Sip(sip[0], sip[1], None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def sip_coeffs() -> tuple[np.ndarray, np.ndarray]:
    """A strong distortion: ~5 px quadratic + ~1 px cubic displacement 500 px from CRPIX."""
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[1, 1], a[0, 2], a[3, 0] = 2e-5, -1e-5, 5e-6, 1e-8
    b[2, 0], b[1, 1], b[0, 2], b[0, 3] = -4e-6, 1.5e-5, 1e-5, -8e-9
    return a, b


def sip_wcs_with_target_at(target: SkyCoord, pixel, scale: float = 1.0) -> WCS:
    """SIP WCS whose CRPIX lies ~(500, 300) px away, with ``target`` at 0-based ``pixel``."""
    crpix = (pixel[0] + 1 - 500.0, pixel[1] + 1 - 300.0)
    crval = target
    for _ in range(4):  # move CRVAL until the target lands on ``pixel``
        w = make_wcs(crval, std_cd(scale, 11.0), crpix, sip_coeffs())
        here = w.pixel_to_world(*pixel)
        dlon, dlat = here.spherical_offsets_to(target)
        crval = crval.spherical_offsets_by(dlon, dlat)
    return make_wcs(crval, std_cd(scale, 11.0), crpix, sip_coeffs())


def astropy_tangent_offsets_to_sky(target: SkyCoord, offsets: np.ndarray) -> SkyCoord:
    """Tangent-plane offsets (xi East, eta North; arcsec) to the sky with astropy's own TAN."""
    w = make_wcs(target, np.diag([-1.0, 1.0]) / 3600.0, (1.0, 1.0))
    offsets = np.atleast_2d(offsets)
    return w.pixel_to_world(-offsets[:, 0], offsets[:, 1])


def world_to_pixel(wcs: WCS, sky: SkyCoord) -> np.ndarray:
    x, y = wcs.world_to_pixel(sky)
    return np.stack([np.asarray(x, float), np.asarray(y, float)], axis=-1)


def random_offsets(rng: np.random.Generator, n: int = 20, radius: float = 10.0) -> np.ndarray:
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=-1)


def affine_error(wcs: WCS, target: SkyCoord, offsets: np.ndarray) -> float:
    """Largest |p0 + A @ offset - astropy pixel| (px) over ``offsets``."""
    p0, a = local_affine(wcs, target)
    pred = p0[None, :] + offsets @ a.T
    truth = world_to_pixel(wcs, offsets_to_sky(target, offsets))
    return float(np.max(np.hypot(*(pred - truth).T)))


def erf_profile(t: np.ndarray, sigma: float) -> np.ndarray:
    s2 = np.sqrt(2.0) * sigma
    return 0.5 * (erf((t + 0.5) / s2) - erf((t - 0.5) / s2))


def gaussian_image(shape, x: float, y: float, flux: float, sigma: float) -> np.ndarray:
    """Pixel-integrated circular Gaussian of ``flux`` centred at (x, y) (0-based pixel centres)."""
    ny, nx = shape
    return flux * np.outer(erf_profile(np.arange(ny) - y, sigma), erf_profile(np.arange(nx) - x, sigma))


def epoch_slice(stack, k: int):
    """The single-epoch view of a stack (every EpochStack leaf has a leading epoch axis)."""
    return jax.tree_util.tree_map(lambda x: x[k], stack)


TARGET = SkyCoord(150.1163 * u.deg, 2.2058 * u.deg, frame="icrs")


def point_source_epochs(fluxes, *, fwhm_px: float, offset=(0.0, 0.0), seed: int = 0, n_reference: int = 2,
                        noise: float = 10.0, sky: float = 50.0, size: int = 17) -> list[Epoch]:
    """Epochs of a Gaussian point source (``fluxes`` per epoch, image units = nJy) at ``offset``
    arcsec from TARGET on flat sky, 1"/px, the native PSF written exactly; the pointing, hence
    the source's sub-pixel phase, moves from epoch to epoch. The first ``n_reference`` are references."""
    rng = np.random.default_rng(seed)
    out = []
    for k, f in enumerate(fluxes):
        wcs = make_wcs(TARGET, std_cd(1.0), (8.0 + 0.137 * k, 8.0 - 0.113 * k))
        pos = world_to_pixel(wcs, astropy_tangent_offsets_to_sky(TARGET, np.asarray(offset)))[0]
        img = gaussian_image((size, size), pos[0], pos[1], f, fwhm_px * FWHM_TO_SIGMA) + sky
        out.append(Epoch(
            image=img + rng.normal(0.0, noise, img.shape), variance=np.full(img.shape, noise**2),
            mask=np.zeros(img.shape, bool), psf=gaussian_psf(fwhm=fwhm_px, size=21), wcs=wcs,
            mjd=60100.0 + k, band="r", zeropoint=31.4, exposure_id=f"e{k}", is_reference=(k < n_reference),
        ))
    return out


# ------------------------------------------------------------------- 1. local_affine vs astropy
GRID_CASES = {
    # name: (cd, crpix (FITS, 1-based), CRVAL offset from target in arcsec (dRA*cos, dDec))
    "shifted_0.26": (std_cd(0.26), (101.37, 98.71), (0.9, -1.3)),
    "rot30_1.0": (std_cd(1.0, 30.0), (50.5, 50.5), (3.0, 2.0)),
    "rot137_1.01": (std_cd(1.01, 137.0), (12.82, 40.11), (-5.0, 7.5)),
    "ztf_flip_1.01": (np.diag([-1.01, -1.01]) / 3600.0, (3040.6, 3080.2), (-20.0, 15.0)),
    "rescaled_anisotropic": (np.diag([-0.26, 0.27]) / 3600.0 @ rot(5.0), (1.7, 2.2), (0.0, 0.0)),
}


@pytest.mark.parametrize("name", list(GRID_CASES))
def test_local_affine_matches_astropy_tan(name):
    cd, crpix, (dx, dy) = GRID_CASES[name]
    crval = TARGET.spherical_offsets_by(dx * u.arcsec, dy * u.arcsec)
    wcs = make_wcs(crval, cd, crpix)
    offsets = random_offsets(np.random.default_rng(1))
    assert affine_error(wcs, TARGET, offsets) < 0.01
    # p0 is astropy's pixel of the target itself, and A's determinant is the pixel area
    p0, a = local_affine(wcs, TARGET)
    np.testing.assert_allclose(p0, world_to_pixel(wcs, TARGET), atol=1e-6)
    np.testing.assert_allclose(abs(np.linalg.det(a)), 1.0 / abs(np.linalg.det(cd * 3600.0)), rtol=1e-5)


def test_local_affine_matches_astropy_sip():
    wcs = sip_wcs_with_target_at(TARGET, (20.3, 19.6))
    p0, a = local_affine(wcs, TARGET)
    np.testing.assert_allclose(p0, [20.3, 19.6], atol=1e-3)
    # the distortion is noticeable: the Jacobian differs from the CD matrix by a few per cent
    a_lin = np.linalg.inv(std_cd(1.0, 11.0) * 3600.0)
    assert np.max(np.abs(a - a_lin)) > 0.01
    offsets = random_offsets(np.random.default_rng(2))
    assert affine_error(wcs, TARGET, offsets) < 0.01
    # ... and ignoring it would be wrong by far more than 0.01 px at 10 arcsec
    truth = world_to_pixel(wcs, offsets_to_sky(TARGET, offsets))
    assert np.max(np.hypot(*(p0 + offsets @ a_lin.T - truth).T)) > 0.1


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    angle=st.floats(0.0, 360.0),
    scale=st.floats(0.1, 2.0),
    flip=st.booleans(),
    crpix=st.tuples(st.floats(-300.0, 300.0), st.floats(-300.0, 300.0)),
    crval_off=st.tuples(st.floats(-60.0, 60.0), st.floats(-60.0, 60.0)),
    dec=st.floats(-88.0, 88.0),
    ra=st.floats(0.0, 359.999),
)
def test_local_affine_matches_astropy_property(angle, scale, flip, crpix, crval_off, dec, ra):
    target = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
    cd = std_cd(scale, angle)
    if flip:
        cd = cd @ np.diag([-1.0, 1.0])
    crval = target.spherical_offsets_by(crval_off[0] * u.arcsec, crval_off[1] * u.arcsec)
    wcs = make_wcs(crval, cd, crpix)
    offsets = random_offsets(np.random.default_rng(3))
    assert affine_error(wcs, target, offsets) < 0.01


@pytest.mark.parametrize(
    "target",
    [
        TARGET,
        SkyCoord(359.9995 * u.deg, -0.0003 * u.deg),  # RA wrap at the equator
        SkyCoord(0.0002 * u.deg, 45.0 * u.deg),
        SkyCoord(123.4 * u.deg, 89.998 * u.deg),  # 7 arcsec from the pole
        SkyCoord(271.0 * u.deg, -89.9 * u.deg),
    ],
    ids=["cosmos", "ra_wrap", "ra0_dec45", "north_pole", "south_pole"],
)
def test_tangent_offsets_round_trip_and_astropy_tan(target):
    rng = np.random.default_rng(4)
    offsets = np.concatenate([random_offsets(rng, 50, 30.0), [[0.0, 0.0], [1e-9, 0.0], [0.0, -25.0]]])
    sky = offsets_to_sky(target, offsets)
    np.testing.assert_allclose(sky_to_offsets(target, sky), offsets, rtol=0, atol=1e-6)
    # xi towards East, eta towards North: the same as astropy's own TAN projection at the target
    ref = astropy_tangent_offsets_to_sky(target, offsets)
    assert np.max(sky.separation(ref).to_value(u.arcsec)) < 1e-6
    np.testing.assert_allclose(sky_to_offsets(target, ref), offsets, rtol=0, atol=1e-6)
    # and the other way round: sky -> offsets -> sky
    back = offsets_to_sky(target, sky_to_offsets(target, ref))
    assert np.max(back.separation(ref).to_value(u.arcsec)) < 1e-6


def test_offsets_directions():
    east = TARGET.spherical_offsets_by(2.0 * u.arcsec, 0 * u.arcsec)
    north = TARGET.spherical_offsets_by(0 * u.arcsec, 3.0 * u.arcsec)
    np.testing.assert_allclose(sky_to_offsets(TARGET, east), [2.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(sky_to_offsets(TARGET, north), [0.0, 3.0], atol=1e-6)


def test_parse_coord():
    a = parse_coord(150.1163, 2.2058)
    b = parse_coord("150.1163", "2.2058")
    c = parse_coord("10:00:27.912", "+02:12:20.88")
    d = parse_coord("150d06m58.68s", "2d12m20.88s")
    for other in (b, c, d):
        assert a.separation(other).to_value(u.arcsec) < 1e-3
    with pytest.raises(ValueError, match="cannot parse"):
        parse_coord("nonsense", "2.2")


# ------------------------------------------------------------ 2./3. rendering in several epochs
# name: (wcs builder, is_reference); images are 40 x 40, targets near the centre
def _tan_epoch_wcs(cd, crpix, crval_off):
    crval = TARGET.spherical_offsets_by(crval_off[0] * u.arcsec, crval_off[1] * u.arcsec)
    return make_wcs(crval, cd, crpix)


EPOCH_WCS = {
    "north_up_1.0": lambda: _tan_epoch_wcs(std_cd(1.0), (20.5, 21.5), (0.0, 0.0)),
    "shifted_0.26": lambda: _tan_epoch_wcs(std_cd(0.26), (21.37, 19.72), (0.4, -0.3)),
    "rot30_1.01": lambda: _tan_epoch_wcs(std_cd(1.01, 30.0), (19.83, 20.29), (1.1, 0.7)),
    "rot137_0.26": lambda: _tan_epoch_wcs(std_cd(0.26, 137.0), (20.61, 21.13), (-0.5, 0.8)),
    "ztf_flip_1.01": lambda: _tan_epoch_wcs(np.diag([-1.01, -1.01]) / 3600.0, (20.14, 19.57), (2.0, -1.5)),
    "sip_1.0": lambda: sip_wcs_with_target_at(TARGET, (19.4, 20.7)),
}
SOURCE_OFFSET = np.array([1.3, -0.7])  # arcsec (xi East, eta North)
FLUX = 1000.0  # nJy


@pytest.fixture(scope="module")
def render_ds():
    epochs = []
    wcss = {}
    for k, (name, build) in enumerate(EPOCH_WCS.items()):
        wcs = build()
        wcss[name] = wcs
        epochs.append(
            Epoch(
                image=np.zeros((40, 40)), variance=np.ones((40, 40)), mask=np.zeros((40, 40), bool),
                psf=gaussian_psf(fwhm=PSF_FWHM, size=25), wcs=wcs, mjd=60000.0 + k, band="r",
                zeropoint=31.4, exposure_id=name, is_reference=(k == 0),
            )
        )
    ds = make_dataset(epochs, TARGET, fit_radius=5.0, pad_epochs=False)
    return ds, wcss


def _epoch(ds, name):
    row = ds.epochs[list(ds.epochs["exposure_id"]).index(name)]
    return epoch_slice(ds.stacks[row["stack"]], int(row["slot"])), np.array([row["x0"], row["y0"]], float)


def _expected_pixel(wcs, origin, offset) -> np.ndarray:
    """astropy's pixel of the tangent-plane ``offset`` in the stack's (cropped) frame."""
    sky = astropy_tangent_offsets_to_sky(TARGET, offset)
    return world_to_pixel(wcs, sky)[0] - origin


def _fit_gaussian(img: np.ndarray, sigma: float, start) -> np.ndarray:
    def resid(p):
        return (gaussian_image(img.shape, p[0], p[1], p[2], sigma) - img).ravel()

    sol = optimize.least_squares(resid, [start[0], start[1], img.sum()], xtol=1e-12, ftol=1e-12)
    return sol.x


@pytest.mark.parametrize("name", list(EPOCH_WCS))
def test_point_source_lands_where_astropy_says(render_ds, name):
    ds, wcss = render_ds
    ep, origin = _epoch(ds, name)
    img = np.asarray(point_sources(ep, jnp.asarray([SOURCE_OFFSET]), jnp.asarray([FLUX]), jnp.zeros(2)))
    want = _expected_pixel(wcss[name], origin, SOURCE_OFFSET)
    sigma = PSF_FWHM * FWHM_TO_SIGMA

    # (a) flux: exact over the periodic FFT box; within the returned image the sinc ringing of a
    # PSF with power at Nyquist (FWHM 2.5 px) leaks up to ~8e-5 (see the well-sampled test below)
    assert abs(img.sum() - FLUX) < 2e-4 * FLUX
    # (b) the analytic pixel-integrated Gaussian at astropy's position is the rendered image
    ref = gaussian_image(img.shape, want[0], want[1], FLUX, sigma)
    peak = ref.max()
    assert np.max(np.abs(img - ref)) < 2e-3 * peak
    # (c) least-squares position of the known PSF shape
    x, y, f = _fit_gaussian(img, sigma, want)
    assert np.hypot(x - want[0], y - want[1]) < 0.01
    assert abs(f - FLUX) < 1e-3 * FLUX
    # (d) centroid
    yy, xx = np.indices(img.shape)
    cen = np.array([(img * xx).sum(), (img * yy).sum()]) / img.sum()
    assert np.hypot(*(cen - want)) < 0.01


def test_point_source_flux_conserved_for_well_sampled_psf():
    """With a well-sampled ePSF (FWHM 3.5 px) the flux in the rendered image is exact to 1e-6."""
    epochs = [
        Epoch(
            image=np.zeros((40, 40)), variance=np.ones((40, 40)), mask=np.zeros((40, 40), bool),
            psf=gaussian_psf(fwhm=3.5, size=25), wcs=build(), mjd=60000.0 + k, band="r",
            zeropoint=31.4, exposure_id=name, is_reference=(k == 0),
        )
        for k, (name, build) in enumerate(EPOCH_WCS.items())
    ]
    ds = make_dataset(epochs, TARGET, fit_radius=5.0, pad_epochs=False)
    for name in EPOCH_WCS:
        ep, _ = _epoch(ds, name)
        img = np.asarray(point_sources(ep, jnp.asarray([SOURCE_OFFSET]), jnp.asarray([FLUX]), jnp.zeros(2)))
        assert abs(img.sum() - FLUX) < 1e-6 * FLUX, name


@pytest.mark.parametrize("oversample,refine,tol", [(4, True, 1e-4), (1, True, 2e-4), (1, False, None)])
def test_undersampled_point_source_needs_and_uses_a_finer_psf(oversample, refine, tol):
    """An ePSF of FWHM 0.9 px (seeing 0.9" on 1" pixels) is not the sinc interpolant of its native
    samples: rendered from those (``refine_psf=False``) the source is off the analytic
    pixel-integrated Gaussian by several per cent of its peak between pixel centres. Given 4 x
    finer (as PSFEx writes it), or refined from the native samples (``psf_refine``, the
    default), the source is shifted on the fine grid and decimated, and matches it in every
    epoch frame."""
    fwhm = 0.9
    psf = gaussian_psf(fwhm=fwhm, size=25 * oversample + (oversample + 1) % 2, oversample=oversample)
    epochs = [
        Epoch(
            image=np.zeros((40, 40)), variance=np.ones((40, 40)), mask=np.zeros((40, 40), bool),
            psf=psf, psf_oversample=oversample, wcs=build(), mjd=60000.0 + k, band="r",
            zeropoint=31.4, exposure_id=name, is_reference=(k == 0),
        )
        for k, (name, build) in enumerate(EPOCH_WCS.items())
        if not name.endswith("0.26")  # 0.26" pixels would make the PSF well sampled
    ]
    wcss = {e.exposure_id: e.wcs for e in epochs}
    ds = make_dataset(epochs, TARGET, fit_radius=5.0, pad_epochs=False, refine_psf=refine)
    errors = []
    for name, wcs in wcss.items():
        ep, origin = _epoch(ds, name)
        img = np.asarray(point_sources(ep, jnp.asarray([SOURCE_OFFSET]), jnp.asarray([FLUX]), jnp.zeros(2)))
        want = _expected_pixel(wcs, origin, SOURCE_OFFSET)
        ref = gaussian_image(img.shape, want[0], want[1], FLUX, fwhm * FWHM_TO_SIGMA)
        errors.append(np.max(np.abs(img - ref)) / ref.max())
        if tol is not None:  # the native PSF's ringing leaks ~1 % of the flux out of the cutout
            assert abs(img.sum() - FLUX) < 1e-4 * FLUX, name
    if tol is not None:
        assert max(errors) < tol, errors  # measured: 4x finer < 1e-4, refined 1.7-8.6e-5
    else:
        assert max(errors) > 5e-2, errors  # measured 9-15 %: why the finer PSF is needed


def test_native_and_finer_psfs_in_one_stack_render_the_same_source():
    """Epochs whose files give the same well-sampled PSF (FWHM 3 px) natively and 3x finer share a
    stack (held at the finer sampling; the native one interpolated onto it): both render the
    analytic source to the native PSF's own accuracy, in every frame."""
    fwhm = 3.0
    epochs = []
    for k, (name, build) in enumerate(EPOCH_WCS.items()):
        over = 3 if k % 2 else 1
        epochs.append(Epoch(
            image=np.zeros((40, 40)), variance=np.ones((40, 40)), mask=np.zeros((40, 40), bool),
            psf=gaussian_psf(fwhm=fwhm, size=25 * over, oversample=over), psf_oversample=over, wcs=build(),
            mjd=60000.0 + k, band="r", zeropoint=31.4, exposure_id=name, is_reference=(k == 0),
        ))
    ds = make_dataset(epochs, TARGET, fit_radius=5.0, pad_epochs=False)
    over_of = {e.exposure_id: e.psf_oversample for e in epochs}
    mixed = 0
    for s_idx, st in enumerate(ds.stacks):
        members = {over_of[r["exposure_id"]] for r in ds.epochs if r["stack"] == s_idx}
        assert st.psf_hat.shape[1] == max(members)
        mixed += members == {1, 3}
    assert mixed >= 1
    for e in epochs:
        ep, origin = _epoch(ds, e.exposure_id)
        img = np.asarray(point_sources(ep, jnp.asarray([SOURCE_OFFSET]), jnp.asarray([FLUX]), jnp.zeros(2)))
        want = _expected_pixel(e.wcs, origin, SOURCE_OFFSET)
        ref = gaussian_image(img.shape, want[0], want[1], FLUX, fwhm * FWHM_TO_SIGMA)
        assert np.max(np.abs(img - ref)) < 1e-3 * ref.max(), e.exposure_id
        assert abs(img.sum() - FLUX) < 1e-4 * FLUX, e.exposure_id


def test_point_source_in_all_epochs_with_shift(render_ds):
    """A per-epoch shift moves the source as an offset change does (same sky displacement)."""
    ds, wcss = render_ds
    shift = jnp.asarray([0.2, -0.35])
    for name in EPOCH_WCS:
        ep, origin = _epoch(ds, name)
        img = np.asarray(point_sources(ep, jnp.asarray([SOURCE_OFFSET]), jnp.asarray([FLUX]), shift))
        want = _expected_pixel(wcss[name], origin, SOURCE_OFFSET + np.asarray(shift))
        x, y, _ = _fit_gaussian(img, PSF_FWHM * FWHM_TO_SIGMA, want)
        assert np.hypot(x - want[0], y - want[1]) < 0.01, name


def _host_window(ds, values_fn) -> PixelHost:
    """A PixelHost whose model pixels hold ``values_fn(xi, eta)`` (nJy per model pixel)."""
    g = ds.grid
    hs = g.host_size
    idx = np.arange(hs) - hs // 2  # model-pixel offsets from the centre (the target)
    xx, yy = np.meshgrid(idx, idx)
    xi = -xx * float(g.scale)  # X = c - xi / scale
    eta = yy * float(g.scale)  # Y = c + eta / scale
    return PixelHost(image=jnp.asarray(values_fn(xi, eta))[None])


def _host_render(ds, host: PixelHost, ep) -> np.ndarray:
    lines = line_spectra(host.images(ds.grid))
    return np.asarray(host_on_epoch(lines[0], ep, ds.grid, jnp.zeros(2)))


BLOB_SIGMA = 0.4  # arcsec

# The host path's model-frame PSF uses the same trigonometric interpolation as point_sources, so
# the two paths agree to the sampler's accuracy (~1e-3 of the peak).


@pytest.fixture(scope="module")
def host_renders(render_ds):
    """Per epoch: (one model pixel at the target, point source there, Gaussian blob, analytic blob,
    astropy position of the blob centre, sigma of the analytic blob in px)."""
    ds, wcss = render_ds
    c = SOURCE_OFFSET

    def one_pixel(xi, eta):
        return np.where((xi == 0) & (eta == 0), FLUX, 0.0)

    def blob(xi, eta):
        g = np.exp(-((xi - c[0]) ** 2 + (eta - c[1]) ** 2) / (2 * BLOB_SIGMA**2))
        return FLUX * g / g.sum()

    pix_host, blob_host = _host_window(ds, one_pixel), _host_window(ds, blob)
    out = {}
    for name in EPOCH_WCS:
        ep, origin = _epoch(ds, name)
        pix = _host_render(ds, pix_host, ep)
        ps = np.asarray(point_sources(ep, jnp.zeros((1, 2)), jnp.asarray([FLUX]), jnp.zeros(2)))
        img = _host_render(ds, blob_host, ep)
        row = ds.epochs[list(ds.epochs["exposure_id"]).index(name)]
        # every test WCS is conformal, so the blob is circular in pixels too
        sigma = np.hypot(PSF_FWHM * FWHM_TO_SIGMA, BLOB_SIGMA / float(row["pixel_scale"]))
        want = _expected_pixel(wcss[name], origin, c)
        ref = gaussian_image(img.shape, want[0], want[1], FLUX, sigma)
        out[name] = dict(pix=pix, ps=ps, blob=img, ref=ref, want=want, sigma=sigma,
                         target=_expected_pixel(wcss[name], origin, np.zeros(2)))
    return out


@pytest.mark.parametrize("name", list(EPOCH_WCS))
def test_host_pixel_flux_and_position(host_renders, name):
    """One bright model pixel at the target: flux conserved to 1e-3, lands on astropy's pixel of
    the target to 0.01 px, and agrees with the point-source rendering to 1.5e-2 of the peak."""
    r = host_renders[name]
    img, ps = r["pix"], r["ps"]
    assert abs(img.sum() - FLUX) < 1e-3 * FLUX
    x, y, _ = _fit_gaussian(img, PSF_FWHM * FWHM_TO_SIGMA, r["target"])
    assert np.hypot(x - r["target"][0], y - r["target"][1]) < 0.01
    assert np.max(np.abs(img - ps)) < 1.5e-2 * ps.max()  # guard; the spec (2e-3) is below


@pytest.mark.parametrize("name", list(EPOCH_WCS))
def test_host_pixel_equals_point_source_to_2e3(host_renders, name):
    r = host_renders[name]
    assert np.max(np.abs(r["pix"] - r["ps"])) < 2e-3 * r["ps"].max()


@pytest.mark.parametrize("name", list(EPOCH_WCS))
def test_host_gaussian_blob_flux_and_position(host_renders, name):
    """A Gaussian blob (sigma 0.4") at (1.3, -0.7)" convolved with the Gaussian ePSF is a wider
    pixel-integrated Gaussian at astropy's pixel of the blob centre."""
    r = host_renders[name]
    img = r["blob"]
    assert abs(img.sum() - FLUX) < 1e-3 * FLUX
    x, y, _ = _fit_gaussian(img, r["sigma"], r["want"])
    assert np.hypot(x - r["want"][0], y - r["want"][1]) < 0.01
    assert np.max(np.abs(img - r["ref"])) < 1e-2 * r["ref"].max()  # guard; the spec is below


@pytest.mark.parametrize(
    "name",
    [n
     for n in EPOCH_WCS],
)
def test_host_gaussian_blob_matches_analytic_to_2e3(host_renders, name):
    r = host_renders[name]
    assert np.max(np.abs(r["blob"] - r["ref"])) < 2e-3 * r["ref"].max()


# ------------------------------------------------------------------------ 4. affine sampler
SAMPLER_M = 96  # model grid side of the sampler tests
SAMPLER_SOURCES = ((45.3, 50.1, 1.0), (40.0, 38.7, 0.5), (55.5, 52.2, 0.7))  # (x, y, amplitude)


def _gauss_scene(x, y, sigma):
    return sum(f * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2)) for x0, y0, f in SAMPLER_SOURCES)


def _affine(rot_deg: float, scale: float, flip: bool, shape=(40, 40)):
    """An epoch's pixel -> model-pixel map (rotation, scale, optional mirror) centred on the grid."""
    th = np.radians(rot_deg)
    mat = scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    if flip:
        mat = mat @ np.diag([-1.0, 1.0])
    off = np.array([SAMPLER_M / 2 + 0.37, SAMPLER_M / 2 - 0.21]) - mat @ np.array([shape[1] / 2 - 0.7, shape[0] / 2 + 0.7])
    return mat, off


def _sampled_vs_analytic(fwhm, rot_deg, scale=2.0, flip=True, shape=(40, 40)):
    sigma = fwhm * FWHM_TO_SIGMA
    yy, xx = np.mgrid[0:SAMPLER_M, 0:SAMPLER_M].astype(float)
    img = _gauss_scene(xx, yy, sigma)
    mat, off = _affine(rot_deg, scale, flip, shape)
    got = np.asarray(sample_affine(jnp.asarray(img), jnp.asarray(mat), jnp.asarray(off), shape))
    ey, ex = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    mx = off[0] + mat[0, 0] * ex + mat[0, 1] * ey
    my = off[1] + mat[1, 0] * ex + mat[1, 1] * ey
    want = _gauss_scene(mx, my, sigma)
    inside = (mx > 8) & (mx < SAMPLER_M - 9) & (my > 8) & (my < SAMPLER_M - 9)  # off the padding
    assert inside.sum() > 0.25 * shape[0] * shape[1]
    return np.max(np.abs(got - want)[inside])


@pytest.mark.parametrize("rot", [0.0, 10.0, 30.0, 45.0, 60.0, 90.0, 135.0, 180.0, 200.0, 315.0])
def test_sample_affine_matches_analytic_gaussians_at_any_rotation(rot):
    """A band-limited image (Gaussians of FWHM 4 model px, the default model grid's finest case)
    sampled on a rotated, mirrored, 2x coarser grid: < 3e-4 of the peak at every angle."""
    assert _sampled_vs_analytic(4.0, rot) < 3e-4


@pytest.mark.parametrize("rot, tol", [(0.0, 3e-4), (20.0, 1e-3), (45.0, 1e-2)])
def test_sample_affine_undersampled_image(rot, tol):
    """At 3 model px FWHM the image itself aliases slightly (1e-4 axis-aligned) and the lines at
    45 degrees more (documented: 6e-3)."""
    assert _sampled_vs_analytic(3.0, rot, flip=False) < tol


def test_sample_affine_axis_aligned_is_exact_for_wide_images():
    assert _sampled_vs_analytic(6.0, 0.0, scale=1.7, shape=(30, 50)) < 1e-10


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rot=st.floats(0.0, 360.0), scale=st.floats(1.2, 3.0), flip=st.booleans())
def test_sample_affine_property_any_affine_map(rot, scale, flip):
    assert _sampled_vs_analytic(5.0, rot, scale=scale, flip=flip, shape=(24, 24)) < 1e-4


def test_sample_affine_gradients_match_finite_differences():
    """d/d(offset) and d/d(matrix) (how shifts and positions are fitted) against central
    differences, and d/d(image) through the transpose (the linear solves) by the dot-product test."""
    sigma = 4.5 * FWHM_TO_SIGMA
    yy, xx = np.mgrid[0:SAMPLER_M, 0:SAMPLER_M].astype(float)
    img = jnp.asarray(_gauss_scene(xx, yy, sigma))
    mat, off = _affine(23.0, 2.0, True)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(20, 20)))

    def loss(mt, of):
        return jnp.sum(weights * sample_affine(img, mt, of, (20, 20)))

    g_mat, g_off = jax.grad(loss, argnums=(0, 1))(jnp.asarray(mat), jnp.asarray(off))
    h = 1e-5
    for i in range(2):
        e = np.zeros(2)
        e[i] = h
        fd = (loss(jnp.asarray(mat), jnp.asarray(off + e)) - loss(jnp.asarray(mat), jnp.asarray(off - e))) / (2 * h)
        np.testing.assert_allclose(float(g_off[i]), float(fd), rtol=1e-6)
    e = np.zeros((2, 2))
    e[1, 0] = h
    fd = (loss(jnp.asarray(mat + e), jnp.asarray(off)) - loss(jnp.asarray(mat - e), jnp.asarray(off))) / (2 * h)
    np.testing.assert_allclose(float(g_mat[1, 0]), float(fd), rtol=1e-6)
    # the transpose (d/d image) satisfies <A u, v> = <u, A^T v>
    u_img = jnp.asarray(np.random.default_rng(4).normal(size=(SAMPLER_M, SAMPLER_M)))
    fwd = lambda im: sample_affine(im, jnp.asarray(mat), jnp.asarray(off), (20, 20))  # noqa: E731
    (at_v,) = jax.linear_transpose(fwd, u_img)(weights)
    np.testing.assert_allclose(float(jnp.sum(fwd(u_img) * weights)), float(jnp.sum(u_img * at_v)), rtol=1e-10)


# ----------------------------------------------------------------- 5. fit vs closed-form bound
FIT_FWHM = 3.0  # px
FIT_NOISE = 20.0  # nJy per pixel (1 unit = 1 nJy at zeropoint 31.4)
FIT_SIZE = 21
FIT_OFFSET = np.array([0.3, -0.2])  # arcsec
FIT_FLUX = np.array([0.0, 0.0, 3000.0, 5000.0, 1500.0, 800.0])  # two references first
FIT_RADIUS = 5.0


def _fit_epochs(seed: int) -> list[Epoch]:
    rng = np.random.default_rng(seed)
    wcs = make_wcs(TARGET, std_cd(1.0), (11.0, 11.0))  # target on pixel (10, 10)
    pos = world_to_pixel(wcs, astropy_tangent_offsets_to_sky(TARGET, FIT_OFFSET))[0]
    psf = gaussian_psf(fwhm=FIT_FWHM, size=25)
    out = []
    for k, f in enumerate(FIT_FLUX):
        sky = rng.uniform(50.0, 200.0)
        truth = gaussian_image((FIT_SIZE, FIT_SIZE), pos[0], pos[1], f, FIT_FWHM * FWHM_TO_SIGMA) + sky
        image = truth + rng.normal(0.0, FIT_NOISE, truth.shape)
        out.append(
            Epoch(
                image=image, variance=np.full(truth.shape, FIT_NOISE**2), mask=np.zeros(truth.shape, bool),
                psf=psf, wcs=wcs, mjd=60100.0 + k, band="r", zeropoint=31.4,
                exposure_id=f"e{k}", is_reference=(k < 2),
            )
        )
    return out


def _bounds(ds) -> tuple[float, float]:
    """(sigma0, sigma_host): flux error bounds of one science epoch (all epochs alike).

    sigma0: known position and PSF, marginalised over the epoch's sky level (exact 2x2 Fisher).
    sigma_host: also marginalised over a free static scene (any image, one value per pixel): the
    transient's flux is then measured relative to the reference epochs, whose PSF-weighted
    mean at the transient carries variance sigma0^2 / n_ref.
    """
    row = ds.epochs[2]
    st = ds.stacks[row["stack"]]
    k = int(row["slot"])
    w = np.asarray(st.weight[k])
    p = np.asarray(point_sources(epoch_slice(st, k), jnp.asarray([FIT_OFFSET]), jnp.ones(1), jnp.zeros(2)))
    fisher = np.array([[np.sum(w * p * p), np.sum(w * p)], [np.sum(w * p), np.sum(w)]])
    sigma0 = float(np.sqrt(np.linalg.inv(fisher)[0, 0]))
    n_ref = int(np.sum(ds.epochs["is_reference"]))
    return sigma0, sigma0 * np.sqrt(1.0 + 1.0 / n_ref)


def _exact_host_marginal_bound(ds) -> float:
    """The same bound by brute force: Fisher matrix of [per-pixel static scene, fluxes, skies]."""
    rows = list(ds.epochs)
    st = ds.stacks[rows[0]["stack"]]
    w = np.asarray(st.weight[int(rows[0]["slot"])])
    use = w > 0
    npix = int(use.sum())
    p = np.asarray(point_sources(epoch_slice(st, 0), jnp.asarray([FIT_OFFSET]), jnp.ones(1), jnp.zeros(2)))[use]
    ne = len(rows)
    sci = [i for i, r in enumerate(rows) if not r["is_reference"]]
    # columns: host pixels, science fluxes, skies (the last sky is dropped: degenerate with host)
    ncol = npix + len(sci) + ne - 1
    design = np.zeros((ne * npix, ncol))
    for e in range(ne):
        rs = slice(e * npix, (e + 1) * npix)
        design[rs, :npix] = np.eye(npix)
        if e in sci:
            design[rs, npix + sci.index(e)] = p
        if e < ne - 1:
            design[rs, npix + len(sci) + e] = 1.0
    fisher = design.T @ design * w[use][0]
    cov = np.linalg.inv(fisher)
    return float(np.sqrt(cov[npix, npix]))


@pytest.fixture(scope="module")
def fit_results():
    out = []
    for seed in (11, 12):  # the first fit compiles (~20-30 s); the second takes ~3 s
        ds = make_dataset(_fit_epochs(seed), TARGET, fit_radius=FIT_RADIUS, pad_epochs=False)
        t0 = time.perf_counter()
        res = fit(ds)
        out.append((ds, res, time.perf_counter() - t0))
    return out


def test_fit_flux_errors_reach_the_closed_form_bound(fit_results):
    ds, res, _ = fit_results[0]
    assert res.converged
    sigma0, sigma_host = _bounds(ds)
    np.testing.assert_allclose(_exact_host_marginal_bound(ds), sigma_host, rtol=1e-6)
    lc = res.lightcurve()
    sci = ~np.asarray(lc["is_reference"])
    err = np.asarray(lc["flux_err"])[sci]
    ratio = err / sigma_host
    # the fit also frees the transient position and the science epochs' shifts: a small
    # inflation, never a deflation below the bound
    assert np.all(ratio >= 0.999), ratio
    assert np.all(ratio < 1.10), ratio
    # against the naive [flux, sky] bound (host known to be zero) the inflation is
    # sqrt(1 + 1/n_ref) = 1.22: the free host absorbs any constant point source at the
    # transient, so fluxes are measured relative to the two reference epochs
    np.testing.assert_allclose(err / sigma0, np.sqrt(1.5), rtol=0.10)


@pytest.fixture(scope="module")
def method_results(fit_results):
    """The first data set refitted with the other error methods (same MAP, other errors)."""
    ds, res, _ = fit_results[0]
    return {m: fit(ds, method=m) for m in ("linear", "map")} | {"laplace": res}


def test_linear_errors_equal_the_host_marginal_bound(fit_results, method_results):
    """Geometry fixed at the MAP: the flux errors are those of the linear model, i.e. the exact
    closed-form bound with a free static scene (the weak host prior moves them by < 0.5 %)."""
    ds, _, _ = fit_results[0]
    _, sigma_host = _bounds(ds)
    lin = method_results["linear"]
    assert lin.converged and lin.method == "linear"
    lc = lin.lightcurve()
    sci = ~np.asarray(lc["is_reference"])
    np.testing.assert_allclose(np.asarray(lc["flux_err"])[sci], sigma_host, rtol=5e-3)
    assert lc.meta["method"] == "linear" and "geometry fixed" in lc.meta["uncertainty"]
    # position held fixed: no error claimed for it
    assert np.all(np.isnan(lin.position_cov))
    # the same MAP whatever the error method
    np.testing.assert_allclose(np.asarray(lc["flux"]), np.asarray(method_results["laplace"].lightcurve()["flux"]))
    # laplace adds the position and shift uncertainty: never smaller
    lap = np.asarray(method_results["laplace"].lightcurve()["flux_err"])[sci]
    assert np.all(lap >= np.asarray(lc["flux_err"])[sci] * (1 - 1e-4))


def test_map_errors_equal_the_known_host_bound(fit_results, method_results):
    """``map``: errors conditional on the host and geometry = the [flux, sky] closed form, and
    no covariance between epochs."""
    ds, _, _ = fit_results[0]
    sigma0, _ = _bounds(ds)
    res = method_results["map"]
    lc = res.lightcurve()
    sci = ~np.asarray(lc["is_reference"])
    np.testing.assert_allclose(np.asarray(lc["flux_err"])[sci], sigma0, rtol=1e-3)
    cov = res.epoch_covariance()
    np.testing.assert_array_equal(cov, np.diag(np.diag(cov)))
    assert "lower bound" in lc.meta["uncertainty"]


def test_masked_at_transient_flags_exactly_the_masked_epoch():
    """An epoch whose pixels around the transient are masked gets MASKED_AT_TRANSIENT (16);
    the others do not."""
    eps = _fit_epochs(11)
    x, y = world_to_pixel(eps[3].wcs, astropy_tangent_offsets_to_sky(TARGET, FIT_OFFSET))[0]
    mask = np.zeros(eps[3].image.shape, bool)
    mask[int(round(y)) - 3:int(round(y)) + 4, int(round(x)) - 3:int(round(x)) + 4] = True
    eps[3] = dataclasses.replace(eps[3], mask=mask)
    res = fit(make_dataset(eps, TARGET, fit_radius=FIT_RADIUS, pad_epochs=False), method="map")
    flags = np.asarray(res.lightcurve()["flags"])
    assert [bool(f & 16) for f in flags] == [i == 3 for i in range(len(eps))], flags


def test_fit_rejects_an_unknown_method(fit_results):
    with pytest.raises(ValueError, match="method must be one of linear, map, laplace, nuts; got 'mcmc'"):
        fit(fit_results[0][0], method="mcmc")


def test_fit_pulls_are_sane(fit_results):
    pulls = []
    for ds, res, _ in fit_results:
        assert res.converged
        lc = res.lightcurve()
        sci = ~np.asarray(lc["is_reference"])
        flux = np.asarray(lc["flux"])[sci]
        err = np.asarray(lc["flux_err"])[sci]
        pulls.append((flux - FIT_FLUX[sci]) / err)
        pos_err = np.sqrt(np.diag(res.position_cov))
        assert np.all(pos_err < 0.15), pos_err
        assert np.all(np.abs(res.transient_offset - FIT_OFFSET) < 4 * pos_err), (res.transient_offset, pos_err)
        assert np.all(np.asarray(lc["flux"])[~sci] == 0.0)
    pulls = np.concatenate(pulls)
    assert np.all(np.abs(pulls) < 4.0), pulls
    assert 0.2 < np.mean(pulls**2) < 2.5, pulls


def test_block_cg_solves_many_right_hand_sides_including_dependent_and_zero_ones():
    """Block PCG against a dense solve on an ill-conditioned SPD system (condition 1e4) with
    duplicated, scaled and zero right-hand sides, and a diagonal preconditioner that is only
    approximate: every solution to the requested relative residual, in fewer iterations than
    the slowest single-vector PCG."""
    from transcene.solve import _block_pcg, _pcg

    rng = np.random.default_rng(11)
    n = 300
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.logspace(0, 4, n)
    a = (q * lam) @ q.T
    a = 0.5 * (a + a.T)
    b = rng.normal(size=(8, n))
    b = np.concatenate([b, b[:2], 1e-3 * b[2:3], np.zeros((2, n))])  # dependent, tiny, zero rows
    dinv = jnp.asarray(1.0 / np.diag(a))
    apply_a = lambda v: jnp.asarray(a) @ v  # noqa: E731
    precond = lambda r: dinv * r  # noqa: E731
    tol = 1e-8
    x, its, res = _block_pcg(apply_a, jnp.asarray(b), precond, tol, 2000)
    want = np.linalg.solve(a, b.T).T
    assert float(res) <= tol
    resid = np.linalg.norm(b - np.asarray(x) @ a, axis=1) / (np.linalg.norm(b, axis=1) + 1e-300)
    assert np.all(resid <= 1.5 * tol)
    np.testing.assert_allclose(np.asarray(x)[-2:], 0.0)
    err = np.linalg.norm(np.asarray(x) - want, axis=1) / (np.linalg.norm(want, axis=1) + 1e-300)
    assert np.all(err[:-2] < 1e-4)  # at most condition x residual
    # measured: 104 block iterations; 663-683 for each single solve (more than n: rounding)
    single = min(int(_pcg(apply_a, jnp.asarray(r), precond, jnp.zeros(n), tol, 2000)[1]) for r in b[:8])
    assert int(its) < single / 2


@pytest.mark.parametrize("eta", [0.1, 0.25, 0.5])
def test_truncated_cg_stops_exactly_where_the_quadratic_model_rule_says(eta):
    """The truncated (Nash-Sofer) PCG returns the k-th CG iterate, k the first iteration with
    ``k (q_{k-1} - q_k) <= eta |q_k|`` for ``q(x) = x.A x / 2 - b.x``: checked against the
    iterates of untruncated runs capped at k-2, k-1 and k iterations, with q computed densely."""
    from transcene.solve import _pcg

    rng = np.random.default_rng(5)
    n = 200
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * np.logspace(0, 4, n)) @ q.T
    a = 0.5 * (a + a.T)
    b = rng.normal(size=n)
    dinv = jnp.asarray(1.0 / np.diag(a))
    apply_a = lambda v: jnp.asarray(a) @ v  # noqa: E731
    precond = lambda r: dinv * r  # noqa: E731
    x, k, _ = _pcg(apply_a, jnp.asarray(b), precond, jnp.zeros(n), 1e-12, 1000, eta)
    k = int(k)
    assert 3 <= k < 150  # truncated well before the residual test (which needs > 200 here)

    def quad(m):
        xm = np.asarray(_pcg(apply_a, jnp.asarray(b), precond, jnp.zeros(n), 1e-12, m)[0])
        return 0.5 * xm @ a @ xm - b @ xm, xm

    (q2, _), (q1, _), (q0, x0) = quad(k - 2), quad(k - 1), quad(k)
    np.testing.assert_allclose(np.asarray(x), x0, rtol=1e-10, atol=1e-14)
    assert k * (q1 - q0) <= eta * abs(q0) * (1 + 1e-9)
    assert (k - 1) * (q2 - q1) > eta * abs(q1)
    # the model decrease already made is most of the full one (the point of the rule)
    q_star = -0.5 * b @ np.linalg.solve(a, b)
    assert q0 / q_star > 1 - 2 * eta


def test_nystrom_flux_covariance_is_close_to_and_below_the_exact_one(fit_results):
    """With fewer probes than free epochs the host term is a Nystrom approximation of a PSD
    matrix: never above the exact one (Loewner order), and close because its spectrum falls
    steeply."""
    from transcene.solve import Priors, flux_covariance, prior_arrays

    ds, res, _ = fit_results[0]
    pa = prior_arrays(ds, Priors(), np.zeros((0, 2)))
    exact, *_ = flux_covariance(res.scene, ds.stacks, ds.grid, pa, probes=64)
    np.testing.assert_allclose(np.diag(exact), np.diag(res.flux_cov), rtol=1e-6)
    # the order is a property of the exact solves: at the default CG tolerance (1e-2) their
    # errors alone can break it by ~1e-4 of the largest entry, so both are solved tightly here
    exact, *_ = flux_covariance(res.scene, ds.stacks, ds.grid, pa, probes=64, tol=1e-7)
    approx, *_ = flux_covariance(res.scene, ds.stacks, ds.grid, pa, probes=2, tol=1e-7)
    diff = exact - approx
    assert np.linalg.eigvalsh(0.5 * (diff + diff.T)).min() > -1e-6 * np.abs(exact).max()
    np.testing.assert_allclose(np.sqrt(np.diag(approx)), np.sqrt(np.diag(exact)), rtol=0.02)


def test_the_psf_sharpness_probe_finds_what_random_probes_miss():
    """``solve._probe_directions``: beyond each band's indicator, the exact host term ``M``'s
    next direction follows the epochs' PSF sharpness, so a Nystrom approximation from the
    indicator and that deviation misses less of M than one from the indicator and a Gaussian
    probe (here: than any of 8 Gaussian draws). At the initial scene: M's structure comes from
    the PSFs and the geometry, not from the host's values."""
    from transcene.fit import initial_scene
    from transcene.simulate import SimulationConfig, simulate
    from transcene.solve import Priors, _free_epochs, _probe_directions, flux_covariance, prior_arrays

    cfg = SimulationConfig(n_epochs=16, n_reference=3, size=16, psf_size=15, bands=("r",), seeing_fwhm=(1.5, 3.0),
                           seed=5)
    epochs, truth = simulate(cfg)
    target = SkyCoord(truth.meta["transient_ra"] * u.deg, truth.meta["transient_dec"] * u.deg)
    ds = make_dataset(epochs, target, pad_epochs=False)
    pa = prior_arrays(ds, Priors(), np.zeros((0, 2)))
    cov, local_var, *_ = flux_covariance(initial_scene(ds), ds.stacks, ds.grid, pa, probes=64, tol=1e-8)
    m = cov - np.diag(local_var[:, 0])
    free = _free_epochs(ds.stacks)
    known = _probe_directions(ds.stacks, free)
    assert known.shape == (cov.shape[0], 2)  # one band: its indicator and its sharpness deviation
    sharp = 1.0 / np.concatenate([np.asarray(st.psf_var) for st in ds.stacks])
    assert abs(np.corrcoef(known[free, 1], sharp[free])[0, 1]) > 0.999
    _, vec = np.linalg.eigh(m[np.ix_(free, free)])
    assert abs(np.corrcoef(vec[:, -2], sharp[free])[0, 1]) > 0.9

    def missed(omega):  # the share of M's trace that the Nystrom approximation leaves out
        y = m @ omega
        return np.trace(m - y @ np.linalg.pinv(omega.T @ y) @ y.T) / np.trace(m)

    ours = missed(known)
    rng = np.random.default_rng(0)
    for _ in range(8):
        gauss = np.zeros(cov.shape[0])
        gauss[free] = rng.normal(size=free.size)
        assert ours < missed(np.stack([known[:, 0], gauss], axis=1))


def test_single_precision_linearisation_is_the_double_one_to_float32_rounding(fit_results):
    """The mixed-precision operator: its jvp equals the float64 one to float32 rounding, and its
    vjp is that jvp's exact transpose (a dot-product test), so the reduced operator stays
    symmetric and CG sees a consistent (slightly perturbed) linear problem."""
    from jax.flatten_util import ravel_pytree

    from transcene.solve import _linearised_model

    ds, res, _ = fit_results[0]
    jvp64, _ = _linearised_model(res.scene, ds.stacks, ds.grid, single=False)
    jvp32, vjp32 = _linearised_model(res.scene, ds.stacks, ds.grid, single=True)
    flat, unravel = ravel_pytree(res.scene.glob)
    rng = np.random.default_rng(3)
    v = unravel(jnp.asarray(rng.normal(size=flat.shape)))
    a64, a32 = jvp64(v)[0], jvp32(v)[0]
    assert a32.dtype == jnp.float64  # converted back at the boundary
    rel = float(jnp.linalg.norm(a32 - a64) / jnp.linalg.norm(a64))
    assert 1e-9 < rel < 1e-5, rel  # > 1e-9: it really ran in single precision
    u_img = jnp.asarray(rng.normal(size=a64.shape))
    lhs = float(jnp.vdot(u_img, a32))
    rhs = float(jnp.vdot(ravel_pytree(vjp32((u_img,))[0])[0], ravel_pytree(v)[0]))
    assert abs(lhs - rhs) < 1e-5 * float(jnp.linalg.norm(u_img) * jnp.linalg.norm(a32)), (lhs, rhs)


# a second full fit in float64 (24 s on 2 cores): slow, to keep the default run within CI's ~10
# minutes; the fast test above checks the mixed-precision operator itself against float64
@pytest.mark.slow
def test_mixed_precision_fit_equals_the_double_precision_fit(fit_results):
    """``mixed_precision`` (the default) only changes how the CG solves apply the operator:
    the same MAP and the same errors as float64 throughout, far inside their own accuracy."""
    from jax.flatten_util import ravel_pytree

    from transcene.solve import _DENSE_MAX

    ds, res, _ = fit_results[0]
    assert ravel_pytree(res.scene.glob)[0].size > _DENSE_MAX  # the iterative (mixed) path
    double = fit(ds, mixed_precision=False)
    a, b = res.lightcurve(), double.lightcurve()
    assert a.meta["solver_precision"].startswith("mixed") and b.meta["solver_precision"] == "float64"
    sci = ~np.asarray(b["is_reference"])
    err = np.asarray(b["flux_err"])[sci]
    assert np.max(np.abs(np.asarray(a["flux"])[sci] - np.asarray(b["flux"])[sci]) / err) < 1e-3
    np.testing.assert_allclose(np.asarray(a["flux_err"])[sci], err, rtol=1e-4)


@pytest.mark.parametrize("nuisances", [False, True])
def test_newton_step_is_the_exact_hessian_step(fit_results, nuisances):
    """``gauss_newton_step(newton=True)`` solves the exact Newton system: its step equals
    ``-H^-1 grad`` with H the objective's Hessian formed densely by automatic differentiation
    (second-order residual terms included), off the optimum where the residuals are not small;
    with the zero-point and PSF-width nuisances free too. The Gauss-Newton step there differs
    from it by far more than the tolerance, so the test sees the second-order terms."""
    from jax.flatten_util import ravel_pytree

    from transcene.solve import Priors, _DENSE_MAX, gauss_newton_step, objective, prior_arrays

    ds, res, _ = fit_results[0]
    if nuisances:
        ds = make_dataset(_fit_epochs(11), TARGET, fit_radius=FIT_RADIUS, pad_epochs=False, zp_jitter=0.02,
                          psf_width_jitter=0.03)
    pa = prior_arrays(ds, Priors(), np.zeros((0, 2)))
    scene = res.scene
    scene = eqx.tree_at(lambda s: s.glob.position, scene, scene.glob.position + jnp.asarray([0.08, -0.06]))
    free_shift = [np.asarray(st.shift_prec) < 1e10 for st in ds.stacks]  # the reference epochs' are pinned
    assert sum(int(fs.sum()) for fs in free_shift) >= 3
    wobble = lambda amp, k, fs: (amp * fs * np.cos(np.arange(fs.size) + k))[:, None]  # noqa: E731
    scene = eqx.tree_at(lambda s: s.local, scene, tuple(
        loc.at[:, 2:4].add(wobble(0.04, 0, fs)).at[:, 4:6].add(wobble(0.01, 1, fs) if nuisances else 0.0)
        for loc, fs in zip(scene.local, free_shift)))
    flat, unravel = ravel_pytree(scene)
    assert ravel_pytree(scene.glob)[0].size > _DENSE_MAX  # the matrix-free path
    f = lambda x: objective(unravel(x), ds.stacks, ds.grid, pa)  # noqa: E731
    grad = jax.grad(f)(flat)
    hvp = lambda v: jax.jvp(jax.grad(f), (flat,), (v,))[1]  # noqa: E731
    hess = np.asarray(jax.lax.map(hvp, jnp.eye(flat.size), batch_size=128))
    hess = 0.5 * (hess + hess.T)
    # the parameters that move: host pixels, position, fluxes, skies, shifts. Not the pinned
    # ones (prior precision PINNED: they only add rounding at 1e16 scale), nor the reference
    # epochs' fluxes, which the solver holds at zero and the objective by a unit prior only
    flux_free = jax.tree_util.tree_map(lambda x: np.ones(np.shape(x), bool), scene)
    flux_free = eqx.tree_at(lambda s: s.local, flux_free, tuple(
        np.c_[np.asarray(st.free_flux) > 0, np.ones((loc.shape[0], 5), bool)]
        for loc, st in zip(scene.local, ds.stacks)))
    free = (np.diag(hess) < 1e10) & np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(flux_free)])
    exact = np.zeros(flat.size)
    exact[free] = np.linalg.solve(hess[np.ix_(free, free)], -np.asarray(grad)[free])
    assert np.linalg.eigvalsh(hess[np.ix_(free, free)]).min() > 0  # a minimum's neighbourhood

    def step(newton):
        out = gauss_newton_step(scene, ds.stacks, ds.grid, pa, jnp.asarray(1e-12), jnp.asarray(0.0), mixed=False,
                                newton=newton)
        assert np.isfinite(float(out[3]))
        return np.asarray(ravel_pytree(out[0])[0])

    newton, gn = step(True), step(False)
    sel = free
    scale = np.abs(exact[sel]).max()
    np.testing.assert_allclose(newton[sel], exact[sel], rtol=0, atol=1e-6 * scale)
    assert np.abs(gn[sel] - exact[sel]).max() > 1e-3 * scale


def test_newton_fit_reaches_the_gauss_newton_optimum_or_lower(fit_results):
    """Newton steps change how the MAP is found, not what it is: the same light curve as a
    Gauss-Newton-only fit within the fits' stopping tolerance, at an objective no higher, in
    no more iterations."""
    ds, res, _ = fit_results[0]
    gn = fit(ds, newton=False)
    assert res.status == gn.status == "converged"
    assert res.history[-1] <= gn.history[-1] + 1e-6 * abs(gn.history[-1])
    assert res.n_iter <= gn.n_iter
    a, b = res.lightcurve(), gn.lightcurve()
    sci = ~np.asarray(b["is_reference"])
    err = np.asarray(b["flux_err"])[sci]
    assert np.max(np.abs(np.asarray(a["flux"])[sci] - np.asarray(b["flux"])[sci]) / err) < 0.03
    np.testing.assert_allclose(np.asarray(a["flux_err"])[sci], err, rtol=2e-3)


def _fit_with_newton_steps(fit_results, monkeypatch, replace):
    """Fit ``fit_results[0]``'s data with every Newton step's ``gauss_newton_step`` output passed
    through ``replace``; returns ``(result, newton flag of each step call, reference result)``."""
    import importlib

    fit_module = importlib.import_module("transcene.fit")
    real = fit_module.gauss_newton_step
    kinds = []

    def patched(*args, newton=False, **kwargs):
        out = real(*args, newton=newton, **kwargs)
        kinds.append(newton)
        return replace(*out) if newton else out

    monkeypatch.setattr(fit_module, "gauss_newton_step", patched)
    ds, res, _ = fit_results[0]
    return fit(ds), kinds, res


def _largest_flux_change(got, ref) -> float:
    """Largest difference of two fits' science-epoch fluxes, in ``ref``'s errors."""
    a, b = got.lightcurve(), ref.lightcurve()
    sci = ~np.asarray(b["is_reference"])
    return float(np.max(np.abs(np.asarray(a["flux"])[sci] - np.asarray(b["flux"])[sci]) / np.asarray(b["flux_err"])[sci]))


def test_a_newton_step_that_fails_the_line_search_is_replaced_by_a_gauss_newton_step(fit_results, monkeypatch):
    """Far from the optimum a Newton step can fail the line search (validation cell
    sys:zp20mmag-sb15-nuis seed 6 did, and the whole fit failed with it): the iteration then
    takes a Gauss-Newton step instead. Here every Newton step is made useless (NaN: no step
    length passes), and the fit still reaches the optimum, by Gauss-Newton steps alone. (Reversed
    steps were used first; near the optimum a reversed step is so small that it passes the line
    search's 1e-9 relative tolerance, and counts as a Newton step taken.)"""
    def useless(step, lvar, cg_it, cg_res):
        return jax.tree_util.tree_map(lambda x: x * jnp.nan, step), lvar, cg_it, cg_res

    got, kinds, res = _fit_with_newton_steps(fit_results, monkeypatch, useless)
    assert got.status == "converged"
    assert any(kinds) and got.n_newton == 0  # Newton steps were tried, none was taken
    assert _largest_flux_change(got, res) < 0.03


def test_a_step_truncated_at_negative_curvature_never_certifies_convergence(fit_results, monkeypatch):
    """A Newton step that CG truncated at negative curvature can be tiny because CG stopped after
    one iteration, not because the point is optimal (validation cell sb:15 seed 7 "converged" on
    two such steps, 35.7 above its optimum). Here every Newton step is made such a step (scaled
    down 1e6, residual NaN): each is followed by a Gauss-Newton step, the fit converges on a
    Gauss-Newton step and reaches the optimum."""
    def truncated(step, lvar, cg_it, cg_res):
        return jax.tree_util.tree_map(lambda x: 1e-6 * x, step), lvar, jnp.asarray(1), jnp.asarray(jnp.nan)

    got, kinds, res = _fit_with_newton_steps(fit_results, monkeypatch, truncated)
    assert got.status == "converged"
    assert any(kinds) and not kinds[-1]  # Newton steps were taken; the last step was Gauss-Newton
    assert not any(a and b for a, b in zip(kinds, kinds[1:]))  # a Gauss-Newton step after each
    assert _largest_flux_change(got, res) < 0.03


def test_a_small_last_newton_step_stands_in_for_the_final_linear_solve(fit_results, monkeypatch, caplog):
    """A fit whose last step was a small, whole Newton step skips the geometry-frozen linear
    solve (``NEWTON_POLISH_SKIP_FLUX``): the same light curve as the fit that runs it, to 0.01
    sigma."""
    import importlib
    import logging

    fit_module = importlib.import_module("transcene.fit")
    ds, res, _ = fit_results[0]
    with caplog.at_level(logging.DEBUG, logger="transcene.fit"):
        fit(ds)
    assert not any("linear polish" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(fit_module, "NEWTON_POLISH_SKIP_FLUX", 0.0)
    with caplog.at_level(logging.DEBUG, logger="transcene.fit"):
        full = fit(ds)
    assert any("linear polish" in r.getMessage() for r in caplog.records)
    assert full.status == res.status == "converged"
    a, b = res.lightcurve(), full.lightcurve()
    sci = ~np.asarray(b["is_reference"])
    err = np.asarray(b["flux_err"])[sci]
    assert np.max(np.abs(np.asarray(a["flux"])[sci] - np.asarray(b["flux"])[sci]) / err) < 0.01
    np.testing.assert_allclose(np.asarray(a["flux_err"])[sci], err, rtol=1e-3)
    assert res.history[-1] <= full.history[-1] + 1e-3


@given(n=st.integers(1, 5000))
def test_epoch_buckets_hold_n_with_little_padding_and_few_shapes(n):
    """Padded slots cost as much as real epochs, distinct counts cost a compilation each."""
    from transcene.dataset import _epoch_bucket

    b = _epoch_bucket(n)
    assert b >= n
    assert _epoch_bucket(b) == b  # a bucket is its own bucket
    if n >= 8:
        assert (b - n) / b < 0.2  # worst just above a power of two: 4097 -> 5120, 0.1998
    lo = 1 << (n.bit_length() - 1)  # the doubling that holds n
    assert len({_epoch_bucket(k) for k in range(lo, 2 * lo + 1)}) <= 5


def test_the_host_pedestal_is_the_direction_the_fourier_preconditioner_gets_wrong(fit_results):
    """``solve._host_pedestal``: the host image that renders flattest over the fitted region.
    With every epoch's sky free only the prior constrains it, so the reduced system's curvature
    along it is a tiny fraction of what the Fourier preconditioner assumes (the Rayleigh
    quotient of S against the preconditioner's curvature; measured 4.5e-4 here, against 0.02
    for the constant image and 0.7 for noise), and deflating it makes the solves converge in
    fewer iterations."""
    import equinox as eqx

    from transcene.solve import Priors, _build, _make_solver, _transient_rows, prior_arrays

    ds, res, _ = fit_results[0]
    pa = prior_arrays(ds, Priors(), np.zeros((0, 2)))
    glob = res.scene.glob
    shape = glob.host.image.shape
    np.testing.assert_allclose(np.sqrt(np.sum(np.asarray(pa.host_pedestal) ** 2, axis=(1, 2))), 1.0, rtol=1e-12)
    sysd = _build(res.scene, ds.stacks, ds.grid, pa, False)
    n_host, m = int(np.prod(shape)), ds.grid.size

    def quotient(img):
        v = jnp.zeros(sysd["n_g"]).at[:n_host].set(jnp.asarray(img).reshape(-1))
        assumed = ds.grid.crop(jnp.fft.irfft2(pa.host_precond * jnp.fft.rfft2(ds.grid.embed(img)), s=(m, m)))
        return float(v @ sysd["apply_s"](v)) / float(jnp.sum(img * assumed))

    pedestal = quotient(pa.host_pedestal)
    constant = quotient(jnp.ones(shape))
    noise = quotient(jnp.asarray(np.random.default_rng(0).normal(size=shape)))
    assert pedestal < 2e-3 and pedestal < 0.1 * constant and noise > 0.1, (pedestal, constant, noise)
    # deflated (as always) against not (a zero pedestal row is dropped by the pseudo-inverse)
    rows = _transient_rows(sysd, ds.stacks, glob)
    its = []
    for p in (pa, eqx.tree_at(lambda p: p.host_pedestal, pa, jnp.zeros_like(pa.host_pedestal))):
        solve, _, _ = _make_solver(sysd, glob, ds.grid, p, deflate=rows)
        x, k, r = solve(sysd["rhs"], 1e-8)
        assert float(r) < 1e-8
        its.append(int(k))
    assert its[0] < its[1], its
