"""ESS, valid fraction and basin populations after 0, 1, 2 and 5 CPU-minutes of refinement, against MD.

For each peptide, one refinement run (`BoltzmannGeneratorSampler.refine`, no MD data) of the longest budget
starts from the model; the state it would have returned at each shorter budget (its best state at the first
evaluation past that budget) is recorded on the way. Each state then draws ``--samples`` fresh proposals,
whose importance weights give the Kish ESS, the valid fraction and the populations of the backbone basins with
ESS-based standard errors:

- alpha-L: phi > 0;
- alpha-R: phi < 0 and -120 < psi < 50 degrees;
- beta/PPII: phi < 0 and psi outside (-120, 50) degrees;

(phi of residue 2, psi of residue 1, as in the Ramachandran plots). MD populations come from the data set's
frames (error bar: spread between its independent runs; rare basins are uncertain in 3 ns runs). "2 SE" says
whether the reweighted BG population is within two combined standard errors of MD, for basins MD puts at >= 1 %.

Run it on one core (``taskset -c 0``); torch and OpenMM use one thread. The test split is for evaluation only:
choose settings with ``--peptides`` from the train split.

    taskset -c 0 python benchmarks/refine_curve.py --split test --budgets 0 1 2 5 --samples 2000
    taskset -c 0 python benchmarks/refine_curve.py --peptides KE PW --budgets 0 2 --samples 2000   # tuning
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import warnings

import numpy as np
import torch
from _harness import header, markdown_table

from openmm_tbg import BoltzmannGeneratorSampler
from openmm_tbg.data import load_peptide, read_splits
from openmm_tbg.figures import backbone_torsion_pairs
from openmm_tbg.peptides import create_system

BASINS = ("alpha_R", "beta_PPII", "alpha_L")


def basin_indicators(pairs_deg: np.ndarray) -> dict[str, np.ndarray]:
    phi, psi = pairs_deg[:, 0, 0], pairs_deg[:, 0, 1]  # the (phi of residue 2, psi of residue 1) pair
    alpha_r = (phi < 0) & (psi > -120) & (psi < 50)
    return {"alpha_R": alpha_r, "beta_PPII": (phi < 0) & ~alpha_r, "alpha_L": phi > 0}


def populations(sampler, topology, n: int) -> dict:
    result = sampler.sample(n, progress=False)
    out = {"ess": result.ess, "valid": float(result.valid.mean()), "n": n}
    valid = result.valid
    if valid.sum() < 2:
        return out
    pairs, _ = backbone_torsion_pairs(result.positions[valid], topology)
    lw = result.log_weights[valid]
    w = np.exp(lw - lw.max())
    w /= w.sum()
    n_eff = result.ess * n
    for name, ind in basin_indicators(pairs).items():
        p = float(np.sum(w * ind))
        raw = float(ind.mean())
        n_eff_ = max(n_eff, 1.0)  # an empty basin still gets an error of ~1 / n_eff
        out[name] = {"mean": p, "sem": math.sqrt(max(p * (1 - p), 1.0 / n_eff_) / n_eff_), "raw": raw}
    return out


def md_populations(trajectory) -> dict:
    pairs, _ = backbone_torsion_pairs(trajectory.positions, trajectory.topology)
    out = {}
    runs = np.unique(trajectory.run)
    for name, ind in basin_indicators(pairs).items():
        per_run = np.array([ind[trajectory.run == r].mean() for r in runs])
        out[name] = {"mean": float(ind.mean()), "sem": float(per_run.std(ddof=1) / math.sqrt(len(runs)))}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"))
    parser.add_argument("--split", default=None, help="all peptides of this split (e.g. test)")
    parser.add_argument("--peptides", nargs="+", default=None)
    parser.add_argument("--model", default=None, help="starting model (default: the shipped one)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0, 1, 2, 5], help="CPU-minutes")
    parser.add_argument("--samples", type=int, default=2000, help="fresh proposals per state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--option", nargs="*", default=[], metavar="NAME=VALUE",
                        help="RefinementOptions overrides, e.g. learning_rate=1e-4")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    names = list(args.peptides or []) + (read_splits(args.data)[args.split] if args.split else [])
    if not names:
        raise SystemExit("give --peptides or --split")
    overrides = {}
    for item in args.option:
        key, value = item.split("=", 1)
        overrides[key] = float(value) if any(c in value for c in ".e") else int(value)
    budgets = sorted(set(args.budgets))
    header(__file__, model=args.model or "shipped", budgets_min=budgets, samples=args.samples, seed=args.seed,
           options=overrides or "defaults")
    rows, records = [], []
    for name in names:
        trajectory = load_peptide(args.data, name)
        md = md_populations(trajectory)
        system = create_system(trajectory.topology)
        sampler = BoltzmannGeneratorSampler(system, trajectory.topology, model=args.model, seed=args.seed,
                                            platform="CPU")
        snapshots: dict[float, dict] = {}
        longest = max(budgets)
        refined = None
        if longest > 0:
            pending = [b for b in budgets if b > 0]

            def record(entry, best_state):
                while pending and entry["seconds"] >= 60 * pending[0]:
                    snapshots[pending.pop(0)] = copy.deepcopy(best_state)

            start = time.perf_counter()
            refined = sampler.refine(max_seconds=60 * longest, seed=args.seed, progress=False, callback=record,
                                     patience=0, **overrides)
            wall = time.perf_counter() - start
            for b in pending:  # the run ended before this budget's evaluation: the final state
                snapshots[b] = copy.deepcopy(refined.flow.state_dict())
        for budget in budgets:
            if budget == 0:
                s, steps = sampler, 0
            else:
                flow = copy.deepcopy(refined.flow)
                flow.load_state_dict(snapshots[budget])
                s = sampler.with_model(flow, seed=args.seed + 1)
                steps = max(h["step"] for h in refined.refinement.history if h["seconds"] <= 60 * budget + 30)
            pops = populations(s, trajectory.topology, args.samples)
            record_ = {"peptide": name, "budget_min": budget, "steps": steps, **pops, "md": md}
            records.append(record_)
            cells = [name, f"{budget:g}", steps, f"{100 * pops['ess']:.2f}", f"{100 * pops['valid']:.1f}"]
            within = []
            for basin in BASINS:
                if basin not in pops:
                    cells.append("-")
                    continue
                bg, ref = pops[basin], md[basin]
                cells.append(f"{100 * bg['mean']:.1f} ± {100 * bg['sem']:.1f} (raw {100 * bg['raw']:.1f}) / "
                             f"{100 * ref['mean']:.1f} ± {100 * ref['sem']:.1f}")
                if ref["mean"] >= 0.01:
                    within.append(abs(bg["mean"] - ref["mean"]) <= 2 * math.hypot(bg["sem"], ref["sem"]))
            cells.append(f"{sum(within)}/{len(within)}")
            rows.append(cells)
            print(" | ".join(str(c) for c in cells), flush=True)
        if refined is not None:
            print(f"# {name}: {refined.refinement.summary()} ({wall:.0f} s)", flush=True)
            refined.close()
        sampler.close()
    print()
    markdown_table(["peptide", "min", "steps", "ESS %", "valid %"] +
                   [f"{b} % BG (raw) / MD" for b in BASINS] + ["basins within 2 SE"], rows)
    for budget in budgets:
        ess = np.array([r["ess"] for r in records if r["budget_min"] == budget])
        valid = np.array([r["valid"] for r in records if r["budget_min"] == budget])
        print(f"budget {budget:g} min: ESS mean {100 * ess.mean():.2f} %, median {100 * np.median(ess):.2f} %, "
              f"min {100 * ess.min():.2f} %; valid mean {100 * valid.mean():.1f} %, min {100 * valid.min():.1f} %")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
