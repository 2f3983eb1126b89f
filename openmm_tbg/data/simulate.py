"""Generating MD data in the data set's format: :func:`simulate` and ``openmm-tbg simulate``.

All peptides of one call are simulated together in one System as separated, non-interacting copies
(:func:`build_separated_system`). The run is resumable: ``simulate_checkpoint.json`` in the output directory
holds the OpenMM state and the number of frames written, and every file is replaced atomically.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..encoding import encode_topology
from ..utils import atomic_write, in_unit, select_platform
from .reading import POSITION_SCALE_NM, DatasetError, _read_npz

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "simulate_checkpoint.json"
_CHECKPOINT_FORMAT = "openmm_tbg.simulate"
_RESTRAINT_GROUP = 31


def _grid_anchors(n: int, spacing_nm: float) -> np.ndarray:
    """``n`` points of a cubic grid with ``spacing_nm`` (nm), (n, 3)."""
    side = int(np.ceil(n ** (1.0 / 3.0) - 1e-9))
    side = max(side, 1)
    while side ** 3 < n:
        side += 1
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)][:n], float)
    return grid * spacing_nm


def _to_int16(x_nm: np.ndarray, name: str) -> np.ndarray:
    """Centred positions (nm) in the data set's int16 format (1e-4 nm)."""
    x = x_nm - x_nm.mean(axis=0, keepdims=True)
    q = np.rint(x / POSITION_SCALE_NM)
    if np.abs(q).max() > np.iinfo(np.int16).max:
        raise RuntimeError(f"{name}: an atom is {np.abs(x).max():.2f} nm from the centroid, beyond the int16 "
                           "format's range of 3.27 nm; the peptide is too large for this data format.")
    return q.astype(np.int16)


def build_separated_system(topologies, positions_nm, forcefield=None, spacing_nm: float = 8.0,
                           restraint_radius_nm: float = 1.5, restraint_k: float = 1000.0):
    """One System holding several molecules as non-interacting copies on a grid.

    Molecules are placed ``spacing_nm`` apart (centroids on a cubic grid). A flat-bottom harmonic restraint
    ``0.5 k max(0, d - r0)^2`` on each molecule's mass centroid (``CustomCentroidBondForce``, force group 31)
    keeps them apart: with the defaults the closest atoms of two molecules stay > 2 nm apart (beyond the
    cutoff), and since the restraint acts on the centroid only, each molecule's internal distribution is the
    one of the isolated molecule.

    Parameters
    ----------
    topologies : list of openmm.app.Topology
    positions_nm : list of numpy.ndarray
        (n_atoms_i, 3) positions of each molecule, nm.
    forcefield : sequence of str, optional
        Default amber14-all + implicit/obc1 (the System is made with :func:`peptides.create_system` defaults).
    spacing_nm, restraint_radius_nm, restraint_k
        Grid spacing (nm), flat-bottom radius (nm), force constant (kJ/mol/nm^2).

    Returns
    -------
    system : openmm.System
    topology : openmm.app.Topology
    positions : openmm.unit.Quantity
        (n_atoms, 3), nm.
    offsets : list of int
        ``offsets[i]:offsets[i + 1]`` are the atoms of molecule ``i``.
    """
    import openmm
    from openmm import unit
    from openmm.app import Modeller

    from ..peptides import DEFAULT_FORCEFIELD, create_system

    forcefield = DEFAULT_FORCEFIELD if forcefield is None else forcefield
    anchors = _grid_anchors(len(topologies), spacing_nm)
    modeller = None
    offsets = [0]
    for top, pos, anchor in zip(topologies, positions_nm, anchors):
        pos = np.asarray(pos, dtype=np.float64)
        shifted = (pos - pos.mean(axis=0) + anchor) * unit.nanometer
        if modeller is None:
            modeller = Modeller(top, shifted)
        else:
            modeller.add(top, shifted)
        offsets.append(offsets[-1] + top.getNumAtoms())
    system = create_system(modeller.topology, forcefield)
    restraint = openmm.CustomCentroidBondForce(
        1, "0.5*k_restraint*step(d - r0_restraint)*(d - r0_restraint)^2;"
           "d = sqrt((x1 - ax)^2 + (y1 - ay)^2 + (z1 - az)^2)")
    restraint.addGlobalParameter("k_restraint", float(restraint_k))
    restraint.addGlobalParameter("r0_restraint", float(restraint_radius_nm))
    for p in ("ax", "ay", "az"):
        restraint.addPerBondParameter(p)
    for i, anchor in enumerate(anchors):
        g = restraint.addGroup(list(range(offsets[i], offsets[i + 1])))  # default weights: masses
        restraint.addBond([g], [float(a) for a in anchor])
    restraint.setForceGroup(_RESTRAINT_GROUP)
    system.addForce(restraint)
    return system, modeller.topology, modeller.positions, offsets


