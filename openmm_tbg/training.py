"""Conditional flow matching for the transferable flow (``openmm-tbg train``).

Trains the EGNN vector field of a :class:`~openmm_tbg.flow.TransferableFlow` on mixed-peptide batches of MD
frames by conditional flow matching (Lipman et al. 2023; Tong et al. 2023; Klein, Kraemer and Noe 2023):

    x_t = (1 - t) x0 + t x1 + sigma eps,    target u_t = x1 - x0,    loss = |v(t, x_t) - u_t|^2 (real atoms)

with x0 drawn from the flow's mean-free Gaussian prior and x1 a centred data frame in internal units
(nm / ``length_scale``). Two couplings of x0 and x1 are available: ``"independent"`` (TBG's choice for
dipeptides) and ``"ot"``, the equivariant optimal-transport coupling that permutes the prior sample within each
group of interchangeable atoms (Hungarian algorithm) and then rotates it onto the data frame (Kabsch), which
straightens the learned paths.

Checkpoints are written with :func:`openmm_tbg.checkpoint.save_model`; next to the model a resume file
``<out>.resume.pt`` holds the optimizer, schedule, EMA, RNG states and step so that an interrupted run
continues exactly (bit-for-bit on CPU). Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
:class:`torch.nn.parallel.DistributedDataParallel`; each rank draws its own batches and only rank 0 writes files.

Command line::

    openmm-tbg train --data DIR --out model.pt --steps 20000 --batch-size 32 --layers 5 --hidden 64 --coupling ot
    torchrun --nproc_per_node 4 -m openmm_tbg.cli train --data DIR --out model.pt ...   # 4 GPUs
    openmm-tbg train --data DIR --out model.pt --resume                                 # continue exactly
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

COUPLINGS = ("independent", "ot")
RESUME_FORMAT = "openmm_tbg.training_resume"
RESUME_FORMAT_VERSION = 1

# Config fields that may differ between a run and its resumption (they do not change the trajectory of the
# optimisation, except ``steps``, which stretches the learning-rate schedule and is warned about).
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "device", "log_every")


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainingConfig:
    """Hyper-parameters of a flow-matching run.

    Attributes
    ----------
    n_layers, hidden : int
        EGNN depth and width (TBG: 9 x 128 for dipeptides, 5 x 64 for alanine dipeptide).
    attention : bool
        Attention gates on the EGNN messages.
    max_residues : int or None
        Size of the residue-index one-hot; ``None`` = the largest peptide in the training data.
    length_scale : float or None
        nm per internal unit; ``None`` estimates it from the data as the RMS of the centred coordinates, so
        that the data have RMS ~1 internally, like the unit-variance prior.
    prior_std : float
        Standard deviation of the mean-free Gaussian prior, internal units.
    batch_size : int
        Frames per optimisation step (per process under DDP).
    lr : float
        Peak learning rate of AdamW.
    steps : int
        Total number of optimisation steps.
    warmup_steps : int
        Linear warm-up from ``lr / warmup_steps`` to ``lr``; afterwards cosine decay to ``lr * min_lr_factor``.
    min_lr_factor : float
        Final learning rate as a fraction of ``lr``.
    weight_decay : float
        AdamW decoupled weight decay.
    grad_clip : float
        Maximum global gradient norm; 0 disables clipping.
    ema_decay : float
        Decay of the exponential moving average of the weights; 0 disables it. When enabled, the saved
        model carries the EMA weights.
    coupling : str
        ``"independent"`` or ``"ot"`` (equivariant optimal transport per sample).
    ot_iterations : int
        Rounds of (Hungarian permutation, Kabsch rotation) in the OT coupling; each round cannot increase the
        transport cost.
    sigma : float
        Width of the conditional probability path, internal units (TBG: 0.01).
    augment_rotations : bool
        Rotate every data frame by a uniformly random proper rotation.
    seed : int
        Seed of all random draws (rank ``r`` of a DDP run uses ``seed + r``).
    checkpoint_every : int
        Write the model and the resume file every this many steps (and at the end); 0 = only at the end.
    log_every : int
        Log the mean loss every this many steps.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """

    n_layers: int = 5
    hidden: int = 64
    attention: bool = True
    max_residues: int | None = None
    length_scale: float | None = None
    prior_std: float = 1.0
    batch_size: int = 32
    lr: float = 5e-4
    steps: int = 10000
    warmup_steps: int = 200
    min_lr_factor: float = 0.01
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    coupling: str = "independent"
    ot_iterations: int = 1
    sigma: float = 0.01
    augment_rotations: bool = True
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 100
    device: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first invalid field and the valid range."""
        positive_ints = ("n_layers", "hidden", "batch_size", "steps", "ot_iterations", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainingConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainingConfig.{name} must be a non-negative integer, got {value!r}.")
        if self.max_residues is not None and self.max_residues < 1:
            raise ValueError(f"TrainingConfig.max_residues must be None or >= 1, got {self.max_residues!r}.")
        if self.length_scale is not None and not (self.length_scale > 0 and math.isfinite(self.length_scale)):
            raise ValueError(
                f"TrainingConfig.length_scale must be a positive number of nm (or None to estimate it from the "
                f"data), got {self.length_scale!r}."
            )
        for name in ("lr", "prior_std"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"TrainingConfig.{name} must be positive and finite, got {value!r}.")
        for name in ("weight_decay", "grad_clip", "sigma"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"TrainingConfig.{name} must be >= 0 and finite, got {value!r}.")
        if not 0.0 <= self.min_lr_factor <= 1.0:
            raise ValueError(f"TrainingConfig.min_lr_factor must lie in [0, 1], got {self.min_lr_factor!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(
                f"TrainingConfig.ema_decay must lie in [0, 1) (0 turns the EMA off), got {self.ema_decay!r}."
            )
        if self.coupling not in COUPLINGS:
            raise ValueError(
                f"Unknown coupling {self.coupling!r}; use one of {', '.join(repr(c) for c in COUPLINGS)}."
            )
        _resolve_device(self.device, check_only=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise :class:`ValueError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown TrainingConfig field(s) {unknown}; valid fields are {sorted(known)}. The file was "
                "probably written by a newer openmm_tbg."
            )
        return cls(**values)


def lr_factor(step: int, config: TrainingConfig) -> float:
    """Learning-rate multiplier at optimisation step ``step`` (0-based): linear warm-up, then cosine decay.

    Parameters
    ----------
    step : int
        Number of optimiser steps already taken.
    config : TrainingConfig
        Supplies ``warmup_steps``, ``steps`` and ``min_lr_factor``.
    """
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(config.steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_factor + (1.0 - config.min_lr_factor) * cosine


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers: priors, rotations, couplings
# ----------------------------------------------------------------------------------------------------------
def masked_center(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract the plain mean over real atoms and zero the padding.

    Parameters
    ----------
    x : torch.Tensor
        (B, N, 3) coordinates.
    mask : torch.Tensor
        (B, N) bool, True for real atoms.
    """
    m = mask.to(x.dtype).unsqueeze(-1)
    mean = (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (x - mean) * m


def sample_mean_free_gaussian(
    mask: torch.Tensor, std: float = 1.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Isotropic Gaussian on the mean-free subspace of the real atoms (the flow's prior), zero at padding.

    Parameters
    ----------
    mask : torch.Tensor
        (B, N) bool, True for real atoms.
    std : float
        Standard deviation per internal degree of freedom.
    generator : torch.Generator, optional
        Source of randomness (CPU generator; the result is on CPU).
    """
    z = torch.randn(mask.shape + (3,), generator=generator, dtype=torch.float32) * std
    return masked_center(z, mask.cpu())


def random_rotations(n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` uniformly distributed proper rotation matrices (n, 3, 3), from normalised Gaussian quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=1,
    ).reshape(n, 3, 3)
    return rot.to(torch.float32)


def kabsch_rotation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Proper rotation ``R`` (det +1) minimising ``sum_i |R x_i - y_i|^2`` for centred point sets.

    Reflections are excluded: when the best orthogonal map is improper, the smallest singular direction is
    flipped (Kabsch 1976), so the returned matrix never mirrors (mirroring would change chirality).

    Parameters
    ----------
    x, y : numpy.ndarray
        (n, 3) centred coordinates.

    Returns
    -------
    numpy.ndarray
        (3, 3) rotation; the aligned points are ``x @ R.T``.
    """
    h = x.astype(np.float64).T @ y.astype(np.float64)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    d = 1.0 if d == 0 else d
    return vt.T @ np.diag([1.0, 1.0, d]) @ u.T


def equivariant_ot_coupling(
    x0: np.ndarray, x1: np.ndarray, groups: Sequence[np.ndarray], n_iterations: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equivariant optimal-transport alignment of one prior sample to one data frame.

    Permutes ``x0``'s atoms within each group of interchangeable atoms to minimise the summed squared
    distance to ``x1`` (``scipy.optimize.linear_sum_assignment``), then rotates it onto ``x1`` (Kabsch, proper
    rotations only). Because the prior is invariant under these permutations and rotations, the permuted and
    rotated sample is still a prior sample; only its pairing with ``x1`` changes.

    Parameters
    ----------
    x0, x1 : numpy.ndarray
        (n, 3) centred coordinates (internal units) of the prior sample and of the data frame.
    groups : sequence of numpy.ndarray
        Index arrays of interchangeable atoms (``AtomEncoding.interchangeable_groups()``).
    n_iterations : int
        Rounds of (permutation, rotation).

    Returns
    -------
    aligned : numpy.ndarray
        (n, 3) ``x0[perm] @ rotation.T``.
    perm : numpy.ndarray
        (n,) int permutation applied to ``x0``'s atoms (it maps only within groups).
    rotation : numpy.ndarray
        (3, 3) proper rotation.
    """
    n = x0.shape[0]
    if x1.shape != x0.shape:
        raise ValueError(f"x0 {x0.shape} and x1 {x1.shape} must have the same shape (n_atoms, 3).")
    x0 = x0.astype(np.float64)
    x1 = x1.astype(np.float64)
    perm = np.arange(n)
    rotation = np.eye(3)
    for _ in range(n_iterations):
        rotated = x0 @ rotation.T
        for g in groups:
            diff = x1[g][:, None, :] - rotated[g][None, :, :]
            cost = np.einsum("ijk,ijk->ij", diff, diff)  # cost[i, j]: data atom g[i] <- prior atom g[j]
            rows, cols = linear_sum_assignment(cost)
            perm[g[rows]] = g[cols]
        rotation = kabsch_rotation(x0[perm], x1)
    return x0[perm] @ rotation.T, perm, rotation


# ----------------------------------------------------------------------------------------------------------
# Mixed-peptide batches
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# EMA, devices, distributed
# ----------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


def _resolve_device(device: str, check_only: bool = False) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Invalid device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if dev.type == "cuda" and not check_only and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available; use --device cpu or auto.")
    return dev


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_pref: str) -> tuple[_Dist, torch.device]:
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE > 1); otherwise single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _resolve_device(device_pref)
    if world <= 1:
        return _Dist(), device
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    info = _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                 created_group=created)
    return info, device


