"""The inputs issue 22 found answered wrongly in silence, and their controls: what the sampler does with each.

For alanine dipeptide (AA) and the shipped model, builds the sampler with
- ``obc1``: the training Hamiltonian (amber14-all + implicit/obc1), and ``obc2`` (a close one): controls;
- ``vacuum``: amber14-all without implicit solvent (MD: 87 +- 10 % alpha-L, mean U -255.8 kJ/mol);
- ``reordered``: a System built from a Topology whose atoms are listed in another order (reversed within each
  residue), given with the original Topology;
- ``reordered-consistent``: the same System with its own (reordered) Topology: a control;
- ``restrained``: the obc1 System plus a CustomExternalForce restraining CA of residue 1 to where it is in the
  built structure moved by (2, 1.5, 1) nm, as in a PDB file (k = 1000 kJ/mol/nm^2; a Boltzmann sample keeps CA
  within ~0.09 nm of the point);
then draws ``--samples`` proposals, and prints per case: refused (and the exception's first words), the
warnings raised (by class), ESS in samples, and the case's observable (reweighted alpha-L fraction and mean U,
median U of the valid samples, reweighted CA distance to the restraint point).

Run: ``python benchmarks/silent_inputs.py [--samples 20000]`` (CPU: ~1-2 min for 20000).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import openmm
from openmm import app, unit

from openmm_tbg import BoltzmannGeneratorSampler, build_peptide
from openmm_tbg.peptides import create_system
from openmm_tbg.testing import reordered

import _harness


def cases(pep):
    x = np.asarray(pep.positions.value_in_unit(unit.nanometer))
    obc2 = create_system(pep.topology, ("amber14-all.xml", "implicit/obc2.xml"))
    vacuum = app.ForceField("amber14-all.xml").createSystem(pep.topology, nonbondedMethod=app.NoCutoff,
                                                            constraints=None, rigidWater=False)
    top_r, x_r, _ = reordered(pep.topology, x)
    system_r = create_system(top_r)
    restrained = create_system(pep.topology)
    ca = next(a.index for a in pep.topology.atoms() if a.name == "CA")
    force = openmm.CustomExternalForce("0.5*k*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    for name in ("k", "x0", "y0", "z0"):
        force.addPerParticleParameter(name)
    point = x[ca] + np.array([2.0, 1.5, 1.0])
    force.addParticle(ca, [1000.0, *point])
    restrained.addForce(force)
    return {"obc1": (pep.system, pep.topology, {}), "obc2": (obc2, pep.topology, {}),
            "vacuum": (vacuum, pep.topology, {}), "reordered": (system_r, pep.topology, {}),
            "reordered-consistent": (system_r, top_r, {}), "restrained": (restrained, pep.topology,
                                                                         {"ca": ca, "point": point})}


def observable(name, result, extra):
    import mdtraj

    ok = result.valid
    if not ok.any():
        return "no valid sample"
    w = result.weights
    if name == "restrained":
        d = np.linalg.norm(result.positions[:, extra["ca"]] - extra["point"], axis=1)
        return f"reweighted CA distance to the point {np.sum(w[ok] * d[ok]):.3f} nm"
    if name.startswith("reordered"):
        return f"median U of valid samples {np.median(result.reduced_potentials[ok]) * result.kT:.4g} kJ/mol" \
            if hasattr(result, "kT") else \
            f"median u of valid samples {np.median(result.reduced_potentials[ok]):.4g} kT"
    traj = result.to_mdtraj()
    _, phi = mdtraj.compute_phi(traj)
    alpha_l = np.sum(w[ok] * (phi[ok, 0] > 0))
    kT = 0.0083144626 * result.temperature
    mean_u = np.sum(w[ok] * result.reduced_potentials[ok]) * kT
    return f"reweighted alpha-L {100 * alpha_l:.2f} %, mean U {mean_u:.1f} kJ/mol"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="case names to run (default all)")
    args = parser.parse_args(argv)
    _harness.header(__file__, samples=args.samples, seed=args.seed)
    pep = build_peptide("AA")
    for name, (system, topology, extra) in cases(pep).items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sampler = BoltzmannGeneratorSampler(system, topology, seed=args.seed, platform="CPU")
                result = sampler.sample(args.samples, progress=False)
                sampler.close()
            except Exception as error:  # noqa: BLE001 - the point is to report it
                print(f"{name:22s} REFUSED {type(error).__name__}: {str(error)[:160]}"
                      f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
                continue
            obs = observable(name, result, extra)
        kinds = sorted({w.category.__name__ for w in caught if issubclass(w.category, UserWarning)})
        print(f"{name:22s} ESS {result.effective_samples:8.1f} samples  warnings {kinds or 'none'}  {obs}"
              f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
