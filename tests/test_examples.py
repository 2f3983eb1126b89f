"""The examples parse their arguments, expose a small TBGMove buffer, and state their measured cost.

Running them takes minutes (see their docstrings), so only their command lines are checked here.
"""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ["sample_dipeptide", "hybrid_md_bg", "replica_exchange_bg", "refine_peptide"]


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


def test_default_outputs_stay_out_of_git(capsys):
    """Issue 21 item 1: run in a checkout with their defaults, the examples and `openmm-tbg sample` write only
    files that .gitignore covers (the fine-tuning example left fine_tune_run/ untracked in the root)."""
    import shutil
    import subprocess

    root = EXAMPLES.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    with pytest.raises(SystemExit):
        _load("refine_peptide").main(["--help"])
    assert "default runs/refine/<sequence>" in " ".join(capsys.readouterr().out.split())
    defaults = ["runs/refine/NY_refined.pt", "runs/refine/NY_before_ramachandran.png", "runs/refine/NY_refinement.png",
                "repex_bg.nc", "repex_bg_checkpoint.nc", "dipeptide_resampled.npz", "dipeptide_resampled.pdb",
                "dipeptide_resampled_ramachandran.png", "samples.npz", "samples_valid.pdb", "samples_valid.dcd",
                "samples_valid_weights.npz", "samples_ramachandran.png", "samples_resampled.pdb"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *defaults], cwd=root, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(defaults), proc.stdout