def _hardware(device: torch.device, world_size: int) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "world_size": world_size,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------------------------------------
# Data-set guard and loading
# ----------------------------------------------------------------------------------------------------------
class TestSplitError(ValueError):
    """Raised when training data include peptides of the data set's held-out test split."""

    __test__ = False  # not a pytest test class


def check_not_test_split(names: Sequence[str], data_dir: str | os.PathLike | None) -> None:
    """Refuse peptide ``names`` that belong to the test split of ``data_dir`` (when it has a splits.json).

    Raises
    ------
    TestSplitError
        Naming the offending peptides.
    """
    if data_dir is None:
        return
    if not os.path.exists(os.path.join(os.fspath(data_dir), "splits.json")):
        logger.info("%s has no splits.json; the test split cannot be checked.", data_dir)
        return
    from openmm_tbg.data import read_splits

    test = set(read_splits(data_dir).get("test", []))
    bad = sorted(set(names) & test)
    if bad:
        raise TestSplitError(
            f"Refusing to train on {len(bad)} peptide(s) of the held-out test split of {data_dir}: "
            f"{', '.join(bad)}. Train on the 'train' split (--split train) and drop these names from --peptides."
        )


def load_training_data(
    directory: str | os.PathLike,
    split: str | None = "train",
    names: Sequence[str] | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    progress: bool = True,
) -> list[Any]:
    """Load training trajectories with :func:`openmm_tbg.data.load_dataset`, refusing the test split.

    Parameters
    ----------
    directory : path
        Data-set directory (``XY.pdb`` + ``XY.npz`` + optional ``splits.json``).
    split : str or None
        ``"train"`` (default) or ``None`` for all peptides; ``"test"`` is refused, and so is any test-split
        peptide.
    names : sequence of str, optional
        Restrict to these peptides (which must lie in ``split`` when one is given).
    stride, max_frames : int
        Passed to ``load_dataset``.
    """
    if split == "test":
        raise TestSplitError("Refusing to train on the 'test' split; use --split train.")
    from openmm_tbg.data import load_dataset

    if names is not None:
        check_not_test_split(names, directory)
        if split is not None and os.path.exists(os.path.join(os.fspath(directory), "splits.json")):
            from openmm_tbg.data import read_splits

            outside = sorted(set(names) - set(read_splits(directory).get(split, [])))
            if outside:
                raise ValueError(f"Peptides {outside} are not in the {split!r} split of {directory}; drop them "
                                 "from --peptides (or pass --split all to allow any non-test peptide).")
    trajectories = load_dataset(directory, split=split, names=None if names is None else list(names),
                                stride=stride, max_frames=max_frames, progress=progress)
    check_not_test_split([t.name for t in trajectories], directory)
    return trajectories


