"""Tests of openmm_tbg.results.SampleResult: distinct configurations, ESS warnings and the summary.

The results are built by hand (no flow, no energies), so these tests take milliseconds.
"""

import warnings

import numpy as np
import pytest

from openmm_tbg.results import (FEW_EFFECTIVE_SAMPLES, FewEffectiveSamplesWarning, HamiltonianMismatchWarning,
                                SampleResult, SampleSizeWarning)
from openmm_tbg.testing import harmonic_chain
from openmm_tbg.weights import kish_ess, normalise_log_weights


def make_result(log_w, method="importance", seed=0, hamiltonian_gap=None) -> SampleResult:
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
        proposal_index=np.arange(n), hamiltonian_gap=hamiltonian_gap)


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
    # Two warnings: the result rests on 1 effective sample, and 16 frames were asked of it.
    assert {type(w.message) for w in record} == {FewEffectiveSamplesWarning, SampleSizeWarning}
    message = str(next(w.message for w in record if type(w.message) is SampleSizeWarning))
    # Names the cause (ESS x N) and the remedies.
    assert "1.0 effective samples" in message and "x 16 proposals" in message
    assert "1 distinct configuration" in message
    for remedy in ("more proposals", "better-trained model", "metropolis", "TBGMove"):
        assert remedy in message
    summary = frames.summary()
    assert "16 frames holding 1 distinct configurations" in summary


def test_resample_within_the_ess_does_not_warn():
    assert FEW_EFFECTIVE_SAMPLES <= 40
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


def test_summary_says_first_that_the_result_rests_on_few_samples():
    low = one_dominant(16).summary()
    first, rest = low.split("\n", 1)
    assert first.startswith("WARNING (FewEffectiveSamplesWarning): This result rests on 1.0 effective samples")
    assert "one proposal carries nearly all of the importance weight" in first
    assert "about 1 configuration," in first
    assert rest.startswith("importance: 16/16 valid proposals") and "ESS 6.25 % = 1.0 effective samples" in rest
    assert "WARNING" not in one_dominant(16).summary(include_warnings=False)
    high = make_result(np.zeros(int(2 * FEW_EFFECTIVE_SAMPLES))).summary()
    assert "effective samples" in high and "WARNING" not in high and "\n" not in high


def test_few_effective_samples_warn_in_expectation_and_resample_with_what_to_do():
    """The issue's case: a result that rests on a handful of samples says so wherever it is used."""
    result = make_result(np.r_[0.0, -0.5, -1.0, np.full(1997, -12.0)])  # ~3 effective samples of 2000
    assert 2.0 < result.effective_samples < 5.0
    with pytest.warns(FewEffectiveSamplesWarning) as record:
        result.expectation(np.arange(2000.0))
    message = str(record[0].message)
    assert record[0].filename == __file__  # points at the caller's line
    for fix in ("More proposals are unlikely to help", "sampler.refine(", "TBGMove", "amber14-all + implicit/obc1"):
        assert fix in message, fix
    with pytest.warns(FewEffectiveSamplesWarning):
        result.resample(2, seed=0)  # within 2 x ESS: only the few-samples warning
    # The user can silence it like any warning category.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FewEffectiveSamplesWarning)
        result.expectation(np.arange(2000.0))
    # 12 effective samples of uniform weights: drawing more proposals is the advice, with the number.
    twelve = make_result(np.zeros(12))
    (category, message), = twelve.problems()
    assert category is FewEffectiveSamplesWarning and "Draw about 20 proposals" in message
    assert "Draw about 320 proposals" in one_dominant(16).problems()[0][1]  # 16 proposals: may be chance
    assert make_result(np.zeros(12), method="none").problems() == []  # raw flow samples claim nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_result(np.zeros(40)).expectation(np.arange(40.0))


def test_a_system_far_from_the_training_hamiltonian_warns_even_with_many_samples():
    from openmm_tbg.hamiltonian import HAMILTONIAN_GAP_KT

    far = make_result(np.zeros(200), hamiltonian_gap=HAMILTONIAN_GAP_KT + 2.8)
    assert far.effective_samples == pytest.approx(200.0)
    with pytest.warns(HamiltonianMismatchWarning) as record:
        far.expectation(np.ones(200))
    message = str(record[0].message)
    assert "6.8 kT" in message and "more proposals does not fix" in message
    for fix in ("sampler.refine(", "TBGMove", "amber14-all + implicit/obc1"):
        assert fix in message, fix
    assert far.summary().startswith("WARNING (HamiltonianMismatchWarning)")
    near = make_result(np.zeros(200), hamiltonian_gap=HAMILTONIAN_GAP_KT - 1.0)
    assert near.problems() == []


