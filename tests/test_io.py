"""Tests of transcene.io: reading and validating epoch files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from transcene.epoch import Epoch, write_epoch
from transcene.errors import DatasetError, EpochFileError, EpochSkippedWarning
from transcene.io import read_epoch, read_epochs

NY, NX = 24, 20
RA0, DEC0 = 150.0, 2.0


def make_wcs(ra: float = RA0, dec: float = DEC0, **extra) -> WCS:
    hdr = fits.Header()
    cards = dict(
        CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=ra, CRVAL2=dec,
        CRPIX1=(NX + 1) / 2, CRPIX2=(NY + 1) / 2,
        CD1_1=-7e-5, CD1_2=1e-6, CD2_1=2e-6, CD2_2=7e-5,
    )
    cards.update(extra)
    for key, value in cards.items():
        hdr[key] = value
    return WCS(hdr)


def make_epoch(seed: int = 0, **changes) -> Epoch:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-3:4, -3:4]
    fields = dict(
        image=rng.normal(100.0, 5.0, (NY, NX)),
        variance=rng.uniform(20.0, 30.0, (NY, NX)),
        mask=np.zeros((NY, NX), dtype=bool),
        psf=3.0 * np.exp(-(xx**2 + yy**2) / 3.0),  # deliberately not unit sum
        wcs=make_wcs(),
        mjd=59000.25 + seed,
        band="ztfr",
        zeropoint=26.3,
        survey="ZTF",
        exposure_id=f"exp{seed}",
    )
    fields.update(changes)
    return Epoch(**fields)


def write(tmp_path: Path, name: str = "epoch.fits", edit=None, **changes) -> Path:
    """Write an epoch file; ``edit(hdul)`` may then break it in place."""
    path = write_epoch(tmp_path / name, make_epoch(**changes), overwrite=True)
    if edit is not None:
        with fits.open(path) as hdul:
            hdul = fits.HDUList([hdu.copy() for hdu in hdul])
        edit(hdul)
        hdul.writeto(path, overwrite=True)
    return path


def hdr_set(hdu: str, key: str, value):
    def edit(hdul):
        hdul[hdu].header[key] = value
    return edit


def hdr_del(hdu: str, *keys: str):
    def edit(hdul):
        for key in keys:
            del hdul[hdu].header[key]
    return edit


def set_data(hdu: str, data):
    def edit(hdul):
        hdul[hdu].data = np.asarray(data)
    return edit


def drop(name: str):
    def edit(hdul):
        del hdul[name]
    return edit


def rename(old: str, new: str, transform=lambda d: d):
    def edit(hdul):
        hdu = hdul[old]
        hdul[hdul.index_of(old)] = fits.ImageHDU(transform(hdu.data), header=hdu.header, name=new)
    return edit


def sci_as_table(hdul):
    hdul[hdul.index_of("SCI")] = fits.BinTableHDU.from_columns(
        [fits.Column(name="a", format="E", array=np.zeros(3))], name="SCI"
    )


def psf_even(hdul):
    hdul["PSF"].data = np.ones((6, 7), dtype=np.float32)


def psf_with(value):
    def edit(hdul):
        psf = hdul["PSF"].data.copy()
        psf[3, 3] = value
        hdul["PSF"].data = psf
    return edit


def assert_raises_file_error(path: Path, where: str) -> EpochFileError:
    with pytest.raises(EpochFileError, match=re.escape(str(path)) + ".*" + where) as info:
        read_epoch(path)
    assert info.value.path == str(path)
    return info.value


# ----------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    mask = rng.random((NY, NX)) < 0.1
    ep = make_epoch(
        mask=mask, psf_oversample=3, is_reference=True, gain=1.7, saturate=5000.0, timesys="TAI"
    )
    path = write_epoch(tmp_path / "rt.fits", ep)
    got = read_epoch(path)

    np.testing.assert_array_equal(got.image, ep.image.astype(np.float32))
    np.testing.assert_array_equal(got.variance, ep.variance.astype(np.float32))
    np.testing.assert_array_equal(got.mask, mask)
    assert got.image.dtype == got.variance.dtype == got.psf.dtype == np.float64
    assert got.mask.dtype == bool
    np.testing.assert_allclose(got.psf.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(got.psf, ep.psf / ep.psf.sum(), rtol=1e-6)
    assert got.psf_oversample == 3
    assert got.mjd == ep.mjd and got.timesys == "TAI"
    assert got.band == "ztfr" and got.zeropoint == pytest.approx(26.3)
    assert got.survey == "ZTF" and got.exposure_id == "exp0"
    assert got.is_reference is True
    assert got.gain == pytest.approx(1.7) and got.saturate == 5000.0
    assert got.path == str(path)

    x, y = np.meshgrid(np.linspace(-0.5, NX - 0.5, 5), np.linspace(-0.5, NY - 0.5, 5))
    ra0, dec0 = ep.wcs.pixel_to_world_values(x, y)
    ra1, dec1 = got.wcs.pixel_to_world_values(x, y)
    np.testing.assert_allclose(ra1, ra0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(dec1, dec0, rtol=0, atol=1e-10)
    assert got.wcs.pixel_shape == (NX, NY)


def test_defaults_expid_is_file_name(tmp_path):
    path = write(tmp_path, "noid.fits", edit=hdr_del("SCI", "REFEPOCH"), exposure_id="")
    got = read_epoch(path)
    assert got.exposure_id == "noid.fits"
    assert got.is_reference is False and got.timesys == "UTC" and got.psf_oversample == 1


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), (1, True), (0, False), ("T", True), ("F", False)],
)
def test_refepoch_values(tmp_path, value, expected):
    path = write(tmp_path, edit=hdr_set("SCI", "REFEPOCH", value))
    assert read_epoch(path).is_reference is expected


def test_filter_instead_of_band(tmp_path):
    def edit(hdul):
        del hdul["SCI"].header["BAND"]
        hdul["SCI"].header["FILTER"] = "g"
    assert read_epoch(write(tmp_path, edit=edit)).band == "g"


@pytest.mark.parametrize("value", ["TAI", "tai", "TT", "GPS"])
def test_timesys_accepted_and_upper_cased(tmp_path, value):
    path = write(tmp_path, edit=hdr_set("SCI", "TIMESYS", value))
    assert read_epoch(path).timesys == value.upper()


def test_psfsamp_in_sci_header(tmp_path):
    def edit(hdul):
        del hdul["PSF"].header["PSFSAMP"]
        hdul["SCI"].header["PSFSAMP"] = 2
    assert read_epoch(write(tmp_path, edit=edit)).psf_oversample == 2


def test_psf_larger_than_image(tmp_path):
    big = np.exp(-np.hypot(*np.mgrid[-20:21, -20:21]) / 4.0)
    got = read_epoch(write(tmp_path, psf=big))
    assert got.psf.shape == (41, 41) and got.psf.sum() == pytest.approx(1.0)


def test_gzipped_file(tmp_path):
    path = write_epoch(tmp_path / "e.fits.gz", make_epoch())
    assert read_epoch(path).image.shape == (NY, NX)


# ----------------------------------------------------------------------------- WCS flavours


def test_sip_wcs(tmp_path):
    sip = dict(
        CTYPE1="RA---TAN-SIP", CTYPE2="DEC--TAN-SIP", A_ORDER=2, B_ORDER=2,
        A_2_0=2e-3, A_0_2=-1e-3, A_1_1=5e-4, B_2_0=1e-3, B_0_2=3e-3,
    )

    def edit(hdul):
        for key, value in sip.items():
            hdul["SCI"].header[key] = value
    got = read_epoch(write(tmp_path, edit=edit))
    assert got.wcs.sip is not None
    reference = make_wcs(**sip)
    x, y = 3.0, 17.0
    ra, dec = reference.all_pix2world(x, y, 0)
    px, py = got.wcs.world_to_pixel(SkyCoord(ra * u.deg, dec * u.deg))
    assert px == pytest.approx(x, abs=1e-6) and py == pytest.approx(y, abs=1e-6)
    # the distortion matters: the undistorted WCS puts this position elsewhere
    assert abs(make_wcs().world_to_pixel_values(ra, dec)[0] - x) > 0.01


def test_tpv_wcs(tmp_path):
    tpv = dict(CTYPE1="RA---TPV", CTYPE2="DEC--TPV", PV1_1=1.0, PV1_4=5e-3, PV2_1=1.0, PV2_6=4e-3)

    def edit(hdul):
        for key, value in tpv.items():
            hdul["SCI"].header[key] = value
    got = read_epoch(write(tmp_path, edit=edit))
    ra, dec = make_wcs(**tpv).pixel_to_world_values(2.0, 5.0)
    px, py = got.wcs.world_to_pixel_values(ra, dec)
    assert px == pytest.approx(2.0, abs=1e-6) and py == pytest.approx(5.0, abs=1e-6)


# ----------------------------------------------------------------------------- pixel handling


def test_ivar_input(tmp_path):
    ivar = np.full((NY, NX), 0.25)
    ivar[0, 0] = 0.0  # the usual "no data" marker: masked without a warning

    path = write(tmp_path, edit=rename("VAR", "IVAR", lambda _: ivar.astype(np.float32)))
    got = read_epoch(path)
    assert got.variance[1, 1] == pytest.approx(4.0)
    assert got.mask[0, 0] and got.variance[0, 0] == np.inf
    assert got.mask.sum() == 1


def test_negative_ivar_warns(tmp_path):
    ivar = np.full((NY, NX), 0.25, dtype=np.float32)
    ivar[2, 3] = -1.0
    path = write(tmp_path, edit=rename("VAR", "IVAR", lambda _: ivar))
    expected = re.escape(str(path)) + ".*1 with unusable variance"
    with pytest.warns(EpochSkippedWarning, match=expected):
        got = read_epoch(path)
    assert got.mask[2, 3] and got.variance[2, 3] == np.inf


def test_bad_variance_and_nan_image_masked_with_one_warning(tmp_path):
    ep = make_epoch()
    variance, image, mask = ep.variance.copy(), ep.image.copy(), ep.mask.copy()
    variance[0, :3] = [0.0, -1.0, np.nan]
    image[5, 5] = np.nan
    variance[7, 7] = 0.0
    mask[7, 7] = True  # already masked: not counted
    path = write_epoch(tmp_path / "bad.fits", ep.replace(variance=variance, image=image, mask=mask))
    with pytest.warns(EpochSkippedWarning) as record:
        got = read_epoch(path)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(path) in message and "masked 4 pixels" in message
    assert "3 with unusable variance" in message and "1 with non-finite image" in message
    assert got.mask[0, :3].all() and got.mask[5, 5] and got.mask.sum() == 5
    assert np.all(np.isfinite(got.image)) and np.all(got.variance[0, :3] == np.inf)
    assert np.all(got.weight[got.mask] == 0)


def test_saturate_masking(tmp_path):
    ep = make_epoch(saturate=1000.0)
    image = ep.image.copy()
    image[3, 4] = 1000.0
    image[6, 2] = 2e4
    path = write_epoch(tmp_path / "sat.fits", ep.replace(image=image))
    with pytest.warns(EpochSkippedWarning, match=r"2 with image >= SATURATE"):
        got = read_epoch(path)
    assert got.mask[3, 4] and got.mask[6, 2] and got.mask.sum() == 2


def test_mask_hdu_optional(tmp_path):
    got = read_epoch(write(tmp_path, edit=drop("MASK")))
    assert not got.mask.any()


def test_nonzero_mask_values(tmp_path):
    mask = np.zeros((NY, NX), dtype=np.int32)
    mask[1, 2], mask[3, 4] = 1, 1024
    got = read_epoch(write(tmp_path, edit=set_data("MASK", mask)))
    assert got.mask[1, 2] and got.mask[3, 4] and got.mask.sum() == 2


# ----------------------------------------------------------------------------- bad files

BAD_FILES = {
    "no SCI": (drop("SCI"), "SCI"),
    "SCI is a table": (sci_as_table, "SCI"),
    "SCI 3-D": (set_data("SCI", np.ones((2, NY, NX), dtype=np.float32)), "SCI"),
    "no celestial WCS": (hdr_del("SCI", "CTYPE1", "CTYPE2"), "WCS"),
    "unparsable WCS": (hdr_set("SCI", "CTYPE1", "RA---XYZ"), "WCS"),
    "no MJD-OBS": (hdr_del("SCI", "MJD-OBS"), "MJD-OBS"),
    "MJD-OBS not a number": (hdr_set("SCI", "MJD-OBS", "yesterday"), "MJD-OBS"),
    "no band": (hdr_del("SCI", "BAND"), "BAND"),
    "no MAGZP": (hdr_del("SCI", "MAGZP"), "MAGZP"),
    "MAGZP not a number": (hdr_set("SCI", "MAGZP", "n/a"), "MAGZP"),
    "unknown TIMESYS": (hdr_set("SCI", "TIMESYS", "TCB"), "TIMESYS"),
    "bad REFEPOCH": (hdr_set("SCI", "REFEPOCH", "maybe"), "REFEPOCH"),
    "negative GAIN": (hdr_set("SCI", "GAIN", -1.0), "GAIN"),
    "no VAR nor IVAR": (drop("VAR"), "VAR"),
    "VAR shape": (set_data("VAR", np.ones((NY, NX + 1), dtype=np.float32)), "VAR"),
    "IVAR shape": (rename("VAR", "IVAR", lambda d: d[:-1]), "IVAR"),
    "MASK shape": (set_data("MASK", np.zeros((NY - 2, NX), dtype=np.uint8)), "MASK"),
    "no PSF": (drop("PSF"), "PSF"),
    "even PSF": (psf_even, "PSF.*odd"),
    "PSF all zero": (set_data("PSF", np.zeros((7, 7), dtype=np.float32)), "PSF.*all zero"),
    "PSF negative sum": (set_data("PSF", -np.ones((7, 7), dtype=np.float32)), "PSF.*positive sum"),
    "PSF NaN": (psf_with(np.nan), "PSF.*NaN"),
    "PSF inf": (psf_with(np.inf), "PSF.*infinite"),
    "PSFSAMP zero": (hdr_set("PSF", "PSFSAMP", 0), "PSFSAMP"),
    "PSFSAMP fraction": (hdr_set("PSF", "PSFSAMP", 1.5), "PSFSAMP"),
    "PSFSAMP text": (hdr_set("PSF", "PSFSAMP", "two"), "PSFSAMP"),
    "every pixel masked": (
        set_data("MASK", np.ones((NY, NX), dtype=np.uint8)), "every pixel is masked"
    ),
}


@pytest.mark.parametrize("edit, where", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file(tmp_path, edit, where):
    assert_raises_file_error(write(tmp_path, "broken.fits", edit=edit), where)


def test_every_pixel_masked_by_variance_raises_without_warning(tmp_path):
    path = write(tmp_path, edit=set_data("VAR", np.zeros((NY, NX), dtype=np.float32)))
    assert_raises_file_error(path, "every pixel is masked")


@pytest.mark.parametrize("content", [b"", b"this is not a FITS file\n" * 200])
def test_not_fits(tmp_path, content):
    path = tmp_path / "junk.fits"
    path.write_bytes(content)
    assert_raises_file_error(path, "FITS")


def test_missing_file(tmp_path):
    assert_raises_file_error(tmp_path / "absent.fits", "cannot read")


# ----------------------------------------------------------------------------- many files


def test_read_epochs_order_and_path_types(tmp_path):
    paths = [write(tmp_path, f"e{i}.fits", seed=i) for i in (2, 0, 1)]
    got = read_epochs([str(paths[0]), paths[1], paths[2]])
    assert [e.exposure_id for e in got] == ["exp2", "exp0", "exp1"]
    assert [e.exposure_id for e in read_epochs(str(paths[0]))] == ["exp2"]


def test_directory_argument(tmp_path):
    d = tmp_path / "epochs"
    d.mkdir()
    for i, name in enumerate(["b.fits", "a.fit", "c.fits.gz"]):
        write_epoch(d / name, make_epoch(seed=i))
    (d / "notes.txt").write_text("not an epoch")
    got = read_epochs(d)
    assert [Path(e.path).name for e in got] == ["a.fit", "b.fits", "c.fits.gz"]


def test_empty_directory(tmp_path):
    with pytest.raises(DatasetError, match="no epoch files"):
        read_epochs(tmp_path)


def test_no_paths():
    with pytest.raises(DatasetError, match="no epoch files"):
        read_epochs([])


def test_duplicate_expid(tmp_path):
    a = write(tmp_path, "a.fits", seed=0)
    b = write(tmp_path, "b.fits", seed=1, exposure_id="exp0")
    both = re.escape(str(a)) + ".*" + re.escape(str(b))
    with pytest.raises(DatasetError, match=both + ".*EXPID"):
        read_epochs([a, b])


def test_duplicate_content(tmp_path):
    a = write(tmp_path, "a.fits", seed=0)
    b = write(tmp_path, "b.fits", seed=0, exposure_id="other")
    both = re.escape(str(a)) + ".*" + re.escape(str(b))
    with pytest.raises(DatasetError, match=both + ".*same"):
        read_epochs([a, b])


def test_mixed_time_systems(tmp_path):
    a = write(tmp_path, "a.fits", seed=0)
    b = write(tmp_path, "b.fits", seed=1, timesys="TAI")
    expected = "UTC.*" + re.escape(str(a)) + ".*TAI.*" + re.escape(str(b))
    with pytest.raises(DatasetError, match=expected):
        read_epochs([a, b])


def test_target_outside_one_footprint_is_skipped(tmp_path):
    inside = write(tmp_path, "in.fits", seed=0)
    outside = write(tmp_path, "out.fits", seed=1, wcs=make_wcs(ra=RA0 + 1.0))
    # 0.3 px from the corner pixel's outer edge: still inside
    ra, dec = make_wcs().pixel_to_world_values(-0.2, NY - 0.7)
    target = SkyCoord(ra * u.deg, dec * u.deg)
    with pytest.warns(EpochSkippedWarning, match=re.escape(str(outside)) + ".*outside"):
        got = read_epochs([inside, outside], target=target)
    assert [e.path for e in got] == [str(inside)]


def test_target_just_beyond_edge_is_outside(tmp_path):
    path = write(tmp_path, "e.fits")
    ra, dec = make_wcs().pixel_to_world_values(NX - 0.4, 5.0)
    with pytest.warns(EpochSkippedWarning), pytest.raises(DatasetError, match="outside every"):
        read_epochs([path], target=SkyCoord(ra * u.deg, dec * u.deg))


def test_target_outside_every_footprint(tmp_path):
    paths = [write(tmp_path, f"e{i}.fits", seed=i) for i in range(2)]
    target = SkyCoord(10.0 * u.deg, -30.0 * u.deg)
    with pytest.warns(EpochSkippedWarning), pytest.raises(DatasetError, match="outside every"):
        read_epochs(paths, target=target)


def test_target_in_other_frame(tmp_path):
    path = write(tmp_path, "e.fits")
    target = SkyCoord(RA0 * u.deg, DEC0 * u.deg).galactic
    assert len(read_epochs([path], target=target)) == 1
