"""NUTS over the full posterior, started at the MAP, in coordinates whitened by the Gauss-Newton Hessian.

Every parameter is sampled: the host, the transient and static-source positions, and each
epoch's flux, sky and shift. The linear parameters are *not* marginalised analytically: their
marginal would need ``log det`` of the host normal matrix (thousands of pixels) and a linear
solve at every leapfrog step, whereas sampling them costs one rendering per step.

Sampling thousands of strongly correlated parameters is only practical in coordinates in which
the posterior is close to a standard normal. With ``x`` the MAP and ``z`` the sampled vector,

    g = g_map + T_g z_g                          (global: host, positions)
    l_e = l_map,e - K_e (g - g_map) + C_e z_e    (each epoch's [flux, sky, shift_xi, shift_eta, zp, psf_width])

where ``K_e = N_e^-1 B_e^T`` is how the epoch's local parameters follow the global ones (their
conditional mean) and ``C_e C_e^T = N_e^-1`` their conditional covariance, both exact at the MAP
(the same Schur complement the Gauss-Newton solver uses). ``T_g T_g^T`` approximates ``S^-1``
(S: the reduced global normal matrix): exactly (dense Cholesky) when the globals are few (a
Sersic host), else by the solver's Fourier-diagonal approximation for the host pixels and the
dense block of the few other globals. The transform is linear, so its Jacobian is a constant and
the sampled density is the exact posterior; the whitening only decides how fast NUTS mixes.
NUTS's own diagonal mass-matrix adaptation corrects what the whitening misses per coordinate.

Coordinates with no information at all (padded epoch slots; a parameter with no data, e.g. the
transient outside an epoch's footprint) are given a standard-normal pseudo-prior and do not
move any parameter, so the posterior stays proper.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from .dataset import ModelGrid
from .host import PixelHost
from .render import batched
from .scene import N_LOCAL, Scene, host_spectrum, render_epoch
from .solve import PriorArrays, _build, _local_blocks, _position_index, _small_indices, objective

__all__ = ["NutsOptions", "PosteriorSamples", "Whitening", "whitening", "sample_posterior"]

log = logging.getLogger(__name__)

#: global parameters up to which the whitening is exact (S formed densely, one solve-free
#: operator application per parameter, and eigendecomposed)
DENSE_WHITENING_MAX = 6000
#: a local coordinate whose conditional variance exceeds this (in its units squared) has no data
_INERT_VAR = 1e20


@dataclasses.dataclass(frozen=True)
class NutsOptions:
    """Settings of :func:`sample_posterior` (and ``fit(..., method="nuts")``).

    The chains run vectorised in one process. A run counts as converged when every free
    epoch flux and the transient position have split R-hat <= ``max_rhat`` and bulk effective
    sample size >= ``min_ess``, and at most ``max_divergent_fraction`` of the draws diverged
    (Vehtari et al. 2021 recommend R-hat < 1.01 and ESS > 400 with 4 chains).
    """

    num_warmup: int = 500
    num_samples: int = 1000  # per chain
    num_chains: int = 2
    target_accept: float = 0.8
    max_tree_depth: int = 8
    max_rhat: float = 1.01
    min_ess: float = 400.0
    max_divergent_fraction: float = 0.005
    #: report a light curve whose chains did not converge (flagged NOT_CONVERGED) instead of failing
    force: bool = False

    def __post_init__(self):
        for name in ("num_warmup", "num_samples", "num_chains", "max_tree_depth"):
            v = getattr(self, name)
            if not (isinstance(v, (int, np.integer)) and v >= 1):
                raise ValueError(f"NutsOptions.{name} must be a positive integer; got {v!r}")
        if not 0.0 < self.target_accept < 1.0:
            raise ValueError(f"NutsOptions.target_accept must be in (0, 1); got {self.target_accept!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class PosteriorSamples:
    """Draws from the posterior (chains concatenated) and their convergence diagnostics.

    ``flux``: ``[slot, draw]`` in nJy, epoch slots in stack order as ``FitResult.flux_cov``;
    ``position``: ``[draw, 2]`` transient offset (xi, eta) from the target in arcsec;
    ``rhat`` / ``ess``: split R-hat and bulk effective sample size per slot (NaN where the flux
    is not free); ``position_rhat`` / ``position_ess`` the same for the two offsets.
    """

    flux: np.ndarray
    position: np.ndarray
    rhat: np.ndarray
    ess: np.ndarray
    position_rhat: np.ndarray
    position_ess: np.ndarray
    n_chains: int
    n_params: int
    n_divergent: int
    n_draws: int
    step_size: float
    mean_tree_depth: float
    seconds: float
    converged: bool
    problems: tuple[str, ...]

    def diagnostics(self) -> dict:
        """A JSON-able summary for the light curve's metadata."""
        free = np.isfinite(self.rhat)
        return {
            "sampler": "NUTS (numpyro), started at the MAP, Gauss-Newton-whitened coordinates",
            "chains": self.n_chains,
            "parameters": self.n_params,
            "draws": self.n_draws,
            "divergent": self.n_divergent,
            "step_size": round(float(self.step_size), 5),
            "mean_tree_depth": round(float(self.mean_tree_depth), 2),
            # over every free flux and the two position offsets (what the convergence test uses)
            "max_rhat": float(np.max(np.concatenate([self.rhat[free], self.position_rhat]))),
            "min_ess": float(np.min(np.concatenate([self.ess[free], self.position_ess]))),
            "position_rhat": [float(v) for v in self.position_rhat],
            "position_ess": [float(v) for v in self.position_ess],
            "seconds": round(self.seconds, 2),
            "converged": self.converged,
            "problems": list(self.problems),
        }


