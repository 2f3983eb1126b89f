"""The flow-matching loop, :func:`train`: start or resume a run, take optimisation steps, write checkpoints."""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..data.splits import check_not_test_split
from ..utils import device_name, machine_info, portable_command, portable_path
from .batching import PeptideBatchSampler, estimate_length_scale, flow_matching_loss, make_generators, \
    make_training_batch
from .energy_objective import EnergyTeacher, kl_weight
from .likelihood import ICTrainingData, likelihood_loss
from .config import TrainingConfig, lr_factor
from .distributed import DistInfo, gather_objects, mean_over_ranks, setup_distributed, teardown, wrap_model
from .model_setup import EMA, flow_for_saving, initial_flow, load_parent, trainable_module
from .resume import collect_rng_states, open_resume, restore_rng_states, resume_path, run_rng_scope, \
    write_resume_file

logger = logging.getLogger(__name__)


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
        Training wall time in all (including previous runs of a resumed training), s.
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


@dataclass
class _Run:
    """Everything one training process holds between steps."""

    config: TrainingConfig
    out: str
    names: list[str]
    data_dir: str | os.PathLike | None
    command_line: str
    dist: DistInfo
    device: torch.device
    parent: dict[str, Any] | None
    sampler: Any  # PeptideBatchSampler (CNF) or ICTrainingData (internal-coordinate flow)
    np_rng: np.random.Generator
    gen: torch.Generator
    flow: torch.nn.Module
    vector_field: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: EMA | None
    losses: list[float] = field(default_factory=list)
    step: int = 0
    wall_before: float = 0.0
    global_rng: dict[str, Any] | None = None  # the global RNG states the interrupted run had
    smoothed: float | None = None
    teacher: EnergyTeacher | None = None  # energies and forces for the reverse-KL objective

    @property
    def rpath(self) -> str:
        return resume_path(self.out)


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


def _hardware(device: torch.device, world_size: int) -> dict[str, Any]:
    """The machine description recorded in the model's metadata."""
    return {**machine_info(), "device": str(device), "device_name": device_name(device), "world_size": world_size,
            "torch_version": str(torch.__version__)}


def _start(trajectories: Sequence[Any], out: str | os.PathLike, config: TrainingConfig | None, *,
           data_dir, resume: bool, init_from, command_line: str | None) -> _Run:
    """Set up a run: configuration, processes, the resume file or parent model, data sampler, model, optimiser."""
    config = copy.deepcopy(config) if config is not None else TrainingConfig()
    config.validate()
    out = os.fspath(out)
    check_not_test_split([t.name for t in trajectories], data_dir)
    # The model file records the command, but not where its files lay on this machine (utils.portable_command).
    command_line = command_line if command_line is not None else portable_command(sys.argv)
    dist_info, device = setup_distributed(config.device)
    state = None
    if resume and os.path.exists(resume_path(out)):
        state, config, trajectories = open_resume(resume_path(out), config, trajectories, dist_info.world_size)
        if dist_info.is_main:
            logger.info("Resuming %s at step %d of %d.", out, state["step"], config.steps)
    elif resume:
        logger.info("No resume file %s; starting a new run.", resume_path(out))
    parent = state.get("init_from") if state is not None else None
    init_state = statistics = None
    if state is None and init_from is not None:
        parent, init_state, statistics = load_parent(init_from, config, trajectories)
        config.validate()  # again: the parent's family may refuse the objective
        if dist_info.is_main:
            logger.info("Starting from %s (sha256 %s..., %s steps).", parent["path"], parent["sha256"][:12],
                        parent["steps"])
    if config.length_scale is None and config.family == "egnn-cnf":
        config.length_scale = estimate_length_scale(trajectories)
        if dist_info.is_main:
            logger.info("Estimated length scale %.4f nm (RMS of centred coordinates).", config.length_scale)
    if config.max_residues is None:
        config.max_residues = max(int(t.encoding.n_residues) for t in trajectories)
    if config.family == "internal-coordinate" and config.ring_closure is None:
        config.ring_closure = "angle"  # a new model (a parent's rule was adopted above); recorded in the metadata
    np_rng, gen = make_generators(config.seed, dist_info.rank)
    flow = initial_flow(config, init_state, trajectories, statistics)
    if config.family == "egnn-cnf":
        sampler = PeptideBatchSampler(trajectories, config.batch_size, np_rng)
    else:
        sampler = ICTrainingData(flow, trajectories, config.peptides_per_batch)
    vector_field = trainable_module(flow).to(device)
    optimizer = torch.optim.AdamW(vector_field.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    run = _Run(config=config, out=out, names=[t.name for t in trajectories], data_dir=data_dir,
               command_line=command_line, dist=dist_info, device=device, parent=parent,
               sampler=sampler, np_rng=np_rng, gen=gen,
               flow=flow, vector_field=vector_field, optimizer=optimizer,
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config)),
               ema=EMA(vector_field, config.ema_decay) if config.ema_decay > 0 else None)
    if state is not None:
        _load_state(run, state)
    if config.family == "internal-coordinate" and config.objective != "ml":
        # Under DDP the KL term's proposals go through the unwrapped flow, but its gradients still reach the
        # same parameters in the same backward pass as the likelihood's (which goes through the wrapper), and
        # DDP's reducer averages a parameter's gradient once it is complete, both terms included
        # (tests/test_training.py::test_ddp_energy_objective_averages_the_kl_gradients). A KL-only step has no
        # pass through the wrapper, so nothing would be averaged: refused.
        if dist_info.world_size > 1 and config.objective == "kl":
            raise ValueError(
                "objective 'kl' is not supported under DDP (its proposals bypass the DDP wrapper, so without the "
                "likelihood term no gradient would be averaged over ranks); use --objective ml+kl, or run 'kl' "
                "in one process.")
        run.teacher = EnergyTeacher(trajectories)
    return run


