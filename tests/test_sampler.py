"""Tests of openmm_tbg.sampler: exact statistics on a solvable system, refusals, and a real dipeptide."""

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from pymbar import timeseries
from scipy.special import logsumexp

from openmm_tbg.encoding import UnsupportedTopologyError
from openmm_tbg.flow import TransferableFlow
from openmm_tbg.sampler import BoltzmannGeneratorSampler, SampleResult, kish_ess
from openmm_tbg.testing import TOY_FLOW_STD_NM, TOY_SIGMA_NM, TOY_TEMPERATURE_K

# The toy of the `toy` fixture (tests/conftest.py): target bond-vector std, the flow's std (nm), kelvin.
SIGMA, FLOW_STD, T = TOY_SIGMA_NM, TOY_FLOW_STD_NM, TOY_TEMPERATURE_K


def toy_sampler(toy, seed=0, **kwargs):
    system, topology, encoding, flow = toy
    return BoltzmannGeneratorSampler(system, topology, flow, temperature=T * unit.kelvin, encoding=encoding,
                                     seed=seed, check_bonds=False, batch_size=1500, platform="Reference",
                                     **kwargs)


def bond_observable(positions):
    """f = |b1|^2 + |b2|^2: sigma^2 times a chi-square variable with 6 degrees of freedom under the target."""
    b = positions[:, :-1] - positions[:, 1:]
    return np.sum(b ** 2, axis=(1, 2))


# Exact moments of f / sigma^2 ~ chi2(6): E = 6, E[f^2] = 48, E[f^4] = 6*8*10*12.
F_MEAN, F_VAR = 6 * SIGMA ** 2, 12 * SIGMA ** 4
F2_MEAN, F2_VAR = 48 * SIGMA ** 4, (5760 - 48 ** 2) * SIGMA ** 8


def test_importance_weights_reproduce_exact_moments(toy):
    n = 3000
    result = toy_sampler(toy, seed=1).sample(n, progress=False)
    assert result.positions.shape == (n, 3, 3) and result.valid.all()
    # The weights are exactly the closed-form ones: log q of the Gaussian flow, u of the harmonic chain.
    x = result.positions - result.positions.mean(axis=1, keepdims=True)
    log_q = -np.sum(x ** 2, axis=(1, 2)) / (2 * FLOW_STD ** 2) - 3 * (3 - 1) / 2 * np.log(2 * np.pi * FLOW_STD ** 2)
    u = bond_observable(result.positions) / (2 * SIGMA ** 2)
    np.testing.assert_allclose(result.log_q, log_q, atol=1e-3)
    np.testing.assert_allclose(result.reduced_potentials, u, rtol=1e-6)
    np.testing.assert_allclose(result.log_weights, -u - log_q - logsumexp(-u - log_q), atol=2e-3)
    assert result.ess == pytest.approx(kish_ess(-u - log_q), rel=1e-3)
    # Moments within 5 standard errors of the importance estimate (Var_target / (ESS * n)).
    n_eff = result.ess * n
    f = bond_observable(result.positions)
    assert abs(result.expectation(f) - F_MEAN) < 5 * np.sqrt(F_VAR / n_eff)
    assert abs(result.expectation(f ** 2) - F2_MEAN) < 5 * np.sqrt(F2_VAR / n_eff)
    # Without the weights the flow's wider distribution is clearly visible: the test can fail.
    assert abs(f.mean() - F_MEAN) > 10 * np.sqrt(F_VAR / n_eff)


