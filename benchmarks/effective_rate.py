"""Effective samples per CPU-second: the Boltzmann generator (with and without refinement) against MD.

For each peptide, on the same core:

- **MD**: one OpenMM Context at the data set's Hamiltonian (LangevinMiddleIntegrator, 1 fs, 310 K, one CPU
  thread) is timed for ``--md-steps`` steps; independent samples per CPU-second = simulated ps per CPU-second /
  (2 tau_int), with tau_int that of the slowest backbone observable (sin/cos phi/psi) of the data set's own MD of
  that peptide (`openmm_tbg.evaluation.md_independent_samples`; 3 ns runs underestimate the rare alpha-L flips,
  so this favours MD).
- **BG**: ``--samples`` proposals of the model are timed (flow, validity checks and energies); effective
  samples per second = Kish ESS x proposals / time. With ``--refine-json`` (the ``--json`` output of
  ``benchmarks/refine_curve.py``) the refined model's ESS at ``--refine-minutes`` is used, and the refinement's
  wall time is added to the time of 1e4 and 1e5 proposals (the refined model is taken to propose at the same
  speed as the shipped one, which has the same architecture).

    taskset -c 0 python benchmarks/effective_rate.py --split test --refine-json runs/refine_curve.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch
from _harness import header, markdown_table, measure_md

from openmm_tbg import BoltzmannGeneratorSampler
from openmm_tbg.data import load_peptide, read_splits
from openmm_tbg.evaluation import backbone_torsions, md_independent_samples
from openmm_tbg.peptides import create_system


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"))
    parser.add_argument("--split", default=None)
    parser.add_argument("--peptides", nargs="+", default=None)
    parser.add_argument("--md-steps", type=int, default=20000, help="timed MD steps (1 fs each)")
    parser.add_argument("--samples", type=int, default=2000, help="timed BG proposals")
    parser.add_argument("--refine-json", default=None, help="refine_curve.py --json output")
    parser.add_argument("--refine-minutes", type=float, default=5.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    names = list(args.peptides or []) + (read_splits(args.data)[args.split] if args.split else [])
    refined = {}
    if args.refine_json:
        with open(args.refine_json) as fh:
            for r in json.load(fh):
                if r["budget_min"] == args.refine_minutes:
                    refined[r["peptide"]] = r
    header(__file__, md_steps=args.md_steps, samples=args.samples, refine=args.refine_json or "none")
    rows, ratios = [], []
    for name in names:
        t = load_peptide(args.data, name)
        phi, psi = backbone_torsions(t.positions, t.topology)
        tau = md_independent_samples(phi, psi, t.run, t.run_interval_ps)["tau_int_ps"]
        md = measure_md(t.topology, t.positions[0].astype(np.float64), copies=1, steps=args.md_steps,
                        warmup=500, threads=1)
        md_rate = md["ps_per_cpu_s_total"] / (2 * tau)
        sampler = BoltzmannGeneratorSampler(create_system(t.topology), t.topology, seed=0, platform="CPU")
        sampler.sample(64, progress=False)  # warm-up
        start = time.perf_counter()
        result = sampler.sample(args.samples, progress=False)
        seconds = time.perf_counter() - start
        sampler.close()
        per_s = args.samples / seconds
        bg_rate = result.ess * per_s
        cells = [name, f"{md['ns_per_day']:.1f}", f"{tau:.0f}", f"{md_rate:.3g}", f"{per_s:.0f}",
                 f"{100 * result.ess:.2f}", f"{bg_rate:.3g}", f"{bg_rate / md_rate:.3g}"]
        if name in refined:
            r = refined[name]
            refine_s = 60 * args.refine_minutes
            for n in (1e4, 1e5):
                rate = r["ess"] * n / (refine_s + n / per_s)
                cells.append(f"{rate:.3g} ({rate / md_rate:.3g}x)")
            ratios.append(float(r["ess"] * 1e4 / (refine_s + 1e4 / per_s) / md_rate))
        else:
            cells += ["-", "-"]
        rows.append(cells)
        print(" | ".join(cells), flush=True)
    print()
    markdown_table(["peptide", "MD ns/day", "tau_int ps", "MD indep./s", "BG proposals/s", "BG ESS %",
                    "BG eff./s", "BG/MD", f"refined eff./s at 1e4 (vs MD)", "at 1e5 (vs MD)"], rows)
    if ratios:
        print(f"refined BG / MD at 1e4 samples, refinement included: median {np.median(ratios):.3g}x, "
              f"min {np.min(ratios):.3g}x over {len(ratios)} peptides")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
