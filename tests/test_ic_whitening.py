"""Whitening of the internal-coordinate flow from the force field's harmonic terms (`force_field_moments`)
against the MD statistics it replaces, and through the trainer."""

from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch

from openmm_tbg.data import load_dataset
from openmm_tbg.ic_statistics import WhiteningTable, force_field_moments
from openmm_tbg.peptides import create_system
from openmm_tbg.training.likelihood import peptide_bonds, whitening_statistics
from openmm_tbg.zmatrix import build_zmatrix

FIXTURES = ["AA", "AC", "GP", "HT", "NY"]


@pytest.fixture(scope="module")
def trajectories(fixture_dir):
    return load_dataset(fixture_dir, names=FIXTURES, progress=False)


def test_force_field_widths_match_the_md_spread_of_bonds(trajectories):
    """Bond lengths are nearly independent harmonic oscillators, so over the fixture peptides (60 MD frames
    each, 310 K) the MD standard deviation of each bond is close to sqrt(kT/k) and its mean close to r0.
    A unit slip (kcal vs kJ: width x2.05; k/2 vs k: x1.41; degrees) or a wrong atom pair breaks both."""
    from openmm_tbg.internal_coordinates import to_internal

    ratios, offsets, angle_ratios = [], [], []
    for t in trajectories:
        zm = build_zmatrix(t.encoding, peptide_bonds(t))
        ic = torch.stack(to_internal(torch.as_tensor(t.positions, dtype=torch.float64), zm), -1).numpy()
        moments = force_field_moments(create_system(t.topology), zm, 310.0)
        assert len(moments) == 2 * zm.n_atoms - 3  # every bond and angle of the Z-matrix, none dropped
        it = iter(moments)
        for p in range(1, zm.n_atoms):
            for c in range(2 if p >= 2 else 1):
                key, x0, width = next(it)
                assert key == zm.keys[p][c]
                md = ic[:, p, c]
                if c == 0:
                    ratios.append(md.std(ddof=1) / width)
                    offsets.append((md.mean() - x0) / md.std(ddof=1))
                else:
                    angle_ratios.append(md.std(ddof=1) / width)
    ratios, offsets, angle_ratios = map(np.asarray, (ratios, offsets, angle_ratios))
    # 60 frames: each std ratio has a relative error of ~9 %, the median over ~100 bonds far less.
    assert 0.9 < np.median(ratios) < 1.1, np.median(ratios)
    assert np.median(np.abs(offsets)) < 0.5, np.median(np.abs(offsets))
    # Angles are coupled at each centre, so MD is narrower than one harmonic term alone, but not by 2x.
    assert 0.6 < np.median(angle_ratios) < 1.05, np.median(angle_ratios)


def test_force_field_moments_refuse_a_system_without_the_terms(trajectories):
    t = trajectories[0]
    zm = build_zmatrix(t.encoding, peptide_bonds(t))
    system = create_system(t.topology)
    for index in reversed(range(system.getNumForces())):
        if isinstance(system.getForce(index), openmm.HarmonicBondForce):
            system.removeForce(index)
    with pytest.raises(ValueError, match="no harmonic term .* same Topology"):
        force_field_moments(system, zm, 310.0)


def test_force_field_source_replaces_bonds_and_angles_only(trajectories):
    md = WhiteningTable(whitening_statistics(trajectories))
    ff = WhiteningTable(whitening_statistics(trajectories, source="force-field"))
    assert {k for k in md.entries if k[0] == "d"} == {k for k in ff.entries if k[0] == "d"}
    for key, value in md.entries.items():
        if key[0] == "d":
            assert ff.entries[key] == value
    assert {k for k in md.entries if k[0] in "ba"} == {k for k in ff.entries if k[0] in "ba"}
    # A key that occurs once, in one peptide only: the table gives that term's force-field values back.
    moments = [force_field_moments(create_system(t.topology), build_zmatrix(t.encoding, peptide_bonds(t)), 310.0)
               for t in trajectories]
    occurrences = {}
    for per_peptide in moments:
        for key, _, _ in per_peptide:
            occurrences[key] = occurrences.get(key, 0) + 1
    unique = [(key, x0, width) for key, x0, width in moments[0] if occurrences[key] == 1]
    assert unique
    for key, x0, width in unique:
        centre, spread, known = ff.lookup(key)
        assert known and centre == pytest.approx(x0, rel=1e-12) and spread == pytest.approx(width, rel=1e-6)
    with pytest.raises(ValueError, match="whitening source"):
        whitening_statistics(trajectories, source="amber")