# ----------------------------------------------------------------------------------------------------- settings
def _settings(sequences, ns, temperature, timestep, friction, save_interval_ps, equilibration_ps, spacing_nm,
              restraint_radius_nm, restraint_k, forcefield, histidine) -> tuple[dict[str, Any], int]:
    """The run's parameters as plain numbers (recorded in the checkpoint) and the target frame count."""
    from openmm import unit

    from ..peptides import DEFAULT_FORCEFIELD, validate_sequence

    if isinstance(sequences, str):
        sequences = [sequences]
    seqs = [validate_sequence(s) for s in sequences]
    if not seqs:
        raise ValueError("simulate() needs at least one sequence.")
    dupes = sorted({s for s in seqs if seqs.count(s) > 1})
    if dupes:
        raise ValueError(f"Sequences {dupes} are given more than once; each sequence is one output file.")
    ns = in_unit(ns, unit.nanosecond, "ns")
    temperature_k = in_unit(temperature, unit.kelvin, "temperature")
    dt_ps = 0.001 if timestep is None else in_unit(timestep, unit.picosecond, "timestep")
    friction_ps = 0.3 if friction is None else in_unit(friction, unit.picosecond ** -1, "friction")
    save_interval_ps = in_unit(save_interval_ps, unit.picosecond, "save_interval_ps")
    equilibration_ps = in_unit(equilibration_ps, unit.picosecond, "equilibration_ps")
    forcefield = tuple(DEFAULT_FORCEFIELD if forcefield is None else
                       ((forcefield,) if isinstance(forcefield, str) else forcefield))
    if ns < 0 or dt_ps <= 0 or save_interval_ps <= 0 or equilibration_ps < 0 or temperature_k <= 0:
        raise ValueError("ns, timestep, save_interval_ps, equilibration_ps and temperature must be positive.")
    steps_per_frame = int(round(save_interval_ps / dt_ps))
    if steps_per_frame < 1 or abs(steps_per_frame * dt_ps - save_interval_ps) > 1e-6 * save_interval_ps:
        raise ValueError(f"save_interval_ps={save_interval_ps} is not a whole number of {dt_ps} ps time steps.")
    params = {"sequences": seqs, "temperature_K": temperature_k, "timestep_ps": dt_ps,
              "friction_per_ps": friction_ps, "save_interval_ps": save_interval_ps,
              "equilibration_ps": equilibration_ps, "spacing_nm": spacing_nm,
              "restraint_radius_nm": restraint_radius_nm, "restraint_k": restraint_k,
              "forcefield": list(forcefield), "histidine": histidine}
    return params, int(round(ns * 1000.0 / save_interval_ps))


def _read_checkpoint(out: Path, params: dict[str, Any], seed: int | None) -> tuple[dict | None, int]:
    """The checkpoint of an interrupted run with the same ``params`` (or None) and the run's seed."""
    ckpt_path = out / CHECKPOINT_NAME
    seqs = params["sequences"]
    if not ckpt_path.is_file():
        clash = [f"{s}.{ext}" for s in seqs for ext in ("pdb", "npz") if (out / f"{s}.{ext}").exists()]
        if clash:
            raise ValueError(f"{str(out)!r} already holds {clash} but no {CHECKPOINT_NAME}; refusing to "
                             "overwrite data. Choose another out_dir.")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31 - 2))
        return None, int(seed)
    try:
        ckpt = json.loads(ckpt_path.read_text())
        if ckpt.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError("not a simulate checkpoint")
    except ValueError as exc:
        raise DatasetError(f"{str(ckpt_path)!r} is corrupt ({exc}); delete it and the npz files to start "
                           "over.") from exc
    old = dict(ckpt["params"])
    if old != params:
        diff = sorted(k for k in params if old.get(k) != params[k])
        raise ValueError(f"{str(out)!r} holds an interrupted simulation with different settings ({diff}: "
                         f"{[old.get(k) for k in diff]} there vs {[params[k] for k in diff]} now). Resume "
                         "with the same settings or choose another out_dir.")
    return ckpt, int(ckpt["seed"])


