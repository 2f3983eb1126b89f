"""Tests of openmm_tbg.sampler: exact statistics on a solvable system, refusals, and a real dipeptide."""

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from pymbar import timeseries
from scipy.special import logsumexp

from openmm_tbg.encoding import UnsupportedTopologyError
from openmm_tbg.flow import ODEOptions, TransferableFlow
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


def _log_w(x):
    """Closed-form log importance weight -u - log q of the toy (positions (m, 3, 3), nm)."""
    c = x - x.mean(axis=1, keepdims=True)
    log_q = -np.sum(c ** 2, axis=(1, 2)) / (2 * FLOW_STD ** 2) - 3 * (3 - 1) / 2 * np.log(2 * np.pi * FLOW_STD ** 2)
    return -bond_observable(x) / (2 * SIGMA ** 2) - log_q


def _exact_acceptance(rng, m=400000):
    """Independence-MH acceptance E min(1, w(x') / w(x)) with x ~ target, x' ~ flow, and its standard error."""
    bonds = rng.normal(scale=SIGMA, size=(m, 2, 3))
    target = np.concatenate([np.zeros((m, 1, 3)), -np.cumsum(bonds, axis=1)], axis=1)
    flow = rng.normal(scale=FLOW_STD, size=(m, 3, 3))  # the toy flow: isotropic, centre-free after centring
    a = np.minimum(1.0, np.exp(_log_w(flow) - _log_w(target)))
    return float(a.mean()), float(a.std() / np.sqrt(m))


def test_metropolis_chain_reproduces_exact_moments(toy):
    n = 3000
    chain = toy_sampler(toy, seed=2).sample(n, method="metropolis", progress=False)
    assert chain.method == "metropolis" and len(chain) == n  # the first proposal is valid here
    # The acceptance rate against its exact value E_{x~pi, x'~q} min(1, w(x') / w(x)), from exact draws of both
    # (closed-form weights); the chain's accept indicators are correlated: their statistical inefficiency.
    accepted = (np.diff(chain.proposal_index) != 0).astype(float)
    rate_se = np.sqrt(accepted.var() * timeseries.statistical_inefficiency(accepted) / len(accepted))
    exact_rate, exact_se = _exact_acceptance(np.random.default_rng(0))
    assert abs(chain.acceptance_rate - exact_rate) < 5 * np.hypot(rate_se, exact_se), (chain.acceptance_rate,
                                                                                         exact_rate)
    f = bond_observable(chain.positions)
    g = timeseries.statistical_inefficiency(f)
    assert abs(f.mean() - F_MEAN) < 5 * np.sqrt(F_VAR * g / n)
    f2 = f ** 2
    assert abs(f2.mean() - F2_MEAN) < 5 * np.sqrt(F2_VAR * timeseries.statistical_inefficiency(f2) / n)
    # Repeated states are what makes the chain exact; the accepted fraction matches the repeats.
    changes = np.count_nonzero(np.diff(chain.proposal_index)) / (n - 1)
    assert changes == pytest.approx(chain.acceptance_rate, abs=1e-12)


