"""Tests of openmm_tbg.moves.TBGMove with real openmmtools samplers on an exactly solvable system."""

import copy
import shutil

import numpy as np
import openmm
import pytest
import torch
import yaml
from openmm import unit
from openmmtools import cache, mcmc, multistate, states, utils
from pymbar import timeseries
from scipy.stats import chi2

from openmm_tbg.flow import ODEOptions, TransferableFlow
from openmm_tbg.moves import TBGMove
from openmm_tbg.sampler import BoltzmannGeneratorSampler
from openmm_tbg.testing import TOY_FLOW_STD_NM, TOY_SIGMA_NM, TOY_TEMPERATURE_K, assert_detailed_balance

# The toy of the `toy` fixture (tests/conftest.py): target bond-vector std (nm), kelvin.
SIGMA, T = TOY_SIGMA_NM, TOY_TEMPERATURE_K


def exact_sample(rng, n_particles=3):
    """An exact Boltzmann sample of the toy chain: independent Gaussian bond vectors."""
    b = rng.normal(scale=SIGMA, size=(n_particles - 1, 3))
    return np.concatenate([np.zeros((1, 3)), -np.cumsum(b, axis=0)])


def f_bonds(x):
    """|b1|^2 + |b2|^2 (nm^2): sigma^2 chi2(6) under the target."""
    return float(np.sum((x[:-1] - x[1:]) ** 2))


N_BINS = 4
EDGES = chi2.ppf(np.arange(1, N_BINS) / N_BINS, df=6) * SIGMA ** 2  # equal-probability bins of f


def bin_of(x):
    return int(np.searchsorted(EDGES, f_bonds(x)))


def make_move(toy, seed, **kwargs):
    system, topology, encoding, flow = toy
    return TBGMove(flow, topology, encoding, seed=seed, check_bonds=False, buffer_size=256, **kwargs)


def test_tbg_move_satisfies_detailed_balance(toy):
    system = toy[0]
    move = make_move(toy, seed=1)
    thermo = states.ThermodynamicState(system, T * unit.kelvin)
    start = states.SamplerState(exact_sample(np.random.default_rng(0)) * unit.nanometer)
    state_function, accepted = _recording_accepts(move, bin_of)
    result = assert_detailed_balance(move, thermo, start, state_function, np.full(N_BINS, 1.0 / N_BINS),
                                     n_steps=2000)
    stats = move.statistics
    assert stats["n_proposed"] == 2000
    # The acceptance rate against its exact value from independent draws of target and flow (closed-form q:
    # an isotropic Gaussian of std TOY_FLOW_STD_NM on the centre-free subspace; constants cancel in the ratio).
    accepted = np.asarray(accepted, dtype=float)
    rate_se = np.sqrt(accepted.var() * timeseries.statistical_inefficiency(accepted) / len(accepted))
    rng, m = np.random.default_rng(8), 200000
    target = np.stack([exact_sample(rng) for _ in range(m)])
    proposal = rng.normal(scale=TOY_FLOW_STD_NM, size=(m, 3, 3))
    proposal -= proposal.mean(axis=1, keepdims=True)

    def log_w(x):
        c = x - x.mean(axis=1, keepdims=True)
        return -np.sum((x[:, :-1] - x[:, 1:]) ** 2, axis=(1, 2)) / (2 * SIGMA ** 2) + np.sum(
            c ** 2, axis=(1, 2)) / (2 * TOY_FLOW_STD_NM ** 2)

    a = np.exp(np.minimum(0.0, log_w(proposal) - log_w(target)))
    expected, expected_se = a.mean(), a.std() / np.sqrt(m)
    assert abs(move.acceptance_rate - expected) < 5 * np.hypot(rate_se, expected_se), (move.acceptance_rate,
                                                                                      expected, rate_se)
    assert stats["n_log_prob_evaluations"] == 1  # afterwards log q of the state is always known
    assert result["counts"].sum() == 2000


class AlwaysAcceptFlowMove(mcmc.MCMCMove):
    """A wrong move (no Metropolis test): its chain samples the flow's distribution, not Boltzmann's."""

    def __init__(self, flow, seed):
        super().__init__()
        self.flow, self.generator, self.buffer = flow, torch.Generator().manual_seed(seed), []

    def apply(self, thermodynamic_state, sampler_state, context_cache=None):
        if not self.buffer:
            x, _ = self.flow.sample(np.zeros((3, 3), dtype=np.int64), 200, generator=self.generator)
            self.buffer = list(x.numpy())
        sampler_state.positions = self.buffer.pop() * unit.nanometer


