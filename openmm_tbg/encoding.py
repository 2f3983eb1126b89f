"""Atom encoding of peptide topologies for the transferable flow ("TBG + full" encoding).

Every atom gets three integer tokens: the 0-based position of its residue in the chain, the amino-acid type
(one of the 20 standard amino acids) and an atom-name class. Atom-name classes follow Klein & Noe (TBG, "full"
encoding): digits are stripped from hydrogen names and from the carboxylate/amide oxygens OD*/OE*, except for
the aromatic hydrogens of HIS, PHE, TRP and TYR, which keep their digits. Atoms with identical token rows are
interchangeable for the flow (e.g. the three hydrogens of a methyl group).

Version ``tbg-full-v2`` refines the hydrogen rule: a hydrogen's class names the heavy atom it is bonded to, so
hydrogens on different heavy atoms are never interchangeable. Under the plain rule (``tbg-full-v1``) Thr's
hydroxyl H (HG1, on OG1) and its methyl H's (HG21-23, on CG2) were all "HG", as were the H's of Val's, Leu's and
Ile's two methyls and of Arg's two NH2 groups. An equivariant flow must then break that symmetry from the
prior sample alone, and the v1 model trained here never learned to: the eight Thr, Val, Leu and Ile test
dipeptides had 0-3 % valid samples (benchmarks/validity_rate.py, 64 samples each), nearly all rejected by the
bond graph at those hydrogens. In v2 those hydrogens get the classes HG1 (Thr), HG1*, HG2*, HD1*, HD2*, HE2*, HH1*,
HH2* (``*``: all H's on that heavy atom); every other class is unchanged.

Only zwitterionic (NH3+ ... COO-) linear peptides of standard L-amino acids in one chain are supported. Anything
else raises :class:`UnsupportedTopologyError` with a message that names the offending residue or atom.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .chirality import check_chirality, chiral_centers, signed_volumes  # noqa: F401 (re-exported)
from .residues import AMINO_ACIDS, UnsupportedTopologyError  # noqa: F401 (re-exported; they live there)

logger = logging.getLogger(__name__)

ENCODING_VERSION = "tbg-full-v2"


#: One-letter code -> three-letter code of the 20 standard amino acids.
ONE_TO_THREE: dict[str, str] = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY",
    "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER",
    "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
}
THREE_TO_ONE: dict[str, str] = {v: k for k, v in ONE_TO_THREE.items()}

# Heavy atoms and hydrogens of each residue in the middle of a chain, as named by OpenMM's amber14 templates
# (tests/test_encoding.py checks this table against amber14-all.xml). Histidine has three protonation
# variants; topologies usually call all of them HIS, so the variant is recognised from the hydrogens present.
_BACKBONE = ("N", "H", "CA", "HA", "C", "O")
_SIDE_CHAINS: dict[str, tuple[str, ...]] = {
    "ALA": ("CB", "HB1", "HB2", "HB3"),
    "ARG": ("CB", "HB2", "HB3", "CG", "HG2", "HG3", "CD", "HD2", "HD3", "NE", "HE", "CZ",
            "NH1", "HH11", "HH12", "NH2", "HH21", "HH22"),
    "ASN": ("CB", "HB2", "HB3", "CG", "OD1", "ND2", "HD21", "HD22"),
    "ASP": ("CB", "HB2", "HB3", "CG", "OD1", "OD2"),
    "CYS": ("CB", "HB2", "HB3", "SG", "HG"),
    "GLN": ("CB", "HB2", "HB3", "CG", "HG2", "HG3", "CD", "OE1", "NE2", "HE21", "HE22"),
    "GLU": ("CB", "HB2", "HB3", "CG", "HG2", "HG3", "CD", "OE1", "OE2"),
    "GLY": (),
    "HID": ("CB", "HB2", "HB3", "CG", "ND1", "HD1", "CE1", "HE1", "NE2", "CD2", "HD2"),
    "HIE": ("CB", "HB2", "HB3", "CG", "ND1", "CE1", "HE1", "NE2", "HE2", "CD2", "HD2"),
    "HIP": ("CB", "HB2", "HB3", "CG", "ND1", "HD1", "CE1", "HE1", "NE2", "HE2", "CD2", "HD2"),
    "ILE": ("CB", "HB", "CG2", "HG21", "HG22", "HG23", "CG1", "HG12", "HG13", "CD1", "HD11", "HD12", "HD13"),
    "LEU": ("CB", "HB2", "HB3", "CG", "HG", "CD1", "HD11", "HD12", "HD13", "CD2", "HD21", "HD22", "HD23"),
    "LYS": ("CB", "HB2", "HB3", "CG", "HG2", "HG3", "CD", "HD2", "HD3", "CE", "HE2", "HE3",
            "NZ", "HZ1", "HZ2", "HZ3"),
    "MET": ("CB", "HB2", "HB3", "CG", "HG2", "HG3", "SD", "CE", "HE1", "HE2", "HE3"),
    "PHE": ("CB", "HB2", "HB3", "CG", "CD1", "HD1", "CE1", "HE1", "CZ", "HZ", "CE2", "HE2", "CD2", "HD2"),
    "PRO": ("CD", "HD2", "HD3", "CG", "HG2", "HG3", "CB", "HB2", "HB3"),
    "SER": ("CB", "HB2", "HB3", "OG", "HG"),
    "THR": ("CB", "HB", "CG2", "HG21", "HG22", "HG23", "OG1", "HG1"),
    "TRP": ("CB", "HB2", "HB3", "CG", "CD1", "HD1", "NE1", "HE1", "CE2", "CZ2", "HZ2", "CH2", "HH2",
            "CZ3", "HZ3", "CE3", "HE3", "CD2"),
    "TYR": ("CB", "HB2", "HB3", "CG", "CD1", "HD1", "CE1", "HE1", "CZ", "OH", "HH", "CE2", "HE2", "CD2", "HD2"),
    "VAL": ("CB", "HB", "CG1", "HG11", "HG12", "HG13", "CG2", "HG21", "HG22", "HG23"),
}
HISTIDINE_VARIANTS = ("HID", "HIE", "HIP")
#: Residue name in a topology -> amino acid (HIS variants all map to HIS).
_RESIDUE_ALIASES: dict[str, str] = {**{aa: aa for aa in AMINO_ACIDS}, **{v: "HIS" for v in HISTIDINE_VARIANTS}}
_N_TERMINAL_H = ("H", "H2", "H3")      # NH3+; proline has only H2, H3
_AROMATIC = ("HIS", "PHE", "TRP", "TYR")

# Residue names that are recognised only to give a specific error message.
_WATER = {"HOH", "WAT", "H2O", "TIP", "TIP3", "TIP4", "TIP5", "SPC", "SOL", "T3P", "T4P", "T4E", "OPC"}
_IONS = {"NA", "CL", "K", "MG", "CA", "ZN", "LI", "RB", "CS", "F", "BR", "I", "NA+", "CL-", "K+", "SOD", "CLA",
         "POT", "CAL", "MN", "FE", "CU", "CO", "NI", "CD", "SR", "BA", "IOD", "Na+", "Cl-"}
_CAPS = {"ACE", "NME", "NMA", "NHE", "NH2", "CT3", "FOR"}
_PROTONATION_VARIANTS = {"ASH": "ASP", "GLH": "GLU", "LYN": "LYS", "CYX": "CYS", "CYM": "CYS", "ARN": "ARG",
                         "TYM": "TYR", "HYP": "PRO"}
_SUPPORTED = ("supported: one chain of a linear zwitterionic peptide (NH3+ ... COO-) of the 20 standard "
              "L-amino acids with all hydrogens (HIS as HID, HIE or HIP), in vacuum/implicit solvent")


def atom_name_class_v1(amino_acid: str, atom_name: str) -> str:
    """Atom-name class of one atom under the plain TBG "full" rule (encoding ``tbg-full-v1``).

    Parameters
    ----------
    amino_acid : str
        Three-letter code of the residue (HIS variants may be given as HIS, HID, HIE or HIP).
    atom_name : str
        Atom name as in the topology (amber/PDB names, e.g. ``"HB2"``, ``"OD1"``).

    Returns
    -------
    str
        ``atom_name`` with digits removed from hydrogens and from OD*/OE* oxygens, except for the aromatic
        ring hydrogens (HD*, HE*, HZ*, HH*) of HIS, PHE, TRP and TYR, which keep their digits.
    """
    aa = _RESIDUE_ALIASES.get(amino_acid, amino_acid)
    if atom_name.startswith("H"):
        if aa in _AROMATIC and atom_name[:2] in ("HD", "HE", "HZ", "HH"):
            return atom_name
        return re.sub(r"\d", "", atom_name)
    if atom_name[:2] in ("OD", "OE"):
        return re.sub(r"\d", "", atom_name)
    return atom_name


@functools.lru_cache(maxsize=None)
def _heavy_suffixes(aa: str) -> tuple[str, ...]:
    """Name suffixes (name without the element letter) of a residue's heavy atoms, longest first."""
    variants = HISTIDINE_VARIANTS if aa == "HIS" else (aa,)
    names = {n for v in variants for n in list(_BACKBONE) + list(_SIDE_CHAINS[v]) if not n.startswith("H")}
    return tuple(sorted({n[1:] for n in names}, key=len, reverse=True))


