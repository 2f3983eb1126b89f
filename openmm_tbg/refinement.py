"""Refining a flow on one user's System with the Hamiltonian as the teacher: no MD needed.

`refine` starts from any internal-coordinate model (the shipped one by default) and trains it on the System the
sampler was built for, within a budget of seconds or steps. Each step minimises

    kl_weight * E_q[u_reg(x) + log q(x)] / n_dof  +  ml_weight * E_{pi_beta}[-log q(x)] / n_dof

- The first term is the reverse KL divergence ``KL(q || p)`` up to ``log Z``, differentiated through the flow's
  sampling path with OpenMM forces (`openmm_tbg.energy.reduced_potential_torch`; ``u_reg`` flattens clashes for
  the gradient only). It removes clashes and broken rings fast (valid proposals 96.8 -> 99.8 % on the test
  dipeptides in 5 minutes), but alone it is mode-seeking.
- The second is maximum likelihood on a replay buffer of the model's own valid proposals, resampled by
  tempered importance weights ``w^beta`` with ``w = exp(-u - log q_proposal)``: the target ``pi_beta`` lies
  between the proposals and the Boltzmann distribution. ``beta`` is the largest value in (0, 1] at which the
  buffer's Kish ESS is at least ``buffer_ess`` of its size, so that a round never learns only a handful of
  configurations (the naive ``beta = 1`` run of issue 20 at 1 % ESS did exactly that), and it rises to 1 as the proposals improve.
  This term keeps (and re-weights) the basins the proposals visit, but it follows the weights: a basin whose
  proposals are poor (low weights) is proposed less. On the test dipeptides that drained alpha-L (median raw
  proposals 1.0 -> 0.1 % in 5 minutes; docs/performance.md).
- ``anchor_weight * E_{q_parent}[-log q(x)] / n_dof`` on fresh raw proposals of the starting model, which
  holds the basins the parent proposes (0.5 by default, chosen on train peptides; 0 switches it off).

Every ``eval_every`` steps the current model draws ``eval_samples`` fresh proposals through the exact sampling
path (`BoltzmannGeneratorSampler.propose`): their Kish ESS, the Pareto k of their weights
(`openmm_tbg.weights.pareto_k`) and the valid fraction are shown on the progress bar; the state with the lowest
reverse-KL estimate on them is kept, and the run stops early after ``patience`` evaluations without improvement.
At the end a final check draws ``final_check_samples`` fresh proposals of the starting model and of that state,
and returns the state only if its weights' tail is lighter (lower Pareto k); otherwise it returns the starting
model's weights. In 2-minute runs on train peptides (`benchmarks/refine_tails.py --split train`, mean k of three
draws of 2000 proposals, 2026-12-06) no setting lowered k beyond its noise (about 0.1) and most raised it, which
the Kish ESS of the evaluations could not show: KE 0.81 -> 1.01 with the default objective, 0.98 with the buffer
likelihood alone, 0.94 with reverse KL alone; FS 0.77 -> 0.80 with the default.
The true ``u`` and the exact ``log q`` enter every reported weight; the regularisation and tempering are for
training only.

The refined model is a model like any other: `BoltzmannGeneratorSampler`, `TBGMove` and ``openmm-tbg sample``
load its checkpoint, whose metadata record the parent model's sha256 and a fingerprint of the System,
Topology and temperature it was refined for (`system_fingerprint`); a sampler built for another System warns
(`RefinedForAnotherSystemWarning`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from .weights import kish_ess, pareto_k

logger = logging.getLogger(__name__)

__all__ = ["refine", "reverse_kl_terms", "RefinementOptions", "RefinementResult", "ReplayBuffer", "system_fingerprint",
           "tempering_exponent", "RefinedForAnotherSystemWarning", "check_refined_for"]


class RefinedForAnotherSystemWarning(UserWarning):
    """A refined model is used on a System, Topology or temperature other than the one it was refined for."""


def system_fingerprint(system, topology) -> dict[str, str]:
    """sha256 fingerprints of a System (its XML serialization) and of a Topology (atoms, residues, bonds).

    Returns
    -------
    dict
        ``{"system_sha256": ..., "topology_sha256": ...}``.
    """
    import openmm

    system_hash = hashlib.sha256(openmm.XmlSerializer.serialize(system).encode()).hexdigest()
    h = hashlib.sha256()
    for atom in topology.atoms():
        h.update(f"{atom.index}:{atom.name}:{atom.residue.name}:{atom.residue.index};".encode())
    for a, b in topology.bonds():
        h.update(f"{min(a.index, b.index)}-{max(a.index, b.index)};".encode())
    return {"system_sha256": system_hash, "topology_sha256": h.hexdigest()}


def check_refined_for(flow, system, topology, temperature_k: float) -> Optional[str]:
    """Warn (`RefinedForAnotherSystemWarning`) if ``flow`` was refined for another System, Topology or
    temperature; return the message (None when it matches or the model is not a refined one)."""
    info = (getattr(flow, "checkpoint_metadata", None) or {}).get("refinement")
    if not info:
        return None
    fingerprint = system_fingerprint(system, topology)
    differs = [what for what, key in (("System", "system_sha256"), ("Topology", "topology_sha256"))
               if info.get(key) != fingerprint[key]]
    if abs(float(info.get("temperature_k", temperature_k)) - float(temperature_k)) > 1e-6:
        differs.append(f"temperature ({info.get('temperature_k')} K, here {temperature_k:g} K)")
    if not differs:
        return None
    message = (f"This model was refined for another {', '.join(differs)} ({info.get('sequence', '?')}); its "
               "importance weights stay exact here, but its proposals were tuned for the other one and may be "
               "poor. Refine it for this System (sampler.refine(...) or `openmm-tbg refine`), or use the "
               "parent model.")
    warnings.warn(message, RefinedForAnotherSystemWarning, stacklevel=3)
    return message


def tempering_exponent(log_w: np.ndarray, target_ess: float, tol: float = 1e-3) -> float:
    """The largest ``beta`` in (0, 1] with ``kish_ess(beta * log_w) >= target_ess`` (bisection; the Kish ESS of
    tempered weights falls as ``beta`` grows)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if not np.isfinite(log_w).any() or kish_ess(log_w) >= target_ess:
        return 1.0
    low, high = 0.0, 1.0
    while high - low > tol:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if kish_ess(mid * log_w) >= target_ess else (low, mid)
    return max(low, tol)


