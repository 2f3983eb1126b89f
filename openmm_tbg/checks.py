"""Input checks shared by the sampler and `TBGMove`: Systems and positions the flows cannot sample exactly."""

from __future__ import annotations

from typing import Optional

import numpy as np
import openmm

from .utils import to_nm

__all__ = ["check_system", "check_positions", "as_frames"]


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