def atom_name_class(amino_acid: str, atom_name: str) -> str:
    """Atom-name class of one atom (encoding ``tbg-full-v2``).

    Parameters
    ----------
    amino_acid, atom_name : str
        Residue code and atom name, as for :func:`atom_name_class_v1`.

    Returns
    -------
    str
        As :func:`atom_name_class_v1`, except for a hydrogen whose heavy atom has a digit in its name: its class
        is ``"H" + <heavy atom suffix>``, with ``*`` appended when several hydrogens share that heavy atom (Thr
        HG1 -> ``HG1``; Val HG21 -> ``HG2*``; Leu HD11 -> ``HD1*``; Arg HH12 -> ``HH1*``). Hydrogens on
        different heavy atoms thus never share a class.
    """
    aa = _RESIDUE_ALIASES.get(amino_acid, amino_acid)
    plain = atom_name_class_v1(amino_acid, atom_name)
    if not atom_name.startswith("H") or plain == atom_name or aa not in _RESIDUE_ALIASES.values():
        return plain
    rest = atom_name[1:]
    parent = next((sfx for sfx in _heavy_suffixes(aa) if rest.startswith(sfx)), "")
    if not re.search(r"\d", parent):
        return plain  # e.g. HB2 on CB -> HB: unchanged
    return "H" + parent + ("" if rest == parent else "*")


