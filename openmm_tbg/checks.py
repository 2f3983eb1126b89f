"""Input checks shared by the sampler and `TBGMove`: Systems and positions the flows cannot sample exactly.

Two kinds: `check_system` refuses what no flow can sample (barostats, periodic boxes, constraints, virtual
sites, a wrong particle count) from the System alone; `check_system_structure` evaluates a few energies to
refuse Systems that do not describe the Topology's molecule (bond terms in another atom order, absurd energies)
or whose energy depends on absolute position or orientation. `HamiltonianComparison` measures, on the flow's own
samples, how far the user's System is from the Hamiltonian the model was trained on.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import openmm

from .utils import to_nm

logger = logging.getLogger(__name__)

__all__ = ["check_system", "check_positions", "as_frames", "check_system_structure", "check_bonded_terms",
           "check_energy_and_invariance", "SystemCheckReport", "TemperatureUnitWarning",
           "warn_plain_low_temperature", "MAX_ENERGY_PER_ATOM_KT", "LOW_TEMPERATURE_K"]


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


def as_frames(positions, n_atoms: int, *, what: str = "positions", hint: str = "") -> np.ndarray:
    """Positions as a float64 array (n_frames, n_atoms, 3) in nm; one structure (n_atoms, 3) becomes one frame.

    Non-finite coordinates are kept: the callers (energies, validity checks) count them per frame.

    Parameters
    ----------
    positions : array_like or openmm.unit.Quantity
        ``(n_frames, n_atoms, 3)`` or ``(n_atoms, 3)``; nm if unitless.
    n_atoms : int
        Atoms of the molecule.
    what : str
        How to call the positions in messages.
    hint : str
        Appended to the shape error (e.g. where the atom count comes from).

    Raises
    ------
    TypeError
        A Quantity that is not a length.
    ValueError
        A wrong shape.
    """
    x = to_nm(positions, name=what)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1:] != (n_atoms, 3):
        raise ValueError(f"{what} must have shape (n_frames, {n_atoms}, 3) or ({n_atoms}, 3) in nm, got "
                         f"{x.shape}.{hint}")
    return x


def check_positions(positions, n_atoms: int, *, what: str = "positions") -> np.ndarray:
    """Return positions as a float64 array (n_atoms, 3) or (n, n_atoms, 3) in nm, refusing NaN and bad shapes.

    Unlike `as_frames`, one structure keeps its shape and non-finite coordinates are refused.

    Parameters
    ----------
    positions, n_atoms, what
        As for `as_frames`.

    Raises
    ------
    TypeError, ValueError
        As for `as_frames`; ValueError also for NaN or infinite coordinates.
    """
    x = to_nm(positions, name=what)
    if x.shape[-2:] != (n_atoms, 3) or x.ndim not in (2, 3):
        raise ValueError(f"{what} must have shape ({n_atoms}, 3) or (n, {n_atoms}, 3) in nm, got {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values; pass finite coordinates (e.g. from a PDB file "
                         f"or a minimized structure).")
    return x



# ==============================================================================================================
# Structure checks: is the System one the flow can represent?
# ==============================================================================================================
#: A plain-number temperature below this (kelvin) is probably a Celsius value; it is read as kelvin with a warning.
LOW_TEMPERATURE_K = 200.0
#: Refuse a reference structure whose energy exceeds this many kT per atom: no thermal structure comes close
#: (alanine dipeptide's extended starting structure: -0.9 kT per atom), while a System whose particles are in
#: another order than the Topology's gives ~10^4 kT per atom there.
MAX_ENERGY_PER_ATOM_KT = 1000.0
#: Rigid-motion invariance tolerance: ``|dU| <= atol + rtol * scale`` (kT; scale = the summed magnitude of the
#: per-force energies), by the platform's precision (Reference: double, else single/mixed).
INVARIANCE_TOLERANCE = {"Reference": (1e-6, 1e-9), "other": (1e-2, 1e-5)}
#: Forces whose energy can depend on absolute positions, named in the invariance error.
_POSITION_DEPENDENT_FORCES = ("CustomExternalForce", "CustomCompoundBondForce", "CustomCentroidBondForce",
                              "CustomCVForce", "CustomManyParticleForce", "RMSDForce", "ATMForce")


class TemperatureUnitWarning(UserWarning):
    """A temperature was given as a plain number low enough to be a Celsius value; it is read as kelvin."""


def warn_plain_low_temperature(temperature, *, name: str = "temperature", stacklevel: int = 3) -> None:
    """Warn (`TemperatureUnitWarning`) when ``temperature`` is a plain number in [1, 200) K: ``37`` is 37 K.

    Quantities and values outside 1-2000 K (refused by `openmm_tbg.energy.to_kelvin`) do not warn.
    """
    from openmm import unit

    if unit.is_quantity(temperature) or isinstance(temperature, bool):
        return
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        return
    if 1.0 <= value < LOW_TEMPERATURE_K:
        warnings.warn(f"{name}={temperature!r} is a plain number and is read as {value:g} kelvin. If you meant "
                      f"{value:g} degrees Celsius, pass {value + 273.15:g} (kelvin) or "
                      f"{value + 273.15:g}*openmm.unit.kelvin; pass a Quantity to silence this warning.",
                      TemperatureUnitWarning, stacklevel=stacklevel)


@dataclass
class SystemCheckReport:
    """What the structure checks of a System verified, and what they could not check (and why).

    Attributes
    ----------
    checked : list of str
        One line per check that ran and passed.
    not_checked : list of str
        One line per check that could not run, with the reason.
    """

    checked: list = field(default_factory=list)
    not_checked: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"checked: {c}" for c in self.checked] + [f"not checked: {c}" for c in self.not_checked]
        return "\n".join(lines) or "no checks"


def _atom_label(labels: Optional[Sequence[str]], i: int) -> str:
    return f"{i} ({labels[i]})" if labels is not None else str(i)


def topology_atom_labels(topology) -> list[str]:
    """``"NAME RESNAME RESID"`` per atom of an openmm.app.Topology, for messages."""
    return [f"{a.name} {a.residue.name}{a.residue.id}" for a in topology.atoms()]


def _bonded_pairs(system: openmm.System) -> tuple[set, list[str]]:
    """Pairs held by bond terms (HarmonicBondForce, CustomBondForce) or constraints, and the forces read."""
    pairs, sources = set(), []
    for force in system.getForces():
        if isinstance(force, (openmm.HarmonicBondForce, openmm.CustomBondForce)) and force.getNumBonds():
            sources.append(type(force).__name__)
            for k in range(force.getNumBonds()):
                i, j = force.getBondParameters(k)[:2]
                pairs.add(frozenset((int(i), int(j))))
    if system.getNumConstraints():
        sources.append("constraints")
        for k in range(system.getNumConstraints()):
            i, j, _ = system.getConstraintParameters(k)
            pairs.add(frozenset((int(i), int(j))))
    return pairs, sources


def check_bonded_terms(system: openmm.System, bonds: Sequence[tuple[int, int]], report: SystemCheckReport, *,
                       labels: Optional[Sequence[str]] = None, what: str = "System") -> None:
    """Refuse a System whose bond terms do not hold the Topology's bonds (e.g. its particles are in another order).

    Every Topology bond must be a pair of a HarmonicBondForce or CustomBondForce term (or a constraint). Extra
    pairs are allowed (Urey-Bradley 1-3 terms, distance restraints) and only reported. A System without bond
    terms is not checked (recorded in ``report.not_checked``).

    Parameters
    ----------
    system : openmm.System
    bonds : sequence of (int, int)
        The Topology's bonds, as atom indices.
    report : SystemCheckReport
        Receives what was checked.
    labels : sequence of str, optional
        Per-atom labels for messages (`topology_atom_labels`).
    what : str
        How to call the System in messages.

    Raises
    ------
    ValueError
        A Topology bond has no bond term in the System.
    """
    topology_pairs = {frozenset((int(i), int(j))) for i, j in bonds}
    held, sources = _bonded_pairs(system)
    if not topology_pairs:
        report.not_checked.append("bond terms against the Topology: the Topology has no bonds")
        return
    if not held:
        report.not_checked.append("bond terms against the Topology: the System has no HarmonicBondForce, "
                                  "CustomBondForce or constraints")
        return
    missing = sorted(tuple(sorted(p)) for p in topology_pairs - held)
    if missing:
        i, j = missing[0]
        extra = sorted(tuple(sorted(p)) for p in held - topology_pairs)
        example = ""
        if extra:
            a, b = extra[0]
            example = (f", while it bonds e.g. atoms {_atom_label(labels, a)} and {_atom_label(labels, b)}, "
                       f"which the Topology does not bond")
        raise ValueError(
            f"{len(missing)} of the Topology's {len(topology_pairs)} bonds have no bond term in the {what} "
            f"({', '.join(sorted(set(sources)))}): e.g. atoms {_atom_label(labels, i)} and "
            f"{_atom_label(labels, j)}{example}. The {what}'s particles are probably in another order than the "
            f"Topology's atoms (or it was built for another molecule), so its energies would belong to a "
            f"different structure. Create the System from this Topology (ForceField.createSystem(topology) or "
            f"openmm_tbg.peptides.create_system(topology)), or pass the Topology the System was created from.")
    # Pairs two bonds apart (Urey-Bradley terms) are expected; others are restraints the user added.
    neighbours: dict[int, set] = {}
    for p in topology_pairs:
        i, j = tuple(p)
        neighbours.setdefault(i, set()).add(j)
        neighbours.setdefault(j, set()).add(i)
    extra = held - topology_pairs
    far = [p for p in extra if not (neighbours.get(min(p), set()) & neighbours.get(max(p), set()))]
    line = (f"bond terms: all {len(topology_pairs)} Topology bonds have a term in the {what} "
            f"({', '.join(sorted(set(sources)))})")
    if extra:
        line += (f"; {len(extra)} further pair(s), {len(far)} of them more than two bonds apart "
                 f"(restraints?)")
    report.checked.append(line)


def _energy_context(system: openmm.System, platform=None):
    """An OpenMM Context for energies: Reference (double precision) where it can run the System, else
    ``platform`` (None: the fastest). Returns (context, integrator, platform name)."""
    from .utils import select_platform

    integrator = openmm.VerletIntegrator(0.001)
    try:
        context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    except openmm.OpenMMException:
        integrator = openmm.VerletIntegrator(0.001)
        context = openmm.Context(system, integrator, select_platform(platform))
    return context, integrator, context.getPlatform().getName()


def _energy(context, x: np.ndarray) -> float:
    from openmm import unit

    try:
        context.setPositions(x)
        return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    except openmm.OpenMMException:
        return float("nan")


def _per_force_energies(system: openmm.System, positions: Sequence[np.ndarray], platform=None) -> list:
    """Per force (type name, [energy at each configuration]) of a copy with one force group per force."""
    from openmm import unit

    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    n = min(copy.getNumForces(), 32)
    for k in range(copy.getNumForces()):
        copy.getForce(k).setForceGroup(min(k, 31))
    context, integrator, _ = _energy_context(copy, platform)
    out = []
    for k in range(n):
        values = []
        for x in positions:
            context.setPositions(x)
            state = context.getState(getEnergy=True, groups={k})
            values.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        out.append((type(copy.getForce(k)).__name__, values))
    del context, integrator
    return out


def rigid_motions(x: np.ndarray, n: int = 2, seed: int = 0) -> list[np.ndarray]:
    """``n`` copies of ``x`` (nm) rotated about its centroid and translated by 1-3 nm, with a fixed seed."""
    rng = np.random.default_rng(seed)
    centre = x.mean(axis=0)
    out = []
    for _ in range(n):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        shift = rng.normal(size=3)
        shift *= rng.uniform(1.0, 3.0) / np.linalg.norm(shift)
        out.append((x - centre) @ q.T + centre + shift)
    return out


def synthetic_configuration(n_atoms: int, bonds: Sequence[tuple[int, int]], seed: int = 0) -> np.ndarray:
    """A configuration (nm) with bonded atoms 0.12 nm apart along the bond graph, for toy molecules that have
    no reference structure: only meant for the rigid-motion test, not for energies."""
    rng = np.random.default_rng(seed)
    neighbours: dict[int, list] = {i: [] for i in range(n_atoms)}
    for i, j in bonds:
        neighbours[int(i)].append(int(j))
        neighbours[int(j)].append(int(i))
    x = np.zeros((n_atoms, 3))
    placed = np.zeros(n_atoms, dtype=bool)
    for root in range(n_atoms):
        if placed[root]:
            continue
        x[root] = (0.5 * root, 0.0, 0.0)
        placed[root] = True
        queue = [root]
        while queue:
            i = queue.pop(0)
            for j in neighbours[i]:
                if not placed[j]:
                    step = rng.normal(size=3)
                    x[j] = x[i] + 0.12 * step / np.linalg.norm(step)
                    placed[j] = True
                    queue.append(j)
    return x


def check_energy_and_invariance(system: openmm.System, x: np.ndarray, kT: float, report: SystemCheckReport, *,
                                source: str, check_magnitude: bool = True, platform=None,
                                what: str = "System") -> None:
    """Refuse a System whose energy at a structure ``x`` is not finite (or, with ``check_magnitude``, absurdly
    high), or changes under a rigid rotation and translation of ``x``.

    The flow proposes centred molecules in uniformly random orientations (and `TBGMove` moves the molecule's
    orientation freely), so an energy that depends on the absolute position or orientation (a position
    restraint, an external field) makes every importance weight and acceptance test wrong.

    Parameters
    ----------
    system : openmm.System
    x : numpy.ndarray
        (n_atoms, 3) nm, a structure of the molecule.
    kT : float
        Thermal energy, kJ/mol.
    report : SystemCheckReport
        Receives what was checked.
    source : str
        Where ``x`` comes from, for messages (e.g. "the given positions").
    check_magnitude : bool
        Also refuse more than `MAX_ENERGY_PER_ATOM_KT` kT per atom (off for synthetic configurations).
    platform : optional
        Used only where the Reference platform cannot run the System.
    what : str
        How to call the System in messages.

    Raises
    ------
    ValueError
        Non-finite or absurd energy, or an energy that is not invariant under rigid motions.
    """
    context, integrator, platform_name = _energy_context(system, platform)
    try:
        u0 = _energy(context, x)
        moved = rigid_motions(x)
        u_moved = [_energy(context, y) for y in moved]
    finally:
        del context, integrator
    n = len(x)
    if not np.isfinite(u0):
        raise ValueError(f"The {what}'s energy at {source} is {u0} kJ/mol: OpenMM cannot evaluate it there. Check "
                         f"that the positions are in nm and that the {what} was created from this Topology (same "
                         f"atoms, same order).")
    if check_magnitude and u0 / kT > MAX_ENERGY_PER_ATOM_KT * n:
        raise ValueError(
            f"The {what}'s energy at {source} is {u0:.4g} kJ/mol = {u0 / kT / n:.3g} kT per atom, far above any "
            f"thermal structure (refused above {MAX_ENERGY_PER_ATOM_KT:g} kT per atom). Either the {what} does not "
            f"describe this molecule in this atom order (create it from the Topology: "
            f"ForceField.createSystem(topology)), or the structure has clashes or wrong units: minimize it "
            f"(openmm.LocalEnergyMinimizer) or pass positions in nm.")
    report.checked.append(f"energy at {source}: {u0:.1f} kJ/mol ({u0 / kT / n:.2f} kT per atom), finite")
    du = np.abs(np.asarray(u_moved) - u0)
    terms = _per_force_energies(system, [x] + moved, platform)
    scale = sum(abs(v[0]) for _, v in terms)
    atol, rtol = INVARIANCE_TOLERANCE["Reference" if platform_name == "Reference" else "other"]
    tolerance = atol * kT + rtol * scale
    if not np.all(np.isfinite(du)) or du.max() > tolerance:
        changed = [(name, max(abs(vi - v[0]) for vi in v[1:])) for name, v in terms]
        changed = [(name, d) for name, d in changed if not d <= max(tolerance, 1e-300)]
        culprits = ", ".join(f"{name} ({d:.3g} kJ/mol)" for name, d in changed) or "no single force"
        suspects = [name for name, _ in changed if name in _POSITION_DEPENDENT_FORCES]
        hint = (f" {suspects[0]} terms that refer to absolute coordinates (x, y, z) are the usual cause: a "
                f"position restraint.") if suspects else ""
        raise ValueError(
            f"The {what}'s energy changes by up to {np.nanmax(du) if np.isfinite(du).any() else float('inf'):.4g} "
            f"kJ/mol ({np.nanmax(du) / kT:.3g} kT) when the whole molecule at {source} is rotated and "
            f"translated rigidly (tolerance {tolerance:.2g} kJ/mol), so it depends on the molecule's absolute "
            f"position or orientation; changed: {culprits}.{hint} The flow proposes centred molecules in "
            f"uniformly random orientations, so its importance weights would describe a different ensemble. "
            f"Remove the position-dependent force, or restrain internal coordinates instead (distances, angles, "
            f"dihedrals: CustomBondForce, CustomAngleForce, CustomTorsionForce), or use plain MD.")
    report.checked.append(f"invariance under rigid rotation + translation at {source}: |dU| <= {du.max():.2g} "
                          f"kJ/mol (tolerance {tolerance:.2g}, {platform_name} platform)")


def check_system_structure(system: openmm.System, bonds: Sequence[tuple[int, int]], kT: float, *,
                           positions: Optional[np.ndarray] = None, topology=None,
                           labels: Optional[Sequence[str]] = None, positions_source: str = "the given positions",
                           platform=None, what: str = "System") -> SystemCheckReport:
    """Check that the flow can represent ``system``: its bond terms hold the Topology's bonds, its energy is
    finite and sane at a structure of the molecule, and invariant under rigid motions.

    The structure is ``positions`` if given; otherwise, for a standard peptide Topology, one built from its
    sequence (`openmm_tbg.peptides.reference_structure`); otherwise (toys) a synthetic configuration along the
    bonds, used for the invariance test only. A few energy evaluations on the Reference platform.

    Parameters
    ----------
    system : openmm.System
        Already accepted by `check_system`.
    bonds : sequence of (int, int)
        The Topology's bonds.
    kT : float
        kJ/mol.
    positions : numpy.ndarray, optional
        (n_atoms, 3) nm.
    topology : openmm.app.Topology, optional
        To build a reference structure when ``positions`` is None.
    labels : sequence of str, optional
        Per-atom labels for messages.
    positions_source : str
        How to call ``positions`` in messages.
    platform : optional
        OpenMM platform for Systems the Reference platform cannot run.
    what : str
        How to call the System in messages.

    Returns
    -------
    SystemCheckReport

    Raises
    ------
    ValueError
        See `check_bonded_terms` and `check_energy_and_invariance`.
    """
    report = SystemCheckReport()
    check_bonded_terms(system, bonds, report, labels=labels, what=what)
    n_atoms = system.getNumParticles()
    check_magnitude = True
    if positions is not None:
        x, source = np.asarray(positions, dtype=np.float64), positions_source
    else:
        x = None
        if topology is not None:
            from .peptides import reference_structure

            x = reference_structure(topology)
        if x is not None:
            source = "a structure built from the Topology's sequence"
        else:
            x, source, check_magnitude = synthetic_configuration(n_atoms, bonds), "a synthetic configuration", False
            report.not_checked.append("energy at a structure of the molecule: no positions were given and the "
                                      "Topology is not a standard peptide to build one from (pass positions=)")
    check_energy_and_invariance(system, x, kT, report, source=source, check_magnitude=check_magnitude,
                                platform=platform, what=what)
    logger.info("Structure checks of the %s:\n%s", what, report)
    return report
