"""`TBGMove`: a Boltzmann-generator proposal as an openmmtools MCMC move.

Each attempt proposes an independent configuration ``x'`` from the flow (drawn in batches into a buffer,
checked by :class:`~openmm_tbg.validity.ValidityChecker`) and accepts it with the independence
Metropolis-Hastings probability::

    min(1, exp(-u(x') + u(x) + log q(x) - log q(x')))

where ``u`` is the reduced potential of the *thermodynamic state the move is applied in*. The flow does not
depend on temperature, so the same move is correct in every replica of a ``ReplicaExchangeSampler`` and
mixes with MD moves (``SequenceMove([LangevinDynamicsMove(...), TBGMove(sampler)])``). The proposal keeps
the current centre of geometry (the flow's density lives on the centre-free subspace).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections import OrderedDict
from typing import Optional

import numpy as np
from openmm import unit

from .quiet import quiet_openmmtools

with quiet_openmmtools():  # pymbar's import banners, not about the user's run
    from openmmtools import mcmc

from .checkpoint import file_sha256, load_model, resolve_model
from .checks import check_system, check_system_structure
from .model import resolve_sampling_options
from .sampler import BoltzmannGeneratorSampler, symmetry_options
from .serialization import encoding_from_dict, encoding_to_dict
from .utils import DEFAULT_TORCH_THREADS, check_threads, resolve_device, spawn_generators, to_nm, torch_threads
from .validity import ValidityChecker

logger = logging.getLogger(__name__)

__all__ = ["TBGMove", "OutsideSupportWarning"]

_STATISTICS = ("n_accepted", "n_proposed", "n_invalid", "n_non_finite_energy", "n_mirrored", "n_relabelled",
               "n_log_prob_evaluations", "n_outside_support")


class OutsideSupportWarning(UserWarning):
    """The current state of a `TBGMove` lies outside the flow's support (``log q = -inf``), so the move can
    never leave it: only other moves (MD) can."""
# Flows loaded by __setstate__, shared between the restored copies of a move (one per replica). Bounded: a
# long-lived process that restores moves of many different models keeps only the most recent ones.
_MODEL_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_MODEL_CACHE_SIZE = 4


def _cached_model(path: str, sha: str, device: str):
    key = (os.path.abspath(path), sha, device)
    if key in _MODEL_CACHE:
        _MODEL_CACHE.move_to_end(key)
    else:
        _MODEL_CACHE[key] = load_model(path, device=device).eval()
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
    return _MODEL_CACHE[key]


class TBGMove(mcmc.MCMCMove):
    """Independence Metropolis-Hastings move with Boltzmann-generator proposals.

    Parameters
    ----------
    sampler_or_model : BoltzmannGeneratorSampler, flow, str, path or None
        A sampler (its model, encoding, validity checks and sampling options are used), or a model as accepted by
        `BoltzmannGeneratorSampler` (None: the shipped model), which then needs ``topology``.
    topology : openmm.app.Topology, optional
        Needed when a model is given.
    encoding : AtomEncoding, optional
        Bypasses `encode_topology` (toy systems).
    n_attempts : int
        Proposals per `apply`.
    buffer_size : int
        Flow samples generated per batch.
    seed : int, optional
        Seeds the flow's prior and the acceptance test; None draws fresh entropy.
    device : str
        Torch device for a model given by path (``"auto"``: CUDA when available).
    options : dataclass instance or dict, optional
        Sampling options of the model's family, as in `BoltzmannGeneratorSampler` (None: the family's
        defaults; refused with a sampler, whose options are used).
    check_bonds, check_chirality, bond_factor
        Validity options (ignored when a sampler is given).
    threads : int or None
        torch CPU threads while the move draws or evaluates flow samples, restored afterwards (default 1, as
        `BoltzmannGeneratorSampler`; None keeps torch's setting). A move built from a sampler uses the sampler's.
    **deprecated_ode_options
        The CNF's ODE keyword arguments of earlier versions (``ode_method``, ``atol``, ...): deprecated, use
        ``options=ODEOptions(...)``.

    Attributes
    ----------
    statistics : dict
        ``n_accepted``, ``n_proposed``, ``n_invalid`` (failed validity), ``n_non_finite_energy``,
        ``n_mirrored``, ``n_relabelled``, ``n_log_prob_evaluations``, ``n_outside_support`` (valid proposals
        made while the current state lay outside the flow's support, all rejected).

    Notes
    -----
    Storing the move (``MultiStateReporter``) keeps only the checkpoint path and its sha256, the encoding, the
    bonds, the options, the statistics and a random stream of its own. Restoring reloads the model from the path
    and refuses a file whose sha256 differs. A model that exists only in memory cannot be stored: save it with
    ``openmm_tbg.save_model`` and pass the path.

    Random streams: every copy (``copy.deepcopy``; ``ReplicaExchangeSampler`` makes one per thermodynamic state)
    and every stored state (``__getstate__``, which openmmtools' ``SequenceMove`` also uses to deep-copy its
    moves) gets a fresh child of this move's ``numpy.random.SeedSequence``, so replicas never share proposals, and
    restoring the same stored state twice gives the same continuation.

    System checks: `check_system` on every `apply`; the structure checks of
    `openmm_tbg.checks.check_system_structure` (bond terms against the Topology's bonds, a finite and sane energy,
    invariance under rigid motions) once per System, at the first `apply` in a thermodynamic state with that
    System, at the current positions. A move built from a sampler was checked with the sampler's System too.

    Support gaps: a current state the flow cannot produce (``log q(x) = -inf``: for the internal-coordinate
    flow a twin group with no canonical labelling, or a ring closure on the other branch) gives every proposal
    acceptance probability ``q(x) pi(x') / (q(x') pi(x)) = 0``, as independence Metropolis-Hastings must; the
    chain stays there until another move (MD) takes it back into the support. Such proposals are counted in
    ``n_outside_support`` (they skip the energy evaluation), and the first one of a move warns with
    `OutsideSupportWarning`. The stationary distribution of a chain that mixes MD and this move is still the
    Boltzmann one; a chain of this move alone started outside the support never moves.

    ``isinstance(x, TBGMove)`` is True only for instances of this class and its subclasses (openmmtools' base
    class would accept any object).
    """

    @classmethod
    def __subclasshook__(cls, subclass):
        # openmmtools' SubhookedABCMeta.__subclasshook__ accepts every class that defines the abstract methods,
        # and TBGMove has none left, so isinstance(anything, TBGMove) would be True. Use ordinary subclassing.
        return NotImplemented

    def __init__(self, sampler_or_model=None, topology=None, encoding=None, *, n_attempts: int = 1,
                 buffer_size: int = 64, seed: Optional[int] = None, device="auto", options=None,
                 check_bonds: bool = True, check_chirality: bool = True, bond_factor: float = 1.3,
                 threads: Optional[int] = DEFAULT_TORCH_THREADS, **deprecated_ode_options):
        super().__init__()
        from .encoding import encode_topology

        if int(n_attempts) < 1 or int(buffer_size) < 1:
            raise ValueError(f"n_attempts and buffer_size must be positive, got {n_attempts} and {buffer_size}.")
        if isinstance(sampler_or_model, BoltzmannGeneratorSampler):
            s = sampler_or_model
            if options is not None or deprecated_ode_options:
                raise ValueError("TBGMove: a move built from a BoltzmannGeneratorSampler uses the sampler's sampling "
                                 "options; pass options to the sampler, or build the move from the model.")
            flow, path, sha = s.flow, s.model_path, s.model_sha256
            encoding = s.encoding
            bonds = s.checker.bonds
            ode = dict(s.ode_options)
            validity = dict(s.validity_options)
            if len(s.checker.centers):  # the sampler's reference chirality, which the bonds alone do not carry
                validity["expected_signs"] = [int(v) for v in s.checker.expected_signs]
        else:
            if topology is None and encoding is None:
                raise ValueError("TBGMove needs the peptide's topology when given a model instead of a "
                                 "BoltzmannGeneratorSampler: TBGMove(model, topology).")
            if topology is None:
                raise ValueError("TBGMove needs the topology (for its bonds) as well as the encoding.")
            if encoding is None:
                encoding = encode_topology(topology)
            flow, path, sha = resolve_model(sampler_or_model, resolve_device(device))
            flow.check_supported(encoding)  # refuse here, not inside the first apply()
            bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
            _, ode = resolve_sampling_options(flow, options, deprecated_ode_options, where="TBGMove")
            validity = {"check_bonds": bool(check_bonds), "check_chirality": bool(check_chirality),
                        "bond_factor": float(bond_factor)}
        seed_seq = np.random.SeedSequence(seed)
        self._init(flow, path, sha, encoding, bonds, ode, validity, int(n_attempts), int(buffer_size), seed_seq,
                   {k: 0 for k in _STATISTICS})
        # A sampler's own thread count wins, as its other options do.
        self.threads = (getattr(sampler_or_model, "threads", DEFAULT_TORCH_THREADS)
                        if isinstance(sampler_or_model, BoltzmannGeneratorSampler) else check_threads(threads))

    def _init(self, flow, path, sha, encoding, bonds, ode, validity, n_attempts, buffer_size, seed_seq,
              statistics):
        import torch

        self.flow = flow
        self.model_path = path
        self.model_sha256 = sha
        self.encoding = encoding
        self.bonds = [tuple(int(i) for i in b) for b in bonds]
        self.flow_options = ode
        self.validity_options = validity
        self.n_attempts = n_attempts
        self.buffer_size = buffer_size
        self._seed_seq = seed_seq
        self._statistics = dict(statistics)
        self.tokens = torch.as_tensor(encoding.tokens, dtype=torch.long)
        self.context = flow.condition(encoding, self.bonds)
        # Mirror / relabel proposals only if the model's density has that symmetry (else they are rejected).
        self.checker = ValidityChecker.from_bonds(self.bonds, encoding, **validity, **symmetry_options(flow))
        self._rng, self._torch_generator = spawn_generators(seed_seq, torch_first=True)
        self._buffer: list = []
        self._cache = None  # (positions, log q) of the last state whose density is known
        self._checked_systems: set = set()  # standard-System hashes that passed check_system_structure
        self._warned_outside = False  # OutsideSupportWarning once per move

    # ---------------------------------------------------------------------------------------- statistics
    @property
    def statistics(self) -> dict:
        """Counts since the last `reset_statistics` (plain ints)."""
        return dict(self._statistics)

    @statistics.setter
    def statistics(self, value: dict) -> None:
        self._statistics = {k: int(value.get(k, 0)) for k in _STATISTICS}

    def reset_statistics(self) -> None:
        """Set all counts to zero."""
        self._statistics = {k: 0 for k in _STATISTICS}

    @property
    def ode_options(self) -> dict:
        """The flow's sampling options (for the CNF: its ODE options); alias of ``flow_options``."""
        return self.flow_options

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed (NaN before the first proposal)."""
        n = self._statistics["n_proposed"]
        return self._statistics["n_accepted"] / n if n else float("nan")

    # ---------------------------------------------------------------------------------------- proposals
    def _refill(self) -> None:
        with torch_threads(self.threads):
            x, log_q = self.flow.sample(self.context, self.buffer_size, generator=self._torch_generator,
                                        batch_size=self.buffer_size, progress=False, **self.flow_options)
        x = x.detach().double().cpu().numpy()
        log_q = log_q.detach().double().cpu().numpy()
        report = self.checker(x, rng=self._rng)
        self._buffer = [(report.positions[i], float(log_q[i]), bool(report.valid[i]), bool(report.mirrored[i]),
                         bool(report.relabelled[i])) for i in range(len(x))][::-1]

    def _next_proposal(self):
        if not self._buffer:
            self._refill()
        return self._buffer.pop()

    def _log_q(self, x: np.ndarray) -> float:
        if self._cache is not None and np.array_equal(self._cache[0], x):
            return self._cache[1]
        with torch_threads(self.threads):
            lq = float(self.flow.log_prob(x[None], self.context, batch_size=1, **self.flow_options)[0])
        self._statistics["n_log_prob_evaluations"] += 1
        self._cache = (x.copy(), lq)
        return lq

    # ---------------------------------------------------------------------------------------- the move
    def _check_state(self, thermodynamic_state, context) -> None:
        if thermodynamic_state.pressure is not None:
            raise ValueError("TBGMove cannot be used at constant pressure (the ThermodynamicState has a "
                             "pressure): the flow samples one molecule at constant volume. Create the "
                             "ThermodynamicState without pressure and the System without a barostat.")
        check_system(context.getSystem(), self.encoding.n_atoms, what="ThermodynamicState's System")

    def _check_structure(self, thermodynamic_state, context, x: np.ndarray) -> None:
        """`check_system_structure` once per System (keyed by openmmtools' hash of the standard System)."""
        key = getattr(thermodynamic_state, "_standard_system_hash", None)
        system = context.getSystem()
        if key is None:  # not an openmmtools ThermodynamicState: hash the System itself
            import openmm

            key = hash(openmm.XmlSerializer.serialize(system))
        if key in self._checked_systems:
            return
        labels = [f"{n} {r}" for n, r in zip(self.encoding.atom_names, self.encoding.residue_names)]
        kT = thermodynamic_state.kT.value_in_unit(unit.kilojoule_per_mole)
        check_system_structure(system, self.bonds, kT, positions=x, labels=labels,
                               positions_source="the SamplerState's positions", what="ThermodynamicState's System")
        self._checked_systems.add(key)

    def apply(self, thermodynamic_state, sampler_state, context_cache=None) -> None:
        """Attempt ``n_attempts`` flow proposals with the Metropolis-Hastings test; updates ``sampler_state``.

        Parameters
        ----------
        thermodynamic_state : openmmtools.states.ThermodynamicState
            Its temperature and System define the target ``exp(-u)``.
        sampler_state : openmmtools.states.SamplerState
            Modified in place when a proposal is accepted (velocities are kept).
        context_cache : openmmtools.cache.ContextCache, optional
        """
        x_old = self._current_positions(sampler_state)  # before any OpenMM call sees NaN positions
        context_cache = self._get_context_cache(context_cache)
        context, _ = context_cache.get_context(thermodynamic_state)
        self._check_state(thermodynamic_state, context)
        self._check_structure(thermodynamic_state, context, x_old)
        sampler_state.apply_to_context(context, ignore_velocities=True)
        u_old = thermodynamic_state.reduced_potential(context)
        if not np.isfinite(u_old):
            raise ValueError(f"TBGMove: the current state's reduced potential is {u_old}, so no proposal could "
                             "ever be accepted. Start from a finite-energy (e.g. minimized) structure.")
        centre = x_old.mean(axis=0)
        accepted = False
        for _ in range(self.n_attempts):
            x_new, lq_new, valid, mirrored, relabelled = self._next_proposal()
            self._statistics["n_proposed"] += 1
            self._statistics["n_mirrored"] += int(mirrored)
            self._statistics["n_relabelled"] += int(relabelled)
            if not valid or not np.isfinite(lq_new):
                self._statistics["n_invalid"] += 1
                continue
            lq_old = self._log_q(x_old)
            if lq_old == -np.inf:  # acceptance exactly zero: no energy needed
                self._statistics["n_outside_support"] += 1
                self._warn_outside()
                continue
            x_new = x_new - x_new.mean(axis=0) + centre
            context.setPositions(x_new)
            u_new = thermodynamic_state.reduced_potential(context)
            if not np.isfinite(u_new):
                self._statistics["n_non_finite_energy"] += 1
                continue
            log_acceptance = -u_new + u_old + lq_old - lq_new
            if np.log(self._rng.random()) < log_acceptance:
                self._statistics["n_accepted"] += 1
                x_old, u_old, accepted = x_new, u_new, True
                self._cache = (x_new.copy(), lq_new)
        if accepted:
            sampler_state.positions = unit.Quantity(x_old, unit.nanometer)
        sampler_state.apply_to_context(context, ignore_velocities=True)

    def _warn_outside(self) -> None:
        if self._warned_outside:
            return
        self._warned_outside = True
        warnings.warn("TBGMove: the current state lies outside the flow's support (log q = -inf: for the "
                      "internal-coordinate flow, twin atoms with no canonical labelling or a ring closure on the "
                      "other branch), so no proposal can be accepted from it; only other moves (e.g. MD in a "
                      "SequenceMove) can leave it. Counted in statistics['n_outside_support']; start from an MD "
                      "frame or a flow sample to avoid it.", OutsideSupportWarning, stacklevel=3)

    def _current_positions(self, sampler_state) -> np.ndarray:
        """The sampler state's positions (nm), refusing a wrong atom count or non-finite coordinates."""
        positions = getattr(sampler_state, "positions", None)
        if positions is None:
            raise ValueError("TBGMove: the SamplerState has no positions; create it with "
                             "openmmtools.states.SamplerState(positions).")
        x = to_nm(positions, name="TBGMove: the SamplerState's positions").copy()
        if x.shape != (self.encoding.n_atoms, 3):
            raise ValueError(f"TBGMove: the SamplerState has positions of shape {x.shape}, but the move's peptide "
                             f"has {self.encoding.n_atoms} atoms; use the move with the System it was built for.")
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            raise ValueError(f"TBGMove: the current state has NaN or infinite coordinates ({len(bad)} atoms, e.g. "
                             f"atom {bad[0]}), so its energy is undefined. A preceding move probably blew up: "
                             f"use a smaller MD timestep or minimize the structure before sampling.")
        return x

    # ---------------------------------------------------------------------------------------- copies
    def __deepcopy__(self, memo):
        """A copy that shares the flow (read-only) but has its own RNG streams and proposal buffer."""
        new = self.__class__.__new__(self.__class__)
        mcmc.MCMCMove.__init__(new)
        child = self._seed_seq.spawn(1)[0]
        new._init(self.flow, self.model_path, self.model_sha256, self.encoding, copy.deepcopy(self.bonds),
                  copy.deepcopy(self.flow_options), copy.deepcopy(self.validity_options), self.n_attempts,
                  self.buffer_size, child, self._statistics)
        new.threads = self.threads
        return new

    def __getstate__(self) -> dict:
        """YAML-safe state: checkpoint path + sha256, encoding, bonds, options, statistics (plain types), and the
        seed of a random stream of its own.

        Each call spawns a new child of the move's seed sequence for the state (the move's own generators are
        untouched): openmmtools' ``SequenceMove`` deep-copies its moves through ``__getstate__``/``__setstate__``,
        one copy per replica, and those copies must not share a stream.
        """
        if self.model_path is None or self.model_sha256 is None:
            raise ValueError("This TBGMove's model exists only in memory, so the move cannot be stored (e.g. by "
                             "MultiStateReporter). Save the model with openmm_tbg.save_model(flow, path) and "
                             "build the move (or its sampler) from that path.")
        # The state's stream: fresh 128-bit entropy drawn from a new child, with an empty spawn key, so that the
        # stored key does not grow with every store/restore cycle (it used to gain two entries per cycle).
        stream = self._seed_seq.spawn(1)[0]
        entropy = int.from_bytes(stream.generate_state(4, np.uint32).astype("<u4").tobytes(), "little")
        return {
            "model_path": str(self.model_path),
            "model_sha256": str(self.model_sha256),
            "encoding": encoding_to_dict(self.encoding),
            "bonds": [list(b) for b in self.bonds],
            "device": str(self.flow.device),
            "ode_options": {k: v for k, v in self.flow_options.items()},
            "validity_options": dict(self.validity_options),
            "n_attempts": int(self.n_attempts),
            "buffer_size": int(self.buffer_size),
            "seed": str(entropy),  # a str: the entropy exceeds 64 bits
            "spawn_key": [],
            "statistics": self.statistics,
            "threads": self.threads,
        }

    def __setstate__(self, state: dict) -> None:
        mcmc.MCMCMove.__init__(self)
        path, sha = state["model_path"], state["model_sha256"]
        if not os.path.exists(path):
            raise FileNotFoundError(f"TBGMove: the model checkpoint {path} stored with this move no longer "
                                    f"exists; restore the file (sha256 {sha}) at that path.")
        actual = file_sha256(path)
        if actual != sha:
            raise ValueError(f"TBGMove: the checkpoint {path} has sha256 {actual}, but the move was stored with "
                             f"{sha}: the file changed since. Restore the original checkpoint to continue.")
        device = self._restore_device(state.get("device", "auto"))
        flow = _cached_model(path, sha, device)
        stats = state.get("statistics", {})
        # The stored entropy was drawn for this state alone (older states stored a child's entropy and key).
        # Mixing in how far the chain had gone also keeps states stored before that (whose key was the live
        # move's own) from replaying the stream they had used. The restored key has one entry more than the
        # stored one, and a new state stores an empty key again: bounded.
        seed_seq = np.random.SeedSequence(int(state["seed"]), spawn_key=tuple(state.get("spawn_key", ())) +
                                          (int(stats.get("n_proposed", 0)),))
        self._init(flow, path, sha, encoding_from_dict(state["encoding"]), state["bonds"],
                   dict(state["ode_options"]), dict(state["validity_options"]), int(state["n_attempts"]),
                   int(state["buffer_size"]), seed_seq, stats)
        self.threads = state.get("threads", DEFAULT_TORCH_THREADS)  # states stored before threads existed: 1

    @staticmethod
    def _restore_device(stored: str) -> str:
        """The device the move was built on, or the CPU (with a warning) where that device is missing."""
        import torch

        device = str(resolve_device(stored, check_only=True))
        if device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("TBGMove was stored on %s, which this machine lacks; restoring it on the CPU.", device)
            return "cpu"
        return device
