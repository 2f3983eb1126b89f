"""``openmm-tbg sample``: draw Boltzmann-generator samples of a peptide from the command line.

Writes, for ``--output OUT.npz``:

- ``OUT.npz``: the `SampleResult` of all proposals (read with ``SampleResult.load``);
- ``OUT_valid.pdb`` + ``OUT_valid.dcd``: every valid sample (the PDB holds the topology and the first one);
- ``OUT_valid_weights.npz``: per frame of the DCD its normalised importance weight and log weight, reduced
  potential, flow log density and proposal index, plus the ESS and the seed;
- ``OUT_ramachandran.png``: backbone (phi, psi) of the valid samples, raw and reweighted (no MD data needed);
- with ``--resample K``: ``OUT_resampled.pdb`` + ``OUT_resampled.dcd``, K frames drawn by weight.

It prints what it wrote, the ESS in samples and how many distinct configurations the resampled frames hold.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional

import numpy as np

from .checkpoint import DEFAULT_FAMILY, SHIPPED_MODELS, resolve_model
from .flow import DEFAULT_MEMORY_BUDGET_MIB, DEFAULT_QUADRATURE_NODES
from .sampler import METHODS, BoltzmannGeneratorSampler
from .utils import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["configure_parser", "run_from_cli", "add_ode_arguments", "add_peptide_arguments",
           "sampling_options_from_args", "output_paths", "draw_seed", "peptide_from_args", "read_system_xml",
           "check_outputs_writable", "MODEL_HELP",
           "DEFAULT_SAMPLES", "DEFAULT_BATCH_SIZE", "DEFAULT_BATCH_SIZE_ONE_PASS"]

#: Default number of proposals: seconds with the default internal-coordinate model on one CPU core (1000 AA
#: samples: 8.5 s in all); with the CNF (``--model egnn-cnf``) hours, so pass a smaller --samples there.
DEFAULT_SAMPLES = 1000
#: Default batch by model family. The CNF's progress bar moves once per batch of minutes (its memory no longer
#: grows with the batch: the exact likelihoods' autograd graph is chunked to --memory-budget-mib); one-pass
#: families take large batches.
DEFAULT_BATCH_SIZE = {"egnn-cnf": 8}
DEFAULT_BATCH_SIZE_ONE_PASS = 256


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``openmm-tbg sample``."""
    add_peptide_arguments(parser)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help=f"number of flow proposals (default {DEFAULT_SAMPLES}): seconds with the default "
                             "internal-coordinate model; with the CNF (--model egnn-cnf) one CPU core drew 0.15 (AA) "
                             "to 0.049 (NY) samples per second (2026-12-03), so use e.g. --samples 32 there")
    parser.add_argument("--method", choices=METHODS, default="importance",
                        help="importance weights (default), an independence Metropolis chain, or none")
    parser.add_argument("--temperature", type=float, default=310.0, help="kelvin (default 310)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"proposals drawn together (default {DEFAULT_BATCH_SIZE['egnn-cnf']} for the CNF, "
                             f"{DEFAULT_BATCH_SIZE_ONE_PASS} otherwise); the progress bar moves once per batch. "
                             "The CNF's exact likelihoods evaluate 16 x batch items of about 5 MiB (AA) to 14 MiB "
                             "(NY) of autograd tensors each, in chunks that fit --memory-budget-mib")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: drawn at random, printed and recorded in "
                             "OUT_valid_weights.npz, so that --seed repeats the run)")
    parser.add_argument("--device", default="auto", help="torch device (default auto: CUDA if available)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core CPU, 8 AA samples took 93 s with 1 "
                             "thread and 363 s with 2, whose threads spin while waiting for a core)")
    parser.add_argument("--output", default="samples.npz",
                        help="SampleResult .npz (default samples.npz); the other files are named after it")
    parser.add_argument("--resample", type=int, default=0,
                        help="also write this many frames drawn by weight to OUT_resampled.pdb/.dcd")
    parser.add_argument("--no-figure", action="store_true", help="do not write OUT_ramachandran.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ode_arguments(parser)


#: ``--model`` help of the commands that load a model: the accepted names, not only "a path".
MODEL_HELP = (f"a shipped model by name ({', '.join(SHIPPED_MODELS)}; default {DEFAULT_FAMILY}) or the path of a "
              "checkpoint written by openmm-tbg train / refine")


def add_peptide_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sequence`` or ``--pdb`` (optionally with ``--system``): the peptide of ``sample`` and ``refine``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--sequence", help="one-letter sequence of a zwitterionic peptide, e.g. AA (built with the "
                                        "data set's force field: amber14-all + implicit/obc1)")
    src.add_argument("--pdb", help="PDB file of the peptide: its Topology and structure (the System comes from "
                                   "--system, or else from amber14-all + implicit/obc1)")
    parser.add_argument("--system", default=None,
                        help="serialized OpenMM System (XML, from openmm.XmlSerializer.serialize) of the --pdb "
                             "structure, with its particles in the PDB's atom order: your own Hamiltonian")


def add_ode_arguments(parser: argparse.ArgumentParser) -> None:
    """ODE options of the CNF family (`openmm_tbg.ODEOptions`), shared by the ``sample`` and ``evaluate``
    commands. Not given: the family's defaults; the internal-coordinate family takes none and refuses them."""
    group = parser.add_argument_group("flow integration (egnn-cnf family only)")
    group.add_argument("--ode-method", default=None, help="torchdiffeq method (default dopri5)")
    group.add_argument("--atol", type=float, default=None,
                       help="absolute tolerance (default 1e-5 with quadrature nodes, 1e-4 without)")
    group.add_argument("--rtol", type=float, default=None,
                       help="relative tolerance (default 1e-5 with quadrature nodes, 1e-4 without)")
    group.add_argument("--step-size", type=float, default=None, help="step of fixed-step methods")
    group.add_argument("--quadrature-nodes", type=int, default=None,
                       help="exact divergence at K Gauss-Legendre nodes; 0 = at every solver stage "
                            f"(default {DEFAULT_QUADRATURE_NODES or 0})")
    group.add_argument("--memory-budget-mib", type=float, default=None,
                       help="MiB bound on the autograd graph of one chunk of exact-divergence evaluations "
                            f"(default {DEFAULT_MEMORY_BUDGET_MIB:g}); smaller: less memory, and more time once "
                            "chunks hold only a few items; log q does not change")


#: ``add_ode_arguments`` destination -> `openmm_tbg.ODEOptions` field.
_ODE_FIELDS = {"ode_method": "method", "atol": "atol", "rtol": "rtol", "step_size": "step_size",
               "quadrature_nodes": "quadrature_nodes", "memory_budget_mib": "memory_budget_mib"}


def sampling_options_from_args(args: argparse.Namespace) -> Optional[dict]:
    """The ``options`` of `BoltzmannGeneratorSampler` from :func:`add_ode_arguments` options: a dict of the
    `openmm_tbg.ODEOptions` fields given on the command line, or None when none was (the family's defaults).
    An internal-coordinate model refuses a non-empty dict with a message naming the fields."""
    given = {field: getattr(args, dest) for dest, field in _ODE_FIELDS.items() if getattr(args, dest) is not None}
    if "quadrature_nodes" in given:
        given["quadrature_nodes"] = given["quadrature_nodes"] or None  # 0: at every solver stage
    return given or None


def output_paths(output: str) -> dict[str, str]:
    """Files written by ``openmm-tbg sample --output OUTPUT``, by role."""
    base = output[:-4] if output.endswith(".npz") else output
    return {"result": base + ".npz",
            "valid_pdb": base + "_valid.pdb", "valid_dcd": base + "_valid.dcd",
            "weights": base + "_valid_weights.npz", "figure": base + "_ramachandran.png",
            "resampled_pdb": base + "_resampled.pdb", "resampled_dcd": base + "_resampled.dcd"}


def draw_seed() -> int:
    """A fresh random seed in [0, 2**32) from the operating system's entropy."""
    return int(np.random.SeedSequence().generate_state(1, np.uint32)[0])


def _write_valid(result, paths: dict, seed: int) -> int:
    """PDB + DCD of the valid samples and their weights; returns the number of frames written."""
    import mdtraj

    valid = np.asarray(result.valid, dtype=bool)
    n = int(valid.sum())
    if n == 0:
        return 0
    traj = mdtraj.Trajectory(result.positions[valid].astype(np.float32),
                             mdtraj.Topology.from_openmm(result.topology))
    traj[0].save_pdb(paths["valid_pdb"])
    traj.save_dcd(paths["valid_dcd"])
    lw = np.asarray(result.log_weights, dtype=np.float64)[valid]
    lw = lw - (lw.max() + np.log(np.sum(np.exp(lw - lw.max()))))  # normalised over the frames written
    with open(paths["weights"], "wb") as fh:
        np.savez(fh, weights=np.exp(lw), log_weights=lw, reduced_potentials=result.reduced_potentials[valid],
                 log_q=result.log_q[valid], proposal_index=result.proposal_index[valid],
                 ess=np.float64(result.ess), effective_samples=np.float64(result.effective_samples),
                 n_proposals=np.int64(result.n_proposals), temperature_kelvin=np.float64(result.temperature),
                 method=np.array(result.method), seed=np.int64(seed))
    return n


def _print_warnings(caught, printed: set) -> None:
    """Print caught warnings to stderr as ``openmm-tbg: warning: ...``, each message once."""
    for w in caught:
        message = str(w.message)
        if message not in printed:
            printed.add(message)
            print(f"openmm-tbg: warning: {message}", file=sys.stderr)


def _resample(result, k: int, seed: int, paths: dict, printed: set) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames = result.resample(k, seed=seed)
    _print_warnings(caught, printed)
    traj = frames.to_mdtraj()
    traj[0].save_pdb(paths["resampled_pdb"])
    traj.save_dcd(paths["resampled_dcd"])
    print(f"wrote {paths['resampled_pdb']} and {paths['resampled_dcd']}: {k} frames drawn by weight, holding "
          f"{frames.n_distinct} distinct configuration{'s' if frames.n_distinct != 1 else ''}")


def peptide_from_args(args: argparse.Namespace):
    """``(system, topology, positions, name)`` of ``--sequence`` (built), ``--pdb`` (System from the data set's
    Hamiltonian) or ``--pdb`` with ``--system`` (the user's serialized System); shared by ``openmm-tbg sample``
    and ``openmm-tbg refine``. The sampler then checks the System against the Topology as for any other."""
    from .peptides import build_peptide, create_system

    system_path = getattr(args, "system", None)
    if system_path is not None and not args.pdb:
        raise ValueError("--system needs --pdb: the System holds no atom names or bonds, so pass the PDB file of "
                         "the same structure (particles in the same order) as well, instead of --sequence.")
    if args.sequence:
        pep = build_peptide(args.sequence)
        return pep.system, pep.topology, pep.positions, args.sequence
    from openmm.app import PDBFile

    if not os.path.exists(args.pdb):
        raise FileNotFoundError(f"--pdb {args.pdb} does not exist; pass the path of a PDB file of the peptide.")
    pdb = PDBFile(args.pdb)
    if system_path is None:
        return create_system(pdb.topology), pdb.topology, pdb.positions, os.path.basename(args.pdb)
    return read_system_xml(system_path), pdb.topology, pdb.positions, os.path.basename(args.pdb)


def read_system_xml(path: str):
    """The `openmm.System` serialized in ``path`` (``--system``), or a ValueError that names what it is instead.

    Parameters
    ----------
    path : str
        XML file written by ``openmm.XmlSerializer.serialize(system)``.

    Returns
    -------
    openmm.System
    """
    import openmm

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--system {path} does not exist; pass the XML file written by "
                                "openmm.XmlSerializer.serialize(system).")
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    try:
        obj = openmm.XmlSerializer.deserialize(text)
    except Exception as exc:  # noqa: BLE001 - OpenMM raises a bare Exception for XML it cannot parse
        raise ValueError(f"--system {path} is not a serialized OpenMM object ({str(exc).strip() or 'unreadable'}); "
                         "write the System with open(path, 'w').write(openmm.XmlSerializer.serialize(system)).") from exc
    if not isinstance(obj, openmm.System):
        raise ValueError(f"--system {path} holds a serialized {type(obj).__name__}, not a System; serialize the "
                         "System itself (openmm.XmlSerializer.serialize(system)).")
    return obj


