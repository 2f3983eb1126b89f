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

Memory budget
-------------
The exact trace keeps the field's whole autograd graph alive through its 3N backward passes. For the dense EGNN
that graph is dominated by ``(items, N, N, H)`` edge tensors, so every evaluated item (a sample at one time; on
the quadrature path the K x B stacked (node, sample) pairs) costs about `stacked_item_bytes`. The items of one
divergence evaluation are processed in chunks of `stacked_items_per_chunk` so that one chunk's graph stays within
``memory_budget_mib`` (default `DEFAULT_MEMORY_BUDGET_MIB`; an `openmm_tbg.flow.ODEOptions` field). Items are
independent, so chunking changes which items share a batch, not what is computed per item: log q agrees to
round-off (measured: identical, or a few ulp where the matmul kernels round differently for a different batch
size; ``tests/test_memory_budget.py``).
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["DIVERGENCE_MODES", "ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "check_solver", "check_quadrature",
           "check_integration_options", "solve_positions",
           "divergence_exact", "divergence_exact_loop", "divergence_exact_batched",
           "divergence_hutchinson", "gauss_legendre", "exact_chunk_size", "hutchinson_noise",
           "integrate_with_divergence", "DEFAULT_MEMORY_BUDGET_MIB", "check_memory_budget", "stacked_item_bytes",
           "stacked_items_per_chunk"]

DIVERGENCE_MODES = ("exact", "exact-loop", "hutchinson")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")

# Largest number of (B, N, N, H)-sized elements per vectorized backward chunk in "exact" mode (used on CUDA):
# each vmapped intermediate gradient then stays below ~1 GB in float32; several are alive at once.
_EXACT_CHUNK_ELEMENTS = 2**28
#: Default budget (MiB) of the autograd graph of one chunk of divergence items (see the module notes). On the
#: 2-core CPU (NY, 5 x 64 EGNN, 16 nodes x 16 samples; docs/performance.md) its 36-item chunks took 379 s and
#: 1.1 GB peak against 717 s and 4.0 GB for one 256-item chunk (same user time; the big chunk's extra time went
#: to page faults for its fresh 4 GB of tensors).
DEFAULT_MEMORY_BUDGET_MIB = 512.0
# Per EGNN layer the autograd graph keeps 7 (items, N, N, H) tensors (edge-MLP pre-activation, both SiLU inputs
# and the linear between them, the gated message, the coordinate MLP's hidden pre- and post-activation) plus
# thinner (N, N, 1..3) and (N, H) ones: 7.4-7.8 full-width equivalents measured for H = 32-128
# (tests/test_memory_budget.py); about 2 more are alive during a backward pass.
_EDGE_TENSORS_PER_LAYER = 7.5
_EDGE_TENSORS_BACKWARD = 2.0
# Used for a field without an EGNN ``config`` (n_layers, hidden): the shipped CNF's size.
_DEFAULT_FIELD_SIZE = (5, 64)


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


def check_memory_budget(memory_budget_mib: float) -> float:
    """``memory_budget_mib`` as a positive finite float (MiB); `ValueError` naming an example otherwise."""
    ok = (not isinstance(memory_budget_mib, bool) and isinstance(memory_budget_mib, (int, float, np.number))
          and math.isfinite(memory_budget_mib) and memory_budget_mib > 0)
    if not ok:
        raise ValueError(
            f"TransferableFlow: memory_budget_mib must be a positive number of MiB bounding the autograd graph of "
            f"one chunk of exact-divergence evaluations, e.g. {DEFAULT_MEMORY_BUDGET_MIB:g}; got "
            f"{memory_budget_mib!r}.")
    return float(memory_budget_mib)


def _field_size(vector_field: nn.Module) -> tuple[int, int]:
    """(n_layers, hidden) of the field's (items, N, N, H) edge tensors, from its ``config`` (EGNN);
    `_DEFAULT_FIELD_SIZE` for a field without one."""
    config = getattr(vector_field, "config", None)
    n_layers, hidden = _DEFAULT_FIELD_SIZE
    if isinstance(config, dict):
        n_layers, hidden = int(config.get("n_layers", n_layers)), int(config.get("hidden", hidden))
    return n_layers, hidden


def stacked_item_bytes(n_atoms: int, hidden: int, n_layers: int, itemsize: int) -> int:
    """Estimated autograd memory (bytes) of one item (one sample at one time) of an exact-divergence batch.

    ``(7.5 n_layers + 2) N^2 H itemsize``: the dense EGNN keeps about 7.5 ``(N, N, H)`` edge tensors per layer for
    the backward passes (7 full-width ones, plus thin ``(N, N, 1..3)`` and node ``(N, H)`` ones), and about 2
    more are alive during one (see the module notes). Measured on the NY run of docs/performance.md: 13.2 MiB
    per item against 13.9 estimated.

    Parameters
    ----------
    n_atoms : int
        Atoms N of the molecule.
    hidden : int
        Hidden width H of the EGNN.
    n_layers : int
        Equivariant layers of the EGNN.
    itemsize : int
        Bytes per element of the field's dtype (4 for float32, 8 for float64).

    Returns
    -------
    int
        Bytes per item.
    """
    edge_tensors = _EDGE_TENSORS_PER_LAYER * n_layers + _EDGE_TENSORS_BACKWARD
    return int(math.ceil(edge_tensors * n_atoms * n_atoms * hidden * itemsize))


