"""Hybrid MD / Boltzmann-generator sampling of alanine dipeptide with openmmtools.

Each iteration runs Langevin dynamics (local moves) and then one TBGMove (a global, independent proposal from
the flow, accepted by Metropolis-Hastings, so the chain stays exact). MD alone rarely leaves a backbone basin
on this time scale; the flow proposals jump between basins. The script prints the (phi, psi) basins visited
and the TBGMove acceptance, one line per iteration with the time spent.

TBGMove draws its proposals ``--buffer-size`` at a time, each with an exact likelihood, and every move with a
valid proposal also evaluates the exact log density of the current state (MD has moved it). With the default
internal-coordinate model that is one cheap pass. With the CNF (``--model egnn-cnf``) one exact likelihood of AA
costs seconds of one CPU core, so a buffer of 64 (TBGMove's default) makes the first move silent for minutes;
this script uses 8 and says when it refills the buffer.

    python examples/hybrid_md_bg.py                                          # 200 iterations, default model
    python examples/hybrid_md_bg.py --model egnn-cnf --iterations 16         # the CNF, about 1.5 min

Cost, measured with ``/usr/bin/time -v`` (the 2026-12-02 AMD EPYC runs with ``/usr/bin/time -f`` and the same
fields: wall clock, user and system CPU, maximum resident set) on the 2-core CPU VM, which other jobs (model
training, test suites) sometimes shared; the load is given with each figure:
- defaults (200 iterations of 500 MD steps + one TBGMove, buffer 8, Langevin moves on OpenMM's CPU platform with
  one thread), the 12000-step default model with the current whitening of unseen residue pairs, 2026-12-02
  (AMD EPYC): AA accepted 64 of 200 proposals, 200 iterations in 56 s (64 s wall clock, 38 s user and 25 s system
  CPU, peak memory 0.43 GB), while the NY run shared the CPU; ``--sequence NY`` 6 of 200, 84 s (92 s wall,
  0.45 GB); ``--sequence KQ`` 9 of 200, 95 s (103 s wall, 0.45 GB) while the test suite ran on the other core.
  Threads, measured the same day with the earlier whitening (AA, 63 and 53 of 200 accepted): 57 s for the
  iterations with one OpenMM thread, 87 s with ``--md-threads 0`` (OpenMM's default: every core; 48 s of
  system CPU against 25 s). OpenMM's threads synchronise every step, which costs more than it saves for a few
  dozen atoms. The OpenMM random streams of the Langevin moves are not seeded, so acceptance counts vary
  between runs.
- ``--model egnn-cnf --iterations 16``: 93 s wall clock (88 s for the iterations: each buffer
  refill of 8 about 29 s, each valid move about 2.5 s for the current state's log density), peak memory
  1.4 GB, load 1.0-1.5. With two torch threads under a load of 3.3-5.5 the same run took
  19 min (1.4 GB): the two buffer refills 250-300 s each, every valid proposal 20-115 s for the current state's
  log density.
"""

import argparse
import logging
import time

import mdtraj
import numpy as np
import openmm
import torch
from openmm import unit

from openmm_tbg import BoltzmannGeneratorSampler, TBGMove, build_peptide
from openmm_tbg.quiet import quiet_openmmtools

with quiet_openmmtools():  # pymbar's import banners
    from openmmtools import cache, mcmc, states


def basin(phi: float, psi: float) -> str:
    """Coarse Ramachandran basin (degrees)."""
    if phi > 0:
        return "alpha_L"
    if -120 < psi < 50:
        return "alpha_R"
    return "beta/PPII"


