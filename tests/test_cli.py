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
        "sample": "openmm_tbg.sample_command", "refine": "openmm_tbg.refine_command",
        "evaluate": "openmm_tbg.evaluation"}


def test_bad_argument_exit_code():
    proc = subprocess.run([sys.executable, "-m", "openmm_tbg.cli", "simulate", "AA", "--out", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--ns" in proc.stderr


# ------------------------------------------------------------------------ errors as one line (issue item 5)
def _raising_command(monkeypatch, exc):
    """Register a command 'boom' whose run_from_cli raises ``exc``."""
    import types

    module = types.ModuleType("openmm_tbg_test_boom")
    module.configure_parser = lambda parser: None

    def run_from_cli(args):
        raise exc

    module.run_from_cli = run_from_cli
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "boom", (module.__name__, "raises"))


def _known_errors():
    from openmm_tbg.checkpoint import CheckpointError
    from openmm_tbg.data.reading import DatasetError
    from openmm_tbg.data.splits import TestSplitError
    from openmm_tbg.encoding import UnsupportedTopologyError

    return [UnsupportedTopologyError("residue XYZ is not supported; use a model trained on it."),
            CheckpointError("model.pt is not a valid openmm_tbg checkpoint."),
            DatasetError("no XY.npz in data/; run openmm-tbg simulate first."),
            TestSplitError("HT is a test peptide; pass --split train."),
            ValueError("--samples must be a positive integer, got 0."),
            TypeError("model must be None or a path."),
            FileNotFoundError("x.pdb does not exist; pass the path of a PDB file.")]


def test_known_errors_are_one_line_with_status_2(monkeypatch, capsys):
    for exc in _known_errors():
        _raising_command(monkeypatch, exc)
        assert cli.main(["boom"]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"openmm-tbg: error: {exc}\n", type(exc).__name__
        assert "Traceback" not in captured.err + captured.out


def test_verbose_shows_the_traceback(monkeypatch, capsys):
    exc = _known_errors()[1]
    _raising_command(monkeypatch, exc)
    for argv in (["-v", "boom"], ["boom", "-v"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and "CheckpointError" in err
        assert err.endswith(f"openmm-tbg: error: {exc}\n")


def test_os_errors_lose_the_errno_prefix(monkeypatch, capsys):
    _raising_command(monkeypatch, FileNotFoundError(2, "No such file or directory", "x.pdb"))
    assert cli.main(["boom"]) == 2
    assert capsys.readouterr().err == "openmm-tbg: error: No such file or directory: 'x.pdb'\n"


def test_bugs_keep_their_traceback(monkeypatch):
    _raising_command(monkeypatch, RuntimeError("internal"))
    with pytest.raises(RuntimeError, match="internal"):
        cli.main(["boom"])


def test_version(capsys):
    from openmm_tbg import __version__

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"openmm-tbg {__version__}"


def test_real_errors_from_the_sample_command(tmp_path):
    """Bad sequence (ValueError), unreadable checkpoint (CheckpointError), missing PDB: one line each."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(1024))
    cases = [(["--sequence", "AX"], "not standard amino acids"),
             (["--sequence", "AA", "--model", str(garbage)], "is not a valid openmm_tbg checkpoint"),
             (["--pdb", str(tmp_path / "missing.pdb")], "does not exist")]
    for extra, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "openmm_tbg.cli", "sample", *extra, "--samples", "2",
                               "--output", str(tmp_path / "x.npz")], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("openmm-tbg: error: ") and expected in lines[0], lines
        assert "weights_only=False" not in proc.stderr


# ------------------------------------------------------------------------------- `openmm-tbg sample` (item 6)
def test_sample_writes_trajectory_weights_figure_and_seed(tmp_path, capsys, monkeypatch):
    """The default shipped model, 4 AA proposals (seconds on the 2-core CPU). Without --seed the command draws
    one; the draw is fixed here (so that every run tests the same samples) and the property tested is the one
    that holds for any drawn seed: printed and recorded, it repeats the run exactly when passed back."""
    import mdtraj

    from openmm_tbg import sample_command
    from openmm_tbg.results import SampleResult
    from openmm_tbg.sample_command import output_paths

    assert sample_command.draw_seed() != sample_command.draw_seed()  # OS entropy (equal with probability 2^-32)
    monkeypatch.setattr(sample_command, "draw_seed", lambda: 2718281)
    out = tmp_path / "aa.npz"
    rc = cli.main(["sample", "--sequence", "AA", "--samples", "4", "--output", str(out), "--resample", "4",
                   "--no-progress"])
    captured = capsys.readouterr()
    paths = output_paths(str(out))
    result = SampleResult.load(paths["result"])
    assert rc == 0, captured.err
    assert result.n_valid >= 1
    seed = int(captured.out.split("seed: ")[1].split()[0])  # drawn, printed ...
    assert seed == 2718281 and f"--seed {seed} repeats this run" in captured.out
    again = tmp_path / "again.npz"
    assert cli.main(["sample", "--sequence", "AA", "--samples", "4", "--output", str(again), "--resample", "4",
                     "--no-progress", "--seed", str(seed)]) == 0
    capsys.readouterr()
    repeated = SampleResult.load(output_paths(str(again))["result"])
    for name in ("positions", "log_q", "log_weights", "reduced_potentials", "valid"):  # ... repeats the run ...
        np.testing.assert_array_equal(getattr(repeated, name), getattr(result, name), err_msg=name)
    with np.load(output_paths(str(again))["weights"]) as z_again, np.load(paths["weights"]) as z:
        np.testing.assert_array_equal(z_again["weights"], z["weights"])
    with np.load(paths["weights"]) as z:
        assert int(z["seed"]) == seed  # ... and is recorded
        np.testing.assert_allclose(z["weights"].sum(), 1.0)
        np.testing.assert_array_equal(z["proposal_index"], np.flatnonzero(result.valid))
    traj = mdtraj.load(paths["valid_dcd"], top=paths["valid_pdb"])
    assert traj.n_frames == result.n_valid and traj.n_atoms == 23
    np.testing.assert_allclose(traj.xyz, result.positions[result.valid], atol=1e-3)
    resampled = mdtraj.load(paths["resampled_dcd"], top=paths["resampled_pdb"])
    assert resampled.n_frames == 4
    with open(paths["figure"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    for key in ("result", "valid_pdb", "valid_dcd", "weights", "figure", "resampled_pdb", "resampled_dcd"):
        assert f"wrote {paths[key]}" in captured.out or f"and {paths[key]}" in captured.out, key
    assert "effective samples" in captured.out and "distinct configuration" in captured.out


# ------------------------------------------------------- issue 21, "what a new user still hits", items 7-10
def test_unwritable_output_fails_before_the_run_and_before_the_seed_line(tmp_path, capsys):
    """Item 7: the output is checked before the model is loaded; item 9: no "seed ... repeats this run" line."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "out_valid.pdb").mkdir()  # one of the outputs of --output out.npz is a directory
    for output, expected in ((blocker / "x.npz", "is a file, not a directory"),
                             (tmp_path / "out.npz", "out_valid.pdb is a directory")):
        rc = cli.main(["sample", "--sequence", "AA", "--samples", "2", "--output", str(output), "--no-progress"])
        captured = capsys.readouterr()
        assert rc == 2
        assert f"--output {output}" in captured.err and expected in captured.err, captured.err
        assert "seed" not in captured.out
    assert not (tmp_path / "out.npz").exists()  # nothing was sampled
    rc = cli.main(["refine", "--sequence", "AA", "--out", str(blocker / "r.pt"), "--max-steps", "1"])
    assert rc == 2 and "--out" in capsys.readouterr().err


def test_seed_line_is_not_printed_before_an_input_error(capsys):
    """Item 9: a bad sequence fails without first printing how to repeat the run."""
    assert cli.main(["sample", "--sequence", "AX", "--samples", "2", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "not standard amino acids" in captured.err and "seed" not in captured.out


def test_model_names_in_the_error_and_the_help(capsys):
    """Item 8: ``--model egnn`` names the accepted shipped models (and the close one) instead of a missing file."""
    from openmm_tbg.checkpoint import SHIPPED_MODELS

    assert cli.main(["sample", "--sequence", "AA", "--model", "egnn", "--samples", "2"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'egnn-cnf'?" in err and all(name in err for name in SHIPPED_MODELS), err
    for command in ("sample", "refine"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        help_text = "".join(capsys.readouterr().out.split())  # argparse wraps the help at any hyphen or space
        assert all(name in help_text for name in SHIPPED_MODELS), help_text


@pytest.fixture(scope="module")
def aa_files(tmp_path_factory):
    """AA as a PDB plus two serialized Systems: the data set's and a vacuum one (amber14-all alone)."""
    import openmm
    from openmm.app import PDBFile

    from openmm_tbg.peptides import build_peptide, create_system

    d = tmp_path_factory.mktemp("own_system")
    pep = build_peptide("AA")
    with open(d / "aa.pdb", "w") as fh:
        PDBFile.writeFile(pep.topology, pep.positions, fh)
    vacuum = create_system(pep.topology, forcefield=["amber14-all.xml"])
    (d / "vacuum.xml").write_text(openmm.XmlSerializer.serialize(vacuum))
    (d / "gg.xml").write_text(openmm.XmlSerializer.serialize(build_peptide("GG").system))
    (d / "state.xml").write_text(openmm.XmlSerializer.serialize(
        openmm.Context(vacuum, openmm.VerletIntegrator(0.001)).getState(getPositions=True)))
    return d, vacuum


def test_sample_with_a_serialized_system_uses_that_system(aa_files, tmp_path, capsys):
    """Item 10: ``--system vacuum.xml --pdb aa.pdb`` samples the vacuum Hamiltonian: every weight's u is that
    System's energy / kT at the sample."""
    import openmm
    from openmm import unit

    from openmm_tbg.results import SampleResult

    d, vacuum = aa_files
    out = tmp_path / "own.npz"
    rc = cli.main(["sample", "--pdb", str(d / "aa.pdb"), "--system", str(d / "vacuum.xml"), "--samples", "6",
                   "--seed", "3", "--output", str(out), "--no-progress", "--no-figure"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = SampleResult.load(str(out))
    context = openmm.Context(vacuum, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    kT = (unit.MOLAR_GAS_CONSTANT_R * 310 * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
    for i in np.flatnonzero(result.valid):
        context.setPositions(result.positions[i])
        u = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / kT
        np.testing.assert_allclose(result.reduced_potentials[i], u, rtol=1e-5)


def test_serialized_system_errors(aa_files, capsys):
    """Item 10: the user's System goes through the same checks; a wrong file names the cause and the fix."""
    d, _ = aa_files
    cases = [(["--pdb", str(d / "aa.pdb"), "--system", str(d / "gg.xml")], "17 particles but the Topology has 23"),
             (["--pdb", str(d / "aa.pdb"), "--system", str(d / "state.xml")], "holds a serialized State"),
             (["--pdb", str(d / "aa.pdb"), "--system", str(d / "aa.pdb")], "is not a serialized OpenMM object"),
             (["--pdb", str(d / "aa.pdb"), "--system", str(d / "missing.xml")], "does not exist"),
             (["--sequence", "AA", "--system", str(d / "vacuum.xml")], "--system needs --pdb")]
    for extra, expected in cases:
        assert cli.main(["sample", *extra, "--samples", "2", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("openmm-tbg: error: ") and expected in err[0], err


def test_sample_loads_the_model_file_once(tmp_path, monkeypatch):
    """`openmm-tbg sample` resolves the model once (it chooses the batch size from the loaded flow and hands
    the same object to the sampler): one read of the checkpoint per run."""
    from openmm_tbg import checkpoint

    calls = []
    real_load = checkpoint.load_model

    def counting_load(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_model", counting_load)
    rc = cli.main(["sample", "--sequence", "AA", "--samples", "2", "--seed", "0", "--output",
                   str(tmp_path / "once.npz"), "--no-progress", "--no-figure"])
    assert rc == 0 and len(calls) == 1, calls
