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
