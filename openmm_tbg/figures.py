"""Figures of Boltzmann-generator samples that need no MD data: Ramachandran plots of raw and reweighted samples.

Used by ``openmm-tbg sample``. Matplotlib is driven through its object API with the Agg canvas, so plotting never
needs a display and never changes the user's pyplot state or backend.

The colour of a histogram is the fraction of the (weighted) samples in each bin on a logarithmic scale that
spans at most `DYNAMIC_RANGE` (bins below it are left blank), with ticks at distinct values. A panel with fewer
than ``min_samples`` valid samples, or (reweighted) fewer than ``min_samples`` effective samples, shows the
individual samples as points with a note such as "6 valid samples, ESS 1.0" instead of a histogram, which would
look like a density estimate it is not.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import numpy as np

from .weights import kish_ess

logger = logging.getLogger(__name__)

__all__ = ["backbone_torsion_pairs", "ramachandran_figure", "save_ramachandran", "save_refinement_history",
           "log_ticks", "colour_range", "MIN_SAMPLES", "LABEL_WEIGHT_FRACTION",
           "DYNAMIC_RANGE"]

#: Fewest (effective) samples a panel needs before it is drawn as a histogram.
MIN_SAMPLES = 20
#: Colour range of a histogram: bins below ``max / DYNAMIC_RANGE`` are left blank.
DYNAMIC_RANGE = 1e4


def backbone_torsion_pairs(positions_nm: np.ndarray, topology) -> tuple[np.ndarray, list[str]]:
    """Backbone (phi, psi) pairs in degrees, from `openmm_tbg.torsions.backbone_torsions` (mdtraj).

    A dipeptide has phi only on residue 2 and psi only on residue 1; that pair is its Ramachandran angle pair
    (as in TBG). A longer peptide gives one pair per interior residue (residues 2 .. L-1).

    Parameters
    ----------
    positions_nm : numpy.ndarray
        (n_frames, n_atoms, 3), nm.
    topology : openmm.app.Topology or mdtraj.Topology

    Returns
    -------
    pairs : numpy.ndarray
        (n_frames, n_pairs, 2) degrees in [-180, 180].
    labels : list of str
        One label per pair, e.g. ``"phi ALA2 / psi ALA1"``.

    Raises
    ------
    ValueError
        Wrong shape, or a topology without backbone torsions (fewer than two residues).
    """
    import mdtraj

    from .torsions import backbone_torsions

    top = topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
    phi, psi = backbone_torsions(np.asarray(positions_nm), top)  # checks the shape; radians, chain order
    # backbone_torsions' convention: phi[:, k] belongs to residue k + 2 and psi[:, k] to residue k + 1 (1-based).
    residues = [f"{r.name}{r.resSeq}" for r in top.residues]
    if phi.shape[1] == 1:
        pairs = np.stack([phi[:, 0], psi[:, 0]], axis=-1)[:, None, :]
        labels = [f"phi {residues[1]} / psi {residues[0]}"]
    else:  # interior residue j (1-based) pairs phi[:, j - 2] with psi[:, j - 1]
        pairs = np.stack([phi[:, :-1], psi[:, 1:]], axis=-1)
        labels = [f"phi/psi {residues[k + 1]}" for k in range(phi.shape[1] - 1)]
    return np.degrees(pairs.astype(np.float64)), labels


def log_ticks(vmin: float, vmax: float, max_ticks: int = 5) -> tuple[list[float], list[str]]:
    """Ticks and labels for a log colour scale on [vmin, vmax]; the labels are all distinct.

    Decades (1e-3, 1e-2, ...) where the range holds at least three, else up to four geometrically spaced values
    with as many significant digits (2-6) as it takes to tell them apart.

    Returns
    -------
    ticks : list of float
    labels : list of str
    """
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmin <= 0 or vmax < vmin:
        raise ValueError(f"log_ticks needs 0 < vmin <= vmax, got {vmin}, {vmax}.")
    if vmax / vmin < 1.0 + 1e-9:
        return [float(vmax)], [f"{vmax:.2g}"]
    lo, hi = int(np.ceil(np.log10(vmin) - 1e-9)), int(np.floor(np.log10(vmax) + 1e-9))
    if hi - lo >= 2:
        decades = [10.0 ** e for e in range(lo, hi + 1)]
        step = int(np.ceil(len(decades) / max_ticks))
        ticks = decades[::-1][::step][::-1]
        return ticks, [f"{t:.0e}".replace("e-0", "e-").replace("e+00", "") for t in ticks]
    values = np.geomspace(vmin, vmax, max(2, min(max_ticks, 4)))
    for digits in range(2, 7):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            break
    return [float(v) for v in values], labels


#: A sample holding at least this fraction of the total weight is labelled with its share in a points panel.
LABEL_WEIGHT_FRACTION = 0.05


def _note_panel(ax, points: np.ndarray, weights: Optional[np.ndarray], note: str) -> None:
    """Individual samples as points and a note instead of a histogram.

    With ``weights``, marker area grows with weight and the points are drawn in order of weight, the heaviest
    last and on top, so that a sample holding most of the weight is not buried under hundreds of light ones;
    light samples (below 1 % of the heaviest) are small grey dots, and each sample with at least
    `LABEL_WEIGHT_FRACTION` of the weight is labelled with its share.
    """
    if len(points):
        if weights is None:
            ax.scatter(points[:, 0], points[:, 1], s=25.0, c="tab:red", alpha=0.8, edgecolors="black",
                       linewidths=0.5, zorder=3)
        else:
            order = np.argsort(weights, kind="stable")  # heaviest last = on top
            p, w = points[order], weights[order] / weights.max()
            light = w < 0.01
            if light.any():
                ax.scatter(p[light, 0], p[light, 1], s=4.0, c="0.6", alpha=0.5, linewidths=0, zorder=2)
            ax.scatter(p[~light, 0], p[~light, 1], s=15.0 + 285.0 * w[~light], c="tab:red", alpha=0.85,
                       edgecolors="black", linewidths=0.6, zorder=3)
            share = weights[order] / weights.sum()
            for k in np.flatnonzero(share >= LABEL_WEIGHT_FRACTION)[::-1][:5]:
                # offset towards the inside of the plot, so that a label near an edge stays on it
                offset = (7 if p[k, 0] < 120 else -32, 7 if p[k, 1] < 150 else -15)
                ax.annotate(f"{100 * share[k]:.0f} %", (p[k, 0], p[k, 1]), xytext=offset, textcoords="offset points",
                            fontsize=8, zorder=4, bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                                                        "edgecolor": "none", "alpha": 0.8})
    # Centre of the plot (phi ~ 0 is rare), drawn below the points so that it never hides one.
    ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=9, zorder=1,
            bbox={"boxstyle": "round", "facecolor": "lightyellow", "edgecolor": "0.5", "alpha": 0.7})


def _histogram(points: np.ndarray, weights: Optional[np.ndarray], bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, h)``: the fraction of the samples (or of the weight) in each bin over [-180, 180]^2."""
    edges = np.linspace(-180.0, 180.0, bins + 1)
    w = np.ones(len(points)) if weights is None else weights
    h, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=[edges, edges], weights=w / w.sum())
    return edges, h


