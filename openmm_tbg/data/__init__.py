"""The dipeptide MD data set: reading it (:mod:`.reading`), the test-split guard (:mod:`.splits`) and
generating new data in the same format (:mod:`.simulate`, ``openmm-tbg simulate``).

The format of a data directory (``XY.pdb``, ``XY.npz``, ``splits.json``) is described in :mod:`.reading`.
"""

from ..utils import default_file_mode as _default_file_mode  # noqa: F401  (checkpoint.py imports it from here)
from .reading import (POSITION_SCALE_NM, DatasetError, PeptideTrajectory, load_dataset, load_peptide,
                      read_splits)
from .simulate import CHECKPOINT_NAME, build_separated_system, configure_parser, run_from_cli, simulate
from .splits import TestSplitError, check_not_test_split, load_training_data

__all__ = [
    "POSITION_SCALE_NM", "DatasetError", "PeptideTrajectory", "read_splits", "load_peptide", "load_dataset",
    "TestSplitError", "check_not_test_split", "load_training_data", "CHECKPOINT_NAME", "build_separated_system",
    "simulate", "configure_parser", "run_from_cli",
]