def test_detailed_balance_check_detects_a_wrong_move(toy):
    system, _, _, flow = toy
    thermo = states.ThermodynamicState(system, T * unit.kelvin)
    start = states.SamplerState(exact_sample(np.random.default_rng(1)) * unit.nanometer)
    with pytest.raises(AssertionError, match="occupancy|detailed balance"):
        assert_detailed_balance(AlwaysAcceptFlowMove(flow, 0), thermo, start, bin_of,
                                np.full(N_BINS, 1.0 / N_BINS), n_steps=600)


def test_hybrid_langevin_and_tbg_move_in_mcmc_sampler(toy):
    system = toy[0]
    thermo = states.ThermodynamicState(system, T * unit.kelvin)
    start = states.SamplerState(exact_sample(np.random.default_rng(2)) * unit.nanometer)
    tbg = make_move(toy, seed=3)
    langevin = mcmc.LangevinDynamicsMove(timestep=2.0 * unit.femtosecond, collision_rate=5.0 / unit.picosecond,
                                         n_steps=20, reassign_velocities=True)
    sampler = mcmc.MCMCSampler(thermo, start, mcmc.SequenceMove([langevin, tbg]))
    context_cache = cache.ContextCache()
    values = []
    for _ in range(300):
        sampler.run(1, context_cache=context_cache)
        values.append(f_bonds(np.asarray(sampler.sampler_state.positions.value_in_unit(unit.nanometer))))
    values = np.asarray(values)
    g = timeseries.statistical_inefficiency(values)
    assert abs(values.mean() - 6 * SIGMA ** 2) < 5 * np.sqrt(12 * SIGMA ** 4 * g / len(values))
    stats = tbg.statistics
    assert stats["n_proposed"] == 300 and stats["n_accepted"] > 0
    # Langevin moves the state between proposals, so log q of the state must be recomputed each time.
    assert stats["n_log_prob_evaluations"] > 250
    tbg.reset_statistics()
    assert tbg.statistics["n_proposed"] == 0


def test_refuses_npt_periodic_and_constrained_states(toy):
    system, topology, encoding, flow = toy
    move = make_move(toy, seed=4)
    sampler_state = states.SamplerState(exact_sample(np.random.default_rng(3)) * unit.nanometer)
    constrained = copy.deepcopy(system)
    constrained.addConstraint(0, 1, 0.1)
    with pytest.raises(ValueError, match="constraints"):
        move.apply(states.ThermodynamicState(constrained, T * unit.kelvin), sampler_state, cache.ContextCache())
    periodic = copy.deepcopy(system)
    nb = openmm.NonbondedForce()
    nb.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    for _ in range(3):
        nb.addParticle(0.0, 0.3, 0.0)
    periodic.addForce(nb)
    periodic.setDefaultPeriodicBoxVectors(*(np.eye(3) * 3.0))
    with pytest.raises(ValueError, match="periodic"):
        move.apply(states.ThermodynamicState(periodic, T * unit.kelvin), sampler_state, cache.ContextCache())
    with pytest.raises(ValueError, match="constant pressure"):
        move.apply(states.ThermodynamicState(periodic, T * unit.kelvin, pressure=1.0 * unit.atmosphere),
                   sampler_state, cache.ContextCache())


def test_deepcopy_shares_model_with_own_rng_and_in_memory_model_cannot_be_stored(toy):
    move = make_move(toy, seed=5)
    twin = copy.deepcopy(move)
    assert twin.flow is move.flow
    a = move.flow.sample(move.tokens, 3, generator=move._torch_generator)[0]
    b = twin.flow.sample(twin.tokens, 3, generator=twin._torch_generator)[0]
    assert not torch.allclose(a, b)
    assert twin._rng.random() != move._rng.random()
    with pytest.raises(ValueError, match="only in memory.*save_model"):
        utils.serialize(move)


@pytest.fixture(scope="module")
def saved_egnn_toy(toy, tmp_path_factory):
    """A tiny untrained EGNN saved as a checkpoint (a file is what MultiStateReporter can store)."""
    from openmm_tbg.checkpoint import save_model
    from openmm_tbg.nn.egnn import EGNNVectorField

    torch.manual_seed(0)  # weight initialisation only
    flow = TransferableFlow(EGNNVectorField(n_layers=2, hidden=16), length_scale=0.1)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(flow, path)
    return path