# ----------------------------------------------------------------------------------------------------------
# Model construction and checkpoints
# ----------------------------------------------------------------------------------------------------------
def build_flow(config: TrainingConfig, length_scale: float, max_residues: int):
    """A fresh :class:`TransferableFlow` with an EGNN vector field of the configured size."""
    from openmm_tbg.flow import TransferableFlow
    from openmm_tbg.nn.egnn import EGNNVectorField

    vf = EGNNVectorField(n_layers=config.n_layers, hidden=config.hidden, max_residues=max_residues,
                         attention=config.attention)
    return TransferableFlow(vf, length_scale=length_scale, prior_std=config.prior_std)


def resume_path(out: str | os.PathLike) -> str:
    """Path of the resume file that belongs to model file ``out``."""
    return os.fspath(out) + ".resume.pt"


def _subsample(values: Sequence[float], max_points: int = 2000) -> dict[str, list]:
    """Loss history thinned to at most ``max_points`` block means, with the step at each block's end."""
    n = len(values)
    if n == 0:
        return {"step": [], "loss": []}
    block = max(1, math.ceil(n / max_points))
    arr = np.asarray(values, dtype=np.float64)
    ends = list(range(block, n + 1, block))
    if not ends or ends[-1] != n:
        ends.append(n)
    starts = [0] + ends[:-1]
    return {"step": ends, "loss": [float(arr[s:e].mean()) for s, e in zip(starts, ends)], "block": block}


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_generators(seed: int, rank: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """Independent numpy (frame selection) and torch (prior, times, noise, rotations) generators of one rank.

    Every rank of a DDP run gets its own streams, so the ranks draw different batches.
    """
    seq = np.random.SeedSequence([int(seed), int(rank)])
    np_seed, torch_seed = seq.spawn(2)
    return (np.random.default_rng(np_seed),
            torch.Generator().manual_seed(int(torch_seed.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))))


