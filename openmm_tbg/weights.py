"""Importance weights: Kish effective sample size and normalisation of log weights.

Conventions: a rejected sample has log weight ``-inf`` (weight zero) and still counts in ``n``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kish_ess", "normalise_log_weights"]


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


def normalise_log_weights(log_w) -> np.ndarray:
    """Log weights shifted so that their weights sum to 1; ``-inf`` stays ``-inf`` (all ``-inf`` if none is finite)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    out = np.full(log_w.shape, -np.inf)
    ok = np.isfinite(log_w)
    if ok.any():
        m = log_w[ok].max()
        out[ok] = log_w[ok] - (m + np.log(np.sum(np.exp(log_w[ok] - m))))
    return out
