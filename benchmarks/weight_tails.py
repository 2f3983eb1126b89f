"""How far can one Kish ESS be trusted? Repeated draws of a model's proposals, with the Pareto k diagnostic.

For each peptide, ``--repeats`` independent draws of ``--samples`` proposals (one sampler, its stream going on):
the Kish ESS and the Pareto k (`openmm_tbg.weights.pareto_k`) of each draw, the same for all draws pooled, and
the reweighted alpha-L population (phi > 0) of each draw beside its raw fraction and MD's (the data set's runs,
mean +- between-run standard error). A model whose weights have k > 0.7 gives ESS values and reweighted
populations that differ between repeats by more than any single draw's error bar claims; the pooled ESS
then falls below the single draws' ESS instead of holding, since the largest weight keeps growing with n.

    taskset -c 0 python benchmarks/weight_tails.py --split test --samples 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch
from _harness import header, markdown_table

from openmm_tbg import BoltzmannGeneratorSampler
from openmm_tbg.data import load_peptide, read_splits
from openmm_tbg.evaluation import alpha_l_indicator, md_population
from openmm_tbg.peptides import create_system
from openmm_tbg.torsions import backbone_torsions
from openmm_tbg.weights import kish_ess, normalise_log_weights, pareto_k


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--peptides", nargs="+", default=None, help="default: every peptide of --split")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    names = args.peptides or read_splits(args.data)[args.split]
    header(__file__, model=args.model or "shipped", samples=args.samples, repeats=args.repeats, seed=args.seed)
    rows, ks, spreads = [], [], []
    start = time.perf_counter()
    for name in names:
        trajectory = load_peptide(args.data, name)
        sampler = BoltzmannGeneratorSampler(create_system(trajectory.topology), trajectory.topology,
                                            model=args.model, seed=args.seed, platform="CPU", threads=1)
        log_ws, alpha, raw = [], [], []
        for _ in range(args.repeats):
            p = sampler.propose(args.samples)
            lw = np.where(p["valid"], -p["u"] - p["log_q"], -np.inf)
            phi, _ = backbone_torsions(p["positions"], trajectory.topology)
            ind = alpha_l_indicator(phi)
            log_ws.append(lw)
            alpha.append(float(np.sum(np.exp(normalise_log_weights(lw)) * ind)))
            raw.append(float(ind[p["valid"]].mean()) if p["valid"].any() else float("nan"))
        sampler.close()
        each_ess = [100 * kish_ess(lw) for lw in log_ws]
        each_k = [pareto_k(lw) for lw in log_ws]
        pooled = np.concatenate(log_ws)
        md_phi, _ = backbone_torsions(trajectory.positions, trajectory.topology)
        md = md_population(alpha_l_indicator(md_phi), trajectory.run)
        ks.append(pareto_k(pooled))
        spreads.append(max(each_ess) / max(min(each_ess), 1e-12))
        rows.append([name, " / ".join(f"{e:.2f}" for e in each_ess), f"{100 * kish_ess(pooled):.2f}",
                     " / ".join(f"{k:.2f}" for k in each_k), f"{ks[-1]:.2f}",
                     " / ".join(f"{100 * a:.1f}" for a in alpha), f"{100 * np.nanmean(raw):.1f}",
                     f"{100 * md['mean']:.1f} +- {100 * md['sem']:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    print()
    markdown_table(["peptide", "Kish ESS % of each draw", "ESS % pooled", "Pareto k of each draw", "k pooled",
                    "alpha-L % reweighted, each draw", "alpha-L % raw", "alpha-L % MD"], rows)
    ks = np.array(ks)
    print(f"\nPareto k pooled: median {np.nanmedian(ks):.2f}, {int(np.sum(ks > 0.7))} of {len(ks)} above 0.7, "
          f"{int(np.sum(ks >= 1.0))} at or above 1; largest / smallest ESS of the {args.repeats} draws: median "
          f"{np.median(spreads):.1f}x; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
