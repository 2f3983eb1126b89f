"""Learning from the Hamiltonian: energy gradients, the reverse-KL gradient, per-system refinement."""

import math
import os
import warnings

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_tbg.energy import REGULARISATION_CUTOFF, ReducedPotential, reduced_potential_torch, regularise
from openmm_tbg.ic_statistics import WhiteningTable
from openmm_tbg.icflow import InternalCoordinateFlow
from openmm_tbg.refinement import (RefinedForAnotherSystemWarning, ReplayBuffer, reverse_kl_terms,
                                   system_fingerprint, tempering_exponent)
from openmm_tbg.testing import harmonic_chain, randomise_spline_heads
from openmm_tbg.zmatrix import build_zmatrix


@pytest.fixture(autouse=True)
def _seeded_initialisation():
    """Conditioner weights come from torch's global RNG: seed it per test (and restore it afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _set(table, key, mean, std):
    """A bond/angle whitening entry with this mean and standard deviation (count, sum, sum of squares)."""
    table.entries[key] = [1000.0, 1000.0 * mean, 1000.0 * (std ** 2 + mean ** 2)]


# ------------------------------------------------------------------------------------------------ energies
def test_energy_gradient_matches_finite_differences(fixture_dir):
    """du/dx from OpenMM forces, through the autograd function, against central differences of u (double
    precision Reference platform) along random directions."""
    from openmm_tbg.peptides import create_system

    pdb = app.PDBFile(str(fixture_dir / "AA.pdb"))
    potential = ReducedPotential(create_system(pdb.topology), 310.0, platform="Reference")
    frames = np.load(fixture_dir / "AA.npz")["positions"][:4].astype(np.float64) * 1e-4
    x = torch.tensor(frames, requires_grad=True)
    u_reg, u = reduced_potential_torch(potential, x)
    np.testing.assert_allclose(u.numpy(), potential(frames), rtol=1e-12)
    assert not u.requires_grad
    u_reg.sum().backward()
    rng = np.random.default_rng(0)
    h = 1e-5
    for i in range(len(frames)):
        d = rng.normal(size=frames[i].shape)
        d /= np.linalg.norm(d)
        fd = (potential(frames[i] + h * d)[0] - potential(frames[i] - h * d)[0]) / (2 * h)
        analytic = float((x.grad[i].numpy() * d).sum())
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-4)


def test_regularised_energy_is_continuous_and_its_slope_is_its_derivative():
    u = np.array([-50.0, 0.0, 949.0, 950.0, 951.0, 1e4, 1e10, np.inf])
    u_reg, slope = regularise(u, cutoff=1000.0)
    u_c = -50.0 + 1000.0
    np.testing.assert_allclose(u_reg[:3], u[:3])
    assert u_reg[3] == pytest.approx(u_c)
    assert u_reg[6] == pytest.approx(u_c + math.log1p(1e10 - u_c))
    assert u_reg[6] < u_c + 25  # a 1e10 kT clash pulls like a few tens of kT
    assert np.isposinf(u_reg[-1]) and slope[-1] == 0
    for i in range(1, 7):
        if i == 3:
            continue  # the kink
        h = 1e-6 * max(1.0, abs(u[i]))  # relative: 1e10 +- 1e-4 is 1e10 in float64
        up, down = regularise(np.array([u[0], u[i] + h]))[0][1], regularise(np.array([u[0], u[i] - h]))[0][1]
        assert slope[i] == pytest.approx((up - down) / (2 * h), rel=1e-5)
    assert REGULARISATION_CUTOFF > 0


def test_energies_and_forces_through_worker_processes_match_in_process(fixture_dir):
    from openmm_tbg.peptides import create_system

    pdb = app.PDBFile(str(fixture_dir / "AA.pdb"))
    system = create_system(pdb.topology)
    frames = np.load(fixture_dir / "AA.npz")["positions"][:8].astype(np.float64) * 1e-4
    frames[3, 0, 0] = np.nan
    with ReducedPotential(system, 310.0, platform="CPU", n_workers=2, min_frames_per_worker=2) as pool:
        e_pool, f_pool = pool.energies_and_forces(frames)
    e_one, f_one = ReducedPotential(system, 310.0, platform="CPU").energies_and_forces(frames)
    assert np.isposinf(e_pool[3]) and not f_pool[3].any()
    ok = np.isfinite(e_one)
    np.testing.assert_allclose(e_pool[ok], e_one[ok], rtol=1e-6)
    np.testing.assert_allclose(f_pool[ok], f_one[ok], rtol=1e-4, atol=1e-2)


# ------------------------------------------------------------------------------------------------ reverse KL
def test_reverse_kl_gradient_matches_its_closed_form_on_a_harmonic_chain():
    """The pathwise gradient of KL(q || p) + const = E_q[u + log q] (flow.rsample, OpenMM forces of the springs,
    the NeRF placement, the whitening and the Cartesian Jacobian) against its closed form.

    A 3-atom chain of zero-rest-length springs (u = (b1^2 + b2^2) / (2 sigma^2)) and a flow whose coupling layers
    are the identity, so that q has independent normal bond lengths and angle with the whitening's centres mu and
    widths s. Then E_q[u + log q] = sum_b (mu_b^2 + s_b^2) / (2 sigma^2) - sum_c (log s_c + log(2 pi e) / 2)
    - 2 E[log b1] - 2 E[log b2] - E[log sin theta] + const, whose derivatives in mu and s are 1-D Gaussian
    integrals (Gauss-Hermite, exact to round-off here). The gradient reaches mu and s through the context's
    centre and width tensors."""
    sigma = 0.1
    _, topology, encoding = harmonic_chain(3, sigma, 300.0)
    bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    mus = {(1, 0): 1.6 * sigma, (2, 0): 1.3 * sigma, (2, 1): 1.9}
    widths = {(1, 0): 0.3 * sigma, (2, 0): 0.25 * sigma, (2, 1): 0.3}
    table = WhiteningTable()
    zm = build_zmatrix(encoding, bonds)
    for p, keys in enumerate(zm.keys):
        for c in (0, 1):
            if keys[c]:
                _set(table, keys[c], mus[(p, c)], widths[(p, c)])
    flow = InternalCoordinateFlow(table.to_dict(), n_rounds=1, hidden=8, n_heads=2, n_blocks=1, n_bins=4,
                                  n_atom_classes=3).double()  # zero heads: identity coupling layers
    ctx = flow.condition(encoding, bonds)
    np.testing.assert_allclose([float(ctx.centre[k]) for k in mus], list(mus.values()), rtol=1e-6)
    np.testing.assert_allclose([float(ctx.width[k]) for k in mus], list(widths.values()), rtol=1e-6)
    ctx.centre = ctx.centre.clone().requires_grad_(True)
    ctx.width = ctx.width.clone().requires_grad_(True)

    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    weights = weights / weights.sum()
    exact = {}
    for (p, c), mu in mus.items():
        s, x = widths[(p, c)], mus[(p, c)] + widths[(p, c)] * nodes
        if c == 0:  # bond: u term, entropy, -2 log b
            d_mu = mu / sigma ** 2 + np.sum(weights * (-2.0 / x))
            d_s = s / sigma ** 2 - 1.0 / s + np.sum(weights * (-2.0 * nodes / x))
        else:  # angle: entropy, -log sin theta
            d_mu = np.sum(weights * (-1.0 / np.tan(x)))
            d_s = -1.0 / s + np.sum(weights * (-nodes / np.tan(x)))
        exact[(p, c)] = (d_mu, d_s)

    system, _, _ = harmonic_chain(3, sigma, 300.0)
    potential = ReducedPotential(system, 300.0, platform="Reference")
    gen = torch.Generator().manual_seed(3)
    estimates = []
    n = 5000
    for _ in range(10):
        ctx.centre.grad = ctx.width.grad = None
        terms = reverse_kl_terms(flow, ctx, n, potential, gen)
        valid = terms["valid"]
        assert valid.double().mean() > 0.999  # the truncation at theta = pi (4 widths away) is negligible
        ((terms["u_reg"] + terms["log_q"])[valid].sum() / n).backward()
        estimates.append([g for k in mus for g in (float(ctx.centre.grad[k]), float(ctx.width.grad[k]))])
    estimates = np.array(estimates)
    mean, se = estimates.mean(0), estimates.std(0, ddof=1) / math.sqrt(len(estimates))
    expected = np.array([g for k in mus for g in exact[k]])
    assert np.all(np.abs(mean - expected) < 4 * se + 1e-9), (mean, expected, se)
    assert np.all(se < 0.05 * np.abs(expected)), (se, expected)  # the test has power


def test_rsample_log_q_is_the_exact_log_prob(fixture_dir):
    """The differentiable path gives log_prob's density (AA: twin groups included, float64) wherever one
    labelling of each twin group is canonical, and a lower bound elsewhere."""
    pdb = app.PDBFile(str(fixture_dir / "AA.pdb"))
    from openmm_tbg.encoding import encode_topology
    from openmm_tbg.internal_coordinates import to_internal

    encoding = encode_topology(pdb.topology)
    bonds = [(b[0].index, b[1].index) for b in pdb.topology.bonds()]
    frames = np.load(fixture_dir / "AA.npz")["positions"].astype(np.float64) * 1e-4
    zm = build_zmatrix(encoding, bonds)
    table = WhiteningTable()
    table.add_frames(zm, frames)
    flow = randomise_spline_heads(InternalCoordinateFlow(table.to_dict(), n_rounds=1, hidden=16, n_heads=2, n_blocks=1,
                                             n_bins=4).double())
    ctx = flow.condition(encoding, bonds)
    with torch.no_grad():
        draws = flow.rsample(ctx, 200, torch.Generator().manual_seed(0))
    from openmm_tbg.twins import canonical_masks

    inside = draws["inside"]
    assert inside.float().mean() > 0.99
    x, log_q = draws["x"][inside], draws["log_q"][inside]
    exact = flow.log_prob(x, ctx)
    _, ambiguous, _ = canonical_masks(to_internal(x, zm)[2], ctx.swaps)
    single = ~ambiguous.any(1)
    assert 0.2 < float(single.double().mean()) < 1.0  # both kinds of rows are tested
    np.testing.assert_allclose(exact[single].numpy(), log_q[single].numpy(), atol=1e-8)
    # where another labelling is canonical too, the symmetrised density adds its term: rsample's is lower
    gap = (exact - log_q)[~single]
    assert float(gap.min()) > -1e-9, gap.min()


# ------------------------------------------------------------------------------------------------ buffer
def test_tempering_exponent_keeps_the_requested_ess():
    from openmm_tbg.weights import kish_ess

    log_w = np.random.default_rng(0).normal(scale=4.0, size=5000)
    beta = tempering_exponent(log_w, 0.2)
    assert 0 < beta < 1
    assert kish_ess(beta * log_w) == pytest.approx(0.2, abs=0.01)
    assert tempering_exponent(np.zeros(10), 0.5) == 1.0
    buffer = ReplayBuffer(3)
    buffer.add(torch.arange(5.0)[:, None, None].expand(5, 2, 3), np.array([0.0, -np.inf, 1.0, 2.0, 3.0]))
    assert len(buffer) == 3 and buffer.z[:, 0, 0].tolist() == [2.0, 3.0, 4.0]  # the rejected one never enters


# ------------------------------------------------------------------------------------------------ refinement
def _two_basin_toy():
    """A 4-atom chain with stiff bonds and angles and a torsion with two equal wells at +-90 degrees and 20 kT
    barriers (the target puts 1/2 in phi < 0), and a tiny flow whose dihedral base is uniform: it covers both
    wells, broadly."""
    from openmm_tbg.encoding import AtomEncoding

    temperature = 310.0
    kT = 0.0083144626 * temperature
    system = openmm.System()
    topology = app.Topology()
    residue = topology.addResidue("UNK", topology.addChain("A"))
    atoms = [topology.addAtom(f"C{i + 1}", app.element.carbon, residue) for i in range(4)]
    bond_force, angle_force = openmm.HarmonicBondForce(), openmm.HarmonicAngleForce()
    torsion = openmm.CustomTorsionForce("A * (1 + cos(2 * theta))")
    torsion.addGlobalParameter("A", 10 * kT)
    for i in range(4):
        system.addParticle(12.0)
    for i in range(3):
        bond_force.addBond(i, i + 1, 0.15, 2e4)
        topology.addBond(atoms[i], atoms[i + 1])
    for i in range(2):
        angle_force.addAngle(i, i + 1, i + 2, 1.9, 400.0)
    torsion.addTorsion(0, 1, 2, 3, [])
    for force in (bond_force, angle_force, torsion):
        system.addForce(force)
    encoding = AtomEncoding(residue_index=np.zeros(4, dtype=np.int64), amino_acid=np.zeros(4, dtype=np.int64),
                            atom_class=np.arange(4), atom_names=tuple(a.name for a in atoms),
                            residue_names=("UNK",) * 4, elements=("C",) * 4, masses=np.full(4, 12.0))
    bonds = [(i, i + 1) for i in range(3)]
    table = WhiteningTable()
    for keys in build_zmatrix(encoding, bonds).keys:
        if keys[0]:
            _set(table, keys[0], 0.15, math.sqrt(kT / 2e4))
        if keys[1]:
            _set(table, keys[1], 1.9, math.sqrt(kT / 400.0))
        if keys[2]:
            table.entries[keys[2]] = [1000.0, 0.0, 0.0]  # no preferred direction: a uniform base
    flow = InternalCoordinateFlow(table.to_dict(), n_rounds=1, hidden=16, n_heads=2, n_blocks=1, n_bins=8,
                                  n_atom_classes=4).double()
    return system, topology, encoding, flow


def _negative_fraction(sampler, n=4000):
    """Raw fraction of valid proposals with phi < 0, and the importance estimate of it with its error."""
    from openmm_tbg.internal_coordinates import dihedral

    result = sampler.sample(n, method="none", progress=False)
    x = torch.as_tensor(result.positions[result.valid])
    raw = float((dihedral(x[:, 0], x[:, 1], x[:, 2], x[:, 3]) < 0).double().mean())
    weighted = sampler.sample(n, progress=False)
    xw = torch.as_tensor(weighted.positions)
    neg = (dihedral(xw[:, 0], xw[:, 1], xw[:, 2], xw[:, 3]) < 0).numpy()
    w = np.exp(weighted.log_weights)
    estimate = float((w * neg).sum())
    error = float(np.sqrt((w ** 2 * (neg - estimate) ** 2).sum()))  # delta-method standard error
    return raw, estimate, error


def _toy_sampler(seed=0):
    from openmm_tbg import BoltzmannGeneratorSampler

    system, topology, encoding, flow = _two_basin_toy()
    return BoltzmannGeneratorSampler(system, topology, model=flow, encoding=encoding, temperature=310.0,
                                     seed=seed, check_bonds=False, check_chirality=False, platform="Reference",
                                     device="cpu")


def test_refinement_keeps_both_basins_where_reverse_kl_alone_loses_one():
    """The target has 1/2 of its mass in each well and the starting flow proposes both, broadly (ESS ~19 %).
    Refinement with the default objective (buffer likelihood + 0.1 reverse KL + 0.5 parent anchor) keeps both
    wells in the raw proposals and raises the ESS; reverse KL alone (the negative control, same budget and
    seeds, anchor off) is
    mode-seeking: it drains one well of the raw proposals and its ESS stays low. Everything is seeded and on the
    Reference platform, so the run is deterministic; the importance estimate of the population is right within
    its error for every model (the weights are exact)."""
    sampler = _toy_sampler()
    raw0, estimate0, error0 = _negative_fraction(sampler)
    assert abs(raw0 - 0.5) < 0.05 and abs(estimate0 - 0.5) < 4 * error0
    # final_check_samples=0: the objectives' own effect (the final check could return the starting weights)
    settings = dict(max_seconds=None, max_steps=150, learning_rate=3e-3, batch_size=128, ml_batch_size=128,
                    eval_every=50, eval_samples=512, patience=0, progress=False, seed=1, final_check_samples=0)
    both = sampler.refine(**settings)
    raw, estimate, error = _negative_fraction(both)
    assert 0.35 < raw < 0.65, raw
    assert abs(estimate - 0.5) < 4 * error, (estimate, error)
    assert both.refinement.best_ess > 0.5
    kl_only = sampler.refine(ml_weight=0.0, kl_weight=1.0, anchor_weight=0.0, **settings)
    raw_kl, estimate_kl, error_kl = _negative_fraction(kl_only)
    assert not 0.35 < raw_kl < 0.65, raw_kl
    assert abs(estimate_kl - 0.5) < 4 * error_kl + 0.02
    assert kl_only.refinement.history[-1]["ess"] < 0.5 * both.refinement.best_ess


def test_refined_checkpoint_round_trip_and_system_warning(tmp_path):
    """A refined model is saved with its parent's sha256 and the System's fingerprint, loads in a sampler and
    in TBGMove with the same density, and warns when used on another System."""
    from openmm_tbg import BoltzmannGeneratorSampler, TBGMove
    from openmm_tbg.checkpoint import load_model

    sampler = _toy_sampler()
    out = tmp_path / "refined.pt"
    refined = sampler.refine(max_seconds=None, max_steps=4, eval_every=2, eval_samples=64, progress=False,
                             out=out)
    assert refined.model_path is not None and refined.refinement.model_path == str(out)
    loaded = load_model(out)
    info = loaded.checkpoint_metadata["refinement"]
    assert info["parent_sha256"] == sampler.model_sha256
    assert info["system_sha256"] == system_fingerprint(sampler.system, sampler.topology)["system_sha256"]
    assert info["steps"] == 4 and len(info["history"]) == 3
    # the verdict travels with the checkpoint, and the summary says it: with no evaluation better than the start
    # its weights come back unchecked; otherwise the final check decided
    assert info["kept"] == refined.refinement.kept in ("refined", "parent")
    if refined.refinement.best_step == 0:
        assert info["kept"] == "parent" and info["final_check"] == {}
        assert "no evaluation improved on the starting model" in refined.refinement.summary()
    else:
        assert info["final_check"]["samples"] == 2048
        assert set(info["final_check"]) == {"samples", "parent", "refined"}
        assert "final check on 2048 proposals each" in refined.refinement.summary()
    x = refined.sample(16, method="none", progress=False).positions
    np.testing.assert_allclose(refined.log_prob(x), loaded.log_prob(torch.as_tensor(x), refined.context).numpy(),
                               atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefinedForAnotherSystemWarning)
        again = BoltzmannGeneratorSampler(sampler.system, sampler.topology, model=str(out),
                                          encoding=sampler.encoding, temperature=310.0, check_bonds=False,
                                          check_chirality=False, platform="Reference")
        TBGMove(again)
    other = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(sampler.system))
    other.getForce(2).setGlobalParameterDefaultValue(0, 5.0)
    with pytest.warns(RefinedForAnotherSystemWarning, match="refined for another System"):
        BoltzmannGeneratorSampler(other, sampler.topology, model=str(out), encoding=sampler.encoding,
                                  temperature=310.0, check_bonds=False, check_chirality=False,
                                  platform="Reference")
    with pytest.warns(RefinedForAnotherSystemWarning, match="temperature"):
        BoltzmannGeneratorSampler(sampler.system, sampler.topology, model=str(out), encoding=sampler.encoding,
                                  temperature=350.0, check_bonds=False, check_chirality=False,
                                  platform="Reference")


def test_refine_refuses_the_cnf_and_bad_options():
    from openmm_tbg import BoltzmannGeneratorSampler
    from openmm_tbg.testing import toy_chain

    system, topology, encoding, cnf = toy_chain()
    sampler = BoltzmannGeneratorSampler(system, topology, model=cnf, encoding=encoding, temperature=300.0,
                                        check_bonds=False, check_chirality=False, platform="Reference")
    with pytest.raises(ValueError, match="internal-coordinate"):
        sampler.refine(max_steps=1)
    toy = _toy_sampler()
    with pytest.raises(ValueError, match="budget"):
        toy.refine(max_seconds=None)
    with pytest.raises(TypeError, match="unknown option 'learning_rat'"):
        toy.refine(max_steps=1, learning_rat=1e-3)
    from openmm_tbg.refinement import RefinementOptions

    # the budget of `options` holds unless max_seconds / max_steps are given
    options = RefinementOptions(max_seconds=None, max_steps=2, eval_every=1, eval_samples=32)
    assert toy.refine(options=options, progress=False).refinement.steps == 2
    assert toy.refine(options=options, max_steps=1, progress=False).refinement.steps == 1


def test_cli_refine_writes_a_model_that_sample_loads(tmp_path):
    """`openmm-tbg refine` on AA for a few steps writes the refined checkpoint and its ESS figure; `openmm-tbg
    sample --model` loads it (no warning: same System); an unwritable --out is refused before any work."""
    from openmm_tbg import cli
    from openmm_tbg.checkpoint import load_model

    out = tmp_path / "aa_refined.pt"
    code = cli.main(["refine", "--sequence", "AA", "--out", str(out), "--max-steps", "3", "--eval-every", "3",
                     "--eval-samples", "64", "--batch-size", "16", "--final-check-samples", "256", "--no-progress"])
    assert code == 0 and out.exists() and (tmp_path / "aa_refined_refinement.png").exists()
    info = load_model(out).checkpoint_metadata["refinement"]
    assert info["sequence"] == "AA" and info["steps"] == 3 and info["parent_sha256"]
    assert info["kept"] in ("refined", "parent") and info["options"]["final_check_samples"] == 256
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefinedForAnotherSystemWarning)
        code = cli.main(["sample", "--sequence", "AA", "--model", str(out), "--samples", "32", "--seed", "1",
                         "--output", str(tmp_path / "s.npz"), "--no-figure", "--no-progress"])
    assert code == 0
    (tmp_path / "locked").mkdir(mode=0o500)
    if not os.access(tmp_path / "locked", os.W_OK):  # (root can write anywhere)
        assert cli.main(["refine", "--sequence", "AA", "--out", str(tmp_path / "locked" / "m.pt"),
                         "--max-steps", "1"]) == 2


def test_the_parent_anchor_holds_the_wells_that_reverse_kl_drains():
    """`anchor_weight` adds the likelihood of the starting model's raw proposals: with it, reverse KL alone
    (the objective that drains a well in the test above, same seeds) keeps both wells in the raw proposals."""
    sampler = _toy_sampler()
    settings = dict(max_seconds=None, max_steps=150, learning_rate=3e-3, batch_size=128, ml_batch_size=128,
                    eval_every=50, eval_samples=512, patience=0, progress=False, seed=1, ml_weight=0.0,
                    kl_weight=1.0, final_check_samples=0)
    anchored = sampler.refine(anchor_weight=1.0, **settings)
    raw, estimate, error = _negative_fraction(anchored)
    assert 0.3 < raw < 0.7, raw  # (reverse KL alone: 0.25 in the test above)
    assert abs(estimate - 0.5) < 4 * error + 0.02
    assert anchored.flow.checkpoint_metadata["refinement"]["options"]["anchor_weight"] == 1.0
    with pytest.raises(ValueError, match="anchor_weight"):
        sampler.refine(max_steps=1, anchor_weight=-1.0)


def test_the_final_check_keeps_the_state_whose_weights_have_the_lighter_tail():
    """`refine`'s final check draws fresh proposals of the starting model and of the refined state and keeps the
    refined weights only if their Pareto k is lower. A flow with random spline heads (scale 0.5) proposes the
    two-well toy badly (k ~3, ESS < 1 %) against the broad starting flow (k < 0.5): as the refined state it is
    replaced by the starting weights, and as the starting model it is replaced by the refined state."""
    import copy

    from openmm_tbg.refinement import RefinementOptions, RefinementResult, _final_check
    from openmm_tbg.testing import randomise_spline_heads

    sampler = _toy_sampler()
    good = sampler.flow
    bad = randomise_spline_heads(copy.deepcopy(good), scale=0.5, seed=3)
    options = RefinementOptions(final_check_samples=1024)
    for parent, refined, kept in ((good, bad, "parent"), (bad, good, "refined")):
        probe = copy.copy(sampler)
        flow = copy.deepcopy(refined)
        result = RefinementResult()
        _final_check(result, probe, flow, parent, options)
        check = result.final_check
        assert result.kept == kept and check["samples"] == 1024
        worse, better = (check["refined"], check["parent"]) if kept == "parent" else (check["parent"],
                                                                                        check["refined"])
        assert better["pareto_k"] < 0.7 < 2.0 < worse["pareto_k"], check
        assert better["ess"] > 0.1 > 0.01 > worse["ess"], check
        expected = parent if kept == "parent" else refined
        for name, value in flow.state_dict().items():  # the weights returned are the kept model's
            assert torch.equal(value, expected.state_dict()[name]), name
        assert probe.flow is flow


def test_refine_runs_the_final_check_and_returns_a_state_that_beats_a_poor_start():
    """End to end: from a poor start (random heads, k ~5) 60 steps improve the proposals; refine's final check
    draws 1024 proposals of each and returns the refined state, recorded in its result and summary."""
    import copy

    from openmm_tbg.testing import randomise_spline_heads

    toy = _toy_sampler()
    poor = toy.with_model(randomise_spline_heads(copy.deepcopy(toy.flow), scale=0.5, seed=3))
    refined = poor.refine(max_seconds=None, max_steps=60, eval_every=20, eval_samples=256, learning_rate=3e-3,
                          batch_size=64, ml_batch_size=64, final_check_samples=1024, progress=False, seed=1)
    result = refined.refinement
    assert result.best_step > 0 and result.kept == "refined"
    check = result.final_check
    assert check["samples"] == 1024 and check["refined"]["pareto_k"] < check["parent"]["pareto_k"]
    assert "kept the refined state" in result.summary()
    changed = [name for name, value in refined.flow.state_dict().items()
               if not torch.equal(value, poor.flow.state_dict()[name])]
    assert changed  # the returned weights are the refined ones
