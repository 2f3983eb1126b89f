"""Backbone torsions (phi, psi) with mdtraj, Ramachandran pairs, and the torus features of `torus_w2`.

A top-level module: `openmm_tbg.figures` and the evaluation package both use it, and the evaluation package
imports figures (`openmm_tbg.evaluation.torsions` re-exports it)."""

from __future__ import annotations

import numpy as np

from .utils import to_nm


def backbone_torsions(traj_or_positions, topology=None) -> tuple[np.ndarray, np.ndarray]:
    """Backbone torsions phi and psi with mdtraj.

    Parameters
    ----------
    traj_or_positions : mdtraj.Trajectory or array_like, shape (n_frames, n_atoms, 3) or (n_atoms, 3)
        Positions in nm (or an openmm.unit Quantity).
    topology : openmm.app.Topology or mdtraj.Topology, optional
        Required for positions.

    Returns
    -------
    phi, psi : numpy.ndarray, shape (n_frames, n_residues - 1), radians in [-pi, pi]
        All defined torsions in chain order: ``phi[:, k]`` is phi of residue ``k + 2`` and ``psi[:, k]`` psi of
        residue ``k + 1`` (1-based). For a dipeptide that is phi of residue 2 and psi of residue 1, the pair of
        TBG's Ramachandran plots.
    """
    import mdtraj

    if isinstance(traj_or_positions, mdtraj.Trajectory):
        traj = traj_or_positions
    else:
        if topology is None:
            raise ValueError("backbone_torsions needs the topology when given positions; pass "
                             "backbone_torsions(positions, topology).")
        x = to_nm(traj_or_positions, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        top = topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
        if x.ndim != 3 or x.shape[1:] != (top.n_atoms, 3):
            raise ValueError(f"positions must have shape (n_frames, {top.n_atoms}, 3) in nm for this topology, got "
                             f"{x.shape}.")
        traj = mdtraj.Trajectory(x, top)
    _, phi = mdtraj.compute_phi(traj)
    _, psi = mdtraj.compute_psi(traj)
    if phi.shape[1] == 0 or psi.shape[1] == 0:
        raise ValueError(f"The topology has no backbone phi/psi torsions ({traj.topology.n_residues} residue(s)); "
                         "evaluation needs a peptide with at least two amino acids.")
    return phi.astype(np.float64), psi.astype(np.float64)


def ramachandran_pairs(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """(phi, psi) pairs of the same residue for Ramachandran plots, shape (n_pairs, 2), radians.

    A dipeptide has only phi of residue 2 and psi of residue 1: that pair is used (as in TBG). Longer peptides
    give one pair per interior residue (residues 2 .. L-1), stacked over residues.
    """
    phi, psi = np.asarray(phi), np.asarray(psi)
    if phi.ndim == 1:
        return np.stack([phi, psi], axis=1)
    if phi.shape[1] == 1:
        return np.stack([phi[:, 0], psi[:, 0]], axis=1)
    # phi[:, k] belongs to residue k + 2, psi[:, k] to residue k + 1: interior residue j pairs phi[j-2], psi[j-1].
    return np.stack([phi[:, :-1].reshape(-1, order="F"), psi[:, 1:].reshape(-1, order="F")], axis=1)


def torsion_features(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """All backbone torsions as one (n_frames, n_phi + n_psi) array, radians (the torus for `torus_w2`)."""
    phi, psi = np.asarray(phi, dtype=np.float64), np.asarray(psi, dtype=np.float64)
    phi = phi[:, None] if phi.ndim == 1 else phi
    psi = psi[:, None] if psi.ndim == 1 else psi
    return np.concatenate([phi, psi], axis=1)
