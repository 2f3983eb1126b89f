"""Building peptides from sequences, with the data set's Hamiltonian."""

import numpy as np
import openmm
import pytest
from openmm import unit
from openmm.app import CutoffNonPeriodic, ForceField, PDBFile

from openmm_tbg.data import load_peptide
from openmm_tbg.encoding import encode_topology
from openmm_tbg.peptides import Peptide, build_peptide, create_system

FIXTURES = ["AA", "AC", "GP", "HT", "NY"]


def _energies(system, positions_nm):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    out = []
    for x in positions_nm:
        ctx.setPositions(np.asarray(x, np.float64) * unit.nanometer)
        out.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.array(out)


def _atoms(topology):
    return [(a.residue.index, a.residue.name, a.name, a.element.symbol) for a in topology.atoms()]


def _bonds(topology):
    return sorted(tuple(sorted((b[0].index, b[1].index))) for b in topology.bonds())


@pytest.fixture(scope="module")
def built():
    return {s: build_peptide(s) for s in FIXTURES}


@pytest.mark.parametrize("seq", FIXTURES)
def test_same_atoms_and_bonds_as_dataset(built, fixture_dir, seq):
    pep = built[seq]
    ref = PDBFile(str(fixture_dir / f"{seq}.pdb"))
    assert isinstance(pep, Peptide) and pep.sequence == seq
    assert _atoms(pep.topology) == _atoms(ref.topology)
    assert _bonds(pep.topology) == _bonds(ref.topology)
    assert pep.system.getNumParticles() == ref.topology.getNumAtoms()
    assert unit.is_quantity(pep.positions) and len(pep.positions) == ref.topology.getNumAtoms()


@pytest.mark.parametrize("seq", FIXTURES)
def test_energies_match_dataset_hamiltonian(built, fixture_dir, seq):
    """build_peptide's System reproduces the data set's Hamiltonian on data-set frames."""
    traj = load_peptide(fixture_dir, seq, max_frames=6)
    ff = ForceField("amber14-all.xml", "implicit/obc1.xml")
    reference = ff.createSystem(traj.topology, nonbondedMethod=CutoffNonPeriodic,
                                nonbondedCutoff=2.0 * unit.nanometer, constraints=None, rigidWater=False)
    e_ref = _energies(reference, traj.positions)
    e_built = _energies(built[seq].system, traj.positions)
    e_create = _energies(create_system(traj.topology), traj.positions)
    assert np.all(np.isfinite(e_ref))
    np.testing.assert_allclose(e_built, e_ref, rtol=0, atol=1e-3)
    np.testing.assert_allclose(e_create, e_ref, rtol=0, atol=1e-3)


def test_default_hamiltonian_settings(built):
    system = built["NY"].system
    assert system.getNumConstraints() == 0
    assert not system.usesPeriodicBoundaryConditions()
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert nb.getNonbondedMethod() == openmm.NonbondedForce.CutoffNonPeriodic
    assert nb.getCutoffDistance().value_in_unit(unit.nanometer) == pytest.approx(2.0)
    assert any(isinstance(f, openmm.CustomGBForce) for f in system.getForces())  # obc1 is a CustomGBForce


def test_keyword_options():
    pep = build_peptide("ny", forcefield=("amber14-all.xml", "implicit/gbn2.xml"),
                        nonbonded_cutoff=1.5 * unit.nanometer)
    assert pep.sequence == "NY"
    nb = next(f for f in pep.system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert nb.getCutoffDistance().value_in_unit(unit.nanometer) == pytest.approx(1.5)
    vacuum = build_peptide("AA", forcefield="amber14-all.xml", nonbonded_cutoff=1.0)
    assert not any(isinstance(f, openmm.CustomGBForce) for f in vacuum.system.getForces())


@pytest.mark.parametrize("variant,hd1,he2", [("HID", True, False), ("HIE", False, True), ("HIP", True, True)])
def test_histidine_variants(variant, hd1, he2):
    pep = build_peptide("HT", histidine=variant)
    names = {a.name for a in pep.topology.atoms() if a.residue.index == 0}
    assert ("HD1" in names, "HE2" in names) == (hd1, he2)
    enc = encode_topology(pep.topology, pep.positions)
    assert enc.sequence == "HT"
    charge = sum(pep.system.getForce(i).getParticleParameters(j)[0].value_in_unit(unit.elementary_charge)
                 for i in range(pep.system.getNumForces()) if isinstance(pep.system.getForce(i), openmm.NonbondedForce)
                 for j in range(pep.system.getNumParticles()))
    assert charge == pytest.approx(1.0 if variant == "HIP" else 0.0, abs=1e-6)


def test_longer_peptide_and_minimizable():
    pep = build_peptide("ACDKW")
    assert [r.name for r in pep.topology.residues()] == ["ALA", "CYS", "ASP", "LYS", "TRP"]
    ctx = openmm.Context(pep.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pep.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    assert np.isfinite(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))


def test_to_pdb_roundtrip(tmp_path):
    pep = build_peptide("GP")
    pep.to_pdb(tmp_path / "GP.pdb")
    back = PDBFile(str(tmp_path / "GP.pdb"))
    assert _atoms(back.topology) == _atoms(pep.topology)


@pytest.mark.parametrize("bad,match", [("NX", "'X' at position 1"), ("A1", "'1'"), ("", "empty"),
                                       ("AB", "'B'")])
def test_bad_sequence(bad, match):
    with pytest.raises(ValueError, match=match):
        build_peptide(bad)


def test_a_single_residue_gets_the_packages_message_not_openmms():
    with pytest.raises(ValueError, match=r"single amino acid is not a peptide.*at least two one-letter codes.*'AA'") \
            as error:
        build_peptide("A")
    assert "No template found for residue" not in str(error.value)


def test_reference_structure_follows_the_topologys_atom_order(built):
    from openmm_tbg.peptides import reference_structure

    from openmm_tbg.testing import harmonic_chain

    pep = built["HT"]
    x = np.asarray(pep.positions.value_in_unit(unit.nanometer))
    ref = reference_structure(pep.topology)
    heavy = [a.index for a in pep.topology.atoms() if a.element.symbol != "H"]
    np.testing.assert_allclose(ref[heavy], x[heavy], atol=1e-6)  # addHydrogens places H slightly differently
    for a, b in pep.topology.bonds():
        assert 0.09 < np.linalg.norm(ref[a.index] - ref[b.index]) < 0.16

    assert reference_structure(harmonic_chain(3)[1]) is None  # not a peptide: no reference


def test_bad_options():
    with pytest.raises(ValueError, match="histidine"):
        build_peptide("HA", histidine="HIS")
    with pytest.raises(TypeError, match="one-letter"):
        build_peptide(["A", "A"])
