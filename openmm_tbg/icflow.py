"""Internal-coordinate flow: a transferable coupling flow over bond lengths, angles and dihedrals.

A sample is built in three steps:

1. draw whitened internal coordinates ``z`` from a factorised base (standard normal for bonds and angles,
   wrapped normal or uniform for dihedrals; `openmm_tbg.ic_statistics`);
2. push them through coupling layers, each a rational-quadratic spline (`openmm_tbg.nn.splines`; circular for
   dihedrals) of half of the coordinates whose parameters a transformer over the atoms computes from the
   other half and from the atom encoding (`openmm_tbg.nn.transformer`);
3. un-whiten, place the atoms along the peptide's `ZMatrix` with NeRF and apply a uniformly random rotation
   (`openmm_tbg.internal_coordinates`).

Every step is a bijection with a closed-form Jacobian, so ``log q`` is exact and costs one pass through the
layers in either direction. Bond lengths and angles stay near their training distributions by construction,
which is what a Cartesian flow must learn to ~0.003 nm.

Symmetries: the density is invariant under rotations (uniform orientation) and translations (it lives on the
centre-free subspace), but not under reflection (chirality is a dihedral sign) nor under permutations of
interchangeable atoms (each atom has its own Z-matrix role). Samples are therefore never mirrored or
relabelled (`Flow.symmetries`); inverted or mislabelled proposals are rejected and counted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .ic_context import (CIRCLE, HALF, NARROW_DIHEDRALS, NONE, NORMAL, WRAPPED_NORMAL, ICContext, base_log_prob,
                         build_context, collate_contexts, unwhiten, whiten)
from .ic_statistics import DEFAULT_FALLBACK_RULE, FALLBACK_RULES, LEGACY_FALLBACK_RULE, WhiteningTable
from .internal_coordinates import closure_branch_ok, from_internal, log_jacobian, random_rotations, to_internal
from .nn.adapter import SystemAdapter, circle_mask
from .nn.splines import circular_rq_spline, n_spline_parameters, rq_spline
from .nn.transformer import GraphTransformer
from .twins import apply_swaps, canonical_masks
from .utils import as_torch_generator
from .zmatrix import RING_CLOSURES

logger = logging.getLogger(__name__)

__all__ = ["InternalCoordinateFlow", "ICOptions", "ICContext", "collate_contexts"]

_MAX_POSITIONS = 4096   # build positions for which the layers' coupling masks are defined


class _Coupling(nn.Module):
    """One coupling layer: splines of one kind of coordinate (dihedrals, or bonds and angles) at half of the
    build positions, with parameters computed from everything else."""

    def __init__(self, dihedral: bool, hidden: int, n_heads: int, n_blocks: int, n_bins: int, max_distance: int):
        super().__init__()
        self.dihedral = bool(dihedral)
        self.features = nn.Linear(7, hidden)
        self.transformer = GraphTransformer(hidden, n_heads, n_blocks, max_distance)
        self.head = nn.Linear(hidden, (1 if dihedral else 2) * n_spline_parameters(n_bins))
        nn.init.zeros_(self.head.weight)  # identity at initialisation: the flow starts as its base
        nn.init.zeros_(self.head.bias)

    def forward(self, z: torch.Tensor, keep: torch.Tensor, half: torch.Tensor, h0: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        """Spline parameters ``(B, N, C, 3K + 1)`` (C = 1 dihedral or 2 bond/angle channels) from the kept
        entries of ``z``."""
        zb = z[..., :2].clamp(-10, 10)
        angle = torch.where(half, torch.atan(z[..., 2:]), z[..., 2:])  # HALF/CIRCLE: unbounded -> an angle
        feats = torch.cat([zb, torch.cos(angle), torch.sin(angle)], -1)
        feats = feats * torch.cat([keep[..., :2], keep[..., 2:], keep[..., 2:]], -1)
        h = h0 + self.features(torch.cat([feats, keep], -1))
        out = self.head(self.transformer(h, bias))
        return out.reshape(*z.shape[:2], 1 if self.dihedral else 2, -1)


@dataclasses.dataclass(frozen=True)
class ICOptions:
    """Sampling options of `InternalCoordinateFlow`: none.

    Its ``log q`` is one exact pass (no ODE, no tolerance, no quadrature), so there is nothing to tune; the
    class exists so that every family is configured the same way (``options=`` of `BoltzmannGeneratorSampler`
    and `TBGMove`; `openmm_tbg.flow.ODEOptions` for the CNF).
    """

    def resolved(self) -> dict:
        """Keyword arguments of `InternalCoordinateFlow.sample` / ``log_prob``: none."""
        return {}


class InternalCoordinateFlow(nn.Module):
    """Transferable internal-coordinate coupling flow (family ``"internal-coordinate"``).

    Parameters
    ----------
    statistics : dict
        `WhiteningTable` entries (from training data; `openmm_tbg.ic_statistics`).
    n_rounds : int
        Each round has four coupling layers: dihedrals, then bonds and angles, each on two complementary
        halves of the build positions (a random split per round).
    hidden, n_heads, n_blocks : int
        Transformer width, heads and blocks per coupling layer.
    n_bins : int
        Spline bins.
    bound : float
        Whitened bonds and angles are splined on ``[-bound, bound]``, identity outside.
    max_residues, n_amino_acids, n_atom_classes : int
        Vocabulary of the atom encoding (``n_atom_classes`` None: the current encoding's).
    max_distance : int
        Bond-graph distance clip of the attention bias.
    narrow_dihedrals : {"wrapped", "atanh"}
        Whitening of dihedrals narrower than `openmm_tbg.ic_statistics.UNIFORM_ABOVE`: a wrapped-normal base
        and circular splines on [-pi, pi] ("wrapped", the default and the first shipped model's), or an
        atanh map of the circle onto the line, scaled by the data's width, with a normal base and the splines
        of bonds and angles ("atanh": the splines' bins then resolve the distribution's width).
    ring_closure : {"angle", "distance"}
        How ring closures are parametrised (`openmm_tbg.zmatrix`).
    whitening_fallback : str
        How keys without statistics of their own (unseen residue pairs) are whitened
        (`openmm_tbg.ic_statistics.FALLBACK_RULES`). Part of the density, so it is saved in the config; a
        config without it (checkpoints from before 2026-12-04) gets
        `openmm_tbg.ic_statistics.LEGACY_FALLBACK_RULE`, the rule those were evaluated with.
    """

    family = "internal-coordinate"
    symmetries = frozenset({"rotation"})
    options_class = ICOptions

    def __init__(self, statistics: Optional[dict] = None, n_rounds: int = 3, hidden: int = 64, n_heads: int = 4,
                 n_blocks: int = 2, n_bins: int = 8, bound: float = 5.0, max_residues: int = 2,
                 n_amino_acids: int = 20, n_atom_classes: Optional[int] = None, max_distance: int = 8,
                 narrow_dihedrals: str = "wrapped", ring_closure: str = "angle",
                 whitening_fallback: str = DEFAULT_FALLBACK_RULE, adapter: Optional[dict] = None):
        super().__init__()
        from .encoding import ATOM_NAME_CLASSES

        n_atom_classes = len(ATOM_NAME_CLASSES) if n_atom_classes is None else int(n_atom_classes)
        if narrow_dihedrals not in NARROW_DIHEDRALS:
            raise ValueError(f"InternalCoordinateFlow: narrow_dihedrals must be one of {NARROW_DIHEDRALS}, got "
                             f"{narrow_dihedrals!r}.")
        if ring_closure not in RING_CLOSURES:
            raise ValueError(f"InternalCoordinateFlow: ring_closure must be one of {RING_CLOSURES}, got "
                             f"{ring_closure!r}.")
        if whitening_fallback not in FALLBACK_RULES:
            raise ValueError(f"InternalCoordinateFlow: whitening_fallback must be one of {sorted(FALLBACK_RULES)}, "
                             f"got {whitening_fallback!r}; a checkpoint naming another rule was written by a newer "
                             "openmm_tbg, and its density depends on the rule: load it with that version.")
        self.narrow_dihedrals = narrow_dihedrals
        self.ring_closure = ring_closure
        self.table = WhiteningTable(statistics, fallback=whitening_fallback)
        self._config = {"n_rounds": int(n_rounds), "hidden": int(hidden), "n_heads": int(n_heads),
                        "n_blocks": int(n_blocks), "n_bins": int(n_bins), "bound": float(bound),
                        "max_residues": int(max_residues), "n_amino_acids": int(n_amino_acids),
                        "n_atom_classes": n_atom_classes, "max_distance": int(max_distance)}
        if narrow_dihedrals != "wrapped":  # absent = "wrapped", so that older checkpoints keep their config
            self._config["narrow_dihedrals"] = narrow_dihedrals
        if ring_closure != "angle":  # likewise: absent = "angle"
            self._config["ring_closure"] = ring_closure
        # Always stored (absent means LEGACY_FALLBACK_RULE, which may differ from a future default).
        self._config["whitening_fallback"] = whitening_fallback
        self.vocab_sizes = (int(max_residues), int(n_amino_acids), n_atom_classes)
        self.bound = float(bound)
        self._vocab = (int(max_residues), int(n_amino_acids), n_atom_classes, 8)  # the last: Z-matrix roles
        self.embedding = nn.Linear(sum(self._vocab), hidden)  # on concatenated one-hot tokens
        self.layers = nn.ModuleList(_Coupling(index % 4 < 2, hidden, n_heads, n_blocks, n_bins, max_distance)
                                    for index in range(4 * n_rounds))
        g = torch.Generator().manual_seed(20261201)
        bits = torch.randint(0, 2, (n_rounds, _MAX_POSITIONS), generator=g, dtype=torch.bool)
        self.register_buffer("_bits", bits, persistent=False)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self.last_stats: dict[str, Any] = {}
        # A per-system adapter (`openmm_tbg.nn.adapter`, made by `openmm_tbg.refinement.refine`) composed after
        # the transferable layers; None for a transferable model.
        self.adapter: Optional[SystemAdapter] = None
        if adapter is not None:
            self.attach_adapter(SystemAdapter(**adapter))

    # ------------------------------------------------------------------ config / interface
    @property
    def config(self) -> dict:
        config = dict(self._config, statistics=self.table.to_dict(), dtype=str(self.dtype).replace("torch.", ""))
        if self.adapter is not None:  # absent for transferable models, so their configs stay as they were
            config["adapter"] = self.adapter.config
        return config

    def attach_adapter(self, adapter: "SystemAdapter") -> None:
        """Compose `adapter` after the transferable layers: ``z = A(z0)``, ``z0`` from the layers; the model
        then serves only the molecule the adapter was built for (`condition` checks)."""
        self.adapter = adapter.to(device=self.device, dtype=self.dtype)

    @classmethod
    def from_config(cls, config: dict) -> "InternalCoordinateFlow":
        config = dict(config)
        config.setdefault("whitening_fallback", LEGACY_FALLBACK_RULE)  # files from before the rule was stored
        dtype = config.pop("dtype", "float32")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"InternalCoordinateFlow.from_config: dtype must be 'float32' or 'float64', got "
                             f"{dtype!r}.")
        return cls(**config).to(getattr(torch, dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def check_supported(self, encoding: Any) -> None:
        """Refuse peptides outside the model's vocabulary (residue count, amino acids, atom classes)."""
        from .encoding import UnsupportedTopologyError

        if encoding.n_atoms < 3:
            raise UnsupportedTopologyError("The internal-coordinate flow needs molecules of at least 3 atoms.")
        tokens = encoding.tokens
        for column, (size, what) in enumerate(zip(self.vocab_sizes, ("residues", "amino-acid types",
                                                                     "atom classes"))):
            if tokens[:, column].max() >= size:
                n = int(tokens[:, column].max()) + 1
                raise UnsupportedTopologyError(
                    f"This internal-coordinate model supports peptides with at most {size} {what}, but "
                    f"{encoding.sequence!r} needs {n}. Use a model trained on such peptides (openmm-tbg train "
                    f"--family internal-coordinate on MD data that includes them).")

    def sampling_options(self, options: Optional[ICOptions] = None, **fields: Any) -> dict:
        """No keyword arguments: ``log q`` is one exact pass (`ICOptions` has no fields).

        Any field given is refused, since it could only mean options of another family (e.g. the CNF's ODE
        options, `openmm_tbg.flow.ODEOptions`).
        """
        if options is not None and not isinstance(options, ICOptions):
            raise TypeError(f"The internal-coordinate flow's options are ICOptions, got {type(options).__name__}"
                            f"{' (the egnn-cnf family options)' if type(options).__name__ == 'ODEOptions' else ''}"
                            f"; pass ICOptions() or None.")
        if fields:
            raise ValueError(f"The internal-coordinate flow computes exact log q in one pass and takes no ODE "
                             f"options, got {fields}; these apply to the egnn-cnf family only.")
        return {}

    def condition(self, encoding: Any, bonds: Sequence[tuple[int, int]]) -> ICContext:
        """The `ICContext` of a molecule: Z-matrix, build-order tokens, graph distances and whitening."""
        self.check_supported(encoding)
        context = build_context(encoding, bonds, self.table, self.narrow_dihedrals, self.ring_closure)
        if self.adapter is not None and not self.adapter.matches(context.dof, circle_mask(context.base)):
            raise ValueError(
                f"This model carries a per-system adapter refined for another molecule "
                f"({self.adapter.n_dof} degrees of freedom; this one has {int(context.dof.sum())}, "
                f"{context.sequence or '?'}): it cannot describe this molecule. Use the transferable model it was "
                "refined from, or refine that one for this System (sampler.refine(...) or `openmm-tbg refine`).")
        return context

    # ------------------------------------------------------------------ whitening
    whiten = staticmethod(whiten)
    unwhiten = staticmethod(unwhiten)

    # ------------------------------------------------------------------ the layers
    def _prepare(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tok = batch["tokens"]
        one_hot = torch.cat([nn.functional.one_hot(tok[..., c], v) for c, v in enumerate(self._vocab)], -1)
        h0 = self.embedding(one_hot.to(self.dtype))
        distances = self.layers[0].transformer.one_hot_distances(batch["distances"], self.dtype)
        biases = [layer.transformer.attention_bias(distances, batch["mask"]) for layer in self.layers]
        return h0, biases

    def _transformed(self, index: int, batch: dict) -> torch.Tensor:
        """bool (B, N, 3): entries that layer ``index`` transforms."""
        n = batch["dof"].shape[1]
        round_, kind = divmod(index, 4)
        on = self._bits[round_, :n] ^ bool(kind % 2)
        channels = torch.tensor([False, False, True] if kind < 2 else [True, True, False], device=on.device)
        return batch["dof"] & on[None, :, None] & channels[None, None, :] & batch["mask"][..., None]

    def _couple(self, index: int, z: torch.Tensor, batch: dict, h0, biases, inverse: bool):
        layer = self.layers[index]
        move = self._transformed(index, batch)
        keep = (batch["dof"] & ~move).to(z.dtype)
        half = (batch["base"][..., 2:] == HALF) | (batch["base"][..., 2:] == CIRCLE)  # splined on the line
        params = layer(z * keep, keep, half, h0, biases[index])
        if layer.dihedral:
            y, log_det = circular_rq_spline(z[..., 2:], params, inverse=inverse)
            y_half, log_det_half = rq_spline(z[..., 2:], params, self.bound, inverse=inverse)
            y, log_det = torch.where(half, y_half, y), torch.where(half, log_det_half, log_det)
            new = torch.cat([z[..., :2], y], -1)
            log_det = torch.cat([torch.zeros_like(z[..., :2]), log_det], -1)
        else:
            y, log_det = rq_spline(z[..., :2], params, self.bound, inverse=inverse)
            new = torch.cat([y, z[..., 2:]], -1)
            log_det = torch.cat([log_det, torch.zeros_like(z[..., 2:])], -1)
        z = torch.where(move, new, z)
        return z, torch.where(move, log_det, torch.zeros_like(log_det)).double().sum((1, 2))

    def transform(self, z: torch.Tensor, batch: dict, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The coupling layers: data -> base (``inverse=False``) or base -> data, with ``log |det|`` of the
        direction evaluated ``(B,)`` float64."""
        h0, biases = self._prepare(batch)
        z = z.to(self.dtype)
        total = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        indices = range(len(self.layers))
        for index in (reversed(indices) if inverse else indices):
            z, ld = self._couple(index, z, batch, h0, biases, inverse=inverse)
            total = total + ld
        return z, total

    def log_prob_whitened(self, z: torch.Tensor, batch: dict) -> torch.Tensor:
        """``log q(z)`` of whitened coordinates ``(B, N, 3)`` (density direction: data -> base)."""
        log_det_adapter = 0.0
        if self.adapter is not None:  # z = A(z0): log q(z) = log q0(A^-1 z) + log |det dA^-1/dz|
            z, log_det_adapter = self.adapter(z.to(self.dtype), inverse=True)
        u, log_det = self.transform(z, batch)
        return log_det + base_log_prob(u, batch["base"], batch["width"]).sum((1, 2)) + log_det_adapter

    def forward(self, z: torch.Tensor, batch: dict) -> torch.Tensor:
        """`log_prob_whitened` (the training objective goes through ``forward`` so that DDP can wrap it)."""
        return self.log_prob_whitened(z, batch)

    def sample_whitened(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log q(z))``: base draws pushed through the inverse layers (base -> data)."""
        base, width = batch["base"], batch["width"]
        shape = base.shape
        gen_device = generator.device
        eps = torch.randn(shape, generator=generator, dtype=torch.float64, device=gen_device).to(base.device)
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device).to(base.device)
        wrapped = torch.remainder(width * eps + math.pi, 2 * math.pi) - math.pi
        normal = (base == NORMAL) | (base == HALF) | (base == CIRCLE)
        z = torch.where(normal, eps, torch.where(base == WRAPPED_NORMAL, wrapped, (2 * u - 1) * math.pi))
        z = torch.where(base == NONE, torch.zeros_like(z), z)
        log_q = base_log_prob(z, base, width).sum((1, 2))
        z, log_det = self.transform(z, batch, inverse=True)
        # log_det = log |d z_data / d z_base|, so log q(z_data) = log p(z_base) - log_det
        log_q = log_q - log_det
        if self.adapter is not None:
            z, log_det_adapter = self.adapter(z)
            log_q = log_q - log_det_adapter
        return z.double(), log_q

    # ------------------------------------------------------------------ API
    def _batch(self, context: ICContext, n: int) -> dict:
        one = collate_contexts([context], device=self.device)
        return {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}

    def _as_context(self, context: Any) -> ICContext:
        if not isinstance(context, ICContext):
            raise TypeError(f"InternalCoordinateFlow: expected the ICContext from flow.condition(encoding, "
                            f"bonds), got {type(context).__name__}.")
        return context

    @torch.no_grad()
    def sample(self, context: Any, n: int, *, generator: torch.Generator | int | None = None,
               batch_size: Optional[int] = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` configurations with their exact ``log q``.

        Returns
        -------
        x_nm : torch.Tensor
            ``(n, N, 3)`` float64 positions (nm, centroid at the origin), topology atom order, on the CPU.
        log_q : torch.Tensor
            ``(n,)`` float64 log density on the centre-free subspace (nm); NaN for the (vanishingly rare)
            draws outside the coordinates' support (a bond length <= 0 or an angle outside (0, pi)).
        """
        from tqdm.auto import tqdm

        context = self._as_context(context)
        if int(n) != n or n < 1:
            raise ValueError(f"InternalCoordinateFlow.sample: n must be a positive integer, got {n!r}.")
        n = int(n)
        batch_size = n if batch_size is None else int(batch_size)
        generator = as_torch_generator(generator)
        xs, lqs = [], []
        for start in tqdm(range(0, n, batch_size), disable=not progress, desc="flow samples", unit="batch"):
            m = min(batch_size, n - start)
            batch = self._batch(context, m)
            z, log_q = self.sample_whitened(batch, generator)
            rot = random_rotations(m, generator, device=self.device)
            x, log_q, inside = self._build_positions(z, log_q, batch, context, rot)
            log_q = torch.where(inside, log_q, torch.full_like(log_q, float("nan")))
            x, log_q = self._symmetrise(x, log_q, context, generator)
            lqs.append(log_q.cpu())
            xs.append(x.cpu())
        self.last_stats = {"n_batches": len(xs)}
        return torch.cat(xs), torch.cat(lqs)

    def rsample(self, context: Any, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``n`` draws on a differentiable (reparameterised) path, for losses through the sampling path such as
        the reverse KL divergence ``E_q[u(x) + log q(x)]`` (`openmm_tbg.refinement`).

        The draws are in the canonical twin labelling and the canonical orientation (no random rotation and no
        twin swaps): the Hamiltonian is invariant under both. ``log q`` is ``log q_c - G log 2`` for ``G`` twin
        groups: the symmetrised density of `sample` and `log_prob` where only one labelling of each group is
        canonical, and less than it where another labelling is canonical too, since those terms of its sum are
        left out. That makes ``E[u + log q]`` an upper bound of the reverse KL
        divergence of the symmetrised density, which is fine to train on; anything reported uses `sample`.

        Returns
        -------
        dict
            ``x`` ``(n, N, 3)`` positions (nm, topology order, centroid at the origin, differentiable),
            ``log_q`` ``(n,)`` float64 (differentiable), ``z`` ``(n, N, 3)`` whitened data-side coordinates
            (detached; ``log_prob_whitened`` of them is the trainable part of ``log q``), ``inside`` ``(n,)``
            bool: the draw lies in the coordinates' support (False rows hold finite placeholders).
        """
        context = self._as_context(context)
        batch = self._batch(context, int(n))
        z, log_q = self.sample_whitened(batch, generator)
        return self.rsample_from_whitened(context, z, log_q)

    def rsample_from_whitened(self, context: Any, z: torch.Tensor, log_q: torch.Tensor) -> dict[str, torch.Tensor]:
        """`rsample` from given whitened draws ``z`` ``(n, N, 3)`` with their ``log q(z)`` (e.g. a per-system
        adapter's image of a pool of draws of the frozen layers; `openmm_tbg.refinement`)."""
        context = self._as_context(context)
        batch = self._batch(context, int(z.shape[0]))
        x, log_q, inside = self._build_positions(z, log_q, batch, context, placeholders=True)
        log_q = log_q - len(context.swaps) * math.log(2.0)
        return {"x": x, "log_q": log_q, "z": z.detach(), "inside": inside.detach()}

    def _build_positions(self, z: torch.Tensor, log_q: torch.Tensor, batch: dict, context: ICContext,
                         rotations: Optional[torch.Tensor] = None, placeholders: bool = False):
        """Whitened draws ``z`` with their ``log q(z)`` -> ``(x, log q(x), inside)``: positions (nm, atom order),
        the density on the centre-free subspace before the twin symmetrisation, and which rows lie in the
        coordinates' support (bond lengths > 0, angles in (0, pi), reachable closure distances).

        With ``placeholders`` the bonds and angles of rows outside the support are replaced by 1 nm and pi/2
        before the atoms are placed, so that every row stays finite and differentiable (`rsample`); `sample`
        keeps them as drawn (its ``log q`` is NaN there)."""
        ic = self.unwhiten(z, batch)
        _, log_det_white = self.whiten(ic, batch)
        bonds, angles, dihedrals = ic.unbind(-1)
        dof = batch["dof"]
        inside = ~((dof[..., 0] & (bonds <= 0)) | (dof[..., 1] & ((angles <= 0) | (angles >= math.pi)))).any(1)
        if placeholders:
            safe = inside[:, None]
            bonds = torch.where(safe | ~dof[..., 0], bonds, torch.ones_like(bonds))
            angles = torch.where(safe | ~dof[..., 1], angles, torch.full_like(angles, math.pi / 2))
        x, reachable = from_internal(bonds, angles, dihedrals, context.zmatrix, rotations, return_support=True)
        inside = inside & reachable  # closure distances that no angle on their branch reaches
        log_q = log_q + log_det_white + log_jacobian(bonds.abs(), angles, context.zmatrix, positions=x)
        return x, log_q, inside

    def _symmetrise(self, x: torch.Tensor, log_q: torch.Tensor, context: ICContext,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply each twin swap with probability 1/2 (`openmm_tbg.twins`); ``log p = log q_c - G log 2`` unless
        a group's other labelling is canonical too, where the density is re-evaluated exactly.

        The labellings are judged, as `log_prob` judges them, from the dihedrals of the built positions. A draw
        whose sense dihedral lies within round-off of its half circle's end can measure as non-canonical
        there; its ``log q`` is set to NaN (outside the support, so the sampler rejects and counts it), which
        keeps ``sample`` and ``log_prob`` exactly consistent.
        """
        swaps = context.swaps
        if not swaps:
            return x, log_q
        flips = torch.rand(x.shape[0], len(swaps), generator=generator, dtype=torch.float64,
                           device=generator.device).to(x.device) < 0.5
        needed, ambiguous, outside = canonical_masks(to_internal(x, context.zmatrix)[2], swaps)
        off = (needed | outside).any(1)
        if bool(off.any()):
            logger.debug("%d draw(s) on the boundary of a twin sense interval: log q = NaN", int(off.sum()))
            log_q = torch.where(off, torch.full_like(log_q, float("nan")), log_q)
        x = apply_swaps(x, swaps, flips)
        log_q = log_q - len(swaps) * math.log(2.0)
        redo = ambiguous.any(1) & torch.isfinite(log_q)
        if bool(redo.any()):
            log_q = log_q.clone()
            log_q[redo] = self._log_prob_positions(x[redo], context)
        return x, log_q

    @torch.no_grad()
    def log_prob(self, x_nm: Any, context: Any, *, batch_size: Optional[int] = None,
                 progress: bool = False) -> torch.Tensor:
        """Exact ``log q`` of ``(n, N, 3)`` positions (nm; topology atom order), float64 on the CPU.

        ``-inf`` for configurations the flow cannot produce (a twin group with no canonical labelling).
        """
        from tqdm.auto import tqdm

        context = self._as_context(context)
        x = _as_positions(x_nm, context.n_atoms)
        n = x.shape[0]
        batch_size = n if batch_size is None else int(batch_size)
        out = []
        for start in tqdm(range(0, n, batch_size), disable=not progress, desc="flow log_prob", unit="batch"):
            out.append(self._log_prob_positions(x[start:start + batch_size].to(self.device), context).cpu())
        return torch.cat(out)

    def _log_prob_positions(self, x: torch.Tensor, context: ICContext) -> torch.Tensor:
        """``log p(x) = log sum_S 2^{-G} q_c(tau_S x)`` over the labellings that are canonical."""
        swaps, zm = context.swaps, context.zmatrix
        dihedrals = to_internal(x, zm)[2]
        needed, ambiguous, outside = canonical_masks(dihedrals, swaps)
        base = apply_swaps(x, swaps, needed)
        log_q = self.log_prob_internal(torch.stack(to_internal(base, zm), -1), context, positions=base)
        log_q = torch.where(outside.any(1), torch.full_like(log_q, -math.inf), log_q)
        rows = torch.nonzero(ambiguous.any(1) & ~outside.any(1)).flatten()
        if len(rows):
            log_q[rows] = self._sum_over_labellings(base[rows], ambiguous[rows], context)
        return log_q - len(swaps) * math.log(2.0)

    def _sum_over_labellings(self, x: torch.Tensor, ambiguous: torch.Tensor, context: ICContext) -> torch.Tensor:
        """``log sum_S q_c(tau_S x)`` over the subsets ``S`` of each row's ambiguous swaps (both labellings
        canonical), one batched evaluation per subset of the groups ambiguous in any row."""
        swaps, zm = context.swaps, context.zmatrix
        groups = torch.nonzero(ambiguous.any(0)).flatten().tolist()
        terms = torch.full((x.shape[0], 1 << len(groups)), -math.inf, dtype=torch.float64, device=x.device)
        for k in range(1 << len(groups)):
            mask = torch.zeros_like(ambiguous)
            for bit, g in enumerate(groups):
                mask[:, g] = bool((k >> bit) & 1)
            use = ~(mask & ~ambiguous).any(1)  # subsets of this row's ambiguous groups only
            if bool(use.any()):
                xi = apply_swaps(x[use], swaps, mask[use])
                terms[use, k] = self.log_prob_internal(torch.stack(to_internal(xi, zm), -1), context, positions=xi)
        return torch.logsumexp(terms, 1)

    def log_prob_internal(self, ic: torch.Tensor, context: ICContext,
                          positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``log q_c`` (canonical labelling, before the twin symmetrisation) on the centre-free subspace from
        ``(B, N, 3)`` internal coordinates of one molecule.

        With closure distances (``ring_closure="distance"``) pass the ``positions`` the coordinates were
        measured on: a configuration on the other branch of a closure has the same coordinates as one on the
        density's branch, and only its positions tell them apart (it gets ``-inf``). Without them the
        coordinates are taken to describe the configuration they build."""
        batch = self._batch(context, ic.shape[0])
        z, log_det_white = self.whiten(ic.double(), batch)
        bonds, angles, dihedrals = ic.double().unbind(-1)
        ok = torch.isfinite(z).all(-1).all(-1)
        if len(context.zmatrix.closure_positions):  # closure-distance Jacobians and branch need positions
            if positions is None:
                positions = from_internal(bonds, angles, dihedrals, context.zmatrix)
            positions = positions.to(bonds)
            ok &= closure_branch_ok(positions, context.zmatrix)
        log_q = (self.log_prob_whitened(z, batch) + log_det_white
                 + log_jacobian(bonds, angles, context.zmatrix, positions=positions))
        return torch.where(ok, log_q, torch.full_like(log_q, -math.inf))


def _as_positions(x_nm: Any, n_atoms: int) -> torch.Tensor:
    from .utils import to_nm

    x = x_nm.detach().double() if isinstance(x_nm, torch.Tensor) else torch.as_tensor(to_nm(x_nm))
    if x.dim() != 3 or x.shape[1:] != (n_atoms, 3):
        raise ValueError(f"InternalCoordinateFlow.log_prob: positions must have shape (n, {n_atoms}, 3) in nm, "
                         f"got {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("InternalCoordinateFlow.log_prob: positions contain NaN or infinite values; remove "
                         "those configurations first.")
    return x