class Whitening(eqx.Module):
    """The affine map from the sampled vector ``z`` to the scene (module docstring)."""

    glob_map: Float[Array, " g"]  # flat global parameters at the MAP
    local_map: tuple[Float[Array, "epoch 6"], ...]
    response: tuple[Float[Array, "epoch 6 g"], ...]  # K_e
    local_chol: tuple[Float[Array, "epoch 6 6"], ...]  # C_e (zero rows/columns where inert)
    inert: tuple[Float[Array, "epoch 6"], ...]  # 1 where the coordinate moves nothing
    dense_chol: Float[Array, "gd gd"]  # T_g when dense (else 0 x 0)
    host_scale: Float[Array, "band m mh"]  # Fourier amplitude of T_g on the host (else empty)
    small_chol: Float[Array, "s s"]  # T_g on the non-host globals in the Fourier mode
    n_global: int = eqx.field(static=True)
    n_host: int = eqx.field(static=True)  # 0 in the dense mode

    @property
    def size(self) -> int:
        return self.n_global + sum(N_LOCAL * r.shape[0] for r in self.response)


def _global_step(w: Whitening, zg: Array, grid: ModelGrid) -> Array:
    if w.n_host == 0:
        return w.dense_chol @ zg
    nb = w.host_scale.shape[0]
    h = grid.host_size
    m = grid.size
    zh = zg[: w.n_host].reshape(nb, h, h)
    dh = grid.crop(jnp.fft.irfft2(jnp.fft.rfft2(grid.embed(zh)) * w.host_scale, s=(m, m)))
    return jnp.concatenate([dh.reshape(-1), w.small_chol @ zg[w.n_host:]])


def to_scene(w: Whitening, z: Float[Array, " n"], unravel: Callable, grid: ModelGrid) -> Scene:
    """The scene at the sampled vector ``z`` (``unravel``: of the flat global parameters)."""
    dg = _global_step(w, z[: w.n_global], grid)
    local = []
    i = w.n_global
    for lm, k, c in zip(w.local_map, w.response, w.local_chol):
        n = lm.shape[0]
        ze = z[i : i + N_LOCAL * n].reshape(n, N_LOCAL)
        i += N_LOCAL * n
        local.append(lm - jnp.einsum("eag,g->ea", k, dg) + jnp.einsum("eab,eb->ea", c, ze))
    return Scene(glob=unravel(w.glob_map + dg), local=tuple(local))


def _pseudo_prior(w: Whitening, z: Array) -> Array:
    i = w.n_global
    total = 0.0
    for m in w.inert:
        n = m.shape[0]
        total = total + jnp.sum(m * z[i : i + N_LOCAL * n].reshape(n, N_LOCAL) ** 2)
        i += N_LOCAL * n
    return total


@eqx.filter_jit
def _responses(scene: Scene, stacks, grid: ModelGrid):
    """Per stack: (K_e [e, 6, g], N_e^-1 [e, 6, 6]) at ``scene``."""
    glob = scene.glob
    out = []
    for loc, st in zip(scene.local, stacks):
        p = _local_blocks(loc, st, glob, grid)
        cots = p["w"][..., None] * p["jl"]  # [e, y, x, 4]

        def one(args):
            l, ep, c = args
            f = lambda g: render_epoch(host_spectrum(g, grid), g, l, ep, grid)  # noqa: E731
            _, vjp = jax.vjp(f, glob)
            return jax.vmap(lambda ci: ravel_pytree(vjp(ci)[0])[0], in_axes=-1)(c)  # [6, g]

        bt = batched(one, st.n_epochs)((loc, st, cots))
        out.append((jnp.einsum("eab,ebg->eag", p["ninv"], bt), p["ninv"]))
    return tuple(out)


