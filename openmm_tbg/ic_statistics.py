"""Whitening statistics of internal coordinates, keyed by transferable Z-matrix roles.

For every role key of a `ZMatrix` (the amino acid, name and residue offset of the atoms that define a bond,
angle or dihedral) the table stores a centre and a width collected from training MD frames:

* bonds and angles: mean and standard deviation (the flow sees ``(v - mean) / std`` with a standard normal
  base, so an untrained flow already has the data's marginal widths);
* dihedrals: circular mean and circular standard deviation ``sqrt(-2 ln R)``. Narrow ones (improper
  dihedrals at tetrahedral and planar centres, ring torsions, omega) get a wrapped-normal base at that width;
  broad ones (phi, psi, chi, methyl rotations) a uniform base.

A key not seen in training falls back to the same key without amino acids, then to generic defaults, so any
peptide of the 20 amino acids can be served. The table is plain lists of numbers, stored in the checkpoint.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import numpy as np

__all__ = ["WhiteningTable", "generic_key", "UNIFORM_ABOVE"]

#: Circular standard deviation (rad) above which a dihedral gets a uniform base instead of a wrapped normal.
UNIFORM_ABOVE = 1.0
_DEFAULTS = {"b": (0.125, 0.01), "a": (1.95, 0.08)}
_MIN_STD = {"b": 2e-4, "a": 2e-3, "d": 2e-3}


def generic_key(key: str) -> str:
    """The key without amino-acid names (``"b|ALA:N:+0|ALA:CA:+0"`` -> ``"b|N:+0|CA:+0"``)."""
    return re.sub(r"\|[A-Z]{3}:", "|", key)


class WhiteningTable:
    """Accumulates and looks up per-role statistics.

    Attributes
    ----------
    entries : dict
        key -> ``[count, sum, sum of squares]`` (bonds, angles) or ``[count, sum cos, sum sin]`` (dihedrals).
    """

    def __init__(self, entries: Optional[dict] = None):
        self.entries: dict[str, list[float]] = {k: [float(v) for v in vals] for k, vals in (entries or {}).items()}

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
            for k in (key, generic_key(key)):
                old = self.entries.get(k, [0.0, 0.0, 0.0])
                self.entries[k] = [a + b for a, b in zip(old, stats)]

    # ---------------------------------------------------------------- lookup
    def lookup(self, key: str) -> tuple[float, float, bool]:
        """``(centre, width, known)`` for a key; dihedral widths are circular standard deviations (rad)."""
        kind = key[0]
        for k in (key, generic_key(key)):
            stats = self.entries.get(k)
            if stats is not None and stats[0] > 1:
                n, s1, s2 = stats
                if kind == "d":
                    r = math.hypot(s1, s2) / n
                    width = math.sqrt(-2.0 * math.log(min(max(r, 1e-12), 1.0)))
                    return math.atan2(s2, s1), max(width, _MIN_STD["d"]), True
                mean = s1 / n
                var = max(s2 / n - mean * mean, 0.0)
                return mean, max(math.sqrt(var), _MIN_STD[kind]), True
        if kind == "d":
            return 0.0, float("inf"), False
        mean, std = _DEFAULTS[kind]
        return mean, std, False

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in self.entries.items()}

    def __len__(self) -> int:
        return len(self.entries)