def test_metropolis_chain_reproduces_exact_moments(toy):
    n = 3000
    chain = toy_sampler(toy, seed=2).sample(n, method="metropolis", progress=False)
    assert chain.method == "metropolis" and len(chain) == n  # the first proposal is valid here
    assert 0.1 < chain.acceptance_rate < 0.9
    f = bond_observable(chain.positions)
    g = timeseries.statistical_inefficiency(f)
    assert abs(f.mean() - F_MEAN) < 5 * np.sqrt(F_VAR * g / n)
    f2 = f ** 2
    assert abs(f2.mean() - F2_MEAN) < 5 * np.sqrt(F2_VAR * timeseries.statistical_inefficiency(f2) / n)
    # Repeated states are what makes the chain exact; the accepted fraction matches the repeats.
    changes = np.count_nonzero(np.diff(chain.proposal_index)) / (n - 1)
    assert changes == pytest.approx(chain.acceptance_rate, abs=1e-12)


def test_metropolis_from_user_state_and_result_io(toy, tmp_path):
    system, topology, encoding, flow = toy
    sampler = toy_sampler(toy, seed=3)
    start = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.1, 0.1, 0.0]])
    chain = sampler.sample(20, method="metropolis", progress=False, initial_positions=start * unit.nanometer)
    assert len(chain) == 20 and chain.proposal_index[0] in (-1, 0)
    if chain.proposal_index[0] == -1:
        np.testing.assert_allclose(chain.positions[0], start)

    result = sampler.sample(50, progress=False)
    path = tmp_path / "samples.npz"
    result.save(path)
    loaded = SampleResult.load(path)
    for name in ("positions", "log_weights", "reduced_potentials", "log_q", "valid", "proposal_index"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
    assert loaded.counts == result.counts and loaded.ess == result.ess and loaded.method == "importance"
    assert loaded.topology.getNumAtoms() == 3 and loaded.topology.getNumBonds() == 2
    resampled = loaded.resample(30, seed=0)
    assert resampled.positions.shape == (30, 3, 3) and resampled.method == "resampled"
    np.testing.assert_array_equal(resampled.positions, result.positions[resampled.proposal_index])
    assert loaded.to_mdtraj().n_frames == 50
    none = sampler.sample(10, method="none", progress=False)
    np.testing.assert_allclose(none.weights, 0.1)


# ------------------------------------------------------------------------------------------------- refusals
def _with_force(system, force):
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    system.addForce(force)
    return system


def test_refuses_periodic_barostat_constraints_virtual_sites_and_count(toy):
    system, topology, encoding, flow = toy
    kwargs = dict(encoding=encoding, check_bonds=False, platform="Reference")
    periodic = openmm.NonbondedForce()
    periodic.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    for _ in range(3):
        periodic.addParticle(0.0, 0.3, 0.0)
    with pytest.raises(ValueError, match="periodic boundary conditions.*NoCutoff"):
        BoltzmannGeneratorSampler(_with_force(system, periodic), topology, flow, **kwargs)
    with pytest.raises(ValueError, match="MonteCarloBarostat.*remove the barostat"):
        BoltzmannGeneratorSampler(_with_force(system, openmm.MonteCarloBarostat(1.0, 300.0)), topology, flow,
                                  **kwargs)
    constrained = _with_force(system, openmm.CMMotionRemover())
    constrained.addConstraint(0, 1, 0.1)
    with pytest.raises(ValueError, match="1 constraints.*constraints=None"):
        BoltzmannGeneratorSampler(constrained, topology, flow, **kwargs)
    virtual = _with_force(system, openmm.CMMotionRemover())
    virtual.setVirtualSite(2, openmm.TwoParticleAverageSite(0, 1, 0.5, 0.5))
    with pytest.raises(ValueError, match="virtual site"):
        BoltzmannGeneratorSampler(virtual, topology, flow, **kwargs)
    bigger = _with_force(system, openmm.CMMotionRemover())
    bigger.addParticle(1.0)
    with pytest.raises(ValueError, match="4 particles but the Topology has 3 atoms"):
        BoltzmannGeneratorSampler(bigger, topology, flow, **kwargs)


def test_refuses_bad_temperature_and_nan_positions(toy):
    system, topology, encoding, flow = toy
    kwargs = dict(encoding=encoding, check_bonds=False, platform="Reference")
    with pytest.raises(ValueError, match="outside the supported range.*units"):
        BoltzmannGeneratorSampler(system, topology, flow, temperature=0.31, **kwargs)
    with pytest.raises(ValueError, match="outside the supported range"):
        BoltzmannGeneratorSampler(system, topology, flow, temperature=31000.0, **kwargs)
    with pytest.raises(TypeError, match="not temperature units"):
        BoltzmannGeneratorSampler(system, topology, flow, temperature=310 * unit.kilojoule_per_mole, **kwargs)
    bad = np.zeros((3, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        BoltzmannGeneratorSampler(system, topology, flow, positions=bad, **kwargs)
    sampler = BoltzmannGeneratorSampler(system, topology, flow, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(5, method="metropolis", initial_positions=bad)
    with pytest.raises(ValueError, match="method must be one of"):
        sampler.sample(5, method="mcmc")
    with pytest.raises(TypeError, match="TransferableFlow"):
        BoltzmannGeneratorSampler(system, topology, model=42, **kwargs)


def test_refuses_unsupported_residue(fixture_dir):
    pdb = app.PDBFile(str(fixture_dir / "AA.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    water = app.Topology()
    residue = water.addResidue("HOH", water.addChain("W"))
    o = water.addAtom("O", app.element.oxygen, residue)
    for name in ("H1", "H2"):
        water.addBond(o, water.addAtom(name, app.element.hydrogen, residue))
    modeller.add(water, [[1.0, 1.0, 1.0], [1.1, 1.0, 1.0], [1.0, 1.1, 1.0]] * unit.nanometer)
    system = openmm.System()
    for _ in range(modeller.topology.getNumAtoms()):
        system.addParticle(1.0)
    with pytest.raises(UnsupportedTopologyError, match="HOH.*water"):
        BoltzmannGeneratorSampler(system, modeller.topology, model=None, platform="Reference")


# ------------------------------------------------------------------------------------------------ end to end
def test_end_to_end_alanine_dipeptide_with_tiny_egnn(fixture_dir):
    from openmm_tbg.nn.egnn import EGNNVectorField
    from openmm_tbg.peptides import create_system

    pdb = app.PDBFile(str(fixture_dir / "AA.pdb"))
    system = create_system(pdb.topology)
    torch.manual_seed(0)  # weight initialisation of the untrained model only
    flow = TransferableFlow(EGNNVectorField(n_layers=2, hidden=16))
    sampler = BoltzmannGeneratorSampler(system, pdb.topology, flow, seed=0, positions=pdb.positions,
                                        batch_size=4, ode_method="euler", step_size=0.5, platform="Reference")
    n = 4  # an untrained model: most samples are invalid, which exercises the bookkeeping
    result = sampler.sample(n, progress=False)
    n_atoms = pdb.topology.getNumAtoms()
    assert result.positions.shape == (n, n_atoms, 3)
    for name in ("log_weights", "reduced_potentials", "log_q", "valid", "reasons"):
        assert getattr(result, name).shape == (n,)
    assert sum(result.rejections.values()) + result.n_valid == n
    assert result.counts["n"] == n and result.n_valid == int(result.valid.sum())
    # Kish's ESS over all n proposals, rejected ones with weight 0, computed here from -u - log q.
    log_w = np.where(result.valid, -result.reduced_potentials - result.log_q, -np.inf)
    w = np.exp(log_w - log_w.max()) if result.valid.any() else np.zeros(n)
    assert result.ess == (pytest.approx(w.sum() ** 2 / (n * np.sum(w ** 2)), rel=1e-9) if w.any() else 0.0)
    assert np.all(np.isfinite(result.log_q))
    assert np.all(np.isfinite(result.log_weights[result.valid]))
    assert np.all(np.isneginf(result.log_weights[~result.valid]))
    traj = result.to_mdtraj()
    assert traj.n_frames == n and traj.n_atoms == n_atoms


def test_default_tolerance_depends_on_the_likelihood_path(toy):
    """dopri5 tolerance left unset: 1e-5 for the positions-only quadrature solve, TBG's 1e-4 without nodes;
    TBGMove resolves it the same way, and an explicit tolerance wins."""
    from openmm_tbg.moves import TBGMove
    from openmm_tbg.sampler import add_ode_arguments, default_tolerance, ode_kwargs
    import argparse

    assert toy_sampler(toy).ode_options["atol"] == toy_sampler(toy).ode_options["rtol"] == 1e-5
    assert toy_sampler(toy, quadrature_nodes=None).ode_options["atol"] == 1e-4
    assert toy_sampler(toy, atol=3e-6, rtol=2e-6).ode_options == dict(toy_sampler(toy).ode_options, atol=3e-6,
                                                                      rtol=2e-6)
    assert default_tolerance(0) == 1e-4 and default_tolerance(8) == 1e-5
    parser = argparse.ArgumentParser()
    add_ode_arguments(parser)
    kwargs = ode_kwargs(parser.parse_args([]))
    assert kwargs["atol"] is None and kwargs["quadrature_nodes"] == 16
    assert toy_sampler(toy, **{k: v for k, v in kwargs.items() if k != "ode_method"}).ode_options["atol"] == 1e-5
    system, topology, encoding, flow = toy
    move = TBGMove(flow, topology, encoding)
    assert move.ode_options["atol"] == 1e-5
    assert TBGMove(flow, topology, encoding, quadrature_nodes=None).ode_options["rtol"] == 1e-4


def test_unsupported_peptides_are_refused_when_the_sampler_is_built():
    """A tripeptide is outside the shipped dipeptide model's vocabulary: refused at construction, in plain
    words, by the sampler and by TBGMove (not inside the flow once sampling has started)."""
    from openmm_tbg.encoding import UnsupportedTopologyError
    from openmm_tbg.moves import TBGMove
    from openmm_tbg.peptides import build_peptide

    pep = build_peptide("AAA")
    with pytest.raises(UnsupportedTopologyError, match=r"at most 2 residues.*'AAA'"):
        BoltzmannGeneratorSampler(pep.system, pep.topology)
    with pytest.raises(UnsupportedTopologyError, match="openmm-tbg train"):
        TBGMove(None, pep.topology)


# ------------------------------------------------------------------ issue 21 item 2: torch threads by default
def test_sampler_runs_torch_on_its_threads_and_restores_them():
    """The flow runs on ``threads`` (default 1) torch threads inside sample/log_prob; the caller's setting is
    restored afterwards, and None leaves it alone."""
    import torch

    from openmm_tbg import BoltzmannGeneratorSampler, build_peptide
    from openmm_tbg.checkpoint import load_model

    pep = build_peptide("AA")
    flow = load_model()
    seen = []
    original_sample, original_log_prob = flow.sample, flow.log_prob

    def recording_sample(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original_sample(*args, **kwargs)

    def recording_log_prob(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original_log_prob(*args, **kwargs)

    flow.sample, flow.log_prob = recording_sample, recording_log_prob
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        sampler = BoltzmannGeneratorSampler(pep.system, pep.topology, model=flow, seed=0, positions=pep.positions)
        assert sampler.threads == 1
        result = sampler.sample(4, progress=False)
        sampler.log_prob(result.positions[:1])
        assert seen == [1, 1] and torch.get_num_threads() == 3
        seen.clear()
        keep = BoltzmannGeneratorSampler(pep.system, pep.topology, model=flow, seed=0, threads=None)
        keep.sample(2, progress=False)
        assert seen == [3] and keep.with_model(flow).threads is None
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            BoltzmannGeneratorSampler(pep.system, pep.topology, model=flow, threads=0)
    finally:
        torch.set_num_threads(before)
