"""Divergence of the CNF's vector field, and the integration of positions with their log-density change.

`openmm_tbg.flow.TransferableFlow` integrates dx/dt = v(x, t | tokens) and, alongside, d log p / dt = -div v.
This module owns how that divergence is computed, where along the trajectory it is evaluated, the
torchdiffeq right-hand sides and solves, and the checks of the solver options they take. Everything here works in the flow's internal (scaled) coordinates, with
positions as ``(B, N, 3)`` tensors; times run from 0 (prior) to 1 (data).

Divergence
----------
The field's output is mean-free and it only depends on coordinate differences, so its 3N x 3N Jacobian J
satisfies P J = J and J P = J (P: centring projection). Hence the trace of the full Jacobian equals the trace of
J restricted to the mean-free subspace, which is the divergence that enters the change of variables. Modes:

* ``"exact"`` (default): the exact trace with the implementation that is fastest on the device: on CUDA a
  vectorized backward over chunks of the 3N unit vectors (``torch.autograd.grad(..., is_grads_batched=True)``),
  on the CPU the per-coordinate loop, which measured faster there (see :func:`divergence_exact`);
* ``"exact-loop"``: TBG's baseline, one ``torch.autograd.grad`` call per coordinate (3N calls);
* ``"hutchinson"``: the unbiased stochastic trace estimator eps^T J eps (opt-in). Its noise makes log_q, and
  hence importance weights exp(-u - log_q), noisy; by Jensen's inequality noisy log weights bias ESS and
  reweighted averages. Use it only for exploration, never for reported estimates.

Where the divergence is evaluated
---------------------------------
By default (``quadrature_nodes=None``, TBG's way) the divergence is integrated by the ODE solver together with x,
so the expensive exact trace is computed at every solver stage. With ``quadrature_nodes=K`` the solver
integrates x alone (forward passes only, same tolerances) and reports x(t_k) at the K Gauss-Legendre nodes
t_k of [0, 1]; the exact trace is then evaluated only there and ``int div dt ~ sum_k w_k div(x(t_k), t_k)``.
The trace along a smooth trajectory is a smooth function of t, so the quadrature converges fast in K; the
error against a tight reference is measured by ``benchmarks/sampling_speed.py``.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["DIVERGENCE_MODES", "ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "check_solver", "check_quadrature",
           "check_integration_options", "solve_positions",
           "divergence_exact", "divergence_exact_loop", "divergence_exact_batched",
           "divergence_hutchinson", "gauss_legendre", "exact_chunk_size", "hutchinson_noise",
           "integrate_with_divergence"]

DIVERGENCE_MODES = ("exact", "exact-loop", "hutchinson")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")

# Largest number of (B, N, N, H)-sized elements per vectorized backward chunk in "exact" mode (used on CUDA):
# each vmapped intermediate gradient then stays below ~1 GB in float32; several are alive at once.
_EXACT_CHUNK_ELEMENTS = 2**28
# Largest (B, N, N, H) edge tensor, in elements, when the quadrature nodes are stacked into one batch for the
# divergence (~128 MB in float32; a few such tensors are alive during the backward passes).
_NODE_BATCH_ELEMENTS = 2**25


def check_solver(method: str, atol: float, rtol: float, step_size: float | None, divergence: str) -> dict:
    """Check the solver options of `TransferableFlow.sample` / ``log_prob`` and return torchdiffeq's options.

    Parameters
    ----------
    method : str
        One of `ADAPTIVE_METHODS` (controlled by ``atol``/``rtol``) or `FIXED_STEP_METHODS` (by ``step_size``).
    atol, rtol : float
        Positive tolerances of adaptive methods (internal units).
    step_size : float or None
        Time step in (0, 1] of fixed-step methods; must be None for adaptive ones.
    divergence : str
        One of `DIVERGENCE_MODES`.

    Returns
    -------
    dict
        ``{}`` for adaptive methods, ``{"step_size": float}`` for fixed-step ones.

    Raises
    ------
    ValueError
        Naming the bad option and what to pass instead.
    """
    if divergence not in DIVERGENCE_MODES:
        raise ValueError(f"TransferableFlow: unknown divergence {divergence!r}; choose one of {DIVERGENCE_MODES}.")
    if method in ADAPTIVE_METHODS:
        if step_size is not None:
            raise ValueError(
                f"TransferableFlow: step_size applies to fixed-step methods {FIXED_STEP_METHODS}; the adaptive "
                f"method {method!r} is controlled by atol/rtol. Pass step_size=None."
            )
        if not (atol > 0 and rtol > 0):
            raise ValueError(f"TransferableFlow: atol and rtol must be positive, got atol={atol}, rtol={rtol}.")
        return {}
    if method in FIXED_STEP_METHODS:
        if step_size is None or not (0 < step_size <= 1):
            raise ValueError(
                f"TransferableFlow: fixed-step method {method!r} needs step_size in (0, 1] (the time runs "
                f"from 0 to 1), got {step_size!r}; e.g. step_size=0.05 for 20 steps."
            )
        return {"step_size": float(step_size)}
    raise ValueError(
        f"TransferableFlow: unknown ODE method {method!r}; choose an adaptive method {ADAPTIVE_METHODS} "
        f"(with atol/rtol) or a fixed-step method {FIXED_STEP_METHODS} (with step_size)."
    )


def check_quadrature(quadrature_nodes: int | None) -> int | None:
    """``quadrature_nodes`` as None or a positive int; `ValueError` (naming an example) for anything else."""
    if quadrature_nodes is None:
        return None
    if isinstance(quadrature_nodes, bool) or int(quadrature_nodes) != quadrature_nodes or quadrature_nodes < 1:
        raise ValueError(
            f"TransferableFlow: quadrature_nodes must be None (divergence integrated by the solver) or a "
            f"positive integer number of Gauss-Legendre nodes, e.g. 16; got {quadrature_nodes!r}."
        )
    return int(quadrature_nodes)


def check_integration_options(caller: str, n: int, batch_size: int | None, method: str, atol: float,
                              rtol: float, step_size: float | None, divergence: str,
                              quadrature_nodes: int | None) -> tuple[dict, int | None, int]:
    """Checked options shared by `TransferableFlow.sample` and ``log_prob`` (called directly by them).

    Parameters
    ----------
    caller : str
        ``"sample"`` or ``"log_prob"``, named in the error messages.
    n : int
        Number of configurations; the batch size when ``batch_size`` is None.
    batch_size : int or None
        Configurations integrated together.
    method, atol, rtol, step_size, divergence
        As for `check_solver`.
    quadrature_nodes : int or None
        As for `check_quadrature`.

    Returns
    -------
    options : dict
        torchdiffeq options (`check_solver`).
    quadrature_nodes : int or None
        The checked node count.
    batch_size : int
        Positive batch size.

    Warns
    -----
    UserWarning
        For ``divergence="hutchinson"``, whose noisy log_q biases importance weights and ESS.
    """
    options = check_solver(method, atol, rtol, step_size, divergence)
    quadrature_nodes = check_quadrature(quadrature_nodes)
    batch_size = n if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"TransferableFlow.{caller}: batch_size must be positive, got {batch_size}.")
    if divergence == "hutchinson":
        # stacklevel 3: the warning points at the caller of TransferableFlow.sample / log_prob.
        warnings.warn(
            "divergence='hutchinson' gives a noisy log_q: importance weights and ESS are biased. Use the exact "
            "divergence for any reported estimate.", stacklevel=3)
    return options, quadrature_nodes, batch_size


def _hidden_width(vector_field: nn.Module) -> int:
    """Hidden width H of the field's (B, N, N, H) edge tensors (its ``config["hidden"]``; 64 if unknown)."""
    config = getattr(vector_field, "config", None)
    if isinstance(config, dict) and "hidden" in config:
        return int(config["hidden"])
    return 64