def test_partial_key_keeps_the_amino_acid_of_the_coordinates_own_residue():
    from openmm_tbg.ic_statistics import partial_key

    assert partial_key("d|PRO:C:+0|PRO:CA:+0|PRO:N:+0|GLY:C:-1") == "d|PRO:C:+0|PRO:CA:+0|PRO:N:+0|C:-1"  # phi
    assert partial_key("d|PRO:N:+0|GLY:C:-1|GLY:CA:-1|GLY:N:-1") == "d|N:+0|GLY:C:-1|GLY:CA:-1|GLY:N:-1"  # psi
    assert partial_key("b|PRO:N:+0|GLY:C:-1") == "b|PRO:N:+0|C:-1"  # a tie goes to the placed atom's residue
    assert partial_key("a|ALA:CB:+0|ALA:CA:+0|ALA:N:+0") == "a|ALA:CB:+0|ALA:CA:+0|ALA:N:+0"  # one residue
    assert partial_key("d|N:+0|C:-1|CA:-1|N:-1") == "d|N:+0|C:-1|CA:-1|N:-1"  # already generic


def test_unseen_residue_pair_is_whitened_from_the_same_residue_in_other_pairs():
    """An unseen pair (Gly-Pro) takes proline's phi pooled over the X-Pro pairs that were seen, not phi pooled
    over every amino acid; the pooled values are the circular mean and spread of those frames together."""
    rng = np.random.default_rng(0)
    table = WhiteningTable()
    pro_frames = []
    for previous in ("ALA", "SER"):
        phi = rng.normal(-1.12, 0.2, 400)  # proline phi, narrow
        pro_frames.append(phi)
        table.add([f"d|PRO:C:+0|PRO:CA:+0|PRO:N:+0|{previous}:C:-1"], phi[:, None])
    table.add(["d|ALA:C:+0|ALA:CA:+0|ALA:N:+0|GLY:C:-1"], rng.uniform(-np.pi, 0.5, 800)[:, None])  # broad
    centre, width, known = table.lookup("d|PRO:C:+0|PRO:CA:+0|PRO:N:+0|GLY:C:-1")
    both = np.concatenate(pro_frames)
    r = np.hypot(np.cos(both).mean(), np.sin(both).mean())
    assert known
    assert centre == pytest.approx(np.arctan2(np.sin(both).mean(), np.cos(both).mean()), abs=1e-12)
    assert width == pytest.approx(np.sqrt(-2 * np.log(r)), abs=1e-12)
    assert abs(centre + 1.12) < 0.05 and width < 0.25
    generic_centre, generic_width, _ = table.lookup("d|TRP:C:+0|TRP:CA:+0|TRP:N:+0|GLY:C:-1")  # no Trp seen
    assert generic_width > 0.5  # falls through to all amino acids
    # Seen keys are unchanged by the fallback, and adding data refreshes the pooled entries.
    seen = table.lookup("d|PRO:C:+0|PRO:CA:+0|PRO:N:+0|ALA:C:-1")
    assert seen[0] == pytest.approx(np.arctan2(np.sin(pro_frames[0]).mean(), np.cos(pro_frames[0]).mean()))
    table.add(["d|TRP:C:+0|TRP:CA:+0|TRP:N:+0|ALA:C:-1"], rng.normal(-1.3, 0.3, 400)[:, None])
    assert table.lookup("d|TRP:C:+0|TRP:CA:+0|TRP:N:+0|GLY:C:-1")[1] < 0.35


