"""Autocorrelation of MD time series: statistical inefficiency, integrated autocorrelation time, and the
number of independent MD samples of the slowest backbone observable.

Conventions: the *statistical inefficiency* ``g = 1 + 2 sum_{k>=1} rho_k`` (frames), the *integrated
autocorrelation time* ``tau_int = g dt / 2`` (Sokal's convention), and the number of independent MD samples
``T / (2 tau_int) = n_frames / g``. For an AR(1) process with lag-1 correlation ``rho``,
``g = (1 + rho) / (1 - rho)``. Times are in the unit of the ``dt`` you pass (ps for the data set).
"""

from __future__ import annotations

import numpy as np


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
