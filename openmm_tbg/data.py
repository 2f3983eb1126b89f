"""Reading the dipeptide MD data set and generating new data in the same format.

Format of a data directory (see ``shared/data/dipeptides/README.md``):

- ``XY.pdb``: topology and a starting structure; its atom order defines the trajectory's columns.
- ``XY.npz``: ``positions`` int16 (frames, atoms, 3) in units of 1e-4 nm with the centroid removed per frame,
  ``run`` int8 (frames,) index of the independent run of each frame (frames of a run are consecutive),
  ``run_interval_ps`` float (n_runs,) time between saved frames of each run.
- ``splits.json``: ``{"train": [...], "test": [...]}``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .encoding import AtomEncoding, encode_topology

logger = logging.getLogger(__name__)

#: Scale of the stored int16 coordinates, nm per unit.
POSITION_SCALE_NM = 1e-4


class DatasetError(ValueError):
    """A data-set file is missing, unreadable or inconsistent."""


@dataclass
class PeptideTrajectory:
    """Frames of one peptide.

    Attributes
    ----------
    name : str
        Peptide name, e.g. ``"NY"`` (one-letter sequence, N-terminus first).
    topology : openmm.app.Topology
    encoding : AtomEncoding
    positions : numpy.ndarray
        float32 (frames, n_atoms, 3), nm, centroid removed per frame.
    run : numpy.ndarray
        int64 (frames,), index of the independent run each frame belongs to.
    run_interval_ps : numpy.ndarray
        float64 (n_runs,), time between saved frames of each run, ps (of the stored data, before striding).
    """

    name: str
    topology: object
    encoding: AtomEncoding
    positions: np.ndarray
    run: np.ndarray
    run_interval_ps: np.ndarray

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return int(self.positions.shape[1])

    def to_mdtraj(self):
        """The frames as an ``mdtraj.Trajectory`` (nm)."""
        import mdtraj

        return mdtraj.Trajectory(self.positions, mdtraj.Topology.from_openmm(self.topology))


def read_splits(directory: str | os.PathLike) -> dict[str, list[str]]:
    """Read ``splits.json`` of a data directory.

    Parameters
    ----------
    directory : path

    Returns
    -------
    dict of str to list of str
        Split name (``"train"``, ``"test"``) -> peptide names.
    """
    path = Path(directory) / "splits.json"
    if not path.is_file():
        raise DatasetError(f"No splits.json in {str(directory)!r}; a data directory needs splits.json with "
                           "{\"train\": [...], \"test\": [...]} (or pass names= explicitly).")
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"Cannot read {str(path)!r}: {exc}. It must be JSON like "
                           "{\"train\": [\"AA\", ...], \"test\": [...]}.") from exc
    if not isinstance(splits, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in splits.values()):
        raise DatasetError(f"{str(path)!r} must map split names to lists of peptide names.")
    return {k: list(v) for k, v in splits.items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"Trajectory file {str(path)!r} does not exist; every XY.pdb needs an XY.npz beside it.")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("positions", "run", "run_interval_ps") if k not in z.files]
            if missing:
                raise DatasetError(f"{str(path)!r} lacks the arrays {missing}; expected positions (int16, "
                                   "1e-4 nm), run and run_interval_ps.")
            return {k: z[k] for k in ("positions", "run", "run_interval_ps")}
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise DatasetError(f"Cannot read {str(path)!r} ({type(exc).__name__}: {exc}); the file is corrupt or "
                           "not an npz archive. Re-copy or regenerate it (openmm-tbg simulate).") from exc


def _select_frames(n: int, stride: int, max_frames: int | None) -> np.ndarray:
    idx = np.arange(0, n, stride)
    if max_frames is not None and idx.size > max_frames:
        # Evenly spaced over the whole trajectory, so every run contributes.
        pick = np.unique(np.linspace(0, idx.size - 1, max_frames).round().astype(np.int64))
        idx = idx[pick]
    return idx


def load_peptide(directory: str | os.PathLike, name: str, stride: int = 1,
                 max_frames: int | None = None) -> PeptideTrajectory:
    """Load one peptide's topology and frames.

    Parameters
    ----------
    directory : path
        Data directory holding ``{name}.pdb`` and ``{name}.npz``.
    name : str
        Peptide name, e.g. ``"NY"``.
    stride : int
        Keep every ``stride``-th frame.
    max_frames : int, optional
        Keep at most this many frames (after striding), evenly spaced over all runs.

    Returns
    -------
    PeptideTrajectory
        Positions as float32 nm.

    Raises
    ------
    DatasetError
        Missing or corrupt files, inconsistent arrays, or a PDB/npz atom-count mismatch.
    """
    from openmm.app import PDBFile

    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}.")
    if max_frames is not None and (int(max_frames) != max_frames or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}.")
    directory = Path(directory)
    pdb_path = directory / f"{name}.pdb"
    if not pdb_path.is_file():
        raise DatasetError(f"Topology file {str(pdb_path)!r} does not exist; is {str(directory)!r} a data "
                           f"directory and {name!r} one of its peptides?")
    try:
        pdb = PDBFile(str(pdb_path))
    except Exception as exc:  # openmm raises plain Exceptions for malformed PDBs
        raise DatasetError(f"Cannot read {str(pdb_path)!r}: {exc}") from exc
    encoding = encode_topology(pdb.topology, pdb.positions)
    arrays = _read_npz(directory / f"{name}.npz")
    pos, run, interval = arrays["positions"], arrays["run"], arrays["run_interval_ps"]
    if pos.ndim != 3 or pos.shape[2] != 3:
        raise DatasetError(f"{name}.npz: positions have shape {pos.shape}, expected (frames, atoms, 3).")
    if pos.shape[1] != encoding.n_atoms:
        raise DatasetError(f"{name}.npz has {pos.shape[1]} atoms per frame but {name}.pdb has "
                           f"{encoding.n_atoms}; the pair does not belong together (regenerate the npz from "
                           "this PDB).")
    if run.shape != (pos.shape[0],):
        raise DatasetError(f"{name}.npz: run has shape {run.shape}, expected ({pos.shape[0]},).")
    run = run.astype(np.int64)
    interval = np.asarray(interval, dtype=np.float64).reshape(-1)
    if run.size and (run.min() < 0 or run.max() >= interval.size):
        raise DatasetError(f"{name}.npz: run indices span {run.min()}..{run.max()} but run_interval_ps has "
                           f"{interval.size} entries.")
    idx = _select_frames(pos.shape[0], int(stride), max_frames)
    if pos.dtype == np.int16:
        positions = pos[idx].astype(np.float32) * np.float32(POSITION_SCALE_NM)
    elif np.issubdtype(pos.dtype, np.floating):
        positions = pos[idx].astype(np.float32)  # already nm
    else:
        raise DatasetError(f"{name}.npz: positions have dtype {pos.dtype}, expected int16 (1e-4 nm).")
    return PeptideTrajectory(name=name, topology=pdb.topology, encoding=encoding, positions=positions,
                             run=run[idx], run_interval_ps=interval)


def load_dataset(directory: str | os.PathLike, split: str | None = None, names: Iterable[str] | None = None,
                 stride: int = 1, max_frames: int | None = None,
                 progress: bool = True) -> list[PeptideTrajectory]:
    """Load several peptides of a data directory.

    Parameters
    ----------
    directory : path
    split : {"train", "test"}, optional
        A split of ``splits.json``. Ignored when ``names`` is given.
    names : iterable of str, optional
        Explicit peptide names.
    stride, max_frames
        As in :func:`load_peptide`, per peptide.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    list of PeptideTrajectory
        In the order of ``names`` / the split; with neither, all peptides in ``splits.json`` (sorted), or all
        ``*.pdb`` files if there is no ``splits.json``.
    """
    from tqdm.auto import tqdm

    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"Data directory {str(directory)!r} does not exist.")
    if names is not None:
        names = list(names)
    elif split is not None:
        splits = read_splits(directory)
        if split not in splits:
            raise DatasetError(f"Split {split!r} is not in {str(directory / 'splits.json')!r}; available: "
                               f"{sorted(splits)}.")
        names = splits[split]
    elif (directory / "splits.json").is_file():
        names = sorted({n for v in read_splits(directory).values() for n in v})
    else:
        names = sorted(p.stem for p in directory.glob("*.pdb"))
    out = [load_peptide(directory, n, stride=stride, max_frames=max_frames)
           for n in tqdm(names, desc="loading peptides", disable=not progress)]
    logger.info("Loaded %d peptides, %d frames from %s", len(out), sum(t.n_frames for t in out), directory)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generating data: `simulate` / `openmm-tbg simulate`
# ---------------------------------------------------------------------------------------------------------------

CHECKPOINT_NAME = "simulate_checkpoint.json"
_CHECKPOINT_FORMAT = "openmm_tbg.simulate"
_RESTRAINT_GROUP = 31


def _default_file_mode() -> int:
    """Mode of a newly created regular file under the process umask (e.g. 0644 for umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write) -> None:
    """Write a file through a temporary file in the same directory and ``os.replace`` it into place."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600 files; give the usual umask-based mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _value(q, unit, name: str) -> float:
    from openmm import unit as u

    if u.is_quantity(q):
        if not q.unit.is_compatible(unit):
            raise ValueError(f"{name} has unit {q.unit}, which is not compatible with {unit}.")
        return float(q.value_in_unit(unit))
    return float(q)


def _select_platform(platform):
    import openmm

    if isinstance(platform, openmm.Platform):
        return platform
    if platform is not None:
        try:
            return openmm.Platform.getPlatformByName(str(platform))
        except Exception as exc:
            names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
            raise ValueError(f"OpenMM platform {platform!r} is not available; available: {names}.") from exc
    for name in ("CUDA", "CPU", "Reference"):
        try:
            return openmm.Platform.getPlatformByName(name)
        except Exception:
            continue
    raise RuntimeError("No OpenMM platform found.")  # pragma: no cover


def _grid_anchors(n: int, spacing_nm: float) -> np.ndarray:
    side = int(np.ceil(n ** (1.0 / 3.0) - 1e-9))
    side = max(side, 1)
    while side ** 3 < n:
        side += 1
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)][:n], float)
    return grid * spacing_nm


def _to_int16(x_nm: np.ndarray, name: str) -> np.ndarray:
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

    from .peptides import DEFAULT_FORCEFIELD, create_system

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
        Default: CUDA when present, else CPU.
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
    import openmm
    from openmm import unit
    from openmm.app import PDBFile
    from tqdm.auto import tqdm

    from .peptides import DEFAULT_FORCEFIELD, build_peptide, validate_sequence

    if isinstance(sequences, str):
        sequences = [sequences]
    seqs = [validate_sequence(s) for s in sequences]
    if not seqs:
        raise ValueError("simulate() needs at least one sequence.")
    dupes = sorted({s for s in seqs if seqs.count(s) > 1})
    if dupes:
        raise ValueError(f"Sequences {dupes} are given more than once; each sequence is one output file.")
    ns = _value(ns, unit.nanosecond, "ns")
    temperature_k = _value(temperature, unit.kelvin, "temperature")
    dt_ps = 0.001 if timestep is None else _value(timestep, unit.picosecond, "timestep")
    friction_ps = 0.3 if friction is None else _value(friction, unit.picosecond ** -1, "friction")
    save_interval_ps = _value(save_interval_ps, unit.picosecond, "save_interval_ps")
    equilibration_ps = _value(equilibration_ps, unit.picosecond, "equilibration_ps")
    forcefield = tuple(DEFAULT_FORCEFIELD if forcefield is None else
                       ((forcefield,) if isinstance(forcefield, str) else forcefield))
    if ns < 0 or dt_ps <= 0 or save_interval_ps <= 0 or equilibration_ps < 0 or temperature_k <= 0:
        raise ValueError("ns, timestep, save_interval_ps, equilibration_ps and temperature must be positive.")
    steps_per_frame = int(round(save_interval_ps / dt_ps))
    if steps_per_frame < 1 or abs(steps_per_frame * dt_ps - save_interval_ps) > 1e-6 * save_interval_ps:
        raise ValueError(f"save_interval_ps={save_interval_ps} is not a whole number of {dt_ps} ps time steps.")
    n_target = int(round(ns * 1000.0 / save_interval_ps))
    checkpoint_frames = max(1, int(checkpoint_frames))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {"sequences": seqs, "temperature_K": temperature_k, "timestep_ps": dt_ps,
              "friction_per_ps": friction_ps, "save_interval_ps": save_interval_ps,
              "equilibration_ps": equilibration_ps, "spacing_nm": spacing_nm,
              "restraint_radius_nm": restraint_radius_nm, "restraint_k": restraint_k,
              "forcefield": list(forcefield), "histidine": histidine}
    ckpt_path = out / CHECKPOINT_NAME
    ckpt = None
    if ckpt_path.is_file():
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
        seed = int(ckpt["seed"])
    else:
        clash = [f"{s}.{ext}" for s in seqs for ext in ("pdb", "npz") if (out / f"{s}.{ext}").exists()]
        if clash:
            raise ValueError(f"{str(out)!r} already holds {clash} but no {CHECKPOINT_NAME}; refusing to "
                             "overwrite data. Choose another out_dir.")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31 - 2))
    seed = int(seed)

    # Structures: built once and stored as XY.pdb; a resumed run reads them back so topology is unchanged.
    topologies, positions = [], []
    for s in seqs:
        pdb_path = out / f"{s}.pdb"
        if ckpt is None:
            pep = build_peptide(s, forcefield=forcefield, histidine=histidine)
            text = io.StringIO()
            PDBFile.writeFile(pep.topology, pep.positions, text, keepIds=True)
            _atomic_write(pdb_path, lambda fh, t=text.getvalue(): fh.write(t.encode()))
        pdb = PDBFile(str(pdb_path))
        encode_topology(pdb.topology)  # refuse unsupported structures early
        topologies.append(pdb.topology)
        positions.append(np.asarray(pdb.positions.value_in_unit(unit.nanometer)))

    system, combined_topology, combined_positions, offsets = build_separated_system(
        topologies, positions, forcefield=forcefield, spacing_nm=spacing_nm,
        restraint_radius_nm=restraint_radius_nm, restraint_k=restraint_k)

    integrator = openmm.LangevinMiddleIntegrator(temperature_k * unit.kelvin, friction_ps / unit.picosecond,
                                                 dt_ps * unit.picosecond)
    n_done = 0 if ckpt is None else int(ckpt["frames"])
    # A new integrator seed per segment, so a resumed run does not replay the same noise.
    segment_seed = int(np.random.SeedSequence([seed, n_done]).generate_state(1)[0] % (2 ** 31 - 2)) + 1
    integrator.setRandomNumberSeed(segment_seed)
    plat = _select_platform(platform)
    context = openmm.Context(system, integrator, plat)
    logger.info("simulate: %d peptides, %d atoms, platform %s, seed %d", len(seqs), system.getNumParticles(),
                plat.getName(), seed)

    frames: list[list[np.ndarray]] = [[] for _ in seqs]
    if ckpt is None:
        context.setPositions(combined_positions)
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, 2000)
        context.setVelocitiesToTemperature(temperature_k * unit.kelvin, segment_seed)
        n_eq = int(round(equilibration_ps / dt_ps))
        if n_eq:
            integrator.step(n_eq)
    else:
        context.setState(openmm.XmlSerializer.deserialize(ckpt["state_xml"]))
        for i, s in enumerate(seqs):
            if n_done == 0:
                continue
            old = _read_npz(out / f"{s}.npz")["positions"]
            if old.shape[0] < n_done:
                raise DatasetError(f"{s}.npz holds {old.shape[0]} frames but the checkpoint recorded {n_done}; "
                                   "the output directory was modified. Start over in a new out_dir.")
            if old.shape[0] > n_done:
                # Written after the last checkpoint: their integrator state is lost, so they are recomputed.
                logger.warning("%s.npz: dropping %d frames written after the last checkpoint (kept %d)", s,
                               old.shape[0] - n_done, n_done)
            frames[i].append(old[:n_done])

    def flush(n_frames: int) -> None:
        for i, s in enumerate(seqs):
            arr = (np.concatenate(frames[i], axis=0) if frames[i]
                   else np.zeros((0, topologies[i].getNumAtoms(), 3), np.int16))
            frames[i] = [arr]
            _atomic_write(out / f"{s}.npz", lambda fh, a=arr: np.savez(
                fh, positions=a, run=np.zeros(a.shape[0], np.int8),
                run_interval_ps=np.array([save_interval_ps], np.float64)))
        state = context.getState(getPositions=True, getVelocities=True, getParameters=True,
                                 getIntegratorParameters=True)
        doc = {"format": _CHECKPOINT_FORMAT, "format_version": 1, "params": params, "seed": seed,
               "frames": n_frames, "state_xml": openmm.XmlSerializer.serialize(state)}
        _atomic_write(ckpt_path, lambda fh: fh.write(json.dumps(doc).encode()))

    if ckpt is None:
        flush(0)
    if n_done >= n_target:
        logger.info("simulate: %s already holds %d frames (target %d); nothing to do", out, n_done, n_target)
    bar = tqdm(total=max(n_target - n_done, 0), desc="simulate (frames)", disable=not progress)
    energies = []
    try:
        for k in range(n_done, n_target):
            integrator.step(steps_per_frame)
            state = context.getState(getPositions=True, getEnergy=True)
            epot = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            if not np.isfinite(epot):
                raise RuntimeError(f"Potential energy became {epot} at frame {k}; the simulation blew up. Use a "
                                   "smaller timestep.")
            energies.append(epot)
            x = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
            for i, s in enumerate(seqs):
                frames[i].append(_to_int16(x[offsets[i]:offsets[i + 1]], s)[None])
            bar.update(1)
            if (k + 1 - n_done) % checkpoint_frames == 0 or k + 1 == n_target:
                flush(k + 1)
    finally:
        bar.close()
    if energies:
        logger.info("simulate: %d frames, mean potential energy %.1f kJ/mol (all copies)", len(energies),
                    float(np.mean(energies)))
    return {s: out / f"{s}.npz" for s in seqs}


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
    parser.add_argument("--platform", default=None, help="OpenMM platform (default: CUDA if present, else CPU)")
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
