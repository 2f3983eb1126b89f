"""Boltzmann-generator sampling of a user's peptide System: importance weights or Metropolis chains.

The flow proposes configurations ``x ~ q`` with exact log densities ``log q(x)``; the user's OpenMM System
gives reduced potentials ``u(x) = U(x) / kT``. The importance weight of a valid sample is
``w = exp(-u - log q)``; samples that fail the validity checks (bond graph, chirality; see
:mod:`openmm_tbg.validity`) or whose energy or density is not finite get weight 0 and are counted by reason.

``method="metropolis"`` runs an independence Metropolis-Hastings chain over the proposals, accepting ``x'``
with probability ``min(1, w(x') / w(x))``; its states are exact Boltzmann samples (correlated through repeats).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import openmm
from openmm import unit

from .energy import ReducedPotential, to_kelvin
from .validity import REJECTION_REASONS, ValidityChecker

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


def ode_options(ode_method: str, atol: Optional[float], rtol: Optional[float], step_size: Optional[float],
                divergence: str, quadrature_nodes: Optional[int]) -> dict:
    """Keyword arguments of `TransferableFlow.sample` / ``log_prob``; None tolerances get `default_tolerance`."""
    tol = default_tolerance(quadrature_nodes)
    return {"method": ode_method, "atol": float(tol if atol is None else atol),
            "rtol": float(tol if rtol is None else rtol), "step_size": step_size, "divergence": divergence,
            "quadrature_nodes": quadrature_nodes}

logger = logging.getLogger(__name__)

__all__ = ["BoltzmannGeneratorSampler", "SampleResult", "check_system", "kish_ess", "configure_parser",
           "run_from_cli"]

#: All reasons a proposal can be rejected, in the order they are checked.
ALL_REJECTION_REASONS = REJECTION_REASONS + ("non_finite_log_q", "non_finite_energy")
METHODS = ("importance", "metropolis", "none")


# --------------------------------------------------------------------------------------------------------------
# Input checks shared with moves.py
def check_system(system: openmm.System, n_atoms: Optional[int] = None, *, what: str = "System") -> None:
    """Refuse Systems the flow cannot sample, with a message naming the cause and the fix.

    Parameters
    ----------
    system : openmm.System
    n_atoms : int, optional
        Number of atoms in the Topology; the System must have as many particles.
    what : str
        How to call the System in messages.

    Raises
    ------
    TypeError, ValueError
    """
    if not isinstance(system, openmm.System):
        raise TypeError(f"The {what} must be an openmm.System, got {type(system).__name__}; create it with "
                        f"openmm.app.ForceField.createSystem(topology, ...) or openmm_tbg.build_peptide().")
    barostats = [f.__class__.__name__ for f in system.getForces() if "Barostat" in f.__class__.__name__]
    if barostats:
        raise ValueError(f"The {what} contains {', '.join(barostats)} (constant pressure). The flow samples a "
                         f"single molecule at constant volume in implicit solvent; remove the barostat.")
    if system.usesPeriodicBoundaryConditions():
        raise ValueError(f"The {what} uses periodic boundary conditions. The flow samples a single molecule in "
                         f"vacuum or implicit solvent; create the System with nonbondedMethod=NoCutoff or "
                         f"CutoffNonPeriodic (e.g. openmm_tbg.peptides.create_system).")
    if system.getNumConstraints() > 0:
        raise ValueError(f"The {what} has {system.getNumConstraints()} constraints, but the flow samples all "
                         f"bond lengths freely, so constrained Boltzmann weights would be wrong. Create it with "
                         f"constraints=None and rigidWater=False.")
    virtual = [i for i in range(system.getNumParticles()) if system.isVirtualSite(i)]
    if virtual:
        raise ValueError(f"The {what} has {len(virtual)} virtual site(s) (e.g. particle {virtual[0]}); the flow "
                         f"only places real atoms. Use a force field without virtual sites (e.g. amber14-all "
                         f"with implicit solvent).")
    if n_atoms is not None and system.getNumParticles() != n_atoms:
        raise ValueError(f"The {what} has {system.getNumParticles()} particles but the Topology has {n_atoms} "
                         f"atoms; create the System from the same Topology (ForceField.createSystem(topology)).")


def check_positions(positions, n_atoms: int, *, what: str = "positions") -> np.ndarray:
    """Return positions as a float64 array (n_atoms, 3) or (n, n_atoms, 3) in nm, refusing NaN and bad shapes."""
    if unit.is_quantity(positions):
        if not positions.unit.is_compatible(unit.nanometer):
            raise TypeError(f"{what} have units of {positions.unit}, not lengths; pass nm or a length Quantity.")
        positions = positions.value_in_unit(unit.nanometer)
    x = np.asarray(positions, dtype=np.float64)
    if x.shape[-2:] != (n_atoms, 3) or x.ndim not in (2, 3):
        raise ValueError(f"{what} must have shape ({n_atoms}, 3) or (n, {n_atoms}, 3) in nm, got {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values; pass finite coordinates (e.g. from a PDB file "
                         f"or a minimized structure).")
    return x


def kish_ess(log_weights: np.ndarray) -> float:
    """Kish effective sample size as a fraction of all samples, ``(sum w)^2 / (n sum w^2)``.

    ``-inf`` log weights (rejected samples) count as zero weight but still count in ``n``.
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.size == 0 or not np.isfinite(lw).any():
        return 0.0
    w = np.exp(lw - lw[np.isfinite(lw)].max())
    return float(w.sum() ** 2 / (lw.size * np.sum(w ** 2)))


