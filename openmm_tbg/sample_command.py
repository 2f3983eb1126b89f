"""``openmm-tbg sample``: draw Boltzmann-generator samples of a peptide from the command line."""

from __future__ import annotations

import argparse
import os

from .flow import DEFAULT_QUADRATURE_NODES
from .sampler import METHODS, BoltzmannGeneratorSampler

__all__ = ["configure_parser", "run_from_cli", "add_ode_arguments", "ode_kwargs"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``openmm-tbg sample``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--sequence", help="one-letter sequence of a zwitterionic peptide, e.g. AA (built with the "
                                        "data set's force field: amber14-all + implicit/obc1)")
    src.add_argument("--pdb", help="PDB file of the peptide (System from amber14-all + implicit/obc1)")
    parser.add_argument("--model", default=None, help="checkpoint path (default: the shipped model)")
    parser.add_argument("--samples", type=int, default=1000, help="number of flow samples (default 1000)")
    parser.add_argument("--method", choices=METHODS, default="importance")
    parser.add_argument("--temperature", type=float, default=310.0, help="kelvin (default 310)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="samples.npz", help="SampleResult .npz (default samples.npz)")
    parser.add_argument("--resample", type=int, default=0,
                        help="also write this many reweighted frames to OUTPUT with .pdb/.dcd suffixes")
    add_ode_arguments(parser)


def add_ode_arguments(parser: argparse.ArgumentParser) -> None:
    """ODE options of the flow shared by the ``sample`` and ``evaluate`` commands."""
    group = parser.add_argument_group("flow integration")
    group.add_argument("--ode-method", default="dopri5", help="torchdiffeq method (default dopri5)")
    group.add_argument("--atol", type=float, default=None,
                       help="absolute tolerance (default 1e-5 with quadrature nodes, 1e-4 without)")
    group.add_argument("--rtol", type=float, default=None,
                       help="relative tolerance (default 1e-5 with quadrature nodes, 1e-4 without)")
    group.add_argument("--step-size", type=float, default=None, help="step of fixed-step methods")
    group.add_argument("--quadrature-nodes", type=int, default=DEFAULT_QUADRATURE_NODES or 0,
                       help="exact divergence at K Gauss-Legendre nodes; 0 = at every solver stage "
                            f"(default {DEFAULT_QUADRATURE_NODES or 0})")


def ode_kwargs(args: argparse.Namespace) -> dict:
    """`BoltzmannGeneratorSampler` keyword arguments from :func:`add_ode_arguments` options."""
    return {"ode_method": args.ode_method, "atol": args.atol, "rtol": args.rtol, "step_size": args.step_size,
            "quadrature_nodes": args.quadrature_nodes or None}


def run_from_cli(args: argparse.Namespace) -> int:
    """Run ``openmm-tbg sample``; returns the exit status."""
    from .peptides import build_peptide, create_system

    if args.sequence:
        pep = build_peptide(args.sequence)
        system, topology, positions = pep.system, pep.topology, pep.positions
    else:
        from openmm.app import PDBFile

        pdb = PDBFile(args.pdb)
        system, topology, positions = create_system(pdb.topology), pdb.topology, pdb.positions
    sampler = BoltzmannGeneratorSampler(system, topology, model=args.model, temperature=args.temperature,
                                        device=args.device, batch_size=args.batch_size, seed=args.seed,
                                        positions=positions, **ode_kwargs(args))
    result = sampler.sample(args.samples, method=args.method)
    result.save(args.output)
    print(result.summary())
    if args.resample:
        base = os.path.splitext(args.output)[0]
        traj = result.resample(args.resample, seed=args.seed).to_mdtraj()
        traj[0].save_pdb(base + ".pdb")
        traj.save_dcd(base + ".dcd")
        print(f"wrote {base}.pdb and {base}.dcd ({args.resample} reweighted frames)")
    sampler.close()
    return 0
