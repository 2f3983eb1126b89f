"""TBG "full" atom encoding, chirality helpers and refusal of unsupported topologies."""

import importlib.util
import re
from pathlib import Path

import mdtraj
import numpy as np
import pytest
from openmm import unit
from openmm.app import ForceField, Modeller, PDBFile, Topology, element

from openmm_tbg.data import load_peptide
from openmm_tbg.encoding import (AMINO_ACIDS, ATOM_NAME_CLASSES, ENCODING_VERSION, AtomEncoding,
                                 UnsupportedTopologyError, _SIDE_CHAINS, _residue_atom_names, atom_name_class,
                                 atom_name_class_v1,
                                 chiral_centers, encode_topology, signed_volumes)
from openmm_tbg.peptides import build_peptide

FIXTURES = ["AA", "AC", "GP", "HT", "NY"]


def _pdb(fixture_dir, name):
    return PDBFile(str(fixture_dir / f"{name}.pdb"))


def test_constants():
    assert ENCODING_VERSION == "tbg-full-v2"
    assert len(AMINO_ACIDS) == 20 and len(set(AMINO_ACIDS)) == 20
    assert list(ATOM_NAME_CLASSES) == sorted(set(ATOM_NAME_CLASSES))
    # TBG reported 54 classes. The plain rule (v1) gives 51; v2 adds 8 classes that tell apart hydrogens on
    # different heavy atoms (Thr HG1 / HG2*, Val/Ile HG1* / HG2*, Leu/Ile HD1*, Leu/Asn HD2*, Gln HE2*, Arg HH1* /
    # HH2*).
    assert len(ATOM_NAME_CLASSES) == 59
    for expected in ("H", "HA", "HB", "HG", "OD", "OE", "OXT", "HD1", "HD2", "HE1", "HE2", "HZ2", "HH2", "CD1",
                     "HG1", "HG1*", "HG2*", "HD1*", "HD2*", "HE2*", "HH1*", "HH2*"):
        assert expected in ATOM_NAME_CLASSES


def test_residue_table_matches_amber14_templates():
    """The built-in atom table is exactly what amber14's N-terminal, internal and C-terminal templates hold."""
    templates = ForceField("amber14-all.xml")._templates
    for variant in _SIDE_CHAINS:
        for prefix, n_term, c_term in (("N", True, False), ("", False, False), ("C", False, True)):
            names = {a.name for a in templates[prefix + variant].atoms}
            names = {"H" if (n_term and n == "H1") else n for n in names}  # amber's H1 is the PDB's H
            assert set(_residue_atom_names(variant, n_term, c_term)) == names, prefix + variant


def test_atom_name_classes():
    assert {atom_name_class_v1("VAL", n) for n in ("HG11", "HG12", "HG13", "HG21", "HG22", "HG23")} == {"HG"}
    # v2: hydrogens on different heavy atoms get different classes; those on one heavy atom share one.
    assert {atom_name_class("VAL", n) for n in ("HG11", "HG12", "HG13")} == {"HG1*"}
    assert {atom_name_class("VAL", n) for n in ("HG21", "HG22", "HG23")} == {"HG2*"}
    assert atom_name_class("THR", "HG1") == "HG1" and atom_name_class("THR", "HG22") == "HG2*"
    assert atom_name_class("LEU", "HD13") == "HD1*" and atom_name_class("LEU", "HG") == "HG"
    assert atom_name_class("ILE", "HG13") == "HG1*" and atom_name_class("ILE", "HD12") == "HD1*"
    assert atom_name_class("ARG", "HH12") == "HH1*" and atom_name_class("ARG", "HH21") == "HH2*"
    assert atom_name_class("ALA", "HB3") == "HB" and atom_name_class("GLY", "HA2") == "HA"
    assert atom_name_class("ALA", "H3") == "H" and atom_name_class("MET", "HE2") == "HE"
    assert atom_name_class("ASP", "OD1") == atom_name_class("ASP", "OD2") == "OD"
    assert atom_name_class("GLU", "OE2") == "OE" and atom_name_class("GLN", "OE1") == "OE"
    assert atom_name_class("ASN", "ND2") == "ND2"  # only O gets digits stripped
    assert atom_name_class("LEU", "CD1") != atom_name_class("LEU", "CD2")
    for aa in ("PHE", "TYR", "HIS", "HID", "TRP"):
        assert atom_name_class(aa, "HD1") == "HD1"
        assert atom_name_class(aa, "HB2") == "HB"  # not aromatic
    assert atom_name_class("TRP", "HZ3") == "HZ3" and atom_name_class("LYS", "HZ3") == "HZ"
    assert atom_name_class_v1("ARG", "HH21") == "HH" and atom_name_class("TRP", "HH2") == "HH2"


