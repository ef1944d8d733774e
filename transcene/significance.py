"""Model comparison: is there a transient at all, and are the transient-free epochs really free?

Both are likelihood-ratio tests in the Gaussian (Laplace) approximation of the posterior, where
the statistic of a nested linear hypothesis ``f = 0`` is ``f^T C^-1 f`` with ``f`` the fitted
fluxes and ``C`` their marginal covariance, chi^2-distributed with ``len(f)`` degrees of freedom
when the hypothesis holds.

* Detection: over the epochs whose flux was fitted, per band and over all bands. The per-epoch
  significance is the table's ``snr`` (``flux / flux_err``: a one-sided Gaussian test).
* Reference null test: the transient-free epochs refitted with their fluxes free, except one
  anchor per band (the deepest): the free host absorbs any flux common to all of a band's
  references, so only differences between references are measurable (K - 1 degrees of freedom
  for K references). A failure means one of them holds transient light (a ``zero_before`` too
  late), a bad calibration, or a variable nucleus. The geometry stays at the MAP (the test is
  of the linear fluxes, like the ``linear`` method).
"""

from __future__ import annotations

import logging

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from scipy import stats

from .solve import flux_covariance, freeze_geometry, linear_solution

__all__ = ["chi2_test", "detection_test", "reference_null_test"]

log = logging.getLogger(__name__)


def chi2_test(flux: np.ndarray, cov: np.ndarray) -> dict:
    """``{"chi2", "dof", "p_value", "sigma"}`` of the hypothesis ``flux = 0`` (``sigma``: the
    two-sided Gaussian equivalent of ``p_value``, capped at 38)."""
    flux = np.asarray(flux, float)
    dof = int(flux.size)
    if dof == 0:
        return {"chi2": float("nan"), "dof": 0, "p_value": float("nan"), "sigma": float("nan")}
    cov = 0.5 * (np.asarray(cov, float) + np.asarray(cov, float).T)
    lam, vec = np.linalg.eigh(cov)
    keep = lam > 1e-12 * lam.max()
    proj = vec[:, keep].T @ flux
    chi2 = float(np.sum(proj**2 / lam[keep]))
    dof = int(keep.sum())
    p = float(stats.chi2.sf(chi2, dof))
    sigma = float(min(stats.norm.isf(p / 2.0), 38.0)) if p > 0 else 38.0
    return {"chi2": chi2, "dof": dof, "p_value": p, "sigma": sigma}


def detection_test(flux: np.ndarray, cov: np.ndarray, bands: np.ndarray, measured: np.ndarray) -> dict:
    """Joint test of "no transient" over the ``measured`` epochs: all bands and each band."""
    measured = np.asarray(measured, bool)
    out = {"all": chi2_test(flux[measured], cov[np.ix_(measured, measured)])}
    bands = np.array([str(b) for b in bands], dtype=object)  # plain str keys for the metadata
    for b in dict.fromkeys(bands):
        sel = measured & (bands == b)
        out[b] = chi2_test(flux[sel], cov[np.ix_(sel, sel)])
    return out


def reference_null_test(scene, stacks, grid, pa, epochs, *, mixed: bool = True) -> dict:
    """Refit the reference epochs' fluxes (all but one anchor per band) with the geometry fixed,
    and test them against zero per band.

    ``epochs``: the dataset's epoch table (columns band, stack, slot, is_reference,
    exposure_id). Returns ``{band: {chi2, dof, p_value, sigma, n_references, anchor,
    worst_exposure, worst_z}}``; bands with fewer than two references have ``dof = 0``.
    ``mixed``: the solves in mixed precision (``fit``'s ``mixed_precision``).
    """
    offs = np.cumsum([0] + [st.n_epochs for st in stacks])
    ref = np.asarray(epochs["is_reference"], bool)
    bands = np.array([str(b) for b in epochs["band"]], dtype=object)  # plain str keys for the metadata
    slot = offs[np.asarray(epochs["stack"])] + np.asarray(epochs["slot"])
    tested: dict[str, tuple[int, list[int]]] = {}  # band -> (anchor row, rows of the freed references)
    for b in dict.fromkeys(bands[ref]):
        rows = np.flatnonzero(ref & (bands == b))
        # the anchor: the deepest reference (largest total weight in the fitted region)
        depth = [float(np.sum(np.asarray(stacks[int(epochs["stack"][r])].weight[int(epochs["slot"][r])])))
                 for r in rows]
        anchor = int(rows[int(np.argmax(depth))])
        tested[b] = (anchor, [int(r) for r in rows if r != anchor])
    freed_rows = [r for _, rows in tested.values() for r in rows]
    flux = cov = None
    if freed_rows:
        scene0, frozen, pa_frozen = freeze_geometry(scene, stacks, pa, grid)
        free_add = np.zeros(offs[-1])
        free_add[slot[freed_rows]] = 1.0
        freed = tuple(
            eqx.tree_at(lambda s: s.free_flux, st, jnp.clip(st.free_flux + jnp.asarray(free_add[offs[i]:offs[i + 1]]), 0, 1))
            for i, st in enumerate(frozen)
        )
        solved, _, _ = linear_solution(scene0, freed, grid, pa_frozen, mixed=mixed)
        cov = np.asarray(flux_covariance(solved, freed, grid, pa_frozen, mixed=mixed)[0])
        flux = np.concatenate([np.asarray(loc[:, 0]) for loc in solved.local])
    out: dict[str, dict] = {}
    for b, (anchor, rows) in tested.items():
        idx = slot[rows]
        f = flux[idx] if rows else np.zeros(0)
        c = cov[np.ix_(idx, idx)] if rows else np.zeros((0, 0))
        res = chi2_test(f, c)
        z = f / np.sqrt(np.clip(np.diag(c), 1e-300, None))
        worst = int(np.argmax(np.abs(z))) if rows else None
        out[b] = res | {
            "n_references": len(rows) + 1,
            "anchor": str(epochs["exposure_id"][anchor]),
            "worst_exposure": str(epochs["exposure_id"][rows[worst]]) if rows else "",
            "worst_z": float(z[worst]) if rows else float("nan"),
        }
        if res["dof"] and res["p_value"] < 1e-3:
            log.warning(
                "reference epochs in band %s are not consistent with no transient (chi2 %.1f for %d dof, p = %.1e); "
                "the most deviant is %s (%.1f sigma relative to %s)", b, res["chi2"], res["dof"], res["p_value"],
                out[b]["worst_exposure"], out[b]["worst_z"], out[b]["anchor"],
            )
    return out