def test_metropolis_burn_in_drops_the_start_and_reports_the_kept_chain(toy):
    """burn_in discards the first chain states of the same draws (a chain is deterministic given the seed);
    acceptance and distinct states are those of the kept part; its averages match the exact ones within
    5 sigma from the integrated autocorrelation time."""
    from openmm_tbg.evaluation.autocorrelation import statistical_inefficiency

    n, burn_in = 2500, 500
    full = toy_sampler(toy, seed=7).sample(n, method="metropolis", progress=False)
    kept = toy_sampler(toy, seed=7).sample(n, method="metropolis", progress=False, burn_in=burn_in)
    assert len(kept) == n - burn_in
    np.testing.assert_array_equal(kept.proposal_index, full.proposal_index[burn_in:])
    np.testing.assert_array_equal(kept.positions, full.positions[burn_in:])
    changes = np.count_nonzero(np.diff(kept.proposal_index))
    assert kept.acceptance_rate == pytest.approx(changes / (len(kept) - 1), abs=1e-12)
    assert kept.n_distinct == len(np.unique(kept.proposal_index))
    assert f"{kept.n_distinct} distinct" in kept.summary() and "acceptance" in kept.summary()
    f = bond_observable(kept.positions)
    g = statistical_inefficiency(f)
    assert abs(f.mean() - F_MEAN) < 5 * np.sqrt(F_VAR * g / len(f)), (f.mean(), F_MEAN, g)
    with pytest.raises(ValueError, match="burn_in .* smaller than"):
        toy_sampler(toy).sample(10, method="metropolis", progress=False, burn_in=10)
    with pytest.raises(ValueError, match="only applies to method='metropolis'"):
        toy_sampler(toy).sample(10, progress=False, burn_in=2)


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
                                        batch_size=4, options=ODEOptions(method="euler", step_size=0.5), platform="Reference")
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
    from openmm_tbg.sampler import add_ode_arguments, default_tolerance
    from openmm_tbg.sample_command import sampling_options_from_args
    import argparse

    assert toy_sampler(toy).ode_options["atol"] == toy_sampler(toy).ode_options["rtol"] == 1e-5
    assert toy_sampler(toy, options=ODEOptions(quadrature_nodes=None)).ode_options["atol"] == 1e-4
    assert toy_sampler(toy, options=ODEOptions(atol=3e-6, rtol=2e-6)).ode_options == dict(
        toy_sampler(toy).ode_options, atol=3e-6, rtol=2e-6)
    assert default_tolerance(0) == 1e-4 and default_tolerance(8) == 1e-5
    parser = argparse.ArgumentParser()
    add_ode_arguments(parser)
    assert sampling_options_from_args(parser.parse_args([])) is None  # nothing given: the family's defaults
    given = sampling_options_from_args(parser.parse_args(["--quadrature-nodes", "0", "--atol", "2e-6"]))
    assert given == {"quadrature_nodes": None, "atol": 2e-6}
    assert toy_sampler(toy, options=given).ode_options == dict(toy_sampler(toy).ode_options, quadrature_nodes=None,
                                                               atol=2e-6, rtol=1e-4)
    system, topology, encoding, flow = toy
    move = TBGMove(flow, topology, encoding)
    assert move.ode_options["atol"] == 1e-5
    assert TBGMove(flow, topology, encoding, options={"quadrature_nodes": None}).ode_options["rtol"] == 1e-4


def test_options_belong_to_the_family_and_old_keywords_still_work(toy):
    """Each family has its own options class: the CNF takes ODEOptions, the internal-coordinate flow ICOptions
    (no fields), each refusing the other's with a message naming the right class. The ODE keyword arguments of
    earlier versions still work, with a DeprecationWarning that names the replacement, and give the same
    options as ODEOptions."""
    import warnings

    from openmm_tbg import ICOptions
    from openmm_tbg.moves import TBGMove

    system, topology, encoding, flow = toy
    with pytest.warns(DeprecationWarning, match=r"options=openmm_tbg.ODEOptions\(method='euler', step_size=0.5\)"):
        old = toy_sampler(toy, ode_method="euler", step_size=0.5)
    assert old.ode_options == toy_sampler(toy, options=ODEOptions(method="euler", step_size=0.5)).ode_options
    assert old.options == ODEOptions(method="euler", step_size=0.5)
    with pytest.warns(DeprecationWarning):
        assert TBGMove(flow, topology, encoding, quadrature_nodes=None).ode_options["rtol"] == 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new way warns about nothing
        toy_sampler(toy, options=ODEOptions(quadrature_nodes=None))
    with pytest.raises(TypeError, match="egnn-cnf family, whose options are openmm_tbg.flow.ODEOptions"):
        toy_sampler(toy, options=ICOptions())
    with pytest.raises(ValueError, match="not both"):
        toy_sampler(toy, options=ODEOptions(), atol=1e-3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        toy_sampler(toy, odemethod="euler")
    with pytest.raises(ValueError, match="uses the sampler's sampling options"):
        TBGMove(toy_sampler(toy), options=ODEOptions())

    from openmm_tbg import build_peptide, load_model

    pep, ic = build_peptide("AA"), load_model("internal-coordinate")
    sampler = BoltzmannGeneratorSampler(pep.system, pep.topology, ic, seed=0, positions=pep.positions)
    assert sampler.options == ICOptions() and sampler.flow_options == {}
    with pytest.raises(TypeError, match="internal-coordinate family, whose options are openmm_tbg.icflow.ICOptions"):
        BoltzmannGeneratorSampler(pep.system, pep.topology, ic, positions=pep.positions,
                                  options=ODEOptions(atol=1e-5))
    with pytest.raises(ValueError, match=r"\['atol'\] are not options of the internal-coordinate family"):
        BoltzmannGeneratorSampler(pep.system, pep.topology, ic, positions=pep.positions, options={"atol": 1e-5})
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="takes no ODE options"):
        BoltzmannGeneratorSampler(pep.system, pep.topology, ic, positions=pep.positions, atol=1e-5)
    sampler.close()


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
