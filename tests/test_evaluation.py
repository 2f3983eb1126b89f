"""Tests of openmm_tbg.evaluation: metrics against closed forms and independent solvers, and the pipeline."""

import json
from pathlib import Path

import mdtraj
import numpy as np
import pytest
import torch
from scipy.signal import lfilter
from scipy.stats import norm

from openmm_tbg import evaluation as ev
from openmm_tbg.data import load_peptide


# ---------------------------------------------------------------------------------------------- Kish ESS
def test_kish_ess_exact_values():
    assert ev.kish_ess(np.zeros(4)) == pytest.approx(1.0)
    assert ev.kish_ess([0.0, -np.inf]) == pytest.approx(0.5)            # rejected samples still count in n
    assert ev.kish_ess(np.log([1.0, 2.0, 3.0])) == pytest.approx(36 / 42)
    assert ev.kish_ess([5.0, -np.inf, -np.inf, -np.inf]) == pytest.approx(0.25)
    assert ev.kish_ess([-np.inf, -np.inf]) == 0.0
    assert ev.kish_ess([1000.0, 1000.0]) == pytest.approx(1.0)          # no overflow
    with pytest.raises(ValueError, match="NaN"):
        ev.kish_ess([0.0, np.nan])


# ---------------------------------------------------------------------------------------------- energy W2
def test_energy_w2_exact_small_cases_and_lp_solver():
    assert ev.energy_w2([0.0, 1.0], [0.0, 3.0]) == pytest.approx(np.sqrt(2.0))
    assert ev.energy_w2([0.0, 1.0], [0.0], weights_md=[3.0, 1.0]) == pytest.approx(0.5)
    # Unequal sizes: quantile steps at 1/3, 1/2, 2/3 -> W2^2 = 0.25/6 + 0.25/6.
    assert ev.energy_w2([0.0, 1.0], [0.0, 0.5, 1.0]) == pytest.approx(np.sqrt(1 / 12))
    # Rejected samples may have infinite energies if their weight is zero; with weight they are refused.
    assert ev.energy_w2([0.0, 1.0], [0.0, 1.0, np.inf], [1.0, 1.0, 0.0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="non-finite"):
        ev.energy_w2([0.0, 1.0], [0.0, np.inf])
    # Weighted, unequal sizes: the quantile formula is exact, so it matches POT's network-simplex LP.
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=37), rng.gamma(2.0, size=53)
    wa, wb = rng.random(37), rng.random(53)
    lp = np.sqrt(ot.emd2(wa / wa.sum(), wb / wb.sum(), (a[:, None] - b[None, :]) ** 2))
    assert ev.energy_w2(a, b, weights_bg=wb, weights_md=wa) == pytest.approx(lp, rel=1e-9)


def test_energy_w2_two_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    n, (m1, s1), (m2, s2) = 20000, (0.0, 1.0), (1.0, 2.0)
    w2 = ev.energy_w2(rng.normal(m1, s1, n), rng.normal(m2, s2, n))
    exact = np.sqrt((m1 - m2) ** 2 + (s1 - s2) ** 2)
    # Delta method: the estimate moves with the sample means (SE sqrt((s1^2+s2^2)/n)) and standard deviations
    # (SE sqrt((s1^2+s2^2)/(2n))); the quantile noise adds a bias ~ (s1^2+s2^2) loglog(n) / (n W2).
    var = (s1 ** 2 + s2 ** 2) / n
    se = np.sqrt(((m1 - m2) / exact) ** 2 * var + ((s1 - s2) / exact) ** 2 * var / 2)
    bias = (s1 ** 2 + s2 ** 2) * np.log(np.log(n)) / (n * exact)
    assert abs(w2 - exact) < 5 * se + bias


