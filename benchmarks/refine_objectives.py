"""Refinement objectives side by side on training peptides: what raises the ESS within a CPU budget?

For each peptide and method, one run of ``--minutes`` on one core starts from the model, then the refined model
draws ``--repeats`` x ``--samples`` fresh proposals through the exact sampling path; the table gives their
Kish ESS (each repeat, since one ESS of a few per cent varies by 2-3x from draw to draw), the valid fraction
and the raw (unweighted) backbone basin populations, which show a basin draining. Methods:

- ``full``: `BoltzmannGeneratorSampler.refine` with ``anchor_weight=0`` (all weights of the transferable flow;
  buffer likelihood + 0.1 reverse KL; the default until 2026-12-03);
- ``full-anchor``, ``full-anchor-1``: the same with ``anchor_weight`` 0.5 (today's default) or 1 (likelihood of
  fresh draws of the starting model, which holds the basins it proposes);
- ``full-ml``: the buffer likelihood alone (``kl_weight=0``, no anchor);
- ``adapter-kl``: the transferable flow frozen, a per-system adapter (`openmm_tbg.nn.adapter`) trained by
  reverse KL ``E_q[u_reg + log q]`` on a pool of the frozen flow's draws (paid once): ~4x more proposals a
  second than ``full``;
- ``adapter-kl+ess``: the same, plus ``-log`` (batch Kish ESS) of the regularised weights, which weighs the
  heaviest weights.

Training peptides only (``--peptides`` from the train split); the test split is for evaluation.

    taskset -c 0 python benchmarks/refine_objectives.py --peptides KE --minutes 2
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import numpy as np
import torch
from _harness import header, markdown_table
from refine_curve import BASINS, basin_indicators

from openmm_tbg import BoltzmannGeneratorSampler
from openmm_tbg.data import load_peptide, read_splits
from openmm_tbg.figures import backbone_torsion_pairs
from openmm_tbg.nn.adapter import SystemAdapter, circle_mask
from openmm_tbg.peptides import create_system
from openmm_tbg.refinement import reverse_kl_terms

# the whole-flow methods and the `refine` options they change from its defaults
# (explicit, so that the rows keep their meaning when the defaults change)
FULL = {"full": {"anchor_weight": 0.0}, "full-anchor": {"anchor_weight": 0.5}, "full-anchor-1": {"anchor_weight": 1.0},
        "full-ml": {"kl_weight": 0.0, "anchor_weight": 0.0}}
METHODS = (*FULL, "adapter-kl", "adapter-kl+ess")


def refine_adapter(sampler, seconds: float, objective: str, *, seed: int = 0, pool_size: int = 4096,
                   batch_size: int = 256, learning_rate: float = 1e-3, cutoff: float = 100.0, n_layers: int = 6,
                   hidden: int = 128) -> tuple[BoltzmannGeneratorSampler, int]:
    """Train a per-system adapter on the frozen flow for ``seconds`` (the pool's draws included); return a
    sampler with the adapted model and the number of steps."""
    start = time.perf_counter()
    flow = copy.deepcopy(sampler.flow).eval()
    for parameter in flow.parameters():
        parameter.requires_grad_(False)
    context = sampler.context
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the pool: draws of the frozen layers (data side), with their log q
        draws = [flow.sample_whitened(flow._batch(context, 256), generator) for _ in range(pool_size // 256)]
    pool_z = torch.cat([z for z, _ in draws]).to(flow.dtype)
    pool_log_q = torch.cat([lq for _, lq in draws])
    adapter = SystemAdapter(context.dof, circle_mask(context.base), n_layers=n_layers, hidden=hidden, seed=seed)
    flow.attach_adapter(adapter)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=learning_rate)
    n_dof = float(context.dof.sum())
    rng = np.random.default_rng(seed)
    steps = 0
    while time.perf_counter() - start < seconds:
        index = torch.as_tensor(rng.integers(0, len(pool_z), batch_size))
        z, log_det = adapter(pool_z[index])
        d = reverse_kl_terms(flow, context, batch_size, sampler.reduced_potential, None, checker=sampler.checker,
                             cutoff=cutoff, whitened=(z.double(), pool_log_q[index] - log_det))
        if not bool(d["valid"].any()):
            break
        log_w = -(d["u_reg"] + d["log_q"])[d["valid"]]
        loss = -log_w.mean() / n_dof
        if objective == "adapter-kl+ess":
            loss = loss + (torch.logsumexp(2 * log_w, 0) - 2 * torch.logsumexp(log_w, 0)) / n_dof
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(adapter.parameters(), 10.0)):
            optimizer.step()
        steps += 1
    return sampler.with_model(flow, seed=seed + 1), steps


def measure(sampler, topology, samples: int, repeats: int) -> dict:
    ess, valid, raw = [], [], {name: [] for name in BASINS}
    for _ in range(repeats):
        result = sampler.sample(samples, progress=False)
        ess.append(100 * result.ess)
        valid.append(100 * float(result.valid.mean()))
        pairs, _ = backbone_torsion_pairs(result.positions[result.valid], topology)
        for name, indicator in basin_indicators(pairs).items():
            raw[name].append(100 * float(indicator.mean()))
    return {"ess": ess, "valid": float(np.mean(valid)), **{k: float(np.mean(v)) for k, v in raw.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"))
    parser.add_argument("--peptides", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    test = set(read_splits(args.data).get("test", []))
    if test & set(args.peptides):
        raise SystemExit(f"{sorted(test & set(args.peptides))} are test peptides: choose objectives on the train "
                         "split.")
    header(__file__, minutes=args.minutes, samples=args.samples, repeats=args.repeats, seed=args.seed)
    rows = []
    for name in args.peptides:
        trajectory = load_peptide(args.data, name)
        sampler = BoltzmannGeneratorSampler(create_system(trajectory.topology), trajectory.topology,
                                            seed=args.seed, platform="CPU")
        runs = [("start", sampler, 0)]
        for method in args.methods:
            if method in FULL:
                refined = sampler.refine(max_seconds=60 * args.minutes, seed=args.seed, progress=False, patience=0,
                                         **FULL[method])
                runs.append((method, refined, refined.refinement.steps))
            else:
                runs.append((method, *refine_adapter(sampler, 60 * args.minutes, method, seed=args.seed)))
        for method, s, steps in runs:
            m = measure(s, trajectory.topology, args.samples, args.repeats)
            rows.append([name, method, steps, " / ".join(f"{e:.2f}" for e in m["ess"]), f"{np.mean(m['ess']):.2f}",
                         f"{m['valid']:.1f}", *(f"{m[b]:.1f}" for b in BASINS)])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    markdown_table(["peptide", "method", "steps", "ESS % (each draw)", "ESS % mean", "valid %",
                          *(f"raw {b} %" for b in BASINS)], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
