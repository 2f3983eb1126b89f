"""Figures of an evaluation: Ramachandran panels (MD, BG raw, BG reweighted) and reduced-energy histograms.

Panels follow the ``openmm-tbg sample`` figure (`openmm_tbg.figures`) and use its helpers: a 2-D histogram's
colour is the fraction of the (weighted) samples per bin on a log scale with distinct ticks, and a panel with
fewer than `MIN_SAMPLES` valid samples (or, reweighted, effective samples: Kish ESS in samples) shows the
samples as points with a note such as "6 valid samples, ESS 1.0: too few for a density" instead of a histogram
that would look like a density estimate. The energy histogram marks too few samples the same way.

Figures are drawn through matplotlib's object API on an Agg canvas: PNG files only, never a display, and the
user's pyplot state and backend are left alone.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from ..figures import MIN_SAMPLES, _histogram, _histogram_panel, _note_panel, colour_range
from ..weights import kish_ess
from .metrics import _as_1d

logger = logging.getLogger(__name__)


def _figure(figsize: tuple[float, float]):
    """A matplotlib Figure on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    """Lay out and write a figure (PNG, 100 dpi); returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    logger.info("wrote %s", path)
    return os.fspath(path)


def _checked_weights(weights, n: int, name: str, of: str) -> np.ndarray:
    """``weights`` as a float64 ``(n,)`` array of finite non-negative importance weights."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"{name} has {w.shape[0]} entries but {of} has {n} samples; pass one weight per sample.")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError(f"{name} must be finite and non-negative (importance weights, not log weights); "
                         f"exponentiate log weights first (e.g. np.exp(lw - lw.max())).")
    return w


def _effective_samples(w: np.ndarray, n_samples: float) -> float:
    """Kish effective sample size of weights ``w`` in samples (0 without a positive weight)."""
    if not len(w):
        return 0.0
    with np.errstate(divide="ignore"):
        return kish_ess(np.log(w)) * n_samples


def _few_note(n: int, n_eff: Optional[float], weights: Optional[np.ndarray], min_samples: int,
              noun: str = "valid sample") -> Optional[str]:
    """The note of a panel with too few samples for a density (None: enough), as the ``openmm-tbg sample``
    figure words it; ``n_eff`` and ``weights`` are given for a reweighted panel."""
    plural = noun + ("s" if n != 1 else "")
    if n == 0:
        return f"no {noun}s"
    if weights is not None and not weights.max() > 0:
        return f"{n} {plural}, all weights zero"
    if weights is None and n < min_samples:
        return f"{n} {plural}: too few for a density"
    if weights is not None and n_eff < min_samples:
        return f"{n} {plural}, ESS {n_eff:.1f}: too few for a density\n(marker area ∝ weight)"
    return None


def _ramachandran_panel(fig, ax, points_deg: np.ndarray, weights: Optional[np.ndarray], note: Optional[str],
                        bins: int, vrange=None, shared: bool = False) -> None:
    """One panel: a log-colour 2-D histogram (on the colour range ``vrange`` when given), or (with a ``note``)
    the samples as points and the note."""
    if note is None:
        _histogram_panel(fig, ax, points_deg, weights, bins, vrange=vrange, shared=shared)
    else:
        shown = weights if weights is not None and len(weights) and weights.max() > 0 else None
        _note_panel(ax, points_deg, shown, note)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-180, 180)
    ax.set_xticks(np.arange(-180, 181, 90))
    ax.set_yticks(np.arange(-180, 181, 90))
    ax.set_aspect("equal")
    ax.set_xlabel("phi (degrees)")


def _ramachandran_figure(md, bg_raw, bg_weights, bins: int, title: Optional[str], min_samples: int,
                         pairs_per_sample: int):
    """The Figure of `plot_ramachandran` (same parameters)."""
    md = np.asarray(md, dtype=np.float64).reshape(-1, 2)
    bg = np.asarray(bg_raw, dtype=np.float64).reshape(-1, 2)
    w = _checked_weights(bg_weights, bg.shape[0], "bg_weights", "bg_raw")
    if int(pairs_per_sample) != pairs_per_sample or pairs_per_sample < 1 or len(bg) % int(pairs_per_sample):
        raise ValueError(f"pairs_per_sample must be a positive integer that divides the {len(bg)} pairs of "
                         f"bg_raw (one (phi, psi) pair per residue and sample), got {pairs_per_sample!r}.")
    n_bg = len(bg) // int(pairs_per_sample)
    n_eff = _effective_samples(w, n_bg)
    fig = _figure((14.0, 5.2 if title else 4.8))
    axes = fig.subplots(1, 3)
    n_md = len(md) // int(pairs_per_sample) if len(md) % int(pairs_per_sample) == 0 else len(md)
    panels = [(f"MD\n{n_md} frames", md, None, _few_note(n_md, None, None, min_samples, "MD frame")),
              (f"BG raw: every valid sample counts once\n{n_bg} valid samples", bg, None,
               _few_note(n_bg, None, None, min_samples)),
              (f"BG reweighted: importance weights\n{n_bg} valid samples, ESS {n_eff:.1f}", bg, w,
               _few_note(n_bg, n_eff, w, min_samples))]
    # MD, raw and reweighted histograms on one colour scale, so that their colours compare (issue 21 item 3)
    histograms = [_histogram(np.degrees(data), weights, bins)[1] for _, data, weights, note in panels if note is None]
    vrange = colour_range(histograms) if histograms else None
    for ax, (heading, data, weights, note) in zip(axes, panels):
        _ramachandran_panel(fig, ax, np.degrees(data), weights, note, bins, vrange, len(histograms) > 1)
        ax.set_title(heading, fontsize=10)
    axes[0].set_ylabel("psi (degrees)")
    if title:
        fig.suptitle(title)
    return fig


