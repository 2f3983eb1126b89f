"""Sample alanine dipeptide (zwitterionic "AA") with a transferable Boltzmann generator.

Draws flow samples, reweights them to the Boltzmann distribution of the data set's Hamiltonian
(amber14-all + implicit/obc1, 310 K), prints the valid fraction and the effective sample size (ESS), and writes
resampled (unweighted) frames to a PDB and a DCD file, and a Ramachandran plot of the raw and reweighted
samples to a PNG. By default it resamples as many frames as the ESS is worth (in samples), so that the frames
are not copies of one configuration; it says how many distinct configurations they hold.

    python examples/sample_dipeptide.py                                     # 1000 samples, the default model
    python examples/sample_dipeptide.py --model egnn-cnf --samples 32       # the shipped CNF (slow on a CPU)
    python examples/sample_dipeptide.py --samples 200 --model my.pt         # your own checkpoint

Cost, measured with ``/usr/bin/time -v`` on the 2-core CPU VM, which other jobs (model training, test suites)
shared; the load average is given with each figure:
- defaults (1000 samples, the internal-coordinate model, seed 0; what ``make demo`` runs), 2026-12-03 on one core
  of the 2-core Intel Xeon VM, load 3.4-3.5: 16 s wall clock (sampling 7 s), peak memory (maximum resident set)
  0.39 GB; ESS 223 samples (22.3 %), 223 frames resampled holding 153 distinct configurations. On 2026-12-01/02
  at load 0.6 the same run took 5 s (8 s in all with ``make``).
- ``--model egnn-cnf --samples 32`` (the CNF's exact likelihoods, in batches of 8): 113 s of sampling, 116 s in
  all, peak memory (maximum resident set) 1.3 GB, load 1-2. With two torch threads under a load of 3-4.6 the
  same run took 846 s; with all 32 in one batch it peaked at 3.1 GB.
"""

import argparse
import logging
import time

import torch
from openmm import unit

from openmm_tbg import BoltzmannGeneratorSampler, build_peptide
from openmm_tbg.figures import save_ramachandran


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", default="AA", help="one-letter sequence (default AA)")
    parser.add_argument("--samples", type=int, default=1000,
                        help="number of flow samples (default 1000; use about 32 with the CNF, which drew 0.15 "
                             "samples per second of AA on one CPU core, 2026-12-03)")
    parser.add_argument("--model", default=None, help="checkpoint path (default: the shipped model)")
    parser.add_argument("--resample", type=int, default=None,
                        help="frames to resample for the PDB/DCD (default: the ESS in samples, rounded)")
    parser.add_argument("--output", default="dipeptide_resampled",
                        help="prefix of the .pdb/.dcd/.npz/_ramachandran.png files")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples drawn together (default 8 for the CNF, whose progress bar moves once per batch "
                             "and whose exact likelihoods need memory in proportion to it; 256 otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ode-method", default="dopri5", help="torchdiffeq method (default dopri5)")
    parser.add_argument("--step-size", type=float, default=None, help="step of fixed-step ODE methods")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch CPU threads (default 1: on the shared 2-core VM, 8 CNF samples of AA took 93 s "
                             "with 1 thread and 363 s with 2, whose threads spin while waiting for a core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    peptide = build_peptide(args.sequence)
    options = {"ode_method": args.ode_method}
    if args.step_size is not None:
        options["step_size"] = args.step_size
    sampler = BoltzmannGeneratorSampler(peptide.system, peptide.topology, model=args.model,
                                        temperature=310 * unit.kelvin, device=args.device,
                                        batch_size=args.batch_size or 256, seed=args.seed, positions=peptide.positions,
                                        **options)
    if args.batch_size is None and sampler.flow.family == "egnn-cnf":
        sampler.batch_size = 8  # a moving progress bar and a bounded autograd graph for the exact likelihoods
    print(f"drawing {args.samples} flow samples of {args.sequence} with exact likelihoods (progress bar below)",
          flush=True)
    result = sampler.sample(args.samples, method="importance", progress=True)
    sampler_seconds = time.perf_counter() - start
    result.save(args.output + ".npz")
    print(f"valid samples: {result.n_valid}/{result.n_proposals} "
          f"({100.0 * result.n_valid / result.n_proposals:.1f} %)")
    print(f"rejected by reason: {result.rejections}; mirrored {result.n_mirrored}, "
          f"relabelled {result.n_relabelled}")
    print(f"effective sample size (Kish): {100.0 * result.ess:.2f} % = {result.effective_samples:.1f} samples")
    figure = save_ramachandran(result, args.output + "_ramachandran.png",
                               title=f"{args.sequence}: {result.n_valid}/{result.n_proposals} valid, "
                                     f"ESS {result.effective_samples:.1f} samples (seed {args.seed})")
    if result.n_valid == 0:
        print("no valid sample: nothing to resample (is the model trained for this peptide?)")
        sampler.close()
        return 1
    k = args.resample or max(1, round(result.effective_samples))
    resampled = result.resample(k, seed=args.seed)  # warns if k is far above the ESS
    frames = resampled.to_mdtraj()
    frames.save_pdb(args.output + ".pdb")
    frames.save_dcd(args.output + ".dcd")
    energy = result.expectation(result.reduced_potentials * sampler.kT)
    print(f"reweighted mean potential energy: {energy:.2f} kJ/mol (from {result.effective_samples:.1f} effective "
          "samples)")
    print(f"wrote {k} resampled frames ({resampled.n_distinct} distinct configuration"
          f"{'s' if resampled.n_distinct != 1 else ''}) to {args.output}.pdb and {args.output}.dcd, all samples to "
          f"{args.output}.npz, the Ramachandran plot to {figure}")
    print(f"done in {time.perf_counter() - start:.0f} s (sampling {sampler_seconds:.0f} s)")
    sampler.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
