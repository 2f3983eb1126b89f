"""Maximum-likelihood training data and loss of the internal-coordinate flow.

The flow's exact ``log q`` is one pass, so it trains by maximum likelihood on MD frames: the loss is the mean
negative log density of the whitened internal coordinates per degree of freedom. Frames are relabelled to the
canonical sense of their twin groups first (`openmm_tbg.twins`), which is the density ``q_c`` the layers model;
frames without a canonical labelling (none were found in the data set) are dropped and counted. (The Jacobian of the
Cartesian transform does not depend on the weights, so this is maximum likelihood on the Cartesian density
too.) Every frame's internal coordinates are computed once, up front.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["whitening_statistics", "build_ic_flow", "ICTrainingData", "likelihood_loss", "peptide_bonds"]


def peptide_bonds(trajectory: Any) -> list[tuple[int, int]]:
    """Bonded atom pairs of a `PeptideTrajectory`'s topology."""
    return [(b[0].index, b[1].index) for b in trajectory.topology.bonds()]


def whitening_statistics(trajectories: Sequence[Any], progress: bool = False, source: str = "md",
                         temperature_k: float = 310.0, ring_closure: str = "angle") -> dict:
    """`WhiteningTable` entries collected from training peptides.

    Parameters
    ----------
    trajectories : sequence of PeptideTrajectory
    progress : bool
    source : {"md", "force-field"}
        Bonds and angles whitened by the mean and standard deviation of the MD frames, or by the equilibrium
        value and ``sqrt(kT / k)`` of each peptide's amber14-all harmonic terms (`force_field_moments`, each
        peptide weighted by its frames). Dihedrals always come from the MD frames.
    temperature_k : float
        Temperature of ``kT`` for ``source="force-field"``, K (the data set's 310 K).
    ring_closure : {"angle", "distance"}
        The Z-matrix rule of the flow these statistics are for (`openmm_tbg.zmatrix`).
    """
    from tqdm.auto import tqdm

    from ..ic_statistics import WHITENING_SOURCES, WhiteningTable, force_field_moments
    from ..peptides import create_system
    from ..twins import canonicalize, twin_swaps
    from ..zmatrix import build_zmatrix

    if source not in WHITENING_SOURCES:
        raise ValueError(f"Unknown whitening source {source!r}; use one of {WHITENING_SOURCES}.")
    table = WhiteningTable()
    force_field = WhiteningTable()
    for t in tqdm(trajectories, disable=not progress, desc="internal-coordinate statistics", unit="peptide"):
        bonds = peptide_bonds(t)
        zm = build_zmatrix(t.encoding, bonds, ring_closure=ring_closure)
        x, ok = canonicalize(torch.as_tensor(t.positions, dtype=torch.float64), zm, twin_swaps(t.encoding, bonds, zm))
        table.add_frames(zm, x[ok])
        if source == "force-field":
            weight = max(int(ok.sum()), 2)
            for key, x0, width in force_field_moments(create_system(t.topology), zm, temperature_k):
                force_field.add_moments(key, x0, width * width, weight)
    if source == "force-field":
        table.drop_kinds("bar")
        table.entries.update(force_field.entries)
    return table.to_dict()


def build_ic_flow(trajectories: Sequence[Any], *, n_rounds: int = 3, hidden: int = 64, n_heads: int = 4,
                  n_blocks: int = 2, n_bins: int = 8, max_residues: int | None = None, seed: int = 0,
                  statistics: dict | None = None, narrow_dihedrals: str = "wrapped", whitening: str = "md",
                  ring_closure: str = "angle"):
    """A fresh `InternalCoordinateFlow` whitened with ``statistics`` or, by default, with those of the training
    data (`whitening_statistics` with ``source=whitening``); weights seeded with ``seed`` without touching the
    caller's global RNG."""
    from ..icflow import InternalCoordinateFlow

    if statistics is None:
        statistics = whitening_statistics(trajectories, source=whitening, ring_closure=ring_closure)
    if max_residues is None:
        max_residues = max(int(t.encoding.n_residues) for t in trajectories)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InternalCoordinateFlow(statistics, n_rounds=n_rounds, hidden=hidden, n_heads=n_heads,
                                      n_blocks=n_blocks, n_bins=n_bins, max_residues=max_residues,
                                      narrow_dihedrals=narrow_dihedrals, ring_closure=ring_closure)