def _structures(out: Path, params: dict[str, Any], fresh: bool) -> tuple[list, list[np.ndarray]]:
    """Topologies and positions (nm) of the peptides: built and written as ``XY.pdb`` on a fresh run, read
    back from those files on a resumed one (so the topology never changes)."""
    from openmm.app import PDBFile

    from ..peptides import build_peptide
    from ..utils import to_nm

    topologies, positions = [], []
    for s in params["sequences"]:
        pdb_path = out / f"{s}.pdb"
        if fresh:
            pep = build_peptide(s, forcefield=tuple(params["forcefield"]), histidine=params["histidine"])
            text = io.StringIO()
            PDBFile.writeFile(pep.topology, pep.positions, text, keepIds=True)
            atomic_write(pdb_path, lambda fh, t=text.getvalue(): fh.write(t.encode()))
        pdb = PDBFile(str(pdb_path))
        encode_topology(pdb.topology)  # refuse unsupported structures early
        topologies.append(pdb.topology)
        positions.append(to_nm(pdb.positions))
    return topologies, positions


# ----------------------------------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """State of one `simulate` call: the Context, the frames in memory and where they go."""

    out: Path
    params: dict[str, Any]
    seed: int
    context: Any
    integrator: Any
    topologies: list
    offsets: list[int]
    frames: list[list[np.ndarray]] = field(default_factory=list)

    def flush(self, n_frames: int) -> None:
        """Write every peptide's frames and the checkpoint (state after ``n_frames`` frames), atomically."""
        import openmm

        interval = self.params["save_interval_ps"]
        for i, s in enumerate(self.params["sequences"]):
            arr = (np.concatenate(self.frames[i], axis=0) if self.frames[i]
                   else np.zeros((0, self.topologies[i].getNumAtoms(), 3), np.int16))
            self.frames[i] = [arr]
            atomic_write(self.out / f"{s}.npz", lambda fh, a=arr: np.savez(
                fh, positions=a, run=np.zeros(a.shape[0], np.int8), run_interval_ps=np.array([interval], np.float64)))
        state = self.context.getState(getPositions=True, getVelocities=True, getParameters=True,
                                      getIntegratorParameters=True)
        doc = {"format": _CHECKPOINT_FORMAT, "format_version": 1, "params": self.params, "seed": self.seed,
               "frames": n_frames, "state_xml": openmm.XmlSerializer.serialize(state)}
        atomic_write(self.out / CHECKPOINT_NAME, lambda fh: fh.write(json.dumps(doc).encode()))


def _start_run(out: Path, params: dict[str, Any], seed: int, ckpt: dict | None, platform) -> _Run:
    """Build the System and Context; minimise and equilibrate a fresh run, or load a checkpointed state."""
    import openmm
    from openmm import unit

    topologies, positions = _structures(out, params, fresh=ckpt is None)
    system, _, combined_positions, offsets = build_separated_system(
        topologies, positions, forcefield=tuple(params["forcefield"]), spacing_nm=params["spacing_nm"],
        restraint_radius_nm=params["restraint_radius_nm"], restraint_k=params["restraint_k"])
    kelvin, dt_ps = params["temperature_K"], params["timestep_ps"]
    integrator = openmm.LangevinMiddleIntegrator(kelvin * unit.kelvin, params["friction_per_ps"] / unit.picosecond,
                                                 dt_ps * unit.picosecond)
    n_done = 0 if ckpt is None else int(ckpt["frames"])
    # A new integrator seed per segment, so a resumed run does not replay the same noise.
    segment_seed = int(np.random.SeedSequence([seed, n_done]).generate_state(1)[0] % (2 ** 31 - 2)) + 1
    integrator.setRandomNumberSeed(segment_seed)
    plat = select_platform(platform)
    context = openmm.Context(system, integrator, plat)
    logger.info("simulate: %d peptides, %d atoms, platform %s, seed %d", len(topologies),
                system.getNumParticles(), plat.getName(), seed)
    run = _Run(out, params, seed, context, integrator, topologies, offsets, [[] for _ in topologies])
    if ckpt is None:
        context.setPositions(combined_positions)
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, 2000)
        context.setVelocitiesToTemperature(kelvin * unit.kelvin, segment_seed)
        n_eq = int(round(params["equilibration_ps"] / dt_ps))
        if n_eq:
            integrator.step(n_eq)
        run.flush(0)
    else:
        context.setState(openmm.XmlSerializer.deserialize(ckpt["state_xml"]))
        _reload_frames(run, n_done)
    return run


