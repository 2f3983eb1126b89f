"""The `openmm-tbg` command line."""

import logging
import subprocess
import sys

import numpy as np
import pytest

from openmm_tbg import cli
from openmm_tbg.data import load_peptide


def test_simulate_command(tmp_path, capsys):
    out = tmp_path / "md"
    rc = cli.main(["-v", "simulate", "AA", "--out", str(out), "--ns", "0.001", "--save-interval-ps", "0.1",
                   "--equilibration-ps", "0.1", "--seed", "3", "--platform", "CPU", "--no-progress"])
    assert rc == 0
    assert logging.getLogger("openmm_tbg").level == logging.INFO
    assert "AA:" in capsys.readouterr().out
    traj = load_peptide(out, "AA")
    assert traj.n_frames == 10 and np.all(np.isfinite(traj.positions))


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 1
    assert "simulate" in capsys.readouterr().out


def test_subcommand_help_imports_only_that_module(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["simulate", "--help"])
    assert exc.value.code == 0
    assert "--ns" in capsys.readouterr().out


def test_missing_module_and_missing_hooks(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "bogus", ("openmm_tbg.no_such_module", "x"))
    assert cli.main(["bogus"]) == 2
    assert "openmm_tbg.no_such_module, which is not part of this installation" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "hookless", ("openmm_tbg.encoding", "x"))
    assert cli.main(["hookless"]) == 2
    assert "does not define configure_parser and run_from_cli" in capsys.readouterr().err


def test_command_table_matches_contract():
    assert {k: v[0] for k, v in cli.COMMANDS.items()} == {
        "simulate": "openmm_tbg.data", "train": "openmm_tbg.training",
        "sample": "openmm_tbg.sampler", "evaluate": "openmm_tbg.evaluation"}


def test_bad_argument_exit_code():
    proc = subprocess.run([sys.executable, "-m", "openmm_tbg.cli", "simulate", "AA", "--out", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--ns" in proc.stderr
