"""OpenMM MD speed at the target Hamiltonian, and independent MD samples per CPU-second.

Target (the data set's): amber14-all + implicit/obc1, CutoffNonPeriodic 2 nm, no constraints,
LangevinMiddleIntegrator 310 K, 0.3/ps, 1 fs. Measures one dipeptide in one Context and ``k`` copies of it in
one System (:func:`openmm_tbg.data.build_separated_system`, the way the data set was generated), prints ns/day
(per molecule and in all) and, with ``--data``, combines them with the integrated autocorrelation time of the
slowest backbone observable (sin/cos phi/psi) of the data set's test trajectories into "independent MD samples
per CPU-second" = simulated ps per CPU-second / (2 tau_int).

Example:

    python benchmarks/md_speed.py --data ../shared/data/dipeptides --copies 1 8 32 --threads 1 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import time

import numpy as np
import openmm
from openmm import unit

from openmm_tbg.data import build_separated_system, load_dataset
from openmm_tbg.evaluation import backbone_torsions, md_independent_samples
from openmm_tbg.peptides import build_peptide, create_system

logger = logging.getLogger("md_speed")

TIMESTEP_FS = 1.0
TEMPERATURE_K = 310.0
FRICTION_PER_PS = 0.3


def molecule(sequence: str, data_dir: str | None):
    """(topology, positions_nm) of the dipeptide: the data set's PDB when available, else built."""
    if data_dir and os.path.exists(os.path.join(data_dir, f"{sequence}.pdb")):
        from openmm.app import PDBFile

        pdb = PDBFile(os.path.join(data_dir, f"{sequence}.pdb"))
        return pdb.topology, np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    pep = build_peptide(sequence)
    return pep.topology, np.asarray(pep.positions.value_in_unit(unit.nanometer))


def measure(topology, positions_nm: np.ndarray, copies: int, steps: int, warmup: int, threads: int | None,
            platform_name: str = "CPU", seed: int = 0) -> dict:
    """Time ``steps`` MD steps of ``copies`` copies of a molecule in one System (after minimization + warmup).

    Returns
    -------
    dict
        ``copies``, ``atoms``, ``wall_s``, ``cpu_s`` (process CPU time, all threads), ``ns_per_day`` (per
        molecule), ``ns_per_day_total``, ``ps_per_cpu_s_total`` (summed over molecules).
    """
    if copies == 1:
        system = create_system(topology)
        positions = positions_nm
    else:
        system, _, positions, _ = build_separated_system([topology] * copies, [positions_nm] * copies)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE_K * unit.kelvin, FRICTION_PER_PS / unit.picosecond,
                                                 TIMESTEP_FS * unit.femtosecond)
    integrator.setRandomNumberSeed(seed + 1)
    plat = openmm.Platform.getPlatformByName(platform_name)
    props = {"Threads": str(threads)} if (threads and platform_name == "CPU") else {}
    context = openmm.Context(system, integrator, plat, props)
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(TEMPERATURE_K * unit.kelvin, seed + 2)
    integrator.step(warmup)
    context.getState(getEnergy=True)
    c0, t0 = time.process_time(), time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)  # synchronise
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ps = steps * TIMESTEP_FS * 1e-3
    return {"copies": copies, "atoms": system.getNumParticles(), "threads": threads, "steps": steps,
            "wall_s": wall, "cpu_s": cpu, "ns_per_day": ps * 1e-3 / wall * 86400.0,
            "ns_per_day_total": copies * ps * 1e-3 / wall * 86400.0, "ps_per_cpu_s_total": copies * ps / cpu}


def md_tau(data_dir: str, split: str, names=None) -> list[dict]:
    """tau_int (ps) of the slowest backbone observable per peptide, all runs of the data set pooled."""
    out = []
    for traj in load_dataset(data_dir, split=None if names else split, names=names, progress=False):
        phi, psi = backbone_torsions(traj.positions, traj.topology)
        res = md_independent_samples(phi, psi, traj.run, traj.run_interval_ps)
        per_run = [r["tau_int_ps"] for r in res["per_run"]]
        out.append({"name": traj.name, "tau_int_ps": res["tau_int_ps"], "slowest": res["slowest"],
                    "total_time_ps": res["total_time_ps"], "n_independent": res["n_independent"],
                    "n_runs": len(per_run), "tau_per_run_median_ps": float(np.median(per_run)),
                    "tau_per_run_max_ps": float(np.max(per_run))})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequence", default="AA", help="dipeptide to time (default AA)")
    parser.add_argument("--data", default=None, help="data-set directory: PDB of the sequence and test-split tau_int")
    parser.add_argument("--split", default="test")
    parser.add_argument("--peptides", nargs="+", default=None, help="peptides for tau_int (default: the split)")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OpenMM CPU threads")
    parser.add_argument("--steps", type=int, default=2000, help="timed steps (1 fs each)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    topology, positions = molecule(args.sequence, args.data)
    rows = []
    for threads in args.threads:
        for k in args.copies:
            r = measure(topology, positions, k, args.steps, args.warmup, threads, args.platform)
            rows.append(r)
            print(f"  measured {k} copies, {threads} thread(s): {r['ns_per_day']:.1f} ns/day per molecule",
                  flush=True)
    taus = md_tau(args.data, args.split, args.peptides) if args.data else []
    tau_med = float(np.median([t["tau_int_ps"] for t in taus])) if taus else None

    print()
    print(f"# OpenMM MD speed: {args.sequence}, amber14-all + implicit/obc1, CutoffNonPeriodic 2 nm, no "
          f"constraints, {TIMESTEP_FS:g} fs, {TEMPERATURE_K:g} K, platform {args.platform}")
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; openmm {openmm.__version__}; "
          f"date {datetime.datetime.now().isoformat(timespec='seconds')}")
    print()
    head = ("| copies | atoms | threads | ns/day per molecule | ns/day total | wall s | CPU s "
            "| ps per CPU-s (total) |")
    if tau_med:
        head += f" indep. samples per CPU-s (tau {tau_med:.0f} ps) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (f"| {r['copies']} | {r['atoms']} | {r['threads']} | {r['ns_per_day']:.1f} "
                f"| {r['ns_per_day_total']:.1f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['ps_per_cpu_s_total']:.4f} |")
        if tau_med:
            r["independent_per_cpu_s"] = r["ps_per_cpu_s_total"] / (2 * tau_med)
            line += f" {r['independent_per_cpu_s']:.2e} |"
        print(line)
    if taus:
        print()
        print(f"## MD integrated autocorrelation time, slowest of sin/cos(phi, psi), split {args.split!r} "
              f"(all runs pooled per frame interval; tau = T / (2 n_indep))")
        print()
        print("| peptide | runs | simulated ns | tau_int ps (pooled) | per-run median / max ps | slowest "
              "| indep. samples |")
        print("|---|---|---|---|---|---|---|")
        for t in taus:
            print(f"| {t['name']} | {t['n_runs']} | {t['total_time_ps'] / 1000:.1f} | {t['tau_int_ps']:.0f} | "
                  f"{t['tau_per_run_median_ps']:.0f} / {t['tau_per_run_max_ps']:.0f} | {t['slowest']} | "
                  f"{t['n_independent']:.0f} |")
        arr = np.array([t["tau_int_ps"] for t in taus])
        print(f"\ntau_int over {len(arr)} peptides: median {np.median(arr):.0f} ps, min {arr.min():.0f}, "
              f"max {arr.max():.0f}. Caveat: 3 ns runs underestimate slow alpha-L flips.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"md_speed": rows, "tau": taus}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
