"""E(3)-equivariant graph neural network vector field (EGNN) for the transferable flow.

This is the vector field v(x, t | tokens) of the transferable Boltzmann generator (Klein and Noe,
arXiv 2406.14426; their ``EGNN_dynamics``), built from the E(n)-equivariant layers of Satorras et al.
(arXiv 2102.09844), in a *dense* formulation: every molecule is a fully connected graph, and edge tensors have
shape ``(B, N, N, H)``. For peptides of up to ~60 atoms this is faster than a scatter-based sparse graph.

Node features are learned embeddings of the three token columns ``[residue_index, amino_acid, atom_class]``
(equivalent to a linear layer on their concatenated one-hot vectors) plus the time ``t``. Edge inputs are the
squared distance of the current layer's coordinates and the squared distance of the input coordinates.
Coordinates are updated by ``x_i += sum_j (x_i - x_j) / (|x_i - x_j| + 1) * phi_x(m_ij)`` with
``phi_x`` bounded by ``tanh * coords_range / n_layers``; the output is the total displacement with its mean
over real atoms removed. The output is therefore equivariant to rotations, reflections and permutations of
atoms with identical tokens, invariant to translations of the input, and mean-free.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["EGNNVectorField", "default_n_atom_classes"]


def default_n_atom_classes() -> int:
    """Number of atom-name classes of the "TBG + full" encoding (``len(encoding.ATOM_NAME_CLASSES)``)."""
    from openmm_tbg.encoding import ATOM_NAME_CLASSES

    return len(ATOM_NAME_CLASSES)


class _EquivariantLayer(nn.Module):
    """One dense E_GCL layer (Satorras et al.) with the first edge-MLP layer split into per-node halves."""

    def __init__(self, hidden: int, attention: bool, tanh: bool, coords_range: float):
        super().__init__()
        self.attention = attention
        self.tanh = tanh
        self.coords_range = coords_range
        act = nn.SiLU()
        # W [h_i; h_j; r2; r2_0] + b  ==  W_src h_i + W_dst h_j + w r2 + w0 r2_0 + b, computed per node
        # ((B, N, H) matmuls) and broadcast to edges instead of a (B, N, N, 2H + 2) matmul.
        self.edge_src = nn.Linear(hidden, hidden)
        self.edge_dst = nn.Linear(hidden, hidden, bias=False)
        self.edge_radial = nn.Linear(2, hidden, bias=False)
        self.edge_mlp = nn.Sequential(act, nn.Linear(hidden, hidden), act)
        if attention:
            self.att_mlp = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), act, nn.Linear(hidden, hidden))
        last = nn.Linear(hidden, 1, bias=False)
        # Tiny initial coordinate updates (as in E(n) flows / TBG) so that the initial flow is near identity.
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), act, last)

    def forward(self, h, x, r2_0, edge_mask, node_mask):
        # h (B, N, H); x (B, N, 3); r2_0 (B, N, N); edge_mask (B, N, N) float; node_mask (B, N, 1) float
        diff = x[:, :, None, :] - x[:, None, :, :]  # (B, N, N, 3): x_i - x_j
        r2 = (diff * diff).sum(-1)
        # sqrt has an infinite derivative at 0 (self edges, padding): substitute 1 there so that backward
        # (and double backward for the divergence) stays finite; those edges are masked out anyway.
        r2_safe = torch.where(edge_mask > 0, r2, torch.ones_like(r2))
        diff = diff / (torch.sqrt(r2_safe) + 1.0)[..., None]

        radial = torch.stack([r2, r2_0], dim=-1)  # (B, N, N, 2)
        pre = (
            self.edge_src(h)[:, :, None, :]
            + self.edge_dst(h)[:, None, :, :]
            + self.edge_radial(radial)
        )
        m = self.edge_mlp(pre)  # (B, N, N, H)
        # Fold the edge mask into the (B, N, N, 1) attention gate: one big multiply instead of two.
        gate = edge_mask[..., None]
        if self.attention:
            gate = self.att_mlp(m) * gate
        m = m * gate

        phi = self.coord_mlp(m)  # (B, N, N, 1)
        if self.tanh:
            phi = torch.tanh(phi) * self.coords_range
        x = x + (diff * phi * edge_mask[..., None]).sum(2)

        agg = m.sum(2)  # (B, N, H)
        h = h + self.node_mlp(torch.cat([h, agg], dim=-1))  # recurrent (residual) node update
        h = h * node_mask
        return h, x


class EGNNVectorField(nn.Module):
    """EGNN vector field v(x, t | tokens) of the transferable Boltzmann generator.

    Parameters
    ----------
    n_layers : int
        Number of equivariant layers (TBG: 9 for dipeptides, 5 for alanine dipeptide).
    hidden : int
        Width of node features and messages (TBG: 128; 64 for alanine dipeptide).
    max_residues : int
        Number of residue positions that can be embedded (2 for dipeptides).
    n_amino_acids : int
        Size of the amino-acid vocabulary (20).
    n_atom_classes : int or None
        Size of the atom-name-class vocabulary; ``None`` uses ``len(openmm_tbg.encoding.ATOM_NAME_CLASSES)``.
    attention : bool
        Gate every message by a learned sigmoid (TBG: True).
    tanh : bool
        Bound every coordinate update by ``tanh(.) * coords_range / n_layers`` (TBG: True).
    coords_range : float
        Bound of the total coordinate update, in internal (scaled) length units (TBG: 15).

    Notes
    -----
    ``config`` is a JSON-able dict with which ``EGNNVectorField(**config)`` rebuilds the module.
    """

    def __init__(
        self,
        n_layers: int = 9,
        hidden: int = 128,
        max_residues: int = 2,
        n_amino_acids: int = 20,
        n_atom_classes: int | None = None,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
    ):
        super().__init__()
        if n_atom_classes is None:
            n_atom_classes = default_n_atom_classes()
        for name, value in [("n_layers", n_layers), ("hidden", hidden), ("max_residues", max_residues),
                            ("n_amino_acids", n_amino_acids), ("n_atom_classes", n_atom_classes)]:
            if int(value) != value or value < 1:
                raise ValueError(f"EGNNVectorField: {name} must be a positive integer, got {value!r}.")
        if not coords_range > 0:
            raise ValueError(f"EGNNVectorField: coords_range must be positive, got {coords_range!r}.")
        self.config: dict[str, Any] = dict(
            n_layers=int(n_layers), hidden=int(hidden), max_residues=int(max_residues),
            n_amino_acids=int(n_amino_acids), n_atom_classes=int(n_atom_classes),
            attention=bool(attention), tanh=bool(tanh), coords_range=float(coords_range),
        )
        self.vocab_sizes = (int(max_residues), int(n_amino_acids), int(n_atom_classes))
        # Sum of per-column embeddings + w_t t + b == Linear(concat(one-hots, t)).
        self.embed_residue = nn.Embedding(max_residues, hidden)
        self.embed_amino_acid = nn.Embedding(n_amino_acids, hidden)
        self.embed_atom_class = nn.Embedding(n_atom_classes, hidden)
        self.embed_time = nn.Linear(1, hidden)
        self.layers = nn.ModuleList(
            _EquivariantLayer(hidden, attention, tanh, float(coords_range) / n_layers) for _ in range(n_layers)
        )

    _COLUMNS = ("residue index", "amino-acid", "atom-class")
    _OPTIONS = ("max_residues", "n_amino_acids", "n_atom_classes")

    def check_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Raise ``ValueError`` if a token of a real atom is outside this model's vocabulary."""
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"EGNNVectorField: tokens must be an integer tensor, got dtype {tokens.dtype}.")
        for column, (size, label, option) in enumerate(zip(self.vocab_sizes, self._COLUMNS, self._OPTIONS)):
            col = tokens[..., column]
            bad = (col < 0) | (col >= size)
            if mask is not None:
                bad = bad & mask
            if bool(bad.any()):
                values = sorted(set(col[bad].tolist()))
                raise ValueError(
                    f"EGNNVectorField: {label} token(s) {values[:10]} out of range [0, {size}) "
                    f"({option}={size}). The molecule is outside this model's vocabulary: use a model trained "
                    f"with a larger {option}, or a molecule the model supports."
                )

    def forward(
        self,
        t: torch.Tensor | float,
        x: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Evaluate the vector field.

        Parameters
        ----------
        t : torch.Tensor or float
            Time in [0, 1]: a scalar or shape ``(B,)``.
        x : torch.Tensor
            ``(B, N, 3)`` positions in internal (scaled, unitless) coordinates.
        tokens : torch.Tensor
            ``(N, 3)`` or ``(B, N, 3)`` integer tokens ``[residue_index, amino_acid, atom_class]``.
        mask : torch.Tensor, optional
            ``(B, N)`` bool, True for real atoms; False marks padding in mixed-size batches.

        Returns
        -------
        torch.Tensor
            ``(B, N, 3)`` velocity, mean-free over real atoms and zero at padding.
        """
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"EGNNVectorField: x must have shape (B, N, 3), got {tuple(x.shape)}.")
        B, N, _ = x.shape
        if tokens.dim() == 2 and tokens.shape == (N, 3):
            tokens = tokens.unsqueeze(0).expand(B, N, 3)
        if tokens.dim() != 3 or tokens.shape[0] != B or tokens.shape[1] != N or tokens.shape[2] != 3:
            raise ValueError(
                f"EGNNVectorField: tokens must have shape (N, 3) or (B, N, 3) matching x {tuple(x.shape)}, "
                f"got {tuple(tokens.shape)}."
            )
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
        elif mask.shape != (B, N) or mask.dtype != torch.bool:
            raise ValueError(
                f"EGNNVectorField: mask must be a bool tensor of shape (B, N) = {(B, N)}, "
                f"got {mask.dtype} {tuple(mask.shape)}."
            )
        tokens = tokens.to(x.device)
        self.check_tokens(tokens, mask)
        tokens = torch.where(mask[..., None], tokens.long(), torch.zeros_like(tokens, dtype=torch.long))

        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"EGNNVectorField: t must be a scalar or have shape (B,) = ({B},), got {tuple(t.shape)}.")

        node_mask = mask.to(x.dtype)[..., None]  # (B, N, 1)
        edge_mask = node_mask * node_mask.transpose(1, 2)
        edge_mask = edge_mask * (1.0 - torch.eye(N, dtype=x.dtype, device=x.device))  # no self edges
        # Padding coordinates may hold anything (even NaN): replace them so that they cannot leak.
        x = torch.where(mask[..., None], x, torch.zeros_like(x))

        h = (
            self.embed_residue(tokens[..., 0])
            + self.embed_amino_acid(tokens[..., 1])
            + self.embed_atom_class(tokens[..., 2])
            + self.embed_time(t[:, None, None].expand(B, N, 1))
        ) * node_mask
        diff0 = x[:, :, None, :] - x[:, None, :, :]
        r2_0 = (diff0 * diff0).sum(-1)

        y = x
        for layer in self.layers:
            h, y = layer(h, y, r2_0, edge_mask, node_mask)
        v = (y - x) * node_mask
        n_real = node_mask.sum(1, keepdim=True).clamp(min=1.0)
        v = v - v.sum(1, keepdim=True) / n_real
        return v * node_mask
