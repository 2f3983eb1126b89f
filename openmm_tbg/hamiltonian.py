"""How far is the user's System from the Hamiltonian the model was trained on?

The flow was fitted to the Boltzmann distribution of its training Hamiltonian (amber14-all + implicit/obc1 for
the shipped models); a System far from it gets importance weights that are exact but useless. The sampler
measures the robust spread of the reduced-potential difference on its own proposals and the result warns
(`openmm_tbg.results.HamiltonianMismatchWarning`) above `HAMILTONIAN_GAP_KT`. A module of its own (not in
`openmm_tbg.checks`) because it needs `openmm_tbg.energy`, which uses the checks.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import openmm

logger = logging.getLogger(__name__)

__all__ = ["HamiltonianComparison", "HAMILTONIAN_GAP_KT", "HAMILTONIAN_SAMPLES", "training_forcefield"]

#: Robust spread (IQR / 1.349) of ``u_System - u_training`` over the flow's samples above which the System is
#: called far from the training Hamiltonian. Measured 2026-12-03 on 200 samples of the shipped model for AA, GP,
#: KE and NY: obc2 0.2-0.5 kT, gbn2 0.7-1.3 kT, amber99sbildn + OBC 1.0-2.8 kT; vacuum (amber14, amber99sbildn,
#: charmm36) 6.5-45 kT. Reweighting across a Gaussian spread s keeps a fraction ~exp(-s^2) of the samples.
HAMILTONIAN_GAP_KT = 4.0
#: Samples used for the comparison (the first valid ones of a call), and the fewest that give an estimate.
HAMILTONIAN_SAMPLES = (256, 20)


def training_forcefield(flow) -> tuple[str, ...]:
    """Force-field files of the Hamiltonian ``flow`` was trained on: ``checkpoint_metadata["training"]
    ["forcefield"]`` when the checkpoint records it, else the data set's (amber14-all + implicit/obc1)."""
    from .peptides import DEFAULT_FORCEFIELD

    meta = getattr(flow, "checkpoint_metadata", None) or {}
    recorded = (meta.get("training") or {}).get("forcefield") if isinstance(meta, dict) else None
    if isinstance(recorded, str):
        return (recorded,)
    if isinstance(recorded, (list, tuple)) and recorded and all(isinstance(f, str) for f in recorded):
        return tuple(recorded)
    return tuple(DEFAULT_FORCEFIELD)


class HamiltonianComparison:
    """Compare a System with the model's training Hamiltonian on the flow's samples.

    The flow was fitted to the Boltzmann distribution of its training Hamiltonian; its proposals can only
    serve a System whose energy differs from that one by little more than a constant over those proposals.
    `gap` returns the robust spread (interquartile range / 1.349, in kT) of ``u_System - u_training``; above
    `HAMILTONIAN_GAP_KT` the System is far from what the model represents (e.g. vacuum instead of implicit
    solvent), whatever the ESS says.

    Parameters
    ----------
    system : openmm.System
    topology : openmm.app.Topology
    temperature : float
        Kelvin.
    flow : optional
        The model (its checkpoint may record the training force field; see `training_forcefield`).
    platform : optional
        OpenMM platform for the training Hamiltonian's energies.

    Attributes
    ----------
    forcefield : tuple of str
        The training force-field files.
    note : str
        Why no gap could be computed, when `gap` returns None.
    """

    def __init__(self, system: openmm.System, topology, temperature: float, flow=None, platform=None):
        self.system = system
        self.topology = topology
        self.temperature = float(temperature)
        self.platform = platform
        self.forcefield = training_forcefield(flow)
        self.note = ""
        self._potential = None  # ReducedPotential of the training Hamiltonian; False: not applicable
        self._identical = False
        meta = getattr(flow, "checkpoint_metadata", None) or {}
        if isinstance(meta, dict) and meta.get("refinement"):
            # Refined on a System of its own: that System is its training Hamiltonian now, and the refinement
            # records (and checks) which System it was.
            self._potential = False
            self.note = "the model was refined on a System of its own (see its checkpoint's 'refinement')"

    @property
    def description(self) -> str:
        """The training Hamiltonian in words."""
        return " + ".join(f.replace(".xml", "") for f in self.forcefield) + ", CutoffNonPeriodic 2 nm"

    def _reference(self):
        if self._potential is None:
            from .energy import ReducedPotential
            from .peptides import create_system

            try:
                training = create_system(self.topology, self.forcefield)
            except Exception as error:  # noqa: BLE001 - e.g. "No template found" for toy molecules
                self._potential = False
                self.note = (f"the training Hamiltonian ({self.description}) cannot be built for this Topology "
                             f"({type(error).__name__}: {str(error).splitlines()[0][:120]})")
                logger.info("Hamiltonian comparison skipped: %s", self.note)
                return None
            self._identical = (openmm.XmlSerializer.serialize(training)
                               == openmm.XmlSerializer.serialize(self.system))
            self._potential = ReducedPotential(training, self.temperature, platform=self.platform)
        return self._potential or None

    def gap(self, positions: np.ndarray, u: np.ndarray) -> Optional[float]:
        """Robust spread of ``u - u_training`` (kT) over the first valid samples, or None (see `note`).

        Parameters
        ----------
        positions : numpy.ndarray
            (n, n_atoms, 3) nm, valid flow samples.
        u : numpy.ndarray
            (n,) their reduced potentials under the System.
        """
        n_max, n_min = HAMILTONIAN_SAMPLES
        ok = np.flatnonzero(np.isfinite(u))[:n_max]
        reference = self._reference()
        if reference is None:
            return None
        if self._identical:
            return 0.0
        if len(ok) < n_min:
            self.note = f"only {len(ok)} valid samples with finite energy (needs {n_min})"
            return None
        d = np.asarray(u)[ok] - reference(positions[ok])
        d = d[np.isfinite(d)]
        if len(d) < n_min:
            self.note = "the training Hamiltonian's energy is not finite at the samples"
            return None
        q25, q75 = np.percentile(d, [25.0, 75.0])
        return float((q75 - q25) / 1.349)

    def close(self) -> None:
        """Release the training Hamiltonian's energy workers."""
        if self._potential:
            self._potential.close()