def _normalise(log_w: np.ndarray) -> np.ndarray:
    out = np.full(log_w.shape, -np.inf)
    ok = np.isfinite(log_w)
    if ok.any():
        m = log_w[ok].max()
        out[ok] = log_w[ok] - (m + np.log(np.sum(np.exp(log_w[ok] - m))))
    return out


def _resolve_device(device) -> "torch.device":
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model(model, device) -> tuple["TransferableFlow", Optional[str], Optional[str]]:
    """Return (flow, checkpoint path or None, sha256 or None) for ``model`` = None, a path or a flow."""
    from .flow import TransferableFlow

    if isinstance(model, TransferableFlow):
        path = getattr(model, "checkpoint_path", None)
        sha = getattr(model, "checkpoint_sha256", None)
        return model.to(device), path, sha
    if model is None or isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_model

        flow = load_model(None if model is None else os.fspath(model), device=str(device))
        # load_model records where the weights came from; TBGMove stores that to reload them.
        path = getattr(flow, "checkpoint_path", None)
        if path is None and model is not None:
            path = os.path.abspath(os.fspath(model))
        sha = getattr(flow, "checkpoint_sha256", None)
        if sha is None and path is not None and os.path.exists(path):
            sha = file_sha256(path)
        return flow, path, sha
    raise TypeError(f"model must be None (the shipped pretrained model), a checkpoint path or a TransferableFlow, "
                    f"got {type(model).__name__}.")


# --------------------------------------------------------------------------------------------------------------
def _topology_to_dict(topology) -> dict:
    atoms, residues = [], []
    for res in topology.residues():
        residues.append({"name": res.name, "id": res.id, "chain": res.chain.id})
    for atom in topology.atoms():
        atoms.append({"name": atom.name, "element": atom.element.symbol if atom.element is not None else None,
                      "residue": atom.residue.index})
    bonds = [[b[0].index, b[1].index] for b in topology.bonds()]
    return {"residues": residues, "atoms": atoms, "bonds": bonds}


