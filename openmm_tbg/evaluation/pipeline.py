"""The evaluation pipeline: sample a peptide, build its MD reference, compute the metrics, draw the figures.

:func:`evaluate_peptide` does this for one peptide, in four steps (:func:`sample_peptide`,
:func:`md_reference`, :func:`peptide_metrics`, :func:`peptide_figures`); :func:`evaluate` runs it over a data
split and writes the report (:mod:`.report`).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..energy import to_kelvin
from ..utils import evenly_spaced, machine_line, portable_path, resolve_device
from ..weights import kish_ess
from .autocorrelation import md_independent_samples
from .metrics import TORUS_W2_MAX_SAMPLES, alpha_l_indicator, energy_w2, md_population, torus_w2, \
    weighted_population
from .plots import plot_energy_histogram, plot_ramachandran
from .report import write_report
from ..torsions import backbone_torsions, ramachandran_pairs, torsion_features

logger = logging.getLogger(__name__)


@dataclass
class PeptideSamples:
    """What :func:`sample_peptide` drew: the sampler's result and the MD frames' reduced potentials (kT)."""

    result: Any  # openmm_tbg.sampler.SampleResult
    n_samples: int
    u_md: np.ndarray
    md_energy_frames: int
    setup_s: float
    sample_wall_s: float
    model_path: Optional[str]
    model_sha256: Optional[str]


def _check_count(n_samples) -> int:
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    return int(n_samples)


def sample_peptide(model, trajectory, n_samples: int, seed: Optional[int], *, kelvin: float, batch_size: int,
                   device, md_energy_frames: Optional[int], sampler_options: Optional[dict],
                   progress: bool) -> PeptideSamples:
    """Draw importance-weighted samples on the data set's Hamiltonian and evaluate the MD frames' energies.

    The System is :func:`openmm_tbg.peptides.create_system` (amber14-all + implicit/obc1, CutoffNonPeriodic
    2 nm, no constraints) on the trajectory's topology; ``md_energy_frames`` evenly spaced MD frames (None: all)
    get their reduced potentials from the same sampler.
    """
    from ..peptides import create_system
    from ..sampler import BoltzmannGeneratorSampler

    t_setup = time.perf_counter()
    sampler = BoltzmannGeneratorSampler(create_system(trajectory.topology), trajectory.topology, model=model,
                                        temperature=kelvin, device=device, batch_size=batch_size, seed=seed,
                                        encoding=trajectory.encoding, positions=trajectory.positions[0],
                                        options=sampler_options)
    setup_s = time.perf_counter() - t_setup
    try:
        t0 = time.perf_counter()
        result = sampler.sample(int(n_samples), method="importance", progress=progress)
        sample_wall_s = time.perf_counter() - t0
        md_idx = evenly_spaced(trajectory.n_frames, md_energy_frames)
        u_md = sampler.reduced_potential(trajectory.positions[md_idx].astype(np.float64))
    finally:
        sampler.close()
    return PeptideSamples(result, int(n_samples), u_md, len(md_idx), setup_s, sample_wall_s, sampler.model_path,
                          sampler.model_sha256)


def md_reference(trajectory, frame_stride: int = 1) -> dict[str, Any]:
    """Backbone torsions, torus features, alpha-L population and autocorrelation of the MD frames.

    Also the split of the frames into two independent halves (even vs odd runs; first vs second half for a
    single run) from which the MD floor of torus-W2 is computed.
    """
    phi, psi = backbone_torsions(trajectory.positions, trajectory.topology)
    features = torsion_features(phi, psi)
    run_ids = np.unique(trajectory.run)
    # A random frame split of correlated frames would make the floor too optimistic: split by run.
    if len(run_ids) > 1:
        half = np.isin(trajectory.run, run_ids[::2])
    else:
        half = np.arange(len(features)) < len(features) // 2
    return {"phi": phi, "psi": psi, "features": features, "half": half,
            "alpha_l": md_population(alpha_l_indicator(phi), trajectory.run),
            "autocorrelation": md_independent_samples(phi, psi, trajectory.run, trajectory.run_interval_ps,
                                                      frame_stride=frame_stride)}


def _if_any(condition: bool, fn, *args, **kwargs) -> float:
    """fn(*args) if ``condition`` else NaN: without valid samples a distance is undefined, not zero."""
    return float(fn(*args, **kwargs)) if condition else float("nan")


def _bg_torsions(samples: PeptideSamples, md: dict[str, Any], topology) -> tuple[np.ndarray, np.ndarray]:
    valid = samples.result.valid
    if valid.any():
        return backbone_torsions(samples.result.positions[valid], topology)
    return np.zeros((0, md["phi"].shape[1])), np.zeros((0, md["psi"].shape[1]))


def peptide_metrics(trajectory, samples: PeptideSamples, md: dict[str, Any], *, kelvin: float,
                    torus_samples: int, rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON-able metrics of one peptide, and the arrays the figures need (``u_md``, ``u_bg``, ``w_bg``,
    ``phi_bg``, ``psi_bg``). ``rng`` draws the torus-W2 subsamples (MD floor, raw, reweighted, in that order)."""
    result, name = samples.result, trajectory.name
    n_md_bad = int(np.sum(~np.isfinite(samples.u_md)))
    if n_md_bad:
        logger.warning("%s: %d MD frame(s) have non-finite energies and are left out of energy-W2.", name, n_md_bad)
    u_md = samples.u_md[np.isfinite(samples.u_md)]
    valid, lw = result.valid, result.log_weights
    u_bg = result.reduced_potentials[valid]
    w_bg = np.exp(lw[valid] - lw[valid].max()) if valid.any() else np.zeros(0)
    phi_bg, psi_bg = _bg_torsions(samples, md, trajectory.topology)
    feat_md, feat_bg, half = md["features"], torsion_features(phi_bg, psi_bg), md["half"]
    n_cmp = min(torus_samples, int(valid.sum()), int(half.sum()), int((~half).sum()))
    md_floor = torus_w2(feat_md[half], feat_md[~half], max_samples=n_cmp, seed=rng) if n_cmp >= 2 else float("nan")
    ind_bg = np.zeros(len(valid))
    ind_bg[valid] = alpha_l_indicator(phi_bg) if valid.any() else []
    n, ess = samples.n_samples, float(result.ess)
    has_bg = bool(valid.any()) and len(u_md) > 0
    if not valid.any():
        logger.warning("%s: none of the %d samples is valid (%s); W2 distances are undefined (NaN).", name, n,
                       {k: v for k, v in result.rejections.items() if v})
    out = {
        "name": name, "sequence": getattr(trajectory.encoding, "sequence", name),
        "n_atoms": int(trajectory.n_atoms), "temperature_K": kelvin, "n_samples": n,
        "n_valid": int(valid.sum()), "valid_fraction": float(valid.mean()), "rejections": dict(result.rejections),
        "n_mirrored": int(result.n_mirrored), "n_relabelled": int(result.n_relabelled),
        "ess": ess, "ess_valid": float(kish_ess(lw[valid]) if valid.any() else 0.0),
        "pareto_k": float(result.pareto_k),
        "energy_w2_raw": _if_any(has_bg, energy_w2, u_md, u_bg),
        "energy_w2_reweighted": _if_any(has_bg, energy_w2, u_md, u_bg, w_bg),
        "torus_w2_raw": _if_any(has_bg, torus_w2, feat_md, feat_bg, max_samples=torus_samples, seed=rng),
        "torus_w2_reweighted": _if_any(has_bg, torus_w2, feat_md, feat_bg, w_bg, max_samples=torus_samples,
                                       seed=rng),
        "torus_w2_md_baseline": float(md_floor), "torus_w2_samples": int(torus_samples),
        "md_energy_frames": samples.md_energy_frames, "md_energy_non_finite": n_md_bad,
        "mean_u_md": float(u_md.mean()) if len(u_md) else float("nan"),
        "alpha_l_md": md["alpha_l"], "alpha_l_bg": weighted_population(ind_bg, np.where(valid, lw, -np.inf)),
        "alpha_l_bg_raw": weighted_population(ind_bg, np.where(valid, 0.0, -np.inf)),
        "md_autocorrelation": md["autocorrelation"], "md_frames": int(trajectory.n_frames),
        "setup_s": float(samples.setup_s), "sample_wall_s": float(samples.sample_wall_s),
        "samples_per_s": float(n / samples.sample_wall_s),
        "effective_samples_per_s": float(ess * n / samples.sample_wall_s),
        "model_path": portable_path(samples.model_path), "model_sha256": samples.model_sha256, "figures": {},
    }
    return out, {"u_md": u_md, "u_bg": u_bg, "w_bg": w_bg, "phi_bg": phi_bg, "psi_bg": psi_bg}


