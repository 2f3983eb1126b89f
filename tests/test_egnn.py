"""Tests of the EGNN vector field: symmetries, padding, token checks, config, dtypes."""

import pytest
import torch

from openmm_tbg.nn.egnn import EGNNVectorField
from openmm_tbg.testing import assert_equivariant, interchangeable_permutation

N_CLASSES = 12


def make_field(dtype=torch.float64, seed=0, **kwargs) -> EGNNVectorField:
    torch.manual_seed(seed)  # parameter init only; data below use explicit generators
    kw = dict(n_layers=2, hidden=16, max_residues=2, n_amino_acids=20, n_atom_classes=N_CLASSES)
    kw.update(kwargs)
    field = EGNNVectorField(**kw).to(dtype)
    # The default init makes coordinate updates ~1e-3 (near-identity flow); enlarge them so that the
    # symmetry checks see an O(1) output.
    with torch.no_grad():
        for layer in field.layers:
            layer.coord_mlp[-1].weight.normal_(0.0, 0.5)
    return field


def make_tokens(n_atoms: int, generator: torch.Generator) -> torch.Tensor:
    """Tokens with repeated rows (interchangeable atoms, like the three H of a methyl group)."""
    n_unique = max(2, n_atoms // 2)
    unique = torch.stack([
        torch.randint(0, 2, (n_unique,), generator=generator),
        torch.randint(0, 20, (n_unique,), generator=generator),
        torch.arange(n_unique) % N_CLASSES,
    ], dim=1)
    rows = torch.cat([torch.arange(n_unique), torch.randint(0, n_unique, (n_atoms - n_unique,), generator=generator)])
    return unique[rows]


def test_output_is_equivariant_mean_free_and_nontrivial():
    g = torch.Generator().manual_seed(1)
    field = make_field()
    tokens = make_tokens(9, g)
    x = torch.randn(3, 9, 3, generator=g, dtype=torch.float64)
    assert len({tuple(r) for r in tokens.tolist()}) < 9  # the permutation check has something to permute
    assert_equivariant(field, x, tokens, n_trials=4, generator=g)
    v = field(0.3, x, tokens)
    assert v.abs().max() > 1e-2  # not a trivially zero field
    # Translation invariance of the input and zero mean of the output, explicitly.
    v_shift = field(0.3, x + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), tokens)
    torch.testing.assert_close(v_shift, v, atol=1e-12, rtol=0)
    torch.testing.assert_close(v.mean(1), torch.zeros(3, 3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_output_depends_on_time_tokens_and_is_not_permutation_invariant_across_types():
    g = torch.Generator().manual_seed(2)
    field = make_field()
    tokens = make_tokens(8, g)
    x = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)
    v = field(0.2, x, tokens)
    assert (field(0.8, x, tokens) - v).abs().max() > 1e-6
    other = tokens.clone()
    other[0, 2] = (other[0, 2] + 1) % N_CLASSES
    assert (field(0.2, x, other) - v).abs().max() > 1e-6


def test_assert_equivariant_detects_a_broken_field():
    class Broken(torch.nn.Module):
        """Mean-free and translation invariant but tied to the lab frame's x axis: not rotation equivariant."""

        def forward(self, t, x, tokens, mask=None):
            v = torch.zeros_like(x)
            v[..., 0] = (x[..., 0] - x[..., 0].mean(1, keepdim=True)) ** 2
            return v - v.mean(1, keepdim=True)

    class IndexDependent(torch.nn.Module):
        """Rotation equivariant but treats atoms by index, not by token: breaks permutation equivariance."""

        def forward(self, t, x, tokens, mask=None):
            w = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None]
            v = w * (x - x.mean(1, keepdim=True))
            return v - v.mean(1, keepdim=True)

    g = torch.Generator().manual_seed(3)
    tokens = make_tokens(8, g)
    x = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(Broken(), x, tokens)
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(IndexDependent(), x, tokens)


