"""Replica exchange with Boltzmann-generator moves (openmmtools ReplicaExchangeSampler).

Every replica alternates Langevin dynamics with a TBGMove. The flow does not depend on temperature, so the
same move is exact in every thermodynamic state: its Metropolis test uses the reduced potential of the state
it runs in. The simulation is stored with MultiStateReporter (NetCDF); run the script again with --resume to
continue it (the TBGMove is restored from its checkpoint path, whose sha256 is verified).

Each replica has its own copy of the move and so its own proposal buffer of ``--buffer-size`` flow samples,
each with an exact likelihood. A restored move starts with an empty buffer, so every start and every
``--resume`` first draws ``replicas x buffer-size`` proposals, and every move with a valid proposal also
evaluates the exact log density of its replica's current state (MD has moved it). With the default
internal-coordinate model that is cheap. With the CNF (``--model egnn-cnf``, seconds per exact likelihood on a
CPU) TBGMove's default buffer of 64 would mean 256 proposals, over 10 CPU-minutes, before the first iteration;
this script uses 2, and prints one line per iteration with the time spent.

    python examples/replica_exchange_bg.py                                   # 4 replicas, 50 iterations
    python examples/replica_exchange_bg.py --resume                          # 50 more
    python examples/replica_exchange_bg.py --model egnn-cnf --iterations 2 --storage cnf.nc   # the CNF

Cost, measured with ``/usr/bin/time -v`` on the 2-core CPU VM on 2026-12-01/02, which other jobs (model
training, test suites) shared; the load average is given with each figure:
- defaults (4 replicas, 50 iterations of 250 MD steps + one TBGMove each, buffer 2): 46 s wall clock (40 s for the
  iterations), peak memory (maximum resident set) 0.49 GB, load 2.1-2.6; ``--resume`` (50 more) 70 s, 0.49 GB.
  On 2026-12-02 (AMD EPYC, nothing else running, ``/usr/bin/time -f`` with the fields of ``-v``), after the
  Langevin moves and energies moved to one OpenMM CPU thread (``--md-threads``, default 1): 64 s wall clock and
  0.49 GB (a second run: 83 s for the iterations), ``--resume`` 76 s for the iterations; with ``--md-threads 0``
  (OpenMM's default, every core) 94 s wall clock, 39 s of it system CPU, and ``--resume`` 104 s.
- ``--model egnn-cnf --iterations 2``: 55 s wall clock (40 s in the first iteration, which fills every buffer),
  0.76 GB, load 1.0-1.3; ``--resume`` 43 s (38 s refilling). With two torch threads under a load of 4.6-6.3,
  4 iterations took 11 min (1.0 GB) and their --resume 12 min, 7.5 of them in the first iteration.
"""

import argparse
import logging
import os
import sys
import time

import mdtraj
import numpy as np
import openmm
import torch
from openmm import unit

from openmm_tbg import BoltzmannGeneratorSampler, TBGMove, build_peptide
from openmm_tbg.quiet import quiet_openmmtools

with quiet_openmmtools():  # pymbar's import banners
    from openmmtools import cache, mcmc, multistate, states


