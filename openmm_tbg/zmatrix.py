"""Z-matrices of peptides: which atoms place each atom (bond, angle, dihedral references).

Rules (deterministic for any linear peptide of the 20 amino acids, zwitterionic termini, any length):

* The root is the N-terminal backbone N (atom 0 of the build). Heavy atoms are placed first, breadth-first
  from the root along the bond graph, a parent's children in the order backbone N, CA, C, then CB, O, OXT,
  then by name. All hydrogens follow, each placed from its bonded heavy atom. Bonds left out of the spanning
  tree close rings (Pro, Phe, Tyr, Trp, His); breadth-first placement splits each ring into two short arms that
  meet at the closure bond, so its length depends on few dihedrals.
* Atom ``i`` with parent ``j`` (bond ``i-j``) and grandparent ``k`` (angle ``i-j-k``; if ``j`` is the root,
  ``k`` is the first atom placed from it) gets its dihedral reference ``l``:

  - *improper* (``l`` bonded to ``j``): the first already placed child of ``j`` other than ``i``. The dihedral
    ``i-j-k-l`` then measures the position of ``i`` around the ``j-k`` axis relative to its sibling: about
    +-120 degrees at a tetrahedral centre and 180 degrees at a planar one, a narrow single-mode distribution.
    The sign of the CB (and HA) dihedral at CA is the chirality, so D configurations are a tail far from the
    mode instead of a second mode.
  - *proper* otherwise (the first child of ``j``): ``l`` is the parent of ``k`` or, if ``k`` is the root or
    has none, the first placed neighbour of ``k`` other than ``j``. These are the real torsional degrees of
    freedom (psi, omega, phi, chi, methyl and NH3+ rotations, ring torsions).

Each atom's role is keyed by the amino acid and name of the atoms involved and their residue offsets, so that
statistics collected on training peptides apply to unseen ones (`ZMatrix.keys`).

Ring closures (``ring_closure``): with ``"angle"`` (the default) every atom has a bond, an angle and a dihedral,
and a ring's closure bond is implied by the coordinates of both arms, so its length and the angles at its ends
carry the errors of all of them. With ``"distance"`` the later-placed atom ``i`` of each closure bond ``i-c``
trades its angle ``i-j-k`` for the closure distance ``|x_i - x_c|``: the closure bond becomes a coordinate that
is whitened and modelled like any bond. Given the bond, the dihedral and that distance, the angle follows in
closed form on the branch where the distance grows with the angle (300 frames of each of the 164 train dipeptides
with a ring all lie on it, at least 0.6 of the median slope away from the turning point); the other branch has
zero density. The coordinate is keyed ``"r|..."``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["ZMatrix", "build_zmatrix", "RING_CLOSURES"]

#: How ring closures are parametrised (module notes): the angle of the closing atom, or the closure distance.
RING_CLOSURES = ("angle", "distance")

_NAME_RANK = {"N": 0, "CA": 1, "C": 2, "CB": 3, "O": 4, "OXT": 5}


@dataclass(frozen=True)
class ZMatrix:
    """Placement order and reference atoms of a molecule.

    Attributes
    ----------
    order : numpy.ndarray
        int64 (N,): atom index placed at each build position.
    refs : numpy.ndarray
        int64 (N, 3): for build position ``p`` the atom indices ``[j, k, l]`` of its bond, angle and dihedral
        references (``-1`` where the position has none: p = 0 has none, p = 1 only ``j``, p = 2 ``j, k``).
    improper : numpy.ndarray
        bool (N,): the dihedral reference ``l`` is bonded to ``j`` (sibling-relative), not to ``k``.
    ring_closures : tuple of (int, int)
        Bonds that are not in the spanning tree.
    keys : tuple of tuple of str
        Per build position ``(bond_key, angle_key, dihedral_key)`` ("" where not applicable): the roles of the
        atoms, transferable between peptides.
    levels : tuple of numpy.ndarray
        Build positions grouped so that every position's references (and closure partner) lie in earlier
        groups (the NeRF placement runs one vectorized step per group).
    closure_partner : numpy.ndarray
        int64 (N,): for ``ring_closure="distance"``, the atom index ``c`` whose distance replaces the angle of
        the build position (-1 elsewhere, and everywhere with ``"angle"``).
    """

    order: np.ndarray
    refs: np.ndarray
    improper: np.ndarray
    ring_closures: tuple
    keys: tuple
    levels: tuple = field(repr=False)
    closure_partner: np.ndarray = field(default=None, repr=False)

    def __post_init__(self):
        if self.closure_partner is None:
            object.__setattr__(self, "closure_partner", np.full(len(self.order), -1, dtype=np.int64))

    @property
    def closure_positions(self) -> np.ndarray:
        """int64: build positions whose second coordinate is a closure distance (not an angle)."""
        return np.flatnonzero(self.closure_partner >= 0)

    @property
    def n_atoms(self) -> int:
        return int(len(self.order))

    @property
    def position_of(self) -> np.ndarray:
        """int64 (N,): build position of each atom index."""
        pos = np.empty(self.n_atoms, dtype=np.int64)
        pos[self.order] = np.arange(self.n_atoms)
        return pos

    @property
    def dof_mask(self) -> np.ndarray:
        """bool (N, 3): which of (bond, angle, dihedral) each build position has."""
        p = np.arange(self.n_atoms)[:, None]
        return p >= np.array([1, 2, 3])[None, :]


def _atom_label(encoding, i: int, ref_residue: int) -> str:
    from .encoding import AMINO_ACIDS

    offset = int(encoding.residue_index[i]) - ref_residue
    return f"{AMINO_ACIDS[int(encoding.amino_acid[i])]}:{encoding.atom_names[i]}:{offset:+d}"


def _key(encoding, kind: str, atoms: Sequence[int], improper: bool = False) -> str:
    ref = int(encoding.residue_index[atoms[0]])
    labels = "|".join(_atom_label(encoding, int(a), ref) for a in atoms)
    return f"{kind}{'i' if improper else ''}|{labels}"


def build_zmatrix(encoding, bonds: Sequence[tuple[int, int]], ring_closure: str = "angle") -> ZMatrix:
    """Z-matrix of a molecule from its atom encoding and bonds (rules in the module notes).

    Parameters
    ----------
    encoding : AtomEncoding
        Atom names, elements, residue indices and amino acids.
    bonds : sequence of (int, int)
        Bonded atom index pairs (e.g. from ``topology.bonds()``); must connect all atoms.
    ring_closure : {"angle", "distance"}
        Parametrisation of ring closures (module notes).

    Returns
    -------
    ZMatrix

    Raises
    ------
    ValueError
        Fewer than 3 atoms, bonds outside the atom range, or a bond graph that is not connected.
    """
    if ring_closure not in RING_CLOSURES:
        raise ValueError(f"build_zmatrix: ring_closure must be one of {RING_CLOSURES}, got {ring_closure!r}.")
    n = encoding.n_atoms
    if n < 3:
        raise ValueError(f"build_zmatrix: an internal-coordinate build needs at least 3 atoms, got {n}.")
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in bonds:
        a, b = int(a), int(b)
        if not (0 <= a < n and 0 <= b < n) or a == b:
            raise ValueError(f"build_zmatrix: bond ({a}, {b}) is not a pair of distinct atoms in 0..{n - 1}.")
        if b not in neighbours[a]:
            neighbours[a].append(b)
            neighbours[b].append(a)
    heavy = np.array([e != "H" for e in encoding.elements])
    names = encoding.atom_names
    rank = lambda i: (_NAME_RANK.get(names[i], 9), int(encoding.residue_index[i]), names[i], i)  # noqa: E731

    candidates = [i for i in range(n) if names[i] == "N" and int(encoding.residue_index[i]) == 0 and heavy[i]]
    root = candidates[0] if candidates else int(np.flatnonzero(heavy)[0] if heavy.any() else 0)

    parent = np.full(n, -1, dtype=np.int64)
    order: list[int] = [root]
    seen = {root}
    queue = deque([root])
    while queue:  # breadth-first over heavy atoms
        a = queue.popleft()
        for b in sorted((b for b in neighbours[a] if heavy[b] and b not in seen), key=rank):
            seen.add(b)
            parent[b] = a
            order.append(b)
            queue.append(b)
    for a in list(order):  # then every hydrogen from its heavy atom
        for b in sorted((b for b in neighbours[a] if not heavy[b] and b not in seen), key=rank):
            seen.add(b)
            parent[b] = a
            order.append(b)
    if len(order) < n:  # hydrogen-only fragments (toy systems) or disconnected graphs
        queue = deque(order)
        while queue:
            a = queue.popleft()
            for b in sorted((b for b in neighbours[a] if b not in seen), key=rank):
                seen.add(b)
                parent[b] = a
                order.append(b)
                queue.append(b)
    if len(order) < n:
        missing = sorted(set(range(n)) - seen)
        raise ValueError(f"build_zmatrix: the bond graph is not connected: atoms {missing[:10]} cannot be reached "
                         f"from atom {root} ({names[root]}); pass the topology's bonds (openmm.app.PDBFile adds "
                         f"them for standard residues).")
    return _references(encoding, neighbours, np.asarray(order, dtype=np.int64), parent, ring_closure)


def _references(encoding, neighbours, order: np.ndarray, parent: np.ndarray, ring_closure: str) -> ZMatrix:
    n = len(order)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    refs = np.full((n, 3), -1, dtype=np.int64)
    improper = np.zeros(n, dtype=bool)
    keys = []
    placed_children: dict[int, list[int]] = {}
    for p, i in enumerate(order.tolist()):
        j = int(parent[i]) if p else -1
        k = l = -1
        if p >= 2:
            if parent[j] >= 0:
                k = int(parent[j])
            else:  # j is the root: the angle partner is the first atom placed from it
                k = next(c for c in placed_children.get(j, []) if c != i)
        if p >= 3:
            siblings = [c for c in placed_children.get(j, []) if c not in (i, k)]
            if siblings:
                l, improper[p] = siblings[0], True
            else:
                if parent[k] >= 0 and parent[k] != j:
                    l = int(parent[k])
                else:
                    options = [c for c in neighbours[k] if c != j and position[c] < p]
                    if not options:  # a linear fragment (toy systems): any earlier atom defines the plane
                        options = [c for c in order[:p].tolist() if c not in (i, j, k)]
                    l = min(options, key=lambda c: position[c])
        refs[p] = (j, k, l)
        if j >= 0:
            placed_children.setdefault(j, []).append(i)
        keys.append((_key(encoding, "b", [i, j]) if p >= 1 else "",
                     _key(encoding, "a", [i, j, k]) if p >= 2 else "",
                     _key(encoding, "d", [i, j, k, l], bool(improper[p])) if p >= 3 else ""))
    tree = {(min(i, int(parent[i])), max(i, int(parent[i]))) for i in order.tolist() if parent[i] >= 0}
    all_bonds = {(min(a, b), max(a, b)) for a in range(n) for b in neighbours[a]}
    closures = tuple(sorted(all_bonds - tree))
    partner = np.full(n, -1, dtype=np.int64)
    if ring_closure == "distance":
        for a, b in closures:
            i, c = (a, b) if position[a] > position[b] else (b, a)
            p = int(position[i])
            if p < 3 or partner[p] >= 0:
                raise ValueError(f"build_zmatrix: ring closure {a}-{b} cannot be parametrised by its distance "
                                 "(too close to the root, or a second closure at the same atom); use "
                                 "ring_closure='angle'.")
            partner[p] = c
            keys[p] = (keys[p][0], _key(encoding, "r", [i, c]), keys[p][2])
    # Vectorized NeRF: a position's level is one more than the deepest of its references (and closure partner).
    level = np.zeros(n, dtype=np.int64)
    for p in range(3, n):
        deps = [r for r in refs[p] if r >= 0] + ([int(partner[p])] if partner[p] >= 0 else [])
        level[p] = 1 + max(level[position[r]] for r in deps)
    levels = tuple(np.flatnonzero(level == v) for v in range(1, int(level.max()) + 1)) if n > 3 else ()
    return ZMatrix(order=order, refs=refs, improper=improper, ring_closures=closures, keys=tuple(keys),
                   levels=levels, closure_partner=partner)
