"""Tests of openmm_tbg.training: couplings, batching, flow-matching loop, exact resume, test-split guard, DDP."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket

import numpy as np
import pytest
import torch

from openmm_tbg import training
from openmm_tbg.training import (
    PeptideBatchSampler,
    TestSplitError,
    TrainingConfig,
    equivariant_ot_coupling,
    kabsch_rotation,
    lr_factor,
    make_generators,
    make_training_batch,
    random_rotations,
    sample_mean_free_gaussian,
)

TINY = dict(family="egnn-cnf", n_layers=2, hidden=16, batch_size=8, warmup_steps=5, checkpoint_every=0, device="cpu", log_every=1000)


def _train_names(directory) -> list[str]:
    with open(os.path.join(directory, "splits.json")) as fh:
        return list(json.load(fh)["train"])


@pytest.fixture(scope="module")
def train_trajectories(fixture_dir):
    """Up to three fixture peptides of the train split, at most 200 frames each."""
    from openmm_tbg.data import load_dataset

    names = _train_names(fixture_dir)[:3]
    return load_dataset(fixture_dir, names=names, max_frames=200, progress=False)


def _rotation_checks(r: np.ndarray) -> None:
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-10)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-10)


# ------------------------------------------------------------------------------------------------ geometry
def test_lr_schedule_warmup_then_cosine():
    cfg = TrainingConfig(family="egnn-cnf", lr=1.0, steps=110, warmup_steps=10, min_lr_factor=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    values = [lr_factor(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_random_rotations_are_proper_and_uniform():
    n = 4000
    rot = random_rotations(n, generator=torch.Generator().manual_seed(1)).double().numpy()
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    # Haar measure: every matrix entry has mean 0 and variance 1/3.
    se = math.sqrt(1.0 / 3.0 / n)
    assert np.all(np.abs(rot.mean(axis=0)) < 5 * se)
    np.testing.assert_allclose((rot ** 2).mean(axis=0), 1.0 / 3.0, atol=5 * math.sqrt(2.0 / 45.0 / n) + 1e-3)


def test_mean_free_prior_statistics():
    mask = torch.zeros(2000, 7, dtype=torch.bool)
    mask[:1000, :7] = True
    mask[1000:, :4] = True
    z = sample_mean_free_gaussian(mask, 2.0, generator=torch.Generator().manual_seed(2)).double()
    assert torch.all(z[~mask] == 0)
    assert z.sum(dim=1).abs().max() < 1e-5
    # |z|^2 / std^2 is chi-squared with 3 (n - 1) degrees of freedom: mean 3(n-1), variance 6(n-1).
    for rows, n in ((slice(0, 1000), 7), (slice(1000, 2000), 4)):
        stat = (z[rows] ** 2).sum(dim=(1, 2)).numpy() / 4.0
        dof = 3 * (n - 1)
        assert abs(stat.mean() - dof) < 5 * math.sqrt(2 * dof / 1000)


def test_kabsch_returns_proper_rotation_even_for_mirror_images():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 3))
    x -= x.mean(0)
    true = random_rotations(1, generator=torch.Generator().manual_seed(3))[0].double().numpy()
    r = kabsch_rotation(x, x @ true.T)
    np.testing.assert_allclose(r, true, atol=1e-6)
    # The inverted (mirror) structure cannot be reached by a rotation: the best proper fit must be returned.
    r_mirror = kabsch_rotation(x, -x)
    _rotation_checks(r_mirror)
    assert np.sum((x @ r_mirror.T + x) ** 2) > 1e-3


def test_ot_coupling_recovers_permutation_within_groups():
    rng = np.random.default_rng(4)
    n = 10
    groups = [np.array([1, 2, 3]), np.array([6, 8])]
    x0 = rng.normal(size=(n, 3))
    x0 -= x0.mean(0)
    true_perm = np.arange(n)
    true_perm[[1, 2, 3]] = [3, 1, 2]
    true_perm[[6, 8]] = [8, 6]
    aligned, perm, rot = equivariant_ot_coupling(x0, x0[true_perm], groups)
    np.testing.assert_array_equal(perm, true_perm)
    np.testing.assert_allclose(rot, np.eye(3), atol=1e-8)
    np.testing.assert_allclose(aligned, x0[true_perm], atol=1e-8)


def test_ot_coupling_on_peptides(train_trajectories):
    """Permutations stay within groups, rotations are proper, and the transport cost drops."""
    rng = np.random.default_rng(5)
    cost_ot, cost_ind = [], []
    for traj in train_trajectories:
        enc = traj.encoding
        group_ids = enc.groups
        inter = enc.interchangeable_groups()
        assert inter, f"fixture peptide {traj.name} has no interchangeable atoms"
        scale = float(np.sqrt(np.mean(traj.positions ** 2)))
        for k in range(40):
            x1 = traj.positions[k].astype(np.float64) / scale
            x1 -= x1.mean(0)
            x0 = rng.normal(size=x1.shape)
            x0 -= x0.mean(0)
            aligned, perm, rot = equivariant_ot_coupling(x0, x1, inter)
            assert sorted(perm) == list(range(enc.n_atoms))
            np.testing.assert_array_equal(group_ids[perm], group_ids)
            _rotation_checks(rot)
            np.testing.assert_allclose(aligned, x0[perm] @ rot.T, atol=1e-12)
            c_ot = np.mean(np.sum((aligned - x1) ** 2, axis=1))
            c_ind = np.mean(np.sum((x0 - x1) ** 2, axis=1))
            # Identity permutation and rotation are feasible, so OT can never be worse.
            assert c_ot <= c_ind + 1e-9
            cost_ot.append(c_ot)
            cost_ind.append(c_ind)
    diff = np.asarray(cost_ind) - np.asarray(cost_ot)
    assert diff.mean() > 5 * diff.std(ddof=1) / math.sqrt(diff.size)


# ------------------------------------------------------------------------------------------------ batches
def test_batch_sampler_pads_and_matches_data(train_trajectories):
    np_rng, _ = make_generators(0)
    sampler = PeptideBatchSampler(train_trajectories, 64, np_rng)
    batch = sampler.sample()
    n_max = max(t.encoding.n_atoms for t in train_trajectories)
    assert batch.positions.shape[1] <= n_max and batch.tokens.shape == batch.positions.shape
    assert set(batch.peptide_index.tolist()) == set(range(len(train_trajectories)))  # 64 draws of <= 3
    for i in range(64):
        traj = train_trajectories[batch.peptide_index[i]]
        n = traj.encoding.n_atoms
        assert batch.mask[i].sum() == n and batch.mask[i, :n].all()
        np.testing.assert_array_equal(batch.tokens[i, :n], traj.encoding.tokens)
        assert np.all(batch.tokens[i, n:] == 0) and np.all(batch.positions[i, n:] == 0)
        frame = traj.positions[batch.frame_index[i]]
        np.testing.assert_allclose(batch.positions[i, :n], frame - frame.mean(0), atol=1e-6)


def test_training_batch_is_mean_free_and_scaled(train_trajectories):
    np_rng, gen = make_generators(1)
    sampler = PeptideBatchSampler(train_trajectories, 16, np_rng)
    length = training.estimate_length_scale(train_trajectories)
    for coupling in ("independent", "ot"):
        b = make_training_batch(sampler, TrainingConfig(family="egnn-cnf", coupling=coupling), length, gen)
        m = b.mask[..., None].float()
        for x in (b.x0, b.x1, b.eps):
            assert (x * m).sum(1).abs().max() < 1e-4
            assert torch.all(x[~b.mask] == 0)
        assert torch.all((b.t >= 0) & (b.t < 1))


def test_config_and_sampler_reject_bad_input(train_trajectories):
    with pytest.raises(ValueError, match="coupling"):
        TrainingConfig(family="egnn-cnf", coupling="sinkhorn").validate()
    with pytest.raises(ValueError, match="ema_decay"):
        TrainingConfig(family="egnn-cnf", ema_decay=1.0).validate()
    with pytest.raises(ValueError, match="No training peptides"):
        PeptideBatchSampler([], 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="more than once"):
        PeptideBatchSampler([train_trajectories[0]] * 2, 4, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------ training
def test_refuses_test_split(fixture_dir, tmp_path):
    from openmm_tbg.data import load_dataset, read_splits

    test_names = read_splits(fixture_dir)["test"]
    test_trajs = load_dataset(fixture_dir, names=test_names[:1], max_frames=5, progress=False)
    cfg = TrainingConfig(steps=2, **TINY)
    with pytest.raises(TestSplitError, match=test_names[0]):
        training.train(test_trajs, tmp_path / "m.pt", cfg, data_dir=fixture_dir, progress=False)
    with pytest.raises(TestSplitError, match="test"):
        training.load_training_data(fixture_dir, split="test", progress=False)
    with pytest.raises(TestSplitError, match=test_names[-1]):
        training.load_training_data(fixture_dir, names=[_train_names(fixture_dir)[0], test_names[-1]],
                                    progress=False)
    with pytest.raises(ValueError, match="not in the 'train' split"):
        training.load_training_data(fixture_dir, names=["GG"], progress=False)
    assert not (tmp_path / "m.pt").exists()


def test_short_training_lowers_loss_and_saves_model(fixture_dir, tmp_path, train_trajectories):
    from openmm_tbg.checkpoint import load_model

    cfg = TrainingConfig(steps=150, lr=5e-3, **{**TINY, "batch_size": 16})
    out = tmp_path / "model.pt"
    result = training.train(train_trajectories, out, cfg, data_dir=fixture_dir, progress=False)
    losses = result.losses
    assert losses.shape == (150,) and np.all(np.isfinite(losses))
    # Batches are independent draws, so the step losses within a window are ~independent.
    first, last = losses[:30], losses[-50:]
    se = math.sqrt(first.var(ddof=1) / first.size + last.var(ddof=1) / last.size)
    assert first.mean() - last.mean() > 5 * se, (first.mean(), last.mean(), se)
    flow = load_model(out)
    meta = torch.load(out, weights_only=True)["metadata"]["training"]
    assert meta["steps"] == 150 and meta["peptides"] == sorted(t.name for t in train_trajectories)
    assert meta["config"]["length_scale"] == pytest.approx(training.estimate_length_scale(train_trajectories))
    for key, value in result.flow.state_dict().items():
        torch.testing.assert_close(flow.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("whitening,ring_closure", [("md", "angle"), ("force-field", "distance")])
def test_internal_coordinate_training_lowers_loss_with_either_whitening(tmp_path, train_trajectories, whitening,
                                                                         ring_closure):
    """Maximum likelihood through the trainer (`--family internal-coordinate`): the loss per degree of freedom
    falls, and the saved flow carries the whitening and ring-closure rule it was trained with (GP's proline
    ring is among the training peptides)."""
    from openmm_tbg.checkpoint import load_model
    from openmm_tbg.ic_statistics import WhiteningTable
    from openmm_tbg.training.likelihood import whitening_statistics

    cfg = TrainingConfig(family="internal-coordinate", rounds=1, hidden=16, blocks=1, bins=4, batch_size=24,
                         peptides_per_batch=3, steps=120, lr=1e-2, warmup_steps=5, checkpoint_every=0,
                         device="cpu", log_every=1000, whitening=whitening, ring_closure=ring_closure)
    result = training.train(train_trajectories, tmp_path / "ic.pt", cfg, progress=False)
    losses = result.losses
    assert losses.shape == (120,) and np.all(np.isfinite(losses))
    first, last = losses[:20], losses[-40:]
    se = math.sqrt(first.var(ddof=1) / first.size + last.var(ddof=1) / last.size)
    assert first.mean() - last.mean() > 5 * se, (first.mean(), last.mean(), se)
    flow = load_model(tmp_path / "ic.pt")
    assert flow.family == "internal-coordinate"
    statistics = whitening_statistics(train_trajectories, source=whitening, ring_closure=ring_closure)
    assert flow.table.entries == WhiteningTable(statistics).entries and flow.ring_closure == ring_closure
    assert any(k.startswith("r|") for k in flow.table.entries) == (ring_closure == "distance")
    config = load_model(tmp_path / "ic.pt").checkpoint_metadata["training"]["config"]
    assert config["whitening"] == whitening and config["ring_closure"] == ring_closure
    with pytest.raises(ValueError, match="whitening must be one of"):
        TrainingConfig(family="internal-coordinate", whitening="amber").validate()
    with pytest.raises(ValueError, match="ring_closure must be one of"):
        TrainingConfig(family="internal-coordinate", ring_closure="bond").validate()


def test_resume_continues_exactly(tmp_path, train_trajectories):
    cfg = TrainingConfig(steps=8, lr=2e-3, coupling="ot", ema_decay=0.9, **TINY)
    full = training.train(train_trajectories, tmp_path / "full.pt", cfg, progress=False)
    part = training.train(train_trajectories, tmp_path / "part.pt", cfg, until_step=4, progress=False)
    assert part.step == 4 and os.path.exists(training.resume_path(tmp_path / "part.pt"))
    # A different peptide order must not matter: the saved order is used.
    resumed = training.train(train_trajectories[::-1], tmp_path / "part.pt", cfg, resume=True, progress=False)
    assert resumed.step == 8
    np.testing.assert_array_equal(resumed.losses, full.losses)
    for key, value in full.flow.state_dict().items():
        assert torch.equal(resumed.flow.state_dict()[key], value), key
    # With EMA on, the returned/saved flow carries the EMA weights, the resume file the raw ones.
    raw = torch.load(training.resume_path(tmp_path / "part.pt"), weights_only=True)["vector_field"]
    ema_state = resumed.flow.vector_field.state_dict()
    assert any(not torch.equal(raw[k], ema_state[k]) for k in raw)
    garbage = tmp_path / "garbage.pt"
    with open(training.resume_path(garbage), "wb") as fh:
        fh.write(b"not a resume file")
    with pytest.raises(ValueError, match="resume file"):
        training.train(train_trajectories, garbage, cfg, resume=True, progress=False)
    with pytest.raises(ValueError, match="hidden"):
        training.train(train_trajectories, tmp_path / "part.pt", TrainingConfig(**{**cfg.to_dict(), "hidden": 8}),
                       resume=True, progress=False)


def test_resume_leaves_the_callers_global_rng_states_alone(tmp_path, train_trajectories):
    import random

    cfg = TrainingConfig(steps=4, lr=2e-3, **TINY)
    training.train(train_trajectories, tmp_path / "m.pt", cfg, until_step=2, progress=False)
    # The caller's own streams, different from whatever the interrupted run saved in its resume file.
    torch.manual_seed(987654)
    random.seed(13)
    torch_before, python_before = torch.get_rng_state(), random.getstate()
    resumed = training.train(train_trajectories, tmp_path / "m.pt", cfg, resume=True, progress=False)
    assert resumed.step == 4
    assert torch.equal(torch.get_rng_state(), torch_before)
    assert random.getstate() == python_before


def test_init_from_continues_a_saved_model(tmp_path, train_trajectories):
    from openmm_tbg.checkpoint import CheckpointError, load_model

    parent = training.train(train_trajectories, tmp_path / "parent.pt", TrainingConfig(steps=3, **TINY),
                            progress=False)
    # The child asks for another width; the parent's architecture and length scale win. With a vanishing
    # learning rate its one step leaves the parent's weights in place.
    child_cfg = TrainingConfig(**{**TINY, "hidden": 8, "steps": 1, "lr": 1e-12, "warmup_steps": 0,
                                  "length_scale": 0.5})
    child = training.train(train_trajectories, tmp_path / "child.pt", child_cfg, progress=False,
                           init_from=tmp_path / "parent.pt")
    assert child.config.hidden == 16 and child.config.length_scale == pytest.approx(parent.flow.length_scale)
    for key, value in parent.flow.state_dict().items():
        torch.testing.assert_close(child.flow.state_dict()[key], value, rtol=0, atol=1e-9)
    meta = load_model(tmp_path / "child.pt").checkpoint_metadata["training"]["init_from"]
    assert meta["sha256"] == parent.sha256 and meta["steps"] == 3
    # A resumed child keeps the record of its parent.
    longer = TrainingConfig(**{**child.config.to_dict(), "steps": 2})
    resumed = training.train(train_trajectories, tmp_path / "child.pt", longer, resume=True, progress=False)
    assert resumed.step == 2
    assert load_model(tmp_path / "child.pt").checkpoint_metadata["training"]["init_from"]["sha256"] == parent.sha256
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="corrupt"):
        training.train(train_trajectories, tmp_path / "x.pt", child_cfg, progress=False, init_from=broken)


def test_init_from_converts_angle_closures_to_closure_distances(tmp_path, train_trajectories):
    """`--init-from MODEL --ring-closure distance`: the parent's weights carry over, the closure distances get
    whitening entries, and the closing atoms' new role tokens start as the ones they replace."""
    from openmm_tbg.checkpoint import load_model

    cfg = dict(family="internal-coordinate", rounds=1, hidden=16, blocks=1, bins=4, batch_size=8,
               peptides_per_batch=2, warmup_steps=0, checkpoint_every=0, device="cpu", log_every=1000)
    parent = training.train(train_trajectories, tmp_path / "parent.pt",
                            TrainingConfig(steps=2, whitening="force-field", **cfg), progress=False)
    assert parent.flow.ring_closure == "angle" and parent.config.ring_closure == "angle"
    child = training.train(train_trajectories, tmp_path / "child.pt",
                           TrainingConfig(steps=1, lr=1e-12, ring_closure="distance", **cfg), progress=False,
                           init_from=tmp_path / "parent.pt")
    flow = load_model(tmp_path / "child.pt")
    assert flow.ring_closure == "distance"
    # The child keeps the parent's whitening table, so its metadata names the parent's source.
    assert child.config.whitening == "force-field"
    assert flow.checkpoint_metadata["training"]["config"]["whitening"] == "force-field"
    assert any(k.startswith("r|PRO:CG") for k in flow.table.entries)  # GP's proline ring
    assert all(flow.table.entries[k] == v for k, v in parent.flow.table.entries.items())
    roles = sum(flow._vocab[:3])
    w_parent, w_child = parent.flow.embedding.weight, flow.embedding.weight
    torch.testing.assert_close(w_child[:, roles + 4], w_parent[:, roles + 3], rtol=0, atol=1e-9)
    torch.testing.assert_close(w_child[:, roles + 5], w_parent[:, roles + 7], rtol=0, atol=1e-9)
    torch.testing.assert_close(w_child[:, :roles + 4], w_parent[:, :roles + 4], rtol=0, atol=1e-9)
    assert child.config.ring_closure == "distance"
    # Without --ring-closure the parent's rule is adopted; a converted model cannot be converted back.
    again = training.train(train_trajectories, tmp_path / "again.pt", TrainingConfig(steps=1, **cfg),
                           progress=False, init_from=tmp_path / "child.pt")
    assert again.flow.ring_closure == "distance"
    with pytest.raises(ValueError, match="Only a model with angle closures"):
        training.train(train_trajectories, tmp_path / "back.pt", TrainingConfig(steps=1, ring_closure="angle", **cfg),
                       progress=False, init_from=tmp_path / "child.pt")


