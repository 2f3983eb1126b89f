"""Whitening statistics of internal coordinates, keyed by transferable Z-matrix roles.

For every role key of a `ZMatrix` (the amino acid, name and residue offset of the atoms that define a bond,
angle or dihedral) the table stores a centre and a width collected from training MD frames:

* bonds and angles: mean and standard deviation (the flow sees ``(v - mean) / std`` with a standard normal
  base, so an untrained flow already has the data's marginal widths);
* dihedrals: circular mean and circular standard deviation ``sqrt(-2 ln R)``. Narrow ones (improper
  dihedrals at tetrahedral and planar centres, ring torsions, omega) get a wrapped-normal base at that width;
  broad ones (phi, psi, chi, methyl rotations) a uniform base.

A key not seen in training falls back, in this order, to the statistics of all keys that agree with it in the
amino acid of its *own* residue (`partial_key`), to the same key without amino acids (`generic_key`), and to
generic defaults, so any peptide of the 20 amino acids can be served. The first step matters for every unseen
peptide: the keys of coordinates that span two residues (psi, omega, phi and the bonds and angles between them)
name both amino acids, and in a data set of dipeptides every such pair is unique to one peptide. Pooling them
over all amino acids made, for instance, Gly-Pro's proline phi a wrapped normal of width 0.71 rad around -91
degrees, where every X-Pro train peptide had about 0.2 rad around -64 degrees; pooled over the X-Pro peptides
it is that again. The table is plain lists of numbers, stored in the checkpoint; the pooled statistics are
sums of its entries, so the fallback needs nothing else.

The fallback order is part of a model's density (a peptide with unseen keys gets other whitening, hence another
``log q``, under another order), so it is named (`FALLBACK_RULES`) and stored with the model
(``InternalCoordinateFlow(whitening_fallback=...)``, saved in the checkpoint's config): ``"all-amino-acids"``
(the first rule: own key, key without amino acids, defaults) and ``"own-residue"`` (the rule above, from
2026-12-02). Checkpoints written before the rule was stored were evaluated and published under
``"own-residue"`` (`LEGACY_FALLBACK_RULE`), so they get it.

`force_field_moments` gives the alternative whitening of bonds and angles from a System's harmonic terms:
centre at the equilibrium value, width ``sqrt(kT / k)`` (the width of that term alone at temperature T).
`WhiteningTable.add_moments` stores such values in the same table, so a flow whitened either way is
conditioned, saved and loaded the same way.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import numpy as np

__all__ = ["WhiteningTable", "generic_key", "partial_key", "force_field_moments", "UNIFORM_ABOVE",
           "WHITENING_SOURCES", "FALLBACK_RULES", "DEFAULT_FALLBACK_RULE", "LEGACY_FALLBACK_RULE"]

#: Where the bond and angle whitening comes from: the training MD frames, or the force field's harmonic terms
#: (dihedrals always come from the MD frames).
WHITENING_SOURCES = ("md", "force-field")

#: Circular standard deviation (rad) above which a dihedral gets a uniform base instead of a wrapped normal.
UNIFORM_ABOVE = 1.0
#: Fallback orders for keys without statistics of their own: the sources tried after the key itself.
FALLBACK_RULES = {"all-amino-acids": ("generic", "default"),
                  "own-residue": ("own-residue", "generic", "default")}
#: The rule of new flows.
DEFAULT_FALLBACK_RULE = "own-residue"
#: The rule of checkpoints that store none: the one they were evaluated with (the shipped ``ic_dipeptides.pt``,
#: sha256 31c33887, was evaluated with it on 2026-12-02; docs/ic/results.md).
LEGACY_FALLBACK_RULE = "own-residue"
_DEFAULTS = {"b": (0.125, 0.01), "a": (1.95, 0.08), "r": (0.14, 0.01)}  # r: ring-closure distances
_MIN_STD = {"b": 2e-4, "a": 2e-3, "d": 2e-3, "r": 2e-4}


def generic_key(key: str) -> str:
    """The key without amino-acid names (``"b|ALA:N:+0|ALA:CA:+0"`` -> ``"b|N:+0|CA:+0"``)."""
    return re.sub(r"\|[A-Z]{3}:", "|", key)


_ATOM = re.compile(r"^([A-Z]{3}):([^:]+):([+-]\d+)$")


def partial_key(key: str) -> str:
    """The key with amino-acid names only on the atoms of its own residue.

    The own residue is the residue offset that most of the key's atoms have; on a tie, that of the first atom
    (the one the coordinate places). ``"d|PRO:C:+0|PRO:CA:+0|PRO:N:+0|GLY:C:-1"`` (phi of a proline after a
    glycine) -> ``"d|PRO:C:+0|PRO:CA:+0|PRO:N:+0|C:-1"`` (phi of a proline after any residue);
    ``"d|PRO:N:+0|GLY:C:-1|GLY:CA:-1|GLY:N:-1"`` (psi of that glycine) -> ``"d|N:+0|GLY:C:-1|GLY:CA:-1|GLY:N:-1"``.
    A key within one residue is returned unchanged.
    """
    kind, *atoms = key.split("|")
    parsed = [_ATOM.match(a) for a in atoms]
    if not atoms or not all(parsed):
        return key
    offsets = [m.group(3) for m in parsed]
    counts = {o: offsets.count(o) for o in offsets}
    best = max(counts.values())
    own = offsets[0] if counts[offsets[0]] == best else next(o for o in offsets if counts[o] == best)
    return "|".join([kind] + [a if m.group(3) == own else f"{m.group(2)}:{m.group(3)}"
                              for a, m in zip(atoms, parsed)])


class WhiteningTable:
    """Accumulates and looks up per-role statistics.

    Parameters
    ----------
    entries : dict, optional
        Initial entries (as `to_dict` returns them).
    fallback : str
        The fallback rule for keys without statistics of their own (`FALLBACK_RULES`).

    Attributes
    ----------
    entries : dict
        key -> ``[count, sum, sum of squares]`` (bonds, angles) or ``[count, sum cos, sum sin]`` (dihedrals).
    fallback : str
    """

    def __init__(self, entries: Optional[dict] = None, fallback: str = DEFAULT_FALLBACK_RULE):
        if fallback not in FALLBACK_RULES:
            raise ValueError(f"Unknown whitening fallback rule {fallback!r}; this openmm_tbg knows "
                             f"{sorted(FALLBACK_RULES)}. A checkpoint naming another rule was written by a newer "
                             "openmm_tbg: use that version, since its density depends on the rule.")
        self.fallback = fallback
        self.entries: dict[str, list[float]] = {k: [float(v) for v in vals] for k, vals in (entries or {}).items()}
        self._pooled: Optional[dict[str, list[float]]] = None  # partial key -> summed stats, built on first use

    # ---------------------------------------------------------------- collection
    def add(self, keys: Iterable[str], values: np.ndarray) -> None:
        """Add frames ``values`` (frames, len(keys)) of coordinates with the given keys (one kind each)."""
        values = np.asarray(values, dtype=np.float64)
        for c, key in enumerate(keys):
            if not key:
                continue
            v = values[:, c]
            if key[0] == "d":
                stats = [len(v), float(np.cos(v).sum()), float(np.sin(v).sum())]
            else:
                stats = [len(v), float(v.sum()), float((v * v).sum())]
            self._accumulate(key, stats)

    def add_frames(self, zmatrix, positions_nm) -> None:
        """Add the bond lengths, angles and dihedrals of frames ``positions_nm`` (n, N, 3) nm of the molecule of
        ``zmatrix`` (an `openmm_tbg.zmatrix.ZMatrix`), under its keys: what training does with MD frames."""
        import torch

        from .internal_coordinates import to_internal

        ic = torch.stack(to_internal(torch.as_tensor(positions_nm, dtype=torch.float64), zmatrix), -1).numpy()
        for c in range(3):
            self.add([keys[c] for keys in zmatrix.keys], ic[..., c])

    def _accumulate(self, key: str, stats: list[float]) -> None:
        """Add ``[count, sum, sum of squares]`` (or circular sums) to ``key`` and to its generic key."""
        for k in (key, generic_key(key)):
            old = self.entries.get(k, [0.0, 0.0, 0.0])
            self.entries[k] = [a + b for a, b in zip(old, stats)]
        self._pooled = None

    def add_moments(self, key: str, mean: float, variance: float, weight: float) -> None:
        """Add a bond or angle ``key`` whose values have ``mean`` and ``variance``, counted ``weight`` times
        (e.g. the frames of the peptide it comes from), as if those frames had been added."""
        if not key or key[0] == "d":
            raise ValueError(f"add_moments takes bond, angle and closure-distance keys only, got {key!r}.")
        if not weight > 1:
            raise ValueError(f"add_moments needs a weight above 1 (lookup ignores single counts), got {weight!r}.")
        self._accumulate(key, [float(weight), weight * mean, weight * (mean * mean + variance)])

    def drop_kinds(self, kinds: str) -> None:
        """Remove every entry of the given kinds (``"bar"``: bonds, angles and closure distances)."""
        self.entries = {k: v for k, v in self.entries.items() if k[0] not in kinds}
        self._pooled = None

    def pooled(self, key: str) -> Optional[list[float]]:
        """The summed statistics of every full key (one that names amino acids) whose `partial_key` is
        ``partial_key(key)``; None if there is none."""
        if self._pooled is None:
            pooled: dict[str, list[float]] = {}
            for k, stats in self.entries.items():
                if k != generic_key(k):
                    p = partial_key(k)
                    old = pooled.get(p, [0.0, 0.0, 0.0])
                    pooled[p] = [a + b for a, b in zip(old, stats)]
            self._pooled = pooled
        return self._pooled.get(partial_key(key))

    # ---------------------------------------------------------------- lookup
    def lookup(self, key: str) -> tuple[float, float, bool]:
        """``(centre, width, known)`` for a key; dihedral widths are circular standard deviations (rad).
        ``known`` is False where the generic defaults were used (`resolve` also says which fallback)."""
        centre, width, source = self.resolve(key)
        return centre, width, source != "default"

    def resolve(self, key: str) -> tuple[float, float, str]:
        """``(centre, width, source)`` of a key under the table's fallback rule: ``source`` is ``"seen"`` (the
        key's own statistics), ``"own-residue"`` (pooled over keys with the same `partial_key`), ``"generic"``
        (the key without amino acids) or ``"default"``."""
        kind = key[0]
        # Lazily: a seen key (every key of a training peptide) never builds the pooled index.
        getters = {"seen": lambda: self.entries.get(key), "own-residue": lambda: self.pooled(key),
                   "generic": lambda: self.entries.get(generic_key(key))}
        for source in ("seen",) + FALLBACK_RULES[self.fallback][:-1]:
            stats = getters[source]()
            if stats is not None and stats[0] > 1:
                n, s1, s2 = stats
                if kind == "d":
                    r = math.hypot(s1, s2) / n
                    width = math.sqrt(-2.0 * math.log(min(max(r, 1e-12), 1.0)))
                    return math.atan2(s2, s1), max(width, _MIN_STD["d"]), source
                mean = s1 / n
                var = max(s2 / n - mean * mean, 0.0)
                return mean, max(math.sqrt(var), _MIN_STD[kind]), source
        if kind == "d":
            return 0.0, float("inf"), "default"
        mean, std = _DEFAULTS[kind]
        return mean, std, "default"

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in self.entries.items()}

    def __len__(self) -> int:
        return len(self.entries)


def force_field_moments(system, zmatrix, temperature_k: float) -> list[tuple[str, float, float]]:
    """Bond and angle whitening of a Z-matrix from the harmonic terms of an OpenMM System.

    Parameters
    ----------
    system : openmm.System
        With a ``HarmonicBondForce`` and a ``HarmonicAngleForce`` (energy ``k/2 (x - x0)^2``), atoms indexed as
        in the topology the Z-matrix was built from.
    zmatrix : ZMatrix
    temperature_k : float
        Temperature, K.

    Returns
    -------
    list of (str, float, float)
        ``(key, x0, sqrt(kT / k))`` in nm or rad for every bond and angle of the Z-matrix, in build order (a key
        can occur more than once: residues of the same amino acid share keys, and terminal residues can have
        other parameters). A closure distance (``ring_closure="distance"``) gets its closure bond's term.

    Raises
    ------
    ValueError
        If a Z-matrix bond or angle has no harmonic term (the System was not made from this topology).
    """
    import openmm

    from .energy import MOLAR_GAS_CONSTANT

    kt = MOLAR_GAS_CONSTANT * float(temperature_k)  # kJ/mol
    bonds, angles = {}, {}
    for force in system.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for n in range(force.getNumBonds()):
                i, j, x0, k = force.getBondParameters(n)
                bonds[frozenset((i, j))] = (x0.value_in_unit(openmm.unit.nanometer),
                                            k.value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer ** 2))
        elif isinstance(force, openmm.HarmonicAngleForce):
            for n in range(force.getNumAngles()):
                i, j, l, x0, k = force.getAngleParameters(n)
                value = (x0.value_in_unit(openmm.unit.radian),
                         k.value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.radian ** 2))
                angles[(i, j, l)] = angles[(l, j, i)] = value
    out = []
    for p in range(zmatrix.n_atoms):
        i = int(zmatrix.order[p])
        j, k, _ = (int(r) for r in zmatrix.refs[p])
        bond_key, angle_key, _ = zmatrix.keys[p]
        c = int(zmatrix.closure_partner[p])
        second = bonds.get(frozenset((i, c))) if c >= 0 else angles.get((i, j, k))
        for key, term in ((bond_key, bonds.get(frozenset((i, j))) if bond_key else None),
                          (angle_key, second if angle_key else None)):
            if not key:
                continue
            if term is None or not term[1] > 0:
                atoms = {"b": (i, j), "a": (i, j, k), "r": (i, c)}[key[0]]
                raise ValueError(f"The System has no harmonic term with a positive force constant for the "
                                 f"Z-matrix coordinate {key} (atoms {atoms}): create the System from the same "
                                 "Topology, with constraints=None.")
            out.append((key, term[0], math.sqrt(kt / term[1])))
    return out
