"""Evaluation of a Boltzmann generator against MD: ESS, energy-W2, torus-W2, basin populations, plots.

Metric functions are pure and work on unitless numpy arrays:

- energies are reduced potentials ``u = U / kT`` (kT units, as TBG reports energy-W2);
- angles are radians; torsions come from mdtraj;
- times are in the unit of the ``dt`` you pass (ps for the data set).

Conventions for MD autocorrelation: the *statistical inefficiency* ``g = 1 + 2 sum_{k>=1} rho_k`` (frames),
the *integrated autocorrelation time* ``tau_int = g dt / 2`` (Sokal's convention), and the number of
independent MD samples ``T / (2 tau_int) = n_frames / g``. For an AR(1) process with lag-1 correlation
``rho``, ``g = (1 + rho) / (1 - rho)``.

The pipeline (:func:`evaluate_peptide`, :func:`evaluate`, ``openmm-tbg evaluate``) draws importance-weighted
samples with :class:`openmm_tbg.sampler.BoltzmannGeneratorSampler` on the data set's Hamiltonian and compares
them with the MD frames of the data set; :func:`evaluate` writes ``results.md`` with a table and figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform as _platform
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "kish_ess", "energy_w2", "torus_w2", "torus_distance", "backbone_torsions", "ramachandran_pairs",
    "statistical_inefficiency", "integrated_autocorrelation_time", "md_independent_samples",
    "md_population", "weighted_population", "plot_ramachandran", "plot_energy_histogram",
    "evaluate_peptide", "evaluate", "write_results_markdown", "configure_parser", "run_from_cli",
]

TWO_PI = 2.0 * np.pi
#: Default number of samples per side in `torus_w2` (exact EMD on a 2000 x 2000 cost matrix: ~1-3 s).
TORUS_W2_MAX_SAMPLES = 2000


# --------------------------------------------------------------------------------------------------------------
# Importance weights
def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}; pass one value per sample.")
    return a


def kish_ess(log_weights) -> float:
    """Kish effective sample size ``(sum w)^2 / (n sum w^2)`` as a fraction of ``n``.

    Parameters
    ----------
    log_weights : array_like, shape (n,)
        Unnormalised log importance weights. ``-inf`` (rejected samples) counts as weight zero but still counts
        in ``n``.

    Returns
    -------
    float
        In [1/n, 1] if any weight is positive, else 0.

    Raises
    ------
    ValueError
        Empty input, NaN or ``+inf`` log weights.
    """
    lw = _as_1d(log_weights, "log_weights")
    if lw.size == 0:
        raise ValueError("kish_ess needs at least one log weight.")
    if np.isnan(lw).any() or np.isposinf(lw).any():
        raise ValueError(f"log_weights contain {int(np.isnan(lw).sum())} NaN and {int(np.isposinf(lw).sum())} "
                         "+inf values; give rejected samples -inf (weight zero) and check the energies/log q.")
    ok = np.isfinite(lw)
    if not ok.any():
        return 0.0
    w = np.exp(lw[ok] - lw[ok].max())  # shift: the ratio is scale-free and this avoids overflow
    return float(w.sum() ** 2 / (lw.size * np.sum(w ** 2)))


def _normalised_weights(values: np.ndarray, weights, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (values, weights summing to 1) with zero-weight entries removed; refuse non-finite used values."""
    if weights is None:
        w = np.ones(values.shape[0])
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (values.shape[0],):
            raise ValueError(f"{name}: weights have shape {w.shape} but there are {values.shape[0]} samples; "
                             "pass one weight per sample.")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"{name}: weights must be finite and non-negative (give rejected samples weight 0).")
    keep = w > 0
    values, w = values[keep], w[keep]
    if w.size == 0:
        raise ValueError(f"{name}: no sample has a positive weight (or there are no samples); there is nothing "
                         "to compare.")
    bad = ~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} sample(s) with non-zero weight have non-finite values; "
                         "drop rejected samples or give them weight 0.")
    return values, w / w.sum()


# --------------------------------------------------------------------------------------------------------------
# Wasserstein distances
def energy_w2(u_md, u_bg, weights_bg=None, weights_md=None) -> float:
    """2-Wasserstein distance between two 1-D (weighted) energy distributions.

    Exact for the empirical distributions: ``W2^2 = int_0^1 (F^-1(t) - G^-1(t))^2 dt`` with the step quantile
    functions of both samples, integrated over the merged breakpoints of their cumulative weights.

    Parameters
    ----------
    u_md : array_like, shape (n,)
        Reference energies (e.g. MD), in kT (reduced potentials); any unit works, the result has the same one.
    u_bg : array_like, shape (m,)
        Energies of the generator's samples.
    weights_bg, weights_md : array_like, optional
        Non-negative (e.g. importance) weights; need not be normalised. Samples with weight 0 are ignored,
        so rejected samples may carry non-finite energies there. Default uniform.

    Returns
    -------
    float
        W2 in the unit of the energies.
    """
    a, wa = _normalised_weights(_as_1d(u_md, "u_md"), weights_md, "energy_w2 (u_md)")
    b, wb = _normalised_weights(_as_1d(u_bg, "u_bg"), weights_bg, "energy_w2 (u_bg)")
    ia, ib = np.argsort(a, kind="stable"), np.argsort(b, kind="stable")
    a, wa, b, wb = a[ia], wa[ia], b[ib], wb[ib]
    ca, cb = np.cumsum(wa), np.cumsum(wb)
    ca[-1] = cb[-1] = 1.0  # guard rounding so every t in (0, 1] has a quantile
    t = np.unique(np.concatenate([[0.0], ca, cb]))
    mid = 0.5 * (t[1:] + t[:-1])
    qa = a[np.minimum(np.searchsorted(ca, mid), a.size - 1)]
    qb = b[np.minimum(np.searchsorted(cb, mid), b.size - 1)]
    return float(np.sqrt(np.sum(np.diff(t) * (qa - qb) ** 2)))