def test_energy_w2_importance_reweighting_removes_the_shift():
    rng = np.random.default_rng(1)
    n, shift = 20000, 0.5
    x = rng.normal(0.0, 1.0, n)                  # proposal N(0, 1)
    target = rng.normal(shift, 1.0, n)           # target N(0.5, 1)
    log_w = shift * x                            # log N(x; 0.5, 1) - log N(x; 0, 1) + const
    n_eff = ev.kish_ess(log_w) * n
    # Two samples of the same distribution: E W2^2 ~ (2 + loglog n) (1/n + 1/n_eff) for a unit Gaussian
    # (mean, spread and quantile-process terms); 5 x its square root bounds the distance.
    tol = 5 * np.sqrt((2 + np.log(np.log(n))) * (1 / n + 1 / n_eff))
    assert ev.energy_w2(target, x, np.exp(log_w)) < tol
    assert abs(ev.energy_w2(target, x) - shift) < tol          # without weights: the mean shift
    assert ev.energy_w2(target, x, np.exp(-log_w)) > 2 * shift - tol   # wrong-sign weights: twice the shift


# ---------------------------------------------------------------------------------------------- torus W2
def test_torus_w2_is_periodic():
    rng = np.random.default_rng(2)
    a = rng.uniform(-np.pi, np.pi, (300, 2))
    assert ev.torus_w2(a, a + 2 * np.pi) < 1e-6
    assert ev.torus_w2(a, a - np.array([0.0, 4 * np.pi])) < 1e-6
    # A cluster just below +pi and one just above -pi are 0.1 rad apart, not 2 pi - 0.1.
    jitter = rng.normal(0.0, 0.01, (50, 2))
    near_plus = np.array([np.pi - 0.05, 0.0]) + jitter
    near_minus = np.array([-np.pi + 0.05, 0.0]) + jitter
    assert ev.torus_w2(near_plus, near_minus) == pytest.approx(0.1, abs=1e-6)
    assert ev.torus_distance(np.array([[np.pi - 0.05]]), np.array([[-np.pi + 0.05]]))[0, 0] == pytest.approx(0.01)


def test_torus_w2_weights_subsampling_and_independent_solver():
    rng = np.random.default_rng(4)
    a = rng.uniform(-np.pi, np.pi, (80, 2))
    b = rng.vonmises(1.0, 2.0, (120, 2))
    # Zero weights drop samples exactly.
    w = np.zeros(120)
    w[:80] = 1.0
    assert ev.torus_w2(a, b, w) == pytest.approx(ev.torus_w2(a, b[:80]), rel=1e-9)
    # Equal-size uniform samples: the LP (POT) and the Hungarian assignment (scipy) agree.
    from scipy.optimize import linear_sum_assignment

    cost = ev.torus_distance(a, b[:80])
    rows, cols = linear_sum_assignment(cost)
    assert ev.torus_w2(a, b[:80]) == pytest.approx(np.sqrt(cost[rows, cols].mean()), rel=1e-9)
    # Subsampling keeps the answer close: same distribution, 400 vs 100 points per side.
    big_a = rng.vonmises(1.0, 2.0, (400, 2))
    big_b = rng.vonmises(-1.0, 2.0, (400, 2))
    full = ev.torus_w2(big_a, big_b)
    sub = ev.torus_w2(big_a, big_b, max_samples=100, seed=0)
    assert full > 1.5  # two angles shifted by 2 rad each: W2 ~ 2 sqrt(2)
    assert abs(sub - full) < 0.2 * full
    with pytest.raises(ValueError, match="same torsions"):
        ev.torus_w2(a, b[:, :1])


