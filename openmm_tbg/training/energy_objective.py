"""The reverse-KL (energy) term of the internal-coordinate flow's training objective.

With ``TrainingConfig.objective`` ``"kl"`` or ``"ml+kl"`` each step also draws proposals of a few training
peptides on the flow's differentiable path and minimises ``E_q[u_reg(x) + log q(x)] / n_dof``, with ``u`` the
reduced potential of the data set's own Hamiltonian (amber14-all + implicit/obc1, 310 K, built from the
peptide's Topology by `openmm_tbg.peptides.create_system`) and its OpenMM forces
(`openmm_tbg.refinement.reverse_kl_terms`). Proposals that the validity checks reject (bond graph, chirality)
have no mass under the target and are left out of the term; they are counted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["OBJECTIVES", "EnergyTeacher", "kl_weight"]

#: Training objectives of the internal-coordinate flow: maximum likelihood on MD frames, the reverse KL
#: divergence to the Boltzmann distribution (energies and forces, no MD frames needed), or their sum.
OBJECTIVES = ("ml", "kl", "ml+kl")


def kl_weight(step: int, config: Any) -> float:
    """Weight of the reverse-KL term at optimisation step ``step`` (0-based, counted from the run's first step):
    0 for ``"ml"``; otherwise ``config.kl_weight``, ramped linearly from 0 over ``config.kl_warmup_steps``."""
    if config.objective == "ml":
        return 0.0
    ramp = 1.0 if config.kl_warmup_steps <= 0 else min(1.0, (step + 1) / config.kl_warmup_steps)
    return float(config.kl_weight) * ramp


class EnergyTeacher:
    """Energies, forces and validity checks of the training peptides, built when first needed.

    Parameters
    ----------
    trajectories : sequence of PeptideTrajectory
        Their Topologies define the Systems (`openmm_tbg.peptides.create_system`).
    temperature_k : float
        The data set's temperature, K.
    max_cached : int
        OpenMM contexts kept at once (least recently used leave first).
    """

    def __init__(self, trajectories: Sequence[Any], temperature_k: float = 310.0, max_cached: int = 64):
        self._trajectories = {t.name: t for t in trajectories}
        self.temperature_k = float(temperature_k)
        self.max_cached = int(max_cached)
        self._cache: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.n_proposals = 0
        self.n_rejected = 0

    def _get(self, name: str):
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        from ..energy import ReducedPotential
        from ..peptides import create_system
        from ..validity import ValidityChecker

        t = self._trajectories[name]
        entry = (ReducedPotential(create_system(t.topology), self.temperature_k, platform="CPU"),
                 ValidityChecker(t.topology, t.encoding))
        self._cache[name] = entry
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return entry

    def loss(self, flow, peptides: Sequence[Any], n_per_peptide: int, rng: np.random.Generator,
             generator: torch.Generator, cutoff: float) -> torch.Tensor | None:
        """Mean over ``peptides`` (`ICTrainingData` entries) of ``mean_valid(u_reg + log q) / n_dof``; None if
        no proposal was valid."""
        from ..refinement import reverse_kl_terms

        terms = []
        for peptide in peptides:
            potential, checker = self._get(peptide.name)
            draws = reverse_kl_terms(flow, peptide.context, n_per_peptide, potential, generator, checker=checker,
                                     cutoff=cutoff)
            valid = draws["valid"]
            self.n_proposals += int(valid.numel())
            self.n_rejected += int((~valid).sum())
            if bool(valid.any()):
                terms.append((draws["u_reg"] + draws["log_q"])[valid].mean() / peptide.n_dof)
        return torch.stack(terms).mean() if terms else None
