"""A small transformer over the atoms of a molecule, with a learned attention bias from bond-graph distance.

Used as the conditioner of the internal-coordinate flow's coupling layers: every atom (a Z-matrix build
position) is a token; padded atoms are masked out of attention so one model serves molecules of any size.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GraphTransformer"]


class _Block(nn.Module):
    def __init__(self, hidden: int, n_heads: int, mlp_ratio: int = 2):
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"GraphTransformer: hidden ({hidden}) must be divisible by n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_ratio * hidden), nn.SiLU(), nn.Linear(mlp_ratio * hidden, hidden))

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        # Plain attention: on the CPU it is faster than the masked scaled_dot_product_attention fallback.
        scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + bias
        att = torch.matmul(torch.softmax(scores, dim=-1), v)
        h = h + self.proj(att.transpose(1, 2).reshape(B, N, D))
        return h + self.mlp(self.norm2(h))


class GraphTransformer(nn.Module):
    """Pre-norm transformer blocks with an additive per-head attention bias.

    Parameters
    ----------
    hidden : int
        Token width.
    n_heads : int
    n_blocks : int
    max_distance : int
        Bond-graph distances are clipped to this value; each distance has a learned bias per head.
    """

    def __init__(self, hidden: int = 64, n_heads: int = 4, n_blocks: int = 2, max_distance: int = 8):
        super().__init__()
        self.n_heads = n_heads
        self.max_distance = max_distance
        self.distance_bias = nn.Linear(max_distance + 1, n_heads, bias=False)  # applied to one-hot distances
        self.blocks = nn.ModuleList(_Block(hidden, n_heads) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(hidden)

    def one_hot_distances(self, distances: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B, N, N, max_distance + 1)`` one-hot of clipped integer graph distances (shareable between
        transformers of the same ``max_distance``)."""
        return torch.nn.functional.one_hot(distances.clamp(max=self.max_distance), self.max_distance + 1).to(dtype)

    def attention_bias(self, one_hot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, N)`` bias from `one_hot_distances`; padded keys get a large negative bias.

        (A one-hot matmul instead of an embedding lookup: its backward is a matmul, not a slow scatter.)
        """
        bias = self.distance_bias(one_hot).permute(0, 3, 1, 2)
        return bias.masked_fill(~mask[:, None, None, :], -1e4)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``h`` (B, N, hidden), ``bias`` from `attention_bias`; returns (B, N, hidden)."""
        for block in self.blocks:
            h = block(h, bias)
        return self.norm(h)
