"""Issue 21 item 6: the package silences openmmtools' and pymbar's banners, and only those."""

import logging
import subprocess
import sys

from openmm_tbg.quiet import BANNERS, quiet_openmmtools


def test_importing_the_move_prints_no_banner():
    """A fresh interpreter (pymbar not yet imported) that imports TBGMove prints nothing at all."""
    proc = subprocess.run([sys.executable, "-c", "from openmm_tbg import TBGMove; TBGMove"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == "", proc.stderr


def test_replica_exchange_objects_print_no_banner(tmp_path):
    """The experimental-API warning and the citation list of openmmtools.multistate, inside the block."""
    code = f"""
from openmm import unit
from openmm_tbg.quiet import quiet_openmmtools
with quiet_openmmtools():
    from openmmtools import multistate, states, testsystems, mcmc
    ho = testsystems.HarmonicOscillator()
    sampler = multistate.ReplicaExchangeSampler(mcmc_moves=mcmc.LangevinDynamicsMove(n_steps=1),
                                                number_of_iterations=1)
    reporter = multistate.MultiStateReporter({str(tmp_path / 'x.nc')!r}, checkpoint_interval=1)
    sampler.create(thermodynamic_states=[states.ThermodynamicState(ho.system, 300 * unit.kelvin)],
                   sampler_states=[states.SamplerState(ho.positions)], storage=reporter)
    reporter.close()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "experimental" in line or "Please cite" in line or "JAX NOT FOUND" in line
             or "timeseries module" in line]
    assert noise == [], noise


def test_other_records_of_those_loggers_pass_and_the_filters_are_removed(caplog):
    """Only the banners' text is dropped, only inside the block; Python warnings are not touched."""
    import warnings

    caplog.set_level(logging.WARNING)
    banner = logging.getLogger("pymbar.timeseries")
    with quiet_openmmtools(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        banner.warning("Warning on use of the timeseries module: ...")
        banner.warning("statistical inefficiency is undefined for a constant series")
        warnings.warn("a real warning", UserWarning)
    banner.warning("Warning on use of the timeseries module: after the block")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["statistical inefficiency is undefined for a constant series",
                        "Warning on use of the timeseries module: after the block"]
    assert [str(w.message) for w in caught] == ["a real warning"]
    assert all(not logging.getLogger(name).filters for name in BANNERS)