def check_outputs_writable(paths, option: str) -> None:
    """Fail before any work if an output file cannot be written, naming ``option`` and what to do.

    The directory is created if needed and a file is created in it and removed again (``os.access`` answers
    "yes" for root on a read-only mount); an output that is an existing directory is refused.

    Parameters
    ----------
    paths : iterable of str
        The files the command will write.
    option : str
        The option that names them (e.g. ``"--output aa.npz"``), quoted in the message.
    """
    import tempfile

    for directory in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        existing = directory
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{option}: {existing} is a file, not a directory; pass a path in a directory "
                                     "you can write to.")
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise PermissionError(f"{option}: cannot write into {directory} ({exc.strerror or exc}); pass a path in "
                                  "a directory you can write to.") from exc
    for p in paths:
        if os.path.isdir(p):
            raise IsADirectoryError(f"{option}: {p} is a directory; pass a file name (or remove the directory).")
        if os.path.exists(p) and not os.access(p, os.W_OK):
            raise PermissionError(f"{option}: {p} exists and is read-only; pass another path or make it writable.")


def run_from_cli(args: argparse.Namespace) -> int:
    """Run ``openmm-tbg sample``; returns the exit status (1 when no proposal is valid)."""
    if args.samples < 1:
        raise ValueError(f"--samples must be a positive integer, got {args.samples}.")
    if args.resample < 0:
        raise ValueError(f"--resample must be 0 (off) or a positive number of frames, got {args.resample}.")
    if args.torch_threads < 1:
        raise ValueError(f"--torch-threads must be a positive integer, got {args.torch_threads}.")
    paths = output_paths(args.output)
    # Fail on an unwritable output now, not after the run.
    check_outputs_writable([p for k, p in paths.items() if args.resample or not k.startswith("resampled")],
                           f"--output {args.output}")
    import torch

    torch.set_num_threads(args.torch_threads)
    seed: Optional[int] = args.seed
    if seed is None:
        seed = draw_seed()
    system, topology, positions, name = peptide_from_args(args)
    flow, _, _ = resolve_model(args.model, resolve_device(args.device))
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE.get(getattr(flow, "family", ""), DEFAULT_BATCH_SIZE_ONE_PASS)
    # Warnings of the sampler and the result (temperature read as kelvin, few effective samples, a System far
    # from the training Hamiltonian) go to stderr as openmm-tbg warnings, after the summary; the warning filters
    # (e.g. PYTHONWARNINGS) still apply.
    with warnings.catch_warnings(record=True) as caught:
        sampler = BoltzmannGeneratorSampler(system, topology, model=flow, temperature=args.temperature,
                                            device=args.device, batch_size=batch_size, seed=seed,
                                            positions=positions, threads=args.torch_threads,
                                            options=sampling_options_from_args(args))
        # Printed once the input has passed every check, so that an error is not preceded by "repeats this run".
        print(f"seed: {seed} (drawn at random; --seed {seed} repeats this run)" if args.seed is None
              else f"seed: {seed}", flush=True)
        try:
            result = sampler.sample(args.samples, method=args.method, progress=not args.no_progress)
        finally:
            sampler.close()
    result.save(paths["result"])
    print(result.summary(include_warnings=False))
    printed: set = set()
    _print_warnings(caught, printed)
    print(f"wrote {paths['result']}: all {result.n_proposals} proposals (SampleResult.load reads it)")
    n_written = _write_valid(result, paths, seed)
    if n_written:
        print(f"wrote {paths['valid_pdb']} and {paths['valid_dcd']}: the {n_written} valid samples "
              f"({result.n_distinct} distinct configurations)")
        print(f"wrote {paths['weights']}: their importance weights, energies, log q and the seed")
    if not args.no_figure:
        from .figures import save_ramachandran

        title = (f"{name}: {result.n_valid}/{result.n_proposals} valid, ESS {result.effective_samples:.1f} samples "
                 f"({args.method}, {args.temperature:g} K, seed {seed})")
        save_ramachandran(result, paths["figure"], title=title)
        print(f"wrote {paths['figure']}: Ramachandran plot of the valid samples, raw and reweighted")
    if not n_written:
        print(f"openmm-tbg: warning: none of the {result.n_proposals} proposals is valid (rejections "
              f"{result.rejections}), so no trajectory was written. Draw more samples, or use a model trained "
              "for this peptide (openmm-tbg train).", file=sys.stderr)
        return 1
    if args.resample:
        _resample(result, args.resample, seed, paths, printed)
    return 0