def _reload_frames(run: _Run, n_done: int) -> None:
    """Read back the ``n_done`` checkpointed frames of every peptide; later ones are recomputed."""
    if n_done == 0:
        return
    for i, s in enumerate(run.params["sequences"]):
        old = _read_npz(run.out / f"{s}.npz")["positions"]
        if old.shape[0] < n_done:
            raise DatasetError(f"{s}.npz holds {old.shape[0]} frames but the checkpoint recorded {n_done}; "
                               "the output directory was modified. Start over in a new out_dir.")
        if old.shape[0] > n_done:
            # Written after the last checkpoint: their integrator state is lost, so they are recomputed.
            logger.warning("%s.npz: dropping %d frames written after the last checkpoint (kept %d)", s,
                           old.shape[0] - n_done, n_done)
        run.frames[i].append(old[:n_done])


def _produce(run: _Run, n_done: int, n_target: int, checkpoint_frames: int, progress: bool) -> list[float]:
    """Integrate from frame ``n_done`` to ``n_target``, flushing every ``checkpoint_frames``; potential
    energies (kJ/mol, all copies) of the new frames."""
    from openmm import unit
    from tqdm.auto import tqdm

    steps_per_frame = int(round(run.params["save_interval_ps"] / run.params["timestep_ps"]))
    bar = tqdm(total=max(n_target - n_done, 0), desc="simulate (frames)", disable=not progress)
    energies = []
    try:
        for k in range(n_done, n_target):
            run.integrator.step(steps_per_frame)
            state = run.context.getState(getPositions=True, getEnergy=True)
            epot = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            if not np.isfinite(epot):
                raise RuntimeError(f"Potential energy became {epot} at frame {k}; the simulation blew up. Use a "
                                   "smaller timestep.")
            energies.append(epot)
            x = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
            for i, s in enumerate(run.params["sequences"]):
                run.frames[i].append(_to_int16(x[run.offsets[i]:run.offsets[i + 1]], s)[None])
            bar.update(1)
            if (k + 1 - n_done) % checkpoint_frames == 0 or k + 1 == n_target:
                run.flush(k + 1)
    finally:
        bar.close()
    return energies


