"""What `refine` returns, judged by the Pareto k of the weights: the starting model against the refined one.

For each peptide: ``--repeats`` draws of ``--samples`` proposals of the starting model (Kish ESS and Pareto k of
each, `openmm_tbg.weights.pareto_k`), then `BoltzmannGeneratorSampler.refine` with its defaults for
``--minutes`` (its final check included: it returns the starting weights unless the refined state's k is
lower), then as many draws of the model it returned. One core; the test split is for evaluation only.

    taskset -c 0 python benchmarks/refine_tails.py --peptides AA AC AT --minutes 2
    taskset -c 0 python benchmarks/refine_tails.py --split train --peptides KE FS --repeats 3 \
        --set kl_weight=0 --set final_check_samples=0      # an objective's own effect, on train peptides
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch
from _harness import header, markdown_table

from openmm_tbg import BoltzmannGeneratorSampler
from openmm_tbg.data import load_peptide, read_splits
from openmm_tbg.peptides import create_system
from openmm_tbg.refinement import RefinementOptions
from openmm_tbg.weights import kish_ess, pareto_k


def draws(sampler, n: int, repeats: int) -> tuple[list[float], list[float], float]:
    """Kish ESS (%) and Pareto k of each of ``repeats`` draws of ``n`` proposals, and the valid fraction."""
    ess, ks, valid = [], [], []
    for _ in range(repeats):
        p = sampler.propose(n)
        lw = np.where(p["valid"], -p["u"] - p["log_q"], -np.inf)
        ess.append(100 * kish_ess(lw))
        ks.append(pareto_k(lw))
        valid.append(float(p["valid"].mean()))
    return ess, ks, float(np.mean(valid))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--peptides", nargs="+", default=None, help="default: every peptide of --split")
    parser.add_argument("--model", default=None, help="starting checkpoint (default: the shipped model)")
    parser.add_argument("--minutes", type=float, default=2.0, help="refinement budget, wall minutes")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="a RefinementOptions field to change, e.g. anchor_weight=1 (repeatable)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        default = getattr(RefinementOptions(), key)  # AttributeError names an unknown option
        overrides[key] = type(default)(float(value)) if isinstance(default, (int, float)) else float(value)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    names = args.peptides or read_splits(args.data)[args.split]
    header(__file__, model=args.model or "shipped", minutes=args.minutes, samples=args.samples,
           repeats=args.repeats, seed=args.seed, options=overrides or "defaults")
    rows = []
    for name in names:
        trajectory = load_peptide(args.data, name)
        sampler = BoltzmannGeneratorSampler(create_system(trajectory.topology), trajectory.topology,
                                            model=args.model, seed=args.seed, platform="CPU", threads=1)
        ess0, k0, valid0 = draws(sampler, args.samples, args.repeats)
        refined = sampler.refine(max_seconds=60 * args.minutes, seed=args.seed, progress=False, **overrides)
        result = refined.refinement
        ess1, k1, valid1 = draws(refined, args.samples, args.repeats)
        check = result.final_check
        verdict = (f"{check['parent']['pareto_k']:.2f} / {check['refined']['pareto_k']:.2f}" if check else
                   "- (best at step 0)" if result.best_step == 0 else "- (no check)")
        rows.append([name, " / ".join(f"{e:.2f}" for e in ess0), " / ".join(f"{k:.2f}" for k in k0),
                     f"{100 * valid0:.1f}", result.steps, verdict, result.kept,
                     " / ".join(f"{e:.2f}" for e in ess1), " / ".join(f"{k:.2f}" for k in k1),
                     f"{100 * valid1:.1f}", f"{np.nanmean(k1) - np.nanmean(k0):+.2f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        sampler.close()
        refined.close()
    print()
    markdown_table(["peptide", "start: ESS % of each draw", "start: Pareto k", "start: valid %", "steps",
                    "final check k start / refined", "kept", "returned: ESS %", "returned: Pareto k",
                    "returned: valid %", "mean k change"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
