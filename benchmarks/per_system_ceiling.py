"""How much could a per-system correction learn from Boltzmann samples, and how noisy is the ESS we judge by?

Three measurements on training peptides, one core, no training of the transferable model:

1. **ESS repeatability.** ``--repeats`` independent draws of ``--samples`` proposals of the model: the Kish ESS
   of each, and of all of them pooled. Every refinement decision (issue 20) was judged by such numbers.
2. **Gaussian structure of the MD frames in the flow's base space.** Each MD frame is mapped through the
   transferable layers to its base draw ``e`` (a perfect flow gives ``e ~`` the base, a standard normal on the
   line coordinates). A full-covariance Gaussian fitted to the line coordinates gives the in-sample KL gain
   ``KL(N(mu, C) || N(0, I))``; the same Gaussian fitted on all runs but one and scored on the held-out run
   gives the gain that generalises (shrunk toward the identity by 0, 0.5 and 0.9). A positive held-out gain is
   what an affine per-system correction of the base could buy.
3. **A per-system adapter trained by maximum likelihood on MD frames.** The coupling flow of
   `openmm_tbg.nn.adapter` (MLP conditioners) as a density on the base draws of the MD frames of all runs but
   one, by Adam for ``--steps`` steps; the table gives the held-out run's change of negative log-likelihood
   (nats per frame; negative = better) at its best step and at the end. This is an upper bound for any
   refinement that learns from samples of the Boltzmann distribution (MD, MCMC, or importance resampling),
   since those give no more than the ~1000 frames of the data set's MD in a few CPU-minutes.

Training peptides only (the test split is for evaluation):

    taskset -c 0 python benchmarks/per_system_ceiling.py --peptides KE FS
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
from openmm_tbg.ic_context import base_log_prob
from openmm_tbg.internal_coordinates import to_internal
from openmm_tbg.nn.adapter import SystemAdapter, circle_mask
from openmm_tbg.peptides import create_system
from openmm_tbg.twins import apply_swaps, canonical_masks
from openmm_tbg.weights import kish_ess


def base_draws(flow, context, positions_nm: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The transferable layers' base image ``e`` ``(n, N, 3)`` of configurations in their canonical twin
    labelling, and the mask of the configurations kept (inside the flow's support)."""
    x = torch.as_tensor(positions_nm, dtype=torch.float64)
    needed, _, outside = canonical_masks(to_internal(x, context.zmatrix)[2], context.swaps)
    x = apply_swaps(x, context.swaps, needed)
    ic = torch.stack(to_internal(x, context.zmatrix), -1)
    batch = flow._batch(context, x.shape[0])
    z, _ = flow.whiten(ic, batch)
    keep = torch.isfinite(z).all(-1).all(-1) & ~outside.any(1)
    with torch.no_grad():
        e, _ = flow.transform(z[keep], flow._batch(context, int(keep.sum())))
    return e.double(), keep.numpy()


def gaussian_gains(line: torch.Tensor, run: np.ndarray) -> dict[str, float]:
    """In-sample KL gain of a full Gaussian on ``line`` ``(n, D)``, and the mean held-out log-likelihood gain
    over leave-one-run-out splits for shrinkage 0, 0.5 and 0.9 toward N(0, I)."""
    d = line.shape[1]
    mu, cov = line.mean(0), torch.cov(line.T)
    out = {"kl_in_sample": float(0.5 * (torch.trace(cov) + mu @ mu - d - torch.logdet(cov)))}
    for shrink in (0.0, 0.5, 0.9):
        gains = []
        for r in np.unique(run):
            fit, held = line[torch.as_tensor(run != r)], line[torch.as_tensor(run == r)]
            m = (1 - shrink) * fit.mean(0)
            c = (1 - shrink) * torch.cov(fit.T) + shrink * torch.eye(d, dtype=line.dtype)
            diff = held - m
            ll = -0.5 * (diff @ torch.linalg.inv(c) * diff).sum(1) - 0.5 * torch.logdet(c)
            gains.append(float((ll + 0.5 * (held * held).sum(1)).mean()))
        out[f"held_out_{shrink}"] = float(np.mean(gains))
    return out