def _chemical_equivalence_ok(enc, topology):
    """Same token row <=> same residue and same class, checked against bonded chemistry."""
    tokens = enc.tokens
    heavy_of = {}
    for a, b in topology.bonds():
        if a.element.symbol == "H":
            heavy_of[a.index] = b
        if b.element.symbol == "H":
            heavy_of[b.index] = a
    for i in range(enc.n_atoms):
        for j in range(i + 1, enc.n_atoms):
            same = bool(np.all(tokens[i] == tokens[j]))
            assert same == (enc.groups[i] == enc.groups[j])
            if same:
                assert enc.elements[i] == enc.elements[j] and enc.residue_index[i] == enc.residue_index[j]
            # Hydrogens on one sp3 heavy atom are interchangeable (methyl, methylene, NH3+, amide NH2 ...).
            if (i in heavy_of and j in heavy_of and heavy_of[i].index == heavy_of[j].index
                    and heavy_of[i].residue.name not in ("HIS", "PHE", "TRP", "TYR")):
                assert same, (enc.atom_names[i], enc.atom_names[j])
            # ... and hydrogens on different heavy atoms never are (v2: Thr HG1 vs HG21, Val's two methyls).
            if i in heavy_of and j in heavy_of and heavy_of[i].index != heavy_of[j].index:
                assert not same, (enc.atom_names[i], enc.atom_names[j])


@pytest.mark.parametrize("one_letter", "ACDEFGHIKLMNPQRSTVWY")
def test_hydrogens_are_interchangeable_exactly_when_they_share_a_heavy_atom(one_letter):
    pep = build_peptide(one_letter + one_letter)
    _chemical_equivalence_ok(encode_topology(pep.topology), pep.topology)


@pytest.mark.parametrize("seq", FIXTURES)
def test_sequence_and_pdb_encode_identically(fixture_dir, seq):
    pdb = _pdb(fixture_dir, seq)
    enc_pdb = encode_topology(pdb.topology, pdb.positions)
    enc_seq = encode_topology(build_peptide(seq).topology)
    assert isinstance(enc_pdb, AtomEncoding)
    assert enc_pdb == enc_seq
    np.testing.assert_array_equal(enc_pdb.tokens, enc_seq.tokens)
    assert enc_pdb.sequence == seq and enc_pdb.n_residues == 2
    assert enc_pdb.tokens.dtype == np.int64 and enc_pdb.tokens.shape == (pdb.topology.getNumAtoms(), 3)
    np.testing.assert_array_equal(enc_pdb.residue_index, [a.residue.index for a in pdb.topology.atoms()])
    masses = [a.element.mass.value_in_unit(unit.dalton) for a in pdb.topology.atoms()]
    np.testing.assert_allclose(enc_pdb.masses, masses)
    _chemical_equivalence_ok(enc_pdb, pdb.topology)