def torus_distance(a, b) -> np.ndarray:
    """Pairwise squared geodesic distances on the flat torus ``[-pi, pi)^d``.

    Parameters
    ----------
    a : array_like, shape (n, d)
    b : array_like, shape (m, d)
        Angles in radians.

    Returns
    -------
    numpy.ndarray, shape (n, m)
        ``sum_k min(|a_k - b_k| mod 2 pi, 2 pi - |a_k - b_k| mod 2 pi)^2``, rad^2.
    """
    d = np.abs(np.asarray(a, dtype=np.float64)[:, None, :] - np.asarray(b, dtype=np.float64)[None, :, :])
    d = np.mod(d, TWO_PI)
    d = np.minimum(d, TWO_PI - d)
    return np.sum(d ** 2, axis=-1)


def _as_angles(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (n_samples, n_angles), e.g. np.stack([phi, psi], axis=1); got "
                         f"{a.shape}.")
    return a


def torus_w2(angles_a, angles_b, weights_b=None, max_samples: int = TORUS_W2_MAX_SAMPLES, seed=0,
             weights_a=None) -> float:
    """2-Wasserstein distance between two (weighted) samples on the torus, with periodic geodesic distance.

    Solved exactly as an optimal-transport linear program (``ot.emd2`` from POT) on at most ``max_samples``
    points per side. Larger samples are subsampled uniformly without replacement (weights of the kept points
    renormalised). Equal-size uniform samples fall back to ``scipy.optimize.linear_sum_assignment`` when POT is
    not installed. Note that the empirical W2 of two finite samples of the *same* distribution is positive and
    shrinks with the sample size, so compare numbers computed with the same ``max_samples``.

    Parameters
    ----------
    angles_a : array_like, shape (n, d) or (n,)
        Reference angles (e.g. MD (phi, psi)), radians.
    angles_b : array_like, shape (m, d) or (m,)
        Generator angles, radians.
    weights_b, weights_a : array_like, optional
        Non-negative weights (e.g. importance weights); zero-weight samples are ignored. Default uniform.
    max_samples : int
        Subsample size per side (default 2000).
    seed : int or numpy.random.Generator
        For the subsampling.

    Returns
    -------
    float
        W2 in radians.
    """
    if int(max_samples) != max_samples or max_samples < 2:
        raise ValueError(f"max_samples must be an integer >= 2, got {max_samples!r}.")
    a, b = _as_angles(angles_a, "angles_a"), _as_angles(angles_b, "angles_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"angles_a has {a.shape[1]} angle(s) per sample but angles_b has {b.shape[1]}; compare "
                         "the same torsions.")
    a, wa = _normalised_weights(a, weights_a, "torus_w2 (angles_a)")
    b, wb = _normalised_weights(b, weights_b, "torus_w2 (angles_b)")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def subsample(x, w):
        if len(x) <= max_samples:
            return x, w
        idx = np.sort(rng.choice(len(x), size=int(max_samples), replace=False))
        return x[idx], w[idx] / w[idx].sum()

    a, wa = subsample(a, wa)
    b, wb = subsample(b, wb)
    cost = torus_distance(a, b)
    try:
        import ot
    except ImportError:
        uniform = np.allclose(wa, wa[0]) and np.allclose(wb, wb[0])
        if len(a) != len(b) or not uniform:
            raise ImportError("torus_w2 with weights or unequal sample sizes needs the POT package; install it "
                              "with `pip install pot`.") from None
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost)
        return float(np.sqrt(cost[rows, cols].mean()))
    value = ot.emd2(wa, wb, cost, numItermax=10_000_000)
    return float(np.sqrt(max(float(value), 0.0)))


# --------------------------------------------------------------------------------------------------------------
# Torsions
def backbone_torsions(traj_or_positions, topology=None) -> tuple[np.ndarray, np.ndarray]:
    """Backbone torsions phi and psi with mdtraj.

    Parameters
    ----------
    traj_or_positions : mdtraj.Trajectory or array_like, shape (n_frames, n_atoms, 3) or (n_atoms, 3)
        Positions in nm (or an openmm.unit Quantity).
    topology : openmm.app.Topology or mdtraj.Topology, optional
        Required for positions.

    Returns
    -------
    phi, psi : numpy.ndarray, shape (n_frames, n_residues - 1), radians in [-pi, pi]
        All defined torsions in chain order: ``phi[:, k]`` is phi of residue ``k + 2`` and ``psi[:, k]`` psi of
        residue ``k + 1`` (1-based). For a dipeptide that is phi of residue 2 and psi of residue 1, the pair of
        TBG's Ramachandran plots.
    """
    import mdtraj

    if isinstance(traj_or_positions, mdtraj.Trajectory):
        traj = traj_or_positions
    else:
        from openmm import unit

        if topology is None:
            raise ValueError("backbone_torsions needs the topology when given positions; pass "
                             "backbone_torsions(positions, topology).")
        x = traj_or_positions
        if unit.is_quantity(x):
            x = x.value_in_unit(unit.nanometer)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        top = topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
        if x.ndim != 3 or x.shape[1:] != (top.n_atoms, 3):
            raise ValueError(f"positions must have shape (n_frames, {top.n_atoms}, 3) in nm for this topology, got "
                             f"{x.shape}.")
        traj = mdtraj.Trajectory(x, top)
    _, phi = mdtraj.compute_phi(traj)
    _, psi = mdtraj.compute_psi(traj)
    if phi.shape[1] == 0 or psi.shape[1] == 0:
        raise ValueError(f"The topology has no backbone phi/psi torsions ({traj.topology.n_residues} residue(s)); "
                         "evaluation needs a peptide with at least two amino acids.")
    return phi.astype(np.float64), psi.astype(np.float64)


