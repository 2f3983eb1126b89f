"""The examples parse their arguments, expose a small TBGMove buffer, and state their measured cost.

Running them takes minutes (see their docstrings), so only their command lines are checked here.
"""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ["sample_dipeptide", "hybrid_md_bg", "replica_exchange_bg", "fine_tune_peptide"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_help_and_measured_cost(name, capsys):
    module = _load(name)
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    # The docstring (shown by --help) states runtime and peak memory, measured with /usr/bin/time -v.
    assert "/usr/bin/time -v" in text and "peak memory" in text and "RUNTIME below" not in text
    if name in ("hybrid_md_bg", "replica_exchange_bg"):
        assert "--buffer-size" in text


def test_replica_exchange_refuses_to_overwrite_in_one_line(tmp_path, capsys):
    """Issue 21 item 5: a second run without --resume names --resume / --storage instead of openmmtools'
    "cowardly refusing to overwrite" traceback, before any work."""
    storage = tmp_path / "repex.nc"
    storage.write_bytes(b"")
    assert _load("replica_exchange_bg").main(["--storage", str(storage)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--storage" in err[0], err