class ReplayBuffer:
    """The model's own valid proposals as whitened coordinates with their log importance weights.

    The log weight of each entry is ``-u - log q`` of the model that proposed it, which makes it an importance
    weight towards the Boltzmann distribution whichever model that was. The oldest entries leave first.
    """

    def __init__(self, capacity: int):
        if int(capacity) < 1:
            raise ValueError(f"buffer capacity must be a positive integer, got {capacity}.")
        self.capacity = int(capacity)
        self.z: Optional[torch.Tensor] = None
        self.log_w = np.zeros(0)

    def __len__(self) -> int:
        return len(self.log_w)

    def add(self, z: torch.Tensor, log_w: np.ndarray) -> None:
        keep = np.isfinite(log_w)
        if not keep.any():
            return
        z = z[torch.as_tensor(keep)].detach().float().cpu()
        self.z = (z if self.z is None else torch.cat([self.z, z]))[-self.capacity:]
        self.log_w = np.concatenate([self.log_w, np.asarray(log_w)[keep]])[-self.capacity:]

    def draw(self, k: int, rng: np.random.Generator, target_ess: float) -> tuple[torch.Tensor, float]:
        """``k`` entries resampled with probabilities ``w^beta`` (`tempering_exponent`); returns them and
        ``beta``."""
        beta = tempering_exponent(self.log_w, target_ess)
        lw = beta * self.log_w
        p = np.exp(lw - lw.max())
        index = rng.choice(len(p), size=int(k), replace=True, p=p / p.sum())
        return self.z[torch.as_tensor(index)], beta


