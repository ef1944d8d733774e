"""The fit result and the light-curve table it produces."""

from __future__ import annotations

import copy
import dataclasses
import enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy import units as u
from astropy.table import Table

from . import __version__
from .dataset import Dataset
from .epoch import NJY_AB_ZEROPOINT
from .geometry import offsets_to_sky
from .host import PixelHost, SersicHost
from .scene import Scene
from .significance import detection_test

if TYPE_CHECKING:
    from .nuts import PosteriorSamples

__all__ = ["FitResult", "Flag", "write_table"]


#: what each fitting method's flux errors are (written into the light curve's metadata)
UNCERTAINTY = {
    "laplace": "Gaussian (Laplace) posterior at the MAP: fluxes marginalised over the host, the transient "
               "position, static sources, and each epoch's sky and astrometric shift",
    "linear": "Gaussian, geometry fixed at the MAP: fluxes marginalised over the host and skies; transient "
              "position and shifts held fixed (no position error)",
    "nuts": "NUTS draws of the full posterior (host, positions, every epoch's flux, sky and shift free): "
            "flux the posterior mean, flux_err the posterior standard deviation, flux_lo/flux_hi the 16th/84th "
            "percentiles",
    "map": "conditional on the host and geometry at the MAP (a lower bound; epochs uncorrelated); "
           "for quick looks only",
}


class Flag(enum.IntFlag):
    """Bits of the light curve's ``flags`` column."""

    REFERENCE = 1  # transient-free epoch: flux fixed to zero by definition, not measured
    BASELINE_UNDEFINED = 2  # no transient-free epoch in this band: flux relative to an unknown constant
    NOT_CONVERGED = 4  # the fit did not meet its convergence criteria
    HIGH_CHI2 = 8  # the epoch's residual chi2/dof > 2: the model does not describe it
    MASKED_AT_TRANSIENT = 16  # fewer than half the pixels within 1 FWHM of the transient usable
    LOW_SNR = 32  # snr < 3: mag and mag_err left empty, use mag_lim
    FETCH_FAILED = 64  # the epoch was found in a survey but could not be downloaded or read: no flux


