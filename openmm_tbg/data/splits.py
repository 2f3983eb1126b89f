"""The test-split guard: training data must never include peptides of a data set's held-out test split."""

from __future__ import annotations

import logging
import os
from typing import Sequence

from .reading import PeptideTrajectory, load_dataset, read_splits

logger = logging.getLogger(__name__)


class TestSplitError(ValueError):
    """Raised when training data include peptides of the data set's held-out test split."""

    __test__ = False  # not a pytest test class


def _has_splits(directory: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(os.fspath(directory), "splits.json"))


def check_not_test_split(names: Sequence[str], data_dir: str | os.PathLike | None) -> None:
    """Refuse peptide ``names`` that belong to the test split of ``data_dir`` (when it has a splits.json).

    Parameters
    ----------
    names : sequence of str
        Peptides about to be trained on.
    data_dir : path or None
        Their data directory; None (data of unknown origin) checks nothing.

    Raises
    ------
    TestSplitError
        Naming the offending peptides.
    """
    if data_dir is None:
        return
    if not _has_splits(data_dir):
        logger.info("%s has no splits.json; the test split cannot be checked.", data_dir)
        return
    test = set(read_splits(data_dir).get("test", []))
    bad = sorted(set(names) & test)
    if bad:
        raise TestSplitError(
            f"Refusing to train on {len(bad)} peptide(s) of the held-out test split of {data_dir}: "
            f"{', '.join(bad)}. Train on the 'train' split (--split train) and drop these names from --peptides."
        )


def load_training_data(
    directory: str | os.PathLike,
    split: str | None = "train",
    names: Sequence[str] | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    progress: bool = True,
) -> list[PeptideTrajectory]:
    """Load training trajectories with :func:`load_dataset`, refusing the test split.

    Parameters
    ----------
    directory : path
        Data-set directory (``XY.pdb`` + ``XY.npz`` + optional ``splits.json``).
    split : str or None
        ``"train"`` (default) or ``None`` for all peptides; ``"test"`` is refused, and so is any test-split
        peptide.
    names : sequence of str, optional
        Restrict to these peptides (which must lie in ``split`` when one is given).
    stride, max_frames : int
        Passed to ``load_dataset``.
    progress : bool
        Show a progress bar.

    Raises
    ------
    TestSplitError
        The test split, or a peptide of it, was asked for.
    ValueError
        A named peptide is not in ``split``.
    """
    if split == "test":
        raise TestSplitError("Refusing to train on the 'test' split; use --split train.")
    if names is not None:
        check_not_test_split(names, directory)
        if split is not None and _has_splits(directory):
            outside = sorted(set(names) - set(read_splits(directory).get(split, [])))
            if outside:
                raise ValueError(f"Peptides {outside} are not in the {split!r} split of {directory}; drop them "
                                 "from --peptides (or pass --split all to allow any non-test peptide).")
    trajectories = load_dataset(directory, split=split, names=None if names is None else list(names),
                                stride=stride, max_frames=max_frames, progress=progress)
    check_not_test_split([t.name for t in trajectories], directory)
    return trajectories
