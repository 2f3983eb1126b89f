"""Tests of openmm_tbg.results.SampleResult: distinct configurations, ESS warnings and the summary.

The results are built by hand (no flow, no energies), so these tests take milliseconds.
"""

import warnings

import numpy as np
import pytest

from openmm_tbg.results import LOW_ESS_SAMPLES, SampleResult, SampleSizeWarning
from openmm_tbg.testing import harmonic_chain
from openmm_tbg.weights import kish_ess, normalise_log_weights


def make_result(log_w, method="importance", seed=0) -> SampleResult:
    """A SampleResult of a 3-atom chain whose proposals have the given (unnormalised) log weights."""
    log_w = np.asarray(log_w, dtype=np.float64)
    n = len(log_w)
    _, topology, _ = harmonic_chain(3, 0.1, 300.0)
    valid = np.isfinite(log_w)
    rng = np.random.default_rng(seed)
    return SampleResult(
        positions=rng.normal(size=(n, 3, 3)), log_weights=normalise_log_weights(log_w),
        reduced_potentials=np.where(valid, 1.0, np.nan), log_q=np.zeros(n), valid=valid,
        reasons=np.where(valid, "", "bond_graph").astype(object),
        rejections={"bond_graph": int((~valid).sum())}, n_proposals=n, n_mirrored=0, n_relabelled=0,
        ess=kish_ess(log_w), acceptance_rate=None, method=method, temperature=300.0, topology=topology,
        proposal_index=np.arange(n))


def one_dominant(n=16):
    """The issue's case: one log weight 0, the others <= -36 (ESS = 1.0 sample)."""
    return make_result(np.r_[0.0, np.linspace(-36.0, -60.0, n - 1)])


def test_resample_reports_distinct_configurations_and_warns():
    result = one_dominant(16)
    assert result.effective_samples == pytest.approx(1.0, abs=1e-9)
    assert result.n_distinct == 16  # importance: every valid proposal is its own configuration
    with pytest.warns(SampleSizeWarning) as record:
        frames = result.resample(16, seed=0)
    assert len(frames) == 16 and frames.n_distinct == 1
    message = str(record[0].message)
    # Names the cause (ESS x N) and the remedies.
    assert "1.0 effective samples" in message and "x 16 proposals" in message
    assert "1 distinct configuration" in message
    for remedy in ("more proposals", "better-trained model", "metropolis", "TBGMove"):
        assert remedy in message
    summary = frames.summary()
    assert "16 frames holding 1 distinct configurations" in summary


def test_resample_within_the_ess_does_not_warn():
    result = make_result(np.zeros(40))  # uniform weights: ESS = 40 samples
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleSizeWarning)
        frames = result.resample(40, seed=1)
        result.resample(80, seed=1)  # 2 x ESS is still within the margin
    assert 1 < frames.n_distinct <= 40
    with pytest.warns(SampleSizeWarning):
        result.resample(81, seed=1)


def test_rejected_samples_count_in_n_but_not_in_distinct():
    result = make_result([0.0, -np.inf, 0.0, -np.inf])
    assert result.n_valid == 2 and result.n_distinct == 2
    assert result.effective_samples == pytest.approx(2.0)
    frames = result.resample(4, seed=0)
    assert set(frames.proposal_index) <= {0, 2}
    with pytest.raises(ValueError, match="positive integer"):
        result.resample(0)
    with pytest.raises(ValueError, match="positive integer"):
        result.resample(2.5)
    with pytest.raises(ValueError, match="positive integer"):
        result.resample(True)


def test_summary_explains_a_low_ess():
    low = one_dominant(16).summary()
    assert "ESS 6.25 % = 1.0 effective samples" in low
    assert "one proposal carries nearly all of the importance weight" in low
    assert "about 1 configuration;" in low
    high = make_result(np.zeros(int(4 * LOW_ESS_SAMPLES))).summary()
    assert "effective samples" in high and "note:" not in high
    assert "\n" not in high


def test_distinct_survives_save_and_load(tmp_path):
    with pytest.warns(SampleSizeWarning):
        frames = one_dominant(8).resample(8, seed=0)
    path = tmp_path / "frames.npz"
    frames.save(path)
    loaded = SampleResult.load(path)
    assert loaded.n_distinct == 1 and loaded.effective_samples == pytest.approx(1.0)