def simulate(sequences: Sequence[str] | str, out_dir: str | os.PathLike, ns: float, temperature=310.0,
             timestep=None, friction=None, save_interval_ps: float = 10.0, seed: int | None = None,
             platform=None, progress: bool = True, equilibration_ps: float = 20.0, spacing_nm: float = 8.0,
             restraint_radius_nm: float = 1.5, restraint_k: float = 1000.0, checkpoint_frames: int = 10,
             forcefield=None, histidine: str | None = None) -> dict[str, Path]:
    """Generate MD data for peptides in the data set's format (``XY.pdb`` + ``XY.npz``).

    All peptides are simulated together in one System as separated copies ``spacing_nm`` apart (beyond the
    2 nm cutoff, so they do not interact); a flat-bottom restraint acts on each molecule's mass centroid only,
    which leaves the internal distribution of each molecule exact. ``LangevinMiddleIntegrator``; the system is
    minimized and equilibrated for ``equilibration_ps`` before frames are saved.

    The run is resumable: ``out_dir/simulate_checkpoint.json`` holds the OpenMM state (XML) and the number of
    frames written; frames are flushed every ``checkpoint_frames`` frames with atomic file replacement. Calling
    ``simulate`` again with the same arguments and a larger ``ns`` continues the same trajectory and appends.

    Parameters
    ----------
    sequences : str or sequence of str
        One-letter sequences, e.g. ``["NY", "AA"]``; each becomes ``{sequence}.pdb``/``.npz``.
    out_dir : path
        Output directory (created).
    ns : float or Quantity
        Total production time per peptide, ns (the target, including frames written by earlier calls).
    temperature : Quantity or float
        Kelvin (default 310).
    timestep : Quantity or float, optional
        ps if unitless (default 1 fs).
    friction : Quantity or float, optional
        1/ps if unitless (default 0.3/ps).
    save_interval_ps : float
        Time between saved frames, ps (default 10).
    seed : int, optional
        Seed for velocities and the integrator; random (and recorded in the checkpoint) when None.
    platform : str or openmm.Platform, optional
        Default: the fastest available (:func:`openmm_tbg.utils.select_platform`).
    progress : bool
        Show a tqdm bar over frames.
    equilibration_ps : float
        Discarded equilibration after minimization, ps.
    spacing_nm, restraint_radius_nm, restraint_k
        Copy spacing, flat-bottom radius (nm) and force constant (kJ/mol/nm^2) of the centroid restraint.
    checkpoint_frames : int
        Flush frames and the checkpoint every this many frames (and at the end).
    forcefield : sequence of str, optional
        Default ``("amber14-all.xml", "implicit/obc1.xml")``.
    histidine : {None, "HID", "HIE", "HIP"}
        Histidine protonation, as in :func:`openmm_tbg.peptides.build_peptide`.

    Returns
    -------
    dict of str to pathlib.Path
        Sequence -> npz path.
    """
    params, n_target = _settings(sequences, ns, temperature, timestep, friction, save_interval_ps,
                                 equilibration_ps, spacing_nm, restraint_radius_nm, restraint_k, forcefield,
                                 histidine)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, seed = _read_checkpoint(out, params, seed)
    run = _start_run(out, params, seed, ckpt, platform)
    n_done = 0 if ckpt is None else int(ckpt["frames"])
    if n_done >= n_target:
        logger.info("simulate: %s already holds %d frames (target %d); nothing to do", out, n_done, n_target)
    energies = _produce(run, n_done, n_target, max(1, int(checkpoint_frames)), progress)
    if energies:
        logger.info("simulate: %d frames, mean potential energy %.1f kJ/mol (all copies)", len(energies),
                    float(np.mean(energies)))
    return {s: out / f"{s}.npz" for s in params["sequences"]}


# ----------------------------------------------------------------------------------------------------- CLI
def configure_parser(parser) -> None:
    """Arguments of ``openmm-tbg simulate``."""
    parser.add_argument("sequences", nargs="+", metavar="SEQ", help="one-letter sequences, e.g. NY AA")
    parser.add_argument("--out", required=True, help="output directory (resumes an interrupted run there)")
    parser.add_argument("--ns", type=float, required=True, help="production time per peptide, ns")
    parser.add_argument("--temperature", type=float, default=310.0, help="kelvin (default 310)")
    parser.add_argument("--timestep-fs", type=float, default=1.0, help="time step, fs (default 1)")
    parser.add_argument("--friction", type=float, default=0.3, help="Langevin friction, 1/ps (default 0.3)")
    parser.add_argument("--save-interval-ps", type=float, default=10.0, help="ps between frames (default 10)")
    parser.add_argument("--equilibration-ps", type=float, default=20.0, help="discarded equilibration, ps")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, recorded)")
    parser.add_argument("--platform", default=None,
                        help="OpenMM platform (default: the fastest available, CUDA > OpenCL > CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_cli(args) -> int:
    """Run ``openmm-tbg simulate``."""
    paths = simulate(args.sequences, args.out, args.ns, temperature=args.temperature,
                     timestep=args.timestep_fs / 1000.0, friction=args.friction,
                     save_interval_ps=args.save_interval_ps, seed=args.seed, platform=args.platform,
                     progress=not args.no_progress, equilibration_ps=args.equilibration_ps)
    for s, p in paths.items():
        print(f"{s}: {p}")
    return 0
