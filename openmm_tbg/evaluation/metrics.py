"""Metrics of a Boltzmann generator against MD, on unitless numpy arrays.

Energies are reduced potentials ``u = U / kT`` (kT, as TBG reports energy-W2) and angles radians. Weights
are non-negative importance weights (need not be normalised); zero-weight (rejected) samples are ignored.
The Kish ESS is :func:`openmm_tbg.weights.kish_ess`, re-exported here.
"""

from __future__ import annotations

import numpy as np

from ..utils import as_numpy_rng
from ..weights import kish_ess

TWO_PI = 2.0 * np.pi
#: Default number of samples per side in `torus_w2` (exact EMD on a 2000 x 2000 cost matrix: ~1-3 s).
TORUS_W2_MAX_SAMPLES = 2000


def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}; pass one value per sample.")
    return a


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


# ----------------------------------------------------------------------------------------------------
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
    rng = as_numpy_rng(seed)

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


# ----------------------------------------------------------------------------------------------------
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
