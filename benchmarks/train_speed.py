"""Flow-matching training speed: optimisation steps per second for a given model size, batch and coupling.

Times the pieces of one training step of openmm_tbg.training separately (batch drawing incl. the coupling,
forward + backward + AdamW) on mixed batches of training-split dipeptides, for independent and OT coupling.

Example (the numbers in the training report were measured with):

    python benchmarks/train_speed.py --data ../shared/data/dipeptides --layers 5 --hidden 64 --batch-size 32 \
        --threads 1 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from _harness import Table, Timer, header, pick_device

from openmm_tbg import training
from openmm_tbg.data import load_dataset, read_splits
from openmm_tbg.utils import machine_info


def measure(trajectories, config: training.TrainingConfig, length_scale: float, steps: int, warmup: int,
            device: torch.device) -> dict:
    """Mean seconds per batch draw and per optimisation step (after ``warmup`` untimed steps)."""
    np_rng, gen = training.make_generators(config.seed)
    sampler = training.PeptideBatchSampler(trajectories, config.batch_size, np_rng)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        flow = training.build_flow(config, length_scale, 2)
    vf = flow.vector_field.to(device)
    opt = torch.optim.AdamW(vf.parameters(), lr=config.lr)
    t_batch, t_step, t_cpu, atoms = [], [], [], []
    for i in range(warmup + steps):
        with Timer(device) as draw:
            batch = training.make_training_batch(sampler, config, length_scale, gen).to(device)
        with Timer(device) as step:
            loss = training.flow_matching_loss(vf, batch, config.sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vf.parameters(), config.grad_clip)
            opt.step()
        if i >= warmup:
            t_cpu.append(draw.cpu_seconds + step.cpu_seconds)
            t_batch.append(draw.seconds)
            t_step.append(step.seconds)
            atoms.append(int(batch.mask.shape[1]))
    total = np.add(t_batch, t_step)
    return {
        "coupling": config.coupling,
        "threads": torch.get_num_threads(),
        "batch_ms": 1e3 * float(np.mean(t_batch)),
        "model_step_ms": 1e3 * float(np.mean(t_step)),
        "steps_per_s": float(1.0 / total.mean()),
        "steps_per_s_median": float(1.0 / np.median(total)),
        # CPU seconds per step: with one thread, 1 / this is the speed on an otherwise idle core.
        "cpu_s_per_step": float(np.mean(t_cpu)),
        "mean_padded_atoms": float(np.mean(atoms)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"))
    parser.add_argument("--n-peptides", type=int, default=40, help="train-split peptides to draw from")
    parser.add_argument("--max-frames", type=int, default=100)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--couplings", nargs="+", default=list(training.COUPLINGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    names = read_splits(args.data)["train"]
    rng = np.random.default_rng(args.seed)
    names = sorted(rng.choice(names, size=min(args.n_peptides, len(names)), replace=False).tolist())
    trajectories = load_dataset(args.data, names=names, max_frames=args.max_frames, progress=False)
    length_scale = training.estimate_length_scale(trajectories)
    device = pick_device(args.device)
    results = []
    header(__file__, device, model=f"{args.layers}x{args.hidden}", batch=args.batch_size,
           peptides=f"{len(names)}({min(t.encoding.n_atoms for t in trajectories)}-"
                    f"{max(t.encoding.n_atoms for t in trajectories)} atoms)", length_scale=f"{length_scale:.4f}nm")
    table = Table([("coupling", 12), ("threads", 7, "d"), ("batch ms", 9, ".1f"), ("model ms", 9, ".1f"),
                   ("steps/s", 8, ".2f"), ("median", 7, ".2f"), ("cpu s/step", 10, ".3f")])
    table.header()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for coupling in args.couplings:
            cfg = training.TrainingConfig(n_layers=args.layers, hidden=args.hidden, batch_size=args.batch_size,
                                          coupling=coupling, seed=args.seed)
            r = measure(trajectories, cfg, length_scale, args.steps, args.warmup, device)
            results.append(r)
            table.row(coupling, threads, r["batch_ms"], r["model_step_ms"], r["steps_per_s"],
                      r["steps_per_s_median"], r["cpu_s_per_step"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine_info(), "args": vars(args), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
