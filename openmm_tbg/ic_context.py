"""Per-molecule input of the internal-coordinate flow: Z-matrix, tokens, graph distances, whitening, base.

`build_context` turns an atom encoding and bonds into an `ICContext`; `collate_contexts` pads several into one
batch; `whiten`/`unwhiten` map internal coordinates to the flow's whitened variables and back with the exact
log-determinant; `base_log_prob` is the factorised base density (standard normal, wrapped normal or uniform).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .ic_statistics import UNIFORM_ABOVE, WhiteningTable
from .twins import twin_swaps
from .zmatrix import ZMatrix, build_zmatrix

__all__ = ["ICContext", "build_context", "collate_contexts", "whiten", "unwhiten", "base_log_prob",
           "NONE", "NORMAL", "WRAPPED_NORMAL", "UNIFORM", "HALF", "CIRCLE", "NARROW_DIHEDRALS"]

logger = logging.getLogger(__name__)

_LOG_2PI = math.log(2 * math.pi)


# Base kinds per coordinate. HALF: a twin group's sense dihedral, bounded to a half circle (`openmm_tbg.twins`)
# by z = (atanh(2 (phi - centre) / pi) - offset) / width with a standard normal base. CIRCLE: a narrow dihedral
# on the whole circle by z = (atanh((phi - centre) / pi) - offset) / width (a bijection from the circle less the
# point opposite the centre onto the real line), so that the splines of [-bound, bound] resolve its width
# instead of a circular spline of [-pi, pi].
NONE, NORMAL, WRAPPED_NORMAL, UNIFORM, HALF, CIRCLE = 0, 1, 2, 3, 4, 5
#: How narrow dihedrals (circular std below `UNIFORM_ABOVE`) are whitened: "wrapped" (a wrapped-normal base on
#: the circle, the first shipped model's way) or "atanh" (CIRCLE).
NARROW_DIHEDRALS = ("wrapped", "atanh")


@dataclass
class ICContext:
    """Per-molecule input of the internal-coordinate flow (`InternalCoordinateFlow.condition`).

    All arrays are in Z-matrix build order: ``tokens`` (N, 4) [residue index, amino acid, atom class, role],
    ``distances`` (N, N) bond-graph distances, ``dof`` (N, 3) which coordinates exist, ``centre``/``width``/
    ``offset`` (N, 3) whitening, ``base`` (N, 3) base-distribution kinds; ``swaps`` the twin groups' canonical
    sense rules; ``fallbacks`` the coordinates whose key had no statistics of its own, as
    ``(build position, channel, key, source)`` with ``source`` the fallback that whitened it
    (`openmm_tbg.ic_statistics.WhiteningTable.resolve`: ``"own-residue"``, ``"generic"`` or ``"default"``), and
    ``fallback_rule`` the table's rule. Both say how much of the density rests on the fallback.
    """

    zmatrix: ZMatrix
    tokens: torch.Tensor
    distances: torch.Tensor
    dof: torch.Tensor
    centre: torch.Tensor
    width: torch.Tensor
    base: torch.Tensor
    offset: torch.Tensor
    swaps: tuple = ()
    sequence: str = ""
    fallbacks: tuple = ()
    fallback_rule: str = ""

    @property
    def n_atoms(self) -> int:
        return self.zmatrix.n_atoms


def collate_contexts(contexts: Sequence[ICContext], device=None) -> dict[str, torch.Tensor]:
    """Stack contexts into padded ``(B, N_max, ...)`` tensors plus an atom ``mask``."""
    n_max = max(c.n_atoms for c in contexts)
    B = len(contexts)
    out = {"tokens": torch.zeros(B, n_max, 4, dtype=torch.long),
           "distances": torch.zeros(B, n_max, n_max, dtype=torch.long),
           "dof": torch.zeros(B, n_max, 3, dtype=torch.bool),
           "centre": torch.zeros(B, n_max, 3, dtype=torch.float64),
           "width": torch.ones(B, n_max, 3, dtype=torch.float64),
           "base": torch.zeros(B, n_max, 3, dtype=torch.long),
           "offset": torch.zeros(B, n_max, 3, dtype=torch.float64),
           "mask": torch.zeros(B, n_max, dtype=torch.bool)}
    for b, c in enumerate(contexts):
        n = c.n_atoms
        for key in ("tokens", "dof", "centre", "width", "base", "offset"):
            out[key][b, :n] = getattr(c, key)
        out["distances"][b, :n, :n] = c.distances
        out["mask"][b, :n] = True
    return {k: v.to(device) for k, v in out.items()}


def _graph_distances(n: int, bonds: Sequence[tuple[int, int]]) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import shortest_path

    if not bonds:
        return np.zeros((n, n), dtype=np.int64)
    i, j = np.asarray(bonds, dtype=np.int64).T
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    d = shortest_path(graph, directed=False, unweighted=True)
    return np.where(np.isfinite(d), d, 99).astype(np.int64)


def _atanh_whitening(mu: float, sigma: float, centre: float, factor: float) -> tuple[float, float]:
    """``(offset, width)`` in atanh space of a HALF (``factor`` 2/pi) or CIRCLE (1/pi) entry whose data have
    circular mean ``mu`` and standard deviation ``sigma`` (rad): the linearised image of N(mu, sigma)."""
    s = float(np.clip(factor * (math.remainder(mu - centre, 2 * math.pi)), -0.95, 0.95))
    # Width at most 1: |offset| + 5 widths stays below ~7, where tanh is still 1e-6 from +-1, so no draw lands
    # on the boundary of its interval within round-off (training data give widths below 0.1; only keys without
    # statistics, in toy systems, were broader).
    return math.atanh(s), float(np.clip(sigma * factor / (1 - s * s), 1e-3, 1.0))


def _atanh_factor(base: torch.Tensor) -> torch.Tensor:
    """``s = factor * (phi - centre)`` maps a HALF entry's half circle, or a CIRCLE entry's circle, onto (-1, 1)."""
    half = torch.full(base.shape, 2 / math.pi, dtype=torch.float64, device=base.device)  # float64 throughout:
    return torch.where(base == HALF, half, half / 2)  # a float32 2/pi put HALF draws ~1e-7 outside their interval


def base_log_prob(z: torch.Tensor, base: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Per-entry log density of the factorised base (0 where ``base == NONE``)."""
    z, width = z.double(), width.double()
    normal = -0.5 * z * z - 0.5 * _LOG_2PI
    base = torch.where((base == HALF) | (base == CIRCLE), torch.full_like(base, NORMAL), base)
    k = torch.arange(-3, 4, dtype=z.dtype, device=z.device) * (2 * math.pi)
    s = torch.where(base == WRAPPED_NORMAL, width, torch.ones_like(width))[..., None]
    wrapped = torch.logsumexp(-0.5 * ((z[..., None] + k) / s) ** 2, -1) - torch.log(s[..., 0]) - 0.5 * _LOG_2PI
    out = torch.where(base == NORMAL, normal, torch.zeros_like(z))
    out = torch.where(base == WRAPPED_NORMAL, wrapped, out)
    return torch.where(base == UNIFORM, torch.full_like(z, -_LOG_2PI), out)


