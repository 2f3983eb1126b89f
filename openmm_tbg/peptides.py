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
        Unknown one-letter codes or histidine variant.
    """
    import Bio.PDB
    import PeptideBuilder
    from openmm.app import Modeller, PDBFile

    seq = validate_sequence(sequence)
    if histidine is not None and histidine not in _HISTIDINE_VARIANTS:
        raise ValueError(f"histidine must be None, 'HID', 'HIE' or 'HIP', got {histidine!r}.")
    structure = PeptideBuilder.make_extended_structure(seq)
    PeptideBuilder.add_terminal_OXT(structure)
    buf = io.StringIO()
    writer = Bio.PDB.PDBIO()
    writer.set_structure(structure)
    writer.save(buf)
    buf.seek(0)
    pdb = PDBFile(buf)
    ff = _make_forcefield(forcefield)
    modeller = Modeller(pdb.topology, pdb.positions)
    variants = None
    if histidine is not None:
        variants = [histidine if r.name == "HIS" else None for r in modeller.topology.residues()]
    modeller.addHydrogens(ff, pH=pH, variants=variants)
    system = create_system(modeller.topology, ff, nonbonded_cutoff=nonbonded_cutoff,
                           nonbonded_method=nonbonded_method, **system_kwargs)
    logger.debug("Built %s: %d atoms", seq, modeller.topology.getNumAtoms())
    return Peptide(sequence=seq, topology=modeller.topology, positions=modeller.positions, system=system,
                   forcefield=ff)
