"""Hyper-parameters of a flow-matching run (:class:`TrainingConfig`) and its learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..utils import resolve_device

COUPLINGS = ("independent", "ot")


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
    family : str
        Model family (`openmm_tbg.model.FAMILIES`; default ``"internal-coordinate"``, the family the sampler
        loads by default; a run with ``init_from`` takes its parent's): ``"egnn-cnf"`` trains by flow matching,
        ``"internal-coordinate"`` by maximum likelihood (`openmm_tbg.training.likelihood`). ``hidden`` is the
        width of either; the flow-matching fields (``n_layers``, ``coupling``, ``sigma``, ``length_scale``,
        ...) apply to the CNF only, the next four to the internal-coordinate flow only.
    rounds : int
        Internal-coordinate flow: coupling rounds (four coupling layers each).
    blocks : int
        Internal-coordinate flow: transformer blocks per coupling layer.
    bins : int
        Internal-coordinate flow: rational-quadratic spline bins.
    peptides_per_batch : int
        Internal-coordinate flow: distinct peptides per batch (its frames are padded into one tensor).
    narrow_dihedrals : str
        Internal-coordinate flow: ``"wrapped"`` or ``"atanh"`` whitening of narrow dihedrals
        (`openmm_tbg.icflow.InternalCoordinateFlow`).
    whitening : str
        Internal-coordinate flow: where the bond and angle whitening comes from, ``"md"`` (mean and standard
        deviation of the training frames) or ``"force-field"`` (equilibrium value and ``sqrt(kT/k)`` of the
        amber14-all harmonic terms at 310 K); `openmm_tbg.training.likelihood.whitening_statistics`.
    ring_closure : str or None
        Internal-coordinate flow: ``"angle"`` or ``"distance"``, how the Z-matrix parametrises ring closures
        (`openmm_tbg.zmatrix`). None: ``"angle"`` for a new model, the parent's with ``init_from``; a parent
        with angle closures given ``"distance"`` is converted (`convert_to_closure_distances`).
    objective : str
        Internal-coordinate flow: ``"ml"`` (maximum likelihood on the MD frames), ``"kl"`` (reverse KL divergence
        to the Boltzmann distribution of the data set's Hamiltonian, from OpenMM energies and forces) or
        ``"ml+kl"`` (their sum; `openmm_tbg.training.energy_objective`). The CNF trains by flow matching only.
    kl_weight : float
        Weight of the reverse-KL term (per degree of freedom, like the likelihood loss).
    kl_warmup_steps : int
        Steps from the run's first step (a run with ``init_from`` starts at 0) over which the KL weight ramps up
        linearly from 0 (0: at once).
    kl_peptides : int
        Peptides whose proposals enter the KL term of one step.
    kl_samples : int
        Proposals per peptide and step for the KL term.
    energy_cutoff : float
        kT above a batch's lowest energy where the energy's gradient is flattened (`openmm_tbg.energy.regularise`).
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
    family: str = "internal-coordinate"
    rounds: int = 3
    blocks: int = 1
    bins: int = 8
    peptides_per_batch: int = 8
    narrow_dihedrals: str = "wrapped"
    whitening: str = "md"
    ring_closure: str | None = None
    objective: str = "ml"
    kl_weight: float = 1.0
    kl_warmup_steps: int = 0
    kl_peptides: int = 4
    kl_samples: int = 32
    energy_cutoff: float = 100.0

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first invalid field and the valid range."""
        from ..model import FAMILIES

        if self.family not in FAMILIES:
            raise ValueError(f"Unknown model family {self.family!r}; use one of {sorted(FAMILIES)}.")
        positive_ints = ("n_layers", "hidden", "batch_size", "steps", "ot_iterations", "log_every", "rounds",
                         "blocks", "bins", "peptides_per_batch", "kl_peptides", "kl_samples")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainingConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "checkpoint_every", "seed", "kl_warmup_steps"):
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
        from .energy_objective import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainingConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.objective != "ml" and self.family == "egnn-cnf":
            raise ValueError(
                f"TrainingConfig.objective {self.objective!r} needs samples with an exact, differentiable log q; the "
                "egnn-cnf family's costs 3N backward passes per ODE node (hours per batch on a CPU), so it trains by "
                "flow matching only. Use --family internal-coordinate for the energy objectives.")
        for name in ("kl_weight", "energy_cutoff"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"TrainingConfig.{name} must be >= 0 and finite, got {value!r}.")
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
        from ..ic_context import NARROW_DIHEDRALS

        if self.narrow_dihedrals not in NARROW_DIHEDRALS:
            raise ValueError(f"TrainingConfig.narrow_dihedrals must be one of {NARROW_DIHEDRALS}, got "
                             f"{self.narrow_dihedrals!r}.")
        from ..ic_statistics import WHITENING_SOURCES

        if self.whitening not in WHITENING_SOURCES:
            raise ValueError(f"TrainingConfig.whitening must be one of {WHITENING_SOURCES}, got {self.whitening!r}.")
        from ..zmatrix import RING_CLOSURES

        if self.ring_closure is not None and self.ring_closure not in RING_CLOSURES:
            raise ValueError(f"TrainingConfig.ring_closure must be one of {RING_CLOSURES}, got "
                             f"{self.ring_closure!r}.")
        if self.coupling not in COUPLINGS:
            raise ValueError(
                f"Unknown coupling {self.coupling!r}; use one of {', '.join(repr(c) for c in COUPLINGS)}."
            )
        resolve_device(self.device, check_only=True)

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
