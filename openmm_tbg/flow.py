"""Continuous normalizing flow (CNF) of the transferable Boltzmann generator.

The flow maps a mean-free isotropic Gaussian prior (t = 0) to peptide configurations (t = 1) by integrating
dx/dt = v(x, t | tokens) with torchdiffeq. Log densities follow from the instantaneous change of variables,
d log p(x(t)) / dt = -div v(x(t), t), integrated alongside x on the augmented state (x, -int div dt).

Coordinates
-----------
Positions at the API are nm; the vector field works on internal coordinates ``x_nm / length_scale``. All
densities live on the 3(N-1)-dimensional subspace of centre-of-geometry-free configurations, and ``log_q`` is
in nm coordinates: ``log_q_nm = log_q_internal - 3 (N - 1) log(length_scale)``.

Divergence
----------
``divergence`` is ``"exact"`` (default), ``"exact-loop"`` (TBG's baseline) or ``"hutchinson"`` (a stochastic
estimate whose noise biases importance weights and ESS; opt-in, never for reported estimates). With
``quadrature_nodes=K`` the solver integrates positions alone and the exact trace is evaluated only at K
Gauss-Legendre nodes in t. The exact trace's autograd graph is evaluated in chunks of items that fit
``memory_budget_mib`` (default 512 MiB; chunking does not change log q). All of this is implemented, and explained,
in `openmm_tbg.divergence`; its public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .divergence import (ADAPTIVE_METHODS, DEFAULT_MEMORY_BUDGET_MIB, DIVERGENCE_MODES, FIXED_STEP_METHODS,
                         _AugmentedDynamics, check_integration_options, check_memory_budget, check_quadrature,
                         check_solver, divergence_exact, divergence_exact_batched, divergence_exact_loop,
                         divergence_hutchinson, gauss_legendre, hutchinson_noise, integrate_with_divergence,
                         solve_positions)
from .utils import as_torch_generator

logger = logging.getLogger(__name__)

# The divergence names are re-exported from `openmm_tbg.divergence`, where they live.
__all__ = ["TransferableFlow", "ODEOptions", "DEFAULT_QUADRATURE_NODES", "DEFAULT_MEMORY_BUDGET_MIB",
           "default_tolerance", "divergence_exact", "divergence_exact_loop", "divergence_exact_batched",
           "divergence_hutchinson", "gauss_legendre", "DIVERGENCE_MODES", "ADAPTIVE_METHODS", "FIXED_STEP_METHODS"]

#: Default Gauss-Legendre node count of the exact-divergence quadrature used by the sampler and TBGMove
#: (``None``: the divergence is integrated at every solver stage, as in TBG). Chosen from the accuracy
#: measured by ``benchmarks/sampling_speed.py`` (docs/performance.md).
DEFAULT_QUADRATURE_NODES: Optional[int] = 16
# dopri5 atol = rtol. The quadrature path solves for positions only, so 1e-5 costs ~1-2 % more than TBG's 1e-4
# and cuts the worst single-sample log q error from ~0.3 to ~0.05 kT (benchmarks/batch_tolerance.py, AA, 32
# samples). Without quadrature nodes the trace runs at every stage, so TBG's 1e-4 stays the default there.
QUADRATURE_TOLERANCE = 1e-5
TBG_TOLERANCE = 1e-4


def default_tolerance(quadrature_nodes: Optional[int]) -> float:
    """dopri5 atol = rtol used when none is given: 1e-5 with quadrature nodes, TBG's 1e-4 without."""
    return QUADRATURE_TOLERANCE if quadrature_nodes else TBG_TOLERANCE


