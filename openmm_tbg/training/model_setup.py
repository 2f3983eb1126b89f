"""The model a run trains: building it, starting it from a saved model (``init_from``), its EMA, and the copy
that is saved."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Sequence

import torch

from .config import TrainingConfig

logger = logging.getLogger(__name__)


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


def build_flow(config: TrainingConfig, length_scale: float, max_residues: int,
               trajectories: Sequence[Any] | None = None, statistics: dict | None = None):
    """A fresh flow of ``config.family``: a :class:`TransferableFlow` with an EGNN vector field, or an
    internal-coordinate flow whitened with ``statistics`` (default: collected from ``trajectories``)."""
    if config.family == "internal-coordinate":
        from .likelihood import build_ic_flow

        return build_ic_flow(trajectories, n_rounds=config.rounds, hidden=config.hidden, n_blocks=config.blocks,
                             n_bins=config.bins, max_residues=max_residues, seed=config.seed,
                             statistics=statistics, narrow_dihedrals=config.narrow_dihedrals,
                             whitening=config.whitening, ring_closure=config.ring_closure or "angle")
    from openmm_tbg.flow import TransferableFlow
    from openmm_tbg.nn.egnn import EGNNVectorField

    vf = EGNNVectorField(n_layers=config.n_layers, hidden=config.hidden, max_residues=max_residues,
                         attention=config.attention)
    return TransferableFlow(vf, length_scale=length_scale, prior_std=config.prior_std)


def trainable_module(flow: torch.nn.Module) -> torch.nn.Module:
    """The module whose weights training optimises: the CNF's vector field, or the whole flow."""
    return flow.vector_field if getattr(flow, "family", "egnn-cnf") == "egnn-cnf" else flow


def initial_flow(config: TrainingConfig, init_state: dict[str, torch.Tensor] | None = None,
                 trajectories: Sequence[Any] | None = None, statistics: dict | None = None):
    """The flow a run starts from: identical weights on every rank (seeded with ``config.seed`` without
    touching the caller's global RNG), or the weights of a parent model when ``init_state`` is given."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        flow = build_flow(config, config.length_scale, config.max_residues, trajectories, statistics)
    if init_state is not None:
        trainable_module(flow).load_state_dict(init_state)
    return flow


def load_parent(path: str | os.PathLike, config: TrainingConfig,
                 trajectories: Sequence[Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict | None]:
    """Load the model that starts a run; adopt its family and architecture into ``config`` (in place).

    Returns the parent's description for the metadata, its trained weights and (internal-coordinate flows)
    its whitening statistics.
    """
    from openmm_tbg.checkpoint import load_model

    path = os.fspath(path)
    parent_flow = load_model(path)  # CheckpointError names a missing, corrupt or incompatible file
    needed = max(int(t.encoding.n_residues) for t in trajectories)
    statistics = None
    if parent_flow.family == "internal-coordinate":
        pc = parent_flow.config
        if pc.get("adapter") is not None:
            raise ValueError(f"{path} carries a per-system adapter (it was refined for one molecule); training "
                             "on many peptides cannot use it. Start from the transferable model it was refined "
                             "from (its sha256 is in the checkpoint's refinement metadata).")
        if needed > pc["max_residues"]:
            raise ValueError(f"{path} encodes at most {pc['max_residues']} residues, but the training data has "
                             f"peptides of {needed}; train a new model instead of starting from this one.")
        adopted = {"family": parent_flow.family, "rounds": pc["n_rounds"], "hidden": pc["hidden"],
                   "blocks": pc["n_blocks"], "bins": pc["n_bins"], "max_residues": pc["max_residues"],
                   "narrow_dihedrals": parent_flow.narrow_dihedrals}
        statistics = pc["statistics"]  # keep the parent's whitening: its weights were trained with it
        # ... and record where it came from (files from before the whitening option recorded nothing: "md").
        parent_config = ((parent_flow.checkpoint_metadata or {}).get("training") or {}).get("config") or {}
        adopted["whitening"] = parent_config.get("whitening", "md")
        if config.ring_closure is None or config.ring_closure == parent_flow.ring_closure:
            config.ring_closure = parent_flow.ring_closure
        else:
            parent_flow, statistics = convert_to_closure_distances(parent_flow, config.ring_closure, trajectories)
    else:
        vf_config = getattr(parent_flow.vector_field, "config", None)
        if not isinstance(vf_config, dict) or "n_layers" not in vf_config:
            raise ValueError(f"{path} does not hold an EGNN vector field; only EGNN models can be trained "
                             "further.")
        if needed > vf_config["max_residues"]:
            raise ValueError(f"{path} encodes at most {vf_config['max_residues']} residues, but the training "
                             f"data has peptides of {needed}; train a new model instead of starting from this one.")
        adopted = {"family": parent_flow.family, "n_layers": vf_config["n_layers"], "hidden": vf_config["hidden"],
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
    state = {k: v.detach().clone() for k, v in trainable_module(parent_flow).state_dict().items()}
    return parent, state, statistics


def convert_to_closure_distances(flow, ring_closure: str, trajectories: Sequence[Any]):
    """An internal-coordinate flow with angle closures turned into one with closure distances, as a start
    for fine-tuning (``--init-from MODEL --ring-closure distance``).

    The weights are kept. The closure distance of each ring takes the place of its closing angle, which it
    follows monotonically (`openmm_tbg.zmatrix`), so the conditioners see a similar whitened input there; its
    whitening comes from ``trajectories``, and the new role tokens of closing atoms (4, 5) start as copies of
    the tokens they had (3, 7). The converted flow's density is not the parent's: train it.

    Returns
    -------
    flow : InternalCoordinateFlow
    statistics : dict
        The parent's whitening table plus the closure distances' entries.
    """
    from openmm_tbg.icflow import InternalCoordinateFlow

    from .likelihood import whitening_statistics

    if flow.ring_closure != "angle" or ring_closure != "distance":
        raise ValueError(f"Only a model with angle closures can be converted to closure distances (the parent has "
                         f"{flow.ring_closure!r}, {ring_closure!r} was asked for); train a new model instead.")
    extra = whitening_statistics(trajectories, ring_closure="distance")
    statistics = dict(flow.config["statistics"])
    statistics.update({k: v for k, v in extra.items() if k.startswith("r|")})
    config = {k: v for k, v in flow.config.items() if k not in ("statistics", "dtype")}
    converted = InternalCoordinateFlow(statistics, **config, ring_closure="distance").to(flow.dtype)
    state = flow.state_dict()
    weight = state["embedding.weight"].clone()
    roles = sum(flow._vocab[:3])  # the role block of the concatenated one-hot tokens
    weight[:, roles + 4] = weight[:, roles + 3]
    weight[:, roles + 5] = weight[:, roles + 7]
    converted.load_state_dict({**state, "embedding.weight": weight})
    converted.checkpoint_path, converted.checkpoint_sha256 = flow.checkpoint_path, flow.checkpoint_sha256
    converted.checkpoint_metadata = flow.checkpoint_metadata
    logger.info("Converted the parent to closure distances: %d closure-distance keys added from the training "
                "data.", sum(k.startswith("r|") for k in extra))
    return converted, statistics


def flow_for_saving(flow: torch.nn.Module, vector_field: torch.nn.Module, ema: EMA | None) -> torch.nn.Module:
    """A CPU copy of the flow carrying the EMA weights when enabled (the training copy is left untouched)."""
    saved = copy.deepcopy(flow).cpu()
    if ema is not None:
        trainable_module(saved).load_state_dict({k: v.cpu() for k, v in ema.state_dict().items()})
    return saved
