"""``openmm-tbg evaluate``: evaluate a model on a data split, or merge separate evaluations into one report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .metrics import TORUS_W2_MAX_SAMPLES
from .pipeline import evaluate
from .report import merge_results


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``openmm-tbg evaluate``."""
    parser.add_argument("--model", default="default", help="checkpoint path, or 'default' for the shipped model")
    parser.add_argument("--data", default=None, help="data-set directory (XY.pdb, XY.npz, splits.json)")
    parser.add_argument("--split", default="test", help="split of splits.json (default: test)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="merge the --out directories of separate runs into --out (table in the split order "
                             "of --data, when given) instead of evaluating")
    parser.add_argument("--peptides", nargs="+", default=None, help="explicit peptide names (overrides --split)")
    parser.add_argument("--samples", type=int, default=1000, help="flow samples per peptide (default 1000)")
    # No default: a default of docs/ overwrote the repository's published report when run from a checkout.
    parser.add_argument("--out", required=True,
                        help="output directory for results.md, results.json and figures/ (required; created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--md-energy-frames", type=int, default=2000,
                        help="MD frames whose energies enter energy-W2 (default 2000, evenly spaced)")
    parser.add_argument("--torus-samples", type=int, default=TORUS_W2_MAX_SAMPLES,
                        help=f"subsample size per side for torus-W2 (default {TORUS_W2_MAX_SAMPLES})")
    parser.add_argument("--temperature", type=float, default=310.0, help="kelvin (default 310)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from ..sample_command import add_ode_arguments

    add_ode_arguments(parser)  # --ode-method, --atol, --rtol, --step-size, --quadrature-nodes (as `sample`)


def run_from_cli(args: argparse.Namespace) -> int:
    """Run ``openmm-tbg evaluate``; returns the exit status."""
    from ..sample_command import sampling_options_from_args

    from ..utils import portable_command

    command_line = portable_command(sys.argv)
    if args.merge:
        order = None
        if args.data is not None:
            from ..data import read_splits

            order = read_splits(args.data).get(args.split)
        results = merge_results(args.merge, args.out, order=order, command_line=command_line)
        print((Path(args.out) / "results.md").read_text())
        return 0 if results else 1
    if args.data is None:
        raise SystemExit("openmm-tbg evaluate: --data is required (the data-set directory with XY.pdb, XY.npz and "
                         "splits.json), unless --merge is given.")
    results = evaluate(args.model, args.data, split=args.split, n_samples=args.samples, peptides=args.peptides,
                       out_dir=args.out, seed=args.seed, device=args.device, batch_size=args.batch_size,
                       md_energy_frames=args.md_energy_frames, torus_samples=args.torus_samples,
                       temperature=args.temperature, progress=not args.no_progress,
                       sampler_options=sampling_options_from_args(args), command_line=command_line)
    print((Path(args.out) / "results.md").read_text())
    return 0 if results else 1