def _load_resume_file(path: str) -> Any:
    # weights_only: tensors, dicts, lists and ints only, so that a foreign file cannot run code.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(
            f"Cannot read the resume file {path} ({type(err).__name__}: {err}); it is corrupt or not an "
            "openmm_tbg resume file. Delete it to start afresh, or pick another --out."
        ) from err


def _collect_rng_states(np_rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
    return {
        "numpy": np_rng.bit_generator.state,
        "torch_generator": gen.get_state(),
        "torch_global": torch.get_rng_state(),
        "python": random.getstate(),
    }


def _restore_rng_states(state: dict[str, Any], np_rng: np.random.Generator, gen: torch.Generator) -> None:
    np_rng.bit_generator.state = state["numpy"]
    gen.set_state(state["torch_generator"])
    torch.set_rng_state(state["torch_global"])
    random.setstate(state["python"])


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainingResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    flow : TransferableFlow
        The trained flow (EMA weights when ``ema_decay > 0``), on CPU, in eval mode.
    losses : numpy.ndarray
        Loss of every step from step 1 (including steps before a resume), float64.
    step : int
        Number of optimisation steps taken in all.
    wall_time_s : float
        Training wall time in all (including previous runs of a resumed training).
    model_path : str or None
        Path of the saved model (rank 0), None on other ranks.
    sha256 : str or None
        sha256 of the saved model file.
    """

    flow: Any
    losses: np.ndarray
    step: int
    wall_time_s: float
    model_path: str | None = None
    sha256: str | None = None
    config: TrainingConfig = field(default_factory=TrainingConfig)


def _check_resume_compatible(saved: TrainingConfig, given: TrainingConfig) -> TrainingConfig:
    """Config to continue with: the saved one, plus the allowed changes from ``given``."""
    saved_d, given_d = saved.to_dict(), given.to_dict()
    diffs = [k for k in saved_d if k not in _RESUMABLE_CHANGES and saved_d[k] != given_d[k]]
    # An estimated length scale is resolved in the saved config; None in the given one means "estimate".
    diffs = [k for k in diffs if not (k in ("length_scale", "max_residues") and given_d[k] is None)]
    if diffs:
        detail = ", ".join(f"{k}: saved {saved_d[k]!r} vs given {given_d[k]!r}" for k in diffs)
        raise ValueError(
            f"Cannot resume: the configuration differs from the interrupted run ({detail}). Resume with the "
            "same settings, or start a new run without --resume."
        )
    merged = dict(saved_d)
    for k in _RESUMABLE_CHANGES:
        merged[k] = given_d[k]
    if merged["steps"] != saved_d["steps"] and int(os.environ.get("RANK", "0")) == 0:
        logger.warning("Resuming with steps=%d instead of %d: the cosine learning-rate schedule changes.",
                       merged["steps"], saved_d["steps"])
    return TrainingConfig.from_dict(merged)


def train(
    trajectories: Sequence[Any],
    out: str | os.PathLike,
    config: TrainingConfig | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    until_step: int | None = None,
    progress: bool = True,
    command_line: str | None = None,
    init_from: str | os.PathLike | None = None,
) -> TrainingResult:
    """Train a transferable flow by conditional flow matching.

    Parameters
    ----------
    trajectories : sequence of PeptideTrajectory
        Training peptides (the train split). Names in the test split of ``data_dir`` are refused.
    out : path
        Model file (:func:`openmm_tbg.checkpoint.save_model` format); the resume file is ``<out>.resume.pt``.
    config : TrainingConfig, optional
        Hyper-parameters; defaults to ``TrainingConfig()``.
    data_dir : path, optional
        Directory the data came from; recorded in the metadata and used to refuse test-split peptides
        (its ``splits.json``).
    resume : bool
        Continue from ``<out>.resume.pt`` when it exists (exactly: same batches, same weights). The saved
        configuration is used; only ``steps``, ``checkpoint_every``, ``log_every`` and ``device`` may change.
    until_step : int, optional
        Stop after this many steps in all (and write a checkpoint), e.g. to split a long run into jobs of a
        batch queue; ``resume=True`` continues it. Defaults to ``config.steps``.
    progress : bool
        Show a tqdm bar with the loss (rank 0 only).
    command_line : str, optional
        Recorded in the metadata; defaults to ``sys.argv``.
    init_from : path, optional
        A model file (:func:`openmm_tbg.checkpoint.load_model` format) whose weights start this run: to train
        a shipped model further, or to fine-tune it on your own peptides. Its architecture, length scale and
        prior replace those of ``config``; the optimiser, schedule and EMA start fresh. Ignored when
        ``resume`` finds a resume file (that already holds the weights). The parent's sha256, steps and wall
        time are recorded in the metadata.

    Returns
    -------
    TrainingResult
    """
    from openmm_tbg.checkpoint import save_model

    config = copy.deepcopy(config) if config is not None else TrainingConfig()
    config.validate()
    out = os.fspath(out)
    names = [t.name for t in trajectories]
    check_not_test_split(names, data_dir)
    command_line = command_line if command_line is not None else shlex.join(sys.argv)
    dist_info, device = _setup_distributed(config.device)
    rpath = resume_path(out)

    state = None
    if resume and os.path.exists(rpath):
        state = _load_resume_file(rpath)
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise ValueError(f"{rpath} is not an openmm_tbg training resume file; delete it or pick another --out.")
        if state.get("format_version") != RESUME_FORMAT_VERSION:
            raise ValueError(f"{rpath} has resume format version {state.get('format_version')}, this openmm_tbg "
                             f"reads version {RESUME_FORMAT_VERSION}; start a new run.")
        if sorted(state["peptides"]) != sorted(names):
            missing = sorted(set(state["peptides"]) - set(names))
            extra = sorted(set(names) - set(state["peptides"]))
            raise ValueError(f"Cannot resume {rpath}: the training peptides differ (missing {missing}, extra "
                             f"{extra}). Load the same peptides as the interrupted run.")
        if state["world_size"] != dist_info.world_size:
            raise ValueError(f"Cannot resume {rpath} exactly: it was written by {state['world_size']} process(es), "
                             f"this run has {dist_info.world_size}. Launch with the same number of processes.")
        config = _check_resume_compatible(TrainingConfig.from_dict(state["config"]), config)
        # The peptide order fixes which index the batch sampler draws; keep the saved order.
        by_name = {t.name: t for t in trajectories}
        trajectories = [by_name[n] for n in state["peptides"]]
        names = list(state["peptides"])
        if dist_info.is_main:
            logger.info("Resuming %s at step %d of %d.", out, state["step"], config.steps)
    elif resume:
        logger.info("No resume file %s; starting a new run.", rpath)

    parent = state.get("init_from") if state is not None else None
    init_state = None
    if state is None and init_from is not None:
        parent, init_state = _load_parent(init_from, config, trajectories)
        if dist_info.is_main:
            logger.info("Starting from %s (sha256 %s..., %s steps).", parent["path"], parent["sha256"][:12],
                        parent["steps"])

    if config.length_scale is None:
        config.length_scale = estimate_length_scale(trajectories)
        if dist_info.is_main:
            logger.info("Estimated length scale %.4f nm (RMS of centred coordinates).", config.length_scale)
    if config.max_residues is None:
        config.max_residues = max(int(t.encoding.n_residues) for t in trajectories)

    until = config.steps if until_step is None else min(int(until_step), config.steps)
    np_rng, gen = make_generators(config.seed, dist_info.rank)
    sampler = PeptideBatchSampler(trajectories, config.batch_size, np_rng)

    # Identical initial weights on every rank, without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        flow = build_flow(config, config.length_scale, config.max_residues)
    if init_state is not None:
        flow.vector_field.load_state_dict(init_state)
    vector_field = flow.vector_field.to(device)
    optimizer = torch.optim.AdamW(vector_field.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    ema = EMA(vector_field, config.ema_decay) if config.ema_decay > 0 else None
    losses: list[float] = []
    step = 0
    wall_before = 0.0
    if state is not None:
        vector_field.load_state_dict(state["vector_field"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        _restore_rng_states(state["rng"][dist_info.rank], np_rng, gen)
        losses = list(state["losses"])
        step = int(state["step"])
        wall_before = float(state["wall_time_s"])

    model = vector_field
    if dist_info.active:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a vector field may own parameters that do not reach its output (the EGNN's
        # last node update); without it DDP stops with "Expected to have finished reduction".
        model = DistributedDataParallel(
            vector_field, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    model.train()

    hardware = _hardware(device, dist_info.world_size)
    t_start = time.perf_counter()
    model_path, sha = None, None

    def checkpoint() -> tuple[str | None, str | None]:
        wall = wall_before + time.perf_counter() - t_start
        rng_states = [_collect_rng_states(np_rng, gen)]
        if dist_info.active:
            import torch.distributed as dist

            gathered: list[Any] = [None] * dist_info.world_size
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if not dist_info.is_main:
            return None, None
        saved_flow = _flow_for_saving(flow, vector_field, ema)
        metadata = {
            "training": {
                "data_dir": None if data_dir is None else os.path.abspath(os.fspath(data_dir)),
                "peptides": sorted(names),
                "n_peptides": len(names),
                "frames": int(sampler.n_frames.sum()),
                "steps": step,
                "losses": _subsample(losses),
                "final_loss_mean_100": float(np.mean(losses[-100:])) if losses else None,
                "wall_time_s": wall,
                "hardware": hardware,
                "config": config.to_dict(),
                "ema_weights": ema is not None,
                "command_line": command_line,
                "init_from": parent,
            }
        }
        digest = save_model(saved_flow, out, metadata=metadata)
        _atomic_torch_save(
            {
                "format": RESUME_FORMAT,
                "format_version": RESUME_FORMAT_VERSION,
                "step": step,
                "config": config.to_dict(),
                "peptides": names,
                "world_size": dist_info.world_size,
                "vector_field": {k: v.detach().cpu() for k, v in vector_field.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": None if ema is None else {k: v.cpu() for k, v in ema.state_dict().items()},
                "rng": rng_states,
                "losses": losses,
                "wall_time_s": wall,
                "model_sha256": digest,
                "init_from": parent,
            },
            rpath,
        )
        logger.info("Checkpoint at step %d: %s (sha256 %s).", step, out, digest[:12])
        return out, digest

    bar = None
    if progress and dist_info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=until, initial=step, desc="flow matching", unit="step", dynamic_ncols=True)
    smoothed = None
    try:
        while step < until:
            batch = make_training_batch(sampler, config, config.length_scale, gen).to(device)
            loss = flow_matching_loss(model, batch, config.sigma)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Non-finite flow-matching loss at step {step + 1}; lower --lr, raise --warmup or enable "
                    "gradient clipping (--grad-clip)."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(vector_field.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(vector_field)
            value = loss.detach()
            if dist_info.active:
                import torch.distributed as dist

                dist.all_reduce(value)
                value = value / dist_info.world_size
            value = float(value.cpu())
            losses.append(value)
            step += 1
            smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            if dist_info.is_main and step % config.log_every == 0:
                logger.info("step %d: mean loss %.5f over the last %d steps", step,
                            float(np.mean(losses[-config.log_every:])), config.log_every)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < until:
                checkpoint()
        model_path, sha = checkpoint()
    finally:
        if bar is not None:
            bar.close()
        if dist_info.created_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()

    result_flow = _flow_for_saving(flow, vector_field, ema).cpu().eval()
    return TrainingResult(
        flow=result_flow,
        losses=np.asarray(losses, dtype=np.float64),
        step=step,
        wall_time_s=wall_before + time.perf_counter() - t_start,
        model_path=model_path,
        sha256=sha,
        config=config,
    )


def _load_parent(path: str | os.PathLike, config: TrainingConfig,
                 trajectories: Sequence[Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load the model that starts a run; adopt its architecture into ``config`` (in place).

    Returns the parent's description for the metadata and its vector-field weights.
    """
    from openmm_tbg.checkpoint import load_model

    path = os.fspath(path)
    parent_flow = load_model(path)  # CheckpointError names a missing, corrupt or incompatible file
    vf_config = getattr(parent_flow.vector_field, "config", None)
    if not isinstance(vf_config, dict) or "n_layers" not in vf_config:
        raise ValueError(f"{path} does not hold an EGNN vector field; only EGNN models can be trained further.")
    needed = max(int(t.encoding.n_residues) for t in trajectories)
    if needed > vf_config["max_residues"]:
        raise ValueError(f"{path} encodes at most {vf_config['max_residues']} residues, but the training data "
                         f"has peptides of {needed}; train a new model instead of starting from this one.")
    adopted = {"n_layers": vf_config["n_layers"], "hidden": vf_config["hidden"],
               "attention": vf_config["attention"], "max_residues": vf_config["max_residues"],
               "length_scale": parent_flow.length_scale, "prior_std": parent_flow.prior_std}
    changed = {k: (getattr(config, k), v) for k, v in adopted.items()
               if getattr(config, k) is not None and getattr(config, k) != v}
    if changed:
        logger.info("Adopting the architecture of %s: %s.", path,
                    ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    for k, v in adopted.items():
        setattr(config, k, v)
    training = (parent_flow.checkpoint_metadata or {}).get("training") or {}
    parent = {
        "path": parent_flow.checkpoint_path,
        "sha256": parent_flow.checkpoint_sha256,
        "steps": training.get("steps"),
        "wall_time_s": training.get("wall_time_s"),
        "init_from": training.get("init_from"),
        "upgraded_from": (parent_flow.checkpoint_metadata or {}).get("upgraded_from"),
    }
    return parent, {k: v.detach().clone() for k, v in parent_flow.vector_field.state_dict().items()}


def _flow_for_saving(flow: torch.nn.Module, vector_field: torch.nn.Module, ema: EMA | None) -> torch.nn.Module:
    """A CPU copy of the flow carrying the EMA weights when enabled (the training copy is left untouched)."""
    saved = copy.deepcopy(flow).cpu()
    if ema is not None:
        saved.vector_field.load_state_dict({k: v.cpu() for k, v in ema.state_dict().items()})
    return saved


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
_CLI_TO_CONFIG = {
    "steps": "steps", "batch_size": "batch_size", "layers": "n_layers", "hidden": "hidden", "lr": "lr",
    "coupling": "coupling", "device": "device", "seed": "seed", "checkpoint_every": "checkpoint_every",
    "warmup": "warmup_steps", "weight_decay": "weight_decay", "grad_clip": "grad_clip", "ema_decay": "ema_decay",
    "sigma": "sigma", "length_scale": "length_scale", "ot_iterations": "ot_iterations", "log_every": "log_every",
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``openmm-tbg train`` options to ``parser``."""
    d = TrainingConfig()
    parser.description = "Train a transferable Boltzmann generator by conditional flow matching."
    parser.add_argument("--data", required=True, help="data-set directory (XY.pdb + XY.npz [+ splits.json])")
    parser.add_argument("--split", default="train",
                        help="split to train on (default: train; 'all' = every non-test peptide; 'test' is refused)")
    parser.add_argument("--peptides", nargs="+", default=None, metavar="XY",
                        help="train only on these peptides (within --split)")
    parser.add_argument("--out", required=True, help="model file to write (the resume file is <out>.resume.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>.resume.pt if it exists")
    parser.add_argument("--init-from", default=None, metavar="MODEL",
                        help="start from this model's weights ('default' = the shipped model): train it further, or "
                             "fine-tune it on your own peptides; its architecture and length scale are kept, the "
                             "optimiser starts fresh")
    parser.add_argument("--stride", type=int, default=1, help="use every K-th frame (default: 1)")
    parser.add_argument("--max-frames", type=int, default=None, help="at most M frames per peptide")
    parser.add_argument("--until-step", type=int, default=None,
                        help="stop after this many steps in all (continue later with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Config options default to None: unset options come from the resume file or TrainingConfig's defaults.
    parser.add_argument("--steps", type=int, default=None, help=f"optimisation steps (default: {d.steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"frames per step (default: {d.batch_size})")
    parser.add_argument("--layers", type=int, default=None, help=f"EGNN layers (default: {d.n_layers})")
    parser.add_argument("--hidden", type=int, default=None, help=f"EGNN width (default: {d.hidden})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {d.lr})")
    parser.add_argument("--warmup", type=int, default=None, help=f"warm-up steps (default: {d.warmup_steps})")
    parser.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay ({d.weight_decay})")
    parser.add_argument("--grad-clip", type=float, default=None, help=f"max gradient norm, 0 = off ({d.grad_clip})")
    parser.add_argument("--ema-decay", type=float, default=None, help=f"EMA decay, 0 = off ({d.ema_decay})")
    parser.add_argument("--coupling", choices=COUPLINGS, default=None, help=f"x0-x1 coupling ({d.coupling})")
    parser.add_argument("--ot-iterations", type=int, default=None, help=f"OT rounds ({d.ot_iterations})")
    parser.add_argument("--sigma", type=float, default=None, help=f"path width, internal units ({d.sigma})")
    parser.add_argument("--length-scale", type=float, default=None,
                        help="nm per internal unit (default: RMS of the centred training coordinates)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=None, help=f"random seed ({d.seed})")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help=f"checkpoint interval in steps, 0 = only at the end ({d.checkpoint_every})")
    parser.add_argument("--log-every", type=int, default=None, help=f"log interval in steps ({d.log_every})")


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """TrainingConfig from parsed CLI options; with ``--resume`` unset options come from the resume file."""
    base = TrainingConfig()
    rpath = resume_path(args.out)
    if args.resume and os.path.exists(rpath):
        saved = _load_resume_file(rpath)
        if isinstance(saved, dict) and saved.get("format") == RESUME_FORMAT:
            base = TrainingConfig.from_dict(saved["config"])
    values = base.to_dict()
    for arg, key in _CLI_TO_CONFIG.items():
        given = getattr(args, arg, None)
        if given is not None:
            values[key] = given
    return TrainingConfig.from_dict(values)


def run_from_cli(args: argparse.Namespace) -> int:
    """Entry point of ``openmm-tbg train``; returns the process exit code."""
    if args.init_from == "default":
        from openmm_tbg.checkpoint import DEFAULT_MODEL_PATH

        args.init_from = str(DEFAULT_MODEL_PATH)
    if args.init_from is not None:
        fixed = (("--layers", "layers"), ("--hidden", "hidden"), ("--length-scale", "length_scale"))
        clash = [opt for opt, arg in fixed if getattr(args, arg, None) is not None]
        if clash:
            raise SystemExit(f"openmm-tbg train: {', '.join(clash)} cannot be combined with --init-from, whose model "
                             "fixes the architecture and length scale; drop them.")
    config = config_from_args(args)
    progress = not args.no_progress
    split = None if args.split in ("", "none", "all") else args.split
    main_rank = int(os.environ.get("RANK", "0")) == 0
    trajectories = load_training_data(args.data, split=split, names=args.peptides, stride=args.stride,
                                      max_frames=args.max_frames, progress=progress and main_rank)
    result = train(trajectories, args.out, config, data_dir=args.data, resume=args.resume,
                   until_step=args.until_step, progress=progress, init_from=args.init_from)
    if result.model_path is not None:
        tail = result.losses[-min(100, len(result.losses)):]
        print(f"Wrote {result.model_path} (sha256 {result.sha256}) after {result.step} steps, "
              f"{result.wall_time_s:.0f} s; mean loss of the last {len(tail)} steps {tail.mean():.4f}.")
    return 0
