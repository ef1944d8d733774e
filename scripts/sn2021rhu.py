"""Fit the 34 real ZTF epochs of SN 2021rhu (+ the two SN-free templates) with a PixelHost and
compare the light curve with ZTF's own difference-image PSF photometry.

Usage: python scripts/sn2021rhu.py [OUTDIR] [--data ../shared/data/ztf-sn2021rhu]
Writes OUTDIR/lightcurve.ecsv, OUTDIR/comparison.ecsv, OUTDIR/comparison.png and prints the
median and scatter of (transcene / ZTF - 1) for epochs with S/N > 20.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table
import astropy.units as u

import transcene as ts
from transcene.plot import plot_lightcurve
from transcene.ztf_alerts import ztf_sn2021rhu_epochs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", nargs="?", default="sn2021rhu-out")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ztf-sn2021rhu"))
    p.add_argument("--oversample", type=float, default=2.0)
    p.add_argument("--no-refine-psf", action="store_true",
                   help="sinc-interpolate the native PSFs instead of refining the undersampled ones")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = Path(args.data)
    if not (data / "cutouts").is_dir():
        print(f"no SN 2021rhu cutouts under {data}", file=sys.stderr)
        return 2
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    epochs = ztf_sn2021rhu_epochs(data)
    cand = Table.read(data / "alerts_candidates.csv")
    target = SkyCoord(np.median(cand["ra"]) * u.deg, np.median(cand["dec"]) * u.deg)
    ds = ts.make_dataset(epochs, target, model_oversample=args.oversample, refine_psf=not args.no_refine_psf)
    result = ts.fit(ds)
    lc = result.lightcurve()
    ts.write_table(lc, out / "lightcurve.ecsv")
    ztf = Table.read(data / "lightcurve_ztf_alert_psf.csv")
    ztf = ztf[np.asarray(ztf["detected"]) == "True"] if ztf["detected"].dtype.kind in "US" else ztf[np.asarray(ztf["detected"], bool)]
    ref = Table()
    ref["mjd"] = np.asarray(ztf["mjd"], float)
    ref["band"] = ztf["band"]
    ref["flux"] = np.asarray(ztf["flux_ujy"], float) * 1e3
    ref["flux_err"] = np.asarray(ztf["flux_err_ujy"], float) * 1e3
    rows = []
    for r in lc[~np.asarray(lc["is_reference"])]:
        sel = (np.asarray(ref["band"]) == r["band"]) & (np.abs(ref["mjd"] - float(r["mjd"])) < 1e-3)
        if sel.sum() != 1:
            continue
        z = ref[sel][0]
        rows.append((float(r["mjd"]), r["band"], float(r["flux"]), float(r["flux_err"]), z["flux"], z["flux_err"],
                     float(r["chi2_dof"]), int(r["flags"])))
    comp = Table(rows=rows, names=("mjd", "band", "flux", "flux_err", "ztf_flux", "ztf_flux_err", "chi2_dof", "flags"))
    comp["ratio"] = comp["flux"] / comp["ztf_flux"]
    comp.write(out / "comparison.ecsv", overwrite=True)
    hi = (comp["ztf_flux"] / comp["ztf_flux_err"] > 20) & (comp["flux"] / comp["flux_err"] > 20)
    d = np.asarray(comp["ratio"][hi]) - 1
    print(f"status {result.status}, {result.n_iter} iterations, {result.elapsed:.0f} s")
    print(f"{hi.sum()} epochs with S/N > 20: median(transcene/ZTF - 1) = {np.median(d):+.4f}, "
          f"robust scatter = {1.4826 * np.median(np.abs(d - np.median(d))):.4f}")
    good = hi & ((np.asarray(comp["flags"]) & int(ts.Flag.HIGH_CHI2)) == 0)
    for band in sorted(set(comp["band"])):
        for label, sel in (("", hi), (" without HIGH_CHI2", good)):
            b = sel & (np.asarray(comp["band"]) == band)
            db = np.asarray(comp["ratio"][b]) - 1
            if b.sum():
                print(f"  {band}{label}: n={b.sum()} median {np.median(db):+.4f} "
                      f"scatter {1.4826 * np.median(np.abs(db - np.median(db))):.4f}")
    worst = np.argsort(-np.abs(np.asarray(comp["ratio"]) - 1))[:5]
    for i in worst:
        r = comp[i]
        print(f"  largest: {r['band']} MJD {r['mjd']:.2f} ratio {r['ratio']:.3f} chi2/dof {r['chi2_dof']:.1f}")
    fig = plot_lightcurve(lc, reference=ref, reference_label="ZTF alert PSF", title="SN 2021rhu in NGC 7814")
    fig.savefig(out / "comparison.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