def colour_range(histograms) -> tuple[float, float]:
    """One log colour range ``(vmin, vmax)`` for several histograms: their largest bin, down to at most
    `DYNAMIC_RANGE` below it or their smallest occupied bin."""
    vmax = max(float(h.max()) for h in histograms)
    vmin = max(min(float(h[h > 0].min()) for h in histograms), vmax / DYNAMIC_RANGE)
    if vmin >= vmax:
        vmin = vmax / 10.0  # one occupied bin (or all equal): give the scale a decade so it can be drawn
    return vmin, vmax


def _histogram_panel(fig, ax, points: np.ndarray, weights: Optional[np.ndarray], bins: int,
                     vrange: Optional[tuple[float, float]] = None, shared: bool = False) -> None:
    """A log-colour 2-D histogram. Unweighted: the fraction of the samples per bin; weighted: of the weight.
    ``vrange`` (from `colour_range`) puts several panels on one scale; ``shared`` says so on the colour bar."""
    from matplotlib.colors import LogNorm

    edges, h = _histogram(points, weights, bins)
    vmin, vmax = vrange if vrange is not None else colour_range([h])
    shown = np.where(h >= vmin, h, np.nan)
    im = ax.pcolormesh(edges, edges, shown.T, norm=LogNorm(vmin=vmin, vmax=vmax), cmap="viridis",
                       shading="flat")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks, labels = log_ticks(vmin, vmax)
    cbar.set_ticks(ticks)
    cbar.set_ticklabels(labels)
    cbar.minorticks_off()
    width = 360.0 / bins
    what = "samples" if weights is None else "weight"
    cbar.set_label(f"fraction of {what} per {width:g}°×{width:g}° bin (log"
                   + ("; one scale for the figure)" if shared else ")"))