def test_distinct_and_hamiltonian_gap_survive_save_and_load(tmp_path):
    with pytest.warns(SampleSizeWarning):
        frames = make_result(np.r_[0.0, np.linspace(-36.0, -60.0, 7)], hamiltonian_gap=7.5).resample(8, seed=0)
    path = tmp_path / "frames.npz"
    frames.save(path)
    loaded = SampleResult.load(path)
    assert loaded.n_distinct == 1 and loaded.effective_samples == pytest.approx(1.0)
    assert loaded.hamiltonian_gap == 7.5
    assert {c for c, _ in loaded.problems()} == {FewEffectiveSamplesWarning, HamiltonianMismatchWarning}


def test_resample_warning_counts_distinct_frames_and_repeats_truly():
    """Issue 21 item 4: the warning said "most of them repeated" when 272 of 500 frames were distinct; it now
    states the two counts, and they are the resampled frames' own."""
    result = make_result(np.zeros(300))  # ESS = 300 samples; 700 frames are more than twice that
    with pytest.warns(SampleSizeWarning) as record:
        frames = result.resample(700, seed=2)
    message = str(next(w.message for w in record if type(w.message) is SampleSizeWarning))
    assert f"{frames.n_distinct} distinct configurations and {700 - frames.n_distinct} repeats" in message
    assert "most of them" not in message


@pytest.mark.parametrize("k", [0.2, 0.5, 0.9, 1.3])
def test_pareto_k_recovers_the_tail_shape_of_pareto_weights(k):
    """Weights w = U^-k (U uniform) have a generalised-Pareto tail of shape exactly k. Each estimate uses the
    M = 3 sqrt(n) = 425 largest of n = 20000 weights; the mean of 20 independent estimates lies within 5 of its
    asymptotic standard errors (1 + k) / sqrt(20 M) of k (the prior's pull toward 0.5, 10 / M of the distance,
    is a fraction of one)."""
    from openmm_tbg.weights import pareto_k

    rng = np.random.default_rng(int(10 * k))
    n, repeats = 20000, 20
    m = int(np.ceil(3 * np.sqrt(n)))
    estimates = []
    for _ in range(repeats):
        log_w = -k * np.log(rng.random(n))
        estimates.append(pareto_k(np.r_[log_w, np.full(500, -np.inf)]))  # rejected: weight 0, never in the tail
    assert abs(np.mean(estimates) - k) < 5 * (1 + k) / np.sqrt(m * repeats), estimates
    shifted = pareto_k(np.r_[log_w + 800.0, np.full(500, -np.inf)])
    assert shifted == pytest.approx(estimates[-1], abs=1e-9)  # scale-free, and no overflow


def test_pareto_k_separates_light_and_heavy_tails_and_says_when_it_cannot_tell():
    from openmm_tbg.weights import PARETO_K_RELIABLE, pareto_k

    rng = np.random.default_rng(1)
    # Log-normal weights of small spread have every moment; a spread of 3 nats behaves like k ~ 1 at n = 2000.
    assert pareto_k(0.5 * rng.normal(size=2000)) < 0.3
    assert pareto_k(3.0 * rng.normal(size=2000)) > PARETO_K_RELIABLE
    assert np.isnan(pareto_k(np.zeros(2000)))  # equal weights: no tail to fit
    assert np.isnan(pareto_k(rng.normal(size=20)))  # 20 proposals: 4 tail weights, too few
    with pytest.raises(ValueError, match="NaN"):
        pareto_k(np.r_[0.0, np.nan, np.zeros(100)])


def test_a_heavy_weight_tail_warns_that_the_ess_is_unreliable_and_reports_k():
    from openmm_tbg import UnreliableWeightsWarning

    # k = 0.9: infinite variance; this draw's 20000 weights still look like 169 effective samples
    heavy = make_result(-0.9 * np.log(np.random.default_rng(2).random(20000)))
    assert heavy.effective_samples > 100  # no few-samples warning: only the tail gives it away
    categories = [c for c, _ in heavy.problems()]
    assert categories == [UnreliableWeightsWarning]
    expected = r"Pareto k = 0\.[7-9][0-9].*variance is likely infinite.*TBGMove"
    with pytest.warns(UnreliableWeightsWarning, match=expected):
        heavy.expectation(np.ones(20000))
    assert f"Pareto k {heavy.pareto_k:.2f}" in heavy.summary(include_warnings=False)
    rng = np.random.default_rng(3)
    light = make_result(0.5 * rng.normal(size=4000))
    assert light.problems() == [] and light.pareto_k < 0.5
    assert make_result(-0.9 * np.log(rng.random(4000)), method="metropolis").pareto_k is None