def _residue_atom_names(variant: str, n_terminal: bool, c_terminal: bool) -> tuple[str, ...]:
    """Expected atom names of a residue variant at a given chain position (amber names, N-terminal H/H2/H3)."""
    names = list(_BACKBONE) + list(_SIDE_CHAINS[variant])
    if variant == "PRO":
        names.remove("H")
    if variant == "GLY":
        names[names.index("HA"):names.index("HA") + 1] = ["HA2", "HA3"]
    if n_terminal:
        names = [n for n in names if n != "H"]
        names[1:1] = ["H2", "H3"] if variant == "PRO" else list(_N_TERMINAL_H)
    if c_terminal:
        names.append("OXT")
    return tuple(names)


def _build_atom_name_classes(rule=None) -> tuple[str, ...]:
    rule = atom_name_class if rule is None else rule
    classes = set()
    for variant in _SIDE_CHAINS:
        for n_term in (False, True):
            for c_term in (False, True):
                for name in _residue_atom_names(variant, n_term, c_term):
                    classes.add(rule(variant, name))
    return tuple(sorted(classes))


#: All atom-name classes (sorted); the index is the atom-class token.
ATOM_NAME_CLASSES: tuple[str, ...] = _build_atom_name_classes()
_CLASS_INDEX = {c: i for i, c in enumerate(ATOM_NAME_CLASSES)}
#: The atom-name classes of encoding ``tbg-full-v1`` (for upgrading old checkpoints).
ATOM_NAME_CLASSES_V1: tuple[str, ...] = _build_atom_name_classes(atom_name_class_v1)


def v1_class_of(atom_class: str) -> str:
    """The ``tbg-full-v1`` class that a ``tbg-full-v2`` class was split from (itself if unchanged)."""
    if atom_class in ATOM_NAME_CLASSES_V1:
        return atom_class
    return re.sub(r"[\d*]", "", atom_class)


_AA_INDEX = {aa: i for i, aa in enumerate(AMINO_ACIDS)}


