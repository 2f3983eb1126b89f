"""``openmm-tbg train``: command-line options, the configuration they give, and the entry point.

    openmm-tbg train --data DIR --out model.pt --steps 20000 --batch-size 32 --layers 5 --hidden 64 --coupling ot
    torchrun --nproc_per_node 4 -m openmm_tbg.cli train --data DIR --out model.pt ...   # 4 GPUs
    openmm-tbg train --data DIR --out model.pt --resume                                 # continue exactly
"""

from __future__ import annotations

import argparse
import os

from ..data.splits import load_training_data
from ..ic_context import NARROW_DIHEDRALS
from ..ic_statistics import WHITENING_SOURCES
from ..zmatrix import RING_CLOSURES
from .config import COUPLINGS, TrainingConfig
from .energy_objective import OBJECTIVES
from .loop import train
from .resume import read_resume_file, resume_path

_CLI_TO_CONFIG = {
    "steps": "steps", "batch_size": "batch_size", "layers": "n_layers", "hidden": "hidden", "lr": "lr",
    "coupling": "coupling", "device": "device", "seed": "seed", "checkpoint_every": "checkpoint_every",
    "warmup": "warmup_steps", "weight_decay": "weight_decay", "grad_clip": "grad_clip", "ema_decay": "ema_decay",
    "sigma": "sigma", "length_scale": "length_scale", "ot_iterations": "ot_iterations", "log_every": "log_every",
    "family": "family", "rounds": "rounds", "blocks": "blocks", "bins": "bins",
    "peptides_per_batch": "peptides_per_batch", "narrow_dihedrals": "narrow_dihedrals", "whitening": "whitening",
    "ring_closure": "ring_closure", "objective": "objective", "kl_weight": "kl_weight",
    "kl_warmup": "kl_warmup_steps", "kl_peptides": "kl_peptides", "kl_samples": "kl_samples",
    "energy_cutoff": "energy_cutoff",
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``openmm-tbg train`` options to ``parser``."""
    d = TrainingConfig()
    parser.description = ("Train a transferable Boltzmann generator: an internal-coordinate flow (the default "
                          "family) by maximum likelihood, optionally with the reverse KL divergence to the force "
                          "field (--objective ml+kl), or an EGNN CNF (--family egnn-cnf) by conditional flow "
                          "matching.")
    parser.add_argument("--data", required=True, help="data-set directory (XY.pdb + XY.npz [+ splits.json])")
    parser.add_argument("--split", default="train",
                        help="split to train on (default: train; 'all' = every non-test peptide; 'test' is refused)")
    parser.add_argument("--peptides", nargs="+", default=None, metavar="XY",
                        help="train only on these peptides (within --split)")
    parser.add_argument("--out", required=True, help="model file to write (the resume file is <out>.resume.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>.resume.pt if it exists")
    parser.add_argument("--init-from", default=None, metavar="MODEL",
                        help="start from this model's weights ('default' = the shipped model) and train it further; "
                             "its architecture and length scale are kept, the optimiser starts fresh. Nothing checks "
                             "held-out samples, and a little MD of one peptide can make the model worse: for one "
                             "peptide use `openmm-tbg refine` (no MD, keeps its best state)")
    parser.add_argument("--stride", type=int, default=1, help="use every K-th frame (default: 1)")
    parser.add_argument("--max-frames", type=int, default=None, help="at most M frames per peptide")
    parser.add_argument("--until-step", type=int, default=None,
                        help="stop after this many steps in all (continue later with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Config options default to None: unset options come from the resume file or TrainingConfig's defaults.
    parser.add_argument("--steps", type=int, default=None, help=f"optimisation steps (default: {d.steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"frames per step (default: {d.batch_size})")
    parser.add_argument("--layers", type=int, default=None, help=f"EGNN layers (default: {d.n_layers})")
    parser.add_argument("--hidden", type=int, default=None,
                        help=f"network width: the EGNN's or the internal-coordinate conditioners' (default: {d.hidden})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {d.lr})")
    parser.add_argument("--warmup", type=int, default=None, help=f"warm-up steps (default: {d.warmup_steps})")
    parser.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay ({d.weight_decay})")
    parser.add_argument("--grad-clip", type=float, default=None, help=f"max gradient norm, 0 = off ({d.grad_clip})")
    parser.add_argument("--ema-decay", type=float, default=None, help=f"EMA decay, 0 = off ({d.ema_decay})")
    parser.add_argument("--coupling", choices=COUPLINGS, default=None, help=f"x0-x1 coupling ({d.coupling})")
    parser.add_argument("--ot-iterations", type=int, default=None, help=f"OT rounds ({d.ot_iterations})")
    parser.add_argument("--sigma", type=float, default=None, help=f"path width, internal units ({d.sigma})")
    parser.add_argument("--length-scale", type=float, default=None,
                        help="nm per internal unit (default: RMS of the centred training coordinates)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=None, help=f"random seed ({d.seed})")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help=f"checkpoint interval in steps, 0 = only at the end ({d.checkpoint_every})")
    parser.add_argument("--log-every", type=int, default=None, help=f"log interval in steps ({d.log_every})")
    from ..model import FAMILIES

    group = parser.add_argument_group("model family")
    group.add_argument("--family", choices=sorted(FAMILIES), default=None,
                       help=f"internal-coordinate (maximum likelihood) or egnn-cnf (flow matching) (default {d.family}, "
                            "or the --init-from model's)")
    group.add_argument("--rounds", type=int, default=None,
                       help=f"internal-coordinate: coupling rounds, 4 layers each ({d.rounds})")
    group.add_argument("--blocks", type=int, default=None,
                       help=f"internal-coordinate: transformer blocks per layer ({d.blocks})")
    group.add_argument("--bins", type=int, default=None, help=f"internal-coordinate: spline bins ({d.bins})")
    group.add_argument("--peptides-per-batch", type=int, default=None,
                       help=f"internal-coordinate: distinct peptides per batch ({d.peptides_per_batch})")
    group.add_argument("--narrow-dihedrals", choices=list(NARROW_DIHEDRALS), default=None,
                       help="internal-coordinate: whitening of narrow dihedrals, a wrapped normal on the circle or "
                            f"an atanh map onto the line ({d.narrow_dihedrals})")
    group.add_argument("--whitening", choices=list(WHITENING_SOURCES), default=None,
                       help="internal-coordinate: whiten bonds and angles by the training frames' mean and std, or "
                            f"by the force field's equilibrium values and sqrt(kT/k) ({d.whitening})")
    group.add_argument("--ring-closure", choices=list(RING_CLOSURES), default=None,
                       help="internal-coordinate: parametrise each ring closure by the closing atom's angle or by "
                            "the closure bond's length (default: angle, or the --init-from model's; with "
                            "--init-from, 'distance' converts a model with angle closures)")
    energy = parser.add_argument_group("objective (internal-coordinate flow)")
    energy.add_argument("--objective", choices=list(OBJECTIVES), default=None,
                        help="ml: maximum likelihood on the MD frames; kl: reverse KL divergence to the Boltzmann "
                             "distribution of the data set's Hamiltonian (OpenMM energies and forces); ml+kl: both "
                             f"({d.objective})")
    energy.add_argument("--kl-weight", type=float, default=None, help=f"weight of the KL term ({d.kl_weight})")
    energy.add_argument("--kl-warmup", type=int, default=None,
                        help=f"steps over which the KL weight ramps up from 0 ({d.kl_warmup_steps})")
    energy.add_argument("--kl-peptides", type=int, default=None,
                        help=f"peptides in the KL term of one step ({d.kl_peptides})")
    energy.add_argument("--kl-samples", type=int, default=None,
                        help=f"proposals per peptide and step for the KL term ({d.kl_samples})")
    energy.add_argument("--energy-cutoff", type=float, default=None,
                        help=f"kT above the batch minimum where energy gradients are flattened ({d.energy_cutoff})")


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """TrainingConfig from parsed CLI options; with ``--resume`` unset options come from the resume file."""
    base = TrainingConfig()
    rpath = resume_path(args.out)
    if args.resume and os.path.exists(rpath):
        base = TrainingConfig.from_dict(read_resume_file(rpath)["config"])
    values = base.to_dict()
    for arg, key in _CLI_TO_CONFIG.items():
        given = getattr(args, arg, None)
        if given is not None:
            values[key] = given
    return TrainingConfig.from_dict(values)


#: Options that only one family reads, by family (the other family's run would ignore them silently).
_FAMILY_ONLY_OPTIONS = {
    "egnn-cnf": (("--layers", "layers"), ("--coupling", "coupling"), ("--ot-iterations", "ot_iterations"),
                 ("--sigma", "sigma"), ("--length-scale", "length_scale")),
    "internal-coordinate": (("--rounds", "rounds"), ("--blocks", "blocks"), ("--bins", "bins"),
                            ("--peptides-per-batch", "peptides_per_batch"),
                            ("--narrow-dihedrals", "narrow_dihedrals"), ("--whitening", "whitening"),
                            ("--ring-closure", "ring_closure")),
}


def _refuse_other_familys_options(args: argparse.Namespace) -> None:
    """A new run's options must belong to its family: e.g. ``--coupling ot`` without ``--family egnn-cnf``
    would otherwise train an internal-coordinate flow and ignore the option."""
    family = args.family or TrainingConfig().family
    for other, options in _FAMILY_ONLY_OPTIONS.items():
        given = [opt for opt, arg in options if other != family and getattr(args, arg, None) is not None]
        if given:
            raise SystemExit(f"openmm-tbg train: {', '.join(given)} apply to the {other} family only, but this run "
                             f"trains the {family} family{'' if args.family else ' (the default)'}; add "
                             f"--family {other}, or drop them.")


def run_from_cli(args: argparse.Namespace) -> int:
    """Entry point of ``openmm-tbg train``; returns the process exit code."""
    if args.init_from == "default":
        from openmm_tbg.checkpoint import DEFAULT_MODEL_PATH

        args.init_from = str(DEFAULT_MODEL_PATH)
    if args.init_from is not None:
        fixed = (("--layers", "layers"), ("--hidden", "hidden"), ("--length-scale", "length_scale"),
                 ("--rounds", "rounds"), ("--blocks", "blocks"), ("--bins", "bins"),
                 ("--narrow-dihedrals", "narrow_dihedrals"), ("--whitening", "whitening"))
        clash = [opt for opt, arg in fixed if getattr(args, arg, None) is not None]
        if clash:
            raise SystemExit(f"openmm-tbg train: {', '.join(clash)} cannot be combined with --init-from, whose model "
                             "fixes the architecture, coordinates, whitening and length scale; drop them.")
    if args.init_from is None and not args.resume:
        _refuse_other_familys_options(args)
    config = config_from_args(args)
    progress = not args.no_progress
    split = None if args.split in ("", "none", "all") else args.split
    main_rank = int(os.environ.get("RANK", "0")) == 0
    trajectories = load_training_data(args.data, split=split, names=args.peptides, stride=args.stride,
                                      max_frames=args.max_frames, progress=progress and main_rank)
    result = train(trajectories, args.out, config, data_dir=args.data, resume=args.resume,
                   until_step=args.until_step, progress=progress, init_from=args.init_from)
    if result.model_path is not None:
        tail = result.losses[-min(100, len(result.losses)):]
        print(f"Wrote {result.model_path} (sha256 {result.sha256}) after {result.step} steps, "
              f"{result.wall_time_s:.0f} s; mean loss of the last {len(tail)} steps {tail.mean():.4f}.")
    return 0
