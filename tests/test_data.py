"""Data-set reader and the MD data generator (`simulate`)."""

import json
import shutil

import numpy as np
import openmm
import pytest
from openmm import unit

from openmm_tbg.data import (CHECKPOINT_NAME, DatasetError, PeptideTrajectory, build_separated_system,
                             load_dataset, load_peptide, read_splits, simulate)
from openmm_tbg.peptides import create_system

FIXTURES = ["AA", "AC", "GP", "HT", "NY"]


def _energies(system, positions_nm):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    out = []
    for x in positions_nm:
        ctx.setPositions(x.astype(np.float64) * unit.nanometer)
        out.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.array(out)


def test_read_splits(fixture_dir):
    splits = read_splits(fixture_dir)
    assert splits == {"train": ["AA", "AC", "GP"], "test": ["HT", "NY"]}


def test_load_peptide_matches_raw_npz(fixture_dir):
    traj = load_peptide(fixture_dir, "NY")
    raw = np.load(fixture_dir / "NY.npz")
    assert isinstance(traj, PeptideTrajectory)
    assert traj.positions.dtype == np.float32
    assert traj.positions.shape == (60, 38, 3) == raw["positions"].shape
    np.testing.assert_array_equal(traj.positions, raw["positions"].astype(np.float32) * np.float32(1e-4))
    np.testing.assert_array_equal(traj.run, raw["run"])
    np.testing.assert_array_equal(traj.run_interval_ps, [150.0, 150.0, 150.0])
    assert traj.encoding.n_atoms == traj.topology.getNumAtoms() == 38
    # Centroid removed per frame (to the 1e-4 nm rounding of the format).
    assert np.abs(traj.positions.mean(axis=1)).max() < 1e-4


def test_stride_and_max_frames(fixture_dir):
    full = load_peptide(fixture_dir, "AA")
    strided = load_peptide(fixture_dir, "AA", stride=4)
    np.testing.assert_array_equal(strided.positions, full.positions[::4])
    np.testing.assert_array_equal(strided.run, full.run[::4])
    few = load_peptide(fixture_dir, "AA", max_frames=9)
    assert few.n_frames == 9
    assert set(few.run.tolist()) == {0, 1, 2}  # evenly spaced over all runs, not just the first
    with pytest.raises(ValueError, match="stride"):
        load_peptide(fixture_dir, "AA", stride=0)


def test_load_dataset_split_names_all(fixture_dir):
    train = load_dataset(fixture_dir, split="train", progress=False)
    assert [t.name for t in train] == ["AA", "AC", "GP"]
    named = load_dataset(fixture_dir, names=["NY"], max_frames=5, progress=False)
    assert [t.name for t in named] == ["NY"] and named[0].n_frames == 5
    everything = load_dataset(fixture_dir, progress=False)
    assert [t.name for t in everything] == FIXTURES
    with pytest.raises(DatasetError, match="valid"):
        load_dataset(fixture_dir, split="valid", progress=False)


def test_data_frames_are_physical(fixture_dir):
    """Fixture frames have finite, typical energies under the data set's Hamiltonian (format/units sane)."""
    traj = load_peptide(fixture_dir, "GP", max_frames=10)
    e = _energies(create_system(traj.topology), traj.positions)
    assert np.all(np.isfinite(e))
    # Scrambling atoms must cost a lot of energy: a units or column-order bug would look like this.
    e_bad = _energies(create_system(traj.topology), traj.positions[:, ::-1])
    assert np.all(e_bad > e.max() + 1e3)