@dataclass(frozen=True, eq=False)
class AtomEncoding:
    """Per-atom tokens of a peptide topology.

    Attributes
    ----------
    residue_index : numpy.ndarray
        int64 (n_atoms,), 0-based position of the atom's residue in the chain.
    amino_acid : numpy.ndarray
        int64 (n_atoms,), index into :data:`AMINO_ACIDS`.
    atom_class : numpy.ndarray
        int64 (n_atoms,), index into :data:`ATOM_NAME_CLASSES`.
    atom_names, residue_names, elements : tuple of str
        Per atom: topology atom name, residue name (as in the topology), element symbol.
    masses : numpy.ndarray
        float64 (n_atoms,), dalton.
    """

    residue_index: np.ndarray
    amino_acid: np.ndarray
    atom_class: np.ndarray
    atom_names: tuple[str, ...]
    residue_names: tuple[str, ...]
    elements: tuple[str, ...]
    masses: np.ndarray

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return int(self.residue_index.shape[0])

    @property
    def n_residues(self) -> int:
        """Number of residues in the chain."""
        return int(self.residue_index.max()) + 1 if self.n_atoms else 0

    @property
    def sequence(self) -> str:
        """One-letter sequence, N-terminus first."""
        seq = [""] * self.n_residues
        for r, aa in zip(self.residue_index, self.amino_acid):
            seq[r] = THREE_TO_ONE[AMINO_ACIDS[aa]]
        return "".join(seq)

    @property
    def tokens(self) -> np.ndarray:
        """int64 (n_atoms, 3): columns [residue_index, amino_acid, atom_class]."""
        return np.stack([self.residue_index, self.amino_acid, self.atom_class], axis=1).astype(np.int64)

    @property
    def groups(self) -> np.ndarray:
        """int64 (n_atoms,): atoms with identical token rows (interchangeable atoms) share a group id.

        Ids are numbered in order of first appearance.
        """
        _, first, inverse = np.unique(self.tokens, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        # Renumber by first appearance so that ids do not depend on the token values' sort order.
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        return rank[inverse].astype(np.int64)

    def interchangeable_groups(self) -> list[np.ndarray]:
        """Index arrays (sorted) of the groups that contain more than one atom."""
        groups = self.groups
        out = []
        for g in range(int(groups.max()) + 1 if groups.size else 0):
            idx = np.flatnonzero(groups == g)
            if idx.size > 1:
                out.append(idx.astype(np.int64))
        return out

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, AtomEncoding):
            return NotImplemented
        return (np.array_equal(self.tokens, other.tokens) and self.atom_names == other.atom_names
                and self.elements == other.elements)

    __hash__ = None  # type: ignore[assignment]


def _residue_label(residue) -> str:
    chain = residue.chain.id if residue.chain is not None else "?"
    return f"residue {residue.name}{residue.id} (index {residue.index}, chain {chain!r})"


def _check_topology_type(topology) -> None:
    import openmm.app

    if isinstance(topology, openmm.app.Topology):
        return
    module = type(topology).__module__
    if module.startswith("mdtraj"):
        raise TypeError("encode_topology() needs an openmm.app.Topology, got an mdtraj Topology; "
                        "convert it with `mdtraj_topology.to_openmm()`.")
    raise TypeError(f"encode_topology() needs an openmm.app.Topology, got {type(topology).__name__}; "
                    "load structures with openmm.app.PDBFile(...).topology (or mdtraj `top.to_openmm()`).")


def _classify_residue(residue) -> str:
    """Return the amino acid (three-letter) of a residue, or raise with a specific message."""
    name = residue.name.strip()
    if name in _RESIDUE_ALIASES:
        return _RESIDUE_ALIASES[name]
    upper = name.upper()
    label = _residue_label(residue)
    if upper in _WATER:
        raise UnsupportedTopologyError(
            f"{label} is water. Explicit solvent is not supported; remove it with "
            f"openmm.app.Modeller.deleteWater() and use an implicit-solvent System. ({_SUPPORTED})")
    if upper in _IONS or sum(1 for _ in residue.atoms()) == 1:
        raise UnsupportedTopologyError(
            f"{label} is an ion or single-atom residue. Ions are not supported; remove them "
            f"(Modeller.delete). ({_SUPPORTED})")
    if upper in _CAPS:
        raise UnsupportedTopologyError(
            f"{label} is a terminal cap ({name}). Capped peptides (ACE/NME) are not supported; the flow was "
            f"trained on zwitterionic termini: build the peptide with openmm_tbg.build_peptide(sequence). "
            f"({_SUPPORTED})")
    if upper in _PROTONATION_VARIANTS:
        raise UnsupportedTopologyError(
            f"{label} is the non-standard protonation/bonding state {name} of "
            f"{_PROTONATION_VARIANTS[upper]}. Only the standard pH 7 states (and HID/HIE/HIP) are supported; "
            f"rebuild with Modeller.addHydrogens(pH=7). ({_SUPPORTED})")
    raise UnsupportedTopologyError(
        f"{label} is not a standard amino acid (ligand, D-amino acid or modified residue?). Supported "
        f"residue names: {', '.join(AMINO_ACIDS + HISTIDINE_VARIANTS)}. ({_SUPPORTED})")