def build_context(encoding: Any, bonds: Sequence[tuple[int, int]], table: WhiteningTable,
                  narrow_dihedrals: str = "wrapped", ring_closure: str = "angle") -> ICContext:
    """The `ICContext` of a molecule: Z-matrix (``ring_closure``: `openmm_tbg.zmatrix`), build-order tokens,
    graph distances and the whitening of every coordinate from ``table`` (twin sense dihedrals get the bounded
    HALF treatment; narrow dihedrals a wrapped normal or, with ``narrow_dihedrals="atanh"``, the CIRCLE map;
    closure distances a normal base like bonds)."""
    if narrow_dihedrals not in NARROW_DIHEDRALS:
        raise ValueError(f"narrow_dihedrals must be one of {NARROW_DIHEDRALS}, got {narrow_dihedrals!r}.")
    zm = build_zmatrix(encoding, bonds, ring_closure=ring_closure)
    order = zm.order
    roles = np.array([min(p, 3) for p in range(zm.n_atoms)]) + 4 * zm.improper.astype(np.int64)
    # Role tokens 0-3 (build position), 7 (improper); closing atoms whose second coordinate is a distance get
    # the otherwise unused 4 (proper) and 5 (improper), so the conditioner can tell that channel apart.
    closing = zm.closure_positions
    roles[closing] = 4 + zm.improper[closing].astype(np.int64)
    tokens = np.stack([encoding.residue_index[order], encoding.amino_acid[order],
                       encoding.atom_class[order], roles], 1)
    dist = _graph_distances(zm.n_atoms, bonds)[np.ix_(order, order)]
    centre = np.zeros((zm.n_atoms, 3))
    width = np.ones((zm.n_atoms, 3))
    offset = np.zeros((zm.n_atoms, 3))
    base = np.zeros((zm.n_atoms, 3), dtype=np.int64)
    swaps = twin_swaps(encoding, bonds, zm)
    half = {sw.sense: sw.centre for sw in swaps}
    fallbacks = []
    for p, keys in enumerate(zm.keys):
        for c, key in enumerate(keys):
            if not key:
                continue
            mu, sigma, source = table.resolve(key)
            if source != "seen":
                fallbacks.append((p, c, key, source))
            if c < 2:
                centre[p, c], width[p, c], base[p, c] = mu, sigma, NORMAL
            elif p in half:
                centre[p, c], base[p, c] = half[p], HALF
                offset[p, c], width[p, c] = _atanh_whitening(mu, min(sigma, 2.0), half[p], 2 / math.pi)
            elif sigma < UNIFORM_ABOVE and narrow_dihedrals == "atanh":
                centre[p, c], base[p, c] = mu, CIRCLE
                offset[p, c], width[p, c] = _atanh_whitening(mu, sigma, mu, 1 / math.pi)
            elif sigma < UNIFORM_ABOVE:
                centre[p, c], width[p, c], base[p, c] = mu, sigma, WRAPPED_NORMAL
            else:
                base[p, c] = UNIFORM
    if fallbacks:
        counts = {s: sum(f[3] == s for f in fallbacks) for s in ("own-residue", "generic", "default")}
        logger.info("%s: %d of %d coordinates whitened by fallback (rule %r): %s",
                    getattr(encoding, "sequence", "molecule"), len(fallbacks), int(zm.dof_mask.sum()),
                    table.fallback, ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return ICContext(zmatrix=zm, tokens=torch.as_tensor(tokens, dtype=torch.long),
                     distances=torch.as_tensor(dist), dof=torch.as_tensor(zm.dof_mask),
                     centre=torch.as_tensor(centre), width=torch.as_tensor(width),
                     base=torch.as_tensor(base), offset=torch.as_tensor(offset), swaps=swaps,
                     sequence=getattr(encoding, "sequence", ""), fallbacks=tuple(fallbacks),
                     fallback_rule=table.fallback)


def whiten(ic: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, log |dz/dic|)`` from ``(B, N, 3)`` internal coordinates (float64); ``z`` is infinite where a
    HALF entry lies outside its half circle (a non-canonical labelling) or a CIRCLE entry exactly opposite its
    centre."""
    centre, width, base, offset = batch["centre"], batch["width"], batch["base"], batch["offset"]
    scaled = (ic - centre) / width
    shifted = torch.remainder(ic - centre + math.pi, 2 * math.pi) - math.pi
    atanh_kind = (base == HALF) | (base == CIRCLE)
    factor = _atanh_factor(base)
    s = shifted * factor
    inside = s.abs() < 1
    s_safe = torch.where(inside & atanh_kind, s, torch.zeros_like(s))
    mapped = torch.where(inside, (torch.atanh(s_safe) - offset) / width, torch.full_like(s, float("inf")))
    z = torch.where(base == NORMAL, scaled, torch.where(base == NONE, torch.zeros_like(ic), shifted))
    z = torch.where(atanh_kind, mapped, z)
    log_det = torch.where(base == NORMAL, -torch.log(width), torch.zeros_like(width))
    mapped_det = torch.log(factor) - torch.log1p(-s_safe * s_safe) - torch.log(width)
    log_det = torch.where(atanh_kind, mapped_det, log_det)
    return z, log_det.sum((1, 2))

def unwhiten(z: torch.Tensor, batch: dict) -> torch.Tensor:
    centre, width, base, offset = batch["centre"], batch["width"], batch["base"], batch["offset"]
    shifted = torch.remainder(z + centre + math.pi, 2 * math.pi) - math.pi
    mapped = centre + torch.tanh(offset + width * z) / _atanh_factor(base)
    out = torch.where(base == NORMAL, centre + width * z, torch.where(base == NONE, torch.zeros_like(z),
                                                                       shifted))
    wrapped = torch.remainder(mapped + math.pi, 2 * math.pi) - math.pi  # CIRCLE: back into [-pi, pi)
    out = torch.where(base == CIRCLE, wrapped, out)
    return torch.where(base == HALF, mapped, out)