@dataclass
class RefinementOptions:
    """Settings of `refine` (chosen on training peptides; see ``benchmarks/refine_curve.py``).

    Attributes
    ----------
    max_seconds : float or None
        Wall-clock budget, s (None: no limit; then ``max_steps`` must be given). Evaluations count.
    max_steps : int or None
        Optimisation steps at most.
    batch_size : int
        Proposals per step for the reverse-KL term (each also enters the buffer).
    learning_rate : float
        Adam step size.
    kl_weight, ml_weight : float
        Weights of the reverse-KL and buffer maximum-likelihood terms (0 switches a term off; at least one
        must be positive).
    buffer_size : int
        Replay buffer capacity (proposals).
    ml_batch_size : int
        Buffer entries per step for the maximum-likelihood term.
    buffer_ess : float
        Kish ESS fraction the tempered buffer weights keep at least (sets ``beta``).
    anchor_weight : float
        Weight of the likelihood of fresh raw proposals of the starting model (``KL(parent || q)``), which keeps
        the basins the parent proposes proposed (0: off). The default 0.5 was chosen on train peptides
        (`benchmarks/refine_objectives.py`, 2026-12-03): against 0 it gave a higher ESS on KE, AD and FS and
        drained fewer basins (FS raw alpha-L 8.2 -> 2.6 % instead of 1.5 %, KE raw alpha-R 20 -> 14 % instead
        of 7 %); it costs a pass of the starting model per step (about half the steps in a budget).
    energy_cutoff : float
        kT above the batch minimum where the energy's gradient is flattened (`openmm_tbg.energy.regularise`).
        On KE (train split, 90 s) 100 kT took the 5th percentile of log w from -342 to -136 and the valid
        fraction from 95.8 to 99.5 %, where 1000 kT left clashes dominating the gradient.
    grad_clip : float
        Gradient-norm clip (0: none).
    eval_every : int
        Steps between evaluations on fresh proposals.
    eval_samples : int
        Fresh proposals per evaluation.
    patience : int
        Stop after this many evaluations without a new best state (0: never stop early). The best state is
        the one with the lowest regularised reverse-KL estimate on fresh proposals (`_evaluate`), which must
        drop by more than its standard error; the Kish ESS of a thousand proposals is too noisy to choose by.
    final_check_samples : int
        At the end, this many fresh proposals of the starting model and of the best state each; the refined
        state is kept only if its weights' Pareto k (`openmm_tbg.weights.pareto_k`) is lower than the
        starting model's, since a heavier tail makes its ESS and estimates less reliable; otherwise the
        starting model's weights are returned (``RefinementResult.kept``). Where either k cannot be fitted, the
        higher Kish ESS decides. The time of these proposals is reserved in ``max_seconds``. 0: no check (the
        best state is returned). Measured on the train peptide KE (`benchmarks/refine_tails.py`, 2026-12-06,
        2 minutes): the default objective took k from 0.81 to 1.01 (mean of three draws of 2000) and the
        draws' Kish ESS from 2.18 / 0.90 / 1.33 % to 0.90 / 0.14 / 0.87 %; without the check that state was
        returned.
    """

    max_seconds: Optional[float] = 300.0
    max_steps: Optional[int] = None
    batch_size: int = 64
    learning_rate: float = 1e-4
    kl_weight: float = 0.1
    ml_weight: float = 1.0
    buffer_size: int = 8192
    ml_batch_size: int = 64
    buffer_ess: float = 0.1
    anchor_weight: float = 0.5
    energy_cutoff: float = 100.0
    grad_clip: float = 10.0
    eval_every: int = 40
    eval_samples: int = 1024
    patience: int = 4
    final_check_samples: int = 2048

    def validate(self) -> None:
        if self.max_seconds is None and self.max_steps is None:
            raise ValueError("refine needs a budget: give max_seconds, max_steps or both.")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}.")
        if self.max_steps is not None and int(self.max_steps) < 0:
            raise ValueError(f"max_steps must be non-negative, got {self.max_steps}.")
        for name in ("batch_size", "buffer_size", "ml_batch_size", "eval_every", "eval_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be non-negative, got {self.anchor_weight}.")
        if self.kl_weight < 0 or self.ml_weight < 0 or self.kl_weight + self.ml_weight <= 0:
            raise ValueError(f"kl_weight and ml_weight must be non-negative and not both zero, got "
                             f"{self.kl_weight} and {self.ml_weight}.")
        if not 0 < self.buffer_ess <= 1:
            raise ValueError(f"buffer_ess must lie in (0, 1], got {self.buffer_ess}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if int(self.patience) < 0:
            raise ValueError(f"patience must be non-negative, got {self.patience}.")
        if int(self.final_check_samples) < 0:
            raise ValueError(f"final_check_samples must be non-negative, got {self.final_check_samples}.")


@dataclass
class RefinementResult:
    """What `refine` did.

    Attributes
    ----------
    history : list of dict
        One entry per evaluation: ``step``, ``seconds`` (wall, s), ``ess`` (Kish fraction of fresh proposals),
        ``pareto_k`` (their weights' tail shape, `openmm_tbg.weights.pareto_k`), ``valid`` (fraction), ``beta``
        (buffer tempering), ``loss_kl`` and ``loss_ml`` (per DOF, mean since the last evaluation), ``buffer``
        (entries).
    best_step, best_ess : int, float
        The evaluation whose state the refined model holds.
    steps : int
        Optimisation steps taken.
    seconds : float
        Wall time in all, s.
    n_energy_evaluations : int
        Energies (and forces) OpenMM computed, evaluations included.
    stopped : str
        ``"max_seconds"``, ``"max_steps"`` or ``"no_improvement"``.
    kept : str
        ``"refined"`` (the best state) or ``"parent"`` (the starting model's weights are returned: no evaluation
        improved on them, or the final check found their tail lighter).
    final_check : dict
        ``{"parent": ..., "refined": ...}``: ``ess``, ``pareto_k`` and ``valid`` of each model's
        ``final_check_samples`` fresh proposals (empty without the check).
    model_path, sha256 : str or None
        The saved checkpoint (``out``), if any.
    """

    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_ess: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    n_energy_evaluations: int = 0
    stopped: str = ""
    kept: str = "refined"
    final_check: dict = field(default_factory=dict)
    model_path: Optional[str] = None
    sha256: Optional[str] = None

    def summary(self) -> str:
        first, best, nan = (self.history[0] if self.history else {}), self._best(), float("nan")
        text = (f"refined for {self.seconds:.0f} s, {self.steps} steps ({self.stopped}): ESS "
                f"{100 * first.get('ess', nan):.2f} % -> {100 * self.best_ess:.2f} % (best at step "
                f"{self.best_step}), Pareto k {first.get('pareto_k', nan):.2f} -> {best.get('pareto_k', nan):.2f}, "
                f"valid {100 * first.get('valid', nan):.1f} % -> {100 * best.get('valid', nan):.1f} %, "
                f"{self.n_energy_evaluations} energies")
        if self.kept == "parent" and not self.final_check:
            text += "; no evaluation improved on the starting model: its weights are returned"
        if self.final_check:
            parent, refined = self.final_check["parent"], self.final_check["refined"]
            text += (f"; final check on {self.final_check['samples']} proposals each: Pareto k "
                     f"{parent['pareto_k']:.2f} (start) vs {refined['pareto_k']:.2f} (refined), ESS "
                     f"{100 * parent['ess']:.2f} % vs {100 * refined['ess']:.2f} %: "
                     + ("kept the refined state" if self.kept == "refined" else
                        "kept the starting model's weights (refining made the weights' tail heavier)"))
        return text

    def _best(self) -> dict:
        for entry in self.history:
            if entry["step"] == self.best_step:
                return entry
        return {}


def reverse_kl_terms(flow, context, n: int, potential, generator: Optional[torch.Generator], *, checker=None,
                     cutoff: float = 1000.0, whitened: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                     ) -> dict[str, torch.Tensor]:
    """``n`` reparameterised draws with the terms of the reverse KL divergence ``E_q[u(x) + log q(x)]``.

    Parameters
    ----------
    flow : InternalCoordinateFlow
        Anything with ``rsample`` (`InternalCoordinateFlow.rsample`).
    context : the flow's per-molecule context
    n : int
    potential : ReducedPotential
        The target Hamiltonian at its temperature.
    generator : torch.Generator
    checker : ValidityChecker, optional
        Draws it rejects (bond graph, chirality) are marked invalid: the target gives them no mass.
    cutoff : float
        Regularisation of the energy's gradient (`openmm_tbg.energy.regularise`), kT.
    whitened : (z, log_q), optional
        Take these ``n`` whitened draws with their ``log q(z)`` instead of drawing (`rsample_from_whitened`; e.g. a
        per-system adapter's image of a pool of the frozen layers' draws); ``generator`` is then unused.

    Returns
    -------
    dict
        ``x``, ``log_q`` and ``u_reg`` (differentiable), ``u`` (true reduced potential), ``valid`` (bool: inside
        the flow's support, accepted by ``checker``, finite energy), ``z`` (whitened coordinates, detached).
        ``(u_reg + log_q)[valid]`` are the per-draw terms; the unbiased estimate of
        ``E_q[(u + log q) 1_valid]`` is their sum over ``n``.
    """
    from .energy import reduced_potential_torch

    if whitened is None:
        draws = flow.rsample(context, n, generator)
    else:
        draws = flow.rsample_from_whitened(context, *whitened)
    x = draws["x"]
    valid = draws["inside"]
    if checker is not None:
        report = checker(x.detach().double().cpu().numpy())
        valid = valid & torch.as_tensor(report.valid, device=x.device)
    u_reg, u = reduced_potential_torch(potential, x, cutoff)
    valid = valid & torch.isfinite(u)
    return {"x": x, "log_q": draws["log_q"], "u_reg": u_reg, "u": u, "valid": valid, "z": draws["z"]}


def _evaluate(sampler, n: int, cutoff: float) -> dict[str, float]:
    """Fresh proposals through the sampler's exact path: Kish ESS, valid fraction, and the selection score.

    The score estimates the reverse KL divergence up to ``log Z`` with the regularised energy,
    ``mean_valid(u_reg + log q) - log(valid fraction)``, with its standard error. At ESS of a few per cent a Kish
    ESS of 1000 proposals varies by a factor of 3 from draw to draw (heavy-tailed weights), so it cannot tell
    a better state from a worse one; the score's error is a small fraction of a nat.
    """
    from .energy import regularise

    p = sampler.propose(n, progress=False)
    valid = p["valid"]
    log_w = np.where(valid, -p["u"] - p["log_q"], -np.inf)
    out = {"ess": kish_ess(log_w), "pareto_k": pareto_k(log_w), "valid": float(valid.mean()), "score": math.inf,
           "score_se": math.inf}
    if valid.sum() > 1:
        u_reg, _ = regularise(p["u"][valid], cutoff)
        terms = u_reg + p["log_q"][valid]
        out["score"] = float(terms.mean() - math.log(valid.mean()))
        out["score_se"] = float(terms.std(ddof=1) / math.sqrt(valid.sum()))
    return out


def _final_check(result: RefinementResult, probe, flow, parent, options: RefinementOptions) -> None:
    """Fresh proposals of the starting model and of ``flow`` (the best state); keep ``flow`` only if its weights'
    Pareto k is lower (or, where a k cannot be fitted, its Kish ESS higher); otherwise load the parent's weights
    into ``flow``. Fills ``result.kept`` and ``result.final_check``."""
    n = options.final_check_samples
    measured = {}
    for name, model in (("refined", flow), ("parent", parent)):
        probe.flow = model
        entry = _evaluate(probe, n, options.energy_cutoff)
        measured[name] = {key: entry[key] for key in ("ess", "pareto_k", "valid")}
    probe.flow = flow
    k_refined, k_parent = measured["refined"]["pareto_k"], measured["parent"]["pareto_k"]
    if math.isfinite(k_refined) and math.isfinite(k_parent):
        better = k_refined < k_parent
    else:
        better = measured["refined"]["ess"] > measured["parent"]["ess"]
    result.final_check = {"samples": n, **measured}
    if not better:
        flow.load_state_dict(parent.state_dict())
        result.kept, result.best_step, result.best_ess = "parent", 0, measured["parent"]["ess"]
    logger.info("refine final check (%d proposals each): Pareto k %.2f start, %.2f refined; kept the %s", n,
                k_parent, k_refined, "refined state" if better else "starting model's weights")


def refine(sampler, options: Optional[RefinementOptions] = None, *, seed: Optional[int] = 0,
           out: Optional[str | os.PathLike] = None, progress: bool = True,
           callback: Optional[Callable[[dict, dict], None]] = None, **overrides: Any):
    """Refine the sampler's flow on its own System; return a new sampler with the refined model.

    Parameters
    ----------
    sampler : BoltzmannGeneratorSampler
        With an internal-coordinate model (the CNF family is refused: see the error).
    options : RefinementOptions, optional
        Settings; keyword ``overrides`` (e.g. ``max_seconds=120``) replace single fields.
    seed : int or None
        Seeds the proposals, the buffer draws and the evaluations of this run.
    out : path, optional
        Write the refined model there (a checkpoint that `BoltzmannGeneratorSampler`, `TBGMove` and
        ``openmm-tbg sample`` load); without it the refined model stays in memory.
    progress : bool
        Show a bar with the ESS of the latest evaluation.
    callback : callable, optional
        Called after every evaluation with its history entry and the state dict of the best state so far
        (e.g. to record what shorter budgets would have returned, as ``benchmarks/refine_curve.py`` does).

    Returns
    -------
    BoltzmannGeneratorSampler
        For the same System, Topology, temperature and options, with the refined model; its attribute
        ``refinement`` is the `RefinementResult`.
    """
    from tqdm.auto import tqdm

    from .checkpoint import save_model
    from .utils import portable_path, spawn_generators

    options = copy.deepcopy(options) if options is not None else RefinementOptions()
    for key, value in overrides.items():
        if not hasattr(options, key):
            raise TypeError(f"refine got an unknown option {key!r}; the options are "
                            f"{sorted(asdict(RefinementOptions()))}.")
        setattr(options, key, value)
    options.validate()
    parent = sampler.flow
    if not hasattr(parent, "rsample"):
        raise ValueError(
            f"refine needs a flow whose samples are differentiable with an exact one-pass log q; the "
            f"{getattr(parent, 'family', type(parent).__name__)!r} family's exact log q costs 3N backward passes "
            "per ODE node, too slow to train on energies on a CPU. Use the internal-coordinate model "
            "(model='internal-coordinate', the default).")
    if out is not None:
        out = os.fspath(out)
        directory = os.path.dirname(os.path.abspath(out))
        if not os.access(directory if os.path.isdir(directory) else os.path.dirname(directory), os.W_OK):
            raise PermissionError(f"refine cannot write {out}: its directory is not writable. Pass another out.")

    rng, gen = spawn_generators(np.random.SeedSequence(seed), torch_first=False)
    flow = copy.deepcopy(parent).train()
    anchor = copy.deepcopy(parent).eval() if options.anchor_weight > 0 else None
    flow.checkpoint_metadata = dict(getattr(parent, "checkpoint_metadata", None) or {})
    context = sampler.context
    batch_one = flow._batch(context, options.ml_batch_size)
    n_dof = float(context.dof.sum())
    optimizer = torch.optim.Adam(flow.parameters(), lr=options.learning_rate)
    buffer = ReplayBuffer(options.buffer_size)
    # Evaluations go through a copy of the sampler that shares its checker and energies but draws from `flow`
    # with this run's own generators, so the caller's sampler and its random streams are untouched.
    probe = copy.copy(sampler)
    probe.flow = flow
    probe._rng, probe._torch_generator = spawn_generators(np.random.SeedSequence(
        None if seed is None else [int(seed), 1]), torch_first=True)
    potential = sampler.reduced_potential
    n_energies_before = potential.statistics["n_evaluated"]

    result = RefinementResult()
    start = time.perf_counter()
    best_state = copy.deepcopy(flow.state_dict())
    since_best = 0
    losses_kl: list[float] = []
    losses_ml: list[float] = []
    beta = 1.0

    def evaluate(step: int) -> bool:
        nonlocal best_state, since_best
        flow.eval()
        began = time.perf_counter()
        measured = _evaluate(probe, options.eval_samples, options.energy_cutoff)
        proposal_seconds.append((time.perf_counter() - began) / options.eval_samples)
        flow.train()
        entry = {"step": step, "seconds": time.perf_counter() - start, **measured, "beta": beta,
                 "loss_kl": float(np.mean(losses_kl)) if losses_kl else None,
                 "loss_ml": float(np.mean(losses_ml)) if losses_ml else None, "buffer": len(buffer)}
        best = result._best()
        result.history.append(entry)
        losses_kl.clear()
        losses_ml.clear()
        # A new best state needs a lower score by more than the noise of the comparison.
        improved = not best or entry["score"] < best["score"] - math.hypot(entry["score_se"], best["score_se"])
        if improved:
            result.best_step, result.best_ess = step, entry["ess"]
            best_state = copy.deepcopy(flow.state_dict())
            since_best = 0
        else:
            since_best += 1
        if callback is not None:
            callback(entry, best_state)
        logger.info("refine step %d, %.0f s: ESS %.2f %%, Pareto k %.2f, valid %.1f %%, score %.3f +- %.3f, "
                    "beta %.3f", step, entry["seconds"], 100 * entry["ess"], entry["pareto_k"], 100 * entry["valid"],
                    entry["score"], entry["score_se"], beta)
        return improved

    proposal_seconds: list[float] = []
    evaluate(0)
    # The final check draws 2 x final_check_samples proposals after the loop: reserve their time in the budget.
    reserve = 2 * options.final_check_samples * proposal_seconds[0]
    total = options.max_steps
    bar = tqdm(total=total, disable=not progress, desc="refine", unit="step", dynamic_ncols=True)
    bar.set_postfix(ess=f"{100 * result.best_ess:.2f}%", refresh=False)
    step = 0
    stopped = "max_steps"
    try:
        while True:
            if options.max_steps is not None and step >= options.max_steps:
                stopped = "max_steps"
                break
            if options.max_seconds is not None and time.perf_counter() - start >= options.max_seconds - reserve:
                stopped = "max_seconds"
                break
            draws = reverse_kl_terms(flow, context, options.batch_size, potential, gen, checker=sampler.checker,
                                     cutoff=options.energy_cutoff)
            valid, u_reg, u, log_q, x = draws["valid"], draws["u_reg"], draws["u"], draws["log_q"], draws["x"]
            buffer.add(draws["z"], np.where(valid.cpu().numpy(), (-u - log_q.detach()).cpu().numpy(), -np.inf))
            loss = torch.zeros((), dtype=torch.float64, device=x.device)
            if options.kl_weight > 0 and bool(valid.any()):
                kl = ((u_reg + log_q)[valid]).mean() / n_dof
                loss = loss + options.kl_weight * kl
                losses_kl.append(kl.item())
            if options.ml_weight > 0 and len(buffer):
                z, beta = buffer.draw(options.ml_batch_size, rng, options.buffer_ess)
                ml = -flow.log_prob_whitened(z.to(flow.device), batch_one).mean() / n_dof
                loss = loss + options.ml_weight * ml
                losses_ml.append(ml.item())
            if anchor is not None:
                with torch.no_grad():
                    z_parent, _ = anchor.sample_whitened(batch_one, gen)
                anchored = -flow.log_prob_whitened(z_parent, batch_one).mean() / n_dof
                loss = loss + options.anchor_weight * anchored
            if loss.requires_grad:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if options.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(flow.parameters(), options.grad_clip)
                optimizer.step()
            step += 1
            bar.update(1)
            if step % options.eval_every == 0:
                evaluate(step)
                bar.set_postfix(ess=f"{100 * result.history[-1]['ess']:.2f}%",
                                k=f"{result.history[-1]['pareto_k']:.2f}",
                                valid=f"{100 * result.history[-1]['valid']:.1f}%",
                                kl=f"{result.history[-1]['score']:.2f}", beta=f"{beta:.2f}", refresh=False)
                if options.patience and since_best >= options.patience:
                    stopped = "no_improvement"
                    break
    finally:
        bar.close()
    if result.history[-1]["step"] != step:
        evaluate(step)
    flow.load_state_dict(best_state)
    flow.eval()
    if result.best_step == 0:  # no evaluation beat the start: its weights are already the ones returned
        result.kept = "parent"
    elif options.final_check_samples:
        _final_check(result, probe, flow, parent, options)
    result.steps = step
    result.seconds = time.perf_counter() - start
    result.stopped = stopped
    result.n_energy_evaluations = int(potential.statistics["n_evaluated"] - n_energies_before)
    logger.info("%s", result.summary())

    fingerprint = system_fingerprint(sampler.system, sampler.topology)
    metadata = dict(flow.checkpoint_metadata)
    metadata["refinement"] = {
        "parent_sha256": sampler.model_sha256, "parent_path": portable_path(sampler.model_path),
        "sequence": getattr(sampler.encoding, "sequence", ""), "temperature_k": float(sampler.temperature),
        **fingerprint, "options": asdict(options), "seed": seed, "steps": result.steps,
        "seconds": result.seconds, "stopped": stopped, "kept": result.kept, "final_check": result.final_check,
        "best_step": result.best_step,
        "best_ess": result.best_ess, "history": result.history,
        "n_energy_evaluations": result.n_energy_evaluations}
    flow.checkpoint_metadata = metadata
    model: Any = flow
    if out is not None:
        result.sha256 = save_model(flow, out, metadata=metadata)
        result.model_path = out
        model = out
    else:
        flow.checkpoint_path, flow.checkpoint_sha256 = None, None
    refined = sampler.with_model(model)
    refined.refinement = result
    return refined
