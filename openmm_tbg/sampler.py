"""Boltzmann-generator sampling of a user's peptide System: importance weights or Metropolis chains.

The flow proposes configurations ``x ~ q`` with exact log densities ``log q(x)``; the user's OpenMM System
gives reduced potentials ``u(x) = U(x) / kT``. The importance weight of a valid sample is
``w = exp(-u - log q)``; samples that fail the validity checks (bond graph, chirality; see
:mod:`openmm_tbg.validity`) or whose energy or density is not finite get weight 0 and are counted by reason.

``method="metropolis"`` runs an independence Metropolis-Hastings chain over the proposals, accepting ``x'``
with probability ``min(1, w(x') / w(x))``. Its stationary distribution is the Boltzmann one, so its states are
Boltzmann samples *asymptotically*: the chain starts from one state (the first valid proposal, or the user's),
which is not a Boltzmann draw, and its states are correlated through repeats. ``burn_in`` discards the first
states; averages over the chain (every state counts once) need the integrated autocorrelation time for their
error bars (`openmm_tbg.evaluation.autocorrelation`).
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import numpy as np
import openmm
from openmm import unit

from .checkpoint import resolve_model
from .checks import (check_positions, check_system, check_system_structure,
                     topology_atom_labels, warn_plain_low_temperature)
from .energy import MOLAR_GAS_CONSTANT, ReducedPotential, to_kelvin
from .hamiltonian import HamiltonianComparison
from .model import resolve_sampling_options
from .refinement import check_refined_for
from .results import SampleResult
from .utils import DEFAULT_TORCH_THREADS, check_threads, resolve_device, spawn_generators, torch_threads
from .validity import REJECTION_REASONS, ValidityChecker
from .weights import kish_ess, normalise_log_weights

logger = logging.getLogger(__name__)

__all__ = ["BoltzmannGeneratorSampler", "SampleResult", "METHODS", "ALL_REJECTION_REASONS"]

#: All reasons a proposal can be rejected, in the order they are checked.
ALL_REJECTION_REASONS = REJECTION_REASONS + ("non_finite_log_q", "non_finite_energy")
METHODS = ("importance", "metropolis", "none")


def symmetry_options(flow) -> dict:
    """`ValidityChecker` options from the symmetries the flow's density declares: mirror a fully inverted
    sample only under reflection symmetry, relabel interchangeable atoms only under permutation symmetry."""
    symmetries = getattr(flow, "symmetries", frozenset())
    return {"mirror": "reflection" in symmetries, "relabel": "permutation" in symmetries}


# --------------------------------------------------------------------------------------------------------------
class BoltzmannGeneratorSampler:
    """Sample the Boltzmann distribution of a peptide System with a transferable flow.

    Parameters
    ----------
    system : openmm.System
        The target Hamiltonian: non-periodic, no constraints, no virtual sites, no barostat.
    topology : openmm.app.Topology
        The peptide (a zwitterionic chain of standard amino acids, unless ``encoding`` is given).
    model : None, str, path or flow
        None loads the shipped pretrained model; a path loads that checkpoint; a flow of any family in
        `openmm_tbg.model.FAMILIES` is used as is (moved to ``device``).
    temperature : Quantity or float
        Kelvin if a plain number; 1-2000 K.
    device : str or torch.device
        ``"auto"``: CUDA when available, else CPU.
    batch_size : int
        Flow samples integrated together.
    seed : int, optional
        Seeds the flow's prior and the Metropolis chain; None draws fresh entropy.
    encoding : AtomEncoding, optional
        Bypass `encode_topology` (e.g. toy systems); the validity checks then use what applies.
    positions : Quantity or array, optional
        (n_atoms, 3) nm, a structure of the molecule (e.g. the PDB's). Checked for NaN and D-amino acids, and
        used as the reference of the validity checks.
    options : dataclass instance or dict, optional
        Sampling options of the model's family (``model.options_class``), or a dict of its fields; None: the
        family's defaults. The internal-coordinate flow's `openmm_tbg.ICOptions` has none (one exact pass);
        the CNF's `openmm_tbg.ODEOptions` holds the ODE solver, its tolerances, the Gauss-Legendre nodes of
        the exact divergence and the memory budget. Options of another family are refused.
    platform, n_workers
        OpenMM platform and energy workers (see `ReducedPotential`).
    check_bonds, check_chirality : bool
        Validity checks (see `ValidityChecker`); switch off only for toy systems.
    bond_factor : float
        Bond cutoff = ``bond_factor`` x sum of covalent radii.
    threads : int or None
        torch CPU threads while this sampler runs the flow (``sample``, ``propose``, ``log_prob``, ``refine``);
        the previous count is restored afterwards. Default 1: a peptide's tensors are too small to share, and on
        a loaded 2-core machine sample(1000) of AA took 3.8-11.9 s on one thread against 9.7-25 s on every core
        (issue 21, 2026-12-03).
        None keeps torch's own setting (``torch.set_num_threads``), e.g. for large batches on a GPU host.
    **deprecated_ode_options
        ``ode_method``, ``atol``, ``rtol``, ``step_size``, ``divergence``, ``quadrature_nodes`` and
        ``memory_budget_mib`` of earlier versions: deprecated (a `DeprecationWarning`), use
        ``options=ODEOptions(...)``.

    Examples
    --------
    >>> pep = build_peptide("AA")                                              # doctest: +SKIP
    >>> sampler = BoltzmannGeneratorSampler(pep.system, pep.topology)          # doctest: +SKIP
    >>> result = sampler.sample(1000)                                          # doctest: +SKIP
    >>> result.ess, result.counts                                              # doctest: +SKIP
    """

    def __init__(self, system: openmm.System, topology, model=None, temperature=310 * unit.kelvin,
                 device="auto", batch_size: int = 256, seed: Optional[int] = None, encoding=None, *,
                 positions=None, options=None, platform=None, n_workers: Optional[int] = None,
                 check_bonds: bool = True, check_chirality: bool = True, bond_factor: float = 1.3,
                 threads: Optional[int] = DEFAULT_TORCH_THREADS, **deprecated_ode_options):
        import torch

        from .encoding import AtomEncoding, encode_topology

        self.threads = check_threads(threads)
        warn_plain_low_temperature(temperature)
        self.temperature = to_kelvin(temperature)
        n_atoms = topology.getNumAtoms()
        if positions is not None:
            positions = check_positions(positions, n_atoms, what="positions")
            if positions.ndim != 2:
                raise ValueError(f"positions must be one structure ({n_atoms}, 3), got {positions.shape}.")
        # The Topology first (residues, caps, then the model's vocabulary: length), so that the first message
        # names the real reason; then the System alone; then the System against the Topology (energies).
        if encoding is None:
            encoding = encode_topology(topology, positions)  # refuses unsupported residues and D-amino acids
        elif not isinstance(encoding, AtomEncoding):
            raise TypeError(f"encoding must be an AtomEncoding (from encode_topology), got "
                            f"{type(encoding).__name__}.")
        if encoding.n_atoms != n_atoms:
            raise ValueError(f"The encoding has {encoding.n_atoms} atoms but the Topology has {n_atoms}; pass the "
                             f"encoding of this topology.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        self.device = resolve_device(device)
        self.flow, self.model_path, self.model_sha256 = resolve_model(model, self.device)
        self.flow.eval()
        self.flow.check_supported(encoding)  # refuse here, not after sampling has started
        check_system(system, n_atoms)
        bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
        self.system_checks = check_system_structure(
            system, bonds, MOLAR_GAS_CONSTANT * self.temperature, positions=positions, topology=topology,
            labels=topology_atom_labels(topology), platform=platform)
        self.system = system
        self.topology = topology
        self.encoding = encoding
        self.batch_size = int(batch_size)
        self.tokens = torch.as_tensor(encoding.tokens, dtype=torch.long)
        self.context = self.flow.condition(encoding, bonds)
        self.options, self.flow_options = resolve_sampling_options(self.flow, options, deprecated_ode_options)
        self.validity_options = {"check_bonds": bool(check_bonds), "check_chirality": bool(check_chirality),
                                 "bond_factor": float(bond_factor)}
        self.checker = ValidityChecker(topology, encoding, reference_positions=positions,
                                       **symmetry_options(self.flow), **self.validity_options)
        self.reduced_potential = ReducedPotential(system, self.temperature, platform=platform,
                                                  n_workers=n_workers)
        self.hamiltonian = HamiltonianComparison(system, topology, self.temperature, self.flow, platform)
        self.seed_sequence = np.random.SeedSequence(seed)
        self._rng, self._torch_generator = spawn_generators(self.seed_sequence, torch_first=True)
        self._reference_positions = positions
        self.refinement = None  # set on samplers returned by refine()
        check_refined_for(self.flow, system, topology, self.temperature)  # warns for a model refined elsewhere
        logger.info("BoltzmannGeneratorSampler: %d atoms, T = %.1f K, flow on %s, model %s", n_atoms,
                    self.temperature, self.device, self.model_path or "(in memory)")

    @property
    def kT(self) -> float:
        """Thermal energy in kJ/mol."""
        return self.reduced_potential.kT

    @property
    def ode_options(self) -> dict:
        """The flow's sampling options (for the CNF: its ODE options); alias of ``flow_options``."""
        return self.flow_options

    def propose(self, n: int, progress: bool = False) -> dict:
        """Draw ``n`` flow samples and check them; energies only for valid ones.

        Returns
        -------
        dict
            ``positions`` (n, N, 3) nm (relabelled/mirrored), ``log_q``, ``u`` (NaN where not evaluated),
            ``valid``, ``reasons``, ``mirrored``, ``relabelled``.
        """
        from tqdm.auto import tqdm

        n = int(n)
        chunks = {k: [] for k in ("positions", "log_q", "u", "valid", "reasons", "mirrored", "relabelled")}
        with torch_threads(self.threads), tqdm(total=n, disable=not progress, desc="BG samples",
                                               unit="sample") as bar:
            done = 0
            while done < n:
                m = min(self.batch_size, n - done)
                x, log_q = self.flow.sample(self.context, m, generator=self._torch_generator, batch_size=m,
                                            progress=False, **self.flow_options)
                x = x.detach().double().cpu().numpy()
                log_q = log_q.detach().double().cpu().numpy()
                report = self.checker(x, rng=self._rng)
                reasons = report.reasons.copy()
                reasons[(reasons == "") & ~np.isfinite(log_q)] = "non_finite_log_q"
                u = np.full(m, np.nan)
                todo = np.flatnonzero(reasons == "")
                if len(todo):
                    u[todo] = self.reduced_potential(report.positions[todo])
                reasons[todo[~np.isfinite(u[todo])]] = "non_finite_energy"
                for key, value in (("positions", report.positions), ("log_q", log_q), ("u", u),
                                   ("valid", reasons == ""), ("reasons", reasons),
                                   ("mirrored", report.mirrored), ("relabelled", report.relabelled)):
                    chunks[key].append(value)
                done += m
                bar.update(m)
        return {k: np.concatenate(v) for k, v in chunks.items()}

    def log_prob(self, positions_nm) -> np.ndarray:
        """Flow log density (nm, centre-free subspace) of configurations, with this sampler's ODE options."""
        x = check_positions(positions_nm, self.encoding.n_atoms)
        x = x[None] if x.ndim == 2 else x
        with torch_threads(self.threads):
            lq = self.flow.log_prob(x, self.context, batch_size=self.batch_size, **self.flow_options)
        return lq.detach().double().cpu().numpy()

    def sample(self, n: int, method: str = "importance", progress: bool = True,
               initial_positions=None, burn_in: int = 0) -> SampleResult:
        """Draw ``n`` flow samples and weight them (importance), chain them (metropolis) or not (none).

        Parameters
        ----------
        n : int
            Number of flow proposals.
        method : {"importance", "metropolis", "none"}
            ``"importance"``: weights ``exp(-u - log q)``; ``"metropolis"``: independence Metropolis-Hastings
            chain over the proposals (Boltzmann-distributed asymptotically; equal weights, correlated states:
            see the module notes); ``"none"``: raw flow samples, uniform weights over valid ones.
        progress : bool
            Show a tqdm progress bar.
        initial_positions : Quantity or array, optional
            (n_atoms, 3) nm: the chain's starting state (metropolis only). Default: the first valid proposal.
        burn_in : int
            Chain states discarded at the start (metropolis only): the result holds the states after them, and
            its ``acceptance_rate`` and `SampleResult.n_distinct` are those of the kept part.

        Returns
        -------
        SampleResult
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}.")
        if initial_positions is not None and method != "metropolis":
            raise ValueError("initial_positions only applies to method='metropolis'.")
        if isinstance(burn_in, bool) or int(burn_in) != burn_in or burn_in < 0:
            raise ValueError(f"burn_in must be a non-negative integer (chain states to discard), got {burn_in!r}.")
        if burn_in and method != "metropolis":
            raise ValueError("burn_in only applies to method='metropolis'; importance weights need none.")
        if burn_in >= n:
            raise ValueError(f"burn_in ({burn_in}) must be smaller than the number of proposals n ({n}); draw more "
                             "proposals or discard fewer states.")
        x0 = None
        if initial_positions is not None:
            x0 = check_positions(initial_positions, self.encoding.n_atoms, what="initial_positions")
            if x0.ndim != 2:
                raise ValueError(f"initial_positions must be one structure, got shape {x0.shape}.")
        n = int(n)
        p = self.propose(n, progress=progress)
        valid = p["valid"]
        log_w = np.where(valid, -p["u"] - p["log_q"], -np.inf)
        ess = kish_ess(log_w)
        rejections = {r: int(np.sum(p["reasons"] == r)) for r in ALL_REJECTION_REASONS}
        gap = self.hamiltonian.gap(p["positions"][valid], p["u"][valid]) if method != "none" else None
        common = dict(rejections=rejections, n_proposals=n, n_mirrored=int(p["mirrored"].sum()),
                      n_relabelled=int(p["relabelled"].sum()), ess=ess, temperature=self.temperature,
                      topology=self.topology, hamiltonian_gap=gap,
                      training_hamiltonian=self.hamiltonian.description)
        if not valid.any():
            logger.warning("None of the %d flow samples is valid (rejections: %s).", n, rejections)
        if method in ("importance", "none"):
            if method == "importance":
                lw = normalise_log_weights(log_w)
            else:  # uniform over the valid samples
                lw = np.where(valid, -np.log(max(1, valid.sum())), -np.inf)
            result = SampleResult(positions=p["positions"], log_weights=lw, reduced_potentials=p["u"],
                                  log_q=p["log_q"], valid=valid, reasons=p["reasons"], acceptance_rate=None,
                                  method=method, proposal_index=np.arange(n), **common)
        else:
            result = self._metropolis(p, log_w, x0, common, int(burn_in))
        logger.info("%s", result.summary())
        result.warn(stacklevel=2)  # FewEffectiveSamplesWarning / HamiltonianMismatchWarning, at the caller
        return result

    def _metropolis(self, p: dict, log_w: np.ndarray, x0: Optional[np.ndarray], common: dict,
                    burn_in: int = 0) -> SampleResult:
        n = len(log_w)
        if x0 is not None:
            report = self.checker(x0)
            if not report.valid[0]:
                raise ValueError(f"initial_positions fail the validity check ({report.reasons[0]}); pass a "
                                 f"structure of this molecule with the topology's bonds and L chirality.")
            x_cur = report.positions[0]
            u_cur = float(self.reduced_potential(x_cur)[0])
            lq_cur = float(self.log_prob(x_cur)[0])
            if not (np.isfinite(u_cur) and np.isfinite(lq_cur)):
                raise ValueError(f"initial_positions have a non-finite energy ({u_cur}) or flow density "
                                 f"({lq_cur}); pass a sensible (e.g. minimized) structure.")
            cur, start = -1, 0
            lw_cur = -u_cur - lq_cur
        else:
            valid_idx = np.flatnonzero(np.isfinite(log_w))
            if not len(valid_idx):
                raise RuntimeError(f"The Metropolis chain cannot start: none of the {n} proposals is valid "
                                   f"(rejections: {common['rejections']}). Draw more samples or pass "
                                   f"initial_positions.")
            cur = start = int(valid_idx[0])
            x_cur, u_cur, lq_cur, lw_cur = p["positions"][cur], p["u"][cur], p["log_q"][cur], log_w[cur]
            if start:
                logger.info("The chain starts at proposal %d, the first valid one.", start)
        index, accepted = [], []  # accepted[k]: state k was reached by an accepted move
        log_uniform = np.log(self._rng.random(n))
        first = True
        for i in range(start, n):
            if x0 is None and first:
                first = False  # the chain's first state is proposal `start` itself
                accepted.append(False)
            else:
                step = bool(np.isfinite(log_w[i]) and log_uniform[i] < log_w[i] - lw_cur)
                if step:
                    cur, lw_cur = i, log_w[i]
                accepted.append(step)
            index.append(cur)
        # Burn-in: drop the first states (the chain's start is not a Boltzmann draw).
        dropped = min(burn_in, len(index) - 1)  # at least one state is kept (the chain may start late)
        if dropped < burn_in:
            logger.warning("The chain started at proposal %d, so only %d of the %d burn-in states could be dropped.",
                           start, dropped, burn_in)
        index = np.asarray(index[dropped:], dtype=np.int64)
        considered = accepted[dropped + 1:] if (dropped or x0 is None) else accepted[dropped:]
        states = np.where(index >= 0, index, 0)
        user = index < 0
        positions = p["positions"][states].copy()
        u = p["u"][states].copy()
        lq = p["log_q"][states].copy()
        if user.any():  # states before the first accepted proposal are the user's initial state
            positions[user], u[user], lq[user] = x_cur, u_cur, lq_cur
        m = len(index)
        rate = float(np.mean(considered)) if len(considered) else float("nan")
        result = SampleResult(positions=positions, log_weights=np.full(m, -np.log(m)), reduced_potentials=u,
                              log_q=lq, valid=np.ones(m, dtype=bool), reasons=np.full(m, "", dtype=object),
                              acceptance_rate=rate, method="metropolis", proposal_index=index, **common)
        logger.info("Metropolis chain: %d states after a burn-in of %d, %d distinct, acceptance %.3f", m, dropped,
                    result.n_distinct, rate)
        return result

    def close(self) -> None:
        """Release energy worker processes."""
        self.reduced_potential.close()
        self.hamiltonian.close()

    def with_model(self, model, seed: Optional[int] = None) -> "BoltzmannGeneratorSampler":
        """A sampler for the same System, Topology, temperature and options with another model.

        Parameters
        ----------
        model : path or Flow
            As the constructor's ``model``.
        seed : int, optional
            Seed of the new sampler (None: a child of this sampler's seed sequence).
        """
        # The same options when the new model is of the same family, else that family's defaults.
        options = None if self.options == type(self.options)() else self.options
        if seed is None:
            seed = int(self.seed_sequence.spawn(1)[0].generate_state(1, dtype=np.uint32)[0])
        return BoltzmannGeneratorSampler(
            self.system, self.topology, model=model, temperature=self.temperature, device=self.device,
            batch_size=self.batch_size, seed=seed, encoding=self.encoding,
            positions=self._reference_positions, platform=self.reduced_potential.platform,
            n_workers=self.reduced_potential.n_workers, options=options, threads=self.threads, **self.validity_options)

    def refine(self, max_seconds: Union[float, None, str] = "default", *,
               max_steps: Union[int, None, str] = "default", seed: Optional[int] = 0, out=None,
               progress: bool = True, options=None, **overrides) -> "BoltzmannGeneratorSampler":
        """Refine the model on this System with its energies and forces (no MD); return a new sampler.

        Starts from this sampler's model and minimises the reverse KL divergence to the Boltzmann distribution
        together with maximum likelihood on its own importance-weighted proposals, which keeps the basins the
        model visits (`openmm_tbg.refinement`). Stops at the budget, or early when the ESS of fresh proposals
        stops improving, and keeps the best state. The new sampler's weights are exact like this one's.

        Parameters
        ----------
        max_seconds : float or None
            Wall-clock budget, s (evaluations included); ``"default"``: that of ``options`` (300 s without).
        max_steps : int or None
            Step budget; ``"default"``: that of ``options`` (none without).
        seed : int or None
            Seeds the run.
        out : path, optional
            Save the refined model (a checkpoint any sampler, `TBGMove` or ``openmm-tbg sample`` loads; it
            records the parent's sha256 and this System's fingerprint).
        progress : bool
            Progress bar with the ESS of fresh proposals.
        options : RefinementOptions, optional
            All settings; ``overrides`` (e.g. ``learning_rate=1e-4``) replace single ones.

        Returns
        -------
        BoltzmannGeneratorSampler
            With attribute ``refinement``, a `openmm_tbg.refinement.RefinementResult`.

        Examples
        --------
        >>> refined = sampler.refine(max_seconds=120, out="aa_refined.pt")     # doctest: +SKIP
        >>> refined.refinement.summary(), refined.sample(1000).ess              # doctest: +SKIP
        """
        from .refinement import refine

        budget = {k: v for k, v in (("max_seconds", max_seconds), ("max_steps", max_steps))
                  if not (isinstance(v, str) and v == "default")}
        with torch_threads(self.threads):
            return refine(self, options, seed=seed, out=out, progress=progress, **budget, **overrides)


# Names that lived here before the restructuring, still importable from this module.
_MOVED = {"resolve_model": "openmm_tbg.checkpoint", "file_sha256": "openmm_tbg.checkpoint",
          "configure_parser": "openmm_tbg.sample_command", "run_from_cli": "openmm_tbg.sample_command",
          "add_ode_arguments": "openmm_tbg.sample_command",
          "DEFAULT_QUADRATURE_NODES": "openmm_tbg.flow", "default_tolerance": "openmm_tbg.flow",
          "QUADRATURE_TOLERANCE": "openmm_tbg.flow", "TBG_TOLERANCE": "openmm_tbg.flow"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