def exact_chunk_size(vector_field: nn.Module, batch: int, n_atoms: int) -> int:
    """Coordinates per vectorized backward of `divergence_exact_batched` that keep memory bounded.

    Parameters
    ----------
    vector_field : torch.nn.Module
        The CNF's vector field (its hidden width sizes the edge tensors).
    batch, n_atoms : int
        Samples and atoms of the batch whose divergence is computed.

    Returns
    -------
    int
        At least 1; ``_EXACT_CHUNK_ELEMENTS`` elements of (B, N, N, H) edge tensors per chunk.
    """
    per_coordinate = batch * n_atoms * n_atoms * _hidden_width(vector_field)
    return max(1, _EXACT_CHUNK_ELEMENTS // max(1, per_coordinate))


def divergence_exact_loop(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exact divergence by one autograd call per coordinate (TBG's baseline).

    Parameters
    ----------
    v : torch.Tensor
        ``(B, N, 3)`` output of the vector field, computed from ``x`` with autograd enabled.
    x : torch.Tensor
        ``(B, N, 3)`` input that requires grad.

    Returns
    -------
    torch.Tensor
        ``(B,)`` trace of dv/dx of every sample.
    """
    B = v.shape[0]
    v_flat = v.reshape(B, -1)
    div = torch.zeros(B, dtype=v.dtype, device=v.device)
    for i in range(v_flat.shape[1]):
        g = torch.autograd.grad(v_flat[:, i].sum(), x, retain_graph=True)[0]
        div = div + g.reshape(B, -1)[:, i]
    return div


def divergence_exact_batched(v: torch.Tensor, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Exact divergence with a vectorized backward over chunks of the 3N unit vectors.

    Samples are independent, so the backward of ``e_i`` placed at coordinate i of *every* sample yields
    d v_i / d x_i for all samples at once; ``is_grads_batched`` vectorizes the 3N backward passes.

    Parameters
    ----------
    v, x : torch.Tensor
        As for :func:`divergence_exact_loop`.
    chunk_size : int, optional
        Number of coordinates per vectorized backward; None uses all 3N.

    Returns
    -------
    torch.Tensor
        ``(B,)`` trace of dv/dx of every sample.
    """
    B = v.shape[0]
    D = v[0].numel()
    chunk_size = D if chunk_size is None else max(1, min(int(chunk_size), D))
    div = torch.zeros(B, dtype=v.dtype, device=v.device)
    eye = torch.eye(D, dtype=v.dtype, device=v.device)
    for start in range(0, D, chunk_size):
        stop = min(start + chunk_size, D)
        basis = eye[start:stop]  # (c, D)
        grad_outputs = basis[:, None, :].expand(stop - start, B, D).reshape(stop - start, *v.shape)
        g = torch.autograd.grad(v, x, grad_outputs, retain_graph=True, is_grads_batched=True)[0]
        # g (c, B, N, 3): pick d v_{start+k} / d x_{start+k}
        g = g.reshape(stop - start, B, D)
        idx = torch.arange(start, stop, device=v.device)
        div = div + g[torch.arange(stop - start, device=v.device), :, idx].sum(0)
    return div


def divergence_exact(v: torch.Tensor, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Exact divergence with the implementation that is fastest on ``v``'s device.

    Measured on the 2-core CPU (5 x 64 EGNN, 40 atoms, batch 16, one thread): the per-coordinate loop takes
    ~13 s per function evaluation and the vectorized backward 19-39 s (chunks of 4-30 coordinates; the vmap'd
    backward moves c times larger tensors through memory), and forward-mode ``torch.func.vmap(jvp)`` is slower
    still; so the CPU uses the loop. On CUDA the per-call launch overhead of 3N sequential backward passes
    dominates for small models, so the vectorized backward is used there (chunked to bound memory).
    """
    if v.device.type == "cpu":
        return divergence_exact_loop(v, x)
    return divergence_exact_batched(v, x, chunk_size)


def divergence_hutchinson(v: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Hutchinson estimate eps^T (dv/dx) eps of the divergence, unbiased for E[eps eps^T] = I."""
    g = torch.autograd.grad(v, x, noise, retain_graph=True)[0]
    return (g * noise).reshape(v.shape[0], -1).sum(1)


class _PositionDynamics:
    """ODE right-hand side on x alone (no divergence), for the quadrature path."""

    def __init__(self, vector_field: nn.Module, tokens: torch.Tensor):
        self.vector_field = vector_field
        self.tokens = tokens
        self.nfe = 0

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.vector_field(t, x, self.tokens)


def solve_positions(vector_field: nn.Module, x0: torch.Tensor, tokens: torch.Tensor, times: torch.Tensor, *,
                    method: str, atol: float, rtol: float, options: dict) -> tuple[torch.Tensor, int]:
    """Integrate positions alone (no divergence, no autograd) and return them at ``times``.

    Parameters
    ----------
    vector_field : torch.nn.Module
        ``vector_field(t, x, tokens) -> (B, N, 3)``.
    x0 : torch.Tensor
        ``(B, N, 3)`` internal coordinates at ``times[0]``.
    tokens : torch.Tensor
        ``(N, 3)`` checked integer tokens.
    times : torch.Tensor
        Monotonic times in [0, 1], in ``x0``'s dtype and on its device.
    method, atol, rtol : str, float, float
        Checked torchdiffeq method and tolerances (internal units).
    options : dict
        torchdiffeq ``options`` (`check_solver`'s, maybe with a ``norm``); empty for none.

    Returns
    -------
    xs : torch.Tensor
        ``(len(times), B, N, 3)``.
    nfe : int
        Vector-field evaluations.
    """
    from torchdiffeq import odeint

    func = _PositionDynamics(vector_field, tokens)
    with torch.no_grad():
        xs = odeint(func, x0, times, method=method, atol=atol, rtol=rtol, options=options or None)
    return xs, func.nfe


def gauss_legendre(n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1] (exact for polynomials of degree ``2 n_nodes - 1``)."""
    nodes, weights = np.polynomial.legendre.leggauss(int(n_nodes))
    return 0.5 * (nodes + 1.0), 0.5 * weights


class _AugmentedDynamics:
    """ODE right-hand side on the augmented state (x, l) with dl/dt = -div v."""

    def __init__(self, vector_field: nn.Module, tokens: torch.Tensor, divergence: str,
                 noise: torch.Tensor | None, chunk_size: int | None):
        self.vector_field = vector_field
        self.tokens = tokens
        self.divergence = divergence
        self.noise = noise
        self.chunk_size = chunk_size
        self.nfe = 0

    def divergence_at(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vector field and its divergence (by the configured mode) at one time."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = self.vector_field(t, x, self.tokens)
            if self.divergence == "exact":
                div = divergence_exact(v, x, self.chunk_size)
            elif self.divergence == "exact-loop":
                div = divergence_exact_loop(v, x)
            else:
                div = divergence_hutchinson(v, x, self.noise)
        return v.detach(), div.detach()

    def __call__(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        x, _ = state
        self.nfe += 1
        v, div = self.divergence_at(t, x)
        return v, -div


def hutchinson_noise(x0: torch.Tensor, generator: torch.Generator | None,
                     device: torch.device) -> torch.Tensor:
    """Mean-free Gaussian probe vectors of the Hutchinson estimator, shaped like ``x0``.

    Parameters
    ----------
    x0 : torch.Tensor
        ``(B, N, 3)`` states whose shape, dtype and device the noise takes.
    generator : torch.Generator, optional
        RNG of the draw (on its own device); None draws on ``device`` from torch's default generator.
    device : torch.device
        Device of the draw when no generator is given (the flow's device).

    Returns
    -------
    torch.Tensor
        ``(B, N, 3)`` noise with zero mean over atoms, so that the estimator probes the mean-free subspace only.
    """
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=gen_device).to(x0.device)
    return noise - noise.mean(1, keepdim=True)


def integrate_with_divergence(vector_field: nn.Module, x0: torch.Tensor, tokens: torch.Tensor, t0: float,
                              t1: float, *, method: str, atol: float, rtol: float, options: dict,
                              divergence: str, noise: torch.Tensor | None = None,
                              quadrature_nodes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Integrate positions from ``t0`` to ``t1`` together with the change of their log density.

    Parameters
    ----------
    vector_field : torch.nn.Module
        ``vector_field(t, x, tokens) -> (B, N, 3)``, mean-free and translation invariant.
    x0 : torch.Tensor
        ``(B, N, 3)`` internal coordinates at ``t0``.
    tokens : torch.Tensor
        ``(N, 3)`` checked integer tokens on the field's device.
    t0, t1 : float
        Start and end time (0 = prior, 1 = data; either direction).
    method, atol, rtol : str, float, float
        torchdiffeq method and tolerances (internal units), already checked.
    options : dict
        torchdiffeq ``options`` (e.g. ``step_size`` of fixed-step methods); empty for none.
    divergence : str
        One of `DIVERGENCE_MODES`.
    noise : torch.Tensor, optional
        ``(B, N, 3)`` probe vectors of ``"hutchinson"`` (`hutchinson_noise`); None for the exact modes.
    quadrature_nodes : int, optional
        None: the divergence is integrated by the solver at every stage. K: the solver integrates x alone and
        the divergence is evaluated at K Gauss-Legendre nodes (see the module notes).

    Returns
    -------
    x1 : torch.Tensor
        ``(B, N, 3)`` positions at ``t1``.
    delta_log_p : torch.Tensor
        ``(B,)`` ``-int_{t0}^{t1} div v dt`` = log p(x1) - log p(x0) (float64 on the quadrature path, the
        positions' dtype otherwise).
    nfe : int
        Vector-field evaluations (solver stages, plus one per node on the quadrature path).
    """
    from torchdiffeq import odeint

    func = _AugmentedDynamics(vector_field, tokens, divergence, noise,
                              exact_chunk_size(vector_field, x0.shape[0], x0.shape[1]))
    if quadrature_nodes is None:
        l0 = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        times = torch.tensor([t0, t1], dtype=x0.dtype, device=x0.device)
        with torch.no_grad():
            xs, ls = odeint(func, (x0, l0), times, method=method, atol=atol, rtol=rtol,
                            options=options or None)
        return xs[-1], ls[-1], func.nfe
    # Quadrature path: x alone through the solver, the exact trace only at the Gauss-Legendre nodes.
    nodes, weights = gauss_legendre(quadrature_nodes)
    node_times = t0 + (t1 - t0) * nodes  # increasing along the direction of integration
    times = torch.tensor([t0, *node_times.tolist(), t1], dtype=x0.dtype, device=x0.device)
    xs, nfe = solve_positions(vector_field, x0, tokens, times, method=method, atol=atol, rtol=rtol, options=options)
    return xs[-1], -(t1 - t0) * _node_integral(func, xs, times, weights, noise), nfe + len(nodes)


def _node_integral(func: _AugmentedDynamics, xs: torch.Tensor, times: torch.Tensor, weights: np.ndarray,
                   noise: torch.Tensor | None) -> torch.Tensor:
    """``sum_k w_k div(x(t_k), t_k)`` (float64, ``(B,)``) from the solver's states at ``[t0, *nodes, t1]``.

    The node states are independent, so their divergences are computed as one stacked batch (chunked by
    memory, `_NODE_BATCH_ELEMENTS`): one set of 3N backward passes serves several nodes instead of one each.
    """
    n_nodes = len(weights)
    B, N = xs.shape[1:3]
    per_node = B * N * N * _hidden_width(func.vector_field)
    nodes_per_chunk = max(1, _NODE_BATCH_ELEMENTS // max(1, per_node))
    w = torch.as_tensor(weights, dtype=torch.float64, device=xs.device)
    integral = torch.zeros(B, dtype=torch.float64, device=xs.device)
    for start in range(0, n_nodes, nodes_per_chunk):
        stop = min(start + nodes_per_chunk, n_nodes)
        k = stop - start
        x_nodes = xs[start + 1:stop + 1].reshape(k * B, N, 3)
        t_nodes = times[start + 1:stop + 1].repeat_interleave(B)
        if noise is not None:
            func.noise = noise.repeat(k, 1, 1)
        _, div = func.divergence_at(t_nodes, x_nodes)
        integral = integral + (w[start:stop, None] * div.double().reshape(k, B)).sum(0)
    return integral