def ramachandran_pairs(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """(phi, psi) pairs of the same residue for Ramachandran plots, shape (n_pairs, 2), radians.

    A dipeptide has only phi of residue 2 and psi of residue 1: that pair is used (as in TBG). Longer peptides
    give one pair per interior residue (residues 2 .. L-1), stacked over residues.
    """
    phi, psi = np.asarray(phi), np.asarray(psi)
    if phi.ndim == 1:
        return np.stack([phi, psi], axis=1)
    if phi.shape[1] == 1:
        return np.stack([phi[:, 0], psi[:, 0]], axis=1)
    # phi[:, k] belongs to residue k + 2, psi[:, k] to residue k + 1: interior residue j pairs phi[j-2], psi[j-1].
    return np.stack([phi[:, :-1].reshape(-1, order="F"), psi[:, 1:].reshape(-1, order="F")], axis=1)


def torsion_features(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """All backbone torsions as one (n_frames, n_phi + n_psi) array, radians (the torus for `torus_w2`)."""
    phi, psi = np.asarray(phi, dtype=np.float64), np.asarray(psi, dtype=np.float64)
    phi = phi[:, None] if phi.ndim == 1 else phi
    psi = psi[:, None] if psi.ndim == 1 else psi
    return np.concatenate([phi, psi], axis=1)


# --------------------------------------------------------------------------------------------------------------
# Autocorrelation
def _split_runs(x, runs) -> list[np.ndarray]:
    if runs is None:
        if isinstance(x, (list, tuple)):
            chains = [np.asarray(c, dtype=np.float64) for c in x]
        else:
            chains = [np.asarray(x, dtype=np.float64)]
    else:
        x = np.asarray(x, dtype=np.float64)
        runs = np.asarray(runs)
        if runs.shape != x.shape[:1]:
            raise ValueError(f"runs has shape {runs.shape} but x has {x.shape[0]} frames; give one run index per "
                             "frame.")
        chains = [x[runs == r] for r in np.unique(runs)]
    for c in chains:
        if c.ndim != 1:
            raise ValueError(f"Each time series must be 1-D, got shape {c.shape}; compute the observable first.")
        if not np.isfinite(c).all():
            raise ValueError("The time series contains NaN or infinite values; drop or fix those frames first.")
    if sum(len(c) for c in chains) < 2:
        raise ValueError("Need at least two frames to estimate an autocorrelation time.")
    return chains


def _autocorrelation(chains: list[np.ndarray]) -> np.ndarray:
    """Normalised autocorrelation function pooled over chains (global mean, per-lag pair counts)."""
    mean = np.concatenate(chains).mean()
    max_len = max(len(c) for c in chains)
    acov = np.zeros(max_len)
    pairs = np.zeros(max_len)
    for c in chains:
        n = len(c)
        if n == 0:
            continue
        y = c - mean  # global mean: between-run differences (unconverged slow modes) raise tau, conservatively
        nfft = 1 << int(np.ceil(np.log2(2 * n)))
        f = np.fft.rfft(y, nfft)
        acov[:n] += np.fft.irfft(f * np.conjugate(f), nfft)[:n]
        pairs[:n] += np.arange(n, 0, -1)
    acov = acov / np.maximum(pairs, 1)
    if acov[0] <= 0:
        return np.concatenate([[1.0], np.zeros(max_len - 1)])  # constant series: no correlation
    return acov / acov[0]


def statistical_inefficiency(x, runs=None) -> float:
    """Statistical inefficiency ``g = 1 + 2 sum_{k>=1} rho_k`` in frames (>= 1).

    Geyer's initial monotone positive-sequence estimator: sums ``Gamma_m = rho_{2m} + rho_{2m+1}`` while they
    are positive, each capped by the previous one; ``g = 2 sum_m Gamma_m - 1``. Multiple runs share one
    autocorrelation function (pooled about the global mean).

    Parameters
    ----------
    x : array_like, shape (n,), or list of 1-D arrays (one per run)
        Time series sampled at equal intervals.
    runs : array_like, shape (n,), optional
        Run index per frame when ``x`` is one concatenated array.

    Returns
    -------
    float
        ``g``; ``n_frames / g`` frames are effectively independent.
    """
    rho = _autocorrelation(_split_runs(x, runs))
    n_pairs = len(rho) // 2
    if n_pairs == 0:
        return 1.0
    gamma = rho[0:2 * n_pairs:2] + rho[1:2 * n_pairs:2]
    total, prev = 0.0, np.inf
    for g_m in gamma:
        if g_m <= 0:
            break
        prev = min(prev, g_m)
        total += prev
    return float(max(1.0, 2.0 * total - 1.0))


def integrated_autocorrelation_time(x, dt: float = 1.0, runs=None) -> float:
    """Integrated autocorrelation time ``tau_int = g dt / 2`` (Sokal's convention).

    Parameters
    ----------
    x : array_like or list of arrays
        As in :func:`statistical_inefficiency`.
    dt : float
        Time between frames (e.g. ps); the result has this unit.
    runs : array_like, optional
        Run index per frame.

    Returns
    -------
    float
        ``tau_int``; a trajectory of length ``T`` holds ``T / (2 tau_int)`` independent samples.
    """
    if not dt > 0:
        raise ValueError(f"dt must be positive, got {dt!r}.")
    return 0.5 * float(dt) * statistical_inefficiency(x, runs)


def backbone_observables(phi: np.ndarray, psi: np.ndarray) -> dict[str, np.ndarray]:
    """sin/cos of every backbone torsion: {"sin(phi1)": (n,), ...} (unitless)."""
    out = {}
    for label, ang in (("phi", phi), ("psi", psi)):
        ang = np.asarray(ang).reshape(len(ang), -1)
        for k in range(ang.shape[1]):
            suffix = str(k + 1) if ang.shape[1] > 1 else ""
            out[f"sin({label}{suffix})"] = np.sin(ang[:, k])
            out[f"cos({label}{suffix})"] = np.cos(ang[:, k])
    return out


def md_independent_samples(phi: np.ndarray, psi: np.ndarray, run, run_interval_ps,
                           frame_stride: int = 1) -> dict:
    """Independent MD samples from the slowest backbone observable (sin/cos of phi and psi).

    Runs with the same frame interval share one pooled autocorrelation function per observable; the slowest
    observable (largest ``tau_int``) of each group sets its independent samples ``T_group / (2 tau_int)``.
    Groups are summed. Per-run values are reported too.

    Parameters
    ----------
    phi, psi : numpy.ndarray, shape (n_frames, k)
        Backbone torsions (radians) of consecutive frames, run after run.
    run : array_like, shape (n_frames,)
        Run index per frame.
    run_interval_ps : array_like, shape (n_runs,)
        Time between stored frames of each run, ps.
    frame_stride : int
        The frames are every ``frame_stride``-th stored frame (the time step is ``stride x interval``).

    Returns
    -------
    dict
        ``tau_int_ps`` (slowest observable, effective over all runs: ``T / (2 n_independent)``),
        ``slowest`` (observable name), ``total_time_ps``, ``n_independent``, ``n_frames``,
        ``groups`` (per interval: ``interval_ps``, ``n_runs``, ``time_ps``, ``tau_int_ps`` per observable),
        ``per_run`` (list of ``run``, ``time_ps``, ``tau_int_ps``, ``slowest``, ``n_independent``).
    """
    run = np.asarray(run)
    interval = np.asarray(run_interval_ps, dtype=np.float64).reshape(-1)
    if run.shape != (len(phi),):
        raise ValueError(f"run has shape {run.shape}, expected ({len(phi)},) (one run index per frame).")
    if run.size and run.max() >= interval.size:
        raise ValueError(f"run indices go up to {run.max()} but run_interval_ps has {interval.size} entries.")
    obs = backbone_observables(phi, psi)
    runs_present = np.unique(run)
    per_run = []
    for r in runs_present:
        sel = run == r
        dt = interval[r] * frame_stride
        taus = {k: integrated_autocorrelation_time(v[sel], dt) for k, v in obs.items()}
        slow = max(taus, key=taus.get)
        t = sel.sum() * dt
        per_run.append({"run": int(r), "time_ps": float(t), "tau_int_ps": float(taus[slow]), "slowest": slow,
                        "n_independent": float(t / (2 * taus[slow]))})
    groups, n_ind, total = [], 0.0, 0.0
    slowest_overall, slowest_tau = None, -1.0
    for dt_stored in np.unique(interval[runs_present]):
        members = [r for r in runs_present if interval[r] == dt_stored]
        sel = np.isin(run, members)
        dt = dt_stored * frame_stride
        taus = {k: integrated_autocorrelation_time(v[sel], dt, runs=run[sel]) for k, v in obs.items()}
        slow = max(taus, key=taus.get)
        t = sel.sum() * dt
        n_ind += t / (2 * taus[slow])
        total += t
        if taus[slow] > slowest_tau:
            slowest_overall, slowest_tau = slow, taus[slow]
        groups.append({"interval_ps": float(dt), "n_runs": len(members), "time_ps": float(t),
                       "tau_int_ps": {k: float(v) for k, v in taus.items()}, "slowest": slow})
    return {"tau_int_ps": float(total / (2 * n_ind)), "slowest": slowest_overall, "total_time_ps": float(total),
            "n_independent": float(n_ind), "n_frames": int(len(run)), "groups": groups, "per_run": per_run}


# --------------------------------------------------------------------------------------------------------------
# Basin populations
def alpha_l_indicator(phi: np.ndarray) -> np.ndarray:
    """1.0 where a frame is in the alpha-L region (phi > 0) of the first phi torsion (residue 2), else 0.0."""
    phi = np.asarray(phi).reshape(len(phi), -1)
    return (phi[:, 0] > 0).astype(np.float64)


def md_population(indicator, run) -> dict:
    """Population of a basin in MD with an error bar from the spread between independent runs.

    Parameters
    ----------
    indicator : array_like, shape (n_frames,)
        1 inside the basin, 0 outside.
    run : array_like, shape (n_frames,)
        Run index per frame.

    Returns
    -------
    dict
        ``mean`` (pooled fraction of frames), ``sem`` (std of per-run fractions / sqrt(n_runs); NaN for one
        run), ``per_run`` (fractions), ``n_runs``, ``runs_without_visit``.
    """
    ind = _as_1d(indicator, "indicator")
    run = np.asarray(run)
    if run.shape != ind.shape:
        raise ValueError(f"run has shape {run.shape} but indicator has {ind.shape}; give one run index per frame.")
    per_run = np.array([ind[run == r].mean() for r in np.unique(run)])
    sem = float(per_run.std(ddof=1) / np.sqrt(len(per_run))) if len(per_run) > 1 else float("nan")
    return {"mean": float(ind.mean()), "sem": sem, "per_run": per_run.tolist(), "n_runs": int(len(per_run)),
            "runs_without_visit": int(np.sum(per_run == 0))}


def weighted_population(indicator, log_weights) -> dict:
    """Population of a basin from importance-weighted samples, error bar from the Kish ESS.

    Parameters
    ----------
    indicator : array_like, shape (n,)
        1 inside the basin, 0 outside (values of rejected samples are ignored).
    log_weights : array_like, shape (n,)
        Log importance weights; ``-inf`` for rejected samples.

    Returns
    -------
    dict
        ``mean``, ``sem = sqrt(p (1 - p) / n_eff)`` with ``n_eff = ESS x n`` (NaN without valid samples),
        ``n_eff``.
    """
    ind = _as_1d(indicator, "indicator")
    lw = _as_1d(log_weights, "log_weights")
    if ind.shape != lw.shape:
        raise ValueError(f"indicator has shape {ind.shape} but log_weights has {lw.shape}.")
    ok = np.isfinite(lw)
    if not ok.any():
        return {"mean": float("nan"), "sem": float("nan"), "n_eff": 0.0}
    w = np.exp(lw[ok] - lw[ok].max())
    w /= w.sum()
    p = float(np.sum(w * ind[ok]))
    n_eff = kish_ess(lw) * lw.size
    return {"mean": p, "sem": float(np.sqrt(max(p * (1 - p), 0.0) / n_eff)), "n_eff": float(n_eff)}


# --------------------------------------------------------------------------------------------------------------
# Plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)


# --------------------------------------------------------------------------------------------------------------
# Pipeline
def _evenly_spaced(n: int, k: Optional[int]) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, int(k)).round().astype(np.int64))