def _load_state(run: _Run, state: dict[str, Any]) -> None:
    """Continue from a resume file's content: weights, optimiser, schedule, EMA, RNGs, history."""
    run.vector_field.load_state_dict(state["vector_field"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.global_rng = state["rng"][run.dist.rank]
    restore_rng_states(run.global_rng, run.np_rng, run.gen)
    run.losses = list(state["losses"])
    run.step = int(state["step"])
    run.wall_before = float(state["wall_time_s"])


def _metadata(run: _Run, wall: float, hardware: dict[str, Any]) -> dict[str, Any]:
    """The ``training`` metadata stored in the model file."""
    losses = run.losses
    return {"training": {
        "data_dir": portable_path(run.data_dir),  # the data set by name, not where it lay on this machine
        "peptides": sorted(run.names),
        "n_peptides": len(run.names),
        "frames": int(run.sampler.n_frames.sum()),
        "steps": run.step,
        "losses": _subsample(losses),
        "final_loss_mean_100": float(np.mean(losses[-100:])) if losses else None,
        "wall_time_s": wall,
        "hardware": hardware,
        "config": run.config.to_dict(),
        "ema_weights": run.ema is not None,
        "command_line": run.command_line,
        "init_from": run.parent,
        # counted by this process (a resumed run starts counting again)
        "energy_proposals": None if run.teacher is None else {"n": run.teacher.n_proposals,
                                                               "rejected": run.teacher.n_rejected},
    }}


def _checkpoint(run: _Run, wall: float, hardware: dict[str, Any]) -> tuple[str | None, str | None]:
    """Write the model and the resume file (rank 0; every rank contributes its RNG states)."""
    from ..checkpoint import save_model

    rng_states = gather_objects(collect_rng_states(run.np_rng, run.gen), run.dist)
    if not run.dist.is_main:
        return None, None
    digest = save_model(flow_for_saving(run.flow, run.vector_field, run.ema), run.out,
                        metadata=_metadata(run, wall, hardware))
    write_resume_file(run.rpath, step=run.step, config=run.config, peptides=run.names,
                      world_size=run.dist.world_size, vector_field=run.vector_field, optimizer=run.optimizer,
                      scheduler=run.scheduler, ema=run.ema, rng=rng_states, losses=run.losses, wall_time_s=wall,
                      model_sha256=digest, init_from=run.parent)
    logger.info("Checkpoint at step %d: %s (sha256 %s).", run.step, run.out, digest[:12])
    return run.out, digest


def _optimisation_step(run: _Run, model: torch.nn.Module, bar) -> None:
    """One flow-matching (CNF) or maximum-likelihood (internal-coordinate flow) step; appends the
    (rank-averaged) loss and logs it."""
    config = run.config
    if config.family == "egnn-cnf":
        batch = make_training_batch(run.sampler, config, config.length_scale, run.gen).to(run.device)
        loss = flow_matching_loss(model, batch, config.sigma)
    else:
        loss = None
        if config.objective in ("ml", "ml+kl"):
            loss = likelihood_loss(model, run.sampler.batch(config.batch_size, run.np_rng, run.device))
        weight = kl_weight(run.step, config)  # from the run's first step, so that a resume continues exactly
        if run.teacher is not None and weight > 0:
            peptides = run.sampler.peptides
            chosen = run.np_rng.choice(len(peptides), size=min(config.kl_peptides, len(peptides)), replace=False)
            kl = run.teacher.loss(run.vector_field, [peptides[i] for i in chosen], config.kl_samples, run.np_rng,
                                  run.gen, config.energy_cutoff)
            if kl is not None:
                kl = weight * kl
                loss = kl if loss is None else loss + kl
        if loss is None:  # a KL-only step whose proposals were all rejected: nothing to learn from
            loss = torch.zeros((), device=run.device, requires_grad=True)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"Non-finite training loss at step {run.step + 1}; lower --lr, raise --warmup or enable "
            "gradient clipping (--grad-clip)."
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.vector_field.parameters(), config.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.vector_field)
    value = mean_over_ranks(loss, run.dist)
    run.losses.append(value)
    run.step += 1
    run.smoothed = value if run.smoothed is None else 0.98 * run.smoothed + 0.02 * value
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{run.smoothed:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}", refresh=False)
    if run.dist.is_main and run.step % config.log_every == 0:
        logger.info("step %d: mean loss %.5f over the last %d steps", run.step,
                    float(np.mean(run.losses[-config.log_every:])), config.log_every)


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
    """Train a transferable flow: an EGNN CNF by conditional flow matching, an internal-coordinate flow by
    maximum likelihood (``config.family``).

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
        The caller's global torch and Python RNG states are left as they were.
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
    run = _start(trajectories, out, config, data_dir=data_dir, resume=resume, init_from=init_from,
                 command_line=command_line)
    config = run.config
    until = config.steps if until_step is None else min(int(until_step), config.steps)
    model = wrap_model(run.vector_field, run.dist, run.device)
    model.train()
    hardware = _hardware(run.device, run.dist.world_size)
    t_start = time.perf_counter()
    bar = None
    if progress and run.dist.is_main:
        from tqdm.auto import tqdm

        # Name the objective the user is watching, so an IC run's loss is not read as a flow-matching loss.
        objective = "flow matching" if config.family == "egnn-cnf" else {
            "ml": "maximum likelihood", "kl": "reverse KL", "ml+kl": "likelihood + reverse KL"}[config.objective]
        bar = tqdm(total=until, initial=run.step, desc=objective, unit="step", dynamic_ncols=True)
    try:
        with run_rng_scope(run.global_rng):
            while run.step < until:
                _optimisation_step(run, model, bar)
                if config.checkpoint_every and run.step % config.checkpoint_every == 0 and run.step < until:
                    _checkpoint(run, run.wall_before + time.perf_counter() - t_start, hardware)
            model_path, sha = _checkpoint(run, run.wall_before + time.perf_counter() - t_start, hardware)
    finally:
        if bar is not None:
            bar.close()
        teardown(run.dist)
    return TrainingResult(flow=flow_for_saving(run.flow, run.vector_field, run.ema).cpu().eval(),
                          losses=np.asarray(run.losses, dtype=np.float64), step=run.step,
                          wall_time_s=run.wall_before + time.perf_counter() - t_start, model_path=model_path,
                          sha256=sha, config=config)