def test_groups_examples(fixture_dir):
    pdb = _pdb(fixture_dir, "NY")
    enc = encode_topology(pdb.topology)
    groups = [[enc.atom_names[i] for i in g] for g in enc.interchangeable_groups()]
    assert groups == [["H", "H2", "H3"], ["HB2", "HB3"], ["HD21", "HD22"], ["HB2", "HB3"]]
    vd = build_peptide("VD")
    enc = encode_topology(vd.topology)
    groups = [[enc.atom_names[i] for i in g] for g in enc.interchangeable_groups()]
    assert ["HG11", "HG12", "HG13"] in groups and ["HG21", "HG22", "HG23"] in groups  # one per methyl (v2)
    assert ["OD1", "OD2"] in groups
    # Tyr ring hydrogens stay distinguishable (aromatic rule).
    enc = encode_topology(pdb.topology)
    tyr_ring = [i for i, (r, n) in enumerate(zip(enc.residue_index, enc.atom_names))
                if r == 1 and re.fullmatch(r"H[DE][12]", n)]
    assert len(set(enc.groups[tyr_ring].tolist())) == 4


def test_three_and_more_residues():
    pep = build_peptide("GHK")
    enc = encode_topology(pep.topology, pep.positions)
    assert enc.n_residues == 3 and enc.sequence == "GHK"
    np.testing.assert_array_equal(np.unique(enc.residue_index), [0, 1, 2])
    # The middle residue has a plain backbone H (no H2/H3, no OXT).
    mid = {n for r, n in zip(enc.residue_index, enc.atom_names) if r == 1}
    assert "H" in mid and "H2" not in mid and "OXT" not in mid
    _chemical_equivalence_ok(enc, pep.topology)
    pep5 = build_peptide("ITWPE")
    enc5 = encode_topology(pep5.topology, pep5.positions)
    assert enc5.n_residues == 5
    # CA of 5 non-Gly residues + CB of Ile and Thr.
    assert chiral_centers(enc5).shape == (7, 4)


@pytest.mark.parametrize("seq,k", [("AA", 2), ("GP", 1), ("HT", 3), ("NY", 2), ("AC", 2)])
def test_chirality_positive_on_data(fixture_dir, seq, k):
    """Every chiral centre has a positive signed volume in every data-set frame (all L)."""
    traj = load_peptide(fixture_dir, seq)
    centers = chiral_centers(traj.encoding)
    assert centers.shape == (k, 4)
    vol = signed_volumes(traj.positions, centers)
    assert vol.shape == (traj.n_frames, k)
    assert np.all(vol > 0)
    # Mirrored frames are all negative, and refused.
    assert np.all(signed_volumes(-traj.positions, centers) < 0)
    with pytest.raises(UnsupportedTopologyError, match="D configuration"):
        encode_topology(traj.topology, -traj.positions[:3])
    encode_topology(traj.topology, traj.positions)  # all frames accepted


def test_chirality_ile_thr_built():
    pep = build_peptide("IT")
    enc = encode_topology(pep.topology, pep.positions)
    centers = chiral_centers(enc)
    names = [enc.atom_names[c] for c in centers[:, 0]]
    assert names == ["CA", "CB", "CA", "CB"]
    assert np.all(signed_volumes(pep.positions, centers) > 0)


def test_single_inverted_centre_detected(fixture_dir):
    """Swapping HA and CB of one residue inverts only that CA; the error names the residue."""
    pdb = _pdb(fixture_dir, "NY")
    x = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    names = [(a.residue.index, a.name) for a in pdb.topology.atoms()]
    ha, cb = names.index((1, "HA")), names.index((1, "CB"))
    y = x.copy()
    y[[ha, cb]] = y[[cb, ha]]
    with pytest.raises(UnsupportedTopologyError, match=r"CA of residue TYR \(index 1\)"):
        encode_topology(pdb.topology, y)


def _extra_chain(pdb, resname, atoms):
    modeller = Modeller(pdb.topology, pdb.positions)
    top = Topology()
    chain = top.addChain("B")
    res = top.addResidue(resname, chain)
    for name, sym in atoms:
        top.addAtom(name, element.get_by_symbol(sym), res)
    modeller.add(top, [(3.0, 3.0, 3.0)] * len(atoms) * unit.nanometer)
    return modeller.topology


