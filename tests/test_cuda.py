"""The CUDA path of both families: sample/log_prob agreement, the same density on CPU and GPU, TBGMove and a few
training steps on ``device="cuda"``.

Marked ``cuda`` and skipped without a CUDA device; ``benchmarks/device_check.sh`` runs them (``pytest -m cuda``)
on a GPU machine. They use real parts only: the shipped internal-coordinate model on alanine dipeptide with its
amber14 + OBC1 System, the exactly solvable toy chain with a CNF, openmmtools states, the trainer.
"""

import math
import os

import numpy as np
import pytest
import torch
from openmm import unit

# OPENMM_TBG_TEST_DEVICE=cpu runs the same tests on the CPU (to check the tests themselves without a GPU).
DEVICE = os.environ.get("OPENMM_TBG_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                 reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def aa():
    from openmm_tbg import build_peptide

    return build_peptide("AA")


def test_ic_flow_on_cuda_samples_what_its_log_prob_says_and_matches_the_cpu(aa):
    """The shipped model on the GPU: log q of its own samples equals ``log_prob`` of them there (one pass, same
    float32 arithmetic as on the CPU: 6e-5 nats measured there), and the CPU gives the same log q of the same
    configurations within float32 rounding."""
    from openmm_tbg import encode_topology, load_model

    gpu = load_model(None, device=DEVICE)
    cpu = load_model(None, device="cpu")
    encoding = encode_topology(aa.topology)
    bonds = [(b[0].index, b[1].index) for b in aa.topology.bonds()]
    x, log_q = gpu.sample(gpu.condition(encoding, bonds), 512, generator=0)
    ok = torch.isfinite(log_q)
    assert ok.float().mean() > 0.9  # finite log q: inside the coordinates' support
    again = gpu.log_prob(x[ok], gpu.condition(encoding, bonds))
    np.testing.assert_allclose(again.numpy(), log_q[ok].numpy(), rtol=0, atol=1e-3)
    on_cpu = cpu.log_prob(x[ok], cpu.condition(encoding, bonds))
    np.testing.assert_allclose(on_cpu.numpy(), log_q[ok].numpy(), rtol=0, atol=1e-3)


def test_cnf_on_cuda_gives_the_closed_form_density(toy):
    """The toy CNF (a linear vector field: a Gaussian with known width) integrated on the GPU: log q of its
    samples equals the closed-form density, as it does on the CPU (tests/test_flow.py)."""
    from openmm_tbg.testing import TOY_FLOW_STD_NM

    _, _, encoding, flow = toy
    flow = flow.to(DEVICE)
    try:
        x, log_q = flow.sample(encoding, 64, generator=1)
        n = x.shape[1]
        y = (x - x.mean(1, keepdim=True)).reshape(len(x), -1).double()
        dof = 3 * (n - 1)
        # Isotropic Gaussian of std s on the centre-free subspace: -|y|^2 / 2s^2 - dof/2 log(2 pi s^2).
        exact = -(y ** 2).sum(1) / (2 * TOY_FLOW_STD_NM ** 2) - dof / 2 * math.log(2 * math.pi * TOY_FLOW_STD_NM ** 2)
        np.testing.assert_allclose(log_q.numpy(), exact.numpy(), rtol=0, atol=1e-3)
    finally:
        flow.to("cpu")


def test_tbg_move_on_cuda_reproduces_the_harmonic_chain(toy):
    """TBGMove with its model on the GPU leaves the toy's Boltzmann distribution invariant (the CPU test of
    tests/test_moves.py, run on device="cuda")."""
    from openmmtools import states

    from openmm_tbg.moves import TBGMove
    from openmm_tbg.testing import TOY_SIGMA_NM, TOY_TEMPERATURE_K, assert_detailed_balance

    system, topology, encoding, flow = toy
    move = TBGMove(flow.to(DEVICE), topology, encoding, seed=1, check_bonds=False, buffer_size=256)
    try:
        rng = np.random.default_rng(0)
        start = np.cumsum(np.vstack([np.zeros(3), rng.normal(0, TOY_SIGMA_NM, (2, 3))]), 0)
        edges = np.array([0.5, 1.0, 1.5]) * 6 * TOY_SIGMA_NM ** 2  # bins of |b1|^2 + |b2|^2 (chi-square, 6 dof)
        from scipy.stats import chi2

        cdf = chi2(6).cdf(edges / TOY_SIGMA_NM ** 2)
        target = np.diff(np.concatenate([[0.0], cdf, [1.0]]))

        def bins(x):
            d = np.diff(x, axis=0)
            return int(np.searchsorted(edges, float((d ** 2).sum())))

        thermo = states.ThermodynamicState(system, TOY_TEMPERATURE_K * unit.kelvin)
        assert_detailed_balance(move, thermo, states.SamplerState(start * unit.nanometer), bins, target,
                                n_steps=1000)
        assert move.statistics["n_proposed"] == 1000
    finally:
        flow.to("cpu")


@pytest.mark.parametrize("family", ["internal-coordinate", "egnn-cnf"])
def test_a_few_training_steps_on_cuda(fixture_dir, tmp_path, family):
    """Both families train on device="cuda": finite losses and a checkpoint of the right family that loads on
    the CPU."""
    from openmm_tbg import training
    from openmm_tbg.checkpoint import load_model
    from openmm_tbg.data import load_dataset
    from openmm_tbg.training import TrainingConfig

    trajectories = load_dataset(fixture_dir, split="train", progress=False)
    sizes = (dict(rounds=1, hidden=16, blocks=1, bins=4, peptides_per_batch=2) if family == "internal-coordinate"
             else dict(n_layers=2, hidden=16))
    cfg = TrainingConfig(family=family, steps=5, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=0,
                         device=DEVICE, log_every=1000, **sizes)
    result = training.train(trajectories, tmp_path / "gpu.pt", cfg, progress=False)
    assert result.losses.shape == (5,) and np.all(np.isfinite(result.losses))
    flow = load_model(tmp_path / "gpu.pt", device="cpu")
    assert flow.family == family