@dataclass
class _Peptide:
    name: str
    context: Any
    z: torch.Tensor           # (frames, N, 3) float32 whitened internal coordinates, build order
    # (frames,) float64 whitening log-determinant per frame: constant for normal and wrapped bases, but the
    # atanh maps of twin sense (HALF) and CIRCLE dihedrals depend on the value (0.08-0.12 nats across frames)
    log_det: torch.Tensor
    n_dof: int


class ICTrainingData:
    """Whitened internal coordinates of every training frame and a sampler of mixed-peptide batches.

    Parameters
    ----------
    flow : InternalCoordinateFlow
        Its whitening statistics define ``z``.
    trajectories : sequence of PeptideTrajectory
    peptides_per_batch : int
        Distinct peptides in one batch (frames are split evenly between them).
    """

    def __init__(self, flow, trajectories: Sequence[Any], peptides_per_batch: int = 8, progress: bool = False):
        from tqdm.auto import tqdm

        from ..icflow import collate_contexts
        from ..internal_coordinates import closure_branch_ok, to_internal
        from ..twins import canonicalize

        self.peptides: list[_Peptide] = []
        self.n_dropped = 0
        for t in tqdm(trajectories, disable=not progress, desc="internal coordinates", unit="peptide"):
            ctx = flow.condition(t.encoding, peptide_bonds(t))
            x, ok = canonicalize(torch.as_tensor(t.positions, dtype=torch.float64), ctx.zmatrix, ctx.swaps)
            ic = torch.stack(to_internal(x, ctx.zmatrix), -1)
            z, log_det = flow.whiten(ic, collate_contexts([ctx]))
            ok &= torch.isfinite(z).all(-1).all(-1) & closure_branch_ok(x, ctx.zmatrix)
            if not bool(ok.all()):
                logger.warning("%s: %d of %d frames have no canonical twin labelling (or lie outside the "
                               "flow's support) and are left out.", t.name, int((~ok).sum()), len(ok))
                self.n_dropped += int((~ok).sum())
            z = z[ok]
            self.peptides.append(_Peptide(t.name, ctx, z.float(), log_det[ok].double(), int(ctx.dof.sum())))
        self.peptides_per_batch = int(peptides_per_batch)
        self.n_frames = np.array([len(p.z) for p in self.peptides])

    def batch(self, batch_size: int, rng: np.random.Generator, device=None) -> dict[str, torch.Tensor]:
        """A padded batch: ``z`` (B, N_max, 3), ``log_det`` (B,), ``n_dof`` (B,) and the context tensors."""
        from ..icflow import collate_contexts

        k = min(self.peptides_per_batch, len(self.peptides), batch_size)
        chosen = rng.choice(len(self.peptides), size=k, replace=False)
        counts = np.full(k, batch_size // k)
        counts[: batch_size - counts.sum()] += 1
        contexts, zs, dets, dofs = [], [], [], []
        n_max = max(self.peptides[i].context.n_atoms for i in chosen)
        for i, m in zip(chosen, counts):
            p = self.peptides[i]
            frames = rng.integers(len(p.z), size=int(m))
            z = torch.zeros(int(m), n_max, 3)
            z[:, : p.context.n_atoms] = p.z[frames]
            contexts += [p.context] * int(m)
            zs.append(z)
            dets.append(p.log_det[frames])
            dofs.append(torch.full((int(m),), p.n_dof))
        batch = collate_contexts(contexts)
        batch.update(z=torch.cat(zs), log_det=torch.cat(dets), n_dof=torch.cat(dofs))
        return {k: v.to(device) for k, v in batch.items()}


def likelihood_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per degree of freedom of a batch of whitened coordinates.

    The log density is that of the internal coordinates: the layers' ``log q(z)`` plus each frame's own
    whitening log-determinant (``batch["log_det"]``). The Cartesian Jacobian is left out (it does not depend on
    the weights), so the loss is ``-log q`` of the internal coordinates per DOF, comparable between checkpoints
    of the same whitening.

    ``model`` is the flow or its DDP wrapper: calling it (``forward`` = `log_prob_whitened`) lets DDP
    synchronise the gradients.
    """
    log_q = model(batch["z"], batch) + batch["log_det"]
    return -(log_q / batch["n_dof"]).mean()