def test_cli_train(fixture_dir, tmp_path):
    from openmm_tbg.checkpoint import load_model

    parser = argparse.ArgumentParser()
    training.configure_parser(parser)
    name = _train_names(fixture_dir)[0]
    out = tmp_path / "cli.pt"
    args = parser.parse_args(["--data", str(fixture_dir), "--peptides", name, "--out", str(out), "--steps", "3",
                              "--batch-size", "4", "--layers", "2", "--hidden", "8", "--coupling", "ot",
                              "--device", "cpu", "--max-frames", "20", "--no-progress"])
    # The default family is the internal-coordinate flow's (the sampler's default): CNF options are refused
    # instead of being ignored, with the flag that fixes it.
    with pytest.raises(SystemExit, match="--layers, --coupling apply to the egnn-cnf family only.*--family egnn-cnf"):
        training.run_from_cli(args)
    args.family = "egnn-cnf"
    assert training.run_from_cli(args) == 0
    meta = torch.load(out, weights_only=True)["metadata"]["training"]
    assert meta["peptides"] == [name] and meta["config"]["coupling"] == "ot" and meta["steps"] == 3
    assert load_model(out).vector_field.config["hidden"] == 8

    # Fine-tuning the shipped model: `--init-from default` keeps its architecture; size options are refused.
    tuned = tmp_path / "tuned.pt"
    args = parser.parse_args(["--data", str(fixture_dir), "--peptides", name, "--out", str(tuned), "--steps", "1",
                              "--batch-size", "2", "--init-from", "default", "--device", "cpu", "--max-frames", "20",
                              "--no-progress"])
    assert training.run_from_cli(args) == 0
    shipped = load_model(None)
    assert load_model(tuned).family == shipped.family and load_model(tuned).config == shipped.config
    assert load_model(tuned).checkpoint_metadata["training"]["init_from"]["sha256"] == shipped.checkpoint_sha256
    args = parser.parse_args(["--data", str(fixture_dir), "--out", str(tuned), "--init-from", "default",
                              "--hidden", "8"])
    with pytest.raises(SystemExit, match="--hidden cannot be combined with --init-from"):
        training.run_from_cli(args)


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, port: int, data_dir: str, names: list[str], out_dir: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from openmm_tbg.data import load_dataset

    trajs = load_dataset(data_dir, names=names, max_frames=50, progress=False)
    # Record every batch this rank draws: (peptide, frame) pairs, in order.
    drawn = []
    original_sample = PeptideBatchSampler.sample

    def recording_sample(self):
        batch = original_sample(self)
        drawn.append(np.stack([batch.peptide_index, batch.frame_index], axis=1))
        return batch

    PeptideBatchSampler.sample = recording_sample
    cfg = TrainingConfig(steps=6, lr=2e-3, **TINY)
    result = training.train(trajs, os.path.join(out_dir, "ddp.pt"), cfg, progress=False)
    torch.save({"state": result.flow.state_dict(), "losses": result.losses, "path": result.model_path,
                "drawn": np.stack(drawn)}, os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn_two_ranks(worker, fixture_dir, train_trajectories, tmp_path) -> None:
    """Run ``worker(rank, 2, port, data_dir, names, out_dir)`` in two gloo processes on a free local port."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    names = [t.name for t in train_trajectories]
    mp.spawn(worker, args=(2, port, str(fixture_dir), names, str(tmp_path)), nprocs=2, join=True)


def test_ddp_gloo_two_processes(fixture_dir, tmp_path, train_trajectories):
    _spawn_two_ranks(_ddp_worker, fixture_dir, train_trajectories, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["path"] is not None and r1["path"] is None  # only rank 0 writes
    assert os.path.exists(tmp_path / "ddp.pt")
    assert np.all(np.isfinite(r0["losses"])) and len(r0["losses"]) == 6
    np.testing.assert_array_equal(r0["losses"], r1["losses"])  # the logged loss is averaged over ranks
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    # The ranks drew different batches: as reported by the ranks themselves, one batch per step.
    assert r0["drawn"].shape == r1["drawn"].shape == (6, TINY["batch_size"], 2)
    for step in range(6):
        assert not np.array_equal(r0["drawn"][step], r1["drawn"][step]), step


def _reverse_kl_estimate(flow, trajectories, n=400, seed=0):
    """Mean over peptides of mean_valid(u + log q) / n_dof on fresh proposals, with its standard error."""
    from openmm_tbg.energy import ReducedPotential
    from openmm_tbg.peptides import create_system
    from openmm_tbg.training.likelihood import peptide_bonds
    from openmm_tbg.validity import ValidityChecker

    values, variances = [], []
    g = torch.Generator().manual_seed(seed)
    for t in trajectories:
        ctx = flow.condition(t.encoding, peptide_bonds(t))
        x, log_q = flow.sample(ctx, n, generator=g)
        valid = ValidityChecker(t.topology, t.encoding)(x.numpy()).valid & np.isfinite(log_q.numpy())
        u = ReducedPotential(create_system(t.topology), 310.0, platform="CPU")(x.numpy()[valid])
        terms = np.minimum(u - u.min(), 100.0) + u.min() + log_q.numpy()[valid]  # clashes capped, as in training
        dof = float(ctx.dof.sum())
        values.append(terms.mean() / dof)
        variances.append(terms.var(ddof=1) / len(terms) / dof ** 2)
    return float(np.mean(values)), float(math.sqrt(np.sum(variances)) / len(values))


def test_energy_objective_lowers_the_reverse_kl_and_is_recorded(tmp_path, train_trajectories):
    """`objective="ml+kl"` trains on OpenMM energies and forces too: starting from a model trained by maximum
    likelihood alone, a few more steps with the KL term lower the reverse-KL estimate on fresh proposals by more
    than its error, where the same steps of maximum likelihood alone do not lower it as much. The objective
    and the counted proposals are in the metadata; the CNF refuses the objective with the reason."""
    from openmm_tbg.checkpoint import load_model

    base = dict(family="internal-coordinate", rounds=1, hidden=16, blocks=1, bins=4, batch_size=24,
                peptides_per_batch=3, lr=1e-2, warmup_steps=5, checkpoint_every=0, device="cpu", log_every=1000)
    parent = training.train(train_trajectories, tmp_path / "ml.pt", TrainingConfig(steps=60, **base),
                            progress=False)
    before, se_before = _reverse_kl_estimate(parent.flow, train_trajectories)
    cont = dict(base, lr=3e-3, warmup_steps=0)
    energy = training.train(train_trajectories, tmp_path / "kl.pt",
                            TrainingConfig(steps=40, objective="ml+kl", kl_samples=32, kl_peptides=3, **cont),
                            progress=False, init_from=tmp_path / "ml.pt")
    ml = training.train(train_trajectories, tmp_path / "ml2.pt", TrainingConfig(steps=40, **cont), progress=False,
                        init_from=tmp_path / "ml.pt")
    after, se_after = _reverse_kl_estimate(energy.flow, train_trajectories)
    after_ml, se_ml = _reverse_kl_estimate(ml.flow, train_trajectories)
    assert before - after > 4 * math.hypot(se_before, se_after), (before, after, se_before, se_after)
    assert after_ml - after > 3 * math.hypot(se_ml, se_after), (after_ml, after)
    meta = load_model(tmp_path / "kl.pt").checkpoint_metadata["training"]
    assert meta["config"]["objective"] == "ml+kl"
    assert meta["energy_proposals"]["n"] == 40 * 3 * 32
    with pytest.raises(ValueError, match="flow matching only"):
        TrainingConfig(family="egnn-cnf", objective="kl").validate()
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainingConfig(family="internal-coordinate", objective="fab").validate()


def test_kl_weight_schedule_ramps_from_the_runs_first_step():
    from openmm_tbg.training.energy_objective import kl_weight

    cfg = TrainingConfig(family="internal-coordinate", objective="ml+kl", kl_weight=0.5, kl_warmup_steps=4)
    assert [kl_weight(s, cfg) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert kl_weight(0, TrainingConfig(family="internal-coordinate")) == 0.0  # objective "ml"


def test_likelihood_loss_is_the_exact_internal_coordinate_density(train_trajectories):
    """Each batch row's log density (layers + whitening log-determinant) equals the flow's exact log q of that
    frame's internal coordinates: ``log_prob_internal`` less the Cartesian log-Jacobian. The whitening
    log-determinant of the twin sense (HALF) dihedrals varies from frame to frame, so one value per peptide
    offsets the logged loss."""
    from openmm_tbg.internal_coordinates import log_jacobian, to_internal
    from openmm_tbg.testing import randomise_spline_heads
    from openmm_tbg.training.likelihood import ICTrainingData, build_ic_flow, likelihood_loss
    from openmm_tbg.twins import canonicalize

    flow = randomise_spline_heads(build_ic_flow(train_trajectories, n_rounds=1, hidden=8, n_heads=2, n_blocks=1,
                                                n_bins=4).double())
    data = ICTrainingData(flow, train_trajectories[:1], peptides_per_batch=1)
    p = data.peptides[0]
    spread = float(p.log_det.max() - p.log_det.min())
    assert spread > 1e-3, spread  # the test needs frames whose whitening log-determinants differ
    batch = data.batch(16, np.random.default_rng(0))
    n = p.context.n_atoms
    # The frame behind each row (rows are copies of stored frames).
    rows = [int(torch.nonzero((p.z.double() == batch["z"][b, :n]).all(-1).all(-1))[0]) for b in range(16)]
    x, ok = canonicalize(torch.as_tensor(train_trajectories[0].positions, dtype=torch.float64),
                         p.context.zmatrix, p.context.swaps)
    x = x[ok][rows]
    b, a, d = to_internal(x, p.context.zmatrix)
    with torch.no_grad():
        exact = (flow.log_prob_internal(torch.stack([b, a, d], -1), p.context, positions=x)
                 - log_jacobian(b, a, p.context.zmatrix, positions=x))
        batch["z"] = batch["z"].double()
        per_row = flow(batch["z"], batch) + batch["log_det"]
        loss = likelihood_loss(flow, batch)
    # float32 storage of z costs ~1e-6 nats per row; the log-determinants of these frames spread over 0.4.
    np.testing.assert_allclose(per_row.numpy(), exact.numpy(), rtol=0, atol=1e-4)  # measured 2e-6
    assert float(loss) == pytest.approx(float(-(exact / p.n_dof).mean()), abs=1e-4)


def _ddp_energy_worker(rank: int, world: int, port: int, data_dir: str, names: list[str], out_dir: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from openmm_tbg.data import load_dataset

    trajs = load_dataset(data_dir, names=names, max_frames=50, progress=False)
    cfg = TrainingConfig(family="internal-coordinate", rounds=1, hidden=16, blocks=1, bins=4, batch_size=8,
                         peptides_per_batch=2, steps=3, lr=5e-3, warmup_steps=0, checkpoint_every=0, device="cpu",
                         log_every=1000, objective="ml+kl", kl_weight=1.0, kl_peptides=2, kl_samples=8)
    result = training.train(trajs, os.path.join(out_dir, "ddp_kl.pt"), cfg, progress=False)
    torch.save({"state": result.flow.state_dict(), "losses": result.losses}, os.path.join(out_dir, f"kl{rank}.pt"))


def test_ddp_energy_objective_averages_the_kl_gradients(fixture_dir, tmp_path, train_trajectories):
    """ml+kl under DDP: each rank draws its own proposals for the KL term (through the unwrapped flow), yet the
    ranks end with identical weights, which they would not if the KL gradients were not averaged with the
    likelihood's; the logged losses (rank means) agree too."""
    _spawn_two_ranks(_ddp_energy_worker, fixture_dir, train_trajectories, tmp_path)
    r0 = torch.load(tmp_path / "kl0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "kl1.pt", weights_only=False)
    assert np.all(np.isfinite(r0["losses"])) and len(r0["losses"]) == 3
    np.testing.assert_array_equal(r0["losses"], r1["losses"])
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