def test_refuses_water_ion_ligand(fixture_dir):
    pdb = _pdb(fixture_dir, "AA")
    with pytest.raises(UnsupportedTopologyError, match="HOH.*water.*deleteWater"):
        encode_topology(_extra_chain(pdb, "HOH", [("O", "O"), ("H1", "H"), ("H2", "H")]))
    with pytest.raises(UnsupportedTopologyError, match="NA.*ion"):
        encode_topology(_extra_chain(pdb, "NA", [("NA", "Na")]))
    with pytest.raises(UnsupportedTopologyError, match="LIG.*not a standard amino acid"):
        encode_topology(_extra_chain(pdb, "LIG", [("C1", "C"), ("O1", "O")]))
    # A non-standard residue inside the chain.
    modeller = Modeller(pdb.topology, pdb.positions)
    next(modeller.topology.residues()).name = "DAL"
    with pytest.raises(UnsupportedTopologyError, match="DAL"):
        encode_topology(modeller.topology)


def test_refuses_caps():
    path = (Path(importlib.util.find_spec("openmmtools").submodule_search_locations[0])
            / "data" / "alanine-dipeptide-gbsa" / "alanine-dipeptide.pdb")
    pdb = PDBFile(str(path))
    assert [r.name for r in pdb.topology.residues()] == ["ACE", "ALA", "NME"]
    with pytest.raises(UnsupportedTopologyError, match="ACE.*cap.*build_peptide"):
        encode_topology(pdb.topology)


def test_refuses_missing_and_extra_atoms(fixture_dir):
    pdb = _pdb(fixture_dir, "AA")
    m = Modeller(pdb.topology, pdb.positions)
    m.delete([a for a in m.topology.atoms() if a.element.symbol == "H"])
    with pytest.raises(UnsupportedTopologyError, match="no hydrogens.*addHydrogens"):
        encode_topology(m.topology)
    m = Modeller(pdb.topology, pdb.positions)
    m.delete([a for a in m.topology.atoms() if a.name == "OXT"])
    with pytest.raises(UnsupportedTopologyError, match=r"missing \['OXT'\]"):
        encode_topology(m.topology)
    m = Modeller(pdb.topology, pdb.positions)
    m.delete([a for a in m.topology.atoms() if a.name == "H3" and a.residue.index == 0])
    with pytest.raises(UnsupportedTopologyError, match=r"ALA1.*missing \['H3'\].*NH3\+"):
        encode_topology(m.topology)
    # A histidine named for one protonation state but carrying the hydrogens of another.
    pep = build_peptide("HA", histidine="HIE")
    next(pep.topology.residues()).name = "HID"
    with pytest.raises(UnsupportedTopologyError, match="HID.*HIE"):
        encode_topology(pep.topology)


def test_refuses_multiple_chains(fixture_dir):
    pdb = _pdb(fixture_dir, "AA")
    m = Modeller(pdb.topology, pdb.positions)
    m.add(pdb.topology, pdb.positions)
    with pytest.raises(UnsupportedTopologyError, match="2 chains"):
        encode_topology(m.topology)


def test_wrong_topology_type(fixture_dir):
    traj = mdtraj.load(str(fixture_dir / "AA.pdb"))
    with pytest.raises(TypeError, match=r"to_openmm\(\)"):
        encode_topology(traj.topology)
    with pytest.raises(TypeError, match="openmm.app.Topology"):
        encode_topology("AA")
    enc = encode_topology(traj.topology.to_openmm())
    assert enc.sequence == "AA"


def test_positions_shape_checked(fixture_dir):
    pdb = _pdb(fixture_dir, "AA")
    with pytest.raises(ValueError, match="shape"):
        encode_topology(pdb.topology, np.zeros((5, 3)))
