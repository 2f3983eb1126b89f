"""Tests of openmm_tbg.figures: distinct colour-bar ticks and marked too-few-sample panels (no MD data needed)."""

import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from openmm.app import PDBFile

from openmm_tbg.figures import backbone_torsion_pairs, log_ticks, ramachandran_figure, save_ramachandran


@pytest.fixture(scope="module")
def aa(fixture_dir):
    """AA topology and its 60 MD fixture frames (nm)."""
    pdb = PDBFile(str(fixture_dir / "AA.pdb"))
    x = np.load(fixture_dir / "AA.npz")["positions"].astype(np.float64) * 1e-4
    return pdb.topology, x


def _notes(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _meshes(ax):
    return [c for c in ax.collections if isinstance(c, QuadMesh)]


@pytest.mark.parametrize("vmin, vmax", [(15.19, 15.21), (0.0152, 0.0154), (0.01, 0.05), (2e-3, 0.9),
                                        (1e-4, 1.0), (3.3e-7, 0.5)])
def test_log_ticks_have_distinct_labels(vmin, vmax):
    ticks, labels = log_ticks(vmin, vmax)
    assert len(ticks) >= 2 and len(set(labels)) == len(labels)
    assert all(vmin * (1 - 1e-9) <= t <= vmax * (1 + 1e-9) for t in ticks)
    assert np.all(np.diff(ticks) > 0)


def test_torsions_match_mdtraj_convention(aa):
    topology, x = aa
    pairs, labels = backbone_torsion_pairs(x, topology)
    assert pairs.shape == (60, 1, 2) and labels == ["phi ALA2 / psi ALA1"]
    assert np.all(np.abs(pairs) <= 180.0)
    # The MD frames of AA sit in the beta/PPII and alpha_R basins: phi < 0 throughout.
    assert np.mean(pairs[:, 0, 0] < 0) > 0.9


def test_enough_samples_give_histograms_with_distinct_ticks(aa):
    topology, x = aa
    lw = np.random.default_rng(0).normal(0.0, 0.3, len(x))  # ESS ~ 55 of 60
    fig = ramachandran_figure(x, topology, lw, min_samples=20)
    raw, reweighted = fig.axes[0], fig.axes[1]
    assert _meshes(raw) and _meshes(reweighted)
    assert not _notes(fig)
    colorbars = [ax for ax in fig.axes if ax not in (raw, reweighted)]
    assert len(colorbars) == 2
    for cax in colorbars:
        labels = [t.get_text() for t in cax.get_yticklabels() if t.get_text()]
        assert len(labels) >= 2 and len(set(labels)) == len(labels), labels


def test_too_few_samples_are_marked_not_drawn_as_a_density(aa):
    topology, x = aa
    lw = np.r_[0.0, np.full(5, -40.0)]  # the case: 6 valid samples, ESS 1.0
    fig = ramachandran_figure(x[:6], topology, lw)
    notes = _notes(fig)
    assert any("6 valid samples: too few for a density" in n for n in notes)
    assert any("6 valid samples, ESS 1.0" in n for n in notes)
    assert not any(_meshes(ax) for ax in fig.axes)
    # Many valid samples but one weight dominates: the raw panel is a histogram, the reweighted one is marked.
    lw = np.r_[0.0, np.full(59, -40.0)]
    fig = ramachandran_figure(x, topology, lw)
    assert _meshes(fig.axes[0]) and not _meshes(fig.axes[1])
    assert any("60 valid samples, ESS 1.0" in n for n in _notes(fig))


def test_no_valid_samples_and_result_wrapper(aa, tmp_path):
    from openmm_tbg.results import SampleResult

    topology, x = aa
    fig = ramachandran_figure(x[:0], topology, np.zeros(0))
    assert _notes(fig) == ["no valid samples", "no valid samples"]
    n = 30
    valid = np.arange(n) % 3 != 0
    lw = np.where(valid, 0.0, -np.inf)
    lw = np.where(valid, lw - np.log(valid.sum()), -np.inf)
    result = SampleResult(positions=x[:n], log_weights=lw, reduced_potentials=np.zeros(n), log_q=np.zeros(n),
                          valid=valid, reasons=np.where(valid, "", "bond_graph").astype(object),
                          rejections={"bond_graph": int((~valid).sum())}, n_proposals=n, n_mirrored=0,
                          n_relabelled=0, ess=valid.sum() / n, acceptance_rate=None, method="importance",
                          temperature=310.0, topology=topology, proposal_index=np.arange(n))
    path = save_ramachandran(result, tmp_path / "rama.png", title="AA")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="log_weights has 3 entries"):
        ramachandran_figure(x[:4], topology, np.zeros(3))


# ---------------------------------------------------------------------------- issue 21 item 3 (NY panel)
def test_a_dominant_sample_is_drawn_on_top_and_labelled(aa):
    """The sample that holds most of the weight is the last point drawn (on top of the light ones), larger
    than every other, and labelled with its share; it sits in the middle of the input, as in NY's case."""
    from matplotlib.collections import PathCollection

    topology, x = aa
    lw = np.full(60, -10.0)
    lw[30] = 0.0  # holds 1 / (1 + 59 e^-10) ~ 99.7 % of the weight
    fig = ramachandran_figure(x, topology, lw)
    reweighted = fig.axes[1]
    scatters = [c for c in reweighted.collections if isinstance(c, PathCollection)]
    top = max(scatters, key=lambda c: c.get_zorder())
    pairs, _ = backbone_torsion_pairs(x, topology)
    np.testing.assert_allclose(top.get_offsets()[-1], pairs[30, 0])
    assert top.get_sizes()[-1] == max(max(c.get_sizes()) for c in scatters)
    assert "100 %" in [t.get_text() for t in reweighted.texts]


def test_colour_bars_say_what_they_count_and_share_one_scale(aa):
    topology, x = aa
    lw = np.random.default_rng(1).normal(0.0, 0.5, len(x))
    fig = ramachandran_figure(x, topology, lw, min_samples=20)
    raw, reweighted = fig.axes[0], fig.axes[1]
    colorbars = [ax for ax in fig.axes if ax not in (raw, reweighted)]
    labels = [cax.get_ylabel() for cax in colorbars]
    assert labels[0].startswith("fraction of samples") and labels[1].startswith("fraction of weight"), labels
    assert all("one scale for the figure" in label for label in labels)
    (m_raw,), (m_rew,) = _meshes(raw), _meshes(reweighted)
    assert (m_raw.norm.vmin, m_raw.norm.vmax) == (m_rew.norm.vmin, m_rew.norm.vmax)