def _histidine_variant(names: set[str]) -> str:
    hd1, he2 = "HD1" in names, "HE2" in names
    if hd1 and he2:
        return "HIP"
    if he2:
        return "HIE"
    return "HID"


def _check_single_chain(topology) -> None:
    """Refuse a topology whose residues lie in more than one (non-empty) chain."""
    chains = [c for c in topology.chains() if len(list(c.residues())) > 0]
    if len(chains) != 1:
        raise UnsupportedTopologyError(
            f"The topology has {len(chains)} chains ({', '.join(repr(c.id) for c in chains)}); only a single "
            f"peptide chain is supported. Encode each peptide separately. ({_SUPPORTED})")


def _check_expected_atoms(residue, variant: str, nameset: set[str], pos: int, n: int) -> None:
    """Refuse a residue whose atom names are not those of ``variant`` at sequence position ``pos`` of ``n``.

    The message lists the missing and unexpected names and, where the cause is typical (no hydrogens, a
    neutral or capped terminus), how to fix it.
    """
    expected = set(_residue_atom_names(variant, pos == 0, pos == n - 1))
    missing, extra = sorted(expected - nameset), sorted(nameset - expected)
    if not (missing or extra):
        return
    where = ("N-terminal " if pos == 0 else "") + ("C-terminal " if pos == n - 1 else "")
    hint = ""
    if not any(a.element is not None and a.element.symbol == "H" for a in residue.atoms()):
        hint = " The residue has no hydrogens: add them with openmm.app.Modeller.addHydrogens(forcefield, pH=7)."
    elif pos == 0 and "H2" in missing:
        hint = " The N-terminus must be NH3+ (zwitterion); caps and neutral termini are not supported."
    elif pos == n - 1 and "OXT" in missing:
        hint = " The C-terminus must be COO- with an OXT atom (zwitterion)."
    raise UnsupportedTopologyError(
        f"{_residue_label(residue)} ({where}{variant}) does not match the expected atoms of a zwitterionic "
        f"peptide: missing {missing}, unexpected {extra}.{hint} ({_SUPPORTED})")


def _checked_atom_names(residue, aa: str, pos: int, n: int) -> tuple[str, list[str]]:
    """The residue's variant and its atom names in the templates' spelling, checked against that variant.

    Parameters
    ----------
    residue : openmm.app.topology.Residue
    aa : str
        Its amino acid (`_classify_residue`).
    pos, n : int
        Its position in the chain and the chain's length (termini have their own atoms).

    Returns
    -------
    variant : str
        ``aa``, or HID/HIE/HIP for histidine (from its hydrogens).
    names : list of str
        Atom names in residue order, the N-terminal ``H1`` spelled ``H``.
    """
    names = [a.name for a in residue.atoms()]
    label = _residue_label(residue)
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise UnsupportedTopologyError(f"{label} has duplicate atom names {dupes}; atom names must be unique "
                                       "within a residue.")
    # OpenMM's amber templates call the first N-terminal hydrogen H1; PDB files call it H.
    norm = ["H" if (pos == 0 and x == "H1") else x for x in names]
    nameset = set(norm)
    variant = _histidine_variant(nameset) if aa == "HIS" else aa
    if residue.name in HISTIDINE_VARIANTS and residue.name != variant:
        raise UnsupportedTopologyError(
            f"{label} is named {residue.name} but its hydrogens match {variant} "
            f"(HD1 {'present' if 'HD1' in nameset else 'absent'}, HE2 {'present' if 'HE2' in nameset else 'absent'}).")
    _check_expected_atoms(residue, variant, nameset, pos, n)
    return variant, norm