# log q (float64 evaluation of the shipped float32 weights) of fixture MD frames 0, 20 and 40, measured on
# 2026-12-04 with the shipped ic_dipeptides.pt under its rule "own-residue". AA and GP are unseen residue pairs
# for that model (its test split), so 9 resp. 10 of their coordinates are whitened by the fallback: a change of
# the rule or of its code changes these numbers (by -0.4 to +0.2 nats on AA and up to +14 nats on GP for the
# earlier "all-amino-acids" rule) while the file keeps its sha256.
SHIPPED_IC_SHA256 = "31c338874129629a0c61d7a5094e51253197344c46eba2e0bf969dd07461f7d7"
GOLDEN_LOG_Q = {"AA": [226.182157, 229.719955, 228.568965], "GP": [233.8149256, 228.4103897, 233.0300761]}


def _fixture_molecule(fixture_dir, name):
    from openmm import app

    from openmm_tbg.encoding import encode_topology

    pdb = app.PDBFile(str(fixture_dir / f"{name}.pdb"))
    bonds = [(b[0].index, b[1].index) for b in pdb.topology.bonds()]
    frames = np.load(fixture_dir / f"{name}.npz")["positions"].astype(np.float64) * 1e-4
    return encode_topology(pdb.topology), bonds, torch.as_tensor(frames[[0, 20, 40]])


@pytest.fixture(scope="module")
def shipped_ic():
    from openmm_tbg.checkpoint import SHIPPED_MODELS, load_model

    flow = load_model(SHIPPED_MODELS["internal-coordinate"])
    assert flow.checkpoint_sha256 == SHIPPED_IC_SHA256, "a new shipped model: measure GOLDEN_LOG_Q again"
    return flow.double()


@pytest.mark.parametrize("name", sorted(GOLDEN_LOG_Q))
def test_shipped_checkpoint_reproduces_its_golden_log_q(fixture_dir, shipped_ic, name):
    """The same file gives the same density: the fallback rule of a checkpoint without one is the rule it was
    evaluated with, and the context records which coordinates fell back."""
    from openmm_tbg.ic_statistics import LEGACY_FALLBACK_RULE

    encoding, bonds, x = _fixture_molecule(fixture_dir, name)
    assert shipped_ic.config["whitening_fallback"] == LEGACY_FALLBACK_RULE == "own-residue"
    ctx = shipped_ic.condition(encoding, bonds)
    assert ctx.fallback_rule == "own-residue"
    assert len(ctx.fallbacks) == {"AA": 9, "GP": 10}[name]
    assert {f[3] for f in ctx.fallbacks} == {"own-residue"} and all(f[2].count("|") >= 2 for f in ctx.fallbacks)
    np.testing.assert_allclose(shipped_ic.log_prob(x, ctx).numpy(), GOLDEN_LOG_Q[name], rtol=0, atol=1e-6)


def test_the_fallback_rule_travels_with_the_checkpoint(fixture_dir, shipped_ic, tmp_path):
    """A flow saved with another rule is loaded with it (not with the code's default), its density on unseen
    pairs differs, and an unknown rule is refused with a message naming it."""
    import copy

    from openmm_tbg.checkpoint import CheckpointError, load_model, save_model
    from openmm_tbg.icflow import InternalCoordinateFlow

    encoding, bonds, x = _fixture_molecule(fixture_dir, "GP")
    config = {k: v for k, v in shipped_ic.config.items() if k != "dtype"}
    config["whitening_fallback"] = "all-amino-acids"
    other = InternalCoordinateFlow(**config).double()
    other.load_state_dict(shipped_ic.state_dict())
    save_model(other, tmp_path / "other.pt")
    loaded = load_model(tmp_path / "other.pt").double()
    assert loaded.table.fallback == "all-amino-acids"
    ctx = loaded.condition(encoding, bonds)
    assert {f[3] for f in ctx.fallbacks} == {"generic"}
    np.testing.assert_allclose(loaded.log_prob(x, ctx).numpy(), other.log_prob(x, other.condition(encoding, bonds)),
                               atol=1e-10)
    assert float(np.abs(loaded.log_prob(x, ctx).numpy() - GOLDEN_LOG_Q["GP"]).max()) > 1.0
    bad = copy.deepcopy(other)
    bad._config["whitening_fallback"] = "nearest"
    save_model(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="'nearest'.*newer openmm_tbg"):
        load_model(tmp_path / "bad.pt")