def test_padded_mixed_batch_matches_single_molecules():
    g = torch.Generator().manual_seed(4)
    field = make_field()
    sizes = [6, 10, 8]
    n_max = max(sizes)
    mols = [(make_tokens(n, g), torch.randn(1, n, 3, generator=g, dtype=torch.float64)) for n in sizes]
    x = torch.full((len(sizes), n_max, 3), float("nan"), dtype=torch.float64)  # padding may hold garbage
    tokens = torch.full((len(sizes), n_max, 3), 99, dtype=torch.long)  # out-of-vocabulary tokens at padding
    mask = torch.zeros(len(sizes), n_max, dtype=torch.bool)
    for b, (tok, xb) in enumerate(mols):
        n = tok.shape[0]
        x[b, :n], tokens[b, :n], mask[b, :n] = xb[0], tok, True
    v = field(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), x, tokens, mask)
    for b, (tok, xb) in enumerate(mols):
        n = tok.shape[0]
        alone = field(torch.tensor([0.1, 0.5, 0.9][b], dtype=torch.float64), xb, tok)
        torch.testing.assert_close(v[b, :n], alone[0], atol=1e-12, rtol=0)
        assert torch.equal(v[b, n:], torch.zeros_like(v[b, n:]))
    assert torch.isfinite(v).all()
    # Equivariance of the padded batch (padding coordinates must be finite for the rotation itself).
    x_clean = torch.where(mask[..., None], x, torch.zeros_like(x))
    tokens_clean = torch.where(mask[..., None], tokens, torch.zeros_like(tokens))
    assert_equivariant(field, x_clean, tokens_clean, mask=mask, generator=g)


def test_gradients_are_finite_with_padding_and_self_edges():
    g = torch.Generator().manual_seed(5)
    field = make_field()
    tokens = make_tokens(6, g).expand(2, 6, 3)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    v = field(0.5, x, tokens, mask)
    (grad,) = torch.autograd.grad((v**2).sum(), x)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[1, 4:], torch.zeros_like(grad[1, 4:]))  # padding does not influence the output


@pytest.mark.parametrize("column, value, option", [
    (0, 2, "max_residues"), (1, 20, "n_amino_acids"), (2, N_CLASSES, "n_atom_classes"), (2, -1, "n_atom_classes"),
])
def test_out_of_range_tokens_are_refused(column, value, option):
    g = torch.Generator().manual_seed(6)
    field = make_field()
    tokens = make_tokens(5, g)
    tokens[3, column] = value
    with pytest.raises(ValueError, match=option):
        field(0.5, torch.zeros(1, 5, 3, dtype=torch.float64), tokens)


def test_bad_shapes_are_refused():
    field = make_field()
    tokens = torch.zeros(5, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        field(0.5, torch.zeros(5, 3, dtype=torch.float64), tokens)
    with pytest.raises(ValueError, match="tokens"):
        field(0.5, torch.zeros(1, 6, 3, dtype=torch.float64), tokens)
    with pytest.raises(ValueError, match="mask"):
        field(0.5, torch.zeros(1, 5, 3, dtype=torch.float64), tokens, torch.ones(1, 5))
    with pytest.raises(TypeError, match="integer"):
        field(0.5, torch.zeros(1, 5, 3, dtype=torch.float64), tokens.double())
    with pytest.raises(ValueError, match="n_layers"):
        EGNNVectorField(n_layers=0, hidden=8, n_atom_classes=4)


def test_config_rebuilds_the_module_and_float32_matches_float64():
    g = torch.Generator().manual_seed(7)
    field = make_field(attention=False, tanh=False, coords_range=10.0)
    twin = EGNNVectorField(**field.config).double()
    twin.load_state_dict(field.state_dict())
    tokens = make_tokens(7, g)
    x = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(twin(0.4, x, tokens), field(0.4, x, tokens), atol=0, rtol=0)
    v32 = field.float()(0.4, x.float(), tokens)
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), twin(0.4, x, tokens), atol=1e-5, rtol=1e-4)


def test_default_size_uses_the_encoding_vocabulary():
    from openmm_tbg.encoding import ATOM_NAME_CLASSES

    field = EGNNVectorField(n_layers=1, hidden=8)
    assert field.config["n_atom_classes"] == len(ATOM_NAME_CLASSES)
    assert field.embed_atom_class.num_embeddings == len(ATOM_NAME_CLASSES)


def test_interchangeable_permutation_only_swaps_identical_rows():
    g = torch.Generator().manual_seed(8)
    tokens = make_tokens(20, g)
    for _ in range(5):
        perm = interchangeable_permutation(tokens, g)
        assert sorted(perm.tolist()) == list(range(20))
        assert torch.equal(tokens[perm], tokens)
