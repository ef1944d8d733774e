"""ZTF alert packets -> epochs: the science and template cutouts of each packet of one object.

Two sources of packets (ZTF Avro schema 3.3 or 4.02):

* a local directory of ``.avro`` files, as users get them from brokers (``ctx.local_dir``, else
  the config's ``[surveys.ztf-alerts] directory``);
* the ALeRCE broker over HTTP: a cone search lists objects, the object's detections list the
  alerts, and each packet is downloaded whole (``get_avro``) through the product cache.

Each packet is turned into the per-alert cutout file layout of the ``ztf-sn2021rhu`` data set
(:func:`packet_to_cutout`: extensions SCIENCE, TEMPLATE, DIFFERENCE in DN, candidate metadata in
the primary header, approximate TAN WCS), and :mod:`transcene.ztf_alerts` builds the epochs:
noise model, saturation mask, and the PSF, which alerts do not ship. The PSF is estimated from
the data: an elliptical Moffat fitted to the transient in SCIENCE - TEMPLATE, with band-level
steps (a Moffat for the template from the per-alert estimates, a Gaussian wing measured on the
DIFFERENCE cutouts) that need all the alerts of a band. So the band-level work runs once per
adapter for each (band, reference image) group, on the group's packets, whatever start/end says:
an epoch therefore does not depend on the time window of the run that made it (the driver's
epoch cache is keyed by exposure, position and size only). :meth:`ZtfAlertAdapter.fetch` of one
alert then returns that alert's epoch from the group.

Epochs: science ``exposure_id`` = candid; the template of a group is one epoch,
``exposure_id = "ref_<rfid>"``, ``is_reference=True`` (the reference coadd is transient-free).
The requested ``size_pix`` is not used: alert stamps come as the pipeline cut them (63x63).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np

from transcene.errors import TransceneError
from transcene.surveys.base import EpochRef, NoCoverage, ServiceChanged, SurveyAdapter, SurveyError, target_pixel
from transcene.surveys.cache import ProductError
from transcene.surveys.descriptor import env_name

__all__ = [
    "ZtfAlertAdapter", "FILTERS", "read_packets", "check_packet", "packet_to_cutout", "cutout_filename",
    "cutout_wcs_header", "decode_stamp", "angular_sep_arcsec",
]

log = logging.getLogger(__name__)

#: ZTF filter id -> band name (ZTF alert schema: 1=g, 2=r, 3=i).
FILTERS = {1: "ztfg", 2: "ztfr", 3: "ztfi"}
#: Candidate fields the epochs cannot do without.
REQUIRED = ("candid", "jd", "fid", "ra", "dec", "xpos", "ypos", "magzpsci", "exptime", "rfid", "nframesref")
#: Primary-header keyword <- candidate field, as in the ztf-sn2021rhu cutout files.
HEADER_FIELDS = (
    ("CANDID", "candid"), ("JD", "jd"), ("MJD", None), ("FID", "fid"), ("FILTER", None), ("RA", "ra"),
    ("DEC", "dec"), ("XPOS", "xpos"), ("YPOS", "ypos"), ("FIELD", "field"), ("RCID", "rcid"),
    ("MAGZPSCI", "magzpsci"), ("MAGZPUNC", "magzpsciunc"), ("MAGZPRMS", "magzpscirms"), ("FWHM", "fwhm"),
    ("EXPTIME", "exptime"), ("MAGPSF", "magpsf"), ("SIGMAPSF", "sigmapsf"), ("ISDIFPOS", "isdiffpos"),
    ("DIFMGLIM", "diffmaglim"), ("SEERATIO", "seeratio"), ("SKY", "sky"), ("RFID", "rfid"),
    ("NFRMREF", "nframesref"), ("JDSTRREF", "jdstartref"), ("JDENDREF", "jdendref"),
    ("CLRCOEFF", "clrcoeff"), ("PID", "pid"), ("MAGAP", "magap"), ("SIGMAGAP", "sigmagap"),
    ("DISTNR", "distnr"), ("MAGNR", "magnr"),
)
STAMPS = (("SCIENCE", "cutoutScience"), ("TEMPLATE", "cutoutTemplate"), ("DIFFERENCE", "cutoutDifference"))
STAMP_HALF = 31  # a full stamp is 63 px: the candidate pixel +- 31


# --------------------------------------------------------------------------------------------
# Packets -> cutout files (pure functions)
# --------------------------------------------------------------------------------------------


def read_packets(content: bytes, what: str) -> list[dict]:
    """All Avro records in ``content`` (one packet file may hold several). Raises
    :class:`~transcene.surveys.cache.ProductError` naming ``what`` if it is not Avro."""
    import fastavro

    try:
        records = list(fastavro.reader(io.BytesIO(content)))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt packet
        raise ProductError(what, f"not a readable Avro alert packet: {type(exc).__name__}: {exc}") from exc
    if not records:
        raise ProductError(what, "Avro file holds no record")
    return records


def check_packet(record: Mapping[str, Any], what: str) -> dict:
    """The candidate of a ZTF alert record, checked for the fields the epochs need.

    Raises :class:`SurveyError` naming ``what`` and the field for a packet of another survey
    (e.g. a DECam/DECAT packet) or one that lacks a required field (e.g. old schemas without
    ``magzpsci`` or ``exptime``).
    """
    if not isinstance(record, Mapping):
        raise SurveyError(f"{what}: Avro record is a {type(record).__name__}, expected a ZTF alert record")
    cand = record.get("candidate")
    publisher = str(record.get("publisher") or "")
    if not isinstance(cand, Mapping) or not isinstance(record.get("objectId"), str):
        raise SurveyError(f"{what}: not a ZTF alert packet of schema 3.x/4.x (publisher {publisher or 'unknown'!r}; "
                          "expected the fields 'objectId' (string) and 'candidate' (record); it has "
                          f"{', '.join(sorted(map(str, record))[:12])})")
    if "ZTF" not in publisher.upper() and not str(record["objectId"]).startswith("ZTF"):
        raise SurveyError(f"{what}: not a ZTF alert packet (publisher {publisher!r}, objectId "
                          f"{record['objectId']!r})")
    for key in REQUIRED:
        if cand.get(key) is None:
            raise SurveyError(f"{what}: candidate.{key} missing or null (schema {record.get('schemavsn')!r}); "
                              "it is needed to build the epoch")
    if cand["fid"] not in FILTERS:
        raise SurveyError(f"{what}: candidate.fid = {cand['fid']!r}, expected one of {sorted(FILTERS)} (g, r, i)")
    return dict(cand)


def decode_stamp(cutout: Any, what: str, field: str) -> tuple[np.ndarray, str]:
    """``(image, file name)`` of one cutout record (gzipped or plain FITS bytes in ``stampData``)."""
    from astropy.io import fits

    if not isinstance(cutout, Mapping) or not cutout.get("stampData"):
        raise SurveyError(f"{what}: packet has no {field} (expected a cutout record with stampData)")
    data = bytes(cutout["stampData"])
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        # The pipeline's stamps have a non-standard SIMPLE card (astropy warns, the data are fine).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                image = hdul[0].data
                image = None if image is None else np.array(image)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a bad stamp
        raise SurveyError(f"{what}: {field} stamp does not open as (gzipped) FITS: "
                          f"{type(exc).__name__}: {exc}") from exc
    if image is None or image.ndim != 2 or min(image.shape) < 3:
        shape = None if image is None else image.shape
        raise SurveyError(f"{what}: {field} stamp has shape {shape}, expected a 2-D image")
    return image, str(cutout.get("fileName") or "")


def cutout_wcs_header(cand: Mapping[str, Any], pixel_scale_arcsec: float):
    """Approximate TAN WCS of a stamp centred on the candidate (alerts carry none).

    CRVAL = candidate ra/dec; CD = diag(-s, -s) (North down, East left); CRPIX (1-based) puts
    the candidate at ``xpos - max(1, round(xpos) - 31) + 1``: 32 + frac for a full stamp, less
    when the stamp was clipped at the low edge of the CCD.
    """
    from astropy.io import fits

    s = float(pixel_scale_arcsec) / 3600.0
    hdr = fits.Header()
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
    hdr["CRVAL1"], hdr["CRVAL2"] = float(cand["ra"]), float(cand["dec"])
    for axis, key in ((1, "xpos"), (2, "ypos")):
        pos = float(cand[key])
        hdr[f"CRPIX{axis}"] = pos - max(1, round(pos) - STAMP_HALF) + 1
    hdr["CD1_1"], hdr["CD1_2"], hdr["CD2_1"], hdr["CD2_2"] = -s, 0.0, 0.0, -s
    hdr["WCSNOTE"] = "APPROXIMATE: reconstructed from candidate ra/dec/xpos/ypos"
    return hdr


def cutout_filename(record: Mapping[str, Any]) -> str:
    """``<objectId>_<candid>_<band>.fits``, the naming of the ztf-sn2021rhu cutout files."""
    cand = record["candidate"]
    return f"{record['objectId']}_{cand['candid']}_{FILTERS[cand['fid']]}.fits"


def packet_to_cutout(record: Mapping[str, Any], what: str, *, pixel_scale_arcsec: float = 1.012,
                     source_name: str = ""):
    """The alert as a cutout file (``HDUList``) that :func:`transcene.ztf_alerts.read_ztf_alert_cutout`
    reads: primary header = candidate metadata; SCIENCE, TEMPLATE, DIFFERENCE in DN with the
    approximate WCS of :func:`cutout_wcs_header`. Raises :class:`SurveyError` naming ``what``."""
    from astropy.io import fits

    cand = check_packet(record, what)
    primary = fits.PrimaryHDU()
    hdr = primary.header
    hdr["OBJECT"] = str(record["objectId"])
    for key, field in HEADER_FIELDS:
        if key == "MJD":
            value = float(cand["jd"]) - 2400000.5
        elif key == "FILTER":
            value = FILTERS[cand["fid"]]
        else:
            value = cand.get(field)
        if value is not None:
            hdr[key] = value
    if source_name:
        hdr["ALRTFILE"] = source_name
    hdr.add_comment("ZTF alert cutouts (63x63, 1.01 arcsec/pix, DN); no WCS/PSF in original cutouts")
    wcs = cutout_wcs_header(cand, pixel_scale_arcsec)
    hdus = [primary]
    shape = None
    for ext, field in STAMPS:
        image, name = decode_stamp(record.get(field), what, field)
        if shape is None:
            shape = image.shape
        elif image.shape != shape:
            raise SurveyError(f"{what}: {field} shape {image.shape} differs from cutoutScience {shape}")
        h = fits.Header()
        h["EXTNAME"] = ext
        if name:
            h["ORIGNAME"] = name
        h.update(wcs)
        hdus.append(fits.ImageHDU(image, header=h, name=ext))
    ny, nx = shape
    x, y = wcs["CRPIX1"] - 1, wcs["CRPIX2"] - 1
    if not (-0.5 <= x <= nx - 0.5 and -0.5 <= y <= ny - 0.5):
        raise SurveyError(f"{what}: the candidate (xpos {cand['xpos']}, ypos {cand['ypos']}) falls at stamp "
                          f"pixel ({x:.1f}, {y:.1f}), outside the {nx}x{ny} stamp")
    return fits.HDUList(hdus)


def angular_sep_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle separation (haversine), arcsec; inputs in degrees."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))) * 3600.0


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Alert:
    """One alert as listed by a query (from a packet or a broker row)."""

    object_id: str
    candid: str
    band: str
    mjd: float  # mid-exposure, UTC
    ra: float
    dec: float
    rfid: int | None
    ref_mjd: float  # middle of the reference coadd's dates (NaN if unknown)
    source: Mapping[str, Any]  # {"path", "index"} or {"url", "params"}


class ZtfAlertAdapter(SurveyAdapter):
    """ZTF alert packets of the object at the requested position (local directory or ALeRCE)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self._groups: dict[tuple, tuple[dict[str, Any], dict[str, TransceneError]]] = {}

    # -- settings --------------------------------------------------------------------------
    def _section(self) -> Mapping[str, Any]:
        return (self.ctx.config.get("surveys", {}) or {}).get(self.name, {}) or {}

    def directory(self) -> Path | None:
        """The local packet directory, or None to use the broker."""
        if self.ctx.local_dir is not None:
            return Path(self.ctx.local_dir)
        d = self._section().get("directory")
        return Path(d).expanduser() if d else None

    @property
    def match_radius_arcsec(self) -> float:
        return float(self._section().get("match_radius_arcsec",
                                         self.ctx.descriptor.extra.get("match_radius_arcsec", 2.0)))

    def packet_url(self) -> str:
        """URL of the packet endpoint: its own host unless overridden (see the descriptor)."""
        desc = self.ctx.descriptor
        base = os.environ.get(env_name(self.name, "packet_url")) or self._section().get("packet_url")
        if not base:
            overridden = self.ctx.url() != desc.base_url.rstrip("/")
            base = self.ctx.url() if overridden else str(desc.extra.get("packet_base_url") or self.ctx.url())
        return base.rstrip("/") + "/" + desc.endpoints["packet"].lstrip("/")

    # -- query -----------------------------------------------------------------------------
    def query(self, coord, *, size_pix: int, bands: Sequence[str] | None = None,
              start: float | None = None, end: float | None = None) -> list[EpochRef]:
        from transcene.surveys.fetch import band_matches

        ra, dec = float(coord.icrs.ra.deg), float(coord.icrs.dec.deg)
        directory = self.directory()
        if directory is not None:
            alerts, broken = self._scan_directory(directory)
            where = str(directory)
        else:
            alerts, broken, where = self._query_broker(ra, dec), [], "ALeRCE"
        radius = self.match_radius_arcsec
        near = [a for a in alerts if angular_sep_arcsec(ra, dec, a.ra, a.dec) <= radius]
        refs = [self._broken_ref(path, exc) for path, exc in broken]
        if not near:
            if refs:
                return refs
            raise NoCoverage(f"{self.name}: no ZTF alert within {radius:g} arcsec of "
                             f"({ra:.6f}, {dec:.6f}) in {where}")
        # One object: the one with the candidate closest to the position.
        best = min(near, key=lambda a: angular_sep_arcsec(ra, dec, a.ra, a.dec))
        others = sorted({a.object_id for a in near} - {best.object_id})
        if others:
            log.info("%s: also near the position: %s; using %s", self.name, ", ".join(others), best.object_id)
        near = [a for a in near if a.object_id == best.object_id and band_matches(a.band, bands)]

        groups: dict[tuple[str, int | None], list[_Alert]] = {}
        for a in sorted(near, key=lambda a: a.candid):
            groups.setdefault((a.band, a.rfid), []).append(a)
        for (band, rfid), members in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            # the band-level PSF steps use every alert of the group: a new alert must rebuild the
            # cached epochs of the others
            salt = hashlib.sha256(" ".join(m.candid for m in members).encode()).hexdigest()[:16]
            locator = {"group": [[m.candid, dict(m.source)] for m in members], "band": band, "rfid": rfid,
                       "cache_salt": salt}
            for m in members:
                if (start is None or m.mjd >= start) and (end is None or m.mjd <= end):
                    refs.append(EpochRef(self.name, m.candid, band, m.mjd, "science", "UTC",
                                         locator={**locator, "candid": m.candid},
                                         meta={"objectId": m.object_id, "ra": m.ra, "dec": m.dec}))
            ref_mjd = float(np.nanmedian([m.ref_mjd for m in members])) if any(
                math.isfinite(m.ref_mjd) for m in members) else math.nan
            refs.append(EpochRef(self.name, _template_id(band, rfid), band, ref_mjd, "reference", "UTC",
                                 locator=locator, meta={"objectId": best.object_id, "n_alerts": len(members)}))
        return refs

    def _broken_ref(self, path: str, exc: TransceneError) -> EpochRef:
        from transcene.surveys.fetch import safe_name

        return EpochRef(self.name, f"unreadable_{safe_name(Path(path).name)}", "", math.nan, "science", "UTC",
                        locator={"error": str(exc), "problem": getattr(exc, "problem", None), "path": path})

    def _scan_directory(self, directory: Path) -> tuple[list[_Alert], list[tuple[str, TransceneError]]]:
        if not directory.is_dir():
            raise SurveyError(f"{self.name}: packet directory {directory} does not exist")
        files = sorted(directory.rglob("*.avro"))
        if not files:
            raise NoCoverage(f"{self.name}: no alert packets (*.avro) in {directory}")
        alerts, broken = [], []
        for path in files:
            try:
                records = read_packets(path.read_bytes(), str(path))
                for i, rec in enumerate(records):
                    what = str(path) + (f" [record {i}]" if len(records) > 1 else "")
                    alerts.append(_alert_from_packet(rec, what, {"path": str(path), "index": i}))
            except (OSError, TransceneError) as exc:
                err = exc if isinstance(exc, TransceneError) else ProductError(str(path), f"cannot read: {exc}")
                log.warning("%s: %s", self.name, err)
                broken.append((str(path), err))
        return alerts, broken

    def _query_broker(self, ra: float, dec: float) -> list[_Alert]:
        import json

        cache, client = self.ctx.cache, self.ctx.client
        url = self.ctx.endpoint("objects")
        radius = self.match_radius_arcsec
        params = {"ra": f"{ra:.7f}", "dec": f"{dec:.7f}", "radius": f"{radius:g}", "page_size": 20}
        answer = _json(cache.metadata(client, self.name, url, params, kind="json", what=f"ALeRCE objects {url}"), url)
        if not isinstance(answer, Mapping) or not isinstance(answer.get("items"), list):
            raise ServiceChanged(f"{url}: expected a JSON object with a list 'items', got {str(answer)[:200]!r}")
        objects = []
        for row in answer["items"]:
            if not isinstance(row, Mapping) or not all(row.get(k) is not None for k in ("oid", "meanra", "meandec")):
                raise ServiceChanged(f"{url}: object row lacks oid/meanra/meandec: {json.dumps(row)[:200]}")
            objects.append((float(angular_sep_arcsec(ra, dec, row["meanra"], row["meandec"])), str(row["oid"])))
        if not objects:
            raise NoCoverage(f"{self.name}: ALeRCE lists no ZTF object within {radius:g} arcsec of ({ra:.6f}, {dec:.6f})")
        oid = min(objects)[1]
        det_url = self.ctx.endpoint("detections").replace("{oid}", quote(oid, safe=""))
        rows = _json(cache.metadata(client, self.name, det_url, kind="json", what=f"ALeRCE detections {det_url}"), det_url)
        if not isinstance(rows, list):
            raise ServiceChanged(f"{det_url}: expected a JSON list of detections, got {str(rows)[:200]!r}")
        exptime = float(self.ctx.descriptor.extra.get("exptime_s", 30.0))
        packet_url = self.packet_url()
        alerts = []
        for row in rows:
            missing = [k for k in ("candid", "mjd", "fid", "ra", "dec") if not isinstance(row, Mapping) or k not in row]
            if missing:
                raise ServiceChanged(f"{det_url}: detection row lacks {', '.join(missing)}: {str(row)[:200]}")
            if row["candid"] in (None, "") or row.get("has_stamp") is False or row["fid"] not in FILTERS:
                continue  # detections from a packet's history have no packet of their own
            candid = str(int(row["candid"]))
            rfid = row.get("rfid")
            alerts.append(_Alert(oid, candid, FILTERS[row["fid"]], float(row["mjd"]) + exptime / 2 / 86400,
                                 float(row["ra"]), float(row["dec"]), None if rfid is None else int(rfid), math.nan,
                                 {"url": packet_url, "params": {"oid": oid, "candid": candid}}))
        return alerts

    # -- fetch -----------------------------------------------------------------------------
    def fetch(self, ref: EpochRef, coord, *, size_pix: int):
        loc = ref.locator
        if "error" in loc:  # a packet file of the directory that could not be read at query time
            if loc.get("problem") is not None:
                raise ProductError(loc["path"], loc["problem"])
            raise SurveyError(loc["error"])
        if "group" not in loc:
            raise SurveyError(f"{self.name} {ref.exposure_id}: locator has no alert group (not from this adapter?)")
        epochs, errors = self._group(loc)
        if ref.kind == "reference":
            ep = epochs.get(ref.exposure_id)
            if ep is None:
                detail = "; ".join(f"{c}: {e}" for c, e in sorted(errors.items()))
                raise SurveyError(f"{self.name} {ref.exposure_id}: no usable alert of band {ref.band} to take "
                                  f"the template from ({detail or 'none listed'})")
        else:
            if ref.exposure_id in errors:
                raise errors[ref.exposure_id]
            ep = epochs.get(ref.exposure_id)
            if ep is None:
                raise SurveyError(f"{self.name} {ref.exposure_id}: the alert's packet gave no epoch")
        target_pixel(ep.wcs, coord, ep.image.shape, f"{self.name} {ref.exposure_id}", noun="stamp")
        return [ep]

    def _group(self, loc: Mapping[str, Any]):
        """Epochs of one (band, rfid) group of alerts, computed once: ``({exposure_id: Epoch},
        {candid: error})``."""
        from transcene.ztf_alerts import read_ztf_alert_cutout, ztf_sn2021rhu_epochs

        key = tuple((c, repr(sorted(s.items()))) for c, s in loc["group"])
        if key in self._groups:
            return self._groups[key]
        errors: dict[str, TransceneError] = {}
        scale = self.ctx.descriptor.pixel_scale_arcsec
        with tempfile.TemporaryDirectory(prefix="transcene-alerts-") as tmp:
            files: dict[str, tuple[Path, str]] = {}  # candid -> (cutout file, source shown)
            for candid, source in loc["group"]:
                shown = source.get("path") or f"{source.get('url')}?oid={source['params']['oid']}&candid={candid}"
                what = f"alert {candid} ({shown})"
                try:
                    record = self._load(candid, source, what)
                    hdul = packet_to_cutout(record, what, pixel_scale_arcsec=scale,
                                            source_name=Path(str(source.get("path") or "")).name or f"{candid}.avro")
                    path = Path(tmp) / cutout_filename(record)
                    hdul.writeto(path)
                    files[candid] = (path, shown)
                except TransceneError as exc:
                    log.warning("%s: %s", self.name, exc)
                    errors[candid] = exc
            epochs = []
            while files:
                try:
                    epochs = ztf_sn2021rhu_epochs(tmp)
                    break
                except Exception as exc:  # noqa: BLE001 - find the packet(s) the reader cannot use
                    log.warning("%s: band %s: %s: %s; checking each alert", self.name, loc["band"], type(exc).__name__, exc)
                    bad = []
                    for candid, (path, shown) in files.items():
                        try:
                            read_ztf_alert_cutout(path)
                        except Exception as one:  # noqa: BLE001 - wrapped with the packet named
                            errors[candid] = SurveyError(f"alert {candid} ({shown}): cannot build its epochs: "
                                                         f"{type(one).__name__}: {one}")
                            bad.append(candid)
                    if not bad:
                        raise SurveyError(f"{self.name} band {loc['band']}: building the epochs failed: "
                                          f"{type(exc).__name__}: {exc}") from exc
                    for candid in bad:
                        files.pop(candid)[0].unlink()
            shown_by_path = {str(p): s for p, s in files.values()}
            out = {}
            for ep in epochs:
                exp = ep.exposure_id if not ep.is_reference else _template_id(loc["band"], loc["rfid"])
                out[exp] = ep.replace(survey=self.name, exposure_id=exp, path=shown_by_path.get(ep.path, ep.path))
        self._groups[key] = (out, errors)
        return out, errors

    def _load(self, candid: str, source: Mapping[str, Any], what: str) -> Mapping[str, Any]:
        if "path" in source:
            try:
                content = Path(source["path"]).read_bytes()
            except OSError as exc:
                raise ProductError(source["path"], f"cannot read: {exc}") from exc
            records = read_packets(content, source["path"])
            index = int(source.get("index", 0))
            if index >= len(records):
                raise SurveyError(f"{what}: record {index} missing (file holds {len(records)})")
            record = records[index]
        else:
            path, _ = self.ctx.cache.product(self.ctx.client, self.name, source["url"], source["params"],
                                             kind="avro", ext="avro", what=what)
            records = read_packets(path.read_bytes(), what)
            match = [r for r in records if str((r.get("candidate") or {}).get("candid", r.get("candid"))) == candid]
            if not match:
                raise SurveyError(f"{what}: packet holds no alert with candid {candid}")
            record = match[0]
        cand = check_packet(record, what)
        if str(cand["candid"]) != candid:
            raise SurveyError(f"{what}: packet candid {cand['candid']} differs from the listed {candid}")
        return record


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _template_id(band: str, rfid: int | None) -> str:
    return f"ref_{rfid}" if rfid is not None else f"ref_{band}"


def _alert_from_packet(record: Mapping[str, Any], what: str, source: Mapping[str, Any]) -> _Alert:
    cand = check_packet(record, what)
    if cand.get("jdstartref") is not None and cand.get("jdendref") is not None:
        ref_mjd = 0.5 * (float(cand["jdstartref"]) + float(cand["jdendref"])) - 2400000.5
    else:
        ref_mjd = math.nan
    mjd = float(cand["jd"]) - 2400000.5 + float(cand["exptime"]) / 2.0 / 86400.0
    return _Alert(str(record["objectId"]), str(cand["candid"]), FILTERS[cand["fid"]], mjd, float(cand["ra"]),
                  float(cand["dec"]), int(cand["rfid"]), ref_mjd, dict(source))


def _json(content: bytes, url: str):
    import json

    try:
        return json.loads(content)
    except ValueError as exc:
        raise ServiceChanged(f"{url}: answer is not JSON: {exc}") from exc
