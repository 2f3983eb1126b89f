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
import json
import logging
import os

import numpy as np
from _harness import TEMPERATURE_K, TIMESTEP_FS, markdown_table, measure_md, molecule

from openmm_tbg.data import load_dataset
from openmm_tbg.evaluation import backbone_torsions, md_independent_samples
from openmm_tbg.utils import machine_line

logger = logging.getLogger("md_speed")


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
            r = measure_md(topology, positions, k, args.steps, args.warmup, threads, args.platform)
            rows.append(r)
            print(f"  measured {k} copies, {threads} thread(s): {r['ns_per_day']:.1f} ns/day per molecule",
                  flush=True)
    taus = md_tau(args.data, args.split, args.peptides) if args.data else []
    tau_med = float(np.median([t["tau_int_ps"] for t in taus])) if taus else None

    print()
    print(f"# OpenMM MD speed: {args.sequence}, amber14-all + implicit/obc1, CutoffNonPeriodic 2 nm, no "
          f"constraints, {TIMESTEP_FS:g} fs, {TEMPERATURE_K:g} K, platform {args.platform}")
    print(f"machine: {machine_line()}; load average {os.getloadavg()[0]:.1f}")
    print()
    titles = ["copies", "atoms", "threads", "ns/day per molecule", "ns/day total", "wall s", "CPU s",
              "ps per CPU-s (total)"]
    if tau_med:
        titles.append(f"indep. samples per CPU-s (tau {tau_med:.0f} ps)")
    table = []
    for r in rows:
        cells = [r["copies"], r["atoms"], r["threads"], f"{r['ns_per_day']:.1f}", f"{r['ns_per_day_total']:.1f}",
                 f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['ps_per_cpu_s_total']:.4f}"]
        if tau_med:
            r["independent_per_cpu_s"] = r["ps_per_cpu_s_total"] / (2 * tau_med)
            cells.append(f"{r['independent_per_cpu_s']:.2e}")
        table.append(cells)
    markdown_table(titles, table)
    if taus:
        print()
        print(f"## MD integrated autocorrelation time, slowest of sin/cos(phi, psi), split {args.split!r} "
              f"(all runs pooled per frame interval; tau = T / (2 n_indep))")
        print()
        markdown_table(["peptide", "runs", "simulated ns", "tau_int ps (pooled)", "per-run median / max ps",
                        "slowest", "indep. samples"],
                       [[t["name"], t["n_runs"], f"{t['total_time_ps'] / 1000:.1f}", f"{t['tau_int_ps']:.0f}",
                         f"{t['tau_per_run_median_ps']:.0f} / {t['tau_per_run_max_ps']:.0f}", t["slowest"],
                         f"{t['n_independent']:.0f}"] for t in taus])
        arr = np.array([t["tau_int_ps"] for t in taus])
        print(f"\ntau_int over {len(arr)} peptides: median {np.median(arr):.0f} ps, min {arr.min():.0f}, "
              f"max {arr.max():.0f}. Caveat: 3 ns runs underestimate slow alpha-L flips.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"md_speed": rows, "tau": taus}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
