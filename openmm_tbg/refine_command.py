"""``openmm-tbg refine``: refine a model on one peptide's System with its energies and forces, no MD.

    openmm-tbg refine --sequence NY --out ny_refined.pt --max-seconds 300
    openmm-tbg sample --sequence NY --model ny_refined.pt --samples 10000

The refined checkpoint records its parent's sha256 and the System's fingerprint; `BoltzmannGeneratorSampler`,
`TBGMove` and ``openmm-tbg sample`` load it like any model (`openmm_tbg.refinement`).
"""

from __future__ import annotations

import argparse
import os
import warnings

from .refinement import RefinementOptions
from .sample_command import MODEL_HELP, add_peptide_arguments, check_outputs_writable

__all__ = ["configure_parser", "run_from_cli"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``openmm-tbg refine`` options to ``parser``."""
    d = RefinementOptions()
    parser.description = ("Refine a transferable model on one peptide's own System (reverse KL with OpenMM forces "
                          "plus likelihood on its importance-weighted proposals and on the starting model's), "
                          "within a time or step budget. Needs no MD data.")
    add_peptide_arguments(parser)
    parser.add_argument("--model", default=None, help=f"starting model: {MODEL_HELP}")
    parser.add_argument("--out", required=True, help="refined model file to write (.pt)")
    parser.add_argument("--max-seconds", type=float, default=d.max_seconds,
                        help=f"wall-clock budget in seconds, evaluations included (default {d.max_seconds:g})")
    parser.add_argument("--max-steps", type=int, default=None, help="step budget (default: none)")
    parser.add_argument("--temperature", type=float, default=310.0, help="kelvin (default 310)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate,
                        help=f"Adam step size (default {d.learning_rate:g})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help=f"proposals per step (default {d.batch_size})")
    parser.add_argument("--kl-weight", type=float, default=d.kl_weight,
                        help=f"weight of the reverse-KL term (default {d.kl_weight:g})")
    parser.add_argument("--ml-weight", type=float, default=d.ml_weight,
                        help=f"weight of the buffer likelihood term (default {d.ml_weight:g})")
    parser.add_argument("--anchor-weight", type=float, default=d.anchor_weight,
                        help="weight of the likelihood of the starting model's raw proposals, which holds the basins "
                             f"it proposes (default {d.anchor_weight:g}; 0: off)")
    parser.add_argument("--eval-samples", type=int, default=d.eval_samples,
                        help=f"fresh proposals per evaluation (default {d.eval_samples})")
    parser.add_argument("--eval-every", type=int, default=d.eval_every,
                        help=f"steps between evaluations (default {d.eval_every})")
    parser.add_argument("--patience", type=int, default=d.patience,
                        help=f"stop after this many evaluations without improvement, 0 = never (default {d.patience})")
    parser.add_argument("--final-check-samples", type=int, default=d.final_check_samples,
                        help="fresh proposals of the starting and the refined model at the end: the refined weights "
                             "are kept only if their Pareto k is lower (a lighter tail), else the starting weights "
                             f"are written (default {d.final_check_samples}; 0: no check)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="auto", help="torch device (default auto: CUDA if available)")
    parser.add_argument("--no-figure", action="store_true", help="do not write OUT_refinement.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_cli(args: argparse.Namespace) -> int:
    """Run ``openmm-tbg refine``; returns the exit status."""
    from .sample_command import peptide_from_args
    from .sampler import BoltzmannGeneratorSampler

    if args.torch_threads < 1:
        raise ValueError(f"--torch-threads must be a positive integer, got {args.torch_threads}.")
    out = os.path.abspath(args.out)
    figure = os.path.splitext(args.out)[0] + "_refinement.png"
    # fail on an unwritable path now, not after the run
    check_outputs_writable([out] + ([] if args.no_figure else [figure]), f"--out {args.out}")
    import torch

    torch.set_num_threads(args.torch_threads)
    system, topology, positions, name = peptide_from_args(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = BoltzmannGeneratorSampler(system, topology, model=args.model, temperature=args.temperature,
                                            device=args.device, seed=args.seed, positions=positions,
                                            threads=args.torch_threads)
        options = RefinementOptions(max_seconds=args.max_seconds, max_steps=args.max_steps,
                                    learning_rate=args.learning_rate, batch_size=args.batch_size,
                                    kl_weight=args.kl_weight, ml_weight=args.ml_weight,
                                    anchor_weight=args.anchor_weight,
                                    eval_samples=args.eval_samples, eval_every=args.eval_every,
                                    patience=args.patience, final_check_samples=args.final_check_samples)
        try:
            refined = sampler.refine(options=options, seed=args.seed, out=out, progress=not args.no_progress,
                                     max_seconds=options.max_seconds, max_steps=options.max_steps)
        finally:
            sampler.close()
    for w in caught:
        print(f"openmm-tbg: warning: {w.message}")
    result = refined.refinement
    print(f"{name}: {result.summary()}")
    print(f"wrote {args.out} (sha256 {result.sha256}); sample with: openmm-tbg sample "
          f"{'--sequence ' + args.sequence if args.sequence else '--pdb ' + args.pdb}"
          f"{' --system ' + args.system if args.system else ''} --model {args.out}")
    if not args.no_figure:
        from .figures import save_refinement_history

        save_refinement_history(result, figure, title=f"{name}: refinement ({result.stopped}, seed {args.seed})")
        print(f"wrote {figure}: ESS and valid fraction of fresh proposals during the run")
    refined.close()
    return 0
