"""Fine-tune the shipped transferable model on short MD of your own peptide, and compare the two.

1. ``openmm_tbg.data.simulate`` runs short MD of the peptide under the target Hamiltonian;
2. ``openmm_tbg.training.train(..., init_from=<shipped model>)`` continues training on those frames with the
   starting model's own objective: maximum likelihood for the internal-coordinate flow (the default), flow
   matching for the EGNN CNF (the architecture, whitening or length scale come from the starting model; the
   optimiser starts fresh);
3. the shipped and the fine-tuned model each draw the same number of proposals with exact importance weights,
   and the script prints valid fraction, rejections and Kish ESS side by side.

The default peptide, NT (Asn-Thr), is not in the project data set at all, so neither model has seen it
before step 2. The same thing from the command line::

    openmm-tbg simulate NT --out my_md --ns 1
    openmm-tbg train --data my_md --split all --peptides NT --out nt.pt --init-from default --steps 300 --lr 1e-4

The defaults (0.2 ns of MD, 100 steps, 1000 proposals per model) show the whole workflow; they are too little
to improve the model much. With the CNF (``--model egnn-cnf``) the proposals cost about 10 s each on one CPU
core, so use ``--samples 8`` or so there. On 2026-11-24 a CNF run of ``--ns 1 --steps 300 --samples 32`` took
about 5-16 min of MD (3.2-9.5 s per 10 ps frame in two runs), 4 min of training (1.3-1.5 steps/s) and 5 min
per model for the proposals, measured piecewise.

Cost with the defaults, measured with ``/usr/bin/time -v`` on the 2-core CPU VM on 2026-12-02 while other jobs
shared it (load 1.2-1.9): 4.4 min wall clock (MD 235 s for 20 frames, training 20 s, 3 s for each model's 1000
proposals), peak memory (maximum resident set) 0.62 GB. The MD took 123 s in an earlier run at a similar load,
so most of the variation is there. ``--model egnn-cnf --samples 8`` took 16 min (training 280 s, 263 s and 291 s
for the two models' proposals) and 2.3 GB with two torch threads under a load of 3.3-4.9.

    python examples/fine_tune_peptide.py                       # NT, 0.2 ns, 100 steps, 1000 proposals per model
    python examples/fine_tune_peptide.py --ns 1 --steps 300 --samples 32
"""

import argparse
import logging
import os
import time

import torch
from openmm import unit

from openmm_tbg import BoltzmannGeneratorSampler, build_peptide
from openmm_tbg.checkpoint import DEFAULT_MODEL_PATH, SHIPPED_MODELS
from openmm_tbg.data import load_dataset, simulate
from openmm_tbg.training import TrainingConfig, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", default="NT", help="one-letter dipeptide sequence (default NT)")
    parser.add_argument("--work-dir", default="fine_tune_run", help="MD frames and the fine-tuned model go here")
    parser.add_argument("--ns", type=float, default=0.2, help="MD length, ns (default 0.2; frames every 10 ps)")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps (default 100)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1000, help="proposals per model (default 1000)")
    parser.add_argument("--model", default=None,
                        help="model to start from and compare with: a shipped family "
                             f"({', '.join(SHIPPED_MODELS)}) or a checkpoint path (default: the default model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch CPU threads (default 1: on the shared 2-core VM, 8 CNF samples of AA took 93 s "
                             "with 1 thread and 363 s with 2, whose threads spin while waiting for a core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start_model = str(SHIPPED_MODELS.get(args.model, args.model or DEFAULT_MODEL_PATH))
    md_dir = os.path.join(args.work_dir, "md")
    print(f"1/3: {args.ns:g} ns of MD of {args.sequence} into {md_dir}", flush=True)
    start = time.perf_counter()
    simulate([args.sequence], md_dir, ns=args.ns, seed=args.seed, progress=True)
    md_seconds = time.perf_counter() - start

    trajectories = load_dataset(md_dir, names=[args.sequence], progress=False)
    tuned_path = os.path.join(args.work_dir, f"{args.sequence}_fine_tuned.pt")
    config = TrainingConfig(steps=args.steps, lr=args.lr, warmup_steps=min(50, args.steps // 5),
                            batch_size=args.batch_size, coupling="ot", ema_decay=0.99, seed=args.seed,
                            checkpoint_every=0, device="auto")
    print(f"2/3: {args.steps} fine-tuning steps from the shipped model ({md_seconds:.0f} s of MD done)", flush=True)
    start = time.perf_counter()
    result = train(trajectories, tuned_path, config, data_dir=md_dir, init_from=start_model)
    train_seconds = time.perf_counter() - start

    peptide = build_peptide(args.sequence)
    rows = []
    print(f"3/3: {args.samples} proposals with exact likelihoods from each model ({train_seconds:.0f} s of "
          "training done)", flush=True)
    for label, model in (("shipped", start_model), ("fine-tuned", tuned_path)):
        sampler = BoltzmannGeneratorSampler(peptide.system, peptide.topology, model=model,
                                            temperature=310 * unit.kelvin, seed=args.seed)
        start = time.perf_counter()
        sample = sampler.sample(args.samples, progress=True)
        rows.append((label, sample, time.perf_counter() - start))
        sampler.close()

    print(f"\n{args.sequence}: {trajectories[0].n_frames} MD frames ({md_seconds:.0f} s), "
          f"{result.step} fine-tuning steps ({train_seconds:.0f} s), {args.samples} proposals per model")
    print(f"{'model':>11} {'valid %':>8} {'ESS %':>7} {'ESS (samples)':>13} {'seconds':>8}  rejections")
    for label, sample, seconds in rows:
        rejected = ", ".join(f"{k} {v}" for k, v in sample.rejections.items() if v) or "-"
        print(f"{label:>11} {100 * sample.n_valid / sample.n_proposals:8.1f} {100 * sample.ess:7.2f} "
              f"{sample.effective_samples:13.1f} {seconds:8.0f}  {rejected}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