def ramachandran_figure(positions_nm: np.ndarray, topology, log_weights: Optional[np.ndarray] = None,
                        title: Optional[str] = None, bins: int = 36, min_samples: int = MIN_SAMPLES,
                        max_pairs: int = 3, effective_samples: Optional[float] = None):
    """Ramachandran plots of valid samples: raw (every sample counts once) and reweighted.

    Parameters
    ----------
    positions_nm : numpy.ndarray
        (n, n_atoms, 3) nm, the valid samples only (may be empty).
    topology : openmm.app.Topology or mdtraj.Topology
    log_weights : numpy.ndarray, optional
        (n,) importance log weights of the samples (unnormalised); None draws the raw panel only.
    title : str, optional
    bins : int
        Histogram bins per axis over [-180°, 180°].
    min_samples : int
        Below this many valid samples (raw panel) or effective samples (reweighted panel, Kish ESS in samples)
        the panel shows the samples as points with a note, not a histogram.
    max_pairs : int
        At most this many residues' (phi, psi) pairs, one row each.
    effective_samples : float, optional
        The effective sample size to report and test against ``min_samples``; default: the Kish ESS of
        ``log_weights`` in samples. Pass the original one for samples that repeat (resampled frames, a chain).

    Returns
    -------
    matplotlib.figure.Figure
        Attached to an Agg canvas (save with ``fig.savefig``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(positions_nm, dtype=np.float64)
    n_atoms = topology.getNumAtoms() if hasattr(topology, "getNumAtoms") else topology.n_atoms
    x = x.reshape(-1, n_atoms, 3)
    n = len(x)
    lw = None
    if log_weights is not None:
        lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
        if lw.shape[0] != n:
            raise ValueError(f"log_weights has {lw.shape[0]} entries but there are {n} samples; pass the log "
                             "weights of the valid samples only.")
        if n and not np.isfinite(lw).all():
            raise ValueError("log_weights of the valid samples must be finite; pass only valid samples.")
    if n:
        pairs, labels = backbone_torsion_pairs(x, topology)
    else:
        _, labels = backbone_torsion_pairs(np.zeros((1, n_atoms, 3)), topology)
        pairs = np.zeros((0, len(labels), 2))
    pairs, labels = pairs[:, :max_pairs], labels[:max_pairs]
    weights = None if lw is None or not n else np.exp(lw - lw.max())
    n_eff = kish_ess(lw) * n if lw is not None and n else 0.0
    if effective_samples is not None and n:
        n_eff = float(effective_samples)

    columns = [("raw: every valid sample counts once", None)]
    if lw is not None:
        columns.append(("reweighted: importance weights", weights))
    fig = Figure(figsize=(5.4 * len(columns), 4.6 * len(labels) + (0.5 if title else 0.0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(labels), len(columns), squeeze=False)
    # The raw and the reweighted histogram of a row share one colour scale, so that colours compare across them.
    histogram_columns = [w for _, w in columns
                         if n >= min_samples and (w is None or n_eff >= min_samples)]
    row_ranges, shared = [], []
    for row in range(len(labels)):
        hs = [_histogram(pairs[:, row], w, bins)[1] for w in histogram_columns]
        row_ranges.append(colour_range(hs) if hs else None)
        shared.append(len(hs) > 1)
    for row, label in enumerate(labels):
        for col, (heading, w) in enumerate(columns):
            ax = axes[row, col]
            points = pairs[:, row]
            if n == 0:
                _note_panel(ax, points, None, "no valid samples")
            elif w is None and n < min_samples:
                _note_panel(ax, points, None, f"{n} valid sample{'s' if n != 1 else ''}: too few for a density")
            elif w is not None and n_eff < min_samples:
                _note_panel(ax, points, w, f"{n} valid samples, ESS {n_eff:.1f}: too few for a density\n"
                                           "(marker area ∝ weight, heaviest on top)")
            else:
                _histogram_panel(fig, ax, points, w, bins, vrange=row_ranges[row], shared=shared[row])
            ax.set_xlim(-180, 180)
            ax.set_ylim(-180, 180)
            ax.set_xticks(np.arange(-180, 181, 90))
            ax.set_yticks(np.arange(-180, 181, 90))
            ax.set_aspect("equal")
            ax.set_xlabel("phi (degrees)")
            ax.set_ylabel("psi (degrees)")
            subtitle = f"{heading}\n{n} valid samples" + (f", ESS {n_eff:.1f}" if w is not None else "")
            ax.set_title(f"{label}\n{subtitle}" if len(labels) > 1 else subtitle, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_ramachandran(result, path: Union[str, os.PathLike], title: Optional[str] = None, **kwargs) -> str:
    """Write the Ramachandran PNG of a `SampleResult`'s valid samples (raw and reweighted panels).

    Parameters
    ----------
    result : SampleResult
        Importance-weighted samples; a Metropolis chain or resampled result has uniform weights, so its
        "reweighted" panel shows its states counted with their repeats.
    path : str or path
        PNG file to write.
    title : str, optional
    **kwargs
        Passed to `ramachandran_figure`.

    Returns
    -------
    str
        The path written.
    """
    valid = np.asarray(result.valid, dtype=bool)
    lw = np.asarray(result.log_weights, dtype=np.float64)[valid]
    kwargs.setdefault("effective_samples", result.effective_samples)
    fig = ramachandran_figure(result.positions[valid], result.topology, log_weights=lw, title=title, **kwargs)
    fig.savefig(path, dpi=100)
    logger.info("wrote %s", path)
    return os.fspath(path)


def save_refinement_history(result, path: Union[str, os.PathLike], title: Optional[str] = None) -> str:
    """Write a PNG of a refinement run (`openmm_tbg.refinement.RefinementResult`): the Kish ESS, the Pareto k
    of the weights (lower is more reliable; above 0.7 the ESS is not) and the valid fraction of each
    evaluation's fresh proposals against wall time, the kept (best) state marked.

    Returns
    -------
    str
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = result.history
    seconds = np.array([h["seconds"] for h in history])
    ess = 100 * np.array([h["ess"] for h in history])
    k = np.array([h.get("pareto_k", np.nan) for h in history], dtype=float)
    valid = 100 * np.array([h["valid"] for h in history])
    fig = Figure(figsize=(11, 3.2))
    FigureCanvasAgg(fig)
    left, middle, right = fig.subplots(1, 3)
    left.plot(seconds, ess, "o-", color="C0")
    middle.plot(seconds, k, "o-", color="C1")
    middle.axhline(0.7, color="0.5", linestyle=":", linewidth=1, label="0.7: ESS unreliable above")
    best = [i for i, h in enumerate(history) if h["step"] == result.best_step]
    if best:
        kept = f"kept (step {result.best_step})" if result.kept == "refined" else "kept: the starting weights"
        left.plot(seconds[best], ess[best], "*", color="C3", markersize=14, label=kept)
        middle.plot(seconds[best], k[best], "*", color="C3", markersize=14)
        left.legend(loc="best", fontsize=8)
    middle.legend(loc="best", fontsize=8)
    left.set_xlabel("wall time (s)")
    left.set_ylabel("Kish ESS of fresh proposals (%)")
    middle.set_xlabel("wall time (s)")
    middle.set_ylabel("Pareto k of their weights")
    right.plot(seconds, valid, "o-", color="C2")
    right.set_xlabel("wall time (s)")
    right.set_ylabel("valid proposals (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    logger.info("wrote %s", path)
    return os.fspath(path)
