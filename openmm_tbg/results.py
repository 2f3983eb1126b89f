"""`SampleResult`: Boltzmann-generator samples with importance weights, energies and validity bookkeeping."""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .serialization import topology_from_dict, topology_to_dict

logger = logging.getLogger(__name__)

__all__ = ["SampleResult", "SampleSizeWarning", "LOW_ESS_SAMPLES", "RESAMPLE_ESS_MARGIN"]

#: Below this many effective samples (Kish ESS x proposals), `SampleResult.summary` explains what the ESS means.
LOW_ESS_SAMPLES = 10.0
#: `SampleResult.resample` warns when it is asked for more than this many times the effective sample size.
RESAMPLE_ESS_MARGIN = 2.0

_REMEDIES = ("draw more proposals (sample(n) with a larger n, or --samples), use a better-trained model, or run "
             "sample(n, method='metropolis') or TBGMove next to MD for correlated but exact samples")


class SampleSizeWarning(UserWarning):
    """More configurations were requested than the importance weights can support (few effective samples)."""


@dataclass
class SampleResult:
    """Samples of a Boltzmann generator with weights, energies and validity bookkeeping.

    Attributes
    ----------
    positions : numpy.ndarray
        float64 (n, n_atoms, 3), nm. ``method="importance"``/``"none"``: every proposal (relabelled/mirrored
        where that made it valid). ``"metropolis"``: the chain's states, one per proposal considered.
    log_weights : numpy.ndarray
        (n,) normalised log weights (logsumexp 0); ``-inf`` for rejected samples. Uniform for a chain.
    reduced_potentials : numpy.ndarray
        (n,) ``u = U/kT``; NaN where a sample was rejected before its energy was evaluated, +inf for
        non-finite energies.
    log_q : numpy.ndarray
        (n,) flow log density (nm, centre-of-geometry-free subspace).
    valid : numpy.ndarray
        (n,) bool.
    reasons : numpy.ndarray
        (n,) str, ``""`` for valid samples, otherwise the rejection reason.
    rejections : dict
        Count of rejected proposals per reason (over all proposals; sums with the valid count to
        ``n_proposals``).
    n_proposals : int
        Number of flow samples drawn.
    n_mirrored, n_relabelled : int
        Proposals that were mirrored / had interchangeable atoms relabelled.
    ess : float
        Kish effective sample size of the proposals' importance weights as a fraction of ``n_proposals``
        (rejected ones count as weight 0).
    acceptance_rate : float or None
        Fraction of proposals accepted by the Metropolis chain.
    method : str
        ``"importance"``, ``"metropolis"``, ``"none"`` or ``"resampled"``.
    temperature : float
        Kelvin.
    topology : openmm.app.Topology
    proposal_index : numpy.ndarray
        (n,) int: index of the proposal each configuration is (-1: a user-given initial state).

    Notes
    -----
    A resampled result or a Metropolis chain repeats configurations; `n_distinct` says how many different
    ones it holds, and `effective_samples` how many independent samples the importance weights are worth.
    """

    positions: np.ndarray
    log_weights: np.ndarray
    reduced_potentials: np.ndarray
    log_q: np.ndarray
    valid: np.ndarray
    reasons: np.ndarray
    rejections: dict
    n_proposals: int
    n_mirrored: int
    n_relabelled: int
    ess: float
    acceptance_rate: Optional[float]
    method: str
    temperature: float
    topology: object
    proposal_index: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def n_valid(self) -> int:
        """Number of valid proposals."""
        return int(self.n_proposals - sum(self.rejections.values()))

    @property
    def counts(self) -> dict:
        """Proposal counts: ``n``, ``valid``, one entry per rejection reason, ``mirrored``, ``relabelled``."""
        return {"n": self.n_proposals, "valid": self.n_valid, **self.rejections, "mirrored": self.n_mirrored,
                "relabelled": self.n_relabelled}

    @property
    def n_distinct(self) -> int:
        """Number of distinct configurations among the valid rows.

        Equal to `n_valid` for ``method="importance"``/``"none"``; for a resampled result or a Metropolis chain
        it counts different proposals (a user-given initial state counts once), so repeats are visible.
        """
        return int(np.unique(self.proposal_index[np.asarray(self.valid, dtype=bool)]).size)

    @property
    def effective_samples(self) -> float:
        """Kish effective sample size in samples, ``ess * n_proposals``, of the proposals' importance weights.

        Roughly the number of independent Boltzmann samples the weighted proposals are worth; 1.0 means one
        proposal carries (nearly) all the weight.
        """
        return float(self.ess * self.n_proposals)

    @property
    def weights(self) -> np.ndarray:
        """Normalised weights ``exp(log_weights)`` (sum 1)."""
        return np.exp(self.log_weights)

    def expectation(self, values) -> float:
        """Weighted average of per-sample ``values`` (rejected samples, weight 0, are ignored)."""
        values = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(self.log_weights)
        return float(np.sum(np.exp(self.log_weights[ok]) * values[ok]))

    def to_mdtraj(self, valid_only: bool = False):
        """The configurations as an ``mdtraj.Trajectory`` (weights are not part of it; see `resample`).

        Parameters
        ----------
        valid_only : bool
            Keep only valid configurations.
        """
        import mdtraj

        x = self.positions[self.valid] if valid_only else self.positions
        return mdtraj.Trajectory(x.astype(np.float32), mdtraj.Topology.from_openmm(self.topology))

    def resample(self, k: int, seed=None) -> "SampleResult":
        """Draw ``k`` configurations with replacement, with probabilities equal to the weights.

        With few effective samples most of the ``k`` draws are copies of the same configurations. The result's
        `n_distinct` says how many different ones it holds, and a `SampleSizeWarning` is issued when ``k``
        exceeds `RESAMPLE_ESS_MARGIN` times the effective sample size (`effective_samples`).

        Parameters
        ----------
        k : int
            Number of configurations.
        seed : int or numpy.random.Generator, optional
            None draws fresh entropy.

        Returns
        -------
        SampleResult
            ``method="resampled"``, uniform weights, ``proposal_index`` pointing to the original proposals.

        Raises
        ------
        ValueError
            ``k`` is not a positive integer.
        RuntimeError
            No sample is valid.

        Warns
        -----
        SampleSizeWarning
            ``k > RESAMPLE_ESS_MARGIN * effective_samples``.
        """
        integral = isinstance(k, (int, np.integer)) or (isinstance(k, float) and k.is_integer())
        if isinstance(k, bool) or not integral or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        k = int(k)
        ok = np.isfinite(self.log_weights)
        if not ok.any():
            raise RuntimeError(f"Cannot resample: none of the {self.n_proposals} samples is valid "
                               f"(rejections: {self.rejections}). Draw more samples or check the model.")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        p = np.exp(self.log_weights[ok] - np.max(self.log_weights[ok]))
        idx = np.flatnonzero(ok)[rng.choice(ok.sum(), size=k, replace=True, p=p / p.sum())]
        out = SampleResult(
            positions=self.positions[idx], log_weights=np.full(k, -np.log(k)),
            reduced_potentials=self.reduced_potentials[idx], log_q=self.log_q[idx],
            valid=np.ones(k, dtype=bool), reasons=np.full(k, "", dtype=object),
            rejections=dict(self.rejections), n_proposals=self.n_proposals, n_mirrored=self.n_mirrored,
            n_relabelled=self.n_relabelled, ess=self.ess, acceptance_rate=self.acceptance_rate,
            method="resampled", temperature=self.temperature, topology=self.topology,
            proposal_index=self.proposal_index[idx])
        n_eff = self.effective_samples
        logger.info("resample(%d): %d distinct configurations (ESS %.1f samples)", k, out.n_distinct, n_eff)
        if k > RESAMPLE_ESS_MARGIN * n_eff:
            warnings.warn(
                f"resample({k}): the importance weights are worth only {n_eff:.1f} effective samples (Kish ESS "
                f"{100.0 * self.ess:.2f} % x {self.n_proposals} proposals), so the {k} frames hold only "
                f"{out.n_distinct} distinct configuration{'s' if out.n_distinct != 1 else ''}, most of them "
                f"repeated. To get more independent configurations, {_REMEDIES}; or resample at most "
                f"~{max(1, int(np.floor(n_eff)))} frame{'s' if n_eff >= 2 else ''}.", SampleSizeWarning, stacklevel=2)
        return out

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the result to a ``.npz`` file (read back with `SampleResult.load`)."""
        meta = {"rejections": self.rejections, "n_proposals": self.n_proposals, "n_mirrored": self.n_mirrored,
                "n_relabelled": self.n_relabelled, "ess": self.ess, "acceptance_rate": self.acceptance_rate,
                "method": self.method, "temperature": self.temperature,
                "topology": topology_to_dict(self.topology), "format": "openmm_tbg.SampleResult",
                "format_version": 1}
        with open(path, "wb") as fh:
            np.savez_compressed(fh, positions=self.positions, log_weights=self.log_weights,
                                reduced_potentials=self.reduced_potentials, log_q=self.log_q, valid=self.valid,
                                reasons=self.reasons.astype(str), proposal_index=self.proposal_index,
                                metadata=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SampleResult":
        """Read a result written by `save`."""
        with np.load(path, allow_pickle=False) as z:
            if "metadata" not in z.files:
                raise ValueError(f"{path} is not an openmm_tbg SampleResult file (no metadata); write one with "
                                 f"SampleResult.save().")
            meta = json.loads(str(z["metadata"]))
            arrays = {k: z[k] for k in z.files if k != "metadata"}
        if meta.get("format") != "openmm_tbg.SampleResult":
            raise ValueError(f"{path} is not an openmm_tbg SampleResult file.")
        return cls(positions=arrays["positions"], log_weights=arrays["log_weights"],
                   reduced_potentials=arrays["reduced_potentials"], log_q=arrays["log_q"],
                   valid=arrays["valid"].astype(bool), reasons=arrays["reasons"].astype(object),
                   rejections={k: int(v) for k, v in meta["rejections"].items()},
                   n_proposals=int(meta["n_proposals"]), n_mirrored=int(meta["n_mirrored"]),
                   n_relabelled=int(meta["n_relabelled"]), ess=float(meta["ess"]),
                   acceptance_rate=meta["acceptance_rate"], method=meta["method"],
                   temperature=float(meta["temperature"]), topology=topology_from_dict(meta["topology"]),
                   proposal_index=arrays["proposal_index"])

    def summary(self) -> str:
        """Method, valid fraction, ESS (as a fraction and in samples), distinct configurations, acceptance.

        One line, plus a second line that says what the ESS means when it is below `LOW_ESS_SAMPLES`
        effective samples.
        """
        n_eff = self.effective_samples
        text = (f"{self.method}: {self.n_valid}/{self.n_proposals} valid proposals "
                f"({100.0 * self.n_valid / max(1, self.n_proposals):.1f} %), ESS {100.0 * self.ess:.2f} % "
                f"= {n_eff:.1f} effective samples")
        if self.method in ("resampled", "metropolis"):
            text += f", {len(self)} frames holding {self.n_distinct} distinct configurations"
        rejected = {k: v for k, v in self.rejections.items() if v}
        if rejected:
            text += f", rejected {rejected}"
        if self.n_mirrored or self.n_relabelled:
            text += f", mirrored {self.n_mirrored}, relabelled {self.n_relabelled}"
        if self.acceptance_rate is not None:
            text += f", acceptance {100.0 * self.acceptance_rate:.1f} %"
        if self.n_valid and n_eff < LOW_ESS_SAMPLES:
            who = "one proposal carries nearly all" if n_eff < 1.5 else "a few proposals carry most"
            n_conf = max(1, int(round(n_eff)))
            text += (f"\nnote: an ESS of {n_eff:.1f} samples means that {who} of the importance weight, so "
                     f"reweighted averages and resampled frames rest on about {n_conf} "
                     f"configuration{'s' if n_conf > 1 else ''}; {_REMEDIES}.")
        return text