def stacked_items_per_chunk(n_atoms: int, hidden: int, n_layers: int, itemsize: int,
                            memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB) -> int:
    """Items of an exact-divergence batch evaluated together so that their graph fits ``memory_budget_mib``.

    Parameters
    ----------
    n_atoms, hidden, n_layers, itemsize : int
        As for `stacked_item_bytes`.
    memory_budget_mib : float
        Budget (MiB, 2**20 bytes) of one chunk's autograd graph.

    Returns
    -------
    int
        ``floor(budget / stacked_item_bytes)``, and at least 1: a single item is the smallest unit the exact
        divergence can be computed in, so when it alone exceeds the budget it is still computed, over budget
        (`_AugmentedDynamics` logs a warning naming the budget it needs), rather than refused: a refusal would
        make exact log q unavailable for a large molecule on a machine that has the memory for one item.
    """
    per_item = stacked_item_bytes(n_atoms, hidden, n_layers, itemsize)
    budget = check_memory_budget(memory_budget_mib) * 2**20
    return max(1, int(budget // per_item))


def exact_chunk_size(vector_field: nn.Module, batch: int, n_atoms: int) -> int:
    """Coordinates per vectorized backward of `divergence_exact_batched` that keep memory bounded.

    Parameters
    ----------
    vector_field : torch.nn.Module
        The CNF's vector field (its hidden width sizes the edge tensors).
    batch, n_atoms : int
        Items and atoms of the batch whose divergence is computed.

    Returns
    -------
    int
        At least 1; ``_EXACT_CHUNK_ELEMENTS`` elements of (B, N, N, H) edge tensors per chunk.
    """
    per_coordinate = batch * n_atoms * n_atoms * _field_size(vector_field)[1]
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
    """ODE right-hand side on the augmented state (x, l) with dl/dt = -div v.

    ``divergence_at`` evaluates its items in chunks of `stacked_items_per_chunk` (``memory_budget_mib``).
    """

    def __init__(self, vector_field: nn.Module, tokens: torch.Tensor, divergence: str,
                 noise: torch.Tensor | None, memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB):
        self.vector_field = vector_field
        self.tokens = tokens
        self.divergence = divergence
        self.noise = noise
        self.memory_budget_mib = check_memory_budget(memory_budget_mib)
        self.nfe = 0
        self._warned = False

    def items_per_chunk_for(self, x: torch.Tensor) -> int:
        """Chunk size of `divergence_at` for items shaped like ``x`` ``(M, N, 3)``; warns (once per solve) when a
        single item exceeds the budget."""
        n_layers, hidden = _field_size(self.vector_field)
        n_atoms, itemsize = x.shape[1], x.element_size()
        per_item = stacked_item_bytes(n_atoms, hidden, n_layers, itemsize)
        if per_item > self.memory_budget_mib * 2**20 and not self._warned:
            self._warned = True
            logger.warning(
                "One exact-divergence item (%d atoms, %d x %d EGNN, %d-byte floats) needs about %.3g MiB, more "
                "than memory_budget_mib=%.3g: computing one item at a time, over budget. Raise memory_budget_mib "
                "to at least %.3g if the machine has the memory, or use a smaller model.", n_atoms, n_layers,
                hidden, itemsize, per_item / 2**20, self.memory_budget_mib, per_item / 2**20)
        return stacked_items_per_chunk(n_atoms, hidden, n_layers, itemsize, self.memory_budget_mib)

    def divergence_at(self, t: torch.Tensor | float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vector field and its divergence (by the configured mode) at ``(M, N, 3)`` items ``x``.

        ``t`` is a scalar or ``(M,)``; ``self.noise`` (Hutchinson) is ``(M, N, 3)``. The items are independent, so
        they are evaluated in chunks whose autograd graph fits the memory budget.
        """
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        # Computed once per field evaluation, not once per solver run: cheap, and x's size may change.
        per_chunk = self.items_per_chunk_for(x)
        vs, divs = [], []
        for start in range(0, x.shape[0], per_chunk):
            items = slice(start, start + per_chunk)
            noise = None if self.noise is None else self.noise[items]
            v, div = self._divergence_of_chunk(t if t.dim() == 0 else t[items], x[items], noise)
            vs.append(v)
            divs.append(div)
        if len(vs) == 1:
            return vs[0], divs[0]
        return torch.cat(vs), torch.cat(divs)

    def _divergence_of_chunk(self, t: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = self.vector_field(t, x, self.tokens)
            if self.divergence == "exact":
                div = divergence_exact(v, x, exact_chunk_size(self.vector_field, x.shape[0], x.shape[1]))
            elif self.divergence == "exact-loop":
                div = divergence_exact_loop(v, x)
            else:
                div = divergence_hutchinson(v, x, noise)
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
                              quadrature_nodes: int | None = None,
                              memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB
                              ) -> tuple[torch.Tensor, torch.Tensor, int]:
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
    memory_budget_mib : float
        Budget (MiB) of the autograd graph of one chunk of divergence items (`stacked_items_per_chunk`); chunking
        does not change the result (see the module notes).

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

    func = _AugmentedDynamics(vector_field, tokens, divergence, noise, memory_budget_mib)
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

    The K x B (node, sample) items are independent, so their divergences are computed as one stacked batch, which
    `_AugmentedDynamics.divergence_at` splits into chunks that fit the memory budget: one set of 3N backward
    passes serves many items instead of one node each. The weighted sum over nodes runs once, over all of them,
    so its rounding does not depend on the chunking either.
    """
    n_nodes = len(weights)
    B, N = xs.shape[1:3]
    x_items = xs[1:n_nodes + 1].reshape(n_nodes * B, N, 3)  # node-major: item k * B + b
    t_items = times[1:n_nodes + 1].repeat_interleave(B)
    if noise is not None:
        func.noise = noise.repeat(n_nodes, 1, 1)
    _, div = func.divergence_at(t_items, x_items)
    w = torch.as_tensor(weights, dtype=torch.float64, device=xs.device)
    return (w[:, None] * div.double().reshape(n_nodes, B)).sum(0)