def storage_files(storage: str) -> list[str]:
    """The files MultiStateReporter writes for ``storage``: the NetCDF file and its checkpoint file."""
    base, ext = os.path.splitext(storage)
    return [storage, f"{base}_checkpoint{ext or '.nc'}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", default="AA")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[310.0, 350.0, 400.0, 450.0],
                        help="kelvin, one replica each")
    parser.add_argument("--iterations", type=int, default=50, help="iterations to run or add (default 50)")
    parser.add_argument("--buffer-size", type=int, default=2,
                        help="flow proposals each replica's TBGMove draws at a time (default 2; TBGMove's own "
                             "default is 64)")
    parser.add_argument("--md-steps", type=int, default=250, help="Langevin steps (1 fs) per iteration")
    parser.add_argument("--model", default=None, help="checkpoint path (default: the shipped model)")
    parser.add_argument("--storage", default="repex_bg.nc")
    parser.add_argument("--resume", action="store_true", help="continue the simulation stored in --storage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ode-method", default="dopri5")
    parser.add_argument("--step-size", type=float, default=None)
    parser.add_argument("--md-platform", default="CPU", help="OpenMM platform of the Langevin moves and energies "
                                                            "(default CPU)")
    parser.add_argument("--md-threads", type=int, default=1,
                        help="threads of the CPU platform (default 1; 0: OpenMM's default, every core)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch CPU threads (default 1: on the shared 2-core VM, 8 CNF samples of AA took 93 s "
                             "with 1 thread and 363 s with 2, whose threads spin while waiting for a core)")
    args = parser.parse_args(argv)
    if args.md_threads < 0:
        parser.error(f"--md-threads must be 0 (OpenMM's default) or a positive number, got {args.md_threads}.")
    existing = [f for f in storage_files(args.storage) if os.path.exists(f)]
    if args.resume and not os.path.exists(args.storage):
        parser.error(f"--resume: {args.storage} does not exist; run without --resume first.")
    if not args.resume and existing:
        # openmmtools would stop later with a traceback ("cowardly refusing to overwrite"); say what to do now
        print(f"replica_exchange_bg.py: error: {' and '.join(existing)} exist from an earlier run: pass --resume to "
              "continue it, --storage NEW.nc to start another, or delete them to start again.", file=sys.stderr)
        return 2
    torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING)

    peptide = build_peptide(args.sequence)
    if args.resume:
        with quiet_openmmtools():  # the experimental-API warning and the citation list
            simulation = multistate.ReplicaExchangeSampler.from_storage(multistate.MultiStateReporter(args.storage))
        for move in simulation._mcmc_moves:  # restored moves keep the stored buffer size; apply this run's
            move.move_list[-1].buffer_size = args.buffer_size
        advance = simulation.extend
    else:
        options = {"ode_method": args.ode_method}
        if args.step_size is not None:
            options["step_size"] = args.step_size
        bg = BoltzmannGeneratorSampler(peptide.system, peptide.topology, model=args.model, seed=args.seed,
                                       positions=peptide.positions, **options)
        move = mcmc.SequenceMove([
            mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, collision_rate=1.0 / unit.picosecond,
                                      n_steps=args.md_steps, reassign_velocities=False),
            TBGMove(bg, seed=args.seed, buffer_size=args.buffer_size)])
        thermodynamic_states = [states.ThermodynamicState(peptide.system, t * unit.kelvin)
                                for t in args.temperatures]
        # Minimize the starting structure once; every replica starts from it.
        context = openmm.Context(peptide.system, openmm.VerletIntegrator(0.001))
        context.setPositions(peptide.positions)
        openmm.LocalEnergyMinimizer.minimize(context)
        start = states.SamplerState(context.getState(getPositions=True).getPositions(asNumpy=True))
        del context
        with quiet_openmmtools():  # the experimental-API warning and the citation list
            simulation = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=args.iterations)
            reporter = multistate.MultiStateReporter(args.storage, checkpoint_interval=1)
            simulation.create(thermodynamic_states=thermodynamic_states, sampler_states=[start], storage=reporter)
        advance = simulation.run

    # OpenMM's CPU platform would use every core; for a peptide of a few dozen atoms its threads cost more in
    # synchronisation than they save (examples/hybrid_md_bg.py has the measurement).
    platform = openmm.Platform.getPlatformByName(args.md_platform)
    properties = {"Threads": str(args.md_threads)} if args.md_platform == "CPU" and args.md_threads else None
    simulation.sampler_context_cache = cache.ContextCache(platform=platform, platform_properties=properties)
    simulation.energy_context_cache = cache.ContextCache(platform=platform, platform_properties=properties)

    n_replicas = len(args.temperatures) if not args.resume else simulation.n_replicas
    clock = time.perf_counter()
    for step in range(args.iterations):
        t0 = time.perf_counter()
        if step % args.buffer_size == 0:
            print(f"      (each of the {n_replicas} TBGMoves draws {args.buffer_size} flow proposals with exact "
                  "likelihoods)", flush=True)
        advance(1)
        accepted = [m.move_list[-1].statistics["n_accepted"] for m in simulation._mcmc_moves]
        print(f"iteration {simulation.iteration:4d}: {time.perf_counter() - t0:6.1f} s, TBGMove accepted per "
              f"state {accepted}", flush=True)
    print(f"{args.iterations} iterations in {time.perf_counter() - clock:.0f} s")

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