def test_missing_and_corrupt_files(fixture_dir, tmp_path):
    for name in ("AA", "NY"):
        shutil.copy(fixture_dir / f"{name}.pdb", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_peptide(tmp_path, "AA")
    with pytest.raises(DatasetError, match="does not exist"):
        load_peptide(tmp_path, "QQ")
    (tmp_path / "AA.npz").write_bytes(b"this is not an npz archive")
    with pytest.raises(DatasetError, match="corrupt"):
        load_peptide(tmp_path, "AA")
    # Truncated archive.
    (tmp_path / "AA.npz").write_bytes((fixture_dir / "AA.npz").read_bytes()[:3000])
    with pytest.raises(DatasetError, match="corrupt"):
        load_peptide(tmp_path, "AA")
    # Atom-count mismatch: AA's frames next to NY's PDB.
    shutil.copy(fixture_dir / "AA.npz", tmp_path / "NY.npz")
    with pytest.raises(DatasetError, match="23 atoms per frame but NY.pdb has 38"):
        load_peptide(tmp_path, "NY")
    np.savez(tmp_path / "AA.npz", positions=np.zeros((2, 23, 3), np.int16))
    with pytest.raises(DatasetError, match="run"):
        load_peptide(tmp_path, "AA")
    with pytest.raises(DatasetError, match="splits.json"):
        read_splits(tmp_path)
    (tmp_path / "splits.json").write_text("{not json")
    with pytest.raises(DatasetError, match="Cannot read"):
        read_splits(tmp_path)


def test_separated_copies_do_not_interact(fixture_dir):
    """The multi-copy System's energy is the sum of the isolated molecules' energies (restraint inactive)."""
    names = ["AA", "NY", "GP"]
    trajs = [load_peptide(fixture_dir, n, max_frames=1) for n in names]
    system, topology, positions, offsets = build_separated_system(
        [t.topology for t in trajs], [t.positions[0] for t in trajs])
    assert offsets == [0, 23, 61, 85] and topology.getNumAtoms() == 85
    x = np.asarray(positions.value_in_unit(unit.nanometer))
    e_all = _energies(system, x[None])[0]
    e_sum = sum(_energies(create_system(t.topology), t.positions[:1])[0] for t in trajs)
    assert abs(e_all - e_sum) < 1e-3


def test_simulate_and_resume(tmp_path):
    out = tmp_path / "md"
    kw = dict(save_interval_ps=0.1, equilibration_ps=0.1, seed=7, progress=False, platform="CPU",
              checkpoint_frames=7)
    paths = simulate(["AA", "GP"], out, 0.002, **kw)
    assert sorted(paths) == ["AA", "GP"]
    first = {n: load_peptide(out, n) for n in ("AA", "GP")}
    for n, t in first.items():
        assert t.n_frames == 20
        np.testing.assert_array_equal(t.run, 0)
        np.testing.assert_array_equal(t.run_interval_ps, [0.1])
        e = _energies(create_system(t.topology), t.positions)
        assert np.all(np.isfinite(e)) and np.all(e < 0.0)  # zwitterions in GB: strongly negative energies
        # Consecutive frames 100 fs apart: correlated but moving.
        step = np.sqrt(((t.positions[1:] - t.positions[:-1]) ** 2).sum(-1).mean(-1))
        assert np.all(step > 1e-3) and np.all(step < 0.1)

    # Same target again: nothing to do, nothing changes.
    simulate(["AA", "GP"], out, 0.002, **kw)
    np.testing.assert_array_equal(load_peptide(out, "AA").positions, first["AA"].positions)

    # Longer target: the run continues and appends.
    simulate(["AA", "GP"], out, 0.004, **kw)
    for n in ("AA", "GP"):
        t = load_peptide(out, n)
        assert t.n_frames == 40
        np.testing.assert_array_equal(t.positions[:20], first[n].positions)
        # Continuation, not a restart: the first new frame is close to the last old one.
        jump = np.sqrt(((t.positions[20] - t.positions[19]) ** 2).sum(-1).mean())
        assert jump < 0.1

    ckpt = json.loads((out / CHECKPOINT_NAME).read_text())
    assert ckpt["frames"] == 40 and ckpt["seed"] == 7
    with pytest.raises(ValueError, match="different settings"):
        simulate(["AA", "GP"], out, 0.006, **{**kw, "save_interval_ps": 0.2})

    # An interruption between the npz write and the checkpoint write leaves more frames in the npz than the
    # checkpoint knows of; the resumed run drops those extra frames instead of duplicating time.
    ckpt["frames"] = 35
    (out / CHECKPOINT_NAME).write_text(json.dumps(ckpt))
    before = load_peptide(out, "AA").positions
    simulate(["AA", "GP"], out, 0.004, **kw)
    after = load_peptide(out, "AA").positions
    assert after.shape[0] == 40
    np.testing.assert_array_equal(after[:35], before[:35])
    assert not np.array_equal(after[35:], before[35:])


def test_simulate_refuses_overwrite_and_bad_input(tmp_path, fixture_dir):
    shutil.copy(fixture_dir / "AA.pdb", tmp_path)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        simulate(["AA"], tmp_path, 0.001, progress=False)
    with pytest.raises(ValueError, match="'X'"):
        simulate(["AX"], tmp_path / "new", 0.001, progress=False)
    with pytest.raises(ValueError, match="more than once"):
        simulate(["AA", "AA"], tmp_path / "new", 0.001, progress=False)
    with pytest.raises(ValueError, match="whole number"):
        simulate(["AA"], tmp_path / "new", 0.001, save_interval_ps=0.0015, progress=False)