# ---------------------------------------------------------------------------------------------- torsions
def _dihedral(p0, p1, p2, p3):
    """Praxeolitic formula, radians, independent of mdtraj."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - np.sum(b0 * b1, -1, keepdims=True) * b1
    w = b2 - np.sum(b2 * b1, -1, keepdims=True) * b1
    return np.arctan2(np.sum(np.cross(b1, v) * w, -1), np.sum(v * w, -1))


def test_backbone_torsions_match_mdtraj_and_geometry(fixture_dir):
    traj = load_peptide(fixture_dir, "NY")
    phi, psi = ev.backbone_torsions(traj.positions, traj.topology)
    assert phi.shape == psi.shape == (traj.n_frames, 1)
    md = traj.to_mdtraj()
    np.testing.assert_allclose(phi, mdtraj.compute_phi(md)[1], atol=1e-6)
    np.testing.assert_allclose(psi, mdtraj.compute_psi(md)[1], atol=1e-6)
    phi2, psi2 = ev.backbone_torsions(md)
    np.testing.assert_array_equal(phi, phi2)
    # phi is of residue 2 (C1-N2-CA2-C2), psi of residue 1 (N1-CA1-C1-N2), as in TBG's Ramachandran plots.
    idx = {(a.residue.index, a.name): a.index for a in traj.topology.atoms()}
    x = traj.positions.astype(np.float64)
    ref_phi = _dihedral(*(x[:, idx[k]] for k in [(0, "C"), (1, "N"), (1, "CA"), (1, "C")]))
    ref_psi = _dihedral(*(x[:, idx[k]] for k in [(0, "N"), (0, "CA"), (0, "C"), (1, "N")]))
    np.testing.assert_allclose(phi[:, 0], ref_phi, atol=1e-4)
    np.testing.assert_allclose(psi[:, 0], ref_psi, atol=1e-4)
    with pytest.raises(ValueError, match="topology"):
        ev.backbone_torsions(traj.positions)


def test_ramachandran_pairs_use_the_same_residue():
    phi = np.array([[1.0, 2.0], [1.5, 2.5]])   # phi of residues 2 and 3 of a tripeptide
    psi = np.array([[10.0, 20.0], [15.0, 25.0]])  # psi of residues 1 and 2
    np.testing.assert_array_equal(ev.ramachandran_pairs(phi, psi), [[1.0, 20.0], [1.5, 25.0]])
    np.testing.assert_array_equal(ev.ramachandran_pairs(phi[:, :1], psi[:, :1]), [[1.0, 10.0], [1.5, 15.0]])


# ---------------------------------------------------------------------------------------------- autocorrelation
def _ar1(rng, rho, n):
    e = rng.normal(size=n)
    e[0] /= np.sqrt(1 - rho ** 2)  # stationary start
    return lfilter([1.0], [1.0, -rho], e)


def _g_tolerance(g, n):
    """5 standard errors of g (Sokal: var/g^2 ~ 2 (2M + 1) / n for window M; M <= 5 g here)."""
    return 5 * g * np.sqrt(2 * (2 * 5 * g + 1) / n)


def test_autocorrelation_time_of_ar1_process():
    rng = np.random.default_rng(5)
    rho, n = 0.8, 200000
    g_exact = (1 + rho) / (1 - rho)
    x = _ar1(rng, rho, n)
    g = ev.statistical_inefficiency(x)
    assert abs(g - g_exact) < _g_tolerance(g_exact, n)
    assert ev.integrated_autocorrelation_time(x, dt=10.0) == pytest.approx(g * 10.0 / 2)
    # Independent runs given as a list or as run indices pool into one estimate.
    runs = [_ar1(rng, rho, 10000) for _ in range(20)]
    g_runs = ev.statistical_inefficiency(runs)
    assert abs(g_runs - g_exact) < _g_tolerance(g_exact, n)
    assert ev.statistical_inefficiency(np.concatenate(runs), runs=np.repeat(np.arange(20), 10000)) == \
        pytest.approx(g_runs)
    assert abs(ev.statistical_inefficiency(rng.normal(size=n)) - 1.0) < _g_tolerance(1.0, n)


def test_md_independent_samples_uses_each_runs_frame_interval():
    rng = np.random.default_rng(6)
    rho, n = 0.8, 100000
    g = (1 + rho) / (1 - rho)
    # phi small AR(1) (sin(phi) ~ phi is the slowest observable; cos(phi) ~ 1 - phi^2/2 decorrelates twice as
    # fast), psi white noise; run 0 saved every 10 ps, run 1 every 20 ps.
    phi = 0.1 * np.concatenate([_ar1(rng, rho, n), _ar1(rng, rho, n)])[:, None]
    psi = rng.uniform(-np.pi, np.pi, (2 * n, 1))
    run = np.repeat([0, 1], n)
    res = ev.md_independent_samples(phi, psi, run, [10.0, 20.0])
    assert res["slowest"] == "sin(phi)"
    assert res["total_time_ps"] == pytest.approx(n * 10.0 + n * 20.0)
    assert res["n_independent"] == pytest.approx(2 * n / g, rel=_g_tolerance(g, n) / g)
    taus = {grp["interval_ps"]: grp["tau_int_ps"]["sin(phi)"] for grp in res["groups"]}
    assert taus[10.0] == pytest.approx(g * 10.0 / 2, rel=_g_tolerance(g, n) / g)
    assert taus[20.0] == pytest.approx(g * 20.0 / 2, rel=_g_tolerance(g, n) / g)
    assert [r["run"] for r in res["per_run"]] == [0, 1]


# ---------------------------------------------------------------------------------------------- populations
def test_md_population_between_run_error():
    run = np.repeat([0, 1], 10)
    ind = np.r_[np.zeros(10), np.tile([0.0, 1.0], 5)]
    res = ev.md_population(ind, run)
    assert res["mean"] == pytest.approx(0.25)
    assert res["per_run"] == [0.0, 0.5]
    assert res["sem"] == pytest.approx(np.std([0.0, 0.5], ddof=1) / np.sqrt(2))
    assert res["runs_without_visit"] == 1


def test_weighted_population_is_unbiased_within_its_error():
    rng = np.random.default_rng(7)
    n, shift = 20000, 0.5
    x = rng.normal(size=n)
    log_w = np.where(rng.random(n) < 0.1, -np.inf, shift * x)  # 10 % "rejected" samples
    res = ev.weighted_population((x > 1.0).astype(float), log_w)
    exact = norm.sf(1.0 - shift)
    assert res["n_eff"] == pytest.approx(ev.kish_ess(log_w) * n)
    assert abs(res["mean"] - exact) < 5 * res["sem"]
    assert 5 * res["sem"] < 0.05  # the error bar is informative


# ---------------------------------------------------------------------------------------------- plots
def test_plots_write_png_files(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(8)
    md = rng.uniform(-np.pi, np.pi, (500, 2))
    bg = rng.uniform(-np.pi, np.pi, (200, 2))
    paths = [ev.plot_ramachandran(md, bg, rng.random(200), tmp_path / "rama.png"),
             ev.plot_ramachandran(md, np.zeros((0, 2)), np.zeros(0), tmp_path / "rama_empty.png"),
             ev.plot_energy_histogram(rng.normal(size=500), rng.normal(size=200), rng.random(200),
                                      tmp_path / "energy.png")]
    for p in paths:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100
    with pytest.raises(ValueError, match="bg_weights"):
        ev.plot_ramachandran(md, bg, np.ones(3), tmp_path / "bad.png")


def _capture_saved_figures(monkeypatch) -> list:
    """Record every matplotlib Figure that is saved (it is still written), so that a test can inspect it."""
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def _notes(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _colour_bar_labels(fig) -> list[list[str]]:
    """The labelled ticks inside the range of every colour bar of a drawn figure."""
    fig.canvas.draw()
    out = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            lo, hi = sorted(ax.get_ylim())
            out.append([t.get_text() for minor in (False, True)
                        for t, v in zip(ax.yaxis.get_ticklabels(minor=minor), ax.yaxis.get_ticklocs(minor=minor))
                        if lo <= v <= hi and t.get_text()])
    return out


def test_figures_mark_panels_with_too_few_samples_and_label_colour_bars_distinctly(tmp_path, monkeypatch):
    from matplotlib.collections import QuadMesh

    saved = _capture_saved_figures(monkeypatch)
    rng = np.random.default_rng(8)
    md = rng.uniform(-np.pi, np.pi, (500, 2))
    # 6 valid samples, one with all the weight (ESS 1.0): the case that looked like data in docs/.
    w_few = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    ev.plot_ramachandran(md, rng.uniform(-np.pi, np.pi, (6, 2)), w_few, tmp_path / "few.png")
    ev.plot_energy_histogram(rng.normal(size=500), rng.normal(size=6), w_few, tmp_path / "few_energy.png")
    ev.plot_ramachandran(md, rng.uniform(-np.pi, np.pi, (400, 2)), rng.random(400), tmp_path / "many.png")
    ev.plot_energy_histogram(rng.normal(size=500), rng.normal(size=400), rng.random(400),
                             tmp_path / "many_energy.png")
    few, few_energy, many, many_energy = saved

    assert "6 valid samples: too few for a density" in _notes(few)
    assert any(t.startswith("6 valid samples, ESS 1.0: too few for a density") for t in _notes(few))
    # Only the MD panel is a 2-D histogram; the BG panels show their 6 samples as points.
    meshes = [sum(isinstance(c, QuadMesh) for c in ax.collections) for ax in few.axes[:3]]
    assert meshes == [1, 0, 0]
    # raw: one set of points; reweighted: the light samples and, on top, the heavy one (issue 21 item 3)
    assert [len(ax.collections) for ax in few.axes[1:3]] == [1, 2]
    assert any(t.startswith("BG:\n6 valid samples, ESS 1.0: too few for a density") for t in _notes(few_energy))
    legend = [t.get_text() for t in few_energy.axes[0].get_legend().get_texts()]
    assert not any(label.startswith("BG raw") or label.startswith("BG reweighted") for label in legend)

    assert _notes(many) == [] and _notes(many_energy) == []
    assert any(label.startswith("BG reweighted (ESS") for label in
               [t.get_text() for t in many_energy.axes[0].get_legend().get_texts()])
    for figure, n_bars in ((few, 1), (many, 3)):
        bars = _colour_bar_labels(figure)
        assert len(bars) == n_bars
        for labels in bars:  # at least two ticks, no two reading the same (the "1.51982x10^1" bug)
            assert len(labels) >= 2 and len(set(labels)) == len(labels), labels


# ---------------------------------------------------------------------------------------------- pipeline
class GaussianAroundReference(torch.nn.Module):
    """Closed-form CNF field: transports the standard prior to N(x_ref, sigma^2) (internal units) along the
    straight conditional-OT path x_t = (1 - (1 - sigma) t) z + t x_ref. Ignores tokens."""

    def __init__(self, x_ref: torch.Tensor, sigma: float):
        super().__init__()
        self.register_buffer("x_ref", x_ref - x_ref.mean(0, keepdim=True))
        self.sigma = float(sigma)

    def forward(self, t, x, tokens, mask=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1)
        ref = self.x_ref.to(x.dtype)
        return ref + (self.sigma - 1.0) / (1.0 - (1.0 - self.sigma) * t) * (x - t * ref)


def test_evaluate_peptide_with_a_flow_centred_on_an_md_frame(fixture_dir, tmp_path):
    from openmm_tbg.flow import TransferableFlow

    traj = load_peptide(fixture_dir, "AA")
    length_scale, sigma_nm = 0.1, 0.002
    x_ref = torch.as_tensor(traj.positions[7], dtype=torch.float64) / length_scale
    flow = TransferableFlow(GaussianAroundReference(x_ref, sigma_nm / length_scale), length_scale=length_scale)
    options = {"method": "rk4", "step_size": 0.1}
    res = ev.evaluate_peptide(flow.double(), traj, 12, seed=0, out_dir=tmp_path, progress=False,
                              torus_samples=60, sampler_options=options)
    # 2 pm noise keeps every bond and chiral centre: all samples are valid and get finite weights.
    assert res["n_valid"] == 12 and sum(res["rejections"].values()) == 0
    # The reported ESS is Kish's formula on the weights exp(-u - log q) of the same (same-seed) samples.
    from openmm_tbg.peptides import create_system
    from openmm_tbg.sampler import BoltzmannGeneratorSampler

    again = BoltzmannGeneratorSampler(create_system(traj.topology), traj.topology, flow.double(), temperature=310.0,
                                      seed=0, encoding=traj.encoding, positions=traj.positions[0], options=options)
    try:
        drawn = again.sample(12, method="importance", progress=False)
    finally:
        again.close()
    log_w = -drawn.reduced_potentials - drawn.log_q
    w = np.exp(log_w - log_w.max())
    # rel 1e-5, not 1e-9: OpenMM's CPU platform sums forces over threads in a varying order, so the same
    # positions can give energies that differ in the last float digits between two contexts (seen: 8e-7 here).
    assert res["ess"] == pytest.approx(w.sum() ** 2 / (12 * np.sum(w ** 2)), rel=1e-5)
    assert res["ess_valid"] == pytest.approx(res["ess"], rel=1e-12)  # nothing rejected: the same n
    assert np.isnan(res["pareto_k"])  # reported, and 12 proposals leave too few tail weights to fit it
    assert np.isfinite(res["energy_w2_raw"]) and np.isfinite(res["energy_w2_reweighted"])
    # The BG samples sit at the reference frame's torsions, so torus-W2 against MD is close to that of a point
    # mass there: sqrt(mean squared periodic distance of the 60 MD torsions to it; torus_samples=60 keeps all).
    phi, psi = ev.backbone_torsions(traj.positions, traj.topology)
    feats = ev.torsion_features(phi, psi)
    point = np.sqrt(ev.torus_distance(feats, feats[7:8]).mean())
    # Tolerance from the sample size: W2 is a metric, so |W2(MD, BG) - W2(MD, point)| <= W2(BG, point), the RMS
    # torus distance r of the 12 BG samples to the point. r^2 is a mean of 12 i.i.d. squared distances; their
    # distribution follows from the 2 pm Gaussian noise of the samples (estimated from 4000 noisy copies of
    # frame 7), and the mean of 12 stays below its expectation + 5 standard errors, sd(d^2) / sqrt(12).
    noise = np.random.default_rng(0).normal(0.0, sigma_nm, (4000,) + traj.positions[7].shape)
    copies = traj.positions[7][None].astype(np.float64) + noise
    d2 = ev.torus_distance(ev.torsion_features(*ev.backbone_torsions(copies, traj.topology)), feats[7:8])[:, 0]
    tolerance = np.sqrt(d2.mean() + 5 * d2.std() / np.sqrt(12))
    assert abs(res["torus_w2_raw"] - point) <= tolerance, (res["torus_w2_raw"], point, tolerance)
    assert res["alpha_l_bg"]["mean"] == float(phi[7, 0] > 0)
    assert res["md_autocorrelation"]["total_time_ps"] == pytest.approx(60 * 150.0)
    for p in res["figures"].values():
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 1000


def test_evaluate_accepts_a_temperature_quantity_and_checks_it_first(fixture_dir, tmp_path, monkeypatch):
    from openmm import unit

    from openmm_tbg.checkpoint import save_model
    from openmm_tbg.flow import TransferableFlow
    from openmm_tbg.nn.egnn import EGNNVectorField

    torch.manual_seed(0)
    model = tmp_path / "tiny.pt"
    save_model(TransferableFlow(EGNNVectorField(n_layers=2, hidden=16), length_scale=0.1), model)
    kwargs = dict(peptides=["AA"], n_samples=3, out_dir=tmp_path / "q", torus_samples=50, progress=False,
                  sampler_options={"method": "euler", "step_size": 0.5})
    results = ev.evaluate(str(model), fixture_dir, temperature=310.0 * unit.kelvin, **kwargs)
    assert results[0]["temperature_K"] == pytest.approx(310.0)
    header = json.loads((tmp_path / "q" / "results.json").read_text())["header"]
    assert header["target"].endswith(", 310 K")

    # A temperature of the wrong unit is refused before any peptide is sampled.
    def no_sampling(*args, **kwargs):
        raise AssertionError("evaluate sampled a peptide before checking the temperature")

    monkeypatch.setattr(ev.pipeline, "evaluate_peptide", no_sampling)
    with pytest.raises(TypeError, match="temperature"):
        ev.evaluate(str(model), fixture_dir, temperature=310.0 * unit.nanometer, **kwargs)


def test_evaluate_cli_with_tiny_untrained_model(fixture_dir, tmp_path, capsys):
    from openmm_tbg.checkpoint import save_model
    from openmm_tbg.cli import main
    from openmm_tbg.flow import TransferableFlow
    from openmm_tbg.nn.egnn import EGNNVectorField

    torch.manual_seed(0)
    model = tmp_path / "tiny.pt"
    save_model(TransferableFlow(EGNNVectorField(n_layers=2, hidden=16), length_scale=0.1), model)
    out = tmp_path / "docs"
    status = main(["evaluate", "--model", str(model), "--data", str(fixture_dir), "--peptides", "AA", "--samples",
                   "6", "--out", str(out), "--ode-method", "euler", "--step-size", "0.5", "--torus-samples", "50",
                   "--no-progress"])
    assert status == 0
    text = (out / "results.md").read_text()
    assert "| AA | 23 |" in text and "ESS (% of proposals)" in text and "under-converged" in text
    assert "figures/AA_ramachandran.png" in text
    assert (out / "figures" / "AA_ramachandran.png").stat().st_size > 1000
    assert (out / "figures" / "AA_energy.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())["results"][0]
    # Every proposal is either valid or counted under a rejection reason.
    assert res["n_valid"] + sum(res["rejections"].values()) == 6
    assert "results.md" not in capsys.readouterr().err
    # A published report never records where its files lay on the machine that wrote it.
    for name in ("results.md", "results.json"):
        assert str(tmp_path) not in (out / name).read_text()
    assert "model**: tiny.pt (sha256" in text and res["figures"]["ramachandran"] == "figures/AA_ramachandran.png"

    # Peptides evaluated in separate runs merge into one report whose figure links resolve.
    out2 = tmp_path / "part2"
    assert main(["evaluate", "--model", str(model), "--data", str(fixture_dir), "--peptides", "GP", "--samples",
                 "4", "--out", str(out2), "--ode-method", "euler", "--step-size", "0.5", "--torus-samples", "50",
                 "--no-progress"]) == 0
    merged = tmp_path / "merged"
    assert main(["evaluate", "--merge", str(out2), str(out), "--out", str(merged)]) == 0
    text = (merged / "results.md").read_text()
    assert text.index("| AA |") < text.index("| GP |")
    for link in ("figures/AA_ramachandran.png", "figures/GP_energy.png"):
        assert f"]({link})" in text and (merged / link).stat().st_size > 1000
    for name in ("results.md", "results.json"):
        assert str(tmp_path) not in (merged / name).read_text()
    capsys.readouterr()
    # A peptide in two parts is a user error: one line on stderr, exit status 2 (the CLI's contract).
    assert main(["evaluate", "--merge", str(out), str(out), "--out", str(tmp_path / "twice")]) == 2
    assert "Peptide AA is in both" in capsys.readouterr().err


def test_evaluate_needs_an_explicit_output_directory(fixture_dir, capsys):
    """`openmm-tbg evaluate` without --out is refused instead of overwriting the repository's docs/."""
    from openmm_tbg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--data", str(fixture_dir), "--peptides", "AA"])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_portable_paths_name_no_machine_location(tmp_path, monkeypatch):
    import openmm_tbg
    from openmm_tbg.utils import portable_command, portable_path

    package = Path(openmm_tbg.__file__).parent
    assert portable_path(package / "models" / "ic_dipeptides.pt") == "openmm_tbg/models/ic_dipeptides.pt"
    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "runs" / "m.pt") == "runs/m.pt"
    assert portable_path("/somewhere/else/data/dipeptides") == "dipeptides"
    assert portable_path(None) is None
    command = portable_command(["/usr/bin/openmm-tbg", "evaluate", "--model", "/x/y/m.pt", "--out=/x/out dir",
                                "--samples", "20"])
    assert command == "openmm-tbg evaluate --model m.pt '--out=out dir' --samples 20"


def test_md_and_bg_ramachandran_panels_share_one_colour_scale(tmp_path, monkeypatch):
    """Issue 21 item 3: MD, raw and reweighted histograms use one colour range, and each bar says what it counts."""
    from matplotlib.collections import QuadMesh

    saved = _capture_saved_figures(monkeypatch)
    rng = np.random.default_rng(3)
    ev.plot_ramachandran(rng.uniform(-np.pi, np.pi, (500, 2)), rng.uniform(-np.pi, np.pi, (400, 2)),
                         rng.random(400), tmp_path / "many.png")
    (fig,) = saved
    meshes = [c for ax in fig.axes[:3] for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 3 and len({(m.norm.vmin, m.norm.vmax) for m in meshes}) == 1
    labels = [ax.get_ylabel() for ax in fig.axes[3:]]
    assert [label.split(" per ")[0] for label in labels] == ["fraction of samples"] * 2 + ["fraction of weight"]
