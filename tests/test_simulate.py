"""Tests of the independent simulator: geometry, photometry, PSF consistency, files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from scipy import special

from transcene.psf import psf_fwhm
from transcene.simulate import (
    MASKED_VALUE,
    SimulationConfig,
    _affine_to_frame,
    _Psf,
    _render_point,
    _tan_wcs,
    simulate,
    write_simulation,
)

HST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "hst-cosmos-galaxy"
HST_IMAGE = HST_DIR / "147246.0_150.416558_1.998697_masknoise.fits"

SMALL = dict(n_epochs=4, n_reference=2, size=32)


def _units_per_njy(zp: float) -> float:
    return 10.0 ** (0.4 * (zp - 31.4))


def test_deterministic_for_a_seed():
    cfg = SimulationConfig(**SMALL, seed=3)
    (e1, t1), (e2, t2) = simulate(cfg), simulate(cfg)
    for a, b in zip(e1, e2):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.psf, b.psf)
    assert all((t1[c] == t2[c]).all() for c in t1.colnames)
    e3, _ = simulate(SimulationConfig(**SMALL, seed=4))
    assert not np.array_equal(e1[0].image, e3[0].image)
    # an explicit generator overrides the seed
    e4, _ = simulate(cfg, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(e4[0].image, e3[0].image)


def test_truth_table_columns_units_and_meta():
    epochs, truth = simulate(SimulationConfig(**SMALL))
    assert len(truth) == len(epochs) == 6
    expected = {
        "exposure_id": None, "mjd": u.d, "band": None, "is_reference": None,
        "flux_true": u.nJy, "seeing_fwhm": u.arcsec, "zeropoint": u.mag,
        "pixel_scale": u.arcsec / u.pix, "rotation_deg": u.deg, "sky_level": u.nJy / u.pix,
        "shift_ra": u.arcsec, "shift_dec": u.arcsec, "x_true": u.pix, "y_true": u.pix,
    }
    for name, unit in expected.items():
        assert name in truth.colnames
        assert truth[name].unit == unit, name
    for key in ("transient_ra", "transient_dec", "host_ra", "host_dec", "host", "config", "seed"):
        assert key in truth.meta
    assert truth.meta["config"]["size"] == 32
    for row, ep in zip(truth, epochs):
        assert row["exposure_id"] == ep.exposure_id
        assert row["band"] == ep.band and row["zeropoint"] == ep.zeropoint
        assert ep.survey == "SIM" and ep.exposure_id.startswith("sim0_")


def test_references_and_light_curve():
    cfg = SimulationConfig(n_epochs=40, n_reference=6, size=24, host="none")
    _, truth = simulate(cfg)
    ref = truth["is_reference"]
    assert ref.sum() == 6 and (truth["flux_true"][ref] == 0).all()
    assert truth["mjd"][ref].max() < truth["mjd"][~ref].min()
    sci = truth[~ref]
    before = sci["mjd"] < truth.meta["t_explosion"]
    assert (sci["flux_true"][before] == 0).all() and 0 < before.sum() < 15
    assert (sci["flux_true"][~before] > 0).all()
    # peaks near transient_peak_mag (the light curve is sampled, so at most the peak)
    peak_njy = 10 ** (-0.4 * (cfg.transient_peak_mag - 31.4))
    assert 0.7 * peak_njy < sci["flux_true"].max() < 1.2 * peak_njy
    assert set(truth["band"]) == {"g", "r"}


def test_transient_position_and_flux_rotated_rescaled_epochs():
    cfg = SimulationConfig(n_epochs=6, n_reference=0, size=48, host="none", mjd_span=20.0,
                           pixel_scale_jitter=0.08, wcs_jitter_arcsec=0.3, seeing_fwhm=(1.5, 2.5),
                           transient_offset=(2.3, -1.7), seed=5)
    epochs, truth = simulate(cfg, noiseless=True)
    coord = SkyCoord(truth.meta["transient_ra"], truth.meta["transient_dec"], unit="deg")
    checked = 0
    for ep, row in zip(epochs, truth):
        if row["flux_true"] <= 0:
            continue
        checked += 1
        assert abs(row["rotation_deg"]) > 0 and abs(row["pixel_scale"] - 1.0) > 1e-4
        flux_u = row["flux_true"] * _units_per_njy(ep.zeropoint)
        img = ep.image - row["sky_level"] * _units_per_njy(ep.zeropoint)
        assert img.sum() == pytest.approx(flux_u, rel=1e-3)  # total flux to 0.1 %
        y, x = np.indices(img.shape)
        assert (img * x).sum() / img.sum() == pytest.approx(row["x_true"], abs=0.01)
        assert (img * y).sum() / img.sum() == pytest.approx(row["y_true"], abs=0.01)
        # x_true is astropy's position of the transient displaced by the misregistration
        shifted = coord.spherical_offsets_by(row["shift_ra"] * u.arcsec,
                                             row["shift_dec"] * u.arcsec)
        xs, ys = ep.wcs.world_to_pixel(shifted)
        assert (xs, ys) == pytest.approx((row["x_true"], row["y_true"]), abs=1e-4)
    assert checked >= 4


def test_point_source_at_integer_pixel_equals_flux_times_epsf():
    for model in ("moffat", "gaussian"):
        psf = _Psf(model, 2.1, 25)
        stamp = psf.stamp(25, 1)
        assert stamp.shape == (25, 25)
        assert stamp.sum() == pytest.approx(1.0, abs=1e-12)
        img = _render_point(psf, 1234.5, 20.0, 17.0, 48)
        np.testing.assert_allclose(img[5:30, 8:33], 1234.5 * stamp, rtol=1e-9, atol=1e-12)
        assert img.sum() == pytest.approx(1234.5, rel=1e-9)
        # the unnormalised quadrature already sums to one (the PSF ends inside the stamp)
        d = np.arange(-12, 13.0)
        assert psf.epsf(d[None, :], d[:, None]).sum() == pytest.approx(1.0, abs=1e-8)
        # oversampled stamps are odd, unit sum, and the ePSF at finer offsets
        fine = psf.stamp(25, 2)
        assert fine.shape == (51, 51) and fine.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(fine[1::2, 1::2] / fine[1::2, 1::2].sum(), stamp, atol=1e-12)


def test_written_psf_matches_the_rendering_psf():
    cfg = SimulationConfig(**SMALL, psf_model="gaussian", pixel_scale_jitter=0.05)
    epochs, truth = simulate(cfg)
    for ep, row in zip(epochs, truth):
        psf = _Psf("gaussian", row["seeing_fwhm"] / row["pixel_scale"], cfg.psf_size)
        np.testing.assert_allclose(ep.psf, psf.stamp(cfg.psf_size, 1), atol=1e-14)
        # second moment of the written ePSF: sigma^2 + 1/12 pixel^2 per axis
        d = np.arange(25) - 12.0
        var = (ep.psf.sum(axis=0) * d**2).sum()
        sigma = row["seeing_fwhm"] / row["pixel_scale"] / 2.3548200450309493
        assert var == pytest.approx(sigma**2 + 1 / 12, rel=1e-3)


def test_epsf_fourier_table_matches_quadrature():
    psf = _Psf("moffat", 1.5, 25)
    n, h = 135, 0.2
    table = np.fft.irfft2(psf.epsf_spectrum(n, h), s=(n, n))
    idx = np.array([0, 1, 3, 7, 12, 33, 61, n - 5, n - 40])
    d = np.where(idx < n // 2, idx, idx - n) * h
    exact = psf.epsf(d[None, :], d[:, None])
    np.testing.assert_allclose(table[np.ix_(idx, idx)], exact, atol=1e-8 * exact.max())


def test_affine_pixel_map_matches_astropy():
    frame = _tan_wcs(150.1, 2.2, np.eye(2) / 3600.0, (1.0, 1.0))
    th = math.radians(123.0)
    cd = 1.1 / 3600 * np.array([[-math.cos(th), math.sin(th)], [math.sin(th), math.cos(th)]])
    wcs = _tan_wcs(150.1003, 2.1998, cd, (24.7, 24.2))
    a, b = _affine_to_frame(wcs, frame, 23.5, 23.5)
    x = np.array([-12.0, 0.0, 60.0, 23.5, 11.1])
    y = np.array([-12.0, 60.0, 0.0, 23.5, 47.0])
    xi, eta = frame.all_world2pix(*wcs.all_pix2world(x, y, 0), 0)
    approx = a @ np.stack([x - 23.5, y - 23.5]) + b[:, None]
    np.testing.assert_allclose(approx, np.stack([xi, eta]), atol=1e-7)  # arcsec


def _square_fraction(n, re, q, pa_deg, a_pix, centre, size):
    """Analytic Sersic flux fraction inside the cutout square (polar integral of the enclosed
    fraction in the circularised frame; the square is a convex polygon there)."""
    b = special.gammaincinv(2 * n, 0.5)
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [size - 0.5, size - 0.5],
                        [-0.5, size - 0.5]]) - centre
    pa = math.radians(pa_deg)
    to_circ = np.array([[math.sin(pa), math.cos(pa)],
                        [math.cos(pa) / q, -math.sin(pa) / q]]) @ a_pix
    v = corners @ to_circ.T
    phi = (np.arange(8192) + 0.5) * 2 * np.pi / 8192
    dirs = np.stack([np.cos(phi), np.sin(phi)], axis=1)
    r = np.full(phi.size, np.inf)
    for j in range(4):
        p, e = v[j], v[(j + 1) % 4] - v[j]
        normal = np.array([e[1], -e[0]])
        normal = normal if normal @ p > 0 else -normal
        dn = dirs @ normal
        r = np.where(dn > 0, np.minimum(r, (normal @ p) / np.where(dn > 0, dn, 1)), r)
    return special.gammainc(2 * n, b * (r / re) ** (1 / n)).mean()


def _edge_spill(n, re, q, pa_deg, a_pix, centre, size, psf_var):
    """Light the PSF moves across the cutout's edge (fraction of the total), to second order:
    (var / 2) x the boundary integral of grad S . n, var the ePSF variance per axis (pix^2)."""
    b = special.gammaincinv(2 * n, 0.5)
    pa = math.radians(pa_deg)
    i_e = 1 / (2 * np.pi * q * re**2 * n * math.exp(b) * b ** (-2 * n) * special.gamma(2 * n))
    area = abs(np.linalg.det(a_pix))

    def sb(x, y):  # per pixel^2
        xi, eta = a_pix @ np.stack([x - centre[0], y - centre[1]])
        um, un = xi * math.sin(pa) + eta * math.cos(pa), xi * math.cos(pa) - eta * math.sin(pa)
        rho = np.hypot(um, un / q)
        return i_e * area * np.exp(-b * ((rho / re) ** (1 / n) - 1))

    t = (np.arange(4000) + 0.5) / 4000 * size - 0.5
    lo, hi, eps, flux = -0.5, size - 0.5, 1e-3, 0.0
    for fixed, outward in ((lo, -1), (hi, 1)):
        for along_x in (True, False):
            if along_x:  # horizontal edge y = fixed
                grad = (sb(t, fixed + eps + 0 * t) - sb(t, fixed - eps + 0 * t)) / (2 * eps)
            else:
                grad = (sb(fixed + eps + 0 * t, t) - sb(fixed - eps + 0 * t, t)) / (2 * eps)
            flux += outward * grad.sum() * size / t.size
    return psf_var / 2 * flux


@pytest.mark.parametrize("n", [1.5, 4.0])
def test_sersic_flux_in_cutout_matches_analytic(n):
    cfg = SimulationConfig(n_epochs=0, n_reference=3, size=40, sersic_n=n, sersic_re=3.0,
                           sersic_q=0.6, sersic_pa=30.0, pixel_scale_jitter=0.05,
                           seeing_fwhm=(1.5, 2.0), seed=2)
    epochs, truth = simulate(cfg, noiseless=True)
    for ep, row in zip(epochs, truth):
        units = _units_per_njy(ep.zeropoint)
        total = (ep.image - row["sky_level"] * units).sum() / (row["host_flux"] * units)
        a_pix = ep.wcs.pixel_scale_matrix * 3600.0  # (East, North) arcsec per pixel
        args = (n, cfg.sersic_re, cfg.sersic_q, cfg.sersic_pa, a_pix,
                np.array([row["x_host"], row["y_host"]]), cfg.size)
        expected = _square_fraction(*args)
        assert total == pytest.approx(expected, rel=5e-3)
        d = np.arange(cfg.psf_size) - cfg.psf_size // 2
        spill = _edge_spill(*args, psf_var=(ep.psf.sum(axis=0) * d**2).sum())
        # measured residual: ~2e-6 (n = 1.5), ~1.5e-5 (n = 4: higher orders of the spill)
        assert abs(total - expected - spill) < 5e-6 + 0.1 * abs(spill)


def test_host_centroid_and_supersampling_convergence():
    base = dict(n_epochs=0, n_reference=2, size=40, sersic_n=1.0, sersic_q=1.0, seed=7,
                pixel_scale_jitter=0.05)
    e5, truth = simulate(SimulationConfig(**base, supersample=5), noiseless=True)
    e9, _ = simulate(SimulationConfig(**base, supersample=9), noiseless=True)
    for a, b, row in zip(e5, e9, truth):
        img = a.image - row["sky_level"] * _units_per_njy(a.zeropoint)
        y, x = np.indices(img.shape)
        assert (img * x).sum() / img.sum() == pytest.approx(row["x_host"], abs=0.01)
        assert (img * y).sum() / img.sum() == pytest.approx(row["y_host"], abs=0.01)
        assert np.abs(a.image - b.image).max() < 1e-6 * a.image.max()


def test_noise_model_and_masks():
    cfg = SimulationConfig(n_epochs=6, n_reference=2, size=32, mask_fraction=1.0)
    noisy, truth = simulate(cfg)
    clean, _ = simulate(cfg, noiseless=True)
    pulls = []
    for a, b, row in zip(noisy, clean, truth):
        assert row["masked"] and a.mask.any() and a.mask[:, a.mask.all(axis=0)].all()
        assert (a.image[a.mask] == MASKED_VALUE).all()
        good = ~a.mask
        pulls.append(((a.image - b.image) / np.sqrt(a.variance))[good])
        sky_u = 10 ** (-0.4 * (cfg.sky_mag_per_arcsec2 - 31.4)) * row["pixel_scale"] ** 2 \
            * _units_per_njy(a.zeropoint)
        assert a.variance.min() >= sky_u / cfg.gain * (1 - 1e-12)
        np.testing.assert_array_equal(a.variance, b.variance)
    pulls = np.concatenate(pulls)
    assert abs(pulls.mean()) < 0.02 and pulls.std() == pytest.approx(1.0, abs=0.02)


@pytest.mark.realdata
def test_hst_image_host():
    if not HST_IMAGE.exists():
        pytest.skip(f"HST galaxy image not found at {HST_IMAGE} (needs ../shared/data)")
    cfg = SimulationConfig(n_epochs=2, n_reference=2, size=40, host=f"image:{HST_IMAGE}",
                           pixel_scale=0.5, transient_offset=(0.4, 0.3))
    epochs, truth = simulate(cfg, noiseless=True)
    assert "image" in truth.meta["host"]
    for ep, row in zip(epochs, truth):
        units = _units_per_njy(ep.zeropoint)
        host = ep.image - row["sky_level"] * units
        host = host - _render_point(_Psf(cfg.psf_model, row["seeing_fwhm"] / row["pixel_scale"],
                                         cfg.psf_size), row["flux_true"] * units,
                                    row["x_true"], row["y_true"], cfg.size)
        assert np.isfinite(host).all()
        assert host.sum() == pytest.approx(row["host_flux"] * units, rel=1e-3)
        y, x = np.indices(host.shape)
        cx, cy = (host * x).sum() / host.sum(), (host * y).sum() / host.sum()
        assert math.hypot(cx - row["x_host"], cy - row["y_host"]) < 1.0  # irregular galaxy
        assert row["host_sb"] > 0


def test_write_simulation_files(tmp_path):
    cfg = SimulationConfig(**SMALL, psf_oversample=3)
    out = write_simulation(tmp_path / "sim", cfg)
    files = sorted(out.glob("epoch_*.fits"))
    assert [f.name for f in files] == [f"epoch_{i:03d}.fits" for i in range(6)]
    truth = Table.read(out / "truth.ecsv")
    assert truth["flux_true"].unit == u.nJy and truth["x_true"].unit == u.pix
    assert truth.meta["config"]["psf_oversample"] == 3
    with fits.open(files[-1]) as hdul:
        assert [h.name for h in hdul[1:]] == ["SCI", "VAR", "MASK", "PSF"]
        hdr = hdul["SCI"].header
        for key in ("MJD-OBS", "BAND", "MAGZP", "SURVEY", "EXPID", "GAIN", "REFEPOCH"):
            assert key in hdr
        assert hdr["SURVEY"] == "SIM" and hdr["EXPID"] == "sim0_005"
        assert hdr["MJD-OBS"] == pytest.approx(truth["mjd"][-1])
        assert hdul["PSF"].header["PSFSAMP"] == 3
        assert hdul["PSF"].data.shape == (75, 75)
        assert hdul["SCI"].data.shape == (32, 32)
    with fits.open(files[0]) as hdul:
        assert hdul["SCI"].header["REFEPOCH"] is True
    with pytest.raises(OSError):
        write_simulation(out, cfg)  # no silent overwrite
    write_simulation(out, cfg, overwrite=True)


def test_config_validation():
    with pytest.raises(ValueError):
        SimulationConfig(psf_size=24)
    with pytest.raises(ValueError):
        SimulationConfig(host="blob")
    with pytest.raises(ValueError):
        SimulationConfig(psf_model="airy")
    with pytest.raises(ValueError):
        SimulationConfig(supersample=4)


def test_injected_psf_and_zeropoint_errors_change_only_what_is_written():
    base = SimulationConfig(n_epochs=4, n_reference=1, size=21, psf_size=15, seed=11)
    sysc = dataclasses.replace(base, psf_fwhm_error=0.02, zeropoint_jitter=0.005)
    e0, t0 = simulate(base)
    e1, t1 = simulate(sysc)
    for a, b, row in zip(e0, e1, t1):
        assert np.array_equal(a.image, b.image)  # the sky is the same; only the files lie
        assert b.zeropoint == pytest.approx(row["zeropoint_written"]) and a.zeropoint == pytest.approx(row["zeropoint"])
        # the optical FWHM changes by the injected fraction; the written ePSF (optics convolved
        # with the pixel) by a smaller one, in the same direction
        change = psf_fwhm(b.psf, 1) / psf_fwhm(a.psf, 1) - 1
        injected = row["psf_fwhm_written"] / row["seeing_fwhm"] - 1
        assert 0.3 < change / injected < 1.0
    dz = np.asarray(t1["zeropoint_written"] - t1["zeropoint"])
    df = np.asarray(t1["psf_fwhm_written"] / t1["seeing_fwhm"] - 1)
    assert 0 < np.abs(dz).max() < 0.05 and 0 < np.abs(df).max() < 0.1
    assert np.array_equal(t0["psf_fwhm_written"], t0["seeing_fwhm"]) and np.array_equal(t0["zeropoint_written"], t0["zeropoint"])
