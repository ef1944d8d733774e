"""ZTF alert cutouts -> epochs: real SN 2021rhu cutouts (skipped when absent) and synthetic PSFs."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from transcene.epoch import Epoch
from transcene.errors import EpochFileError
from transcene.ztf_alerts import (
    ZTF_SATURATE,
    _band_wing,
    _read_alert,
    _shape_matrix,
    _wing_ratio,
    _with_wing,
    fit_moffat,
    moffat_image,
    moffat_psf,
    read_ztf_alert_cutout,
    ztf_sn2021rhu_epochs,
)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ztf-sn2021rhu"
CUTOUTS = DATA / "cutouts"
LATE_G = CUTOUTS / "ZTF21abiuvdk_1707409520815015012_ztfg.fits"  # faint, unsaturated
PEAK_R = CUTOUTS / "ZTF21abiuvdk_1652462880815015008_ztfr.fits"  # max 55257 DN

needs_data = pytest.mark.skipif(
    not CUTOUTS.is_dir(), reason=f"ZTF SN 2021rhu alert cutouts absent ({CUTOUTS})"
)


def _check_psf(psf: np.ndarray) -> None:
    assert psf.shape == (25, 25)
    assert psf.shape[0] % 2 == 1 and psf.shape[1] % 2 == 1
    assert np.all(np.isfinite(psf)) and psf.min() >= 0
    assert psf.sum() == pytest.approx(1.0, abs=1e-9)
    yy, xx = np.indices(psf.shape)
    c = (psf.shape[0] - 1) / 2
    assert abs((xx * psf).sum() - c) < 0.05
    assert abs((yy * psf).sum() - c) < 0.05
    assert np.unravel_index(np.argmax(psf), psf.shape) == (12, 12)


# --- synthetic PSF fitter -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fwhm1", "fwhm2", "rho", "beta", "x0", "y0"),
    [(2.2, 2.2, 0.0, 3.0, 15.37, 14.81), (2.5, 1.9, 0.3, 2.2, 14.62, 15.18),
     (1.4, 1.3, -0.1, 4.5, 15.05, 15.44)],
)
def test_fit_moffat_recovers_synthetic_source(fwhm1, fwhm2, rho, beta, x0, y0):
    smat = _shape_matrix(fwhm1, fwhm2, rho, beta)
    truth = moffat_image((31, 31), x0, y0, smat, beta, flux=2e5, oversample=25)
    variance = 25.0 + truth / 6.2
    rng = np.random.default_rng(7)
    image = truth + 12.0 + rng.normal(size=truth.shape) * np.sqrt(variance)
    fit = fit_moffat(image, variance, np.zeros(image.shape, bool), 15.0, 15.0)
    true_fwhm = np.sqrt(fwhm1 * fwhm2 * np.sqrt(1 - rho**2))  # det(smat)^(1/4) / alpha-per-FWHM
    assert fit.fwhm == pytest.approx(true_fwhm, rel=0.02)
    assert fit.x0 == pytest.approx(x0, abs=0.02)
    assert fit.y0 == pytest.approx(y0, abs=0.02)
    assert fit.flux == pytest.approx(2e5, rel=0.02)
    assert fit.background == pytest.approx(12.0, abs=3.0)


def test_fit_moffat_with_fixed_beta_and_masked_core():
    smat = _shape_matrix(2.0, 2.0, 0.0, 2.5)
    image = moffat_image((25, 25), 12.3, 11.8, smat, 2.5, flux=1e5, oversample=25)
    mask = np.zeros(image.shape, bool)
    mask[11:14, 11:14] = True
    fit = fit_moffat(image, np.full(image.shape, 1.0), mask, 12.0, 12.0, beta=2.5)
    assert fit.beta == 2.5
    assert fit.fwhm == pytest.approx(2.0, rel=0.02)


def test_moffat_psf_stamp_is_centred_unit_sum():
    _check_psf(moffat_psf(_shape_matrix(2.6, 1.8, 0.4, 2.3), 2.3))


def test_psf_wing_measured_and_restored():
    """A PSF with a 4 % Gaussian shoulder: the 6 px Moffat fit misses it and reads low; the
    aperture ratios measure it and the winged PSF gives the true flux back."""
    beta, sig_w, frac = 4.0, 3.5, 0.04
    smat = _shape_matrix(2.1, 2.1, 0.0, beta)
    yy, xx = np.indices((63, 63), dtype=float)
    rng = np.random.default_rng(3)
    fakes, low = [], []
    for k in range(5):
        x0, y0 = 31.0 + 0.13 * k, 30.8 + 0.07 * k
        core = moffat_image((63, 63), x0, y0, smat, beta, flux=1.0, oversample=15)
        wing = np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / sig_w**2)
        truth = 3e5 * ((1 - frac) * core + frac * wing / wing.sum())
        var = 400.0 + truth / 6.2
        img = truth + rng.normal(size=truth.shape) * np.sqrt(var)
        fit = fit_moffat(img, var, np.zeros(img.shape, bool), 31.0, 31.0, beta=beta)
        assert fit.flux < 3e5 * (1 - 0.25 * frac)  # (most of) the shoulder is missed
        low.append(3e5 / fit.flux - 1.0)
        ratio, snr = _wing_ratio(img, var, fit)
        assert snr > 100 and ratio[1] > ratio[0] > 1.0
        fakes.append(type("A", (), dict(wing_ratio=ratio, wing_snr=snr, saturated_core=False))())
    got_frac, got_sigma = _band_wing(fakes)
    # the Moffat fit absorbs part of the shoulder (into its constant); the measured fraction is
    # what its flux misses, up to the shoulder's light beyond 8 px (0.3 % here, not counted)
    assert got_frac == pytest.approx(np.median(low), abs=0.006)
    assert 2.0 < got_sigma < 6.0
    psf = _with_wing(moffat_psf(smat, beta), got_frac, got_sigma)
    _check_psf(psf)
    # PSF photometry of the last image with the winged PSF: weighted linear amplitude
    c = 12
    iy, ix = int(round(y0)), int(round(x0))
    cut = img[iy - c : iy + c + 1, ix - c : ix + c + 1]
    w = 1.0 / var[iy - c : iy + c + 1, ix - c : ix + c + 1]
    # the winged PSF (the fitted Moffat core + the measured wing) at the source's sub-pixel position
    core = moffat_image(cut.shape, c + fit.x0 - ix, c + fit.y0 - iy, fit.smat, beta, flux=1.0, oversample=15)
    g = np.exp(-0.5 * ((np.arange(2 * c + 1)[None] - c - x0 + ix) ** 2
                       + (np.arange(2 * c + 1)[:, None] - c - y0 + iy) ** 2) / got_sigma**2)
    model = (1 - got_frac) * core / core.sum() + got_frac * g / g.sum()
    amp = np.sum(w * model * cut) / np.sum(w * model**2)
    assert amp == pytest.approx(3e5, rel=0.01)
    # nothing to correct: no light beyond the Moffat, or too few significant alerts
    flat = [type("A", (), dict(wing_ratio=(0.995, 0.99), wing_snr=50.0, saturated_core=False))()] * 4
    assert _band_wing(flat) == (0.0, pytest.approx(float("nan"), nan_ok=True))
    assert _band_wing(fakes[:2])[0] == 0.0
    assert _with_wing(psf, 0.0, 3.0) is psf


# --- real alert cutouts ---------------------------------------------------------------------


@pytest.mark.realdata
@needs_data
def test_read_one_alert_gives_science_and_template():
    hdr = fits.getheader(LATE_G)
    sci, ref = read_ztf_alert_cutout(LATE_G)
    assert isinstance(sci, Epoch) and isinstance(ref, Epoch)
    assert not sci.is_reference and ref.is_reference
    assert sci.mjd == pytest.approx(hdr["JD"] - 2400000.5 + 15.0 / 86400.0, abs=1e-7)
    assert sci.timesys == ref.timesys == "UTC"
    assert sci.band == ref.band == "ztfg"
    assert sci.survey == ref.survey == "ZTF"
    assert sci.zeropoint == ref.zeropoint == pytest.approx(hdr["MAGZPSCI"])
    assert sci.exposure_id == "1707409520815015012"
    assert ref.exposure_id == "ref_550120108"
    assert hdr["JDSTRREF"] - 2400000.5 < ref.mjd < hdr["JDENDREF"] - 2400000.5
    assert sci.image.shape == ref.image.shape == (63, 63)
    for ep in (sci, ref):
        _check_psf(ep.psf)
        assert ep.psf_oversample == 1
        assert np.all(ep.variance[~ep.mask] > 0)
        assert not ep.mask.any()  # faint epoch: nothing saturated
        assert ep.saturate is not None and 40000 < ep.saturate <= ZTF_SATURATE
    # the template is broader than the science image (ZTF reference resampled to this grid)
    assert ref.psf.max() < sci.psf.max()
    assert read_ztf_alert_cutout(LATE_G, include_template=False)[0].exposure_id == sci.exposure_id


@pytest.mark.realdata
@needs_data
def test_saturated_pixels_masked_near_peak():
    sci, ref = read_ztf_alert_cutout(PEAK_R, beta=2.3)
    j, i = np.unravel_index(np.argmax(sci.image), sci.image.shape)
    assert sci.image[j, i] >= sci.saturate
    assert sci.mask[j - 1 : j + 2, i - 1 : i + 2].all()  # saturated pixel and its neighbours
    assert sci.mask.sum() == 9
    assert not ref.mask.any()
    _check_psf(sci.psf)


@pytest.mark.realdata
@needs_data
def test_all_sn2021rhu_epochs():
    epochs = ztf_sn2021rhu_epochs(DATA)
    sci = [e for e in epochs if not e.is_reference]
    refs = [e for e in epochs if e.is_reference]
    assert len(sci) == 34 and len(refs) == 2
    assert sorted(e.exposure_id for e in refs) == ["ref_550120108", "ref_550120208"]
    assert len({e.exposure_id for e in epochs}) == 36
    assert {e.band for e in refs} == {"ztfg", "ztfr"}
    assert sum(e.band == "ztfg" for e in sci) == 18
    assert np.all(np.diff([e.mjd for e in sci if e.band == "ztfr"]) > 0)
    for e in epochs:
        _check_psf(e.psf)
        assert np.all(e.variance[~e.mask] > 0)
    # the shoulder the Moffat cores miss, measured on DIFFERENCE (module docstring)
    alerts = [_read_alert(p) for p in sorted(CUTOUTS.glob("*_ztfg.fits"))]
    frac, sigma = _band_wing(alerts)
    assert 0.02 < frac < 0.05 and 2.5 < sigma < 5.0


@pytest.fixture
def small_data(tmp_path):
    """Two g and two r alerts of the real data set, linked into a temporary data directory."""
    cut = tmp_path / "data" / "cutouts"
    cut.mkdir(parents=True)
    for name in sorted(p.name for p in CUTOUTS.glob("*.fits"))[:4]:
        (cut / name).symlink_to(CUTOUTS / name)
    return tmp_path / "data"


@pytest.mark.realdata
@needs_data
def test_all_templates_and_bad_option(small_data):
    epochs = ztf_sn2021rhu_epochs(small_data, templates="all")
    refs = [e for e in epochs if e.is_reference]
    assert len(epochs) == 8 and len(refs) == 4
    assert len({e.exposure_id for e in epochs}) == 8
    with pytest.raises(ValueError, match="templates"):
        ztf_sn2021rhu_epochs(small_data, templates="some")


@pytest.mark.realdata
@needs_data
def test_script_writes_one_file_per_epoch(small_data, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "scripts" / "ztf_sn2021rhu_epochs.py"))["main"]
    out = tmp_path / "epochs"
    assert main([str(out), "--data", str(small_data)]) == 0
    assert "wrote 4 science and 2 template epochs" in capsys.readouterr().out
    names = sorted(p.name for p in out.glob("*.fits"))
    assert len(names) == 6 and "ref_550120108.fits" in names and "ref_550120208.fits" in names
    with fits.open(out / "ref_550120108.fits") as hdul:
        assert hdul["SCI"].header["REFEPOCH"] is True
        assert hdul["PSF"].data.shape == (25, 25)
    with pytest.raises(SystemExit, match="exist"):
        main([str(out), "--data", str(small_data)])
    with pytest.raises(SystemExit, match="no alert cutouts"):
        main([str(tmp_path / "other"), "--data", str(tmp_path)])


def test_unreadable_cutout_raises(tmp_path):
    path = tmp_path / "bad.fits"
    fits.HDUList([fits.PrimaryHDU()]).writeto(path)
    with pytest.raises(EpochFileError, match="SCIENCE"):
        read_ztf_alert_cutout(path)


@pytest.mark.realdata
@needs_data
def test_nan_pixels_are_masked(tmp_path):
    path = tmp_path / "nan.fits"
    with fits.open(LATE_G) as hdul:
        hdul["SCIENCE"].data[5, 40] = np.nan
        hdul["TEMPLATE"].data[50, 10] = np.nan
        hdul.writeto(path)
    sci, ref = read_ztf_alert_cutout(path)
    assert sci.mask[5, 40] and sci.mask.sum() == 1
    assert ref.mask[50, 10] and ref.mask.sum() == 1
    assert np.all(sci.weight[~sci.mask] > 0)
    clean = read_ztf_alert_cutout(LATE_G)[0]
    assert sci.zeropoint == clean.zeropoint
    np.testing.assert_allclose(sci.psf, clean.psf, atol=2e-3)
