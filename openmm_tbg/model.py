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

__all__ = ["Flow", "FAMILIES", "SYMMETRIES", "flow_class", "is_flow", "family_of", "resolve_sampling_options",
           "LEGACY_ODE_KEYWORDS"]

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
    #: The family's sampling options: a dataclass whose fields are the options of `sample`/`log_prob`
    #: (`openmm_tbg.flow.ODEOptions` for the CNF, `openmm_tbg.icflow.ICOptions` for the internal-coordinate
    #: flow). Users pass an instance as ``options=`` to `BoltzmannGeneratorSampler` and `TBGMove`.
    options_class: type

    @property
    def config(self) -> dict: ...

    @classmethod
    def from_config(cls, config: dict) -> "Flow": ...

    def check_supported(self, encoding) -> None:
        """Raise `UnsupportedTopologyError` naming what the model supports if it cannot serve ``encoding``."""

    def condition(self, encoding, bonds) -> Any:
        """The per-molecule input of `sample`/`log_prob` (tokens, Z-matrix, ...) from an `AtomEncoding` and
        the bonded atom pairs ``[(i, j), ...]``."""

    def sampling_options(self, options=None, **fields) -> dict:
        """Keyword arguments of `sample`/`log_prob` from an ``options_class`` instance (None: its defaults) or
        its fields, checked and with the family's defaults filled in; ``ValueError`` for options the family
        does not take."""

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


_MEMBERS = ("family", "symmetries", "options_class", "config", "from_config", "check_supported", "condition",
            "sampling_options", "sample", "log_prob")


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


#: Keyword arguments of `BoltzmannGeneratorSampler` and `TBGMove` from before per-family options, by the
#: `openmm_tbg.flow.ODEOptions` field each one sets. Still accepted, with a `DeprecationWarning`.
LEGACY_ODE_KEYWORDS = {"ode_method": "method", "atol": "atol", "rtol": "rtol", "step_size": "step_size",
                       "divergence": "divergence", "quadrature_nodes": "quadrature_nodes",
                       "memory_budget_mib": "memory_budget_mib"}


def resolve_sampling_options(flow: Any, options: Any = None, legacy: dict | None = None, *,
                             where: str = "BoltzmannGeneratorSampler") -> tuple[Any, dict]:
    """The options object and the resolved `sample`/`log_prob` keyword arguments of ``flow``.

    Parameters
    ----------
    flow : Flow
        A flow of a registered family.
    options : dataclass instance, dict or None
        An instance of ``flow.options_class``, a dict of its fields, or None (the family's defaults).
    legacy : dict, optional
        Old-style ODE keyword arguments (`LEGACY_ODE_KEYWORDS`) the caller received in ``**kwargs``. Unknown
        names raise `TypeError`, as Python would; known ones work with a `DeprecationWarning`.
    where : str
        The caller's name, for messages.

    Returns
    -------
    options : dataclass instance
        Of ``flow.options_class``.
    resolved : dict
        ``flow.sampling_options(options)``.
    """
    import dataclasses
    import warnings

    cls = flow.options_class
    legacy = dict(legacy or {})
    unknown = sorted(set(legacy) - set(LEGACY_ODE_KEYWORDS))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}.")
    # quadrature_nodes="default" and None-valued tolerances meant "not given" in the old signature.
    given = {k: v for k, v in legacy.items()
             if not (v is None and k != "quadrature_nodes") and not (isinstance(v, str) and v == "default")}
    if given:
        from .flow import ODEOptions

        fields = {LEGACY_ODE_KEYWORDS[k]: v for k, v in given.items()}
        if options is not None:
            raise ValueError(f"{where}: pass the sampling options either as options= or as the deprecated keyword "
                             f"arguments {sorted(given)}, not both.")
        example = ", ".join(f"{f}={v!r}" for f, v in fields.items())
        warnings.warn(f"{where}({', '.join(sorted(given))}=...) is deprecated: each model family has its own "
                      f"options; pass options=openmm_tbg.ODEOptions({example}) for the egnn-cnf family. These "
                      f"keyword arguments will be removed.", DeprecationWarning, stacklevel=3)
        if cls is ODEOptions:
            options = fields
        else:
            # Old behaviour, kept: values equal to the CNF's defaults (e.g. the CLI's) are ignored, any other
            # could only be a misunderstanding.
            defaults = ODEOptions()
            different = {k: v for k, v in fields.items() if getattr(defaults, k) != v}
            if different:
                raise ValueError(f"{where}: the {flow.family} model takes no ODE options (got {different}); they "
                                 f"apply to the egnn-cnf family only. Its options are {cls.__name__}.")
            options = None
    if options is None:
        options = cls()
    elif isinstance(options, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(options) - names)
        if bad:
            raise ValueError(f"{where}: {bad} are not options of the {flow.family} family; {cls.__name__} has "
                             f"{sorted(names) or 'no fields'}.")
        options = cls(**options)
    elif not isinstance(options, cls):
        raise TypeError(f"{where}: options is a {type(options).__name__}, but the model is of the {flow.family} "
                        f"family, whose options are {cls.__module__}.{cls.__name__}. Pass "
                        f"{cls.__name__}(...) or None.")
    return options, flow.sampling_options(options)