@eqx.filter_jit
def _reduced_columns(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, rows: Array) -> Array:
    """``S`` applied to each row of ``rows`` (S: the reduced global normal matrix at ``scene``)."""
    # float64 throughout: these columns are factorised densely (eigendecomposition)
    return jax.vmap(_build(scene, stacks, grid, pa, mixed=False)["apply_s"])(rows)


def _inverse_sqrt(mat: np.ndarray) -> np.ndarray:
    """A square root ``T`` of ``mat^-1`` (``T T^T = mat^-1``), by eigendecomposition."""
    mat = 0.5 * (mat + mat.T)
    lam, vec = np.linalg.eigh(mat)
    lam = np.where(lam > 1e-12 * lam.max(), lam, np.inf)
    return vec / np.sqrt(lam)


def whitening(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, *, dense_max: int = DENSE_WHITENING_MAX) -> Whitening:
    """The whitening map at the MAP ``scene`` (module docstring)."""
    flat, _ = ravel_pytree(scene.glob)
    n_g = int(flat.shape[0])
    resp = _responses(scene, stacks, grid)
    response, local_chol, inert = [], [], []
    for (k, ninv), st in zip(resp, stacks):
        ninv = np.asarray(ninv)
        dead = (np.diagonal(ninv, axis1=1, axis2=2) > _INERT_VAR) | (np.asarray(st.valid)[:, None] == 0)
        # a flux pinned to zero (reference epoch) stays exactly zero
        dead[:, 0] |= np.asarray(st.free_flux * st.valid) == 0
        live = (~dead).astype(float)
        sub = ninv * live[:, :, None] * live[:, None, :] + np.eye(N_LOCAL) * dead[:, :, None]
        chol = np.linalg.cholesky(sub) * live[:, :, None] * live[:, None, :]
        response.append(jnp.asarray(np.asarray(k) * live[:, :, None]))
        local_chol.append(jnp.asarray(chol))
        inert.append(jnp.asarray(dead.astype(float)))
    if n_g <= dense_max or not isinstance(scene.glob.host, PixelHost):
        s_dense = np.asarray(_reduced_columns(scene, stacks, grid, pa, jnp.eye(n_g)))
        dense = _inverse_sqrt(s_dense)
        host_scale = np.zeros((0, 0, 0))
        small = np.zeros((0, 0))
        n_host = 0
    else:
        small_idx = _small_indices(scene.glob)
        n_host = n_g - small_idx.size
        rows = np.zeros((small_idx.size, n_g))
        rows[np.arange(small_idx.size), small_idx] = 1.0
        block = np.asarray(_reduced_columns(scene, stacks, grid, pa, jnp.asarray(rows)))[:, small_idx] if small_idx.size \
            else np.zeros((0, 0))
        small = _inverse_sqrt(block) if small_idx.size else block
        host_scale = 1.0 / np.sqrt(np.asarray(pa.host_precond))
        dense = np.zeros((0, 0))
    return Whitening(
        glob_map=flat, local_map=tuple(jnp.asarray(loc) for loc in scene.local), response=tuple(response),
        local_chol=tuple(local_chol), inert=tuple(inert), dense_chol=jnp.asarray(dense),
        host_scale=jnp.asarray(host_scale), small_chol=jnp.asarray(small), n_global=n_g, n_host=n_host,
    )


def _model(w: Whitening, glob_map, stacks, grid: ModelGrid, pa: PriorArrays, obj0):
    """numpyro model: an improper flat prior on ``z`` and the posterior as a factor."""
    import numpyro
    import numpyro.distributions as dist

    z = numpyro.sample("z", dist.ImproperUniform(dist.constraints.real, (), (w.size,)))
    unravel = ravel_pytree(glob_map)[1]
    energy = objective(to_scene(w, z, unravel, grid), stacks, grid, pa) - obj0 + _pseudo_prior(w, z)
    numpyro.factor("posterior", -0.5 * energy)


@eqx.filter_jit
def _summaries(zs: Array, w: Whitening, glob_map, grid: ModelGrid, pos_idx: int):
    """Per draw: all epoch fluxes (stack order) and the transient position."""
    unravel = ravel_pytree(glob_map)[1]

    def one(z):
        sc = to_scene(w, z, unravel, grid)
        flat = ravel_pytree(sc.glob)[0]
        return jnp.concatenate([loc[:, 0] for loc in sc.local]), flat[pos_idx : pos_idx + 2]

    return jax.lax.map(one, zs, batch_size=64)


