"""Monotonic rational-quadratic splines (Durkan et al., "Neural Spline Flows", 2019), written for this package.

Two element-wise bijections with exact log-derivatives:

* `rq_spline` with linear tails: a spline on ``[-bound, bound]`` and the identity outside (slope 1 at the
  boundary knots, so the map is C1). For whitened bond lengths and angles.
* `circular_rq_spline`: a spline on ``[-pi, pi)`` whose end derivatives are equal, so it is a C1
  diffeomorphism of the circle. For dihedrals.

Parameters come unnormalised from a network, ``(..., 3K + 1)`` per element: K widths, K heights and K + 1
derivatives (the linear-tail spline uses only the K - 1 interior derivatives, its end derivatives being one; the
circular spline uses K, its last knot repeating the first). All zeros give the identity.

Precision: the inverse solves a quadratic per element. In float64 the inverse and forward log-derivatives agree
to ~1e-12; in float32 they agree to ~1e-5 for smooth splines but only to ~1e-3 per element for sharp bins
(unnormalised parameters of scale 3-5), which adds up over a molecule's coordinates and layers. A float32 flow's
``sample`` and ``log_prob`` therefore differ by round-off that grows with the splines' sharpness (tests/
test_icflow.py measures it: 6e-5 nats on the shipped model); evaluate in float64 (``flow.double()``) where
that matters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rq_spline", "circular_rq_spline", "n_spline_parameters"]

_MIN_BIN = 1e-3
_MIN_DERIVATIVE = 1e-3
# softplus(_DERIVATIVE_SHIFT) + _MIN_DERIVATIVE == 1: zero parameters give unit derivatives (the identity).
_DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))


def n_spline_parameters(n_bins: int) -> int:
    """Unnormalised parameters per element for ``n_bins`` bins."""
    return 3 * n_bins + 1


def _knots(raw: torch.Tensor, left: float, right: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Knot positions ``(..., K + 1)`` from unnormalised bin sizes ``(..., K)``, each bin >= _MIN_BIN."""
    k = raw.shape[-1]
    size = _MIN_BIN + (1 - _MIN_BIN * k) * torch.softmax(raw, dim=-1)
    knots = F.pad(torch.cumsum(size, dim=-1), (1, 0))
    knots = left + (right - left) * knots
    knots = torch.cat([knots[..., :1] * 0 + left, knots[..., 1:-1], knots[..., -1:] * 0 + right], -1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _spline(x: torch.Tensor, params: torch.Tensor, left: float, right: float, derivatives: torch.Tensor,
            inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    k = (params.shape[-1] - 1) // 3
    xk, w = _knots(params[..., :k], left, right)
    yk, h = _knots(params[..., k:2 * k], left, right)
    grid = yk if inverse else xk
    idx = torch.searchsorted(grid[..., 1:-1].contiguous(), x[..., None].contiguous()).clamp(0, k - 1)
    take = lambda t: t.gather(-1, idx)[..., 0]  # noqa: E731
    x0, y0, wk, hk = take(xk), take(yk), take(w), take(h)
    d0, d1 = take(derivatives[..., :-1]), take(derivatives[..., 1:])
    s = hk / wk
    if inverse:
        dy = x - y0
        a = hk * (s - d0) + dy * (d1 + d0 - 2 * s)
        b = hk * d0 - dy * (d1 + d0 - 2 * s)
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp(min=0)
        xi = (2 * c) / (-b - torch.sqrt(disc))
        out = x0 + xi * wk
    else:
        xi = (x - x0) / wk
        num = hk * (s * xi * xi + d0 * xi * (1 - xi))
        den = s + (d1 + d0 - 2 * s) * xi * (1 - xi)
        out = y0 + num / den
    xi = xi.clamp(0, 1)
    den = s + (d1 + d0 - 2 * s) * xi * (1 - xi)
    log_grad = 2 * torch.log(s) + torch.log(d1 * xi * xi + 2 * s * xi * (1 - xi) + d0 * (1 - xi) ** 2) \
        - 2 * torch.log(den)
    return out, (-log_grad if inverse else log_grad)


def rq_spline(x: torch.Tensor, params: torch.Tensor, bound: float, inverse: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spline on ``[-bound, bound]`` with identity tails.

    Parameters
    ----------
    x : torch.Tensor
        ``(...)`` inputs.
    params : torch.Tensor
        ``(..., 3K + 1)`` unnormalised parameters.
    bound : float
    inverse : bool
        Evaluate the inverse map.

    Returns
    -------
    y, log_abs_det : torch.Tensor
        ``(...)``: the map and ``log |dy/dx|`` of the direction evaluated.
    """
    k = (params.shape[-1] - 1) // 3
    inner = _MIN_DERIVATIVE + F.softplus(params[..., 2 * k + 1:3 * k] + _DERIVATIVE_SHIFT)
    ones = torch.ones_like(inner[..., :1])
    derivatives = torch.cat([ones, inner, ones], -1)
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    y, log_det = _spline(xc, params, -bound, bound, derivatives, inverse)
    return torch.where(inside, y, x), torch.where(inside, log_det, torch.zeros_like(log_det))


def circular_rq_spline(x: torch.Tensor, params: torch.Tensor, inverse: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Circle diffeomorphism of ``[-pi, pi)`` (inputs are wrapped into it first); as `rq_spline`."""
    k = (params.shape[-1] - 1) // 3
    inner = _MIN_DERIVATIVE + F.softplus(params[..., 2 * k:3 * k] + _DERIVATIVE_SHIFT)
    # The last knot's derivative repeats the first (both learned, not fixed to one): equal end derivatives make
    # the map C1 on the circle.
    derivatives = torch.cat([inner, inner[..., :1]], -1)
    xw = torch.remainder(x + math.pi, 2 * math.pi) - math.pi
    y, log_det = _spline(xw, params, -math.pi, math.pi, derivatives, inverse)
    return torch.remainder(y + math.pi, 2 * math.pi) - math.pi, log_det
