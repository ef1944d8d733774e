"""Plots of posterior samples: traces, rank histograms and a corner plot.

Samples are a mapping from parameter name to an array of shape (chains, draws); a single
chain may be given as shape (draws,).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_trace", "plot_rank", "plot_corner"]


def _chains(samples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not samples:
        raise ValueError("samples: empty; expected {name: array of shape (chains, draws)}")
    out = {}
    for name, v in samples.items():
        a = np.asarray(v, float)
        a = a[None, :] if a.ndim == 1 else a
        if a.ndim != 2 or a.shape[1] < 2:
            raise ValueError(f"samples[{name!r}]: expected shape (chains, draws) with >= 2 draws, got {np.shape(v)}")
        out[name] = a
    return out


def plot_trace(samples: Mapping[str, np.ndarray]) -> Figure:
    """Trace of every chain (left) and the per-chain marginal histograms (right), one row per
    parameter. Chains that wander apart or stick show up here first."""
    s = _chains(samples)
    fig = Figure(figsize=(9, 1.8 * len(s) + 0.4), layout="constrained")
    axes = fig.subplots(len(s), 2, squeeze=False, width_ratios=[3, 1])
    for r, (name, a) in enumerate(s.items()):
        for c in range(a.shape[0]):
            axes[r, 0].plot(a[c], lw=0.5, alpha=0.8, color=f"C{c}")
            axes[r, 1].hist(a[c], bins=30, histtype="step", color=f"C{c}", orientation="horizontal")
        axes[r, 0].set_ylabel(name, fontsize=8)
        axes[r, 1].sharey(axes[r, 0])
    axes[-1, 0].set_xlabel("draw")
    axes[-1, 1].set_xlabel("count")
    return fig


def plot_rank(samples: Mapping[str, np.ndarray], *, bins: int = 20) -> Figure:
    """Rank histograms (Vehtari et al. 2021): ranks of each chain's draws within all draws.
    For well-mixed chains every histogram is flat within the dashed +-2-sigma band."""
    s = _chains(samples)
    fig = Figure(figsize=(3.0 * min(len(s), 4), 2.4 * int(np.ceil(len(s) / 4)) + 0.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(int(np.ceil(len(s) / 4)), min(len(s), 4), squeeze=False).ravel())
    for ax, (name, a) in zip(axes, s.items()):
        ranks = np.argsort(np.argsort(a.ravel())).reshape(a.shape)
        edges = np.linspace(0, a.size, bins + 1)
        expect = a.shape[1] / bins
        for c in range(a.shape[0]):
            ax.stairs(np.histogram(ranks[c], edges)[0], edges, color=f"C{c}", baseline=None)
        band = 2 * np.sqrt(expect * (1 - 1 / bins))
        ax.axhline(expect, color="0.3", lw=0.8)
        for sgn in (-1, 1):
            ax.axhline(expect + sgn * band, color="0.5", lw=0.6, ls="--")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("rank (all chains)", fontsize=7)
        ax.set_yticks([])
    for ax in axes[len(s):]:
        ax.set_visible(False)
    return fig


def plot_corner(samples: Mapping[str, np.ndarray], *, bins: int = 30, truths: Mapping[str, float] | None = None) -> Figure:
    """Marginal histograms on the diagonal and 2-D histograms below it (all chains pooled),
    with the 16/50/84 % quantiles dashed and optional ``truths`` as lines."""
    s = {k: v.ravel() for k, v in _chains(samples).items()}
    names = list(s)
    n = len(names)
    fig = Figure(figsize=(2.0 * n + 0.8, 2.0 * n + 0.8), layout="constrained")
    axes = fig.subplots(n, n, squeeze=False)
    for i, yi in enumerate(names):
        for j, xj in enumerate(names):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            if i == j:
                ax.hist(s[xj], bins=bins, histtype="step", color="k")
                for q in np.percentile(s[xj], [16, 50, 84]):
                    ax.axvline(q, color="0.4", ls="--", lw=0.7)
                ax.set_yticks([])
            else:
                ax.hist2d(s[xj], s[yi], bins=bins, cmap="Greys")
                if truths and yi in truths:
                    ax.axhline(truths[yi], color="tab:blue", lw=0.8)
            if truths and xj in truths:
                ax.axvline(truths[xj], color="tab:blue", lw=0.8)
            if i == n - 1:
                ax.set_xlabel(xj, fontsize=8)
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(yi, fontsize=8)
            elif j > 0:
                ax.set_yticklabels([])
    return fig
