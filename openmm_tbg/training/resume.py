"""The resume file ``<out>.resume.pt``: everything an interrupted run needs to continue exactly.

It holds the raw vector-field weights, optimizer, schedule, EMA, the RNG states of every rank, the loss
history and the step. This module is the only place that reads or writes it. The file is written atomically
and read with ``torch.load(weights_only=True)``, so a foreign file cannot run code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..utils import atomic_write
from .config import TrainingConfig

logger = logging.getLogger(__name__)

RESUME_FORMAT = "openmm_tbg.training_resume"
RESUME_FORMAT_VERSION = 1

# Config fields that may differ between a run and its resumption (they do not change the trajectory of the
# optimisation, except ``steps``, which stretches the learning-rate schedule and is warned about).
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "device", "log_every")


def resume_path(out: str | os.PathLike) -> str:
    """Path of the resume file that belongs to model file ``out``."""
    return os.fspath(out) + ".resume.pt"


def read_resume_file(path: str) -> dict[str, Any]:
    """Load a resume file and check its format and version.

    Raises
    ------
    ValueError
        The file is unreadable, not an openmm_tbg resume file, or of another format version; the message says
        to delete it or start a new run.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(
            f"Cannot read the resume file {path} ({type(err).__name__}: {err}); it is corrupt or not an "
            "openmm_tbg resume file. Delete it to start afresh, or pick another --out."
        ) from err
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not an openmm_tbg training resume file; delete it or pick another --out.")
    if state.get("format_version") != RESUME_FORMAT_VERSION:
        raise ValueError(f"{path} has resume format version {state.get('format_version')}, this openmm_tbg "
                         f"reads version {RESUME_FORMAT_VERSION}; start a new run.")
    return state


def write_resume_file(path: str, *, step: int, config: TrainingConfig, peptides: Sequence[str], world_size: int,
                      vector_field: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                      ema: Any, rng: list[dict[str, Any]], losses: Sequence[float], wall_time_s: float,
                      model_sha256: str, init_from: dict[str, Any] | None) -> None:
    """Write the resume file atomically (``rng``: one :func:`collect_rng_states` entry per rank)."""
    payload = {
        "format": RESUME_FORMAT,
        "format_version": RESUME_FORMAT_VERSION,
        "step": step,
        "config": config.to_dict(),
        "peptides": list(peptides),
        "world_size": world_size,
        "vector_field": {k: v.detach().cpu() for k, v in vector_field.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": None if ema is None else {k: v.cpu() for k, v in ema.state_dict().items()},
        "rng": rng,
        "losses": list(losses),
        "wall_time_s": wall_time_s,
        "model_sha256": model_sha256,
        "init_from": init_from,
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))


def resumed_config(saved: TrainingConfig, given: TrainingConfig) -> TrainingConfig:
    """Config to continue with: the saved one, plus the allowed changes from ``given``.

    Raises
    ------
    ValueError
        ``given`` differs from ``saved`` in a field that changes the optimisation.
    """
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


def open_resume(path: str, config: TrainingConfig, trajectories: Sequence[Any],
                world_size: int) -> tuple[dict[str, Any], TrainingConfig, list[Any]]:
    """Read the resume file of a run and check that this run can continue it.

    Returns
    -------
    state : dict
        The file's content.
    config : TrainingConfig
        The saved configuration with the allowed changes of ``config``.
    trajectories : list
        ``trajectories`` in the saved peptide order (it fixes which index the batch sampler draws).

    Raises
    ------
    ValueError
        The file is unreadable, or the peptides, number of processes or configuration differ.
    """
    state = read_resume_file(path)
    names = [t.name for t in trajectories]
    if sorted(state["peptides"]) != sorted(names):
        missing = sorted(set(state["peptides"]) - set(names))
        extra = sorted(set(names) - set(state["peptides"]))
        raise ValueError(f"Cannot resume {path}: the training peptides differ (missing {missing}, extra "
                         f"{extra}). Load the same peptides as the interrupted run.")
    if state["world_size"] != world_size:
        raise ValueError(f"Cannot resume {path} exactly: it was written by {state['world_size']} process(es), "
                         f"this run has {world_size}. Launch with the same number of processes.")
    config = resumed_config(TrainingConfig.from_dict(state["config"]), config)
    by_name = {t.name: t for t in trajectories}
    return state, config, [by_name[n] for n in state["peptides"]]


# ----------------------------------------------------------------------------------------------------- RNGs
def collect_rng_states(np_rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
    """The run's own generators and the global torch (CPU) and Python states as seen inside the run."""
    return {
        "numpy": np_rng.bit_generator.state,
        "torch_generator": gen.get_state(),
        "torch_global": torch.get_rng_state(),
        "python": random.getstate(),
    }


def restore_rng_states(state: dict[str, Any], np_rng: np.random.Generator, gen: torch.Generator) -> None:
    """Put the run's own generators back to a :func:`collect_rng_states` entry (the global states are
    restored only inside :func:`run_rng_scope`)."""
    np_rng.bit_generator.state = state["numpy"]
    gen.set_state(state["torch_generator"])


@contextlib.contextmanager
def run_rng_scope(saved: dict[str, Any] | None) -> Iterator[None]:
    """Run a block with the global torch (CPU) and Python RNG states of a resumed run, then give the caller
    back its own.

    Inside the block the global states are those of ``saved`` (a :func:`collect_rng_states` entry), so that
    anything drawing from them continues as in the interrupted run; with ``saved=None`` they are the
    caller's. On exit, also after an error, the caller's states are restored, so training never changes them.
    """
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    try:
        if saved is not None:
            torch.set_rng_state(saved["torch_global"])
            random.setstate(saved["python"])
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
