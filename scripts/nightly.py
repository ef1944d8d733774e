"""Nightly light curves for a list of targets: fetch (new epochs appear because survey queries
are reused for at most an hour), fit, write one directory per target and a summary table.

Usage:
    python scripts/nightly.py catalogs/examples.ecsv -o nightly/ [--survey ztf] [--start MJD]
        [--method laplace] [--dir DIR]

Targets come from an ECSV/CSV table with columns name, ra, dec (deg) and optionally zero_before
(MJD) and surveys (comma-separated; default --survey). One failing target never stops the
run: its row in summary.ecsv says why. Exit code 0 when every target produced a light curve.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from transcene.api import lightcurve, write_outputs
from transcene.compile_cache import enable_compile_cache
from transcene.result import write_table
from transcene.surveys.fetch import safe_name

log = logging.getLogger("transcene.nightly")


def run(targets: Table, out: Path, *, surveys: list[str], start: float | None, method: str,
        local_dir: Path | None) -> Table:
    rows = []
    for t in targets:
        name = str(t["name"])
        zb = t["zero_before"] if "zero_before" in t.colnames else None
        zb = None if zb is None or np.ma.is_masked(zb) or not math.isfinite(float(zb)) else float(zb)
        svs = [s.strip() for s in str(t["surveys"]).split(",") if s.strip()] if "surveys" in t.colnames \
            and not np.ma.is_masked(t["surveys"]) and str(t["surveys"]).strip() else surveys
        coord = SkyCoord(float(t["ra"]) * u.deg, float(t["dec"]) * u.deg)
        t0 = time.perf_counter()
        row = {"name": name, "ra": coord.ra.deg, "dec": coord.dec.deg, "status": "", "n_epochs": 0,
               "n_failed": 0, "last_mjd": math.nan, "last_flux": math.nan, "last_flux_err": math.nan,
               "detection_sigma": math.nan, "seconds": 0.0, "message": ""}
        try:
            res = lightcurve(coord, surveys=svs, start=start, zero_before=zb, local_dir=local_dir, method=method)
            d = out / safe_name(name.strip())
            write_outputs(res.result, lightcurve=d / "lightcurve.ecsv", plot=d / "lightcurve.png",
                          fetch_report=res.report)
            lc = res.result.lightcurve()
            sci = lc[~np.asarray(lc["is_reference"])]
            row.update(status=res.result.status, n_epochs=len(lc),
                       n_failed=sum(1 for f in res.report.failures if f.exposure_id),
                       detection_sigma=max((v["sigma"] for v in res.result.detection().values() if v["dof"]),
                                           default=math.nan))
            if len(sci):
                last = sci[int(np.argmax(np.asarray(sci["mjd"])))]
                row.update(last_mjd=float(last["mjd"]), last_flux=float(last["flux"]),
                           last_flux_err=float(last["flux_err"]))
        except Exception as exc:  # noqa: BLE001 - one target's failure is reported, the run goes on
            log.exception("%s failed", name) if not isinstance(exc, ValueError) else log.error("%s: %s", name, exc)
            row.update(status="failed", message=f"{type(exc).__name__}: {exc}")
        row["seconds"] = time.perf_counter() - t0
        log.info("%s: %s (%d epochs, %.0f s)", name, row["status"], row["n_epochs"], row["seconds"])
        rows.append(row)
    summary = Table(rows=rows, names=list(rows[0]) if rows else None)
    for col, unit in (("ra", u.deg), ("dec", u.deg), ("last_mjd", u.d), ("last_flux", u.nJy),
                      ("last_flux_err", u.nJy), ("seconds", u.s)):
        if col in summary.colnames:
            summary[col].unit = unit
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("nightly"))
    p.add_argument("--survey", action="append", help="default adapter(s) for targets without a surveys column")
    p.add_argument("--start", type=float, default=None, help="earliest MJD of science epochs")
    p.add_argument("--method", default="laplace")
    p.add_argument("--dir", type=Path, default=None, help="local directory for file-reading adapters")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # targets share compiled programs within the run (shapes are bucketed) and, through the
    # on-disk cache, with the next night's run
    enable_compile_cache()
    targets = Table.read(args.targets)
    missing = [c for c in ("name", "ra", "dec") if c not in targets.colnames]
    if missing:
        print(f"{args.targets}: column(s) {missing} missing; expected name, ra, dec (deg)", file=sys.stderr)
        return 2
    summary = run(targets, args.output, surveys=args.survey or ["ztf"], start=args.start, method=args.method,
                  local_dir=args.dir)
    write_table(summary, args.output / "summary.ecsv")
    print(f"{sum(summary['status'] != 'failed')}/{len(summary)} targets fitted; summary in {args.output / 'summary.ecsv'}")
    return 0 if np.all(summary["status"] != "failed") else 1


if __name__ == "__main__":
    sys.exit(main())
