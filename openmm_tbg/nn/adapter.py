"""A per-system adapter: a small coupling flow on the whitened internal coordinates of one molecule.

The transferable flow conditions a graph transformer on the atoms at every coupling layer, which makes one
pass over 64 configurations of a dipeptide cost ~0.2 s on one CPU core. Refining all of it on one System buys
about one optimisation step a second (`openmm_tbg.refinement`). The adapter instead composes the frozen
transferable flow ``q0`` with a bijection ``A`` of the whitened coordinates of *this* molecule:

    z = A(z0),  z0 ~ q0,        log q(z) = log q0(A^-1(z)) + log |det dA^-1/dz|

``A`` is a stack of coupling layers whose conditioners are multilayer perceptrons over the flattened degrees
of freedom (no attention, no atom encoding): a pass over 256 KE draws takes ~0.09 s on one core against
~0.6 s through ``q0``'s layers, and training needs no pass through those layers, since it runs on a pool of
``q0``'s draws whose cost is paid once. Bonds, angles and half-circle dihedrals are
splined on ``[-bound, bound]`` with identity tails (`rq_spline`), full-circle dihedrals with circle
diffeomorphisms (`circular_rq_spline`), so ``A`` maps the support of ``q0`` onto itself and ``log q`` stays
exact. The last layer of every conditioner starts at zero: a fresh adapter is the identity.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .splines import circular_rq_spline, n_spline_parameters, rq_spline

__all__ = ["SystemAdapter"]


class SystemAdapter(nn.Module):
    """Coupling flow on the ``D`` degrees of freedom of one molecule's whitened coordinates ``(B, N, 3)``.

    Parameters
    ----------
    dof : bool array (N, 3)
        Which coordinates exist (`ICContext.dof`).
    circle : bool array (N, 3)
        Which of them live on the full circle (wrapped-normal or uniform dihedrals); the others on the line.
    frozen : bool array (N, 3), optional
        Coordinates the adapter leaves as they are (never transformed; still conditioned on).
    n_layers : int
        Coupling layers (an even number: each pair transforms complementary halves of the coordinates).
    hidden : int
        Width of the conditioners' two hidden layers.
    n_bins : int
        Spline bins.
    bound : float
        Line coordinates are splined on ``[-bound, bound]``, identity outside.
    seed : int
        Seeds the random halves (saved in the config, so a checkpoint rebuilds the same layers).
    """

    def __init__(self, dof: Sequence, circle: Sequence, frozen: Optional[Sequence] = None, n_layers: int = 6,
                 hidden: int = 128, n_bins: int = 8, bound: float = 5.0, seed: int = 0):
        super().__init__()
        dof_t = torch.as_tensor(dof, dtype=torch.bool)
        circle_t = torch.as_tensor(circle, dtype=torch.bool)
        frozen_t = torch.zeros_like(dof_t) if frozen is None else torch.as_tensor(frozen, dtype=torch.bool)
        if dof_t.ndim != 2 or dof_t.shape[1] != 3 or circle_t.shape != dof_t.shape or frozen_t.shape != dof_t.shape:
            raise ValueError(f"SystemAdapter: dof, circle and frozen must be (N, 3) masks, got shapes "
                             f"{tuple(dof_t.shape)}, {tuple(circle_t.shape)} and {tuple(frozen_t.shape)}.")
        if int(n_layers) < 2 or int(n_layers) % 2:
            raise ValueError(f"SystemAdapter: n_layers must be an even number >= 2, got {n_layers}.")
        self._config = {"dof": dof_t.tolist(), "circle": circle_t.tolist(), "frozen": frozen_t.tolist(),
                        "n_layers": int(n_layers), "hidden": int(hidden), "n_bins": int(n_bins),
                        "bound": float(bound), "seed": int(seed)}
        index = dof_t.flatten().nonzero().flatten()
        self.register_buffer("_index", index, persistent=False)
        self.register_buffer("_circle", circle_t.flatten()[index], persistent=False)
        movable = ~frozen_t.flatten()[index]
        d = len(index)
        g = torch.Generator().manual_seed(int(seed))
        halves = []
        for _ in range(int(n_layers) // 2):
            half = torch.zeros(d, dtype=torch.bool)
            half[torch.randperm(d, generator=g)[: d // 2]] = True
            halves += [half & movable, ~half & movable]
        # Per layer: positions (into the D degrees of freedom) of the line and circle entries it transforms; the
        # conditioner outputs spline parameters for those only.
        for layer, move in enumerate(halves):
            self.register_buffer(f"_line{layer}", (move & ~self._circle).nonzero().flatten(), persistent=False)
            self.register_buffer(f"_circ{layer}", (move & self._circle).nonzero().flatten(), persistent=False)
            self.register_buffer(f"_keep{layer}", (~move).to(torch.float32), persistent=False)
        self.n_dof = d
        self.bound = float(bound)
        self.n_params = n_spline_parameters(int(n_bins))
        self.nets = nn.ModuleList()
        for move in halves:
            last = nn.Linear(hidden, int(move.sum()) * self.n_params)
            nn.init.zeros_(last.weight)  # identity at initialisation
            nn.init.zeros_(last.bias)
            self.nets.append(nn.Sequential(nn.Linear(2 * d, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                           last))

    @property
    def config(self) -> dict:
        return dict(self._config)

    def matches(self, dof, circle) -> bool:
        """Whether this adapter was built for a molecule with these masks."""
        return (torch.as_tensor(dof, dtype=torch.bool).tolist() == self._config["dof"]
                and torch.as_tensor(circle, dtype=torch.bool).tolist() == self._config["circle"])

    def _features(self, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # circle: (cos, sin); line: a bounded copy and zero, so both kinds give two features in [-1, 1]
        line = torch.stack([torch.tanh(v / self.bound), torch.zeros_like(v)], -1)
        circ = torch.stack([torch.cos(v), torch.sin(v)], -1)
        feats = torch.where(self._circle[:, None], circ, line) * keep[:, None].to(v.dtype)
        return feats.flatten(-2)

    def forward(self, z: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``A(z)`` (``inverse=False``, the sampling direction) or ``A^-1(z)``, with ``log |det|`` of the
        direction evaluated, ``(B,)`` float64. ``z`` is ``(B, N, 3)``; entries that are not degrees of freedom
        pass through."""
        shape = z.shape
        flat = z.reshape(shape[0], -1)
        v = flat[:, self._index]
        total = torch.zeros(shape[0], dtype=torch.float64, device=z.device)
        order = range(len(self.nets))
        for layer in (reversed(order) if inverse else order):
            line, circ = getattr(self, f"_line{layer}"), getattr(self, f"_circ{layer}")
            params = self.nets[layer](self._features(v, getattr(self, f"_keep{layer}")))
            params = params.reshape(shape[0], -1, self.n_params).to(v.dtype)
            y_line, ld_line = rq_spline(v[:, line], params[:, :len(line)], self.bound, inverse=inverse)
            y_circ, ld_circ = circular_rq_spline(v[:, circ], params[:, len(line):], inverse=inverse)
            v = v.index_copy(1, line, y_line).index_copy(1, circ, y_circ)
            total = total + ld_line.double().sum(-1) + ld_circ.double().sum(-1)
        out = flat.index_copy(1, self._index, v)
        return out.reshape(shape), total

    def extra_repr(self) -> str:
        return f"n_dof={self.n_dof}, n_layers={len(self.nets)}, bound={self.bound}"


def circle_mask(base: torch.Tensor) -> torch.Tensor:
    """Full-circle coordinates of an `ICContext` ``base`` array: wrapped-normal and uniform dihedrals."""
    from ..ic_context import UNIFORM, WRAPPED_NORMAL

    return (base == WRAPPED_NORMAL) | (base == UNIFORM)