def _topology_from_dict(d: dict):
    from openmm.app import Element, Topology

    top = Topology()
    chains, residues, atoms = {}, [], []
    for r in d["residues"]:
        if r["chain"] not in chains:
            chains[r["chain"]] = top.addChain(r["chain"])
        residues.append(top.addResidue(r["name"], chains[r["chain"]], r["id"]))
    for a in d["atoms"]:
        element = Element.getBySymbol(a["element"]) if a["element"] else None
        atoms.append(top.addAtom(a["name"], element, residues[a["residue"]]))
    for i, j in d["bonds"]:
        top.addBond(atoms[i], atoms[j])
    return top


@dataclass
class SampleResult:
    """Samples of a Boltzmann generator with weights, energies and validity bookkeeping.

    Attributes
    ----------
    positions : numpy.ndarray
        float64 (n, n_atoms, 3), nm. ``method="importance"``/``"none"``: every proposal (relabelled/mirrored
        where that made it valid). ``"metropolis"``: the chain's states, one per proposal considered.
    log_weights : numpy.ndarray
        (n,) normalised log weights (logsumexp 0); ``-inf`` for rejected samples. Uniform for a chain.
    reduced_potentials : numpy.ndarray
        (n,) ``u = U/kT``; NaN where a sample was rejected before its energy was evaluated, +inf for
        non-finite energies.
    log_q : numpy.ndarray
        (n,) flow log density (nm, centre-of-geometry-free subspace).
    valid : numpy.ndarray
        (n,) bool.
    reasons : numpy.ndarray
        (n,) str, ``""`` for valid samples, otherwise the rejection reason.
    rejections : dict
        Count of rejected proposals per reason (over all proposals; sums with the valid count to
        ``n_proposals``).
    n_proposals : int
        Number of flow samples drawn.
    n_mirrored, n_relabelled : int
        Proposals that were mirrored / had interchangeable atoms relabelled.
    ess : float
        Kish effective sample size of the proposals' importance weights as a fraction of ``n_proposals``
        (rejected ones count as weight 0).
    acceptance_rate : float or None
        Fraction of proposals accepted by the Metropolis chain.
    method : str
        ``"importance"``, ``"metropolis"``, ``"none"`` or ``"resampled"``.
    temperature : float
        Kelvin.
    topology : openmm.app.Topology
    proposal_index : numpy.ndarray
        (n,) int: index of the proposal each configuration is (-1: a user-given initial state).
    """

    positions: np.ndarray
    log_weights: np.ndarray
    reduced_potentials: np.ndarray
    log_q: np.ndarray
    valid: np.ndarray
    reasons: np.ndarray
    rejections: dict
    n_proposals: int
    n_mirrored: int
    n_relabelled: int
    ess: float
    acceptance_rate: Optional[float]
    method: str
    temperature: float
    topology: object
    proposal_index: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def n_valid(self) -> int:
        """Number of valid proposals."""
        return int(self.n_proposals - sum(self.rejections.values()))

    @property
    def counts(self) -> dict:
        """Proposal counts: ``n``, ``valid``, one entry per rejection reason, ``mirrored``, ``relabelled``."""
        return {"n": self.n_proposals, "valid": self.n_valid, **self.rejections, "mirrored": self.n_mirrored,
                "relabelled": self.n_relabelled}

    @property
    def weights(self) -> np.ndarray:
        """Normalised weights ``exp(log_weights)`` (sum 1)."""
        return np.exp(self.log_weights)

    def expectation(self, values) -> float:
        """Weighted average of per-sample ``values`` (rejected samples, weight 0, are ignored)."""
        values = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(self.log_weights)
        return float(np.sum(np.exp(self.log_weights[ok]) * values[ok]))

    def to_mdtraj(self, valid_only: bool = False):
        """The configurations as an ``mdtraj.Trajectory`` (weights are not part of it; see `resample`).

        Parameters
        ----------
        valid_only : bool
            Keep only valid configurations.
        """
        import mdtraj

        x = self.positions[self.valid] if valid_only else self.positions
        return mdtraj.Trajectory(x.astype(np.float32), mdtraj.Topology.from_openmm(self.topology))

    def resample(self, k: int, seed=None) -> "SampleResult":
        """Draw ``k`` configurations with replacement, with probabilities equal to the weights.

        Parameters
        ----------
        k : int
            Number of configurations.
        seed : int or numpy.random.Generator, optional

        Returns
        -------
        SampleResult
            ``method="resampled"``, uniform weights, ``proposal_index`` pointing to the original proposals.
        """
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        ok = np.isfinite(self.log_weights)
        if not ok.any():
            raise RuntimeError(f"Cannot resample: none of the {self.n_proposals} samples is valid "
                               f"(rejections: {self.rejections}). Draw more samples or check the model.")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        p = np.exp(self.log_weights[ok] - np.max(self.log_weights[ok]))
        idx = np.flatnonzero(ok)[rng.choice(ok.sum(), size=int(k), replace=True, p=p / p.sum())]
        return SampleResult(
            positions=self.positions[idx], log_weights=np.full(int(k), -np.log(k)),
            reduced_potentials=self.reduced_potentials[idx], log_q=self.log_q[idx],
            valid=np.ones(int(k), dtype=bool), reasons=np.full(int(k), "", dtype=object),
            rejections=dict(self.rejections), n_proposals=self.n_proposals, n_mirrored=self.n_mirrored,
            n_relabelled=self.n_relabelled, ess=self.ess, acceptance_rate=self.acceptance_rate,
            method="resampled", temperature=self.temperature, topology=self.topology,
            proposal_index=self.proposal_index[idx])

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the result to a ``.npz`` file (read back with `SampleResult.load`)."""
        meta = {"rejections": self.rejections, "n_proposals": self.n_proposals, "n_mirrored": self.n_mirrored,
                "n_relabelled": self.n_relabelled, "ess": self.ess, "acceptance_rate": self.acceptance_rate,
                "method": self.method, "temperature": self.temperature,
                "topology": _topology_to_dict(self.topology), "format": "openmm_tbg.SampleResult",
                "format_version": 1}
        with open(path, "wb") as fh:
            np.savez_compressed(fh, positions=self.positions, log_weights=self.log_weights,
                                reduced_potentials=self.reduced_potentials, log_q=self.log_q, valid=self.valid,
                                reasons=self.reasons.astype(str), proposal_index=self.proposal_index,
                                metadata=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SampleResult":
        """Read a result written by `save`."""
        with np.load(path, allow_pickle=False) as z:
            if "metadata" not in z.files:
                raise ValueError(f"{path} is not an openmm_tbg SampleResult file (no metadata); write one with "
                                 f"SampleResult.save().")
            meta = json.loads(str(z["metadata"]))
            arrays = {k: z[k] for k in z.files if k != "metadata"}
        if meta.get("format") != "openmm_tbg.SampleResult":
            raise ValueError(f"{path} is not an openmm_tbg SampleResult file.")
        return cls(positions=arrays["positions"], log_weights=arrays["log_weights"],
                   reduced_potentials=arrays["reduced_potentials"], log_q=arrays["log_q"],
                   valid=arrays["valid"].astype(bool), reasons=arrays["reasons"].astype(object),
                   rejections={k: int(v) for k, v in meta["rejections"].items()},
                   n_proposals=int(meta["n_proposals"]), n_mirrored=int(meta["n_mirrored"]),
                   n_relabelled=int(meta["n_relabelled"]), ess=float(meta["ess"]),
                   acceptance_rate=meta["acceptance_rate"], method=meta["method"],
                   temperature=float(meta["temperature"]), topology=_topology_from_dict(meta["topology"]),
                   proposal_index=arrays["proposal_index"])

    def summary(self) -> str:
        """One line: method, valid fraction, ESS, acceptance."""
        text = (f"{self.method}: {self.n_valid}/{self.n_proposals} valid proposals "
                f"({100.0 * self.n_valid / max(1, self.n_proposals):.1f} %), ESS {100.0 * self.ess:.2f} %")
        rejected = {k: v for k, v in self.rejections.items() if v}
        if rejected:
            text += f", rejected {rejected}"
        if self.n_mirrored or self.n_relabelled:
            text += f", mirrored {self.n_mirrored}, relabelled {self.n_relabelled}"
        if self.acceptance_rate is not None:
            text += f", acceptance {100.0 * self.acceptance_rate:.1f} %"
        return text


# --------------------------------------------------------------------------------------------------------------
class BoltzmannGeneratorSampler:
    """Sample the Boltzmann distribution of a peptide System with a transferable flow.

    Parameters
    ----------
    system : openmm.System
        The target Hamiltonian: non-periodic, no constraints, no virtual sites, no barostat.
    topology : openmm.app.Topology
        The peptide (a zwitterionic chain of standard amino acids, unless ``encoding`` is given).
    model : None, str, path or TransferableFlow
        None loads the shipped pretrained model; a path loads that checkpoint; a flow is used as is (moved to
        ``device``).
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
    ode_method, atol, rtol, step_size, divergence
        Integration options of `TransferableFlow.sample` (TBG: dopri5, atol = rtol = 1e-4, exact divergence).
        ``atol``/``rtol`` None: 1e-5 with ``quadrature_nodes`` (a positions-only solve, where the tighter
        tolerance is nearly free), 1e-4 without (TBG); see `default_tolerance`.
    quadrature_nodes : int or None
        Exact divergence at this many Gauss-Legendre nodes in t instead of at every solver stage (fast path,
        see `TransferableFlow.sample`); None integrates it with the solver (TBG's way).
    platform, n_workers
        OpenMM platform and energy workers (see `ReducedPotential`).
    check_bonds, check_chirality : bool
        Validity checks (see `ValidityChecker`); switch off only for toy systems.
    bond_factor : float
        Bond cutoff = ``bond_factor`` x sum of covalent radii.

    Examples
    --------
    >>> pep = build_peptide("AA")                                              # doctest: +SKIP
    >>> sampler = BoltzmannGeneratorSampler(pep.system, pep.topology)          # doctest: +SKIP
    >>> result = sampler.sample(1000)                                          # doctest: +SKIP
    >>> result.ess, result.counts                                              # doctest: +SKIP
    """

    def __init__(self, system: openmm.System, topology, model=None, temperature=310 * unit.kelvin,
                 device="auto", batch_size: int = 256, seed: Optional[int] = None, encoding=None, *,
                 positions=None, ode_method: str = "dopri5", atol: Optional[float] = None,
                 rtol: Optional[float] = None,
                 step_size: Optional[float] = None, divergence: str = "exact",
                 quadrature_nodes: Optional[int] = DEFAULT_QUADRATURE_NODES, platform=None,
                 n_workers: Optional[int] = None, check_bonds: bool = True, check_chirality: bool = True,
                 bond_factor: float = 1.3):
        import torch

        from .encoding import AtomEncoding, encode_topology

        self.temperature = to_kelvin(temperature)
        n_atoms = topology.getNumAtoms()
        check_system(system, n_atoms)
        if positions is not None:
            positions = check_positions(positions, n_atoms, what="positions")
            if positions.ndim != 2:
                raise ValueError(f"positions must be one structure ({n_atoms}, 3), got {positions.shape}.")
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
        self.system = system
        self.topology = topology
        self.encoding = encoding
        self.batch_size = int(batch_size)
        self.device = _resolve_device(device)
        self.flow, self.model_path, self.model_sha256 = resolve_model(model, self.device)
        self.flow.eval()
        self.tokens = torch.as_tensor(encoding.tokens, dtype=torch.long)
        self.ode_options = ode_options(ode_method, atol, rtol, step_size, divergence, quadrature_nodes)
        self.validity_options = {"check_bonds": bool(check_bonds), "check_chirality": bool(check_chirality),
                                 "bond_factor": float(bond_factor)}
        self.checker = ValidityChecker(topology, encoding, reference_positions=positions, **self.validity_options)
        self.reduced_potential = ReducedPotential(system, self.temperature, platform=platform,
                                                  n_workers=n_workers)
        seq = np.random.SeedSequence(seed)
        torch_seed, np_seed = seq.spawn(2)
        self.seed_sequence = seq
        self._torch_generator = torch.Generator().manual_seed(int(torch_seed.generate_state(1, np.uint64)[0] >> 1))
        self._rng = np.random.default_rng(np_seed)
        logger.info("BoltzmannGeneratorSampler: %d atoms, T = %.1f K, flow on %s, model %s", n_atoms,
                    self.temperature, self.device, self.model_path or "(in memory)")

    @property
    def kT(self) -> float:
        """Thermal energy in kJ/mol."""
        return self.reduced_potential.kT

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
        with tqdm(total=n, disable=not progress, desc="BG samples", unit="sample") as bar:
            done = 0
            while done < n:
                m = min(self.batch_size, n - done)
                x, log_q = self.flow.sample(self.tokens, m, generator=self._torch_generator, batch_size=m,
                                            progress=False, **self.ode_options)
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
        lq = self.flow.log_prob(x, self.tokens, batch_size=self.batch_size, **self.ode_options)
        return lq.detach().double().cpu().numpy()

    def sample(self, n: int, method: str = "importance", progress: bool = True,
               initial_positions=None) -> SampleResult:
        """Draw ``n`` flow samples and weight them (importance), chain them (metropolis) or not (none).

        Parameters
        ----------
        n : int
            Number of flow proposals.
        method : {"importance", "metropolis", "none"}
            ``"importance"``: weights ``exp(-u - log q)``; ``"metropolis"``: independence Metropolis-Hastings
            chain over the proposals (exact Boltzmann states); ``"none"``: raw flow samples, uniform weights
            over valid ones.
        progress : bool
            Show a tqdm progress bar.
        initial_positions : Quantity or array, optional
            (n_atoms, 3) nm: the chain's starting state (metropolis only). Default: the first valid proposal.

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
        common = dict(rejections=rejections, n_proposals=n, n_mirrored=int(p["mirrored"].sum()),
                      n_relabelled=int(p["relabelled"].sum()), ess=ess, temperature=self.temperature,
                      topology=self.topology)
        if not valid.any():
            logger.warning("None of the %d flow samples is valid (rejections: %s).", n, rejections)
        if method in ("importance", "none"):
            lw = _normalise(log_w) if method == "importance" else np.where(valid, -np.log(max(1, valid.sum())),
                                                                            -np.inf)
            result = SampleResult(positions=p["positions"], log_weights=lw, reduced_potentials=p["u"],
                                  log_q=p["log_q"], valid=valid, reasons=p["reasons"], acceptance_rate=None,
                                  method=method, proposal_index=np.arange(n), **common)
        else:
            result = self._metropolis(p, log_w, x0, common)
        logger.info("%s", result.summary())
        return result

    def _metropolis(self, p: dict, log_w: np.ndarray, x0: Optional[np.ndarray], common: dict) -> SampleResult:
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
        index, n_accepted, n_considered = [], 0, 0
        log_uniform = np.log(self._rng.random(n))
        first = True
        for i in range(start, n):
            if x0 is None and first:
                first = False  # the chain's first state is proposal `start` itself
            else:
                n_considered += 1
                if np.isfinite(log_w[i]) and log_uniform[i] < log_w[i] - lw_cur:
                    cur, lw_cur = i, log_w[i]
                    n_accepted += 1
            index.append(cur)
        index = np.asarray(index, dtype=np.int64)
        states = np.where(index >= 0, index, 0)
        user = index < 0
        positions = p["positions"][states].copy()
        u = p["u"][states].copy()
        lq = p["log_q"][states].copy()
        if user.any():  # states before the first accepted proposal are the user's initial state
            positions[user], u[user], lq[user] = x_cur, u_cur, lq_cur
        m = len(index)
        rate = n_accepted / n_considered if n_considered else float("nan")
        return SampleResult(positions=positions, log_weights=np.full(m, -np.log(m)), reduced_potentials=u,
                            log_q=lq, valid=np.ones(m, dtype=bool), reasons=np.full(m, "", dtype=object),
                            acceptance_rate=rate, method="metropolis", proposal_index=index, **common)

    def close(self) -> None:
        """Release energy worker processes."""
        self.reduced_potential.close()


# --------------------------------------------------------------------------------------------------------------
# `openmm-tbg sample`
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``openmm-tbg sample``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--sequence", help="one-letter sequence of a zwitterionic peptide, e.g. AA (built with the "
                                        "data set's force field: amber14-all + implicit/obc1)")
    src.add_argument("--pdb", help="PDB file of the peptide (System from amber14-all + implicit/obc1)")
    parser.add_argument("--model", default=None, help="checkpoint path (default: the shipped model)")
    parser.add_argument("--samples", type=int, default=1000, help="number of flow samples (default 1000)")
    parser.add_argument("--method", choices=METHODS, default="importance")
    parser.add_argument("--temperature", type=float, default=310.0, help="kelvin (default 310)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="samples.npz", help="SampleResult .npz (default samples.npz)")
    parser.add_argument("--resample", type=int, default=0,
                        help="also write this many reweighted frames to OUTPUT with .pdb/.dcd suffixes")
    add_ode_arguments(parser)


def add_ode_arguments(parser: argparse.ArgumentParser) -> None:
    """ODE options of the flow shared by the ``sample`` and ``evaluate`` commands."""
    group = parser.add_argument_group("flow integration")
    group.add_argument("--ode-method", default="dopri5", help="torchdiffeq method (default dopri5)")
    group.add_argument("--atol", type=float, default=None,
                       help="absolute tolerance (default 1e-5 with quadrature nodes, 1e-4 without)")
    group.add_argument("--rtol", type=float, default=None,
                       help="relative tolerance (default 1e-5 with quadrature nodes, 1e-4 without)")
    group.add_argument("--step-size", type=float, default=None, help="step of fixed-step methods")
    group.add_argument("--quadrature-nodes", type=int, default=DEFAULT_QUADRATURE_NODES or 0,
                       help="exact divergence at K Gauss-Legendre nodes; 0 = at every solver stage "
                            f"(default {DEFAULT_QUADRATURE_NODES or 0})")


def ode_kwargs(args: argparse.Namespace) -> dict:
    """`BoltzmannGeneratorSampler` keyword arguments from :func:`add_ode_arguments` options."""
    return {"ode_method": args.ode_method, "atol": args.atol, "rtol": args.rtol, "step_size": args.step_size,
            "quadrature_nodes": args.quadrature_nodes or None}


def run_from_cli(args: argparse.Namespace) -> int:
    """Run ``openmm-tbg sample``; returns the exit status."""
    from .peptides import build_peptide, create_system

    if args.sequence:
        pep = build_peptide(args.sequence)
        system, topology, positions = pep.system, pep.topology, pep.positions
    else:
        from openmm.app import PDBFile

        pdb = PDBFile(args.pdb)
        system, topology, positions = create_system(pdb.topology), pdb.topology, pdb.positions
    sampler = BoltzmannGeneratorSampler(system, topology, model=args.model, temperature=args.temperature,
                                        device=args.device, batch_size=args.batch_size, seed=args.seed,
                                        positions=positions, **ode_kwargs(args))
    result = sampler.sample(args.samples, method=args.method)
    result.save(args.output)
    print(result.summary())
    if args.resample:
        base = os.path.splitext(args.output)[0]
        traj = result.resample(args.resample, seed=args.seed).to_mdtraj()
        traj[0].save_pdb(base + ".pdb")
        traj.save_dcd(base + ".dcd")
        print(f"wrote {base}.pdb and {base}.dcd ({args.resample} reweighted frames)")
    sampler.close()
    return 0
