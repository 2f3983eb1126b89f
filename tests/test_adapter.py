"""The per-system adapter (`openmm_tbg.nn.adapter`): an exact bijection, and a flow that carries one keeps an
exact log q on every path (sample, rsample, log_prob, checkpoint)."""

import numpy as np
import pytest
import torch
from openmm import app

from openmm_tbg.ic_statistics import WhiteningTable
from openmm_tbg.icflow import InternalCoordinateFlow
from openmm_tbg.nn.adapter import SystemAdapter, circle_mask
from openmm_tbg.testing import randomise_spline_heads
from openmm_tbg.zmatrix import build_zmatrix


def _masks(n=6):
    dof = torch.ones(n, 3, dtype=torch.bool)
    dof[0] = False
    dof[1, 1:] = False
    dof[2, 2] = False
    circle = torch.zeros(n, 3, dtype=torch.bool)
    circle[3:, 2] = True
    return dof, circle


def _randomise(adapter, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return adapter


def _draws(dof, circle, n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = 2.5 * torch.randn(n, *dof.shape, generator=g, dtype=torch.float64)
    z = torch.where(circle, (2 * torch.rand(z.shape, generator=g, dtype=torch.float64) - 1) * 3.14, z)
    return z * dof


def test_a_fresh_adapter_is_the_identity():
    dof, circle = _masks()
    z = _draws(dof, circle)
    with torch.no_grad():
        y, log_det = SystemAdapter(dof, circle, n_layers=4, hidden=8).double()(z)
    assert torch.equal(y, z) or torch.allclose(y, z, atol=1e-14, rtol=0)
    assert float(log_det.abs().max()) < 1e-12


def test_adapter_inverse_and_log_det_against_the_brute_force_jacobian():
    dof, circle = _masks()
    frozen = torch.zeros_like(dof)
    frozen[4, 0] = True
    adapter = _randomise(SystemAdapter(dof, circle, frozen=frozen, n_layers=4, hidden=16).double())
    z = _draws(dof, circle)
    with torch.no_grad():
        y, log_det = adapter(z)
        back, log_det_inverse = adapter(y, inverse=True)
    assert float((y - z).abs().max()) > 0.1  # the map is not the identity: the test has power
    np.testing.assert_allclose(back.numpy(), z.numpy(), atol=1e-10)
    np.testing.assert_allclose((log_det + log_det_inverse).numpy(), 0.0, atol=1e-10)
    assert torch.equal(y[:, 4, 0], z[:, 4, 0]) and torch.equal(y[~dof.expand_as(y)], z[~dof.expand_as(z)])
    assert float(y[:, circle].abs().max()) <= np.pi  # circle coordinates stay on the circle
    index = dof.flatten().nonzero().flatten()

    def mapped(v):
        full = torch.zeros(dof.numel(), dtype=torch.float64).index_copy(0, index, v)
        return adapter(full.reshape(1, *dof.shape))[0].reshape(-1)[index]

    for row in range(3):
        jacobian = torch.autograd.functional.jacobian(mapped, z[row].reshape(-1)[index])
        assert float(torch.linalg.slogdet(jacobian)[1]) == pytest.approx(float(log_det[row]), abs=1e-9)


def _aa_flow_with_adapter(fixture_dir, dtype=torch.float64):
    from openmm_tbg.encoding import encode_topology

    pdb = app.PDBFile(str(fixture_dir / "AA.pdb"))
    encoding = encode_topology(pdb.topology)
    bonds = [(b[0].index, b[1].index) for b in pdb.topology.bonds()]
    frames = np.load(fixture_dir / "AA.npz")["positions"].astype(np.float64) * 1e-4
    table = WhiteningTable()
    table.add_frames(build_zmatrix(encoding, bonds), frames)
    torch.manual_seed(0)
    flow = randomise_spline_heads(InternalCoordinateFlow(table.to_dict(), n_rounds=1, hidden=16, n_heads=2,
                                                         n_blocks=1, n_bins=4).to(dtype))
    context = flow.condition(encoding, bonds)
    flow.attach_adapter(_randomise(SystemAdapter(context.dof, circle_mask(context.base), n_layers=2, hidden=8),
                                   scale=0.05))
    return flow, encoding, bonds, context, pdb


def test_flow_with_an_adapter_samples_its_own_exact_density(fixture_dir):
    """sample -> log_prob and rsample -> log_prob agree with the adapter in the density (AA: twin groups
    included); the adapter changes the density, so the agreement is not the parent's."""
    flow, encoding, bonds, context, _ = _aa_flow_with_adapter(fixture_dir)
    x, log_q = flow.sample(context, 200, generator=torch.Generator().manual_seed(0))
    ok = torch.isfinite(log_q)
    assert float(ok.double().mean()) > 0.95
    np.testing.assert_allclose(flow.log_prob(x[ok], context).numpy(), log_q[ok].numpy(), atol=1e-8)
    adapter, flow.adapter = flow.adapter, None
    parent = flow.log_prob(x[ok], context)
    flow.adapter = adapter
    assert float((parent - log_q[ok]).abs().mean()) > 0.05  # the adapter is in the density
    with torch.no_grad():
        draws = flow.rsample(context, 100, torch.Generator().manual_seed(1))
    from openmm_tbg.internal_coordinates import to_internal
    from openmm_tbg.twins import canonical_masks

    inside = draws["inside"]
    xr, lq = draws["x"][inside], draws["log_q"][inside]
    _, ambiguous, _ = canonical_masks(to_internal(xr, context.zmatrix)[2], context.swaps)
    single = ~ambiguous.any(1)
    np.testing.assert_allclose(flow.log_prob(xr, context)[single].numpy(), lq[single].numpy(), atol=1e-8)


def test_adapter_checkpoint_round_trip_and_refusal_of_another_molecule(fixture_dir, tmp_path):
    from openmm_tbg.checkpoint import load_model
    from openmm_tbg.encoding import encode_topology
    from openmm_tbg.peptides import build_peptide

    flow, encoding, bonds, context, _ = _aa_flow_with_adapter(fixture_dir)
    from openmm_tbg.checkpoint import save_model

    path = tmp_path / "adapted.pt"
    save_model(flow, path)
    loaded = load_model(path)
    assert loaded.adapter is not None and loaded.config["adapter"] == flow.config["adapter"]
    x, _ = flow.sample(context, 32, generator=torch.Generator().manual_seed(2))
    loaded_context = loaded.condition(encoding, bonds)
    np.testing.assert_allclose(loaded.log_prob(x, loaded_context).numpy(), flow.log_prob(x, context).numpy(),
                               atol=1e-10)
    other = build_peptide("GP")
    other_encoding = encode_topology(other.topology)
    other_bonds = [(b[0].index, b[1].index) for b in other.topology.bonds()]
    with pytest.raises(ValueError, match="adapter refined for another molecule"):
        loaded.condition(other_encoding, other_bonds)


def test_training_refuses_to_start_from_a_model_with_an_adapter(fixture_dir, tmp_path):
    from types import SimpleNamespace

    from openmm_tbg.checkpoint import save_model
    from openmm_tbg.training.config import TrainingConfig
    from openmm_tbg.training.model_setup import load_parent

    flow, encoding, *_ = _aa_flow_with_adapter(fixture_dir)
    path = tmp_path / "adapted.pt"
    save_model(flow, path)
    with pytest.raises(ValueError, match="per-system adapter"):
        load_parent(path, TrainingConfig(), [SimpleNamespace(encoding=encoding)])