def backbone_angles(topology, positions_nm):
    traj = mdtraj.Trajectory(np.asarray(positions_nm, dtype=np.float32)[None], topology)
    phi = np.degrees(mdtraj.compute_phi(traj)[1][0, 0])
    psi = np.degrees(mdtraj.compute_psi(traj)[1][0, 0])
    return float(phi), float(psi)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", default="AA")
    parser.add_argument("--iterations", type=int, default=200, help="MD + TBGMove iterations (default 200)")
    parser.add_argument("--md-steps", type=int, default=500, help="Langevin steps (1 fs) per iteration")
    parser.add_argument("--buffer-size", type=int, default=8,
                        help="flow proposals TBGMove draws at a time (default 8; TBGMove's own default is 64)")
    parser.add_argument("--model", default=None, help="checkpoint path (default: the shipped model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ode-method", default="dopri5")
    parser.add_argument("--step-size", type=float, default=None)
    parser.add_argument("--md-platform", default="CPU", help="OpenMM platform of the Langevin moves (default CPU)")
    parser.add_argument("--md-threads", type=int, default=1,
                        help="threads of the CPU platform for the Langevin moves (default 1; 0: OpenMM's default, "
                             "every core)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch CPU threads (default 1: on the shared 2-core VM, 8 CNF samples of AA took 93 s "
                             "with 1 thread and 363 s with 2, whose threads spin while waiting for a core)")
    args = parser.parse_args(argv)
    if args.md_threads < 0:
        parser.error(f"--md-threads must be 0 (OpenMM's default) or a positive number, got {args.md_threads}.")
    torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING)

    peptide = build_peptide(args.sequence)
    options = {"ode_method": args.ode_method}
    if args.step_size is not None:
        options["step_size"] = args.step_size
    bg = BoltzmannGeneratorSampler(peptide.system, peptide.topology, model=args.model, device=args.device,
                                   seed=args.seed, positions=peptide.positions, **options)
    thermodynamic_state = states.ThermodynamicState(peptide.system, 310 * unit.kelvin)
    sampler_state = states.SamplerState(peptide.positions)
    # OpenMM's CPU platform would use every core; for a peptide of a few dozen atoms its threads cost more in
    # synchronisation than they save (the docstring has the measurement).
    platform = openmm.Platform.getPlatformByName(args.md_platform)
    properties = {"Threads": str(args.md_threads)} if args.md_platform == "CPU" and args.md_threads else None
    context_cache = cache.ContextCache(platform=platform, platform_properties=properties)
    # Start from a minimized structure.
    context, _ = context_cache.get_context(thermodynamic_state)
    sampler_state.apply_to_context(context)
    openmm.LocalEnergyMinimizer.minimize(context)
    sampler_state.update_from_context(context)

    tbg = TBGMove(bg, seed=args.seed, buffer_size=args.buffer_size)
    langevin = mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, collision_rate=1.0 / unit.picosecond,
                                         n_steps=args.md_steps, reassign_velocities=False)
    sampler = mcmc.MCMCSampler(thermodynamic_state, sampler_state, mcmc.SequenceMove([langevin, tbg]))
    md_top = mdtraj.Topology.from_openmm(peptide.topology)

    visits, transitions, previous = {}, 0, None
    start = time.perf_counter()
    print(f"{'iter':>5} {'phi':>8} {'psi':>8}  basin       TBG accepted/proposed  seconds", flush=True)
    for iteration in range(args.iterations):
        if tbg.statistics["n_proposed"] % args.buffer_size == 0:  # n_attempts = 1: the buffer is empty now
            print(f"      (TBGMove draws {args.buffer_size} flow proposals with exact likelihoods)", flush=True)
        t0 = time.perf_counter()
        sampler.run(1, context_cache=context_cache)
        phi, psi = backbone_angles(md_top, sampler.sampler_state.positions.value_in_unit(unit.nanometer))
        b = basin(phi, psi)
        visits[b] = visits.get(b, 0) + 1
        transitions += int(previous is not None and b != previous)
        previous = b
        stats = tbg.statistics
        print(f"{iteration:5d} {phi:8.1f} {psi:8.1f}  {b:<10}  {stats['n_accepted']:>10}/{stats['n_proposed']:<10} "
              f"{time.perf_counter() - t0:7.1f}", flush=True)
    print(f"{args.iterations} iterations in {time.perf_counter() - start:.0f} s")
    stats = tbg.statistics
    print(f"basins visited (iterations): {visits}; basin changes: {transitions}")
    print(f"TBGMove: acceptance {100.0 * tbg.acceptance_rate:.1f} % ({stats['n_accepted']}/{stats['n_proposed']}), "
          f"invalid proposals {stats['n_invalid']}, mirrored {stats['n_mirrored']}, "
          f"relabelled {stats['n_relabelled']}")
    bg.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
