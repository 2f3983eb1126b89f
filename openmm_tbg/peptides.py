"""Build zwitterionic peptides (topology, positions, System) from a one-letter sequence.

The default Hamiltonian is the one of the dipeptide data set: ``amber14-all.xml`` + ``implicit/obc1.xml``,
``CutoffNonPeriodic`` with a 2 nm cutoff, no constraints, flexible water. Structures are built the way the
data set was: PeptideBuilder extended chain plus OXT, then ``Modeller.addHydrogens(forcefield, pH=7)``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from .encoding import ONE_TO_THREE

logger = logging.getLogger(__name__)

DEFAULT_FORCEFIELD: tuple[str, ...] = ("amber14-all.xml", "implicit/obc1.xml")
_HISTIDINE_VARIANTS = ("HID", "HIE", "HIP")


@dataclass
class Peptide:
    """A built peptide.

    Attributes
    ----------
    sequence : str
        One-letter sequence, N-terminus first.
    topology : openmm.app.Topology
    positions : openmm.unit.Quantity
        (n_atoms, 3) positions in nm of the extended starting structure.
    system : openmm.System
        The Hamiltonian (by default the data set's).
    forcefield : openmm.app.ForceField
        The force field the system was created with.
    """

    sequence: str
    topology: object
    positions: object
    system: object
    forcefield: object = None

    def to_pdb(self, path) -> None:
        """Write the structure to a PDB file (atom order and names as in the topology)."""
        from openmm.app import PDBFile

        with open(path, "w") as fh:
            PDBFile.writeFile(self.topology, self.positions, fh, keepIds=True)


def validate_sequence(sequence: str) -> str:
    """Upper-case and check a one-letter sequence; raise ValueError naming bad letters."""
    if not isinstance(sequence, str):
        raise TypeError(f"sequence must be a one-letter string such as 'NY', got {type(sequence).__name__}.")
    seq = sequence.strip().upper()
    if not seq:
        raise ValueError("sequence is empty; give one-letter amino-acid codes such as 'NY'.")
    bad = sorted({(i, c) for i, c in enumerate(seq) if c not in ONE_TO_THREE})
    if bad:
        letters = ", ".join(f"{c!r} at position {i}" for i, c in bad)
        raise ValueError(f"Sequence {sequence!r} contains letters that are not standard amino acids: {letters}. "
                         f"Use the 20 one-letter codes {''.join(sorted(ONE_TO_THREE))}.")
    return seq


def _make_forcefield(forcefield):
    from openmm.app import ForceField

    if isinstance(forcefield, ForceField):
        return forcefield
    if isinstance(forcefield, str):
        forcefield = (forcefield,)
    return ForceField(*forcefield)


def create_system(topology, forcefield=DEFAULT_FORCEFIELD, nonbonded_cutoff=None, nonbonded_method=None,
                  constraints=None, rigid_water: bool = False, **kwargs):
    """Create a System with the data set's defaults.

    Parameters
    ----------
    topology : openmm.app.Topology
    forcefield : sequence of str or openmm.app.ForceField
        Force-field files (default amber14-all + implicit/obc1) or a ready ForceField.
    nonbonded_cutoff : Quantity or float, optional
        Cutoff (nm if unitless); default 2.0 nm.
    nonbonded_method : openmm.app nonbonded method, optional
        Default ``CutoffNonPeriodic``.
    constraints : optional
        Default ``None`` (no constraints; the flow samples all bond lengths).
    rigid_water : bool
        Default False.
    **kwargs
        Passed on to ``ForceField.createSystem``.

    Returns
    -------
    openmm.System
    """
    from openmm import unit
    from openmm.app import CutoffNonPeriodic

    if nonbonded_cutoff is None:
        nonbonded_cutoff = 2.0 * unit.nanometer
    elif not unit.is_quantity(nonbonded_cutoff):
        nonbonded_cutoff = float(nonbonded_cutoff) * unit.nanometer
    if nonbonded_method is None:
        nonbonded_method = CutoffNonPeriodic
    ff = _make_forcefield(forcefield)
    return ff.createSystem(topology, nonbondedMethod=nonbonded_method, nonbondedCutoff=nonbonded_cutoff,
                           constraints=constraints, rigidWater=rigid_water, **kwargs)


def _build_structure(seq: str, ff, histidine=None, pH: float = 7.0):
    """PeptideBuilder extended chain + OXT, then ``Modeller.addHydrogens``; ``histidine`` is None, one variant
    for every HIS, or a per-residue list (None entries: addHydrogens chooses). Returns the Modeller."""
    import Bio.PDB
    import PeptideBuilder
    from openmm.app import Modeller, PDBFile

    structure = PeptideBuilder.make_extended_structure(seq)
    PeptideBuilder.add_terminal_OXT(structure)
    buf = io.StringIO()
    writer = Bio.PDB.PDBIO()
    writer.set_structure(structure)
    writer.save(buf)
    buf.seek(0)
    pdb = PDBFile(buf)
    modeller = Modeller(pdb.topology, pdb.positions)
    variants = None
    if isinstance(histidine, str):
        variants = [histidine if r.name == "HIS" else None for r in modeller.topology.residues()]
    elif histidine is not None:
        variants = list(histidine)
    modeller.addHydrogens(ff, pH=pH, variants=variants)
    return modeller


def reference_structure(topology) -> "np.ndarray | None":
    """A structure (nm, the Topology's atom order) of a standard peptide, built from its sequence.

    The extended chain of `build_peptide` (with the Topology's histidine variants), matched to the Topology's
    atoms by residue and atom name. Used to test a System's energy when the user gives no positions.

    Parameters
    ----------
    topology : openmm.app.Topology

    Returns
    -------
    numpy.ndarray or None
        (n_atoms, 3) float64 nm; None when the Topology is not a supported peptide or its atom names do not
        all match the built one's.
    """
    import numpy as np
    from openmm import unit

    from .encoding import UnsupportedTopologyError, encode_topology

    try:
        encoding = encode_topology(topology)
    except (UnsupportedTopologyError, TypeError):
        return None
    residues = list(topology.residues())
    variants = []
    for r in residues:
        names = {a.name for a in r.atoms()}
        if r.name in _HISTIDINE_VARIANTS or encoding.sequence[r.index] == "H":
            variants.append("HIP" if {"HD1", "HE2"} <= names else "HIE" if "HE2" in names else "HID")
        else:
            variants.append(None)
    try:
        modeller = _build_structure(encoding.sequence, _default_forcefield(), variants)
    except Exception as error:  # noqa: BLE001 - a reference is optional; the caller says it was not checked
        logger.info("No reference structure for %s: %s", encoding.sequence, error)
        return None
    built = {(a.residue.index, a.name): a.index for a in modeller.topology.atoms()}
    xyz = np.asarray(modeller.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    try:
        index = [built[(a.residue.index, a.name)] for a in topology.atoms()]
    except KeyError:
        return None
    if len(set(index)) != len(index):
        return None
    return xyz[index]


def _default_forcefield():
    global _DEFAULT_FF
    if _DEFAULT_FF is None:
        _DEFAULT_FF = _make_forcefield(DEFAULT_FORCEFIELD)
    return _DEFAULT_FF


_DEFAULT_FF = None  # read-only: only used to add hydrogens to reference structures


def build_peptide(sequence: str, forcefield=DEFAULT_FORCEFIELD, nonbonded_cutoff=None, histidine: str | None = None,
                  nonbonded_method=None, pH: float = 7.0, **system_kwargs) -> Peptide:
    """Build a zwitterionic peptide from its one-letter sequence.

    Parameters
    ----------
    sequence : str
        One-letter codes, N-terminus first, e.g. ``"NY"``.
    forcefield : sequence of str or openmm.app.ForceField
        Default ``("amber14-all.xml", "implicit/obc1.xml")``; pass e.g. ``("amber14-all.xml",
        "implicit/gbn2.xml")`` for another implicit-solvent model.
    nonbonded_cutoff : Quantity or float, optional
        Default 2.0 nm.
    histidine : {None, "HID", "HIE", "HIP"}
        Protonation of every histidine; None lets ``Modeller.addHydrogens`` choose (the data set's choice).
    nonbonded_method : optional
        Default ``CutoffNonPeriodic``.
    pH : float
        pH passed to ``addHydrogens`` (default 7).
    **system_kwargs
        Passed on to :func:`create_system` (e.g. ``constraints``).

    Returns
    -------
    Peptide

    Raises
    ------
    ValueError
        Unknown one-letter codes, a single residue, or an unknown histidine variant.
    """
    seq = validate_sequence(sequence)
    if len(seq) < 2:
        raise ValueError(f"build_peptide({sequence!r}): a single amino acid is not a peptide. Its zwitterion has no "
                         f"residue template in amber14 (OpenMM would report 'No template found'), and the models "
                         f"sample peptides of two or more residues; give at least two one-letter codes, e.g. "
                         f"{(seq * 2)!r}.")
    if histidine is not None and histidine not in _HISTIDINE_VARIANTS:
        raise ValueError(f"histidine must be None, 'HID', 'HIE' or 'HIP', got {histidine!r}.")
    ff = _make_forcefield(forcefield)
    modeller = _build_structure(seq, ff, histidine, pH)
    system = create_system(modeller.topology, ff, nonbonded_cutoff=nonbonded_cutoff,
                           nonbonded_method=nonbonded_method, **system_kwargs)
    logger.debug("Built %s: %d atoms", seq, modeller.topology.getNumAtoms())
    return Peptide(sequence=seq, topology=modeller.topology, positions=modeller.positions, system=system,
                   forcefield=ff)
