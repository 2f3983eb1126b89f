"""Reading the dipeptide MD data set: topologies, frames and splits.

Format of a data directory (see ``shared/data/dipeptides/README.md``):

- ``XY.pdb``: topology and a starting structure; its atom order defines the trajectory's columns.
- ``XY.npz``: ``positions`` int16 (frames, atoms, 3) in units of 1e-4 nm with the centroid removed per frame,
  ``run`` int8 (frames,) index of the independent run of each frame (frames of a run are consecutive),
  ``run_interval_ps`` float (n_runs,) time between saved frames of each run.
- ``splits.json``: ``{"train": [...], "test": [...]}``.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..encoding import AtomEncoding, encode_topology
from ..utils import evenly_spaced

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
    """Every ``stride``-th of ``n`` frames, then at most ``max_frames`` of those evenly spaced (all runs count)."""
    idx = np.arange(0, n, stride)
    return idx[evenly_spaced(idx.size, max_frames)]


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
