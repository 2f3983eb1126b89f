"""Replica exchange with Boltzmann-generator moves (openmmtools ReplicaExchangeSampler).

Every replica alternates Langevin dynamics with a TBGMove. The flow does not depend on temperature, so the
same move is exact in every thermodynamic state: its Metropolis test uses the reduced potential of the state
it runs in. The simulation is stored with MultiStateReporter (NetCDF); run the script again with --resume to
continue it (the TBGMove is restored from its checkpoint path, whose sha256 is verified).

    python examples/replica_exchange_bg.py --iterations 50 --storage repex_bg.nc
    python examples/replica_exchange_bg.py --iterations 50 --storage repex_bg.nc --resume
"""

import argparse
import logging
import os

import mdtraj
import numpy as np
import openmm
from openmm import unit
from openmmtools import mcmc, multistate, states

from openmm_tbg import BoltzmannGeneratorSampler, TBGMove, build_peptide


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", default="AA")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[310.0, 350.0, 400.0, 450.0],
                        help="kelvin, one replica each")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--md-steps", type=int, default=250, help="Langevin steps (1 fs) per iteration")
    parser.add_argument("--model", default=None, help="checkpoint path (default: the shipped model)")
    parser.add_argument("--storage", default="repex_bg.nc")
    parser.add_argument("--resume", action="store_true", help="continue the simulation stored in --storage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ode-method", default="dopri5")
    parser.add_argument("--step-size", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    peptide = build_peptide(args.sequence)
    if args.resume:
        if not os.path.exists(args.storage):
            parser.error(f"--resume: {args.storage} does not exist; run without --resume first.")
        simulation = multistate.ReplicaExchangeSampler.from_storage(multistate.MultiStateReporter(args.storage))
        simulation.extend(args.iterations)
    else:
        options = {"ode_method": args.ode_method}
        if args.step_size is not None:
            options["step_size"] = args.step_size
        bg = BoltzmannGeneratorSampler(peptide.system, peptide.topology, model=args.model, seed=args.seed,
                                       positions=peptide.positions, **options)
        move = mcmc.SequenceMove([
            mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, collision_rate=1.0 / unit.picosecond,
                                      n_steps=args.md_steps, reassign_velocities=False),
            TBGMove(bg, seed=args.seed)])
        thermodynamic_states = [states.ThermodynamicState(peptide.system, t * unit.kelvin)
                                for t in args.temperatures]
        # Minimize the starting structure once; every replica starts from it.
        context = openmm.Context(peptide.system, openmm.VerletIntegrator(0.001))
        context.setPositions(peptide.positions)
        openmm.LocalEnergyMinimizer.minimize(context)
        start = states.SamplerState(context.getState(getPositions=True).getPositions(asNumpy=True))
        del context
        simulation = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=args.iterations)
        reporter = multistate.MultiStateReporter(args.storage, checkpoint_interval=1)
        simulation.create(thermodynamic_states=thermodynamic_states, sampler_states=[start], storage=reporter)
        simulation.run()

    print(f"iterations done: {simulation.iteration}")
    for i, (state, moves) in enumerate(zip(simulation._thermodynamic_states, simulation._mcmc_moves)):
        tbg = moves.move_list[-1]
        s = tbg.statistics
        print(f"state {i} ({state.temperature.value_in_unit(unit.kelvin):.0f} K): TBGMove acceptance "
              f"{s['n_accepted']}/{s['n_proposed']}, invalid proposals {s['n_invalid']}")
    # Backbone angles of the replicas now.
    top = mdtraj.Topology.from_openmm(peptide.topology)
    xyz = np.stack([s.positions.value_in_unit(unit.nanometer) for s in simulation._sampler_states])
    traj = mdtraj.Trajectory(xyz.astype(np.float32), top)
    phi = np.degrees(mdtraj.compute_phi(traj)[1][:, 0])
    psi = np.degrees(mdtraj.compute_psi(traj)[1][:, 0])
    for r, (a, b) in enumerate(zip(phi, psi)):
        print(f"replica {r}: phi {a:7.1f}, psi {b:7.1f}")
    simulation._reporter.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