@dataclass(frozen=True)
class ODEOptions:
    """Integration options of the CNF's `TransferableFlow.sample` / ``log_prob``, with the sampler's defaults.

    ``atol``/``rtol`` None resolve to `default_tolerance` of ``quadrature_nodes``. ``memory_budget_mib`` (MiB)
    bounds the autograd graph of one chunk of exact-divergence evaluations; it trades memory for speed and does
    not change log q (`openmm_tbg.divergence`, "Memory budget"). The one place these defaults live;
    `BoltzmannGeneratorSampler`, `TBGMove` and the CLI all go through it.
    """

    method: str = "dopri5"
    atol: Optional[float] = None
    rtol: Optional[float] = None
    step_size: Optional[float] = None
    divergence: str = "exact"
    quadrature_nodes: Optional[int] = DEFAULT_QUADRATURE_NODES
    memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB

    def resolved(self) -> dict:
        """Keyword arguments of `TransferableFlow.sample` / ``log_prob`` (tolerances filled in)."""
        tol = default_tolerance(self.quadrature_nodes)
        return {"method": self.method, "atol": float(tol if self.atol is None else self.atol),
                "rtol": float(tol if self.rtol is None else self.rtol), "step_size": self.step_size,
                "divergence": self.divergence, "quadrature_nodes": self.quadrature_nodes,
                "memory_budget_mib": self.memory_budget_mib}