@dataclasses.dataclass(frozen=True, eq=False)
class FitResult:
    """Immutable outcome of :func:`transcene.fit`: scene, status, covariance and diagnostics.

    ``flux_cov`` is indexed by padded epoch slot in stack order; use :meth:`lightcurve` and
    :meth:`epoch_covariance` for per-epoch, input-ordered products.
    """

    dataset: Dataset
    scene: Scene
    status: str
    n_iter: int
    history: tuple[float, ...]
    flux_cov: np.ndarray
    local_var: np.ndarray
    position_cov: np.ndarray
    chi2: list[np.ndarray]
    host_kind: str
    elapsed: float
    method: str = "laplace"
    #: per band, the reference-epoch null test (``fit(..., null_test=True)``), else None
    reference_null: dict | None = None
    #: "gaussian" or "student-t (nu=...)": the pixel likelihood
    likelihood: str = "gaussian"
    #: the NUTS draws and diagnostics (``method="nuts"``), else None
    posterior: "PosteriorSamples | None" = None
    #: "fitted", or why the transient's position was held at the target (``fit(position=...)``)
    position_mode: str = "fitted"
    #: whether the CG solves applied the linearised rendering in float32 (``fit(mixed_precision=...)``)
    mixed_precision: bool = True
    #: how many of the ``n_iter`` steps were Newton steps (``fit(newton=...)``); the rest Gauss-Newton
    n_newton: int = 0
    # the light curve is built once (plots and writers ask for it repeatedly); callers get copies
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    def _slots(self) -> np.ndarray:
        return self.dataset.stack_rows()

    def _local(self) -> np.ndarray:
        return np.concatenate([np.asarray(loc) for loc in self.scene.local], axis=0)[self._slots()]

    def flux_samples(self) -> np.ndarray | None:
        """Posterior flux draws ``[epoch, draw]`` in nJy, input order (``method="nuts"``; else None).
        Reference epochs' fluxes are zero by definition."""
        if self.posterior is None:
            return None
        return np.array(self.posterior.flux[self._slots()])

    def samples_table(self) -> Table | None:
        """The flux draws as a table keyed by exposure id (one row per epoch, a vector column)."""
        draws = self.flux_samples()
        if draws is None:
            return None
        t = Table()
        t["exposure_id"] = [str(v) for v in self.dataset.epochs["exposure_id"]]
        t["mjd"] = np.asarray(self.dataset.epochs["mjd"], float) * u.d
        t["band"] = self.dataset.epochs["band"]
        t["flux_samples"] = draws * u.nJy
        d = self.posterior.diagnostics()
        # FITS-header scalars (the full diagnostics are in the light curve's metadata)
        t.meta["COMMENT"] = ["NUTS posterior draws of each epoch's transient flux (nJy), chains concatenated"]
        t.meta["NCHAINS"] = d["chains"]
        t.meta["NDRAWS"] = d["draws"]
        t.meta["NDIVERG"] = d["divergent"]
        t.meta["MAXRHAT"] = d["max_rhat"]
        t.meta["MINESS"] = d["min_ess"]
        t.meta["CONVERGD"] = d["converged"]
        return t

    def epoch_covariance(self) -> np.ndarray:
        """Flux covariance between epochs (nJy^2), in the order of ``dataset.epochs``."""
        idx = self._slots()
        return self.flux_cov[np.ix_(idx, idx)]

    def covariance_table(self) -> Table:
        """The epoch-to-epoch flux covariance (nJy^2) as a table keyed by exposure id."""
        ids = [str(v) for v in self.dataset.epochs["exposure_id"]]
        cov = self.epoch_covariance()
        t = Table()
        t["exposure_id"] = ids
        for j, name in enumerate(ids):
            t[name] = cov[:, j] * u.nJy**2
        t.meta["description"] = "flux covariance between epochs (host-induced correlations included)"
        return t

    @property
    def transient_offset(self) -> np.ndarray:
        """Fitted transient offset (xi, eta) from the target, arcsec."""
        return np.asarray(self.scene.glob.position)

    @property
    def transient_coord(self):
        return offsets_to_sky(self.dataset.target, self.transient_offset)

    def lightcurve(self) -> Table:
        """The forced-photometry light curve (one row per epoch, input order), with units."""
        if "lightcurve" not in self._cache:
            self._cache["lightcurve"] = self._build_lightcurve()
        return self._cache["lightcurve"].copy()

    def _build_lightcurve(self) -> Table:
        ds = self.dataset
        t = ds.epochs
        loc = self._local()
        cov = self.epoch_covariance()
        var = np.clip(np.diag(cov), 0, None)
        ref = np.asarray(t["is_reference"], bool)
        flux = np.where(ref, 0.0, loc[:, 0])
        err = np.where(ref, 0.0, np.sqrt(var))
        lo, hi = flux - err, flux + err
        post = self.posterior
        if post is not None:
            draws = post.flux[self._slots()]
            flux = np.where(ref, 0.0, draws.mean(axis=1))
            lo, hi = np.percentile(draws, [15.865, 84.135], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(ref, np.nan, flux / err)
        det = np.isfinite(snr) & (snr >= 3)
        with np.errstate(divide="ignore", invalid="ignore"):
            mag = np.where(det, NJY_AB_ZEROPOINT - 2.5 * np.log10(np.where(det, flux, 1.0)), np.nan)
            mag_err = np.where(det, 2.5 / np.log(10) * err / np.where(det, flux, 1.0), np.nan)
            mag_lim = np.where(ref, np.nan, NJY_AB_ZEROPOINT - 2.5 * np.log10(3 * err))
        chi2_all = np.concatenate(self.chi2)[self._slots()]
        n_pix = np.asarray(t["n_pixels"], float)
        zp_free = self._nuisance_free("zp_prec")
        psf_free = self._nuisance_free("psf_prec")
        n_local = np.where(ref, 3, 4) + zp_free + psf_free
        chi2_dof = chi2_all / np.maximum(n_pix - n_local, 1)
        flags = np.zeros(len(t), int)
        flags |= np.where(ref, int(Flag.REFERENCE), 0)
        # the host is free per band, so each band needs its own transient-free epochs
        bands = np.asarray(t["band"]).astype(str)
        anchored = set(bands[ref])
        flags |= np.where([b not in anchored for b in bands], int(Flag.BASELINE_UNDEFINED), 0)
        if not self.converged:
            flags |= int(Flag.NOT_CONVERGED)
        flags |= np.where(chi2_dof > 2.0, int(Flag.HIGH_CHI2), 0)
        flags |= np.where(~ref & ~det, int(Flag.LOW_SNR), 0)
        flags |= np.where(self._masked_at_transient(), int(Flag.MASKED_AT_TRANSIENT), 0)

        out = Table()
        out["mjd"] = np.asarray(t["mjd"], float) * u.d
        out["band"] = t["band"]
        out["survey"] = t["survey"]
        out["exposure_id"] = t["exposure_id"]
        out["flux"] = flux * u.nJy
        out["flux_err"] = err * u.nJy
        out["flux_lo"] = lo * u.nJy
        out["flux_hi"] = hi * u.nJy
        out["mag"] = mag * u.ABmag
        out["mag_err"] = mag_err * u.mag
        out["mag_lim"] = mag_lim * u.ABmag
        out["snr"] = snr
        out["chi2_dof"] = chi2_dof
        out["flags"] = flags
        out["psf_fwhm"] = np.asarray(t["psf_fwhm"], float) * u.arcsec
        out["sky"] = loc[:, 1] * u.nJy / u.pix
        out["shift_ra"] = loc[:, 2] * u.arcsec
        out["shift_dec"] = loc[:, 3] * u.arcsec
        if zp_free.any():
            with np.errstate(invalid="ignore"):
                out["zp_offset"] = np.where(zp_free, -2.5 * np.log10(1.0 + loc[:, 4]), 0.0) * u.mag
        if psf_free.any():
            with np.errstate(invalid="ignore"):
                out["psf_width_offset"] = np.where(psf_free, np.sqrt(1.0 + 2.0 * loc[:, 5]) - 1.0, 0.0)
        out["is_reference"] = ref
        if post is not None:
            out["flux_rhat"] = np.ma.masked_invalid(post.rhat[self._slots()])
            out["flux_ess"] = np.ma.masked_invalid(post.ess[self._slots()])
        for name in ("mag", "mag_err", "mag_lim", "snr"):
            out[name] = np.ma.masked_invalid(np.asarray(out[name]))
            out[name].unit = {"mag": u.ABmag, "mag_err": u.mag, "mag_lim": u.ABmag}.get(name)
        out.meta.update(self.summary())
        out.meta["flag_bits"] = {f.name: int(f.value) for f in Flag}
        out.meta["columns"] = (
            "flux, flux_err, flux_lo, flux_hi in nJy (AB: m = 31.4 - 2.5 log10(f/nJy)); "
            "flux_lo/flux_hi are the 16th/84th posterior percentiles; mag_lim is the 3-sigma limit; "
            "psf_fwhm the epoch's PSF FWHM in arcsec; sky in nJy/pixel; "
            "shift_ra/shift_dec the fitted astrometric shift of the epoch"
            + ("; zp_offset the fitted error of the epoch's zero point (written minus true, mag; the fluxes "
               "are already corrected for it)" if self._nuisance_free("zp_prec").any() else "")
            + ("; psf_width_offset the fitted fractional FWHM error of the epoch's PSF (true / given - 1)"
               if self._nuisance_free("psf_prec").any() else "")
            + ("; flux_rhat/flux_ess: split R-hat and bulk effective sample size of the NUTS draws" if post else "")
        )
        return out

    def detection(self) -> dict:
        """Joint test of "no transient in any measured epoch", over all bands and per band
        (:func:`transcene.significance.detection_test`): ``{chi2, dof, p_value, sigma}``."""
        if "detection" not in self._cache:  # an eigen-decomposition of the epoch covariance
            ref = np.asarray(self.dataset.epochs["is_reference"], bool)
            flux = self._local()[:, 0] if self.posterior is None else self.flux_samples().mean(axis=1)
            self._cache["detection"] = detection_test(flux, self.epoch_covariance(),
                                                      np.asarray(self.dataset.epochs["band"]), ~ref)
        return copy.deepcopy(self._cache["detection"])

    def transient_pixel(self, index: int) -> tuple[float, float]:
        """Fitted transient position (0-based x, y) in the fitted cutout of epoch ``index``
        (row of ``dataset.epochs``), the epoch's astrometric shift included."""
        row = self.dataset.epochs[index]
        st = self.dataset.stacks[int(row["stack"])]
        k = int(row["slot"])
        shift = np.asarray(self.scene.local[int(row["stack"])][k])[2:4]
        p = np.asarray(st.p0[k]) + np.asarray(st.amat[k]) @ (self.transient_offset + shift)
        return float(p[0]), float(p[1])

    def _nuisance_free(self, field: str) -> np.ndarray:
        """Per epoch (input order): whether the nuisance whose prior precision is the stacks'
        ``field`` (``zp_prec``, ``psf_prec``) was free."""
        from .dataset import PINNED

        prec = np.concatenate([np.asarray(getattr(st, field)) for st in self.dataset.stacks])[self._slots()]
        return prec < PINNED

    def _masked_at_transient(self) -> np.ndarray:
        ds = self.dataset
        out = []
        for i, (s, k, fwhm, scale) in enumerate(zip(ds.epochs["stack"], ds.epochs["slot"], ds.epochs["psf_fwhm"],
                                                     ds.epochs["pixel_scale"])):
            w = np.asarray(ds.stacks[s].weight[k])
            p = self.transient_pixel(i)  # the epoch's fitted shift included
            yy, xx = np.indices(w.shape)
            r = np.hypot(xx - p[0], yy - p[1]) * scale
            near = r <= max(float(fwhm), scale)
            out.append(near.sum() == 0 or (w[near] > 0).mean() < 0.5)
        return np.asarray(out)

    def summary(self) -> dict:
        """Metadata describing the fit (goes into the light-curve table's meta)."""
        ds = self.dataset
        coord = self.transient_coord
        pos_err = np.sqrt(np.clip(np.diag(self.position_cov), 0, None))
        meta = {
            "ra": float(ds.target.ra.deg),
            "dec": float(ds.target.dec.deg),
            "transient_ra": float(coord.ra.deg),
            "transient_dec": float(coord.dec.deg),
            "position": self.position_mode,
            "transient_offset_arcsec": [float(v) for v in self.transient_offset],
            "transient_offset_err_arcsec": [float(v) for v in pos_err],
            "transient_offset_cov_arcsec2": [[float(v) for v in row] for row in np.asarray(self.position_cov)],
            "mjd_ref": ds.mjd_ref,
            "time_scale": "UTC",
            "model": f"{self.host_kind} host + transient point source",
            "method": self.method,
            "solver_precision": ("mixed: float32 linearised rendering in the CG solves, float64 otherwise"
                                 if self.mixed_precision else "float64"),
            "uncertainty": UNCERTAINTY.get(self.method, self.method),
            "likelihood": self.likelihood,
            "status": self.status,
            "converged": self.converged,
            "n_iterations": self.n_iter,
            "n_newton_steps": self.n_newton,
            "baseline": "defined by transient-free epochs" if ds.baseline_defined else "baseline undefined",
            "bands": list(ds.bands),
            "fit_radius_arcsec": ds.fit_radius,
            "model_pixel_scale_arcsec": float(ds.grid.scale),
            "fit_seconds": round(self.elapsed, 3),
            "version": __version__,
            "detection": self.detection(),
        }
        if self.reference_null is not None:
            meta["reference_null_test"] = self.reference_null
        if self.posterior is not None:
            meta["nuts"] = self.posterior.diagnostics()
            meta["transient_offset_posterior_mean_arcsec"] = [float(v) for v in self.posterior.position.mean(axis=0)]
        h = self.scene.glob.host
        if isinstance(h, SersicHost):
            q, pa, re = (float(v) for v in h.shape_params())
            meta["host"] = {
                "kind": "sersic",
                "flux_nJy": {b: float(f) for b, f in zip(ds.bands, np.asarray(h.flux))},
                "centre_offset_arcsec": [float(v) for v in np.asarray(h.centre)],
                "re_arcsec": re,
                "n": float(h.n),
                "q": q,
                "pa_deg": float(np.degrees(pa)),
            }
        elif isinstance(h, PixelHost):
            meta["host"] = {
                "kind": "pixel",
                "flux_nJy": {b: float(f) for b, f in zip(ds.bands, np.asarray(h.image).sum(axis=(1, 2)))},
            }
        return meta


def write_table(table: Table, path: str | Path) -> Path:
    """Write a table as ECSV (default), CSV or Parquet, chosen by the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = "".join(path.suffixes[-1:]).lower()
    if ext in (".ecsv", ""):
        table.write(path, format="ascii.ecsv", overwrite=True)
    elif ext == ".csv":
        table.write(path, format="ascii.csv", overwrite=True)
    elif ext in (".parquet", ".pq"):
        plain = table.copy()
        plain.meta = {k: str(v) for k, v in table.meta.items()}
        plain.write(path, format="parquet", overwrite=True)
    else:
        raise ValueError(f"unknown table format {ext!r} for {path}: use .ecsv, .csv or .parquet")
    return path
