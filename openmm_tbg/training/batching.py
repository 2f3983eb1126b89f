"""Mixed-peptide batches of MD frames, the tensors of one flow-matching step, and the loss.

The random draws happen in a fixed order (frames from a numpy generator; rotations, prior, times and noise
from a torch generator) so that a resumed run reproduces the same batches.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..utils import spawn_generators
from .config import TrainingConfig
from .couplings import equivariant_ot_coupling, masked_center, random_rotations, sample_mean_free_gaussian


def make_generators(seed: int, rank: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """Independent numpy (frame selection) and torch (prior, times, noise, rotations) generators of one rank.

    Every rank of a DDP run gets its own streams (seed sequence ``[seed, rank]``), so the ranks draw different
    batches.
    """
    return spawn_generators([int(seed), int(rank)])


@dataclass
class FrameBatch:
    """A padded batch of data frames from possibly different peptides.

    Attributes
    ----------
    positions : numpy.ndarray
        float32 (B, N, 3), nm, centred over the real atoms, zero at padding.
    tokens : numpy.ndarray
        int64 (B, N, 3) atom tokens ``[residue_index, amino_acid, atom_class]``; zero at padding.
    mask : numpy.ndarray
        bool (B, N), True for real atoms (real atoms come first in every row).
    peptide_index : numpy.ndarray
        int (B,) index of each frame's peptide in the sampler's list.
    frame_index : numpy.ndarray
        int (B,) frame of that peptide.
    """

    positions: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    peptide_index: np.ndarray
    frame_index: np.ndarray


class PeptideBatchSampler:
    """Draw mixed-peptide batches: peptides uniformly with replacement, then a uniform frame of each.

    Parameters
    ----------
    trajectories : sequence of PeptideTrajectory
        Training data (``positions`` (frames, N, 3) nm and ``encoding``).
    batch_size : int
        Frames per batch.
    rng : numpy.random.Generator
        Source of randomness (owned by the caller; its state is saved for resuming).
    """

    def __init__(self, trajectories: Sequence[Any], batch_size: int, rng: np.random.Generator):
        if len(trajectories) == 0:
            raise ValueError("No training peptides were given; pass at least one PeptideTrajectory.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        names = [t.name for t in trajectories]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Peptides {duplicates} appear more than once in the training data; pass each once.")
        self._positions: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self.groups: list[list[np.ndarray]] = []
        for traj in trajectories:
            pos = np.asarray(traj.positions)
            if pos.ndim != 3 or pos.shape[-1] != 3 or pos.shape[0] == 0:
                raise ValueError(
                    f"Peptide {traj.name!r}: positions must have shape (frames > 0, n_atoms, 3), got {pos.shape}."
                )
            if pos.shape[1] != traj.encoding.n_atoms:
                raise ValueError(
                    f"Peptide {traj.name!r}: positions have {pos.shape[1]} atoms but its encoding has "
                    f"{traj.encoding.n_atoms}; reload the peptide with its own topology."
                )
            if not np.all(np.isfinite(pos)):
                raise ValueError(f"Peptide {traj.name!r} has non-finite coordinates; fix or drop those frames.")
            self._positions.append(pos)
            self._tokens.append(np.asarray(traj.encoding.tokens, dtype=np.int64))
            self.groups.append([np.asarray(g, dtype=np.int64) for g in traj.encoding.interchangeable_groups()])
        self.names = names
        self.n_atoms = np.array([p.shape[1] for p in self._positions])
        self.n_frames = np.array([p.shape[0] for p in self._positions])
        self.batch_size = int(batch_size)
        self.rng = rng

    def sample(self) -> FrameBatch:
        """Draw one batch (peptide indices first, then frame indices: a fixed order for exact resuming)."""
        b = self.batch_size
        pep = self.rng.integers(0, len(self._positions), size=b)
        frame = np.floor(self.rng.random(b) * self.n_frames[pep]).astype(np.int64)
        n_max = int(self.n_atoms[pep].max())
        positions = np.zeros((b, n_max, 3), dtype=np.float32)
        tokens = np.zeros((b, n_max, 3), dtype=np.int64)
        mask = np.zeros((b, n_max), dtype=bool)
        for i, (p, f) in enumerate(zip(pep, frame)):
            n = self.n_atoms[p]
            x = self._positions[p][f].astype(np.float32)
            positions[i, :n] = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
            tokens[i, :n] = self._tokens[p]
            mask[i, :n] = True
        return FrameBatch(positions, tokens, mask, pep, frame)


def estimate_length_scale(trajectories: Sequence[Any]) -> float:
    """RMS (nm) of the centred coordinates over all frames, atoms and axes of all peptides.

    Dividing by it gives data with RMS ~1 per internal degree of freedom, comparable to the unit prior.
    """
    total, count = 0.0, 0
    for traj in trajectories:
        pos = np.asarray(traj.positions, dtype=np.float64)
        pos = pos - pos.mean(axis=1, keepdims=True)
        total += float(np.square(pos).sum())
        count += pos.size
    if count == 0 or total <= 0:
        raise ValueError("Cannot estimate a length scale from empty or collapsed data; set length_scale.")
    return math.sqrt(total / count)


@dataclass
class TrainingBatch:
    """Tensors of one flow-matching step (CPU, float32 / int64 / bool), internal units."""

    x0: torch.Tensor
    x1: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> TrainingBatch:
        return TrainingBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def make_training_batch(
    sampler: PeptideBatchSampler,
    config: TrainingConfig,
    length_scale: float,
    generator: torch.Generator,
) -> TrainingBatch:
    """Draw data frames, prior samples, times and noise for one step, coupled as ``config.coupling`` says.

    The draws happen in a fixed order (frames from the sampler's numpy generator; rotations, prior, times,
    noise from ``generator``) so that a resumed run reproduces the same batches.
    """
    frames = sampler.sample()
    mask = torch.from_numpy(frames.mask)
    x1 = torch.from_numpy(frames.positions) / length_scale
    b = x1.shape[0]
    if config.augment_rotations:
        rot = random_rotations(b, generator=generator)
        x1 = torch.einsum("bij,bnj->bni", rot, x1)
    x1 = masked_center(x1, mask)
    x0 = sample_mean_free_gaussian(mask, config.prior_std, generator=generator)
    t = torch.rand(b, generator=generator, dtype=torch.float32)
    eps = sample_mean_free_gaussian(mask, 1.0, generator=generator)
    if config.coupling == "ot":
        x0_np, x1_np = x0.numpy(), x1.numpy()
        aligned = np.zeros_like(x0_np)
        for i in range(b):
            n = int(sampler.n_atoms[frames.peptide_index[i]])
            groups = sampler.groups[frames.peptide_index[i]]
            aligned[i, :n] = equivariant_ot_coupling(x0_np[i, :n], x1_np[i, :n], groups, config.ot_iterations)[0]
        x0 = masked_center(torch.from_numpy(aligned), mask)  # removes the rounding-level mean only
    return TrainingBatch(x0=x0, x1=x1, t=t, eps=eps, tokens=torch.from_numpy(frames.tokens), mask=mask)


def flow_matching_loss(
    vector_field: torch.nn.Module, batch: TrainingBatch, sigma: float
) -> torch.Tensor:
    """Conditional flow-matching loss: mean squared error over real atoms and axes.

    ``x_t = (1 - t) x0 + t x1 + sigma eps`` and target ``x1 - x0``; padding is masked out.
    """
    t = batch.t.view(-1, 1, 1)
    xt = (1 - t) * batch.x0 + t * batch.x1 + sigma * batch.eps
    target = batch.x1 - batch.x0
    v = vector_field(batch.t, xt, batch.tokens, batch.mask)
    m = batch.mask.to(v.dtype)
    se = ((v - target) ** 2).sum(-1) * m
    return se.sum() / (3.0 * m.sum())