def _if_any(condition: bool, fn, *args, **kwargs) -> float:
    """fn(*args) if ``condition`` else NaN: without valid samples a distance is undefined, not zero."""
    return float(fn(*args, **kwargs)) if condition else float("nan")


def evaluate_peptide(model, trajectory, n_samples: int = 1000, seed: Optional[int] = 0, *,
                     out_dir: Union[str, os.PathLike, None] = None, temperature=310.0, batch_size: int = 256,
                     device="auto", md_energy_frames: Optional[int] = 2000,
                     torus_samples: int = TORUS_W2_MAX_SAMPLES, frame_stride: int = 1,
                     sampler_options: Optional[dict] = None, progress: bool = True) -> dict:
    """Sample one peptide with the Boltzmann generator and compare it with its MD frames.

    Builds the System of the data set's Hamiltonian (:func:`openmm_tbg.peptides.create_system`: amber14-all +
    implicit/obc1, CutoffNonPeriodic 2 nm, no constraints) on the trajectory's topology, draws ``n_samples``
    importance-weighted samples, and computes the valid fraction (rejections by reason), Kish ESS,
    energy-W2 (kT) and torus-W2 (rad) of all backbone torsions, raw and reweighted, the alpha-L (phi > 0)
    population in MD (between-run error) and BG (ESS-based error), MD autocorrelation times, and timings.

    Parameters
    ----------
    model : None, str, path or TransferableFlow
        None (or ``"default"``): the shipped model; a checkpoint path; or a flow.
    trajectory : openmm_tbg.data.PeptideTrajectory
        MD reference frames (consecutive frames of each run, every ``frame_stride``-th stored frame).
    n_samples : int
        Flow proposals.
    seed : int, optional
        Seeds the flow prior and the W2 subsampling.
    out_dir : path, optional
        Where ``{name}_ramachandran.png`` and ``{name}_energy.png`` are written; None writes no figures.
    temperature : float or Quantity
        Kelvin (the data set: 310 K).
    batch_size, device
        Passed to :class:`~openmm_tbg.sampler.BoltzmannGeneratorSampler`.
    md_energy_frames : int, optional
        Evenly spaced MD frames whose energies are evaluated for energy-W2 (None: all frames).
    torus_samples : int
        Subsample size per side for `torus_w2`.
    frame_stride : int
        Stride with which the trajectory was loaded (for autocorrelation times).
    sampler_options : dict, optional
        Further keyword arguments of BoltzmannGeneratorSampler (ode_method, atol, rtol, divergence, ...).
    progress : bool

    Returns
    -------
    dict
        JSON-able metrics (see ``results.md`` columns); keys include ``name``, ``n_atoms``, ``n_samples``,
        ``n_valid``, ``valid_fraction``, ``rejections``, ``ess``, ``ess_valid``, ``energy_w2_raw``,
        ``energy_w2_reweighted``, ``torus_w2_raw``, ``torus_w2_reweighted``, ``torus_w2_md_baseline``,
        ``alpha_l_md``, ``alpha_l_bg_raw``, ``alpha_l_bg``, ``md_autocorrelation``, ``sample_wall_s``,
        ``samples_per_s``, ``effective_samples_per_s``, ``figures``.
    """
    from .energy import to_kelvin
    from .peptides import create_system
    from .sampler import BoltzmannGeneratorSampler

    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if model == "default":
        model = None
    name = trajectory.name
    kelvin = to_kelvin(temperature)
    rng = np.random.default_rng(seed)
    t_setup = time.perf_counter()
    system = create_system(trajectory.topology)
    sampler = BoltzmannGeneratorSampler(system, trajectory.topology, model=model, temperature=kelvin,
                                        device=device, batch_size=batch_size, seed=seed,
                                        encoding=trajectory.encoding, positions=trajectory.positions[0],
                                        **(sampler_options or {}))
    setup_s = time.perf_counter() - t_setup
    try:
        t0 = time.perf_counter()
        result = sampler.sample(int(n_samples), method="importance", progress=progress)
        sample_wall_s = time.perf_counter() - t0
        md_idx = _evenly_spaced(trajectory.n_frames, md_energy_frames)
        u_md = sampler.reduced_potential(trajectory.positions[md_idx].astype(np.float64))
    finally:
        sampler.close()
    n_md_bad = int(np.sum(~np.isfinite(u_md)))
    if n_md_bad:
        logger.warning("%s: %d MD frame(s) have non-finite energies and are left out of energy-W2.", name, n_md_bad)
    u_md_ok = u_md[np.isfinite(u_md)]

    valid = result.valid
    lw = result.log_weights
    u_bg = result.reduced_potentials[valid]
    w_bg = np.exp(lw[valid] - lw[valid].max()) if valid.any() else np.zeros(0)

    phi_md, psi_md = backbone_torsions(trajectory.positions, trajectory.topology)
    feat_md = torsion_features(phi_md, psi_md)
    if valid.any():
        phi_bg, psi_bg = backbone_torsions(result.positions[valid], trajectory.topology)
    else:
        n_phi, n_psi = phi_md.shape[1], psi_md.shape[1]
        phi_bg, psi_bg = np.zeros((0, n_phi)), np.zeros((0, n_psi))
    feat_bg = torsion_features(phi_bg, psi_bg)
    # Floor of torus-W2 at the BG's sample size: MD against MD from *independent* runs (even vs odd runs; a
    # random frame split of correlated frames would be too optimistic). One run: first vs second half.
    run_ids = np.unique(trajectory.run)
    if len(run_ids) > 1:
        half = np.isin(trajectory.run, run_ids[::2])
    else:
        half = np.arange(len(feat_md)) < len(feat_md) // 2
    n_cmp = min(torus_samples, int(valid.sum()), int(half.sum()), int((~half).sum()))
    md_baseline = (torus_w2(feat_md[half], feat_md[~half], max_samples=n_cmp, seed=rng) if n_cmp >= 2
                   else float("nan"))

    alpha_md = md_population(alpha_l_indicator(phi_md), trajectory.run)
    lw_valid_or_inf = np.where(valid, lw, -np.inf)
    ind_bg_all = np.zeros(len(valid))
    ind_bg_all[valid] = alpha_l_indicator(phi_bg) if valid.any() else []
    alpha_bg = weighted_population(ind_bg_all, lw_valid_or_inf)
    alpha_bg_raw = weighted_population(ind_bg_all, np.where(valid, 0.0, -np.inf))
    md_tau = md_independent_samples(phi_md, psi_md, trajectory.run, trajectory.run_interval_ps,
                                    frame_stride=frame_stride)

    n = int(n_samples)
    has_bg = bool(valid.any()) and len(u_md_ok) > 0
    if not valid.any():
        logger.warning("%s: none of the %d samples is valid (%s); W2 distances are undefined (NaN).", name, n,
                       {k: v for k, v in result.rejections.items() if v})
    ess = float(result.ess)
    ess_valid = kish_ess(lw[valid]) if valid.any() else 0.0
    out = {
        "name": name, "sequence": trajectory.encoding.sequence if hasattr(trajectory.encoding, "sequence") else name,
        "n_atoms": int(trajectory.n_atoms), "temperature_K": kelvin, "n_samples": n,
        "n_valid": int(valid.sum()), "valid_fraction": float(valid.mean()), "rejections": dict(result.rejections),
        "n_mirrored": int(result.n_mirrored), "n_relabelled": int(result.n_relabelled),
        "ess": ess, "ess_valid": float(ess_valid),
        "energy_w2_raw": _if_any(has_bg, energy_w2, u_md_ok, u_bg),
        "energy_w2_reweighted": _if_any(has_bg, energy_w2, u_md_ok, u_bg, w_bg),
        "torus_w2_raw": _if_any(has_bg, torus_w2, feat_md, feat_bg, max_samples=torus_samples, seed=rng),
        "torus_w2_reweighted": _if_any(has_bg, torus_w2, feat_md, feat_bg, w_bg, max_samples=torus_samples,
                                       seed=rng),
        "torus_w2_md_baseline": float(md_baseline), "torus_w2_samples": int(torus_samples),
        "md_energy_frames": int(len(md_idx)), "md_energy_non_finite": n_md_bad,
        "mean_u_md": float(u_md_ok.mean()) if len(u_md_ok) else float("nan"),
        "alpha_l_md": alpha_md, "alpha_l_bg": alpha_bg, "alpha_l_bg_raw": alpha_bg_raw,
        "md_autocorrelation": md_tau, "md_frames": int(trajectory.n_frames),
        "setup_s": float(setup_s), "sample_wall_s": float(sample_wall_s),
        "samples_per_s": float(n / sample_wall_s), "effective_samples_per_s": float(ess * n / sample_wall_s),
        "model_path": sampler.model_path, "model_sha256": sampler.model_sha256, "figures": {},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rama = out_dir / f"{name}_ramachandran.png"
        energy = out_dir / f"{name}_energy.png"
        pairs_bg = ramachandran_pairs(phi_bg, psi_bg)
        # ramachandran_pairs stacks residue after residue, so each frame's weight repeats once per residue.
        w_pairs = np.tile(w_bg, len(pairs_bg) // len(w_bg)) if len(w_bg) else w_bg
        plot_ramachandran(ramachandran_pairs(phi_md, psi_md), pairs_bg, w_pairs, rama,
                          title=f"{name}: {n} BG samples, ESS {100 * ess:.2f} %")
        plot_energy_histogram(u_md_ok, u_bg, w_bg, energy, title=f"{name}: reduced energies at {kelvin:g} K")
        out["figures"] = {"ramachandran": str(rama), "energy": str(energy)}
    logger.info("%s: valid %.1f %%, ESS %.2f %%, E-W2 %.3g/%.3g kT, T-W2 %.3g/%.3g rad", name,
                100 * out["valid_fraction"], 100 * ess, out["energy_w2_raw"], out["energy_w2_reweighted"],
                out["torus_w2_raw"], out["torus_w2_reweighted"])
    return out


def md_convergence_flags(res: dict, rel_sem: float = 0.25) -> list[str]:
    """Reasons to distrust the MD reference of one peptide's result (rare basins with large run spread).

    A basin is flagged when its between-run standard error exceeds ``rel_sem`` of its population, or when some
    runs never visit a basin others do.
    """
    flags = []
    a = res["alpha_l_md"]
    if a["mean"] > 0 and a["n_runs"] > 1 and (a["sem"] > rel_sem * a["mean"] or a["runs_without_visit"] > 0):
        flags.append(f"alpha-L population {100 * a['mean']:.2f} +- {100 * a['sem']:.2f} % with "
                     f"{a['runs_without_visit']}/{a['n_runs']} runs never visiting it")
    elif a["mean"] == 0:
        flags.append(f"alpha-L never visited in {a['n_runs']} run(s) ({res['md_frames']} frames)")
    md = res["md_autocorrelation"]
    if md["n_independent"] < 100:
        flags.append(f"only {md['n_independent']:.0f} independent MD samples (tau_int {md['tau_int_ps']:.0f} ps)")
    return flags


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _pm(d: dict, scale=100.0) -> str:
    if not np.isfinite(d["mean"]):
        return "n/a"
    sem = d["sem"]
    return f"{scale * d['mean']:.1f} ± {scale * sem:.1f}" if np.isfinite(sem) else f"{scale * d['mean']:.1f}"


def write_results_markdown(results: list[dict], path, *, header: Optional[dict] = None) -> str:
    """Write the evaluation table, figure links and summary to a Markdown file.

    Parameters
    ----------
    results : list of dict
        Outputs of :func:`evaluate_peptide`.
    path : path
        Markdown file; figure links are relative to its directory.
    header : dict, optional
        Key/value lines printed above the table (model, data, command, machine, ...).

    Returns
    -------
    str
        The path written.
    """
    path = Path(path)
    lines = ["# Boltzmann-generator evaluation against MD", ""]
    for k, v in (header or {}).items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "Energies in kT (reduced potentials), angles in radians. ESS is the Kish effective sample size "
              "as a fraction of all proposals (rejected proposals count as weight 0). Torus-W2 is over all "
              "backbone phi/psi; *MD floor* is the torus-W2 between MD frames of even and odd runs at the BG's "
              "sample size (what a perfect generator would get, given MD's own convergence). alpha-L = phi > 0 "
              "(%), MD error = "
              "between-run standard error, BG error from the ESS. *MD indep.* = simulated time / (2 tau_int) of "
              "the slowest backbone observable (sin/cos phi/psi).", ""]
    cols = ["peptide", "atoms", "valid %", "rejected", "ESS %", "E-W2 raw", "E-W2 rew.", "T-W2 raw", "T-W2 rew.",
            "MD floor", "alpha-L MD %", "alpha-L BG %", "MD tau_int ps", "MD indep.", "BG eff. samples/s",
            "figures"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in results:
        rej = ", ".join(f"{k} {v}" for k, v in r["rejections"].items() if v) or "-"
        figs = " ".join(f"[{k}]({os.path.relpath(v, path.parent)})" for k, v in r.get("figures", {}).items())
        md = r["md_autocorrelation"]
        row = [r["name"], str(r["n_atoms"]), f"{100 * r['valid_fraction']:.1f}", rej, f"{100 * r['ess']:.2f}",
               _fmt(r["energy_w2_raw"]), _fmt(r["energy_w2_reweighted"]), _fmt(r["torus_w2_raw"]),
               _fmt(r["torus_w2_reweighted"]), _fmt(r["torus_w2_md_baseline"]), _pm(r["alpha_l_md"]),
               _pm(r["alpha_l_bg"]), f"{md['tau_int_ps']:.0f}", f"{md['n_independent']:.0f}",
               _fmt(r["effective_samples_per_s"], ".3g"), figs or "-"]
        lines.append("| " + " | ".join(row) + " |")
    if results:
        ess = np.array([r["ess"] for r in results])
        valid = np.array([r["valid_fraction"] for r in results])
        md_indep = [r["md_autocorrelation"]["n_independent"] for r in results]
        md_taus = [r["md_autocorrelation"]["tau_int_ps"] for r in results]
        lines += ["", "## Summary", "",
                  f"- Peptides: {len(results)}; samples per peptide: "
                  f"{', '.join(sorted({str(r['n_samples']) for r in results}))}.",
                  f"- ESS (% of proposals): mean {100 * ess.mean():.2f}, median {100 * np.median(ess):.2f}, "
                  f"min {100 * ess.min():.2f} ({results[int(ess.argmin())]['name']}), max {100 * ess.max():.2f} "
                  f"({results[int(ess.argmax())]['name']}).",
                  f"- Valid samples: mean {100 * valid.mean():.1f} %, min {100 * valid.min():.1f} %.",
                  f"- BG effective samples per second (ESS x samples / wall s): median "
                  f"{np.median([r['effective_samples_per_s'] for r in results]):.3g}; MD independent samples "
                  f"in the reference data: median {np.median(md_indep):.0f} per peptide (tau_int median "
                  f"{np.median(md_taus):.0f} ps).",
                  ]
        for key, label in (("energy_w2_reweighted", "Energy-W2 reweighted (kT)"),
                           ("torus_w2_reweighted", "Torus-W2 reweighted (rad)")):
            v = np.array([r[key] for r in results], dtype=float)
            if np.isfinite(v).any():
                lines.append(f"- {label}: mean {np.nanmean(v):.3f}, median {np.nanmedian(v):.3f} over "
                             f"{int(np.isfinite(v).sum())} peptide(s) with valid samples.")
        flagged = [(r["name"], md_convergence_flags(r)) for r in results]
        flagged = [(n, f) for n, f in flagged if f]
        lines += ["", "## Where the MD reference is under-converged", ""]
        if flagged:
            lines.append("Differences in these observables between BG and MD are not evidence against the BG: "
                         "the MD estimate itself is uncertain.")
            lines.append("")
            for n, f in flagged:
                lines.append(f"- **{n}**: " + "; ".join(f))
        else:
            lines.append("No peptide flagged (alpha-L between-run error below 25 % of its population, >= 100 "
                         "independent MD samples).")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return str(path)


def _machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # torch missing or broken CUDA: the machine line is informational only
        gpu = "unknown GPU"
    return f"{_platform.node()}, {_platform.processor() or _platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def _write_report(results: list[dict], out_dir: Path, header: dict) -> None:
    """``results.md`` (table, figure links, summary) and ``results.json`` in ``out_dir``."""
    write_results_markdown(results, out_dir / "results.md", header=header)
    with open(out_dir / "results.json", "w") as fh:
        json.dump({"header": header, "results": results}, fh, indent=1, default=float)


def evaluate(model, data_dir, split: Optional[str] = "test", n_samples: int = 1000, *,
             peptides: Optional[Sequence[str]] = None, out_dir: Union[str, os.PathLike] = "docs", seed: int = 0,
             device="auto", batch_size: int = 256, md_energy_frames: Optional[int] = 2000,
             torus_samples: int = TORUS_W2_MAX_SAMPLES, temperature=310.0, sampler_options: Optional[dict] = None,
             command_line: Optional[str] = None, progress: bool = True) -> list[dict]:
    """Evaluate a model on the peptides of a data split; write ``results.md``, ``results.json`` and figures.

    Parameters
    ----------
    model : None, "default", str, path or TransferableFlow
        The shipped model, a checkpoint, or a flow.
    data_dir : path
        Data-set directory (``XY.pdb``, ``XY.npz``, ``splits.json``).
    split : str, optional
        Split of ``splits.json`` (ignored when ``peptides`` is given).
    n_samples : int
        Flow proposals per peptide.
    peptides : sequence of str, optional
        Explicit peptide names.
    out_dir : path
        ``results.md`` and ``results.json`` go here, figures into ``out_dir/figures/``.
    seed : int
        Base seed; peptide ``i`` uses ``seed + i``.
    device, batch_size, md_energy_frames, torus_samples, temperature, sampler_options, progress
        See :func:`evaluate_peptide`.
    command_line : str, optional
        Recorded in the header.

    Returns
    -------
    list of dict
        One :func:`evaluate_peptide` result per peptide.
    """
    import torch

    from .data import load_dataset
    from .sampler import resolve_model

    if model == "default":
        model = None
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else \
        torch.device(device)
    flow, model_path, sha = resolve_model(model, dev)  # load the checkpoint once for all peptides
    trajectories = load_dataset(data_dir, split=None if peptides else split, names=peptides, progress=progress)
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    results = []
    for i, traj in enumerate(trajectories):
        logger.info("Evaluating %s (%d/%d)", traj.name, i + 1, len(trajectories))
        res = evaluate_peptide(flow, traj, n_samples, seed=seed + i, out_dir=fig_dir, temperature=temperature,
                               batch_size=batch_size, device=dev, md_energy_frames=md_energy_frames,
                               torus_samples=torus_samples, sampler_options=sampler_options, progress=progress)
        res["model_path"], res["model_sha256"] = model_path, sha
        results.append(res)
    header = {
        "model": f"{model_path or '(in-memory flow)'}" + (f" (sha256 {sha[:16]}...)" if sha else ""),
        "data": f"{os.path.abspath(data_dir)}, " + (f"peptides {', '.join(peptides)}" if peptides else
                                                    f"split {split!r}"),
        "samples per peptide": f"{n_samples} (importance weights; seed {seed})",
        "target": f"amber14-all + implicit/obc1, CutoffNonPeriodic 2 nm, no constraints, {float(temperature):g} K",
        "machine": _machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if command_line:
        header["command"] = f"`{command_line}`"
    _write_report(results, out_dir, header)
    return results


def merge_results(part_dirs: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike] = "docs", *,
                  order: Optional[Sequence[str]] = None, command_line: Optional[str] = None) -> list[dict]:
    """Merge evaluations run separately (one process or machine per peptide) into one report.

    Parameters
    ----------
    part_dirs : sequence of path
        Output directories of :func:`evaluate` (each holds ``results.json`` and ``figures/``).
    out_dir : path
        Where the merged ``results.md``, ``results.json`` and ``figures/`` go; figure links are rewritten.
    order : sequence of str, optional
        Peptide order of the table (e.g. the split's order); others follow alphabetically.
    command_line : str, optional
        Recorded in the header as the merge command.

    Returns
    -------
    list of dict
        The merged per-peptide results.

    Raises
    ------
    FileNotFoundError
        A part directory has no ``results.json``.
    ValueError
        The parts evaluated different models, or one peptide appears twice.
    """
    import shutil

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    results, headers, seen = [], [], {}
    for part in part_dirs:
        path = Path(part) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: pass directories written by `openmm-tbg evaluate --out`.")
        with open(path) as fh:
            payload = json.load(fh)
        headers.append(payload.get("header", {}))
        for r in payload["results"]:
            if r["name"] in seen:
                raise ValueError(f"Peptide {r['name']} is in both {seen[r['name']]} and {part}; merge each once.")
            seen[r["name"]] = str(part)
            figures = {}
            for kind, fig in r.get("figures", {}).items():
                src = Path(fig) if Path(fig).is_absolute() else Path(part) / "figures" / Path(fig).name
                dst = fig_dir / src.name
                if src.resolve() != dst.resolve():
                    shutil.copyfile(src, dst)
                figures[kind] = str(dst)
            r["figures"] = figures
            results.append(r)
    shas = sorted({r.get("model_sha256") for r in results})
    if len(shas) > 1:
        raise ValueError(f"The parts evaluated different models (sha256 {', '.join(str(x)[:12] for x in shas)}); "
                         "merge evaluations of one model only.")
    rank = {name: i for i, name in enumerate(order or [])}
    results.sort(key=lambda r: (rank.get(r["name"], len(rank)), r["name"]))
    header = dict(headers[0]) if headers else {}
    header["data"] = header.get("data", "").split(", peptides")[0].split(", split")[0] + \
        f", {len(results)} peptides: {', '.join(r['name'] for r in results)}"
    header["date"] = ", ".join(sorted({h.get("date", "?")[:10] for h in headers}))
    commands = sorted({h.get("command", "") for h in headers if h.get("command")})
    if commands:
        header["command"] = f"{len(headers)} runs of " + commands[0] + (" (and variants)" if len(commands) > 1 else "")
    if command_line:
        header["merged with"] = f"`{command_line}`"
    _write_report(results, out_dir, header)
    return results


# --------------------------------------------------------------------------------------------------------------
# `openmm-tbg evaluate`
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``openmm-tbg evaluate``."""
    parser.add_argument("--model", default="default", help="checkpoint path, or 'default' for the shipped model")
    parser.add_argument("--data", default=None, help="data-set directory (XY.pdb, XY.npz, splits.json)")
    parser.add_argument("--split", default="test", help="split of splits.json (default: test)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="merge the --out directories of separate runs into --out (table in the split order "
                             "of --data, when given) instead of evaluating")
    parser.add_argument("--peptides", nargs="+", default=None, help="explicit peptide names (overrides --split)")
    parser.add_argument("--samples", type=int, default=1000, help="flow samples per peptide (default 1000)")
    parser.add_argument("--out", default="docs", help="output directory for results.md and figures/ (default docs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--md-energy-frames", type=int, default=2000,
                        help="MD frames whose energies enter energy-W2 (default 2000, evenly spaced)")
    parser.add_argument("--torus-samples", type=int, default=TORUS_W2_MAX_SAMPLES,
                        help=f"subsample size per side for torus-W2 (default {TORUS_W2_MAX_SAMPLES})")
    parser.add_argument("--temperature", type=float, default=310.0, help="kelvin (default 310)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from .sampler import add_ode_arguments

    add_ode_arguments(parser)  # --ode-method, --atol, --rtol, --step-size, --quadrature-nodes (as `sample`)


def run_from_cli(args: argparse.Namespace) -> int:
    """Run ``openmm-tbg evaluate``; returns the exit status."""
    import shlex
    import sys

    from .sampler import ode_kwargs

    command_line = " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:])
    if args.merge:
        order = None
        if args.data is not None:
            from .data import read_splits

            order = read_splits(args.data).get(args.split)
        results = merge_results(args.merge, args.out, order=order, command_line=command_line)
        print((Path(args.out) / "results.md").read_text())
        return 0 if results else 1
    if args.data is None:
        raise SystemExit("openmm-tbg evaluate: --data is required (the data-set directory with XY.pdb, XY.npz and "
                         "splits.json), unless --merge is given.")
    results = evaluate(args.model, args.data, split=args.split, n_samples=args.samples, peptides=args.peptides,
                       out_dir=args.out, seed=args.seed, device=args.device, batch_size=args.batch_size,
                       md_energy_frames=args.md_energy_frames, torus_samples=args.torus_samples,
                       temperature=args.temperature, progress=not args.no_progress,
                       sampler_options=ode_kwargs(args), command_line=command_line)
    print((Path(args.out) / "results.md").read_text())
    return 0 if results else 1