def adapter_gain(context, e: torch.Tensor, run: np.ndarray, held_run: int, steps: int, learning_rate: float,
                 hidden: int, n_layers: int, seed: int) -> tuple[float, float, int, float]:
    """Held-out NLL change of a per-system adapter trained by maximum likelihood on the other runs' base draws:
    (best change, final change, best step, training NLL change at the end), nats per frame."""
    base, width = context.base[None], context.width[None]
    adapter = SystemAdapter(context.dof, circle_mask(context.base), n_layers=n_layers, hidden=hidden,
                            seed=seed).double()
    fit, held = e[torch.as_tensor(run != held_run)], e[torch.as_tensor(run == held_run)]

    def nll(batch: torch.Tensor) -> torch.Tensor:
        inner, log_det = adapter(batch, inverse=True)
        return -(base_log_prob(inner, base, width).sum((1, 2)) + log_det).mean()

    optimizer = torch.optim.Adam(adapter.parameters(), lr=learning_rate)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        held0, fit0 = float(nll(held)), float(nll(fit))
    best, best_step, last = 0.0, 0, 0.0
    for step in range(1, steps + 1):
        loss = nll(fit[torch.randint(0, len(fit), (128,), generator=g)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                last = float(nll(held)) - held0
            if last < best:
                best, best_step = last, step
    with torch.no_grad():
        fit_change = float(nll(fit)) - fit0
    return best, last, best_step, fit_change


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"))
    parser.add_argument("--peptides", nargs="+", required=True)
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--samples", type=int, default=2000, help="proposals per ESS draw")
    parser.add_argument("--repeats", type=int, default=5, help="ESS draws")
    parser.add_argument("--steps", type=int, default=1000, help="adapter training steps")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    test = set(read_splits(args.data).get("test", []))
    if test & set(args.peptides):
        raise SystemExit(f"{sorted(test & set(args.peptides))} are test peptides: use the train split.")
    header(__file__, samples=args.samples, repeats=args.repeats, steps=args.steps, lr=args.learning_rate,
           adapter=f"{args.layers}x{args.hidden}", seed=args.seed)
    ess_rows, fit_rows = [], []
    for name in args.peptides:
        trajectory = load_peptide(args.data, name)
        sampler = BoltzmannGeneratorSampler(create_system(trajectory.topology), trajectory.topology,
                                            model=args.model, seed=args.seed, platform="CPU", threads=1)
        log_ws = []
        for _ in range(args.repeats):
            p = sampler.propose(args.samples)
            log_ws.append(np.where(p["valid"], -p["u"] - p["log_q"], -np.inf))
        each = [100 * kish_ess(lw) for lw in log_ws]
        ess_rows.append([name, " / ".join(f"{v:.2f}" for v in each), f"{min(each):.2f}-{max(each):.2f}",
                         f"{100 * kish_ess(np.concatenate(log_ws)):.2f}"])
        print(" | ".join(ess_rows[-1]), flush=True)

        e, keep = base_draws(sampler.flow, sampler.context, trajectory.positions)
        run = trajectory.run[keep]
        line_mask = sampler.context.dof & ~circle_mask(sampler.context.base)
        gains = gaussian_gains(e[:, line_mask], run)
        held_run = int(np.unique(run)[-1])
        best, last, best_step, fit_change = adapter_gain(sampler.context, e, run, held_run, args.steps,
                                                         args.learning_rate, args.hidden, args.layers, args.seed)
        fit_rows.append([name, len(e), int(line_mask.sum()), f"{gains['kl_in_sample']:.2f}",
                         f"{gains['held_out_0.0']:.2f}", f"{gains['held_out_0.5']:.2f}",
                         f"{gains['held_out_0.9']:.2f}", f"{fit_change:+.2f}", f"{best:+.2f} (step {best_step})",
                         f"{last:+.2f}"])
        print(" | ".join(str(c) for c in fit_rows[-1]), flush=True)
        sampler.close()
    print()
    markdown_table(["peptide", "Kish ESS % of each draw", "range", "pooled"], ess_rows)
    print()
    markdown_table(["peptide", "MD frames", "line coords", "Gaussian KL in-sample", "held-out gain, shrink 0",
                    "0.5", "0.9", "adapter: train NLL change", "held-out NLL change, best", "at the end"], fit_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
