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

__all__ = ["SampleResult", "SampleSizeWarning", "FewEffectiveSamplesWarning", "UnreliableWeightsWarning",
           "HamiltonianMismatchWarning", "FEW_EFFECTIVE_SAMPLES", "LOW_ESS_SAMPLES", "RESAMPLE_ESS_MARGIN"]

#: Below this many effective samples (Kish ESS x proposals) a result warns (`FewEffectiveSamplesWarning`) when it
#: is made, averaged (`SampleResult.expectation`) or resampled, and `SampleResult.summary` says so first.
FEW_EFFECTIVE_SAMPLES = 20.0
#: The former name of `FEW_EFFECTIVE_SAMPLES` (the summary's note started at 10 samples).
LOW_ESS_SAMPLES = FEW_EFFECTIVE_SAMPLES
#: `SampleResult.resample` warns when it is asked for more than this many times the effective sample size.
RESAMPLE_ESS_MARGIN = 2.0

_REMEDIES = ("draw more proposals (sample(n) with a larger n, or --samples), use a better-trained model, or run "
             "sample(n, method='metropolis') or TBGMove next to MD for correlated but exact samples")


# What refinement does, as measured on the test dipeptides (docs/performance.md, 2026-12-03): it makes nearly every
# proposal valid, but does not reliably raise the ESS and lowers the proposals of rarely proposed basins.
_REFINE = ("refine the model on this System (sampler.refine(...): nearly all proposals valid after a minute, but "
           "the ESS gain varies and rarely proposed basins get rarer)")
_HYBRID = ("run hybrid MD/BG with TBGMove (SequenceMove([LangevinDynamicsMove(...), TBGMove(sampler)]): exact "
           "whatever the model)")
_TRAINING = ("build the System with the model's training Hamiltonian ({training}: openmm_tbg.build_peptide(sequence) "
             "or openmm_tbg.peptides.create_system(topology))")
#: With fewer proposals than this, a tiny ESS may be chance: the advice is to draw more.
_FEW_PROPOSALS = 1000
#: Below this spread (kT) against the training Hamiltonian, the messages do not suggest switching to it.
_SAME_HAMILTONIAN_KT = 0.5
_DEFAULT_TRAINING = "amber14-all + implicit/obc1, CutoffNonPeriodic 2 nm"


class SampleSizeWarning(UserWarning):
    """More configurations were requested than the importance weights can support (few effective samples)."""


class FewEffectiveSamplesWarning(SampleSizeWarning):
    """A result rests on fewer than `FEW_EFFECTIVE_SAMPLES` effective samples: its averages, resampled frames and
    error bars describe a handful of configurations, not the Boltzmann distribution."""


class UnreliableWeightsWarning(SampleSizeWarning):
    """The importance weights have a heavy tail (Pareto shape above `openmm_tbg.weights.PARETO_K_RELIABLE`): the
    Kish ESS, reweighted averages and their error bars can be far off, and repeated runs disagree by much more
    than those error bars say."""


