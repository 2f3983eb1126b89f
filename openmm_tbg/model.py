"""The flow interface that every model family implements, and the registry of families.

The sampler, `TBGMove`, training, evaluation and checkpoints talk to a model only through `Flow`. A family
declares the symmetries of its density (`Flow.symmetries`); the validity checks mirror or relabel a sample
only when the density is invariant under that operation, because only then does the sample keep its weight.

Families
--------
``"egnn-cnf"``
    :class:`openmm_tbg.flow.TransferableFlow`: E(3)- and permutation-equivariant continuous normalizing flow
    (TBG). Density invariant under rotation, reflection and permutations of interchangeable atoms.
``"internal-coordinate"``
    :class:`openmm_tbg.icflow.InternalCoordinateFlow`: coupling flow over bond lengths, angles and dihedrals
    along a Z-matrix, plus a uniform global rotation. Density invariant under rotation only.

Both give ``log q`` on the same space: the 3(N-1)-dimensional centre-of-geometry-free subspace of Cartesian
coordinates in nm, with the Lebesgue measure of an orthonormal basis of that subspace.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

__all__ = ["Flow", "FAMILIES", "SYMMETRIES", "flow_class", "is_flow", "family_of"]

#: Symmetry names a family may declare.
SYMMETRIES = ("rotation", "reflection", "permutation")

#: Family name -> (module, class). The checkpoint stores the family name; `load_model` picks the class here.
FAMILIES: dict[str, tuple[str, str]] = {
    "egnn-cnf": ("openmm_tbg.flow", "TransferableFlow"),
    "internal-coordinate": ("openmm_tbg.icflow", "InternalCoordinateFlow"),
}


@runtime_checkable
class Flow(Protocol):
    """What a model family provides (a `torch.nn.Module` with these members).

    Attributes
    ----------
    family : str
        Key in `FAMILIES`; stored in checkpoints.
    symmetries : frozenset of str
        Operations (names from `SYMMETRIES`) under which the density is invariant. ``"reflection"``: a mirrored
        sample keeps its density, so the validity check may mirror a fully inverted sample. ``"permutation"``:
        relabelling interchangeable atoms keeps the density, so a sample whose bond graph matches only up to
        such a permutation may be relabelled. Without them, such samples are rejected and counted.
    config : dict
        JSON-able; ``type(flow).from_config(config)`` rebuilds the architecture (fresh weights).
    """

    family: str
    symmetries: frozenset

    @property
    def config(self) -> dict: ...

    @classmethod
    def from_config(cls, config: dict) -> "Flow": ...

    def check_supported(self, encoding) -> None:
        """Raise `UnsupportedTopologyError` naming what the model supports if it cannot serve ``encoding``."""

    def condition(self, encoding, bonds) -> Any:
        """The per-molecule input of `sample`/`log_prob` (tokens, Z-matrix, ...) from an `AtomEncoding` and
        the bonded atom pairs ``[(i, j), ...]``."""

    def sampling_options(self, **options) -> dict:
        """Checked keyword options of `sample`/`log_prob` with the family's defaults filled in; raises
        ``ValueError`` for options the family does not take."""

    def sample(self, context, n: int, *, generator=None, batch_size=None, progress: bool = False, **options):
        """``(x_nm (n, N, 3) centred, log_q (n,) float64)`` on the CPU."""

    def log_prob(self, x_nm, context, *, batch_size=None, progress: bool = False, **options):
        """``(n,)`` float64 log density on the centre-free subspace (nm), on the CPU."""


def flow_class(family: str) -> type:
    """The class of a registered family, refusing unknown names with the list of known ones."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; known families are {sorted(FAMILIES)}.")
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


_MEMBERS = ("family", "symmetries", "config", "from_config", "check_supported", "condition", "sampling_options",
            "sample", "log_prob")


def is_flow(obj: Any) -> bool:
    """True if ``obj`` implements `Flow` and names a registered family (members are looked up on the class,
    so no property is evaluated)."""
    return all(hasattr(type(obj), m) for m in _MEMBERS) and getattr(type(obj), "family", None) in FAMILIES


def family_of(obj: Any) -> str:
    """The family name of a flow, or a TypeError that says what a model must be."""
    if not is_flow(obj):
        raise TypeError(f"Expected a flow model of one of the families {sorted(FAMILIES)} (e.g. from "
                        f"openmm_tbg.load_model), got {type(obj).__name__}.")
    return obj.family
