"""The shared survey machinery: descriptors and overrides, credentials, HTTP retries, the cache
and the fetch driver, against the loopback archive server with a minimal adapter."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits

from transcene.surveys import (Cache, DescriptorError, DownloadError, EpochRef, ProductError, RetryPolicy,
                               SurveyAdapter, SurveyContext, fetch_epochs, load_descriptors)
from transcene.surveys.config import Credentials, cache_root, credentials_for, load_config
from transcene.surveys.descriptor import SurveyDescriptor, env_name, read_descriptor
from transcene.surveys.fetch import band_matches
from transcene.surveys.http import HttpClient

from archive_server import Reply, html_error

FAST = RetryPolicy(attempts=3, backoff_s=0.001, max_wait_s=0.01, budget_s=5, timeout_s=5)


def _desc(**kw) -> SurveyDescriptor:
    base = dict(name="toy", title="toy survey", adapter="x:Y", bands=("toy_g", "toy_r"), pixel_scale_arcsec=1.0,
                default_size_pix=15, zero_point="ZP keyword", time="MJD UTC", astrometric_precision_arcsec=0.05,
                base_url="https://toy.example.org/api", endpoints={"cutout": "cutout", "search": "/search"})
    base.update(kw)
    return SurveyDescriptor(**base)


# -- descriptors -------------------------------------------------------------------------------

def test_repository_descriptors_are_valid_and_named_after_their_files():
    descs = load_descriptors()
    assert descs, "the surveys/ folder holds no descriptor"
    for name, d in descs.items():
        assert Path(d.path).stem == name
        assert d.bands and d.pixel_scale_arcsec > 0 and d.needs_credentials in ("no", "optional", "yes")


def test_url_overrides_environment_then_config_then_descriptor():
    d = _desc(name="ztf-alerts")
    assert env_name("ztf-alerts", "url") == "TRANSCENE_ZTF_ALERTS_URL"
    assert d.url({}, environ={}) == "https://toy.example.org/api"
    cfg = {"surveys": {"ztf-alerts": {"url": "http://mirror/"}}}
    assert d.url(cfg, environ={}) == "http://mirror"
    assert d.url(cfg, environ={"TRANSCENE_ZTF_ALERTS_URL": "http://127.0.0.1:9"}) == "http://127.0.0.1:9"
    assert d.endpoint("search", cfg, environ={}) == "http://mirror/search"
    with pytest.raises(DescriptorError, match="no endpoint 'psf'"):
        d.endpoint("psf", environ={})


def test_bad_descriptor_names_file_and_key(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('name = "bad"\ntitle = "x"\n')
    with pytest.raises(DescriptorError, match=r"bad\.toml: required key 'adapter' missing"):
        read_descriptor(p)
    p.write_text(Path(load_descriptors()["fits"].path).read_text())
    with pytest.raises(DescriptorError, match="differs from the file name"):
        read_descriptor(p)


def test_credentials_from_env_or_config_never_in_repr(tmp_path):
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text('[surveys.ztf]\nuser = "me"\npassword = "s3cret"\n')
    cfg = load_config(cfg_file)
    c = credentials_for("ztf", cfg, environ={})
    assert c and "s3cret" not in repr(c)
    assert c.headers()["Authorization"].startswith("Basic ")
    env = credentials_for("ztf", cfg, environ={"TRANSCENE_ZTF_TOKEN": "tok"})
    assert env.headers() == {"Authorization": "Bearer tok"}
    assert not Credentials()
    assert cache_root({}, environ={"XDG_CACHE_HOME": "/x"}) == Path("/x/transcene")


def test_unreadable_config_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text("[surveys\n")
    with pytest.raises(DescriptorError, match="config.toml"):
        load_config(p)


def test_band_matching():
    assert band_matches("ztfg", ["g"]) and band_matches("decam_r", ["r", "z"])
    assert not band_matches("ztfr", ["g"]) and band_matches("ztfr", None)
    assert band_matches("ps1_y", ["ps1_y"]) and not band_matches("ps1_y", ["ps1_i"])


# -- HTTP -------------------------------------------------------------------------------------

def test_retries_transient_failures_then_succeeds(archive_server):
    archive_server.route("/x", lambda r: Reply(200, b"payload"))
    archive_server.fail_first(2, prefix="/x")
    waits = []
    client = HttpClient(policy=FAST, sleep=waits.append)
    assert client.get(archive_server.url + "/x").content == b"payload"
    assert archive_server.count("/x") == 3 and len(waits) == 2


def test_gives_up_after_attempts_and_names_the_url(archive_server):
    archive_server.route("/x", lambda r: Reply(503, b"busy"))
    client = HttpClient(policy=FAST, sleep=lambda s: None)
    with pytest.raises(DownloadError, match=r"/x\?a=1: HTTP 503.*gave up after 3 attempts") as exc:
        client.get(archive_server.url + "/x", {"a": 1})
    assert exc.value.status == 503 and archive_server.count("/x") == 3


def test_client_errors_are_not_retried(archive_server):
    archive_server.route("/x", lambda r: Reply(404, b"nope"))
    with pytest.raises(DownloadError, match="HTTP 404"):
        HttpClient(policy=FAST, sleep=lambda s: None).get(archive_server.url + "/x")
    assert archive_server.count("/x") == 1


def test_time_budget_bounds_the_retries(archive_server):
    archive_server.route("/x", lambda r: Reply(429, b"slow down", headers={"Retry-After": "100"}))
    now = [0.0]
    client = HttpClient(policy=RetryPolicy(attempts=10, backoff_s=1, max_wait_s=30, budget_s=45),
                        sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    with pytest.raises(DownloadError, match="HTTP 429"):
        client.get(archive_server.url + "/x")
    assert now[0] <= 45 and archive_server.count("/x") == 2  # Retry-After 100 s capped at 30 s, then out of budget


def test_connection_refused_is_a_download_error():
    client = HttpClient(policy=RetryPolicy(attempts=2, backoff_s=0.001, budget_s=2, timeout_s=1), sleep=lambda s: None)
    with pytest.raises(DownloadError, match="ConnectionError"):
        client.get("http://127.0.0.1:9/never")


def test_credentials_travel_in_headers_only(archive_server):
    seen = []
    archive_server.route("/x", lambda r: (seen.append(r), Reply(200, b"ok"))[1])
    HttpClient(policy=FAST, headers=Credentials(token="tok").headers()).get(archive_server.url + "/x", {"q": 1})
    assert seen[0].headers["Authorization"] == "Bearer tok" and "tok" not in seen[0].key


def test_rate_limit_spaces_requests(archive_server):
    archive_server.route("/x", lambda r: Reply(200, b"ok"))
    now, waits = [0.0], []
    client = HttpClient(policy=FAST, rate_limit_per_s=2, sleep=lambda s: (waits.append(s), now.__setitem__(0, now[0] + s)),
                        clock=lambda: now[0])
    for _ in range(3):
        client.get(archive_server.url + "/x")
    assert waits == pytest.approx([0.5, 0.5])


# -- cache ------------------------------------------------------------------------------------

def _fits_bytes(value=1.0) -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(np.full((3, 3), value, np.float32)).writeto(buf)
    return buf.getvalue()


def test_cache_keys_separate_positions_and_sizes_and_reuse_the_same(archive_server, tmp_path):
    archive_server.route("/cut", lambda r: Reply(200, _fits_bytes(float(r.query["size"]))))
    cache, client = Cache(tmp_path), HttpClient(policy=FAST)
    url = archive_server.url + "/cut"
    p1, hit1 = cache.product(client, "toy", url, {"ra": 1.0, "dec": 2.0, "size": 10})
    p2, hit2 = cache.product(client, "toy", url, {"ra": 1.0, "dec": 2.0, "size": 20})
    p3, _ = cache.product(client, "toy", url, {"ra": 1.5, "dec": 2.0, "size": 10})
    p4, hit4 = cache.product(client, "toy", url, {"size": 10, "dec": 2.0, "ra": 1.0})
    assert len({p1, p2, p3}) == 3 and p4 == p1
    assert (hit1, hit2, hit4) == (False, False, True) and archive_server.count("/cut") == 3
    assert fits.getdata(p2)[0, 0] == 20
    refreshed = Cache(tmp_path, refresh=True)
    assert refreshed.product(client, "toy", url, {"ra": 1.0, "dec": 2.0, "size": 10})[1] is False


@pytest.mark.parametrize("bad", ["html", "truncated", "empty", "garbage"])
def test_bad_products_never_enter_the_cache(archive_server, tmp_path, bad):
    good = _fits_bytes() + b"\0" * 0
    if bad == "html":
        archive_server.route("/cut", lambda r: html_error(200))
    elif bad == "truncated":
        archive_server.route("/cut", lambda r: Reply(200, good))
        archive_server.truncate(prefix="/cut")
    elif bad == "empty":
        archive_server.route("/cut", lambda r: Reply(200, b""))
    else:
        archive_server.route("/cut", lambda r: Reply(200, b"SIMPLE  = nonsense" * 10))
    cache = Cache(tmp_path)
    with pytest.raises((ProductError, DownloadError)):
        cache.product(HttpClient(policy=FAST, sleep=lambda s: None), "toy", archive_server.url + "/cut", {"a": 1})
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_metadata_is_reused_for_at_most_an_hour(archive_server, tmp_path):
    n = [0]
    archive_server.route("/q", lambda r: (n.__setitem__(0, n[0] + 1), Reply(200, f"answer {n[0]}".encode()))[1])
    now = [1e9]
    cache = Cache(tmp_path, metadata_ttl_s=86400, clock=lambda: now[0])
    assert cache.metadata_ttl_s == 3600  # never longer than an hour, whatever is asked
    client = HttpClient(policy=FAST)
    import os

    a = cache.metadata(client, "toy", archive_server.url + "/q")
    for p in tmp_path.rglob("*.bin"):
        os.utime(p, (now[0], now[0]))
    now[0] += 3599
    assert cache.metadata(client, "toy", archive_server.url + "/q") == a
    now[0] += 2
    assert cache.metadata(client, "toy", archive_server.url + "/q") != a


# -- the fetch driver with a toy adapter ------------------------------------------------------

def _toy_epoch_fits(coord: SkyCoord, size: int, mjd: float, band: str) -> bytes:
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [coord.ra.deg, coord.dec.deg]
    w.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
    w.wcs.cdelt = [-1 / 3600, 1 / 3600]
    hdr = w.to_header()
    hdr["MJD"], hdr["BAND"] = mjd, band
    buf = io.BytesIO()
    fits.PrimaryHDU(np.random.default_rng(0).normal(size=(size, size)).astype(np.float32), hdr).writeto(buf)
    return buf.getvalue()


class ToyAdapter(SurveyAdapter):
    """Search answers 'mjd band' lines; each cutout is a FITS image with a TAN WCS at the target."""

    def query(self, coord, *, size_pix, bands=None, start=None, end=None):
        text = self.ctx.cache.metadata(self.ctx.client, self.name, self.ctx.endpoint("search"),
                                       {"ra": coord.ra.deg, "dec": coord.dec.deg}).decode()
        refs = []
        for i, line in enumerate(text.split("\n")):
            if line.strip():
                mjd, band = line.split()
                refs.append(EpochRef(self.name, f"toy{i:03d}", band, float(mjd), kind="reference" if i == 0 else "science"))
        return refs

    def fetch(self, ref, coord, *, size_pix):
        from astropy.wcs import WCS

        from transcene.epoch import Epoch

        path, _ = self.ctx.cache.product(self.ctx.client, self.name, self.ctx.endpoint("cutout"),
                                         {"id": ref.exposure_id, "ra": coord.ra.deg, "dec": coord.dec.deg,
                                          "size": size_pix})
        with fits.open(path) as hdul:
            img, hdr = hdul[0].data.astype(float), hdul[0].header
        psf = np.zeros((5, 5))
        psf[2, 2] = 1.0
        return [Epoch(image=img, variance=np.ones_like(img), mask=np.zeros(img.shape, bool), psf=psf, wcs=WCS(hdr),
                      mjd=hdr["MJD"], band=hdr["BAND"], zeropoint=25.0, survey=self.name,
                      exposure_id=ref.exposure_id, is_reference=ref.kind == "reference")]


def _toy(archive_server, n=10):
    lines = "\n".join(f"{59000 + i} toy_{'gr'[i % 2]}" for i in range(n))
    archive_server.route("/search", lambda r: Reply(200, lines.encode(), "text/plain"))
    archive_server.route("/cutout", lambda r: Reply(200, _toy_epoch_fits(
        SkyCoord(float(r.query["ra"]), float(r.query["dec"]), unit="deg"), int(r.query["size"]),
        59000 + int(r.query["id"][3:]), f"toy_{'gr'[int(r.query['id'][3:]) % 2]}"), "image/fits"))
    desc = _desc(base_url=archive_server.url)
    from transcene.surveys.config import cache_root
    from transcene.surveys.http import HttpClient

    def make(refresh=False):
        ctx = SurveyContext(descriptor=desc, client=HttpClient(policy=FAST, sleep=lambda s: None),
                            cache=Cache(cache_root({}), refresh=refresh), credentials=Credentials())
        return ToyAdapter(ctx)
    return desc, make


def _all_cache_files_open(root: Path) -> int:
    n = 0
    for p in root.rglob("*"):
        if p.is_file():
            assert not p.name.startswith(".part-"), f"temporary file left in the cache: {p}"
            if p.suffix == ".fits":
                with fits.open(p) as hdul:
                    hdul.verify("exception")
                n += 1
    return n


def test_fetch_driver_reports_failed_epochs_and_keeps_the_cache_clean(archive_server, survey_env):
    desc, make = _toy(archive_server, n=20)
    archive_server.fail_fraction(0.2, prefix="/cutout", status=503)
    coord = SkyCoord(150.0, 2.0, unit="deg")
    rep = fetch_epochs(coord, surveys=["toy"], descriptors={"toy": desc}, config={}, adapters={"toy": make()})
    failed = {f.exposure_id for f in rep.failures}
    assert 1 <= len(failed) <= 8, failed  # a fixed 20 % of the cutouts, reproducible
    assert len(rep.epochs) == 20 - len(failed) and rep.n_downloaded == len(rep.epochs)
    assert all("HTTP 503" in f.reason and f.error == "DownloadError" for f in rep.failures)
    assert {e.exposure_id for e in rep.epochs}.isdisjoint(failed)
    assert _all_cache_files_open(survey_env / "cache") >= len(rep.epochs)
    t = rep.failure_table()
    assert len(t) == len(failed) and t["mjd"].unit == "d"


def test_second_run_is_served_from_the_cache(archive_server, survey_env):
    desc, make = _toy(archive_server, n=6)
    coord = SkyCoord(150.0, 2.0, unit="deg")
    first = fetch_epochs(coord, surveys=["toy"], descriptors={"toy": desc}, config={}, adapters={"toy": make()})
    n_requests = len(archive_server.requests)
    second = fetch_epochs(coord, surveys=["toy"], descriptors={"toy": desc}, config={}, adapters={"toy": make()})
    assert len(archive_server.requests) == n_requests  # metadata within the hour, epochs from files
    assert second.n_cached == 6 and second.n_downloaded == 0
    for a, b in zip(first.epochs, second.epochs):
        assert a.exposure_id == b.exposure_id and np.allclose(a.image, b.image)
    third = fetch_epochs(coord, surveys=["toy"], descriptors={"toy": desc}, config={},
                         adapters={"toy": make(refresh=True)}, refresh=True)
    assert third.n_downloaded == 6 and len(archive_server.requests) == n_requests + 7
    # another position never reuses these epochs
    other = fetch_epochs(SkyCoord(150.01, 2.0, unit="deg"), surveys=["toy"], descriptors={"toy": desc}, config={},
                         adapters={"toy": make()})
    assert other.n_downloaded == 6


def test_time_and_band_selection_keep_references(archive_server, survey_env, tmp_path):
    desc, make = _toy(archive_server, n=8)
    rep = fetch_epochs(SkyCoord(150.0, 2.0, unit="deg"), surveys=["toy"], descriptors={"toy": desc}, config={},
                       adapters={"toy": make()}, bands=["g"], start=59003, end=59006, out_dir=tmp_path / "out")
    ids = sorted(e.exposure_id for e in rep.epochs)
    assert ids == ["toy000", "toy004", "toy006"]  # the reference (mjd 59000) is kept despite start
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"toy_{i}.fits" for i in ids]


def test_a_survey_that_cannot_be_queried_is_reported_not_raised(archive_server, survey_env):
    desc, make = _toy(archive_server)
    archive_server.route("/search", lambda r: Reply(500, b"down"))
    events = []
    rep = fetch_epochs(SkyCoord(150.0, 2.0, unit="deg"), surveys=["toy", "nonesuch"],
                       descriptors={"toy": desc}, config={}, adapters={"toy": make()}, progress=events.append)
    assert [f.survey for f in rep.failures] == ["toy", "nonesuch"]
    assert "unknown survey 'nonesuch'" in rep.failures[1].reason
    assert rep.epochs == [] and events[-1].stage == "done" and math.isnan(rep.failures[0].mjd)


def test_html_metadata_and_invalid_answers_are_not_cached(archive_server, tmp_path):
    archive_server.route("/q", lambda r: html_error(200))
    cache, client = Cache(tmp_path), HttpClient(policy=FAST)
    with pytest.raises(ProductError, match="HTML"):
        cache.metadata(client, "toy", archive_server.url + "/q")
    archive_server.route("/q", lambda r: Reply(200, b"col_a col_b\n"))

    def needs_c(content: bytes):
        if b"col_c" not in content:
            raise ProductError("toy search", "column col_c missing")
    with pytest.raises(ProductError, match="col_c"):
        cache.metadata(client, "toy", archive_server.url + "/q", validate=needs_c)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    with pytest.raises(ValueError, match="attempts >= 1"):
        RetryPolicy(attempts=0)


def test_config_sets_the_retry_policy():
    from transcene.surveys.registry import retry_policy

    pol = retry_policy({"http": {"attempts": 2, "backoff_s": 0.5}})
    assert (pol.attempts, pol.backoff_s, pol.budget_s) == (2, 0.5, RetryPolicy().budget_s)
    with pytest.raises(DescriptorError, match=r"unknown key\(s\) \['retries'\]"):
        retry_policy({"http": {"retries": 3}})


def test_epoch_cache_key_takes_the_adapters_salt():
    from transcene.surveys.fetch import _epoch_key

    coord = SkyCoord(150.0, 2.0, unit="deg")
    a = EpochRef("toy", "e1", "toy_g", 59000.0, locator={"cache_salt": "group-of-3"})
    b = EpochRef("toy", "e1", "toy_g", 59000.0, locator={"cache_salt": "group-of-4"})
    assert _epoch_key(a, coord, 21) != _epoch_key(b, coord, 21)
    assert _epoch_key(a, coord, 21) == _epoch_key(EpochRef("toy", "e1", "toy_g", 59000.0,
                                                           locator={"cache_salt": "group-of-3"}), coord, 21)
    assert _epoch_key(a, coord, 21) != _epoch_key(a, coord, 23)


def test_an_unexpected_adapter_error_fails_that_epoch_only(archive_server, survey_env, caplog):
    desc, make = _toy(archive_server, n=4)
    adapter = make()
    real = adapter.fetch

    def flaky(ref, coord, *, size_pix):
        if ref.exposure_id == "toy002":
            raise KeyError("BUNIT")  # e.g. a header an adapter did not expect to lack
        return real(ref, coord, size_pix=size_pix)

    adapter.fetch = flaky
    rep = fetch_epochs(SkyCoord(150.0, 2.0, unit="deg"), surveys=["toy"], descriptors={"toy": desc}, config={},
                       adapters={"toy": adapter})
    assert len(rep.epochs) == 3 and [f.exposure_id for f in rep.failures] == ["toy002"]
    assert rep.failures[0].error == "KeyError" and "unexpected KeyError" in rep.failures[0].reason
    assert any(r.exc_info for r in caplog.records)  # the traceback is logged for the bug report