def plot_ramachandran(md, bg_raw, bg_weights, path, bins: int = 60, title: Optional[str] = None, *,
                      min_samples: int = MIN_SAMPLES, pairs_per_sample: int = 1) -> str:
    """Three Ramachandran panels: MD, BG raw, BG reweighted; log-colour 2-D histograms on [-180°, 180°]^2.

    Parameters
    ----------
    md : array_like, shape (n, 2)
        MD (phi, psi) pairs, radians (see `ramachandran_pairs`).
    bg_raw : array_like, shape (m, 2)
        (phi, psi) pairs of valid generator samples, radians; may be empty.
    bg_weights : array_like, shape (m,)
        Importance weights of ``bg_raw`` (unnormalised, finite, non-negative).
    path : str or path
        PNG file to write.
    bins : int
        Histogram bins per axis.
    title : str, optional
    min_samples : int
        A panel with fewer samples (MD frames, valid BG samples, or for the reweighted panel the Kish ESS in
        samples) shows them as points with a note, e.g. "6 valid samples, ESS 1.0: too few for a density".
    pairs_per_sample : int
        (phi, psi) pairs per sample in ``bg_raw`` (one per interior residue, `ramachandran_pairs`), so that the
        panels count and test samples, not pairs.

    Returns
    -------
    str
        The path written.
    """
    return _save(_ramachandran_figure(md, bg_raw, bg_weights, bins, title, min_samples, pairs_per_sample), path)


def _energy_figure(u_md, u_bg, w_bg, bins: int, title: Optional[str], clip_quantile: float, min_samples: int):
    """The Figure of `plot_energy_histogram` (same parameters)."""
    u_md = _as_1d(u_md, "u_md")
    u_bg = _as_1d(u_bg, "u_bg")
    w = _as_1d(w_bg, "w_bg")
    if w.shape != u_bg.shape:
        raise ValueError(f"w_bg has {w.size} entries but u_bg has {u_bg.size}.")
    u_md = u_md[np.isfinite(u_md)]
    ok = np.isfinite(u_bg)
    u_bg, w = u_bg[ok], _checked_weights(w[ok], int(ok.sum()), "w_bg", "u_bg (finite entries)")
    n = len(u_bg)
    n_eff = _effective_samples(w, n)
    lo = min(u_md.min(), u_bg.min()) if n else u_md.min()
    hi = max(u_md.max(), np.quantile(u_bg, clip_quantile)) if n else u_md.max()
    edges = np.linspace(lo, hi, bins + 1)
    fig = _figure((6.5, 4.2))
    ax = fig.subplots()
    ax.hist(u_md, bins=edges, density=True, histtype="stepfilled", alpha=0.4, color="gray",
            label=f"MD ({len(u_md)} frames)")
    u_shown = np.clip(u_bg, lo, hi)
    raw_note = _few_note(n, None, None, min_samples)
    weighted_note = _few_note(n, n_eff, w if n else None, min_samples)
    if raw_note is None:
        beyond = int(np.sum(u_bg > hi))
        ax.hist(u_shown, bins=edges, density=True, histtype="step", color="C0", lw=1.5,
                label=f"BG raw ({beyond} beyond range)")
    if weighted_note is None:
        ax.hist(u_shown, bins=edges, weights=w, density=True, histtype="step", color="C3", lw=1.5,
                label=f"BG reweighted (ESS {n_eff:.1f})")
    else:
        # Too few for a density: the samples as points along the bottom of the plot, marker area ∝ weight.
        sized = n > 0 and w.max() > 0
        points = np.column_stack([u_shown, np.full(n, 0.05 * ax.get_ylim()[1])])
        _note_panel(ax, points, w if sized else None,
                    ("BG:\n" if raw_note is not None else "BG reweighted:\n") + weighted_note)
        if n:
            ax.collections[-1].set_label("BG samples" + (" (area ∝ weight)" if sized else ""))
        # Top left, above the histograms (with head room), rather than over the middle of the MD histogram.
        ax.set_ylim(top=1.3 * ax.get_ylim()[1])
        note = ax.texts[-1]
        note.set_position((0.02, 0.97))
        note.set_horizontalalignment("left")
        note.set_verticalalignment("top")
        note.set_zorder(4)
    ax.set_xlabel(r"reduced energy $u = U / k_BT$")
    ax.set_ylabel("density")
    ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def plot_energy_histogram(u_md, u_bg, w_bg, path, bins: int = 60, title: Optional[str] = None,
                          clip_quantile: float = 0.99, *, min_samples: int = MIN_SAMPLES) -> str:
    """Histograms of reduced energies (kT): MD, BG raw and BG reweighted.

    Parameters
    ----------
    u_md : array_like, shape (n,)
        MD reduced potentials, kT.
    u_bg : array_like, shape (m,)
        Reduced potentials of valid generator samples, kT (may be empty).
    w_bg : array_like, shape (m,)
        Importance weights of ``u_bg`` (finite, non-negative).
    path : str or path
        PNG file to write.
    bins : int
    title : str, optional
    clip_quantile : float
        The x-range ends at this quantile of the raw BG energies (or the MD maximum if larger), so a few
        very high-energy samples do not squash the plot; the count beyond it is printed in the legend.
    min_samples : int
        With fewer valid BG samples (raw) or effective samples (reweighted, Kish ESS in samples) that histogram
        is not drawn; the samples are shown as points along the bottom with a note such as
        "6 valid samples, ESS 1.0: too few for a density".

    Returns
    -------
    str
        The path written.
    """
    return _save(_energy_figure(u_md, u_bg, w_bg, bins, title, clip_quantile, min_samples), path)