def sample_posterior(scene: Scene, stacks, grid: ModelGrid, pa: PriorArrays, *, key: Array,
                     options: NutsOptions = NutsOptions(),
                     progress: Callable[[int, int, str], None] | None = None) -> PosteriorSamples:
    """Run NUTS from the MAP ``scene`` and return flux and position draws with diagnostics.

    ``key``: a JAX PRNG key (the run is reproducible given it). Free fluxes are those with
    ``free_flux * valid`` in the stacks; pinned ones come back as exact zeros.
    """
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS

    t0 = time.perf_counter()
    w = whitening(scene, stacks, grid, pa)
    obj0 = objective(scene, stacks, grid, pa)
    n = w.size
    log.info("NUTS: %d parameters, %d chains x (%d warm-up + %d) draws", n, options.num_chains,
             options.num_warmup, options.num_samples)

    # The model takes the data and the whitening as arguments, which numpyro passes to its jitted
    # step as traced arguments (jit_model_args): nothing large is baked into the compiled code.
    kernel = NUTS(_model, target_accept_prob=options.target_accept, max_tree_depth=options.max_tree_depth,
                  dense_mass=False, adapt_mass_matrix=True)
    mcmc = MCMC(kernel, num_warmup=options.num_warmup, num_samples=options.num_samples,
                num_chains=options.num_chains, chain_method="vectorized", progress_bar=False,
                jit_model_args=True)
    init = {"z": jnp.zeros((options.num_chains, n))}
    args = (w, scene.glob, stacks, grid, pa, obj0)
    pos_idx = _position_index(scene.glob)
    if progress is not None:
        progress(0, 2, "NUTS warm-up")
    mcmc.warmup(key, *args, init_params=init, extra_fields=())
    if progress is not None:
        progress(1, 2, "NUTS sampling")
    mcmc.run(mcmc.post_warmup_state.rng_key, *args,
             extra_fields=("diverging", "num_steps", "adapt_state.step_size"))
    zs = mcmc.get_samples(group_by_chain=True)["z"]  # [c, d, n]
    extra = mcmc.get_extra_fields(group_by_chain=True)
    nc, nd = zs.shape[:2]
    flux, pos = _summaries(zs.reshape(nc * nd, n), w, scene.glob, grid, pos_idx)
    flux = np.asarray(flux).reshape(nc, nd, -1)
    pos = np.asarray(pos).reshape(nc, nd, 2)
    measured = np.concatenate([np.asarray(st.free_flux * st.valid) for st in stacks]) > 0
    free = measured & ~np.concatenate([np.asarray(m)[:, 0] > 0 for m in w.inert])
    rhat = np.full(flux.shape[-1], np.nan)
    ess = np.full(flux.shape[-1], np.nan)
    if free.any():
        rhat[free] = np.asarray(split_gelman_rubin(flux[..., free]))
        ess[free] = np.asarray(effective_sample_size(flux[..., free]))
    pos_rhat = np.asarray(split_gelman_rubin(pos))
    pos_ess = np.asarray(effective_sample_size(pos))
    n_div = int(np.sum(np.asarray(extra["diverging"])))
    depth = float(np.mean(np.log2(np.asarray(extra["num_steps"]) + 1.0)))
    step = float(np.mean(np.asarray(extra["adapt_state.step_size"])))
    problems = []
    worst_rhat = float(np.nanmax(np.concatenate([rhat, pos_rhat]), initial=0.0))
    worst_ess = float(np.nanmin(np.concatenate([ess, pos_ess]), initial=np.inf))
    if not worst_rhat <= options.max_rhat:
        problems.append(f"max split R-hat {worst_rhat:.3f} > {options.max_rhat}")
    if not worst_ess >= options.min_ess:
        problems.append(f"min effective sample size {worst_ess:.0f} < {options.min_ess:.0f}")
    if n_div > options.max_divergent_fraction * nc * nd:
        problems.append(f"{n_div} of {nc * nd} draws diverged")
    elif n_div:
        log.warning("NUTS: %d of %d draws diverged", n_div, nc * nd)
    seconds = time.perf_counter() - t0
    if progress is not None:
        progress(2, 2, "NUTS done")
    log.info("NUTS: %.1f s, step size %.3g, mean tree depth %.1f, max R-hat %.4f, min ESS %.0f, %d divergent",
             seconds, step, depth, worst_rhat, worst_ess, n_div)
    flux_draws = np.array(flux.reshape(nc * nd, -1).T)
    flux_draws[~measured] = 0.0
    return PosteriorSamples(
        flux=flux_draws, position=pos.reshape(nc * nd, 2), rhat=rhat, ess=ess, position_rhat=pos_rhat,
        position_ess=pos_ess, n_chains=nc, n_params=n, n_divergent=n_div, n_draws=nc * nd, step_size=step,
        mean_tree_depth=depth, seconds=seconds, converged=not problems, problems=tuple(problems),
    )