def test_replica_exchange_stores_restores_and_continues(toy, saved_egnn_toy, tmp_path):
    system, topology, encoding, _ = toy
    model = tmp_path / "tiny.pt"
    shutil.copyfile(saved_egnn_toy, model)  # the end of this test tampers with the file: not the shared one
    bg = BoltzmannGeneratorSampler(system, topology, model, temperature=T, encoding=encoding,
                                   check_bonds=False, options=ODEOptions(method="euler", step_size=0.5), platform="Reference")
    move = TBGMove(bg, n_attempts=2, buffer_size=8, seed=6)
    state = yaml.safe_load(yaml.safe_dump(utils.serialize(move)))  # YAML-safe: plain types only
    assert state["model_sha256"] == bg.model_sha256
    thermo = [states.ThermodynamicState(system, t * unit.kelvin) for t in (T, 400.0)]
    start = states.SamplerState(exact_sample(np.random.default_rng(4)) * unit.nanometer)
    storage = str(tmp_path / "re.nc")
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
    repex = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=2)
    repex.create(thermodynamic_states=thermo, sampler_states=[start], storage=reporter)
    repex.run()
    n_before = [m.statistics["n_proposed"] for m in repex._mcmc_moves]
    assert n_before == [4, 4]
    reporter.close()

    restored = multistate.ReplicaExchangeSampler.from_storage(multistate.MultiStateReporter(storage))
    moves = restored._mcmc_moves
    assert len(moves) == 2 and all(type(m) is TBGMove for m in moves)  # isinstance(anything, TBGMove) was True
    assert [m.statistics["n_proposed"] for m in moves] == n_before
    assert moves[0].flow is moves[1].flow  # restored copies share one model
    restored.extend(1)
    assert restored.iteration == 3
    assert [m.statistics["n_proposed"] for m in restored._mcmc_moves] == [6, 6]
    restored._reporter.close()

    # A changed checkpoint is refused when the move is restored.
    serialized = utils.serialize(moves[0])
    with open(model, "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        utils.deserialize(serialized)


def test_tbg_move_from_a_sampler_keeps_its_reference_chirality(saved_egnn_toy):
    from openmm_tbg.peptides import build_peptide

    pep = build_peptide("AA")
    bg = BoltzmannGeneratorSampler(pep.system, pep.topology, saved_egnn_toy, temperature=T, platform="Reference")
    assert len(bg.checker.centers) == 2 and np.all(bg.checker.expected_signs == 1)
    # Stand-in for a reference that is not all-L (reachable with encoding=): the move must use the sampler's
    # signs, not the default of the bare bond list, also after a YAML round trip.
    bg.checker.expected_signs = np.array([1.0, -1.0])
    move = TBGMove(bg, seed=0)
    np.testing.assert_array_equal(move.checker.expected_signs, [1.0, -1.0])
    restored = utils.deserialize(yaml.safe_load(yaml.safe_dump(utils.serialize(move))))
    np.testing.assert_array_equal(restored.checker.expected_signs, [1.0, -1.0])


def _recording_accepts(move, state_function):
    """Wrap ``state_function`` so that every call after the first (one per `assert_detailed_balance` step, with
    n_attempts = 1) appends whether that step's proposal was accepted, from the move's own counter.

    Returns
    -------
    (callable, list of bool)
    """
    accepted, last = [], [None]

    def recording(x):
        n = move.statistics["n_accepted"]
        if last[0] is not None:
            accepted.append(n > last[0])
        last[0] = n
        return state_function(x)

    return recording, accepted


def _expected_acceptance(flow, ctx, rng, generator, m=20000):
    """Independence-MH acceptance E min(1, w(x') / w(x)), x ~ target (exact draws), x' ~ flow, w = exp(-u) / q.

    A proposal outside the flow's support (non-finite log q) is never accepted, as in `TBGMove`.

    Returns
    -------
    (float, float)
        The estimate and its standard error from the ``m`` independent pairs.
    """
    target = torch.as_tensor(np.stack([exact_sample(rng) for _ in range(m)]))
    proposal, log_q_new = flow.sample(ctx, m, generator=generator)
    log_q_old = flow.log_prob(target, ctx).double().numpy()
    log_q_new = log_q_new.double().numpy()

    def u(x):  # reduced potential of the zero-rest-length chain
        return np.sum((x[:, :-1] - x[:, 1:]) ** 2, axis=(1, 2)) / (2 * SIGMA ** 2)

    finite = np.isfinite(log_q_new) & np.isfinite(log_q_old)
    log_ratio = np.where(finite, -u(proposal.double().numpy()) - np.nan_to_num(log_q_new)
                         + u(target.numpy()) + np.nan_to_num(log_q_old), -np.inf)
    a = np.exp(np.minimum(0.0, log_ratio))
    return float(a.mean()), float(a.std() / np.sqrt(m))


def test_tbg_move_with_the_internal_coordinate_flow_satisfies_detailed_balance(toy):
    """The same exact test with the other model family (one-pass log q, no mirroring/relabelling): the move
    goes through the flow interface only."""
    from openmm_tbg.ic_statistics import WhiteningTable
    from openmm_tbg.icflow import InternalCoordinateFlow
    from openmm_tbg.zmatrix import build_zmatrix

    system, topology, encoding, _ = toy
    bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    zm = build_zmatrix(encoding, bonds)
    rng = np.random.default_rng(5)
    frames = torch.as_tensor(np.stack([exact_sample(rng) for _ in range(2000)]))
    table = WhiteningTable()
    table.add_frames(zm, frames)
    flow = InternalCoordinateFlow(table.to_dict(), n_rounds=1, hidden=8, n_heads=2, n_blocks=1, n_bins=4,
                                  n_atom_classes=encoding.n_atoms).double()
    move = TBGMove(flow, topology, encoding, seed=2, buffer_size=200, check_bonds=False, check_chirality=False)
    assert move.flow_options == {} and not move.checker.mirror and not move.checker.relabel
    thermo = states.ThermodynamicState(system, T * unit.kelvin)
    start = states.SamplerState(exact_sample(np.random.default_rng(0)) * unit.nanometer)
    state_function, accepted = _recording_accepts(move, bin_of)
    assert_detailed_balance(move, thermo, start, state_function, np.full(N_BINS, 1.0 / N_BINS), n_steps=2000)
    assert move.statistics["n_proposed"] == 2000
    # The acceptance rate against E min(1, w(x') / w(x)) from independent exact draws of the target and the flow
    # (the chain starts in equilibrium, so every step has that expectation); the chain's accept indicators are
    # correlated: their statistical inefficiency. A ratio off by 0.5 nats moves the rate by ~20 sigma.
    accepted = np.asarray(accepted, dtype=float)
    rate_se = np.sqrt(accepted.var() * timeseries.statistical_inefficiency(accepted) / len(accepted))
    expected, expected_se = _expected_acceptance(flow, flow.condition(encoding, bonds), np.random.default_rng(8),
                                                 torch.Generator().manual_seed(9))
    assert move.acceptance_rate == pytest.approx(accepted.mean(), abs=1e-12)
    assert abs(move.acceptance_rate - expected) < 5 * np.hypot(rate_se, expected_se), (move.acceptance_rate,
                                                                                      expected, rate_se)


def test_nan_state_is_refused_before_openmm_sees_it(toy):
    """NaN coordinates (e.g. from an MD move that blew up) get the project's message, not OpenMM's."""
    system = toy[0]
    move = make_move(toy, seed=3)
    thermo = states.ThermodynamicState(system, T * unit.kelvin)
    x = exact_sample(np.random.default_rng(1))
    x[1, 2] = np.nan
    state = states.SamplerState(x * unit.nanometer)
    with pytest.raises(ValueError, match="NaN or infinite coordinates.*smaller MD timestep"):
        move.apply(thermo, state)
    assert move.statistics["n_proposed"] == 0


def test_copies_and_restored_replicas_have_independent_reproducible_streams(toy, saved_egnn_toy, tmp_path):
    """Replicas must not share a random stream. Copies by deepcopy, by SequenceMove's deepcopy (which goes
    through __getstate__/__setstate__: the per-state copies of ReplicaExchangeSampler) and by storing and
    restoring each propose different configurations, in a real ReplicaExchangeSampler before and after
    from_storage too; restoring the same stored state twice repeats its proposals exactly."""
    system, topology, encoding, _ = toy
    fast = dict(options=ODEOptions(method="euler", step_size=0.5, quadrature_nodes=2))
    move = TBGMove(saved_egnn_toy, topology, encoding, seed=6, device="cpu", check_bonds=False, buffer_size=2,
                   **fast)

    def proposals(moves):
        """The next flow proposal (nm) of every move, and its next acceptance-test uniform."""
        return [(m._next_proposal()[0], m._rng.random()) for m in moves]

    def assert_pairwise_different(draws):
        for i in range(len(draws)):
            for j in range(i):
                assert not np.allclose(draws[i][0], draws[j][0]) and draws[i][1] != draws[j][1], (i, j)

    def stored(m):
        return yaml.safe_load(yaml.safe_dump(utils.serialize(m)))  # what MultiStateReporter keeps

    assert_pairwise_different(proposals([copy.deepcopy(move) for _ in range(3)]))
    assert_pairwise_different(proposals([copy.deepcopy(mcmc.SequenceMove([move])).move_list[0]
                                         for _ in range(3)]))
    assert_pairwise_different(proposals([utils.deserialize(stored(move)) for _ in range(3)] + [move]))
    state = stored(move)
    again = proposals([utils.deserialize(copy.deepcopy(state)) for _ in range(2)])
    np.testing.assert_array_equal(again[0][0], again[1][0])
    assert again[0][1] == again[1][1]

    # The report's case: one SequenceMove for all replicas, stored and restored by the sampler itself.
    langevin = mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, n_steps=1)
    thermo = [states.ThermodynamicState(system, t * unit.kelvin) for t in (T, 350.0, 400.0)]
    start = states.SamplerState(exact_sample(np.random.default_rng(4)) * unit.nanometer)
    storage = str(tmp_path / "re.nc")
    repex = multistate.ReplicaExchangeSampler(mcmc_moves=mcmc.SequenceMove([langevin, move]),
                                              number_of_iterations=1)
    repex.create(thermodynamic_states=thermo, sampler_states=[start], storage=multistate.MultiStateReporter(
        storage, checkpoint_interval=1))
    repex.run()
    assert_pairwise_different(proposals([m.move_list[1] for m in repex._mcmc_moves]))
    repex._reporter.close()
    resumed = []
    for _ in range(2):
        restored = multistate.ReplicaExchangeSampler.from_storage(multistate.MultiStateReporter(storage))
        resumed.append(proposals([m.move_list[1] for m in restored._mcmc_moves]))
        restored._reporter.close()
    assert_pairwise_different(resumed[0])
    for (x0, u0), (x1, u1) in zip(*resumed):  # the same storage continues the same way
        np.testing.assert_array_equal(x0, x1)
        assert u0 == u1


