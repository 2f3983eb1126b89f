"""Twin atoms (interchangeable atoms with the same bonded neighbours) and the canonical labelling of their sense.

Which of a methyl's hydrogens is called HB2 or HB3 is arbitrary, and in the data set it varies between peptides
(``Modeller.addHydrogens`` names them as it places them): in one peptide HB2 sits at +120 degrees from HB1 around
the CB-CA axis, in the next at -120. The same holds for NH3+, CH2 and NH2 groups and carboxylate oxygens. The
labels carry no information the atom encoding could see, so the internal-coordinate flow models *canonically
labelled* configurations and symmetrises over each group's swap.

Per twin group one *swap* ``tau`` (a transposition of two members) flips its *sense dihedral* between two half
circles; the canonical labelling has it in the half circle ``(centre - pi/2, centre + pi/2)``:

* three twins ``m1, m2, m3`` (CH3, NH3+): sense = improper dihedral of ``m2`` relative to ``m1``, centre +pi/2;
  swap ``m2 <-> m3``;
* two twins placed relative to a heavy sibling (CH2): sense = improper dihedral of ``m1``, centre +pi/2; swap
  ``m1 <-> m2``;
* two twins where ``m1`` has a proper torsion and ``m2`` is placed relative to ``m1`` at a tetrahedral parent
  (a ring CH2 of Pro): sense = improper dihedral of ``m2`` relative to ``m1``, centre +pi/2; swap ``m1 <-> m2``.

Planar pairs (NH2 of Asn, Gln, Arg; COO- of Asp, Glu) keep their labels: the flow models both of their
labellings itself (exact, just less efficient).

The flow's density ``q_c`` lives on canonical configurations only (its sense dihedrals are bounded to their half
circles by construction), and a sample's swaps are applied with probability 1/2 each, so the density of a
labelled configuration is exactly ``p(x) = 2^{-G} sum_{S} q_c(tau_S x)`` over the subsets of swaps that make
``tau_S x`` canonical; for any sensible geometry exactly one subset does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .zmatrix import ZMatrix

__all__ = ["TwinSwap", "twin_swaps", "sense_values", "in_half", "apply_swaps", "canonical_masks", "canonicalize"]


@dataclass(frozen=True)
class TwinSwap:
    """One twin group's canonical-sense rule (build positions ``sense``/``other``, atom indices ``a``/``b``).

    ``other`` gives the sense dihedral the configuration would have after the swap: ``other[2]`` times the
    dihedral at build position ``other[0]``, plus the one at ``other[1]`` when that is not -1 (dihedrals about
    one axis add).
    """

    sense: int
    centre: float
    a: int
    b: int
    other: tuple


def twin_swaps(encoding, bonds, zmatrix: ZMatrix) -> tuple[TwinSwap, ...]:
    """The swaps of a molecule's twin groups that follow one of the rules of the module notes."""
    n = encoding.n_atoms
    neighbours = [set() for _ in range(n)]
    for i, j in bonds:
        neighbours[int(i)].add(int(j))
        neighbours[int(j)].add(int(i))
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        groups.setdefault((int(encoding.groups[i]), frozenset(neighbours[i])), []).append(i)
    position = zmatrix.position_of
    refs, improper = zmatrix.refs, zmatrix.improper
    swaps = []
    for members in groups.values():
        if len(members) not in (2, 3):
            continue
        m = sorted(members, key=lambda i: position[i])
        p = [int(position[i]) for i in m]
        if any(q < 3 for q in p[1:]) or p[0] < 2:
            continue
        planar = len(neighbours[int(refs[p[0], 0])]) == 3
        if len(m) == 3 and all(improper[q] and refs[q, 2] == m[0] for q in p[1:]):
            swaps.append(TwinSwap(p[1], math.pi / 2, m[1], m[2], (p[2], -1, 1)))
        elif len(m) == 2 and p[0] >= 3 and improper[p[0]] and improper[p[1]] and refs[p[1], 2] == refs[p[0], 2]:
            swaps.append(TwinSwap(p[0], math.pi / 2, m[0], m[1], (p[1], -1, 1)))
        elif len(m) == 2 and not improper[p[0]] and improper[p[1]] and refs[p[1], 2] == m[0] and not planar:
            swaps.append(TwinSwap(p[1], math.pi / 2, m[0], m[1], (p[1], -1, -1)))
        # Planar pairs (NH2, COO-) are left alone: their two labellings are ~180 degrees apart, not exactly, so no
        # half circle separates them everywhere and the flow's support would miss ~1 % of carboxylate frames.
    # Swaps must not move the reference atoms of another swap's sense dihedral (then they are independent).
    atoms_of = lambda s: {int(zmatrix.order[s.sense]), *refs[s.sense].tolist()}  # noqa: E731
    swapped = {a for s in swaps for a in (s.a, s.b)}
    return tuple(s for s in swaps if not (atoms_of(s) - {s.a, s.b}) & swapped)


def _wrap(x: torch.Tensor) -> torch.Tensor:
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


def sense_values(dihedrals: torch.Tensor, swap: TwinSwap) -> tuple[torch.Tensor, torch.Tensor]:
    """``(current, after the swap)`` sense dihedrals ``(B,)`` from ``(B, N)`` build-order dihedrals."""
    other = swap.other[2] * dihedrals[:, swap.other[0]]
    if swap.other[1] >= 0:
        other = other + dihedrals[:, swap.other[1]]
    return dihedrals[:, swap.sense], _wrap(other)


def in_half(values: torch.Tensor, centre: float) -> torch.Tensor:
    """True where a dihedral lies in the open half circle around ``centre``."""
    return _wrap(values - centre).abs() < math.pi / 2


def apply_swaps(x: torch.Tensor, swaps: tuple[TwinSwap, ...], mask: torch.Tensor) -> torch.Tensor:
    """Positions ``(B, N, 3)`` with swap ``g`` applied where ``mask[:, g]`` (a copy)."""
    x = x.clone()
    for g, s in enumerate(swaps):
        rows = mask[:, g]
        if bool(rows.any()):
            a, b = x[rows, s.a].clone(), x[rows, s.b].clone()
            x[rows, s.a], x[rows, s.b] = b, a
    return x


def canonical_masks(dihedrals: torch.Tensor, swaps: tuple[TwinSwap, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample and swap: ``needed`` (only the swapped labelling is canonical), ``ambiguous`` (both are) and
    ``outside`` (neither is: the configuration has zero density), each ``(B, G)`` bool."""
    B = dihedrals.shape[0]
    if not swaps:
        empty = torch.zeros(B, 0, dtype=torch.bool, device=dihedrals.device)
        return empty, empty, empty
    now, after = zip(*(sense_values(dihedrals, s) for s in swaps))
    a = torch.stack([in_half(v, s.centre) for v, s in zip(now, swaps)], 1)
    b = torch.stack([in_half(v, s.centre) for v, s in zip(after, swaps)], 1)
    return ~a & b, a & b, ~a & ~b



def canonicalize(x: torch.Tensor, zmatrix: ZMatrix, swaps: tuple[TwinSwap, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonically labelled copies of configurations ``(B, N, 3)`` and a ``(B,)`` mask of those that have one
    (False: some group has neither labelling canonical, e.g. two methyl hydrogens on the same side)."""
    from .internal_coordinates import to_internal

    needed, _, outside = canonical_masks(to_internal(x, zmatrix)[2], swaps)
    return apply_swaps(x, swaps, needed), ~outside.any(1)
