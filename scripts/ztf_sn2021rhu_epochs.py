"""Write the SN 2021rhu ZTF alert cutouts as transcene epoch files, one per epoch.

Usage: python scripts/ztf_sn2021rhu_epochs.py OUTDIR [--data DIR] [--templates {one_per_band,all}]
           [--overwrite]

Files are named ``<exposure_id>.fits`` (science: the alert CANDID; template: ``ref_<RFID>``).
The default data directory is ``../shared/data/ztf-sn2021rhu`` next to the repository root.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ztf-sn2021rhu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="directory for the epoch files (created)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"ztf-sn2021rhu data directory (default: {DEFAULT_DATA})")
    parser.add_argument("--templates", choices=("one_per_band", "all"), default="one_per_band")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the measurements")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    cutouts = args.data / "cutouts"
    if not cutouts.is_dir():
        sys.exit(f"error: no alert cutouts at {cutouts}; pass --data DIR (the ztf-sn2021rhu "
                 "directory that holds cutouts/)")

    from transcene.epoch import write_epoch
    from transcene.ztf_alerts import ztf_sn2021rhu_epochs

    epochs = ztf_sn2021rhu_epochs(args.data, templates=args.templates)
    paths = [args.outdir / f"{epoch.exposure_id}.fits" for epoch in epochs]
    existing = [p for p in paths if p.exists()]
    if existing and not args.overwrite:
        sys.exit(f"error: {len(existing)} epoch files exist in {args.outdir}, e.g. "
                 f"{existing[0].name} (use --overwrite)")
    args.outdir.mkdir(parents=True, exist_ok=True)
    for path, epoch in zip(paths, epochs):
        write_epoch(path, epoch, overwrite=args.overwrite)
    n_ref = sum(e.is_reference for e in epochs)
    print(f"wrote {len(epochs) - n_ref} science and {n_ref} template epochs to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