def peptide_figures(metrics: dict[str, Any], arrays: dict[str, np.ndarray], md: dict[str, Any],
                    out_dir: Union[str, os.PathLike]) -> dict[str, str]:
    """Write ``{name}_ramachandran.png`` and ``{name}_energy.png`` into ``out_dir``; returns kind -> path."""
    name, w_bg = metrics["name"], arrays["w_bg"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rama = out_dir / f"{name}_ramachandran.png"
    energy = out_dir / f"{name}_energy.png"
    pairs_bg = ramachandran_pairs(arrays["phi_bg"], arrays["psi_bg"])
    # ramachandran_pairs stacks residue after residue, so each frame's weight repeats once per residue.
    per_sample = len(pairs_bg) // len(w_bg) if len(w_bg) else 1
    plot_ramachandran(ramachandran_pairs(md["phi"], md["psi"]), pairs_bg, np.tile(w_bg, per_sample), rama,
                      title=f"{name}: {metrics['n_samples']} BG samples, ESS {100 * metrics['ess']:.2f} %",
                      pairs_per_sample=per_sample)
    plot_energy_histogram(arrays["u_md"], arrays["u_bg"], w_bg, energy,
                          title=f"{name}: reduced energies at {metrics['temperature_K']:g} K")
    return {"ramachandran": str(rama), "energy": str(energy)}


def evaluate_peptide(model, trajectory, n_samples: int = 1000, seed: Optional[int] = 0, *,
                     out_dir: Union[str, os.PathLike, None] = None, temperature=310.0, batch_size: int = 256,
                     device="auto", md_energy_frames: Optional[int] = 2000,
                     torus_samples: int = TORUS_W2_MAX_SAMPLES, frame_stride: int = 1,
                     sampler_options: Optional[dict] = None, progress: bool = True) -> dict:
    """Sample one peptide with the Boltzmann generator and compare it with its MD frames.

    Builds the System of the data set's Hamiltonian (:func:`openmm_tbg.peptides.create_system`: amber14-all +
    implicit/obc1, CutoffNonPeriodic 2 nm, no constraints) on the trajectory's topology, draws ``n_samples``
    importance-weighted samples, and computes the valid fraction (rejections by reason), Kish ESS,
    energy-W2 (kT) and torus-W2 (rad) of all backbone torsions, raw and reweighted, the alpha-L (phi > 0)
    population in MD (between-run error) and BG (ESS-based error), MD autocorrelation times, and timings.

    Parameters
    ----------
    model : None, str, path or TransferableFlow
        None (or ``"default"``): the shipped model; a checkpoint path; or a flow.
    trajectory : openmm_tbg.data.PeptideTrajectory
        MD reference frames (consecutive frames of each run, every ``frame_stride``-th stored frame).
    n_samples : int
        Flow proposals.
    seed : int, optional
        Seeds the flow prior and the W2 subsampling.
    out_dir : path, optional
        Where ``{name}_ramachandran.png`` and ``{name}_energy.png`` are written; None writes no figures.
    temperature : float or Quantity
        Kelvin (the data set: 310 K).
    batch_size, device
        Passed to :class:`~openmm_tbg.sampler.BoltzmannGeneratorSampler`.
    md_energy_frames : int, optional
        Evenly spaced MD frames whose energies are evaluated for energy-W2 (None: all frames).
    torus_samples : int
        Subsample size per side for `torus_w2`.
    frame_stride : int
        Stride with which the trajectory was loaded (for autocorrelation times).
    sampler_options : dict, optional
        The sampler's ``options`` (`openmm_tbg.ODEOptions` fields for the CNF, e.g. ``{"method": "rk4",
        "step_size": 0.1}``; None: the family's defaults).
    progress : bool

    Returns
    -------
    dict
        JSON-able metrics (see ``results.md`` columns); keys include ``name``, ``n_atoms``, ``n_samples``,
        ``n_valid``, ``valid_fraction``, ``rejections``, ``ess``, ``ess_valid``, ``energy_w2_raw``,
        ``energy_w2_reweighted``, ``torus_w2_raw``, ``torus_w2_reweighted``, ``torus_w2_md_baseline``,
        ``alpha_l_md``, ``alpha_l_bg_raw``, ``alpha_l_bg``, ``md_autocorrelation``, ``sample_wall_s``,
        ``samples_per_s``, ``effective_samples_per_s``, ``figures``.
    """
    n_samples = _check_count(n_samples)
    kelvin = to_kelvin(temperature)
    rng = np.random.default_rng(seed)
    samples = sample_peptide(None if model == "default" else model, trajectory, n_samples, seed, kelvin=kelvin,
                             batch_size=batch_size, device=device, md_energy_frames=md_energy_frames,
                             sampler_options=sampler_options, progress=progress)
    md = md_reference(trajectory, frame_stride)
    out, arrays = peptide_metrics(trajectory, samples, md, kelvin=kelvin, torus_samples=torus_samples, rng=rng)
    if out_dir is not None:
        out["figures"] = peptide_figures(out, arrays, md, out_dir)
    logger.info("%s: valid %.1f %%, ESS %.2f %%, E-W2 %.3g/%.3g kT, T-W2 %.3g/%.3g rad", out["name"],
                100 * out["valid_fraction"], 100 * out["ess"], out["energy_w2_raw"], out["energy_w2_reweighted"],
                out["torus_w2_raw"], out["torus_w2_reweighted"])
    return out


def evaluate(model, data_dir, split: Optional[str] = "test", n_samples: int = 1000, *,
             peptides: Optional[Sequence[str]] = None, out_dir: Union[str, os.PathLike] = "docs", seed: int = 0,
             device="auto", batch_size: int = 256, md_energy_frames: Optional[int] = 2000,
             torus_samples: int = TORUS_W2_MAX_SAMPLES, temperature=310.0, sampler_options: Optional[dict] = None,
             command_line: Optional[str] = None, progress: bool = True) -> list[dict]:
    """Evaluate a model on the peptides of a data split; write ``results.md``, ``results.json`` and figures.

    Parameters
    ----------
    model : None, "default", str, path or TransferableFlow
        The shipped model, a checkpoint, or a flow.
    data_dir : path
        Data-set directory (``XY.pdb``, ``XY.npz``, ``splits.json``).
    split : str, optional
        Split of ``splits.json`` (ignored when ``peptides`` is given).
    n_samples : int
        Flow proposals per peptide.
    peptides : sequence of str, optional
        Explicit peptide names.
    out_dir : path
        ``results.md`` and ``results.json`` go here, figures into ``out_dir/figures/``.
    seed : int
        Base seed; peptide ``i`` uses ``seed + i``.
    temperature : float or openmm.unit.Quantity
        Kelvin; checked before anything is sampled.
    device, batch_size, md_energy_frames, torus_samples, sampler_options, progress
        See :func:`evaluate_peptide`.
    command_line : str, optional
        Recorded in the header.

    Returns
    -------
    list of dict
        One :func:`evaluate_peptide` result per peptide.
    """
    from ..data import load_dataset
    from ..checkpoint import resolve_model

    kelvin = to_kelvin(temperature)  # a wrong unit fails here, not after every peptide has been sampled
    n_samples = _check_count(n_samples)
    dev = resolve_device(device)
    flow, model_path, sha = resolve_model(None if model == "default" else model, dev)  # loaded once
    trajectories = load_dataset(data_dir, split=None if peptides else split, names=peptides, progress=progress)
    out_dir = Path(out_dir)
    results = []
    for i, traj in enumerate(trajectories):
        logger.info("Evaluating %s (%d/%d)", traj.name, i + 1, len(trajectories))
        res = evaluate_peptide(flow, traj, n_samples, seed=seed + i, out_dir=out_dir / "figures", temperature=kelvin,
                               batch_size=batch_size, device=dev, md_energy_frames=md_energy_frames,
                               torus_samples=torus_samples, sampler_options=sampler_options, progress=progress)
        res["model_path"], res["model_sha256"] = portable_path(model_path), sha
        results.append(res)
    header = {  # paths as portable_path cites them: a report never records where the files lay on this machine
        "model": f"{portable_path(model_path) or '(in-memory flow)'}" + (f" (sha256 {sha[:16]}...)" if sha else ""),
        "data": f"{portable_path(data_dir)}, " + (f"peptides {', '.join(peptides)}" if peptides else
                                                    f"split {split!r}"),
        "samples per peptide": f"{n_samples} (importance weights; seed {seed})",
        "target": f"amber14-all + implicit/obc1, CutoffNonPeriodic 2 nm, no constraints, {kelvin:g} K",
        "machine": machine_line(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if command_line:
        header["command"] = f"`{command_line}`"
    write_report(results, out_dir, header)
    return results
