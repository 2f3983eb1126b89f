"""Tests of the CNF: exact divergence, change of variables against closed forms, sample/log_prob consistency."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from openmm_tbg.flow import (TransferableFlow, divergence_exact, divergence_exact_batched, divergence_exact_loop,
                             divergence_hutchinson)
from openmm_tbg.nn.egnn import EGNNVectorField

N_CLASSES = 12


class LinearField(torch.nn.Module):
    """v(t, x) = (a0 + a1 t) P x, P = centring projection: mean-free and translation invariant.

    Its flow is x(1) = exp(a0 + a1/2) x(0) and its divergence on the mean-free subspace is 3 (N - 1) a(t), so
    a Gaussian prior with std s maps to a mean-free Gaussian with std s exp(a0 + a1/2).
    """

    def __init__(self, a0: float, a1: float):
        super().__init__()
        self.a0, self.a1 = a0, a1

    def forward(self, t, x, tokens, mask=None):
        a = self.a0 + self.a1 * torch.as_tensor(t, dtype=x.dtype)
        a = a.reshape(-1, 1, 1) if a.dim() == 1 else a  # t is a scalar or one time per sample
        return a * (x - x.mean(1, keepdim=True))


def make_tokens(n_atoms: int, generator: torch.Generator) -> torch.Tensor:
    return torch.stack([
        torch.randint(0, 2, (n_atoms,), generator=generator),
        torch.randint(0, 20, (n_atoms,), generator=generator),
        torch.randint(0, N_CLASSES, (n_atoms,), generator=generator),
    ], dim=1)


def make_egnn(seed=0, coord_std=0.3) -> EGNNVectorField:
    torch.manual_seed(seed)  # parameter init only
    field = EGNNVectorField(n_layers=2, hidden=16, n_atom_classes=N_CLASSES).double()
    with torch.no_grad():  # O(1) coordinate updates so that the flow is far from the identity
        for layer in field.layers:
            layer.coord_mlp[-1].weight.normal_(0.0, coord_std)
    return field


def gaussian_log_density(x_nm: torch.Tensor, std: float) -> torch.Tensor:
    """Log density of a mean-free isotropic Gaussian on the 3(N-1)-dimensional subspace."""
    x = x_nm.double() - x_nm.double().mean(1, keepdim=True)
    k = 3 * (x.shape[1] - 1)
    return -(x * x).sum((1, 2)) / (2 * std**2) - 0.5 * k * math.log(2 * math.pi * std**2)


# ---------------------------------------------------------------------------------------------------- divergence
def test_exact_divergence_matches_the_brute_force_jacobian_trace():
    g = torch.Generator().manual_seed(0)
    field = make_egnn()
    n_atoms, batch = 6, 3
    tokens = make_tokens(n_atoms, g)
    x = torch.randn(batch, n_atoms, 3, generator=g, dtype=torch.float64)
    D = 3 * n_atoms

    xx = x.clone().requires_grad_(True)
    v = field(0.4, xx, tokens)
    results = {
        "loop": divergence_exact_loop(v, xx),
        "batched": divergence_exact_batched(v, xx),
        "batched-chunked": divergence_exact_batched(v, xx, chunk_size=4),
        "exact": divergence_exact(v, xx),
    }
    # Orthonormal basis Q (D x (D-3)) of the mean-free subspace: columns orthogonal to the 3 translations.
    translations = torch.zeros(D, 3, dtype=torch.float64)
    for k in range(3):
        translations[k::3, k] = 1 / math.sqrt(n_atoms)
    full_basis, _ = torch.linalg.qr(torch.cat([translations, torch.randn(D, D, generator=g, dtype=torch.float64)], 1))
    q = full_basis[:, 3:D]

    for b in range(batch):
        jac = torch.autograd.functional.jacobian(lambda y: field(0.4, y[None], tokens)[0], x[b]).reshape(D, D)
        brute = torch.trace(jac)
        subspace = torch.trace(q.T @ jac @ q)
        # Why the full trace equals the subspace trace: J kills translations and its output is mean-free.
        assert (jac @ translations).abs().max() < 1e-10
        assert (translations.T @ jac).abs().max() < 1e-10
        torch.testing.assert_close(subspace, brute, atol=1e-10, rtol=0)
        assert brute.abs() > 1e-3  # nontrivial
        for name, div in results.items():
            torch.testing.assert_close(div[b], brute, atol=1e-10, rtol=0, msg=name)


def test_hutchinson_is_unbiased_but_noisy():
    g = torch.Generator().manual_seed(1)
    field = make_egnn()
    tokens = make_tokens(5, g)
    x = torch.randn(1, 5, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    v = field(0.6, x, tokens)
    exact = divergence_exact_loop(v, x)[0]
    draws = []
    for _ in range(400):
        eps = torch.randn(1, 5, 3, generator=g, dtype=torch.float64)
        eps = eps - eps.mean(1, keepdim=True)
        draws.append(divergence_hutchinson(v, x, eps)[0])
    draws = torch.stack(draws)
    standard_error = draws.std() / math.sqrt(len(draws))
    assert draws.std() > 1e-3  # noisy: that is why it is off by default
    assert (draws.mean() - exact).abs() < 5 * standard_error


# ------------------------------------------------------------------------------------- closed-form change of variables
@pytest.fixture(scope="module")
def linear_flow():
    a0, a1, scale, prior_std = 0.3, 0.4, 0.1, 1.3
    flow = TransferableFlow(LinearField(a0, a1), length_scale=scale, prior_std=prior_std).double()
    std_nm = scale * prior_std * math.exp(a0 + a1 / 2)
    return flow, std_nm


def test_linear_field_log_density_matches_the_analytic_gaussian(linear_flow):
    flow, std_nm = linear_flow
    n_atoms, n = 7, 3000
    tokens = np.zeros((n_atoms, 3), dtype=np.int64)
    x, log_q = flow.sample(tokens, n, generator=11, atol=1e-9, rtol=1e-9)
    assert x.shape == (n, n_atoms, 3) and log_q.shape == (n,) and log_q.dtype == torch.float64
    torch.testing.assert_close(log_q, gaussian_log_density(x, std_nm), atol=1e-6, rtol=0)
    # log_prob at the samples and at points the flow did not produce (shifted: log_prob centres first).
    torch.testing.assert_close(flow.log_prob(x[:20], tokens, atol=1e-9, rtol=1e-9), log_q[:20], atol=1e-6, rtol=0)
    other = torch.randn(5, n_atoms, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.2 + 1.0
    torch.testing.assert_close(flow.log_prob(other, tokens, atol=1e-9, rtol=1e-9),
                               gaussian_log_density(other, std_nm), atol=1e-6, rtol=0)

    # Moments: samples are centred, and |x|^2 / std^2 follows chi^2 with 3 (N - 1) degrees of freedom.
    torch.testing.assert_close(x.mean(1), torch.zeros(n, 3, dtype=x.dtype), atol=1e-12, rtol=0)
    k = 3 * (n_atoms - 1)
    chi2 = ((x.double() ** 2).sum((1, 2)) / std_nm**2).numpy()
    assert abs(chi2.mean() - k) < 5 * math.sqrt(2 * k / n)
    assert scipy.stats.kstest(chi2, scipy.stats.chi2(k).cdf).pvalue > 1e-3
    # Isotropy: the three Cartesian components have the same variance (within 5 standard errors).
    per_axis = (x.double() ** 2).sum(1).mean(0) / std_nm**2  # each ~ (N - 1)
    assert ((per_axis - (n_atoms - 1)).abs() < 5 * math.sqrt(2 * (n_atoms - 1) / n)).all()


@pytest.mark.parametrize("method, step_size, tol", [("rk4", 0.05, 1e-6), ("midpoint", 0.02, 1e-3),
                                                    ("euler", 0.01, 2e-2)])
def test_fixed_step_methods_converge_to_the_analytic_density(linear_flow, method, step_size, tol):
    flow, std_nm = linear_flow
    tokens = np.zeros((5, 3), dtype=np.int64)
    x, log_q = flow.sample(tokens, 50, generator=5, method=method, step_size=step_size)
    # Relative error of the flow map exp(A) and its log-det 3(N-1) A; both are O(step^order).
    torch.testing.assert_close(log_q, gaussian_log_density(x, std_nm), atol=12 * tol, rtol=0)
    lp = flow.log_prob(x, tokens, method=method, step_size=step_size)
    torch.testing.assert_close(lp, log_q, atol=24 * tol, rtol=0)


def test_gauss_legendre_quadrature_is_exact_for_a_polynomial_divergence(linear_flow):
    """div = 3(N-1)(a0 + a1 t) is linear in t: one Gauss-Legendre node integrates it exactly."""
    flow, std_nm = linear_flow
    tokens = np.zeros((6, 3), dtype=np.int64)
    for nodes in (1, 3):
        x, log_q = flow.sample(tokens, 40, generator=4, atol=1e-9, rtol=1e-9, quadrature_nodes=nodes)
        torch.testing.assert_close(log_q, gaussian_log_density(x, std_nm), atol=1e-6, rtol=0)
        lp = flow.log_prob(x, tokens, atol=1e-9, rtol=1e-9, quadrature_nodes=nodes)
        torch.testing.assert_close(lp, log_q, atol=1e-6, rtol=0)
    assert flow.last_stats["quadrature_nodes"] == 3


def test_quadrature_rejects_a_bad_node_count(linear_flow):
    flow, _ = linear_flow
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="quadrature_nodes"):
            flow.sample(np.zeros((4, 3), dtype=np.int64), 2, quadrature_nodes=bad)


# ------------------------------------------------------------------------------------------------- EGNN flow
@pytest.fixture(scope="module")
def egnn_flow():
    g = torch.Generator().manual_seed(2)
    # coord_std 0.1: a clearly non-identity map that is not stiff (0.3 needs ~500 dopri5 steps at 1e-9).
    flow = TransferableFlow(make_egnn(seed=3, coord_std=0.1), length_scale=0.2, prior_std=1.0).double()
    return flow, make_tokens(6, g)


def test_log_prob_of_samples_matches_sample_log_q(egnn_flow):
    flow, tokens = egnn_flow
    x, log_q = flow.sample(tokens, 4, generator=7, atol=1e-8, rtol=1e-8, batch_size=3)
    assert flow.last_stats["n_batches"] == 2
    z = flow.sample_prior(4, tokens.shape[0], torch.Generator().manual_seed(0))
    # The flow moves samples far from a rescaled prior draw (nontrivial map): compare with the identity map.
    x_identity_log_q = flow.prior_log_prob(x / flow.length_scale) - 15 * math.log(flow.length_scale)
    assert (x_identity_log_q - log_q).abs().max() > 0.1
    assert z.shape == (4, 6, 3)
    lp = flow.log_prob(x, tokens, atol=1e-8, rtol=1e-8, batch_size=3)
    # Round trip at tolerance 1e-8 (relative, on log-density terms of size ~10): allow 1e-5.
    torch.testing.assert_close(lp, log_q, atol=1e-5, rtol=0)
    lp_loop = flow.log_prob(x[:2], tokens, atol=1e-8, rtol=1e-8, divergence="exact-loop")
    torch.testing.assert_close(lp_loop, lp[:2], atol=1e-8, rtol=0)


def test_quadrature_log_q_converges_to_the_solver_integrated_log_q(egnn_flow):
    """On a nonlinear EGNN field the Gauss-Legendre error shrinks with the node count and is tiny at 16."""
    flow, tokens = egnn_flow
    kw = dict(generator=9, atol=1e-9, rtol=1e-9)
    x_ref, ref = flow.sample(tokens, 3, **kw)
    errors = {}
    for nodes in (2, 16):
        x, log_q = flow.sample(tokens, 3, quadrature_nodes=nodes, **kw)
        torch.testing.assert_close(x, x_ref, atol=1e-7, rtol=0)  # same trajectories: only the trace differs
        errors[nodes] = float((log_q - ref).abs().max())
    assert errors[16] < 1e-5
    assert errors[16] < errors[2]
    lp = flow.log_prob(x_ref, tokens, atol=1e-9, rtol=1e-9, quadrature_nodes=16)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)


def test_density_is_invariant_under_rotation_reflection_translation(egnn_flow):
    flow, tokens = egnn_flow
    x, _ = flow.sample(tokens, 2, generator=8, method="rk4", step_size=0.25)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    moved = torch.cat([x @ q.T + 0.7, -x])  # rotation (det +-1) + translation, and the mirror image
    kw = dict(method="rk4", step_size=0.25)
    lp = flow.log_prob(torch.cat([x, x]), tokens, **kw)
    torch.testing.assert_close(flow.log_prob(moved, tokens, **kw), lp, atol=1e-9, rtol=0)


def test_sampling_is_reproducible_with_a_generator(egnn_flow):
    flow, tokens = egnn_flow
    kw = dict(method="euler", step_size=0.5)
    a = flow.sample(tokens, 3, generator=torch.Generator().manual_seed(4), **kw)
    b = flow.sample(tokens, 3, generator=torch.Generator().manual_seed(4), **kw)
    c = flow.sample(tokens, 3, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_float32_flow_runs_and_agrees_with_float64(egnn_flow):
    flow, tokens = egnn_flow
    kw = dict(method="rk4", step_size=0.25)
    x64, lq64 = flow.sample(tokens, 2, generator=9, **kw)
    flow32 = TransferableFlow.from_config(flow.config)
    flow32.load_state_dict(flow.state_dict())
    flow32 = flow32.float()
    x32, lq32 = flow32.sample(tokens, 2, generator=9, **kw)
    assert x32.dtype == torch.float32 and lq32.dtype == torch.float64 and torch.isfinite(lq32).all()
    # float32 and float64 randn draw different priors, so compare densities at the same points.
    lp32 = flow32.log_prob(x64.float(), tokens, **kw)
    torch.testing.assert_close(lp32, flow.log_prob(x64, tokens, **kw), atol=1e-3, rtol=0)


def test_hutchinson_warns_and_is_close_to_exact(egnn_flow):
    flow, tokens = egnn_flow
    x, lq = flow.sample(tokens, 2, generator=10, method="rk4", step_size=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact default must not warn
        exact = flow.log_prob(x, tokens, method="rk4", step_size=0.25)
    # The positions' path does not depend on the probe vectors, and rk4 combines the stage divergences
    # linearly, so each Hutchinson log q is an unbiased estimate of the exact rk4 log q on the same steps:
    # the mean of K independent estimates lies within 5 standard errors of it.
    k = 24
    with pytest.warns(UserWarning, match="biased"):
        draws = torch.stack([flow.log_prob(x, tokens, method="rk4", step_size=0.25, divergence="hutchinson",
                                           generator=seed) for seed in range(k)])
    assert torch.isfinite(draws).all()
    spread = draws.std(dim=0)
    assert torch.all(spread > 1e-6)  # really a noisy estimate, not the exact trace
    assert torch.all((draws.mean(dim=0) - exact).abs() < 5 * spread / math.sqrt(k)), (draws.mean(0), exact, spread)


def test_bad_input_is_refused_with_a_reason(egnn_flow):
    flow, tokens = egnn_flow
    x = torch.zeros(2, 6, 3, dtype=torch.float64)
    x[:, :, 0] = torch.arange(6)
    with pytest.raises(ValueError, match="atoms but tokens"):
        flow.log_prob(x[:, :5], tokens)
    with pytest.raises(ValueError, match=r"\(n_samples, n_atoms, 3\)"):
        flow.log_prob(x[0], tokens)
    bad = x.clone()
    bad[1, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        flow.log_prob(bad, tokens)
    with pytest.raises(ValueError, match=r"tokens must have shape \(n_atoms, 3\)"):
        flow.sample(tokens[:, :2], 1)
    with pytest.raises(TypeError, match="integers"):
        flow.sample(tokens.double(), 1)
    with pytest.raises(ValueError, match="step_size"):
        flow.sample(tokens, 1, method="rk4")
    with pytest.raises(ValueError, match="fixed-step"):
        flow.sample(tokens, 1, method="dopri5", step_size=0.1)
    with pytest.raises(ValueError, match="unknown ODE method"):
        flow.sample(tokens, 1, method="leapfrog")
    with pytest.raises(ValueError, match="unknown divergence"):
        flow.sample(tokens, 1, divergence="approximate")
    with pytest.raises(ValueError, match="positive integer"):
        flow.sample(tokens, 0)
    wrong = tokens.clone()
    wrong[0, 0] = 5
    with pytest.raises(ValueError, match="max_residues"):
        flow.sample(wrong, 1)
    with pytest.raises(ValueError, match="length_scale"):
        TransferableFlow(LinearField(0, 0), length_scale=-1.0)


def test_log_prob_accepts_quantities_and_numpy(linear_flow):
    from openmm import unit

    flow, std_nm = linear_flow
    x = np.random.default_rng(0).normal(size=(3, 4, 3)) * 0.1
    expected = gaussian_log_density(torch.as_tensor(x), std_nm)
    torch.testing.assert_close(flow.log_prob(x, np.zeros((4, 3), dtype=np.int64), atol=1e-9, rtol=1e-9),
                               expected, atol=1e-6, rtol=0)
    as_angstrom = unit.Quantity(x * 10, unit.angstrom)
    torch.testing.assert_close(flow.log_prob(as_angstrom, np.zeros((4, 3), dtype=np.int64), atol=1e-9, rtol=1e-9),
                               expected, atol=1e-6, rtol=0)