class HamiltonianMismatchWarning(UserWarning):
    """The System's energy differs from the model's training Hamiltonian by much more than a constant over the
    flow's samples: the proposals come from another ensemble, and the weights can miss states the System
    populates, however many samples are drawn."""


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
    hamiltonian_gap : float or None
        Robust spread (kT) of the System's reduced potential minus the training Hamiltonian's over the flow's
        samples (`openmm_tbg.hamiltonian.HamiltonianComparison`); None: not measured. Above
        `openmm_tbg.hamiltonian.HAMILTONIAN_GAP_KT` the result warns (`HamiltonianMismatchWarning`).
    training_hamiltonian : str
        The model's training Hamiltonian in words, for messages.

    Notes
    -----
    A resampled result or a Metropolis chain repeats configurations; `n_distinct` says how many different
    ones it holds, and `effective_samples` how many independent samples the importance weights are worth.

    A result that rests on fewer than `FEW_EFFECTIVE_SAMPLES` effective samples, or whose System is far from the
    model's training Hamiltonian, says so: `problems` lists the warnings, `warn` issues them
    (`FewEffectiveSamplesWarning`, `HamiltonianMismatchWarning`; filter them with the `warnings` module), and
    the sampler, `expectation` and `resample` call it; `summary` starts with them. Raw flow samples
    (``method="none"``) claim no Boltzmann statistics and do not warn.
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
    hamiltonian_gap: Optional[float] = None
    training_hamiltonian: str = _DEFAULT_TRAINING

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

    @property
    def pareto_k(self) -> Optional[float]:
        """Pareto shape of the importance weights' tail (`openmm_tbg.weights.pareto_k`) for
        ``method="importance"``; None for other methods (a chain's or a resample's weights are uniform).

        Below 0.5 the weights have a finite variance and the Kish ESS means what it says; above
        `openmm_tbg.weights.PARETO_K_RELIABLE` (0.7) it does not (`UnreliableWeightsWarning`); NaN when too few
        weights lie in the tail to fit it.
        """
        from .weights import pareto_k

        if self.method != "importance":
            return None
        return pareto_k(self.log_weights)

    def problems(self) -> list:
        """The warnings this result deserves, as ``(category, message)`` pairs, most important first.

        `FewEffectiveSamplesWarning` below `FEW_EFFECTIVE_SAMPLES` effective samples (also when no proposal is
        valid); `UnreliableWeightsWarning` when `pareto_k` exceeds `openmm_tbg.weights.PARETO_K_RELIABLE`;
        `HamiltonianMismatchWarning` when `hamiltonian_gap` exceeds `openmm_tbg.hamiltonian.HAMILTONIAN_GAP_KT`.
        Empty for ``method="none"``.
        """
        from .hamiltonian import HAMILTONIAN_GAP_KT
        from .weights import PARETO_K_RELIABLE

        if self.method == "none":
            return []
        out = []
        gap = self.hamiltonian_gap
        far = gap is not None and np.isfinite(gap) and gap > HAMILTONIAN_GAP_KT
        same = gap is not None and np.isfinite(gap) and gap <= _SAME_HAMILTONIAN_KT
        fixes = [_REFINE, _HYBRID] + ([] if same else [_TRAINING.format(training=self.training_hamiltonian)])
        fixes = ", ".join(fixes[:-1]) + ", or " + fixes[-1]
        n_eff = self.effective_samples
        if far:
            out.append((HamiltonianMismatchWarning,
                        f"This System is far from the Hamiltonian the model was trained on "
                        f"({self.training_hamiltonian}): over the flow's samples its reduced potential differs "
                        f"from the training one by a spread of {gap:.1f} kT (robust standard deviation; above "
                        f"{HAMILTONIAN_GAP_KT:g} kT; e.g. vacuum instead of implicit solvent). The flow proposes "
                        f"the training ensemble, so states this System populates and the training one does not "
                        f"(e.g. salt bridges in vacuum) are missing from the weights, and drawing more proposals "
                        f"does not fix that. To sample this System's ensemble, {fixes}."))
        if n_eff < FEW_EFFECTIVE_SAMPLES:
            if self.n_valid == 0:
                basis = f"None of the {self.n_proposals} proposals is valid, so this result holds no Boltzmann sample."
            else:
                if n_eff < 1.5:
                    who = ": one proposal carries nearly all of the importance weight"
                elif n_eff < 0.2 * self.n_valid:
                    who = ": a few proposals carry most of the importance weight"
                else:
                    who = ""
                n_conf = max(1, int(round(n_eff)))
                basis = (f"This result rests on {n_eff:.1f} effective samples (Kish ESS {100.0 * self.ess:.3g} % x "
                         f"{self.n_proposals} proposals; fewer than {FEW_EFFECTIVE_SAMPLES:g}){who}, so reweighted "
                         f"averages, resampled frames and their (bootstrap) error bars rest on about {n_conf} "
                         f"configuration{'s' if n_conf > 1 else ''}, not on the Boltzmann distribution.")
            if far:
                advice = f"Drawing more proposals will not help (see the HamiltonianMismatchWarning); {fixes}."
            elif self.n_valid and (n_eff >= 5.0 or self.n_proposals < _FEW_PROPOSALS):
                needed = int(np.ceil(FEW_EFFECTIVE_SAMPLES / max(self.ess, 1e-300)))
                advice = (f"Draw about {needed} proposals (sample(n) with a larger n), which gives "
                          f"{FEW_EFFECTIVE_SAMPLES:g} effective samples if the ESS fraction holds; or {_REFINE}.")
            elif not self.n_valid and self.n_proposals < _FEW_PROPOSALS:
                advice = (f"Draw more proposals (sample(n) with a larger n); if few stay valid, {fixes}.")
            else:
                advice = (f"More proposals are unlikely to help: the model does not represent this System's "
                          f"Boltzmann distribution well. {fixes[0].upper() + fixes[1:]}.")
            out.append((FewEffectiveSamplesWarning, f"{basis} {advice}"))
        k = self.pareto_k
        if k is not None and np.isfinite(k) and k > PARETO_K_RELIABLE:
            tail = ("their mean and variance are likely infinite, so more proposals do not make the estimates "
                    "converge" if k >= 1 else "their variance is likely infinite, so the error of reweighted "
                    "averages falls much more slowly than 1/sqrt(n)")
            out.append((UnreliableWeightsWarning,
                        f"The importance weights have a heavy tail: Pareto k = {k:.2f}, above "
                        f"{PARETO_K_RELIABLE:g} (Vehtari et al., Pareto smoothed importance sampling): {tail}. The "
                        f"Kish ESS ({100.0 * self.ess:.3g} %), reweighted averages and their error "
                        f"bars can be far off, and repeated runs disagree by much more than those error bars: a few "
                        f"proposals where the flow's density is far below the Boltzmann density carry the weight. "
                        f"For trustworthy numbers {_HYBRID}, and compare independent runs."))
        return out

    def warn(self, stacklevel: int = 2) -> None:
        """Issue `problems` as Python warnings (``stacklevel`` as for `warnings.warn`, counted from the caller)."""
        for category, message in self.problems():
            warnings.warn(message, category, stacklevel=stacklevel + 1)

    def expectation(self, values) -> float:
        """Weighted average of per-sample ``values`` (rejected samples, weight 0, are ignored).

        Warns
        -----
        FewEffectiveSamplesWarning, HamiltonianMismatchWarning
            As listed by `problems`.
        """
        self.warn(stacklevel=2)
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
        FewEffectiveSamplesWarning, HamiltonianMismatchWarning
            As listed by `problems`.
        """
        integral = isinstance(k, (int, np.integer)) or (isinstance(k, float) and k.is_integer())
        if isinstance(k, bool) or not integral or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        k = int(k)
        ok = np.isfinite(self.log_weights)
        if not ok.any():
            raise RuntimeError(f"Cannot resample: none of the {self.n_proposals} samples is valid "
                               f"(rejections: {self.rejections}). Draw more samples or check the model.")
        self.warn(stacklevel=2)
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
            proposal_index=self.proposal_index[idx], hamiltonian_gap=self.hamiltonian_gap,
            training_hamiltonian=self.training_hamiltonian)
        n_eff = self.effective_samples
        logger.info("resample(%d): %d distinct configurations (ESS %.1f samples)", k, out.n_distinct, n_eff)
        if k > RESAMPLE_ESS_MARGIN * n_eff:
            warnings.warn(
                f"resample({k}): the importance weights are worth only {n_eff:.1f} effective samples (Kish ESS "
                f"{100.0 * self.ess:.2f} % x {self.n_proposals} proposals), so the {k} frames hold "
                f"{out.n_distinct} distinct configuration{'s' if out.n_distinct != 1 else ''} and {k - out.n_distinct} "
                f"repeat{'s' if k - out.n_distinct != 1 else ''}, and averages over them are no better than over "
                f"~{n_eff:.0f} samples. To get more independent configurations, {_REMEDIES}; or resample at most "
                f"~{max(1, int(np.floor(n_eff)))} frame{'s' if n_eff >= 2 else ''}.", SampleSizeWarning, stacklevel=2)
        return out

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the result to a ``.npz`` file (read back with `SampleResult.load`)."""
        meta = {"rejections": self.rejections, "n_proposals": self.n_proposals, "n_mirrored": self.n_mirrored,
                "n_relabelled": self.n_relabelled, "ess": self.ess, "acceptance_rate": self.acceptance_rate,
                "method": self.method, "temperature": self.temperature,
                "topology": topology_to_dict(self.topology), "hamiltonian_gap": self.hamiltonian_gap,
                "training_hamiltonian": self.training_hamiltonian, "format": "openmm_tbg.SampleResult",
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
                   proposal_index=arrays["proposal_index"], hamiltonian_gap=meta.get("hamiltonian_gap"),
                   training_hamiltonian=meta.get("training_hamiltonian", _DEFAULT_TRAINING))

    def summary(self, include_warnings: bool = True) -> str:
        """Method, valid fraction, ESS (as a fraction and in samples), distinct configurations, acceptance.

        Parameters
        ----------
        include_warnings : bool
            Start with one ``WARNING (Category): ...`` line per entry of `problems` (False: leave them out,
            e.g. where they are printed separately).
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
        k = self.pareto_k
        if k is not None and np.isfinite(k):
            text += f", Pareto k {k:.2f}"
        if self.acceptance_rate is not None:
            text += f", acceptance {100.0 * self.acceptance_rate:.1f} %"
        if self.hamiltonian_gap is not None:
            text += f", spread against the training Hamiltonian {self.hamiltonian_gap:.2f} kT"
        if include_warnings:
            lines = [f"WARNING ({category.__name__}): {message}" for category, message in self.problems()]
            text = "\n".join(lines + [text])
        return text
