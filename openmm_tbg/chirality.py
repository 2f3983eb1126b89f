"""Chiral centres of peptides, their handedness, and the refusal of D-amino acids.

A chiral centre is a row ``[center, a, b, c]`` of atom indices: the CA of every non-Gly residue and the CB of
Ile and Thr, with the neighbour ordering that gives the natural L-amino acid a positive signed volume
``det([a - center, b - center, c - center])``. :func:`check_chirality` refuses coordinates with a D-configured
centre; :func:`~openmm_tbg.encoding.encode_topology` calls it when given positions. The three functions are
re-exported by :mod:`openmm_tbg.encoding`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .residues import AMINO_ACIDS, UnsupportedTopologyError
from .utils import to_nm

# `encoding` imports this module (encode_topology calls check_chirality, and re-exports the names below); this
# module imports nothing of `encoding`, so the two have no cycle. ``encoding`` arguments are AtomEncodings.


def chiral_centers(encoding: Any) -> np.ndarray:
    """Chiral centres of a peptide and the neighbour ordering that defines their handedness.

    Parameters
    ----------
    encoding : AtomEncoding

    Returns
    -------
    numpy.ndarray
        int64 (k, 4), rows ``[center, a, b, c]``: CA of every non-Gly residue with (N, C, CB), CB of Ile with
        (CA, CG1, CG2) and CB of Thr with (CA, OG1, CG2). The natural L-amino acid (2S,3S Ile, 2S,3R Thr) has a
        positive signed volume ``det([a - center, b - center, c - center])`` (checked on the MD data set).
    """
    index: dict[tuple[int, str], int] = {}
    for i, (r, name) in enumerate(zip(encoding.residue_index, encoding.atom_names)):
        index[(int(r), name)] = i
    rows = []
    for r in range(encoding.n_residues):
        aa = AMINO_ACIDS[int(encoding.amino_acid[encoding.residue_index == r][0])]
        if aa == "GLY":
            continue
        rows.append([index[(r, "CA")], index[(r, "N")], index[(r, "C")], index[(r, "CB")]])
        if aa == "ILE":
            rows.append([index[(r, "CB")], index[(r, "CA")], index[(r, "CG1")], index[(r, "CG2")]])
        elif aa == "THR":
            rows.append([index[(r, "CB")], index[(r, "CA")], index[(r, "OG1")], index[(r, "CG2")]])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def signed_volumes(positions_nm, centers: np.ndarray) -> np.ndarray:
    """Signed volumes ``det([a - center, b - center, c - center])`` of chiral centres.

    Parameters
    ----------
    positions_nm : array-like or Quantity
        (n_frames, n_atoms, 3) or (n_atoms, 3), nm.
    centers : numpy.ndarray
        int (k, 4) from :func:`chiral_centers`.

    Returns
    -------
    numpy.ndarray
        float64 (n_frames, k), nm^3; positive for L.
    """
    x = to_nm(positions_nm)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"positions must have shape (n_frames, n_atoms, 3) or (n_atoms, 3), got {x.shape}.")
    centers = np.asarray(centers, dtype=np.int64).reshape(-1, 4)
    o = x[:, centers[:, 0]]
    v = np.stack([x[:, centers[:, 1]] - o, x[:, centers[:, 2]] - o, x[:, centers[:, 3]] - o], axis=-2)
    return np.linalg.det(v)


def check_chirality(encoding: Any, positions) -> None:
    """Raise `~openmm_tbg.encoding.UnsupportedTopologyError` if any chiral centre in any frame is D-configured.

    Parameters
    ----------
    encoding : AtomEncoding
    positions : array-like or Quantity
        (n_atoms, 3) or (n_frames, n_atoms, 3), nm if unitless.
    """
    x = to_nm(positions)
    if x.ndim not in (2, 3) or x.shape[-2:] != (encoding.n_atoms, 3):
        raise ValueError(f"positions have shape {x.shape}, expected ({encoding.n_atoms}, 3) or "
                         f"(n_frames, {encoding.n_atoms}, 3) for this topology.")
    if not np.all(np.isfinite(x)):
        raise ValueError("positions contain NaN or infinite values.")
    centers = chiral_centers(encoding)
    if centers.size == 0:
        return
    vol = signed_volumes(x, centers)
    bad_frames, bad_centers = np.nonzero(vol <= 0)
    if bad_frames.size:
        k = int(bad_centers[0])
        atom = int(centers[k, 0])
        res = int(encoding.residue_index[atom])
        n_bad = int(np.unique(bad_centers).size)
        raise UnsupportedTopologyError(
            f"Atom {encoding.atom_names[atom]} of residue {encoding.residue_names[atom]} (index {res}) has the "
            f"D configuration in frame {int(bad_frames[0])} ({n_bad} of {centers.shape[0]} chiral centres "
            f"inverted in at least one frame). Only L-amino acids are supported; if the whole structure is a "
            f"mirror image, use positions * -1.")