def test_isinstance_of_tbg_move_is_true_only_for_tbg_moves(toy):
    """openmmtools' MCMCMove accepts any class defining its abstract methods; TBGMove has none left, so
    isinstance(object(), TBGMove) used to be True. Subclasses still count."""
    class Subclass(TBGMove):
        pass

    assert not isinstance(object(), TBGMove) and not isinstance(None, TBGMove)
    assert not isinstance(mcmc.LangevinDynamicsMove(), TBGMove)
    assert not issubclass(mcmc.MCMCMove, TBGMove)
    assert isinstance(make_move(toy, seed=0), TBGMove) and issubclass(Subclass, TBGMove)
    assert isinstance(make_move(toy, seed=0), mcmc.MCMCMove)  # still an openmmtools move


def test_stored_spawn_key_stays_bounded_over_store_restore_cycles(toy, saved_egnn_toy):
    """Each store/restore cycle used to add two entries to the stored spawn_key; a long replica-exchange run
    checkpoints every iteration, so the stored state grew without bound."""
    _, topology, encoding, _ = toy
    move = TBGMove(saved_egnn_toy, topology, encoding, seed=7, device="cpu", check_bonds=False, buffer_size=2,
                   options=ODEOptions(method="euler", step_size=0.5, quadrature_nodes=2))
    keys, seeds = [], []
    for _ in range(6):
        state = yaml.safe_load(yaml.safe_dump(utils.serialize(move)))
        keys.append(len(state["spawn_key"]))
        seeds.append(state["seed"])
        move = utils.deserialize(state)
        move.statistics = dict(move.statistics, n_proposed=move.statistics["n_proposed"] + 1)
    assert max(keys) == 0 and len(move._seed_seq.spawn_key) <= 1
    assert len(set(seeds)) == len(seeds)  # every stored state has a stream of its own


