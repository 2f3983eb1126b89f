"""Per-sample validity checks of flow samples: bond graph and chirality.

A flow sample is only a sample of the intended molecule if

1. its bond graph, read from interatomic distances with element-aware cutoffs (sum of covalent radii times
   ``bond_factor``), equals the Topology's bonds. When the plain comparison fails, the sample may still be the
   same molecule with interchangeable atoms swapped (e.g. two methyl hydrogens bound to the other carbon of an
   isopropyl group): the flow cannot tell them apart, because atoms with identical tokens have identical
   features. We then look for a graph isomorphism that maps each atom only onto atoms of its own group
   (``AtomEncoding.groups``) and, if one exists, *relabel* the sample's atoms into the Topology's order so that
   the force field sees the right atoms. The flow density is invariant under such permutations, so the
   importance weight of the relabelled sample is unchanged.
2. every chiral centre has the natural (L) configuration. The flow and the force field are both invariant
   under reflection, so it proposes mirror images as often as the real molecule. A sample whose centres are
   *all* inverted is the mirror image and is mirrored back (x -> -x: same density, same energy); a sample with
   some, but not all, centres inverted is a different stereoisomer and is rejected.

Both repairs keep a sample's importance weight only because the EGNN CNF's density is invariant under
permutations of interchangeable atoms and under reflection. A model family without those symmetries (e.g. the
internal-coordinate flow) builds the checker with ``relabel=False`` / ``mirror=False``: then a sample that
matches only after relabelling is rejected as ``"relabelling"`` and a fully inverted one as ``"mirror_image"``.
The sampler and `TBGMove` read this from the model's declared ``symmetries``.

Everything is counted: rejections by reason, mirrored and relabelled samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from .checks import as_frames
from .utils import to_nm

logger = logging.getLogger(__name__)

__all__ = ["ValidityChecker", "ValidityReport", "COVALENT_RADII_NM", "REJECTION_REASONS"]

#: Single-bond covalent radii in nm (Cordero et al., Dalton Trans. 2008, 2832; sp3 carbon).
COVALENT_RADII_NM = {
    "H": 0.031, "C": 0.076, "N": 0.071, "O": 0.066, "S": 0.105, "P": 0.107, "F": 0.057, "Cl": 0.102,
    "Br": 0.120, "I": 0.139, "Se": 0.120, "B": 0.084, "Si": 0.111,
}

#: Reasons a sample can be rejected, in the order they are checked. "relabelling" and "mirror_image" occur only
#: when the checker may not relabel / mirror (the model's density lacks that symmetry).
REJECTION_REASONS = ("non_finite_positions", "bond_graph", "relabelling", "chirality", "mirror_image")


@dataclass
class ValidityReport:
    """Result of checking a batch of samples.

    Attributes
    ----------
    positions : numpy.ndarray
        float64 (n, n_atoms, 3), nm: the samples after relabelling and mirroring (unchanged when rejected).
    valid : numpy.ndarray
        bool (n,).
    reasons : numpy.ndarray
        object (n,): ``""`` for valid samples, otherwise one of :data:`REJECTION_REASONS`.
    mirrored : numpy.ndarray
        bool (n,): the sample had all chiral centres inverted and was mirrored (x -> -x).
    relabelled : numpy.ndarray
        bool (n,): interchangeable atoms were permuted to match the Topology's bond graph.
    permutations : numpy.ndarray
        int64 (n, n_atoms): ``positions[i] = ±original[i][permutations[i]]``.
    """

    positions: np.ndarray
    valid: np.ndarray
    reasons: np.ndarray
    mirrored: np.ndarray
    relabelled: np.ndarray
    permutations: np.ndarray

    @property
    def counts(self) -> dict[str, int]:
        """Numbers of samples: ``n``, ``valid``, one entry per rejection reason, ``mirrored``, ``relabelled``."""
        out = {"n": int(self.valid.size), "valid": int(self.valid.sum())}
        for reason in REJECTION_REASONS:
            out[reason] = int(np.sum(self.reasons == reason))
        out["mirrored"] = int(self.mirrored.sum())
        out["relabelled"] = int(self.relabelled.sum())
        return out


class ValidityChecker:
    """Check, relabel and mirror flow samples of one molecule.

    Parameters
    ----------
    topology : openmm.app.Topology
        Its bonds define the expected bond graph.
    encoding : AtomEncoding
        Elements (for cutoffs), interchangeable-atom groups and chiral centres.
    reference_positions : array_like or Quantity, optional
        (n_atoms, 3), nm: a structure of the molecule. Its bond graph must match the Topology (this catches
        topologies with missing bonds), and its chiral-centre signs become the expected configuration
        (default: the L configuration, positive signed volumes).
    bond_factor : float
        A pair is bonded when its distance is below ``bond_factor * (r_cov(i) + r_cov(j))``.
    check_bonds, check_chirality : bool
        Switch the two checks off (e.g. for toy systems whose "atoms" are not chemical atoms).
    centers : numpy.ndarray, optional
        int (k, 4) chiral centres ``[center, a, b, c]``; default ``encoding.chiral_centers(encoding)``.
    mirror : bool
        Mirror samples whose chiral centres are all inverted (valid only if the model's density is
        reflection-invariant); False rejects them as ``"mirror_image"``.
    relabel : bool
        Relabel interchangeable atoms to match the bond graph (valid only if the density is invariant under
        those permutations); False rejects such samples as ``"relabelling"``.

    Attributes
    ----------
    statistics : dict
        Cumulative counts over all calls (see `ValidityReport.counts`).
    """

    def __init__(self, topology, encoding, reference_positions=None, *, bond_factor: float = 1.3,
                 check_bonds: bool = True, check_chirality: bool = True, centers: Optional[np.ndarray] = None,
                 mirror: bool = True, relabel: bool = True):
        if topology is None:
            bonds = []
        else:
            if topology.getNumAtoms() != encoding.n_atoms:
                raise ValueError(f"The topology has {topology.getNumAtoms()} atoms but the encoding has "
                                 f"{encoding.n_atoms}; encode this topology with encode_topology(topology).")
            bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
        self._setup(bonds, encoding, reference_positions, bond_factor, check_bonds, check_chirality, centers)
        self.mirror, self.relabel = bool(mirror), bool(relabel)

    @classmethod
    def from_bonds(cls, bonds: Iterable[tuple[int, int]], encoding, reference_positions=None, **kwargs
                   ) -> "ValidityChecker":
        """Build a checker from a list of bonded atom-index pairs instead of a Topology.

        ``expected_signs`` (one +1/-1 per chiral centre) may replace the reference chirality, e.g. to copy
        another checker's.
        """
        self = cls.__new__(cls)
        self._setup([(int(i), int(j)) for i, j in bonds], encoding, reference_positions,
                    kwargs.pop("bond_factor", 1.3), kwargs.pop("check_bonds", True),
                    kwargs.pop("check_chirality", True), kwargs.pop("centers", None))
        self.mirror, self.relabel = bool(kwargs.pop("mirror", True)), bool(kwargs.pop("relabel", True))
        signs = kwargs.pop("expected_signs", None)
        if signs is not None:
            signs = np.asarray(signs, dtype=np.float64).reshape(-1)
            if signs.shape != self.expected_signs.shape or not np.all(np.abs(signs) == 1):
                raise ValueError(f"expected_signs must hold one +1/-1 per chiral centre ({len(self.centers)}), got "
                                 f"{signs.tolist()}.")
            self.expected_signs = signs
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}.")
        return self

    def _setup(self, bonds, encoding, reference_positions, bond_factor, check_bonds, check_chirality, centers):
        from .chirality import chiral_centers, signed_volumes

        self.encoding = encoding
        self.n_atoms = encoding.n_atoms
        self.bonds = sorted({(min(i, j), max(i, j)) for i, j in bonds})
        self.bond_factor = float(bond_factor)
        self.check_bonds = bool(check_bonds)
        self.check_chirality = bool(check_chirality)
        self.groups = np.asarray(encoding.groups, dtype=np.int64)
        n = self.n_atoms
        self.adjacency = np.zeros((n, n), dtype=bool)
        for i, j in self.bonds:
            self.adjacency[i, j] = self.adjacency[j, i] = True
        if self.check_bonds:
            if not self.bonds:
                raise ValueError("The topology has no bonds, so the bond-graph check cannot work. Load it from a "
                                 "PDB file with CONECT records / standard residues (openmm.app.PDBFile adds "
                                 "bonds), or pass check_bonds=False.")
            missing = sorted({e for e in encoding.elements if e not in COVALENT_RADII_NM})
            if missing:
                raise ValueError(f"No covalent radius for element(s) {missing}; supported elements are "
                                 f"{sorted(COVALENT_RADII_NM)}. Pass check_bonds=False for toy systems.")
            radii = np.array([COVALENT_RADII_NM[e] for e in encoding.elements])
            self.cutoffs = self.bond_factor * (radii[:, None] + radii[None, :])
        else:
            self.cutoffs = None
        if centers is None and self.check_chirality:
            try:
                centers = chiral_centers(encoding)
            except (KeyError, IndexError) as error:
                # Toy encodings (e.g. in tests) lack the named backbone atoms: no centres apply.
                logger.info("No chiral centres found in this encoding (%r); chirality is not checked.", error)
                centers = np.zeros((0, 4), dtype=np.int64)
        self.centers = (np.zeros((0, 4), dtype=np.int64) if centers is None
                        else np.asarray(centers, dtype=np.int64).reshape(-1, 4))
        self.expected_signs = np.ones(len(self.centers))
        self.statistics = {"n": 0, "valid": 0, **{r: 0 for r in REJECTION_REASONS}, "mirrored": 0,
                           "relabelled": 0}
        if reference_positions is not None:
            ref = to_nm(reference_positions, name="reference_positions")
            if ref.shape != (n, 3) or not np.isfinite(ref).all():
                raise ValueError(f"reference_positions must be finite with shape ({n}, 3) nm, got {ref.shape}.")
            if self.check_bonds and not np.array_equal(self.bond_graph(ref[None])[0], self.adjacency):
                diff = np.argwhere(np.triu(self.bond_graph(ref[None])[0] != self.adjacency))
                raise ValueError(
                    f"The bond graph of reference_positions differs from the topology's bonds at atom pairs "
                    f"{diff[:5].tolist()}; the topology's bonds may be incomplete (load it with "
                    f"openmm.app.PDBFile) or the structure is distorted. Pass bond_factor or check_bonds=False "
                    f"to override.")
            if len(self.centers):
                vol = signed_volumes(ref, self.centers)[0]
                if np.any(vol == 0):
                    raise ValueError("reference_positions has a planar chiral centre; give a proper structure.")
                self.expected_signs = np.sign(vol)

    # ------------------------------------------------------------------------------------------------------
    def bond_graph(self, positions: np.ndarray) -> np.ndarray:
        """Adjacency matrices (n, n_atoms, n_atoms) bool from distances (no self bonds)."""
        x = np.asarray(positions, dtype=np.float64)
        d = np.linalg.norm(x[:, :, None, :] - x[:, None, :, :], axis=-1)
        adj = d < self.cutoffs
        idx = np.arange(self.n_atoms)
        adj[:, idx, idx] = False
        return adj

    def _match(self, adjacency: np.ndarray) -> Optional[np.ndarray]:
        """Permutation p (topology atom i <- sample atom p[i]) mapping the sample graph onto the topology's,
        allowed only within groups of interchangeable atoms; None if there is none."""
        import networkx as nx
        from networkx.algorithms import isomorphism

        # Cheap invariants first: edge count and the multiset of (group, degree).
        if adjacency.sum() != self.adjacency.sum():
            return None
        key = lambda a: sorted(zip(self.groups.tolist(), a.sum(1).tolist()))  # noqa: E731
        if key(adjacency) != key(self.adjacency):
            return None
        g_top = nx.Graph()
        g_sample = nx.Graph()
        for i, g in enumerate(self.groups.tolist()):
            g_top.add_node(i, group=g)
            g_sample.add_node(i, group=g)
        g_top.add_edges_from(map(tuple, np.argwhere(np.triu(self.adjacency))))
        g_sample.add_edges_from(map(tuple, np.argwhere(np.triu(adjacency))))
        matcher = isomorphism.GraphMatcher(g_top, g_sample,
                                           node_match=isomorphism.categorical_node_match("group", None))
        if not matcher.is_isomorphic():
            return None
        perm = np.empty(self.n_atoms, dtype=np.int64)
        for i, j in matcher.mapping.items():
            perm[i] = j
        return perm

    def _automorphism_parts(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Twin classes and lifted class automorphisms of the topology's group-labelled bond graph (cached).

        Twins are atoms of one group with the same bonded neighbours (methyl H's, carboxylate O's, ...); any
        permutation within a twin class is an automorphism. The class automorphisms (e.g. swapping Val's two
        methyl groups, flipping a Phe ring) are enumerated on the small quotient graph of classes, each lifted
        to one atom permutation. Every automorphism is, uniquely, a lift followed by twin permutations.
        """
        if getattr(self, "_automorphisms", None) is not None:
            return self._automorphisms
        import networkx as nx
        from networkx.algorithms import isomorphism

        neighbours = [frozenset(np.flatnonzero(row).tolist()) for row in self.adjacency]
        classes: dict[tuple, list[int]] = {}
        for i in range(self.n_atoms):
            classes.setdefault((int(self.groups[i]), neighbours[i]), []).append(i)
        members = [np.array(sorted(v), dtype=np.int64) for v in classes.values()]
        class_of = np.empty(self.n_atoms, dtype=np.int64)
        for c, atoms in enumerate(members):
            class_of[atoms] = c
        quotient = nx.Graph()
        for c, atoms in enumerate(members):
            quotient.add_node(c, label=(int(self.groups[atoms[0]]), len(atoms)))
        for i, j in self.bonds:
            quotient.add_edge(int(class_of[i]), int(class_of[j]))
        matcher = isomorphism.GraphMatcher(quotient, quotient,
                                           node_match=isomorphism.categorical_node_match("label", None))
        lifts = []
        for mapping in matcher.isomorphisms_iter():
            lift = np.arange(self.n_atoms, dtype=np.int64)
            for c, d in mapping.items():
                lift[members[c]] = members[d]
            lifts.append(lift)
            if len(lifts) > 100_000:
                raise RuntimeError("The bond graph has more than 100000 class automorphisms; this checker is "
                                   "meant for peptides. Pass check_bonds=False for such systems.")
        self._automorphisms = ([m for m in members if len(m) > 1], lifts)
        return self._automorphisms

    def random_automorphism(self, rng: np.random.Generator) -> np.ndarray:
        """A uniformly random permutation ``a`` of atoms with ``adjacency[a][:, a] == adjacency`` that maps
        each atom into its own group (use as ``x[a]``)."""
        twins, lifts = self._automorphism_parts()
        a = lifts[int(rng.integers(len(lifts)))].copy()
        for atoms in twins:
            a[atoms] = a[atoms][rng.permutation(len(atoms))]
        return a

    def __call__(self, positions_nm, rng: Optional[np.random.Generator] = None) -> ValidityReport:
        """Check samples; return them relabelled/mirrored with a validity mask and reasons.

        Parameters
        ----------
        positions_nm : array_like or Quantity, shape (n, n_atoms, 3) or (n_atoms, 3)
            Samples in nm.
        rng : numpy.random.Generator, optional
            Draws the relabelling of samples whose bond graph matches only up to a permutation: one of all
            valid relabellings, uniformly (composed with a random automorphism of the topology). The flow and
            the target are symmetric under these automorphisms, so label-dependent observables stay unbiased.
            Without it the relabelling is the first one found (deterministic, fine for symmetric observables
            such as energies).

        Returns
        -------
        ValidityReport
        """
        x = as_frames(positions_nm, self.n_atoms).copy()
        n = len(x)
        reasons = np.full(n, "", dtype=object)
        mirrored = np.zeros(n, dtype=bool)
        relabelled = np.zeros(n, dtype=bool)
        perms = np.tile(np.arange(self.n_atoms, dtype=np.int64), (n, 1))

        finite = np.isfinite(x).all(axis=(1, 2))
        reasons[~finite] = "non_finite_positions"
        todo = np.flatnonzero(finite)

        if self.check_bonds and len(todo):
            adj = self.bond_graph(x[todo])
            mismatch = (adj != self.adjacency).any(axis=(1, 2))
            for k in np.flatnonzero(mismatch):
                i = todo[k]
                perm = self._match(adj[k])
                if perm is None:
                    reasons[i] = "bond_graph"
                elif not self.relabel:
                    reasons[i] = "relabelling"  # the density is not permutation invariant: no free relabelling
                else:
                    if rng is not None:
                        perm = perm[self.random_automorphism(rng)]
                    x[i] = x[i][perm]
                    perms[i] = perm
                    relabelled[i] = True
            todo = todo[reasons[todo] == ""]

        if self.check_chirality and len(self.centers) and len(todo):
            from .chirality import signed_volumes

            signs = np.sign(signed_volumes(x[todo], self.centers)) * self.expected_signs
            natural = (signs > 0).all(axis=1)
            inverted = (signs < 0).all(axis=1)
            flip = todo[inverted]
            if self.mirror:
                x[flip] *= -1.0  # the mirror image: same flow density, same energy
                mirrored[flip] = True
            else:
                reasons[flip] = "mirror_image"  # the density is not reflection invariant
            reasons[todo[~natural & ~inverted]] = "chirality"

        report = ValidityReport(positions=x, valid=reasons == "", reasons=reasons, mirrored=mirrored,
                                relabelled=relabelled, permutations=perms)
        for key, value in report.counts.items():
            self.statistics[key] += value
        return report
