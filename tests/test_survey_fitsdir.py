"""The generic adapter for a directory of FITS files: plain images with header keywords, epoch
files, cutting to size, and the errors for files that lack what an epoch needs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from transcene.errors import EpochFileError
from transcene.surveys import fetch_epochs
from transcene.surveys.fitsdir import gaussian_psf, read_plain_image

CENTRE = SkyCoord(150.0, 2.0, unit="deg")
SCALE = 0.5  # arcsec / px


def _wcs(n: int) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [CENTRE.ra.deg, CENTRE.dec.deg]
    w.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    w.wcs.cdelt = [-SCALE / 3600, SCALE / 3600]
    return w


def _plain(path, *, n=81, sky=100.0, sigma=5.0, fwhm_px=3.0, flux=5000.0, seed=0, extra=None, drop=()):
    rng = np.random.default_rng(seed)
    img = sky + rng.normal(0, sigma, (n, n))
    psf = gaussian_psf(fwhm_px, size=21)
    c = n // 2
    img[c - 10:c + 11, c - 10:c + 11] += flux * psf
    hdr = _wcs(n).to_header()
    hdr.update({"MAGZP": 27.0, "MJD-OBS": 60000.0, "EXPTIME": 30.0, "FILTER": "r", "FWHM": fwhm_px, "EXPID": path.stem})
    hdr.update(extra or {})
    for k in drop:
        del hdr[k]
    fits.PrimaryHDU(img.astype(np.float32), hdr).writeto(path, overwrite=True)
    return img


def test_gaussian_psf_has_the_asked_fwhm():
    psf = gaussian_psf(4.0, size=41)
    assert psf.shape == (41, 41) and psf.sum() == pytest.approx(1.0)
    row = psf[20] / psf[20, 20]
    x = np.arange(41) - 20
    above = x[row >= 0.5]
    # pixel-integrated: the half-maximum width is the FWHM to within a pixel's sampling
    assert above.max() - above.min() + 1 == pytest.approx(4.0, abs=1.0)
    sigma = math.sqrt(np.sum(psf.sum(axis=0) * x**2))
    assert sigma == pytest.approx(math.sqrt((4.0 / 2.3548) ** 2 + 1 / 12), rel=0.01)


def test_plain_image_gets_mid_exposure_time_noise_and_psf(tmp_path):
    p = tmp_path / "img.fits"
    _plain(p, sigma=5.0)
    ep = read_plain_image(p)
    assert ep.mjd == pytest.approx(60000.0 + 15.0 / 86400) and ep.timesys == "UTC"
    assert ep.band == "r" and ep.zeropoint == 27.0 and ep.exposure_id == "img"
    # no variance extension: the sigma-clipped sky scatter (no GAIN: no Poisson term)
    assert np.median(ep.variance) == pytest.approx(25.0, rel=0.05)
    assert ep.psf.sum() == pytest.approx(1.0) and ep.psf.shape[0] % 2 == 1
    x, y = ep.wcs.world_to_pixel(CENTRE)
    assert (float(x), float(y)) == (pytest.approx(40.0), pytest.approx(40.0))


def test_plain_image_uses_variance_mask_and_psf_extensions(tmp_path):
    p = tmp_path / "img.fits"
    _plain(p)
    var = np.full((81, 81), 9.0)
    mask = np.zeros((81, 81), np.uint8)
    mask[3, 4] = 1
    psf = gaussian_psf(2.0, size=15)
    with fits.open(p, mode="append") as h:
        h.append(fits.ImageHDU(var, name="VAR"))
        h.append(fits.ImageHDU(mask, name="MASK"))
        h.append(fits.ImageHDU(psf, name="PSF"))
    ep = read_plain_image(p)
    assert np.all(ep.variance[~ep.mask] == 9.0) and ep.mask[3, 4] and np.isinf(ep.variance[3, 4])
    np.testing.assert_allclose(ep.psf, psf / psf.sum())


@pytest.mark.parametrize("drop, field", [(("MAGZP",), "MAGZP"), (("MJD-OBS",), "MJD-OBS"), (("EXPTIME",), "EXPTIME"),
                                         (("FILTER",), "BAND"), (("FWHM",), "PSF")])
def test_missing_keywords_name_the_field(tmp_path, drop, field):
    p = tmp_path / "img.fits"
    _plain(p, drop=drop)
    with pytest.raises(EpochFileError) as exc:
        read_plain_image(p)
    assert exc.value.field == field and str(p) in str(exc.value)


def test_directory_run_cuts_to_size_skips_other_fields_and_flags_bad_files(tmp_path, survey_env):
    d = tmp_path / "images"
    d.mkdir()
    for i in range(3):
        _plain(d / f"e{i}.fits", seed=i, extra={"MJD-OBS": 60000.0 + i, "REFEPOCH": i == 0})
    far = _wcs(81).to_header()
    far["CRVAL1"] = 160.0  # another field: does not contain the target
    fits.PrimaryHDU(np.zeros((81, 81), np.float32), far).writeto(d / "elsewhere.fits")
    _plain(d / "nozp.fits", drop=("MAGZP",))
    rep = fetch_epochs(CENTRE, surveys=["fits"], local_dir=d, size_pix=21, config={})
    assert sorted(e.exposure_id for e in rep.epochs) == ["e0", "e1", "e2"]
    assert [(f.exposure_id, "MAGZP" in f.reason) for f in rep.failures] == [("nozp", True)]
    assert all(e.shape == (21, 21) for e in rep.epochs)
    assert [e.is_reference for e in sorted(rep.epochs, key=lambda e: e.exposure_id)] == [True, False, False]
    x, y = rep.epochs[0].wcs.world_to_pixel(CENTRE)
    assert (float(x), float(y)) == (pytest.approx(10.0), pytest.approx(10.0))


def test_directory_is_required(survey_env):
    rep = fetch_epochs(CENTRE, surveys=["fits"], config={})
    assert len(rep.failures) == 1 and "reads a local directory" in rep.failures[0].reason