def test_a_state_outside_the_support_is_counted_and_warned_once(fixture_dir):
    """AA with HB3 turned 180 degrees about CA-CB: both other methyl hydrogens on one side of HB1, a labelling
    with no canonical form, so log q = -inf there. Every valid proposal from it has acceptance exactly 0; each
    is counted in n_outside_support, the first one warns, and an MD-like change of state back into the support
    lets the move accept again."""
    import warnings

    from openmm import app
    from scipy.spatial.transform import Rotation

    from openmm_tbg import OutsideSupportWarning
    from openmm_tbg.encoding import encode_topology
    from openmm_tbg.ic_statistics import WhiteningTable
    from openmm_tbg.icflow import InternalCoordinateFlow
    from openmm_tbg.peptides import create_system
    from openmm_tbg.zmatrix import build_zmatrix

    pdb = app.PDBFile(str(fixture_dir / "AA.pdb"))
    encoding = encode_topology(pdb.topology)
    bonds = [(b[0].index, b[1].index) for b in pdb.topology.bonds()]
    frames = np.load(fixture_dir / "AA.npz")["positions"].astype(np.float64) * 1e-4
    zm = build_zmatrix(encoding, bonds)
    table = WhiteningTable()
    table.add_frames(zm, frames)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = InternalCoordinateFlow(table.to_dict(), n_rounds=1, hidden=8, n_heads=2, n_blocks=1,
                                      n_bins=4).double()
    names = [a.name for a in pdb.topology.atoms()]
    ca, cb, hb3 = names.index("CA"), names.index("CB"), names.index("HB3")  # the first residue's methyl
    x = frames[0].copy()
    axis = (x[cb] - x[ca]) / np.linalg.norm(x[cb] - x[ca])
    x[hb3] = x[cb] + (x[hb3] - x[cb]) @ Rotation.from_rotvec(np.pi * axis).as_matrix().T
    ctx = flow.condition(encoding, bonds)
    assert float(flow.log_prob(torch.as_tensor(x[None]), ctx)[0]) == -np.inf
    move = TBGMove(flow, pdb.topology, seed=3, n_attempts=40, buffer_size=40)
    thermo = states.ThermodynamicState(create_system(pdb.topology), 310 * unit.kelvin)
    state = states.SamplerState(x * unit.nanometer)
    with pytest.warns(OutsideSupportWarning, match="outside the flow's support"):
        move.apply(thermo, state)
    stats = move.statistics
    n_valid = stats["n_proposed"] - stats["n_invalid"]
    assert n_valid > 0 and stats["n_outside_support"] == n_valid and stats["n_accepted"] == 0
    assert np.array_equal(state.positions.value_in_unit(unit.nanometer), x)  # never left
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideSupportWarning)  # once per move
        move.apply(thermo, state)
    assert move.statistics["n_outside_support"] == move.statistics["n_proposed"] - move.statistics["n_invalid"]
    # Inside the support again (an MD frame): nothing more is counted.
    before = move.statistics["n_outside_support"]
    move.apply(thermo, states.SamplerState(frames[1] * unit.nanometer))
    assert move.statistics["n_outside_support"] == before


