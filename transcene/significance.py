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
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

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
    for b in dict.fromkeys(np.asarray(bands).astype(str).tolist()):
        sel = measured & (np.asarray(bands).astype(str) == b)
        out[b] = chi2_test(flux[sel], cov[np.ix_(sel, sel)])
    return out


def reference_null_test(scene, stacks, grid, pa, *, epochs, freeze, step_fn, covariance_fn) -> dict:
    """Refit the reference epochs' fluxes (all but one anchor per band) with the geometry fixed,
    and test them against zero per band.

    ``epochs``: the dataset's epoch table (columns band, stack, slot, is_reference,
    exposure_id). ``freeze``, ``step_fn``, ``covariance_fn``: the fit's geometry freezing, exact
    linear step and flux covariance (passed in so this module does not depend on the fit's
    internals). Returns ``{band: {chi2, dof, p_value, sigma, n_references, anchor,
    worst_exposure, worst_z}}``; bands with fewer than two references have ``dof = 0``.
    """
    scene0, frozen, pa_frozen = freeze(scene, stacks, pa)
    offs = np.cumsum([0] + [st.n_epochs for st in stacks])
    ref = np.asarray(epochs["is_reference"], bool)
    bands = np.asarray(np.asarray(epochs["band"]).astype(str).tolist(), dtype=object)  # plain str keys
    slot = offs[np.asarray(epochs["stack"])] + np.asarray(epochs["slot"])
    free_add = np.zeros(offs[-1])
    anchors: dict[str, int] = {}
    for b in dict.fromkeys(bands[ref]):
        rows = np.flatnonzero(ref & (bands == b))
        # the anchor: the deepest reference (largest total weight in the fitted region)
        depth = [float(np.sum(np.asarray(stacks[int(epochs["stack"][r])].weight[int(epochs["slot"][r])])))
                 for r in rows]
        anchors[b] = int(rows[int(np.argmax(depth))])
        for r in rows:
            if r != anchors[b]:
                free_add[slot[r]] = 1.0
    out: dict[str, dict] = {}
    if not np.any(free_add):
        for b in dict.fromkeys(bands[ref]):
            out[b] = _null_entry(chi2_test(np.zeros(0), np.zeros((0, 0))), int(np.sum(ref & (bands == b))),
                                 epochs, anchors[b], None, None)
        return out
    freed = tuple(
        eqx.tree_at(lambda s: s.free_flux, st, jnp.clip(st.free_flux + jnp.asarray(free_add[offs[i]:offs[i + 1]]), 0, 1))
        for i, st in enumerate(stacks)
    )
    step = step_fn(scene0, freed, grid, pa_frozen)
    scene1 = jax.tree_util.tree_map(lambda a, d: a + d, scene0, step)
    cov = np.asarray(covariance_fn(scene1, freed, grid, pa_frozen))
    flux = np.concatenate([np.asarray(loc[:, 0]) for loc in scene1.local])
    for b in dict.fromkeys(bands[ref]):
        rows = [r for r in np.flatnonzero(ref & (bands == b)) if r != anchors[b]]
        idx = slot[rows]
        f = flux[idx]
        c = cov[np.ix_(idx, idx)]
        res = chi2_test(f, c)
        z = f / np.sqrt(np.clip(np.diag(c), 1e-300, None)) if len(rows) else np.zeros(0)
        worst = int(np.argmax(np.abs(z))) if len(rows) else None
        out[b] = _null_entry(res, int(np.sum(ref & (bands == b))), epochs, anchors[b],
                             rows[worst] if worst is not None else None, float(z[worst]) if worst is not None else None)
        if res["dof"] and res["p_value"] < 1e-3:
            log.warning(
                "reference epochs in band %s are not consistent with no transient (chi2 %.1f for %d dof, p = %.1e); "
                "the most deviant is %s (%.1f sigma relative to %s)", b, res["chi2"], res["dof"], res["p_value"],
                out[b]["worst_exposure"], out[b]["worst_z"], out[b]["anchor"],
            )
    return out


def _null_entry(res: dict, n_ref: int, epochs, anchor: int, worst: int | None, worst_z: float | None) -> dict:
    return res | {
        "n_references": n_ref,
        "anchor": str(epochs["exposure_id"][anchor]),
        "worst_exposure": str(epochs["exposure_id"][worst]) if worst is not None else "",
        "worst_z": worst_z if worst_z is not None else float("nan"),
    }
