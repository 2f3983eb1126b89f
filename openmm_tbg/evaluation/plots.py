"""Figures of an evaluation: Ramachandran panels (MD, BG raw, BG reweighted) and reduced-energy histograms.

Matplotlib runs with the Agg backend: figures go to PNG files and never need a display.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .metrics import _as_1d


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> str:
    """Lay out, write (PNG, 100 dpi) and close a figure; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)


def plot_ramachandran(md, bg_raw, bg_weights, path, bins: int = 60, title: Optional[str] = None) -> str:
    """Three Ramachandran panels: MD, BG raw, BG reweighted; log-density 2-D histograms on [-pi, pi]^2.

    Parameters
    ----------
    md : array_like, shape (n, 2)
        MD (phi, psi) pairs, radians (see `ramachandran_pairs`).
    bg_raw : array_like, shape (m, 2)
        (phi, psi) pairs of valid generator samples, radians; may be empty.
    bg_weights : array_like, shape (m,)
        Importance weights of ``bg_raw`` (unnormalised, non-negative).
    path : str or path
        PNG file to write.
    bins : int
        Histogram bins per axis.
    title : str, optional

    Returns
    -------
    str
        The path written.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    md = np.asarray(md, dtype=np.float64).reshape(-1, 2)
    bg = np.asarray(bg_raw, dtype=np.float64).reshape(-1, 2)
    w = np.asarray(bg_weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != bg.shape[0]:
        raise ValueError(f"bg_weights has {w.shape[0]} entries but bg_raw has {bg.shape[0]} samples.")
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharex=True, sharey=True)
    panels = [("MD", md, None), (f"BG raw (n={len(bg)})", bg, None), ("BG reweighted", bg, w)]
    for ax, (label, data, weights) in zip(axes, panels):
        if len(data) and (weights is None or weights.sum() > 0):
            h, _, _ = np.histogram2d(data[:, 0], data[:, 1], bins=[edges, edges], weights=weights, density=True)
            h = np.where(h > 0, h, np.nan)
            if np.isfinite(h).any():
                # Four decades of colour: a few tiny-weight samples must not wash out the scale.
                vmax = np.nanmax(h)
                im = ax.pcolormesh(edges, edges, h.T, norm=LogNorm(vmin=max(np.nanmin(h), 1e-4 * vmax), vmax=vmax),
                                   cmap="viridis", shading="flat")
                fig.colorbar(im, ax=ax, label="density (rad$^{-2}$)")
        else:
            ax.text(0, 0, "no valid samples", ha="center", va="center")
        ax.set_title(label)
        ax.set_xlim(-np.pi, np.pi)
        ax.set_ylim(-np.pi, np.pi)
        ax.set_xlabel(r"$\varphi$ (rad)")
    axes[0].set_ylabel(r"$\psi$ (rad)")
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def plot_energy_histogram(u_md, u_bg, w_bg, path, bins: int = 60, title: Optional[str] = None,
                          clip_quantile: float = 0.99) -> str:
    """Histograms of reduced energies (kT): MD, BG raw and BG reweighted.

    Parameters
    ----------
    u_md : array_like, shape (n,)
        MD reduced potentials, kT.
    u_bg : array_like, shape (m,)
        Reduced potentials of valid generator samples, kT (may be empty).
    w_bg : array_like, shape (m,)
        Importance weights of ``u_bg``.
    path : str or path
        PNG file to write.
    bins : int
    title : str, optional
    clip_quantile : float
        The x-range ends at this quantile of the raw BG energies (or the MD maximum if larger), so a few
        very high-energy samples do not squash the plot; the count beyond it is printed in the legend.

    Returns
    -------
    str
    """
    plt = _pyplot()
    u_md = _as_1d(u_md, "u_md")
    u_bg = _as_1d(u_bg, "u_bg")
    w = _as_1d(w_bg, "w_bg")
    if w.shape != u_bg.shape:
        raise ValueError(f"w_bg has {w.size} entries but u_bg has {u_bg.size}.")
    u_md = u_md[np.isfinite(u_md)]
    ok = np.isfinite(u_bg)
    u_bg, w = u_bg[ok], w[ok]
    lo = min(u_md.min(), u_bg.min()) if len(u_bg) else u_md.min()
    hi = max(u_md.max(), np.quantile(u_bg, clip_quantile)) if len(u_bg) else u_md.max()
    edges = np.linspace(lo, hi, bins + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.hist(u_md, bins=edges, density=True, histtype="stepfilled", alpha=0.4, color="gray", label="MD")
    if len(u_bg):
        beyond = int(np.sum(u_bg > hi))
        ax.hist(np.clip(u_bg, lo, hi), bins=edges, density=True, histtype="step", color="C0", lw=1.5,
                label=f"BG raw ({beyond} beyond range)")
        if w.sum() > 0:
            ax.hist(np.clip(u_bg, lo, hi), bins=edges, weights=w, density=True, histtype="step", color="C3",
                    lw=1.5, label="BG reweighted")
    ax.set_xlabel(r"reduced energy $u = U / k_BT$")
    ax.set_ylabel("density")
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)