class TransferableFlow(nn.Module):
    """Equivariant continuous normalizing flow for peptide configurations.

    Parameters
    ----------
    vector_field : torch.nn.Module
        A module ``vector_field(t, x, tokens, mask=None) -> (B, N, 3)`` that is mean-free in its output and
        translation invariant in its input (e.g. :class:`openmm_tbg.nn.egnn.EGNNVectorField`).
    length_scale : float
        nm per internal length unit: internal coordinates are ``x_nm / length_scale``. TBG scaled nm by 30,
        i.e. ``length_scale = 1/30`` nm; training picks it from the data's spread.
    prior_std : float
        Standard deviation of the isotropic Gaussian prior in internal units.

    Notes
    -----
    Implements the `openmm_tbg.model.Flow` interface (family ``"egnn-cnf"``). An E(3)- and
    permutation-equivariant field makes the density invariant under rotations, reflections and permutations
    of interchangeable atoms, so mirrored and relabelled samples keep their weights.
    """

    family = "egnn-cnf"
    symmetries = frozenset({"rotation", "reflection", "permutation"})
    options_class = ODEOptions

    def __init__(self, vector_field: nn.Module, length_scale: float = 1.0 / 30.0, prior_std: float = 1.0):
        super().__init__()
        if not (isinstance(length_scale, (int, float)) and math.isfinite(length_scale) and length_scale > 0):
            raise ValueError(f"TransferableFlow: length_scale must be a positive float (nm), got {length_scale!r}.")
        if not (isinstance(prior_std, (int, float)) and math.isfinite(prior_std) and prior_std > 0):
            raise ValueError(f"TransferableFlow: prior_std must be a positive float, got {prior_std!r}.")
        self.vector_field = vector_field
        self.length_scale = float(length_scale)
        self.prior_std = float(prior_std)
        # Tracks the flow's dtype and device through .to()/.double(); not part of the state_dict.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        #: statistics of the last ``sample``/``log_prob`` call (function evaluations, batches, ...)
        self.last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        """JSON-able dict from which :meth:`from_config` rebuilds the flow (EGNN vector field)."""
        vf_config = getattr(self.vector_field, "config", None)
        if not isinstance(vf_config, dict):
            raise TypeError(
                f"TransferableFlow.config: the vector field {type(self.vector_field).__name__} has no `config` "
                "dict; only flows whose vector field can be rebuilt from its config can be saved."
            )
        return {
            "vector_field_class": type(self.vector_field).__name__,
            "vector_field": dict(vf_config),
            "length_scale": self.length_scale,
            "prior_std": self.prior_std,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TransferableFlow":
        """Build a flow with an :class:`EGNNVectorField` from :attr:`config` (weights are fresh)."""
        from openmm_tbg.nn.egnn import EGNNVectorField

        if not isinstance(config, dict) or "vector_field" not in config:
            raise ValueError(f"TransferableFlow.from_config: expected a dict with a 'vector_field' entry, got {config!r}.")
        vf_class = config.get("vector_field_class", "EGNNVectorField")
        if vf_class != "EGNNVectorField":
            raise ValueError(
                f"TransferableFlow.from_config: vector field class {vf_class!r} is not supported; only "
                "EGNNVectorField can be rebuilt from a config."
            )
        flow = cls(
            EGNNVectorField(**config["vector_field"]),
            length_scale=float(config.get("length_scale", 1.0 / 30.0)),
            prior_std=float(config.get("prior_std", 1.0)),
        )
        dtype = config.get("dtype", "float32")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"TransferableFlow.from_config: dtype must be 'float32' or 'float64', got {dtype!r}.")
        return flow.to(getattr(torch, dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    # ------------------------------------------------------------------ prior
    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of the mean-free Gaussian prior on the 3(N-1)-dimensional subspace (internal units).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, N, 3)`` internal coordinates; the centre of geometry is removed first.

        Returns
        -------
        torch.Tensor
            ``(B,)`` float64: ``-|z|^2 / (2 s^2) - 3 (N - 1) / 2 * log(2 pi s^2)``.
        """
        if z.dim() != 3 or z.shape[-1] != 3:
            raise ValueError(f"prior_log_prob: z must have shape (B, N, 3), got {tuple(z.shape)}.")
        z = z.double()
        z = z - z.mean(1, keepdim=True)
        dim = 3 * (z.shape[1] - 1)
        s2 = self.prior_std**2
        return -(z * z).sum((1, 2)) / (2 * s2) - 0.5 * dim * math.log(2 * math.pi * s2)

    def sample_prior(self, n: int, n_atoms: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` mean-free Gaussian configurations ``(n, n_atoms, 3)`` in internal units.

        Projecting an isotropic Gaussian onto the mean-free subspace gives an isotropic Gaussian there with the
        same standard deviation.
        """
        if n_atoms < 2:
            raise ValueError(f"sample_prior: need at least 2 atoms, got {n_atoms}.")
        gen_device = generator.device if generator is not None else self.device
        z = torch.randn(n, n_atoms, 3, generator=generator, dtype=self.dtype, device=gen_device)
        z = (z - z.mean(1, keepdim=True)) * self.prior_std
        return z.to(self.device)

    # ------------------------------------------------------------------ flow interface
    def condition(self, encoding: Any, bonds: Any = None) -> torch.Tensor:
        """The ``(N, 3)`` token tensor of a molecule (the CNF does not use the bonds)."""
        return self._as_tokens(encoding)

    def check_supported(self, encoding: Any) -> None:
        """Raise `UnsupportedTopologyError` if the vector field's vocabulary cannot encode ``encoding``."""
        from .encoding import UnsupportedTopologyError

        sizes = getattr(self.vector_field, "vocab_sizes", None)
        n_residues = getattr(encoding, "n_residues", None)
        if sizes is not None and n_residues is not None and n_residues > sizes[0]:
            raise UnsupportedTopologyError(
                f"This model supports peptides of at most {sizes[0]} residues, but {encoding.sequence!r} has "
                f"{n_residues}. Use a model trained on peptides of that length (openmm-tbg train on MD data of "
                f"such peptides, e.g. made with openmm-tbg simulate).")
        try:
            self._as_tokens(encoding)
        except ValueError as error:
            raise UnsupportedTopologyError(
                f"This model cannot serve the peptide {getattr(encoding, 'sequence', '?')!r}: {error} Use a model "
                f"trained on such peptides (openmm-tbg train on MD data that includes them).") from error

    def sampling_options(self, options: Optional[ODEOptions] = None, **fields: Any) -> dict:
        """Keyword arguments of `sample` / `log_prob` from an `ODEOptions` (None: the defaults) or its fields
        (``ode_method`` is an alias of ``method``), tolerances filled in and every value checked."""
        if "ode_method" in fields:
            fields["method"] = fields.pop("ode_method")
        unknown = sorted(set(fields) - set(ODEOptions.__dataclass_fields__))
        if unknown:
            raise ValueError(f"TransferableFlow: unknown sampling options {unknown}; the CNF takes "
                             f"{sorted(ODEOptions.__dataclass_fields__)}.")
        if options is None:
            options = ODEOptions(**fields)
        elif not isinstance(options, ODEOptions):
            raise TypeError(f"TransferableFlow: options must be an ODEOptions, got {type(options).__name__}.")
        elif fields:
            options = dataclasses.replace(options, **fields)
        resolved = options.resolved()
        resolved["memory_budget_mib"] = check_memory_budget(resolved["memory_budget_mib"])
        self._check_solver(resolved["method"], resolved["atol"], resolved["rtol"], resolved["step_size"],
                           resolved["divergence"])
        self._check_quadrature(resolved["quadrature_nodes"])
        return resolved

    def integrate_positions(self, x0: torch.Tensor, tokens: Any, times: Any, *, method: str = "dopri5",
                            atol: float = 1e-5, rtol: float = 1e-5, step_size: float | None = None,
                            norm: Callable[[torch.Tensor], torch.Tensor] | None = None
                            ) -> tuple[torch.Tensor, int]:
        """Integrate positions alone (no divergence) and return them at ``times``.

        Parameters
        ----------
        x0 : torch.Tensor
            ``(B, N, 3)`` internal (scaled) coordinates at ``times[0]``.
        tokens : array-like or AtomEncoding
        times : sequence of float
            Monotonic times in [0, 1] (0 = prior, 1 = data).
        method, atol, rtol, step_size
            As in `sample`.
        norm : callable, optional
            Error norm of adaptive methods (torchdiffeq's ``norm`` option, e.g. the largest per-sample RMS);
            None: torchdiffeq's RMS over the whole batch, as in `sample`.

        Returns
        -------
        xs : torch.Tensor
            ``(len(times), B, N, 3)``.
        nfe : int
            Vector-field evaluations.
        """
        tokens = self._as_tokens(tokens)
        options = self._check_solver(method, atol, rtol, step_size, "exact")
        if norm is not None:
            options = {**options, "norm": norm}
        t = torch.as_tensor(np.asarray(times, dtype=np.float64), dtype=x0.dtype, device=x0.device)
        return solve_positions(self.vector_field, x0, tokens, t, method=method, atol=atol, rtol=rtol,
                               options=options)

    def divergence(self, t: torch.Tensor, x: torch.Tensor, tokens: Any, mode: str = "exact",
                   memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB) -> tuple[torch.Tensor, torch.Tensor]:
        """Vector field and its exact divergence at ``(t, x)`` (internal units; ``mode`` "exact" or
        "exact-loop"; ``memory_budget_mib`` as in `sample`)."""
        if mode not in ("exact", "exact-loop"):
            raise ValueError(f"TransferableFlow.divergence: mode must be 'exact' or 'exact-loop', got {mode!r}.")
        func = _AugmentedDynamics(self.vector_field, self._as_tokens(tokens), mode, None, memory_budget_mib)
        return func.divergence_at(t, x)

    # ------------------------------------------------------------------ helpers
    def _as_tokens(self, tokens: Any) -> torch.Tensor:
        if hasattr(tokens, "tokens") and not isinstance(tokens, (torch.Tensor, np.ndarray)):
            tokens = tokens.tokens  # an AtomEncoding
        tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        if tokens.dim() != 2 or tokens.shape[1] != 3:
            raise ValueError(
                f"TransferableFlow: tokens must have shape (n_atoms, 3) ([residue_index, amino_acid, atom_class], "
                f"e.g. AtomEncoding.tokens), got {tuple(tokens.shape)}."
            )
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"TransferableFlow: tokens must be integers, got dtype {tokens.dtype}.")
        if tokens.shape[0] < 2:
            raise ValueError(f"TransferableFlow: need at least 2 atoms, got {tokens.shape[0]}.")
        tokens = tokens.long().to(self.device)
        check = getattr(self.vector_field, "check_tokens", None)
        if check is not None:
            check(tokens)
        return tokens

    _check_quadrature = staticmethod(check_quadrature)
    _check_solver = staticmethod(check_solver)

    def _integrate(self, x0: torch.Tensor, tokens: torch.Tensor, t0: float, t1: float, method: str,
                   atol: float, rtol: float, options: dict, divergence: str,
                   generator: torch.Generator | None, quadrature_nodes: int | None = None,
                   memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Integrate from t0 to t1; returns (x(t1), -int_{t0}^{t1} div dt, function evaluations)."""
        noise = hutchinson_noise(x0, generator, self.device) if divergence == "hutchinson" else None
        return integrate_with_divergence(self.vector_field, x0, tokens, t0, t1, method=method, atol=atol,
                                         rtol=rtol, options=options, divergence=divergence, noise=noise,
                                         quadrature_nodes=quadrature_nodes, memory_budget_mib=memory_budget_mib)

    # ------------------------------------------------------------------ API
    def sample(
        self,
        tokens: Any,
        n: int,
        *,
        generator: torch.Generator | int | None = None,
        batch_size: int | None = None,
        method: str = "dopri5",
        atol: float = 1e-4,
        rtol: float = 1e-4,
        step_size: float | None = None,
        divergence: str = "exact",
        quadrature_nodes: int | None = None,
        memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw configurations and their exact log density.

        Integrates prior (t = 0) to data (t = 1).

        Parameters
        ----------
        tokens : array-like or AtomEncoding
            ``(n_atoms, 3)`` integer tokens of the molecule.
        n : int
            Number of samples.
        generator : torch.Generator or int, optional
            RNG (or seed) for the prior and Hutchinson noise; None draws fresh entropy.
        batch_size : int, optional
            Samples integrated together; None integrates all ``n`` at once.
        method : str
            torchdiffeq method: adaptive (``"dopri5"``, with atol/rtol) or fixed-step (``"euler"``,
            ``"midpoint"``, ``"rk4"``, with step_size).
        atol, rtol : float
            Tolerances of adaptive methods (internal units; TBG: 1e-4).
        step_size : float, optional
            Time step of fixed-step methods (1 / number of steps).
        divergence : str
            ``"exact"`` (default), ``"exact-loop"`` or ``"hutchinson"`` (biased weights; opt-in).
        quadrature_nodes : int, optional
            None (default): the divergence is integrated by the solver at every stage (TBG). K: the solver
            integrates positions only and the divergence is evaluated at K Gauss-Legendre nodes in t (much
            cheaper; see the module notes and ``benchmarks/sampling_speed.py`` for its accuracy).
        memory_budget_mib : float
            Budget (MiB) of the autograd graph of one chunk of exact-divergence evaluations (default 512). The
            K x batch (node, sample) items, or the batch at each solver stage without quadrature nodes, are
            evaluated in chunks that fit it: smaller means less memory, and chunks of very few items cost more
            time per item (docs/performance.md). Does not change log q.
        progress : bool
            Show a tqdm bar over batches.

        Returns
        -------
        x_nm : torch.Tensor
            ``(n, n_atoms, 3)`` positions in nm (centre of geometry at the origin), flow dtype, on the CPU.
        log_q : torch.Tensor
            ``(n,)`` float64 log density on the centre-of-geometry-free subspace in nm coordinates, on the CPU.
        """
        from tqdm.auto import tqdm

        tokens = self._as_tokens(tokens)
        if int(n) != n or n < 1:
            raise ValueError(f"TransferableFlow.sample: n must be a positive integer, got {n!r}.")
        n = int(n)
        options, quadrature_nodes, batch_size = check_integration_options(
            "sample", n, batch_size, method, atol, rtol, step_size, divergence, quadrature_nodes)
        memory_budget_mib = check_memory_budget(memory_budget_mib)
        generator = as_torch_generator(generator)
        n_atoms = tokens.shape[0]
        log_scale = 3 * (n_atoms - 1) * math.log(self.length_scale)
        xs, lqs, nfe = [], [], []
        n_batches = (n + batch_size - 1) // batch_size
        for b in tqdm(range(n_batches), disable=not progress, desc="flow samples", unit="batch"):
            m = min(batch_size, n - b * batch_size)
            z = self.sample_prior(m, n_atoms, generator)
            x1, l1, k = self._integrate(z, tokens, 0.0, 1.0, method, atol, rtol, options, divergence, generator,
                                        quadrature_nodes, memory_budget_mib)
            log_q = self.prior_log_prob(z) + l1.double() - log_scale
            x1 = x1 - x1.mean(1, keepdim=True)
            xs.append((x1 * self.length_scale).cpu())
            lqs.append(log_q.cpu())
            nfe.append(k)
        self.last_stats = {"nfe": nfe, "n_batches": n_batches, "method": method, "divergence": divergence,
                           "quadrature_nodes": quadrature_nodes}
        logger.debug("sampled %d configurations of %d atoms; function evaluations per batch %s", n, n_atoms, nfe)
        return torch.cat(xs), torch.cat(lqs)

    def log_prob(
        self,
        x_nm: Any,
        tokens: Any,
        *,
        batch_size: int | None = None,
        method: str = "dopri5",
        atol: float = 1e-4,
        rtol: float = 1e-4,
        step_size: float | None = None,
        divergence: str = "exact",
        quadrature_nodes: int | None = None,
        memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB,
        generator: torch.Generator | int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Log density of configurations under the flow (integrates data, t = 1, to prior, t = 0).

        Parameters
        ----------
        x_nm : array-like, torch.Tensor or openmm.unit.Quantity
            ``(n, n_atoms, 3)`` positions in nm; centred (plain mean) before evaluation.
        tokens : array-like or AtomEncoding
            ``(n_atoms, 3)`` integer tokens.
        batch_size, method, atol, rtol, step_size, divergence, quadrature_nodes, memory_budget_mib, progress
            As in :meth:`sample`.
        generator : torch.Generator or int, optional
            RNG for the Hutchinson noise (ignored by the exact modes).

        Returns
        -------
        torch.Tensor
            ``(n,)`` float64 log density on the centre-of-geometry-free subspace in nm coordinates, on the CPU.
        """
        from tqdm.auto import tqdm

        tokens = self._as_tokens(tokens)
        x = self._as_positions(x_nm, tokens.shape[0])
        n = x.shape[0]
        options, quadrature_nodes, batch_size = check_integration_options(
            "log_prob", n, batch_size, method, atol, rtol, step_size, divergence, quadrature_nodes)
        memory_budget_mib = check_memory_budget(memory_budget_mib)
        if divergence == "hutchinson":
            generator = as_torch_generator(generator)
        n_atoms = tokens.shape[0]
        log_scale = 3 * (n_atoms - 1) * math.log(self.length_scale)
        out, nfe = [], []
        n_batches = (n + batch_size - 1) // batch_size
        for b in tqdm(range(n_batches), disable=not progress, desc="flow log_prob", unit="batch"):
            x1 = x[b * batch_size:(b + 1) * batch_size].to(self.device)
            x1 = x1 - x1.mean(1, keepdim=True)
            x1 = x1 / self.length_scale
            z, l0, k = self._integrate(x1, tokens, 1.0, 0.0, method, atol, rtol, options, divergence, generator,
                                       quadrature_nodes, memory_budget_mib)
            out.append((self.prior_log_prob(z) - l0.double() - log_scale).cpu())
            nfe.append(k)
        self.last_stats = {"nfe": nfe, "n_batches": n_batches, "method": method, "divergence": divergence,
                           "quadrature_nodes": quadrature_nodes}
        return torch.cat(out)

    def _as_positions(self, x_nm: Any, n_atoms: int) -> torch.Tensor:
        try:  # openmm.unit.Quantity
            from openmm import unit

            if unit.is_quantity(x_nm):
                x_nm = x_nm.value_in_unit(unit.nanometer)
        except ImportError:  # pragma: no cover - openmm is a hard dependency of the package
            pass
        if isinstance(x_nm, torch.Tensor):
            x = x_nm.detach()
        else:
            x = torch.as_tensor(np.asarray(x_nm, dtype=np.float64))
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(
                f"TransferableFlow.log_prob: positions must have shape (n_samples, n_atoms, 3) in nm, got "
                f"{tuple(x.shape)}; add a leading axis for a single configuration."
            )
        if x.shape[1] != n_atoms:
            raise ValueError(
                f"TransferableFlow.log_prob: positions have {x.shape[1]} atoms but tokens have {n_atoms}; "
                "pass the tokens of the same molecule (same atom order) as the positions."
            )
        if x.shape[0] < 1:
            raise ValueError("TransferableFlow.log_prob: no configurations given (n_samples = 0).")
        finite = torch.isfinite(x).all(dim=(1, 2))
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(
                f"TransferableFlow.log_prob: {len(bad)} configuration(s) contain NaN or infinite positions "
                f"(indices {bad[:10]}{'...' if len(bad) > 10 else ''}); remove them before evaluating densities."
            )
        return x.to(self.dtype)