def test_tbg_move_runs_torch_on_its_threads_and_keeps_them_across_copies(toy):
    """TBGMove draws and evaluates flow samples on ``threads`` torch threads (default 1, as the sampler), restores
    the caller's count, and keeps the setting through deepcopy and store/restore; from a sampler it takes the
    sampler's."""
    system, topology, encoding, flow = toy
    seen = []
    original = flow.sample

    def recording_sample(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    before = torch.get_num_threads()
    flow.sample = recording_sample
    try:
        torch.set_num_threads(3)
        move = TBGMove(flow, topology, encoding, seed=0, check_bonds=False, buffer_size=4)
        assert move.threads == 1
        thermo = states.ThermodynamicState(system, T * unit.kelvin)
        sampler_state = states.SamplerState(exact_sample(np.random.default_rng(0)) * unit.nanometer)
        move.apply(thermo, sampler_state)
        assert seen == [1] and torch.get_num_threads() == 3
        assert copy.deepcopy(move).threads == 1
        assert TBGMove(flow, topology, encoding, check_bonds=False, threads=None).threads is None
        with pytest.raises(ValueError, match="threads"):
            TBGMove(flow, topology, encoding, check_bonds=False, threads=0)
        bg = BoltzmannGeneratorSampler(system, topology, flow, temperature=T, encoding=encoding, check_bonds=False,
                                       platform="Reference", threads=2)
        assert TBGMove(bg).threads == 2
    finally:
        del flow.sample  # back to the class's method
        torch.set_num_threads(before)
