"""The System checks of issue 22: Systems the flow cannot represent are refused when the sampler (or TBGMove) is
built, and results that rest on few effective samples or on a System far from the training Hamiltonian warn.

Real OpenMM energies of alanine dipeptide (AA) with the shipped model; a few hundred proposals per test.
"""

import warnings

import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_tbg import (BoltzmannGeneratorSampler, FewEffectiveSamplesWarning, HamiltonianMismatchWarning,
                        TemperatureUnitWarning, build_peptide)
from openmm_tbg.hamiltonian import HAMILTONIAN_GAP_KT
from openmm_tbg.encoding import UnsupportedTopologyError
from openmm_tbg.peptides import create_system
from openmm_tbg.testing import TOY_TEMPERATURE_K, reordered

OUR_WARNINGS = (FewEffectiveSamplesWarning, HamiltonianMismatchWarning, TemperatureUnitWarning)


@pytest.fixture(scope="module")
def aa():
    return build_peptide("AA")


def nm(positions):
    return np.asarray(positions.value_in_unit(unit.nanometer))


def ca_restraint(system, topology, point, k=1000.0):
    """A copy of ``system`` with CA of residue 1 restrained to ``point`` (nm) by a CustomExternalForce."""
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    force = openmm.CustomExternalForce("0.5*k*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    for name in ("k", "x0", "y0", "z0"):
        force.addPerParticleParameter(name)
    ca = next(a.index for a in topology.atoms() if a.name == "CA")
    force.addParticle(ca, [k, *point])
    system.addForce(force)
    return system, ca


def sample_recording(sampler, n):
    """sample(n) and the categories of the package's warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sampler.sample(n, progress=False)
    return result, {w.category for w in caught if issubclass(w.category, OUR_WARNINGS)}


# ----------------------------------------------------------------------------------- the three silent cases
def test_a_system_whose_particles_are_in_another_order_is_refused(aa):
    """Silent case 2: every proposal used to be 'valid' with U ~ 1e6 kJ/mol and an ESS of one sample."""
    top_r, x_r = reordered(aa.topology, nm(aa.positions))[:2]
    wrong = create_system(top_r)  # particles in the reordered order, Topology in the original one
    for positions in (None, aa.positions):  # built reference structure, or the user's
        with pytest.raises(ValueError, match=r"bonds have no bond term in the System.*another order than the "
                                             r"Topology's atoms.*createSystem\(topology\)"):
            BoltzmannGeneratorSampler(wrong, aa.topology, positions=positions, platform="Reference")


def test_a_consistently_reordered_system_and_topology_still_work(aa):
    top_r, x_r = reordered(aa.topology, nm(aa.positions))[:2]
    sampler = BoltzmannGeneratorSampler(create_system(top_r), top_r, seed=0, positions=x_r, platform="CPU")
    assert not sampler.system_checks.not_checked
    result, raised = sample_recording(sampler, 300)
    assert raised == set()
    assert result.n_valid > 250 and result.ess > 0.05  # the original order: ~19 % (benchmarks/silent_inputs.py)
    assert result.hamiltonian_gap == 0.0  # it is the training Hamiltonian, atoms in another order


def test_an_energy_that_depends_on_absolute_position_is_refused(aa):
    """Silent case 3: a CA position restraint; the flow samples centred, randomly oriented molecules, so the
    reweighted distance to the restraint point came out ~2.5 nm instead of ~0.09 nm."""
    x = nm(aa.positions) + np.array([2.0, 1.5, 1.0])  # where a PDB file might put the molecule
    ca = next(a.index for a in aa.topology.atoms() if a.name == "CA")
    restrained, _ = ca_restraint(aa.system, aa.topology, x[ca])  # satisfied at x itself
    for positions in (None, x):
        with pytest.raises(ValueError, match=r"absolute position or orientation; changed: CustomExternalForce.*"
                                             r"position restraint.*internal coordinates"):
            BoltzmannGeneratorSampler(restrained, aa.topology, positions=positions, platform="Reference")
    # A restraint on an internal coordinate (the CA-CA distance) is invariant and accepted.
    internal = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(aa.system))
    cas = [a.index for a in aa.topology.atoms() if a.name == "CA"]
    distance = openmm.CustomBondForce("0.5*100*(r-0.38)^2")
    distance.addBond(*cas, [])
    internal.addForce(distance)
    sampler = BoltzmannGeneratorSampler(internal, aa.topology, platform="Reference")
    assert any("1 further pair(s), 1 of them more than two bonds apart" in c for c in sampler.system_checks.checked)


def test_vacuum_hamiltonian_warns_that_it_is_far_from_the_training_one(aa):
    """Silent case 1: amber14 in vacuum. MD puts ~87 % of AA in salt-bridged alpha-L; the BG's weights, with an
    ESS of ~1-5 samples, reported 0 % without a Python warning."""
    vacuum = app.ForceField("amber14-all.xml").createSystem(aa.topology, nonbondedMethod=app.NoCutoff,
                                                            constraints=None, rigidWater=False)
    sampler = BoltzmannGeneratorSampler(vacuum, aa.topology, seed=0, platform="CPU")
    result, raised = sample_recording(sampler, 300)
    assert raised == {HamiltonianMismatchWarning, FewEffectiveSamplesWarning}
    assert result.hamiltonian_gap > HAMILTONIAN_GAP_KT + 1.0  # measured 6.7 kT
    assert result.summary().startswith("WARNING (HamiltonianMismatchWarning): This System is far from the "
                                       "Hamiltonian the model was trained on (amber14-all + implicit/obc1")
    # expectation() and resample() carry it too.
    with pytest.warns(HamiltonianMismatchWarning, match="sampler.refine.*TBGMove.*amber14-all"):
        result.expectation(result.reduced_potentials)
    with pytest.warns(HamiltonianMismatchWarning):
        result.resample(5, seed=0)


def test_obc2_is_close_to_the_training_hamiltonian_and_does_not_warn(aa):
    obc2 = create_system(aa.topology, ("amber14-all.xml", "implicit/obc2.xml"))
    sampler = BoltzmannGeneratorSampler(obc2, aa.topology, seed=0, positions=aa.positions, platform="CPU")
    result, raised = sample_recording(sampler, 300)
    assert raised == set(), raised
    assert result.hamiltonian_gap < 1.0  # measured 0.2 kT
    assert result.ess > 0.05 and "WARNING" not in result.summary()


def test_few_effective_samples_warn_at_sampling(aa):
    sampler = BoltzmannGeneratorSampler(aa.system, aa.topology, seed=0, platform="CPU")
    with pytest.warns(FewEffectiveSamplesWarning, match=r"rests on [0-9.]+ effective samples.*Draw about") as rec:
        result = sampler.sample(8, progress=False)
    assert rec[0].filename == __file__ and result.effective_samples < 20
    assert result.hamiltonian_gap == 0.0 and "training Hamiltonian (" not in str(rec[0].message)


# ------------------------------------------------------------------------------------------------- TBGMove
def test_tbg_move_refuses_reordered_and_restrained_systems_at_its_first_apply(aa):
    from openmmtools import cache, states

    from openmm_tbg import TBGMove

    move = TBGMove(None, aa.topology, seed=0, buffer_size=4)
    start = states.SamplerState(aa.positions)
    top_r, _ = reordered(aa.topology, nm(aa.positions))[:2]
    restrained, _ = ca_restraint(aa.system, aa.topology, [2.0, 2.0, 2.0])
    platform = openmm.Platform.getPlatformByName("Reference")
    for system, match in ((create_system(top_r), "another order"), (restrained, "absolute position")):
        thermo = states.ThermodynamicState(system, 310 * unit.kelvin)
        with pytest.raises(ValueError, match=match):
            move.apply(thermo, start, cache.ContextCache(platform=platform))
    assert move.statistics["n_proposed"] == 0
    thermo = states.ThermodynamicState(aa.system, 310 * unit.kelvin)
    context_cache = cache.ContextCache(platform=platform)
    for _ in range(3):
        move.apply(thermo, start, context_cache)
    assert move.statistics["n_proposed"] == 3 and len(move._checked_systems) == 1  # checked once


# ------------------------------------------------------------------------------------ order and small inputs
def test_the_topology_is_checked_before_the_system():
    """A tripeptide or a capped peptide whose System also has constraints: the first message names the real
    reason (the model's length, the caps), not the constraints."""
    pep = build_peptide("AAA")
    constrained = create_system(pep.topology, constraints=app.HBonds)
    with pytest.raises(UnsupportedTopologyError, match="at most 2 residues"):
        BoltzmannGeneratorSampler(constrained, pep.topology, platform="Reference")
    aa = build_peptide("AA")
    capped = app.Topology()
    chain = capped.addChain("A")
    atoms = {}
    for residue in aa.topology.residues():
        r = capped.addResidue("ACE" if residue.index == 0 else residue.name, chain, residue.id)
        for atom in residue.atoms():
            atoms[atom.index] = capped.addAtom(atom.name, atom.element, r)
    for a, b in aa.topology.bonds():
        capped.addBond(atoms[a.index], atoms[b.index])
    with pytest.raises(UnsupportedTopologyError, match="terminal cap"):
        BoltzmannGeneratorSampler(create_system(aa.topology, constraints=app.HBonds), capped, platform="Reference")


def test_a_plain_low_temperature_warns_that_it_is_kelvin(toy):
    system, topology, encoding, flow = toy
    kwargs = dict(encoding=encoding, check_bonds=False, platform="Reference")
    with pytest.warns(TemperatureUnitWarning, match=r"read as 37 kelvin.*310.15"):
        sampler = BoltzmannGeneratorSampler(system, topology, flow, temperature=37, **kwargs)
    assert sampler.temperature == 37.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", TemperatureUnitWarning)
        BoltzmannGeneratorSampler(system, topology, flow, temperature=TOY_TEMPERATURE_K, **kwargs)
        BoltzmannGeneratorSampler(system, topology, flow, temperature=37 * unit.kelvin, **kwargs)


def test_toys_are_checked_where_the_checks_apply_and_say_what_was_not(toy):
    system, topology, encoding, flow = toy
    kwargs = dict(encoding=encoding, check_bonds=False, platform="Reference", temperature=TOY_TEMPERATURE_K)
    report = BoltzmannGeneratorSampler(system, topology, flow, **kwargs).system_checks
    assert any(c.startswith("bond terms: all 2 Topology bonds") for c in report.checked)
    assert any(c.startswith("invariance under rigid rotation + translation at a synthetic") for c in report.checked)
    assert len(report.not_checked) == 1 and "no positions were given" in report.not_checked[0]
    bare = openmm.System()
    for _ in range(3):
        bare.addParticle(12.0)
    report = BoltzmannGeneratorSampler(bare, topology, flow, **kwargs).system_checks
    assert any("the System has no HarmonicBondForce" in c for c in report.not_checked)
    field = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    pull = openmm.CustomExternalForce("10*x")  # a constant force along x: depends on absolute position
    pull.addParticle(0, [])
    field.addForce(pull)
    with pytest.raises(ValueError, match="absolute position"):
        BoltzmannGeneratorSampler(field, topology, flow, **kwargs)


def test_the_command_line_shows_the_warnings(tmp_path, capsys):
    from openmm_tbg import cli

    rc = cli.main(["sample", "--sequence", "AA", "--samples", "8", "--temperature", "37", "--seed", "0",
                   "--output", str(tmp_path / "aa.npz"), "--no-figure", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("openmm-tbg: warning: ")]
    assert any("read as 37 kelvin" in line for line in lines)
    assert any("effective samples" in line for line in lines)
    assert "WARNING" not in captured.out  # printed once, on stderr
