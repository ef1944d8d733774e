"""A fake ALeRCE broker on an :class:`archive_server.ArchiveServer`, serving a directory of ZTF
alert packets (for the ``ztf-alerts`` adapter tests and end-to-end runs).

Routes (the paths of the ``ztf-alerts`` descriptor under one base URL)::

    GET /ztf/v1/objects?ra&dec&radius(arcsec)   -> {"items": [{oid, meanra, meandec, ndet, ...}]}
    GET /ztf/v1/objects/<oid>/detections        -> [{candid, mjd, fid, ra, dec, rfid, has_stamp, ...}]
    GET /get_avro?oid&candid                    -> the packet file's bytes

Use::

    from alert_broker import serve_alerts
    serve_alerts(archive_server, "../shared/data/ztf-sn2021rhu/avro")
    monkeypatch.setenv("TRANSCENE_ZTF_ALERTS_URL", archive_server.url)
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from archive_server import ArchiveServer, Reply, Request

__all__ = ["serve_alerts"]


def _sep_arcsec(ra1, dec1, ra2, dec2) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h)))) * 3600.0


def serve_alerts(server: ArchiveServer, packet_dir, *, prefix: str = "") -> dict[str, bytes]:
    """Install the broker routes for the ZTF packets in ``packet_dir`` (unreadable or non-ZTF
    files are left out). Returns ``{candid: packet bytes}``. ``prefix`` is put before every path."""
    import fastavro

    packets: dict[str, bytes] = {}
    rows: dict[str, list[dict]] = {}
    for path in sorted(Path(packet_dir).rglob("*.avro")):
        content = path.read_bytes()
        try:
            records = list(fastavro.reader(io.BytesIO(content)))
        except Exception:  # noqa: BLE001 - a broker would not hold a corrupt packet
            continue
        for rec in records:
            cand = rec.get("candidate") if isinstance(rec, dict) else None
            if not isinstance(cand, dict) or not isinstance(rec.get("objectId"), str):
                continue
            candid = str(cand["candid"])
            packets[candid] = content
            rows.setdefault(rec["objectId"], []).append({
                "candid": candid, "mjd": cand["jd"] - 2400000.5, "fid": cand["fid"], "ra": cand["ra"],
                "dec": cand["dec"], "rfid": cand.get("rfid"), "has_stamp": True, "mag": cand.get("magpsf"),
                "e_mag": cand.get("sigmapsf"), "isdiffpos": 1 if cand.get("isdiffpos") in ("t", "1") else -1,
                "tid": "ztf", "oid": rec["objectId"],
            })
            for prv in rec.get("prv_candidates") or []:
                # history rows that are not packets themselves: listed, without a stamp (as ALeRCE does)
                if prv.get("candid") is not None and str(prv["candid"]) not in packets and prv.get("ra") is not None:
                    rows[rec["objectId"]].append({
                        "candid": str(prv["candid"]), "mjd": prv["jd"] - 2400000.5, "fid": prv["fid"],
                        "ra": prv["ra"], "dec": prv["dec"], "rfid": prv.get("rfid"), "has_stamp": False,
                        "tid": "ztf", "oid": rec["objectId"]})
    for oid, dets in rows.items():  # drop history rows that turned out to be packets, and duplicates
        seen, keep = set(), []
        for d in sorted(dets, key=lambda d: not d["has_stamp"]):
            if d["candid"] not in seen and (d["has_stamp"] or d["candid"] not in packets):
                seen.add(d["candid"])
                keep.append(d)
        rows[oid] = sorted(keep, key=lambda d: d["mjd"])

    def objects(req: Request) -> Reply:
        ra, dec, radius = (float(req.query[k]) for k in ("ra", "dec", "radius"))
        items = []
        for oid, dets in rows.items():
            good = [d for d in dets if d["has_stamp"]]
            mra = sum(d["ra"] for d in good) / len(good)
            mdec = sum(d["dec"] for d in good) / len(good)
            if _sep_arcsec(ra, dec, mra, mdec) <= radius:
                items.append({"oid": oid, "meanra": mra, "meandec": mdec, "ndet": len(good),
                              "firstmjd": min(d["mjd"] for d in good), "lastmjd": max(d["mjd"] for d in good)})
        return Reply(200, json.dumps({"total": len(items), "page": 1, "items": items}).encode(), "application/json")

    def detections(req: Request) -> Reply:
        parts = req.path[len(prefix):].strip("/").split("/")  # ztf v1 objects <oid> detections
        if len(parts) != 5 or parts[4] != "detections" or parts[3] not in rows:
            return Reply(404, b'{"message": "Object not found"}', "application/json")
        return Reply(200, json.dumps(rows[parts[3]]).encode(), "application/json")

    def get_avro(req: Request) -> Reply:
        content = packets.get(req.query.get("candid", ""))
        if content is None:
            return Reply(404, b'{"message": "AVRO not found"}', "application/json")
        return Reply(200, content, "app/avro+binary")

    server.route(f"{prefix}/ztf/v1/objects", objects)
    server.route(f"{prefix}/ztf/v1/objects/", detections)
    server.route(f"{prefix}/get_avro", get_avro)
    return packets
