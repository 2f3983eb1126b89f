"""The message for an unreadable checkpoint: no unsafe PyTorch hint, the file's sha256, the expected format."""

import hashlib
import pickle

import numpy as np
import pytest
import torch

from openmm_tbg.checkpoint import FORMAT, CheckpointError, load_model


class _Foreign:
    """A class that weights_only loading refuses to unpickle."""


def _bad_files(tmp_path):
    # 1024 random bytes from seed 0 make torch.load raise UnpicklingError *with* its weights_only=False hint.
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(1024))
    foreign = tmp_path / "foreign.pt"
    torch.save({"obj": _Foreign()}, foreign)
    plain_pickle = tmp_path / "pickle.pt"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}))
    return [random_bytes, foreign, plain_pickle]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unreadable_checkpoint_message(tmp_path):
    for path in _bad_files(tmp_path):
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        message = str(info.value)
        assert "weights_only=False" not in message and "Re-running" not in message
        assert f"{path} is not a valid openmm_tbg checkpoint" in message
        assert hashlib.sha256(path.read_bytes()).hexdigest() in message
        assert repr(FORMAT) in message and "save_model" in message
        # The PyTorch exception is not chained either, so a traceback does not print the hint.
        assert info.value.__cause__ is None and info.value.__suppress_context__