def _encode_atoms(residues: list, amino: list[str]) -> dict[str, list]:
    """Per-atom columns of `AtomEncoding` (token parts, names, elements, masses in dalton), residue by residue.

    Refuses residues with wrong atoms (`_checked_atom_names`), atoms out of residue order and atoms without
    an element.
    """
    n = len(residues)
    columns: dict[str, list] = {key: [] for key in ("residue_index", "amino_acid", "atom_class", "atom_names",
                                                    "residue_names", "elements", "masses")}
    expected_index = 0
    for pos, (residue, aa) in enumerate(zip(residues, amino)):
        variant, norm = _checked_atom_names(residue, aa, pos, n)
        label = _residue_label(residue)
        for atom, name in zip(residue.atoms(), norm):
            if atom.index != expected_index:
                raise UnsupportedTopologyError(
                    f"Atom {atom.name} of {label} has index {atom.index} but position {expected_index} in "
                    "residue order; atoms must be ordered residue by residue.")
            expected_index += 1
            if atom.element is None:
                raise UnsupportedTopologyError(f"Atom {atom.name} of {label} has no element; set elements "
                                               "(e.g. load the structure with openmm.app.PDBFile).")
            columns["residue_index"].append(pos)
            columns["amino_acid"].append(_AA_INDEX[aa])
            columns["atom_class"].append(_CLASS_INDEX[atom_name_class(variant, name)])
            columns["atom_names"].append(atom.name)
            columns["residue_names"].append(residue.name)
            columns["elements"].append(atom.element.symbol)
            columns["masses"].append(atom.element.mass.value_in_unit(atom.element.mass.unit))
    return columns


def _check_peptide_bonds(topology, residues: list) -> None:
    """Refuse a chain without a C-N peptide bond between consecutive residues, if the topology has bonds.

    Topologies without bonds (e.g. built atom by atom) are not checked; PDBFile/Modeller topologies have them.
    """
    if topology.getNumBonds() == 0:
        return
    bonded = {frozenset((b[0].index, b[1].index)) for b in topology.bonds()}
    for i in range(len(residues) - 1):
        c = next(a for a in residues[i].atoms() if a.name == "C")
        nn = next(a for a in residues[i + 1].atoms() if a.name == "N")
        if frozenset((c.index, nn.index)) not in bonded:
            raise UnsupportedTopologyError(
                f"No peptide bond between C of {_residue_label(residues[i])} and N of "
                f"{_residue_label(residues[i + 1])}; only linear peptides in chain order are supported. "
                f"({_SUPPORTED})")


def encode_topology(topology, positions=None) -> AtomEncoding:
    """Encode an OpenMM topology of a zwitterionic peptide into per-atom tokens.

    Parameters
    ----------
    topology : openmm.app.Topology
        One chain of a linear peptide of standard amino acids with zwitterionic termini and all hydrogens.
        An mdtraj topology must be converted first (``top.to_openmm()``).
    positions : Quantity or array-like, optional
        Coordinates (n_atoms, 3) or (n_frames, n_atoms, 3), nm if unitless. When given, the chirality of every
        chiral centre is checked and D-amino acids are refused.

    Returns
    -------
    AtomEncoding

    Raises
    ------
    TypeError
        ``topology`` is not an ``openmm.app.Topology``.
    UnsupportedTopologyError
        Water, ions, ligands, caps, non-standard residues, more than one chain, missing or extra atoms, broken
        chain, or (with ``positions``) D-configured chiral centres. The message names the residue or atom.
    """
    _check_topology_type(topology)
    residues = list(topology.residues())
    if not residues:
        raise UnsupportedTopologyError(f"The topology has no residues. ({_SUPPORTED})")
    # Name the offending residue first (water/ion/ligand), since those usually sit in extra chains.
    amino = [_classify_residue(r) for r in residues]
    _check_single_chain(topology)
    columns = _encode_atoms(residues, amino)
    n_encoded = len(columns["atom_names"])
    if n_encoded != topology.getNumAtoms():
        raise UnsupportedTopologyError(f"The topology has {topology.getNumAtoms()} atoms but its residues hold "
                                       f"{n_encoded}.")
    _check_peptide_bonds(topology, residues)
    enc = AtomEncoding(
        residue_index=np.asarray(columns["residue_index"], dtype=np.int64),
        amino_acid=np.asarray(columns["amino_acid"], dtype=np.int64),
        atom_class=np.asarray(columns["atom_class"], dtype=np.int64),
        atom_names=tuple(columns["atom_names"]),
        residue_names=tuple(columns["residue_names"]),
        elements=tuple(columns["elements"]),
        masses=np.asarray(columns["masses"], dtype=np.float64),
    )
    if positions is not None:
        check_chirality(enc, positions)
    return enc
