"""Importance weights: Kish effective sample size, the Pareto tail diagnostic and normalisation of log weights.

Conventions: a rejected sample has log weight ``-inf`` (weight zero) and still counts in ``n``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kish_ess", "pareto_k", "normalise_log_weights", "PARETO_K_RELIABLE"]

#: Above this Pareto shape the importance weights' tail is too heavy for the Kish ESS, self-normalised averages
#: and their error bars to be trusted (Vehtari, Simpson, Gelman, Yao and Gabry, "Pareto smoothed importance
#: sampling", JMLR 25, 2024: with k > 0.7 the estimate's error falls far more slowly than 1/sqrt(n), and not
#: at all for k >= 1, where the weights' mean itself is infinite).
PARETO_K_RELIABLE = 0.7


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
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
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


def pareto_k(log_weights) -> float:
    """Shape ``k`` of a generalised Pareto distribution fitted to the largest importance weights.

    The diagnostic of Pareto smoothed importance sampling (Vehtari et al. 2024): the ``M = ceil(min(n / 5,
    3 sqrt(n)))`` largest weights' excesses over the next one are fitted by the empirical-Bayes estimator of
    Zhang and Stephens (2009) with the weakly informative prior of that paper's reference code (which shrinks
    ``k`` toward 0.5 by the weight of 10 observations). The weights' variance is finite for ``k < 1/2`` and
    their mean for ``k < 1``; above `PARETO_K_RELIABLE` a Kish ESS and self-normalised averages are not reliable
    however they look, and repeated runs disagree by far more than their error bars.

    Parameters
    ----------
    log_weights : array_like, shape (n,)
        Unnormalised log importance weights; ``-inf`` (rejected samples) counts in ``n`` with weight zero.

    Returns
    -------
    float
        The fitted shape, or NaN when fewer than 5 weights lie above the tail threshold (too few proposals, or
        too few distinct weights: e.g. all equal, where the weights are as reliable as they can be).

    Raises
    ------
    ValueError
        NaN or ``+inf`` log weights.
    """
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    if np.isnan(lw).any() or np.isposinf(lw).any():
        raise ValueError("pareto_k: log_weights contain NaN or +inf values; give rejected samples -inf.")
    finite = np.sort(lw[np.isfinite(lw)])
    m = int(np.ceil(min(0.2 * lw.size, 3.0 * np.sqrt(lw.size))))
    if finite.size < m + 1:
        m = finite.size - 1
    if m < 5:
        return float("nan")
    finite = finite - finite[-1]  # largest weight 1: exp() cannot overflow
    threshold = finite[-m - 1]
    tail = finite[-m:]
    tail = tail[tail > threshold]
    if tail.size < 5:
        return float("nan")
    excess = np.exp(tail) - np.exp(threshold)  # sorted, as ``finite`` is
    return float(_generalised_pareto_shape(excess))


def _generalised_pareto_shape(x: np.ndarray) -> float:
    """Zhang and Stephens (2009) posterior-mean estimate of the shape of a generalised Pareto distribution from
    sorted positive excesses ``x``, with the prior of Vehtari et al.'s PSIS code (shape shrunk toward 0.5)."""
    n = x.size
    m_grid = 30 + int(np.sqrt(n))
    # The profile over b = -k / sigma on the quantile-based grid of Zhang and Stephens.
    b = 1.0 - np.sqrt(m_grid / (np.arange(1, m_grid + 1) - 0.5))
    b = b / (3.0 * x[int(n / 4 + 0.5) - 1]) + 1.0 / x[-1]
    k = np.log1p(-b[:, None] * x[None, :]).mean(1)
    profile = n * (np.log(-b / k) - k - 1.0)
    weights = 1.0 / np.exp(profile[None, :] - profile[:, None]).sum(1)
    keep = weights >= 10 * np.finfo(float).eps
    weights, b = weights[keep] / weights[keep].sum(), b[keep]
    shape = float(np.log1p(-np.sum(b * weights) * x).mean())
    return (n * shape + 10 * 0.5) / (n + 10)


def normalise_log_weights(log_w) -> np.ndarray:
    """Log weights shifted so that their weights sum to 1; ``-inf`` stays ``-inf`` (all ``-inf`` if none is finite)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    out = np.full(log_w.shape, -np.inf)
    ok = np.isfinite(log_w)
    if ok.any():
        m = log_w[ok].max()
        out[ok] = log_w[ok] - (m + np.log(np.sum(np.exp(log_w[ok] - m))))
    return out
