"""Where a model's samples lose energy: per-force energies of valid flow samples minus MD, in kT.

For each peptide, the script draws flow samples (any model family), keeps the valid ones (bond graph and
chirality, repaired only where the model's density allows it), and evaluates each force of the target
Hamiltonian separately (OpenMM force groups: bonds, angles, torsions, nonbonded + GB). It prints the median of
each term over the samples minus its median over MD frames, in kT at 310 K. A large bonds/angles excess is what
a Cartesian flow pays for placing bonds to ~0.003 nm; the internal-coordinate flow should have almost none.

The CNF's samples are drawn positions-only (no divergence), which is 10-20x cheaper and gives the same
positions. A second table splits the bonds and angles by their place in the internal-coordinate Z-matrix: bonds
and angles that are Z-matrix coordinates (the flow models them directly), ring-closure bonds and the angles
that contain one (set by the coordinates of both ring arms), and the other angles (implied by an angle and an
improper dihedral at a branch centre). ``--shuffle`` adds the "MD with shuffled bonds and angles" reference:
MD frames whose bond lengths and angles are each permuted independently across frames (marginals kept,
correlations broken) and rebuilt along the internal-coordinate Z-matrix.

    python benchmarks/energy_excess.py --model openmm_tbg/models/ic_dipeptides.pt --peptides AA NY --samples 64
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from _harness import header, markdown_table, pick_device

from openmm_tbg.checkpoint import load_model
from openmm_tbg.data import load_peptide
from openmm_tbg.sampler import symmetry_options
from openmm_tbg.validity import ValidityChecker

TERMS = {"HarmonicBondForce": "bonds", "HarmonicAngleForce": "angles", "PeriodicTorsionForce": "torsions"}


def force_group_energies(system, positions_nm: np.ndarray, temperature: float = 310.0) -> dict[str, np.ndarray]:
    """Per-term reduced energies (kT) of configurations: bonds, angles, torsions, nonbonded + GB, total."""
    import copy

    import openmm
    from openmm import unit

    from openmm_tbg.energy import MOLAR_GAS_CONSTANT
    from openmm_tbg.utils import select_platform

    system = copy.deepcopy(system)
    names = []
    for i, force in enumerate(system.getForces()):
        name = TERMS.get(force.__class__.__name__, "nonbonded+GB")
        if name not in names:
            names.append(name)
        force.setForceGroup(names.index(name))
    context = openmm.Context(system, openmm.VerletIntegrator(1e-3), select_platform("CPU"))
    kT = MOLAR_GAS_CONSTANT * temperature
    out = {name: np.empty(len(positions_nm)) for name in names}
    for k, x in enumerate(positions_nm):
        context.setPositions(x)
        for g, name in enumerate(names):
            e = context.getState(getEnergy=True, groups={g}).getPotentialEnergy()
            out[name][k] = e.value_in_unit(unit.kilojoule_per_mole) / kT
    out["total"] = sum(out[name] for name in names)
    return out


def bonded_split(system, zmatrix, positions_nm: np.ndarray, temperature: float = 310.0) -> dict[str, np.ndarray]:
    """Harmonic bond and angle energies (kT) of configurations, split by their role in ``zmatrix``.

    Returns ``bonds: z-matrix``, ``bonds: ring closure``, ``angles: z-matrix``, ``angles: ring closure`` (an
    angle containing a ring-closure bond) and ``angles: implied`` (the rest), each ``(n,)``.
    """
    import openmm

    from openmm_tbg.energy import MOLAR_GAS_CONSTANT

    kT = MOLAR_GAS_CONSTANT * temperature
    closures = {frozenset(map(int, c)) for c in zmatrix.ring_closures}
    zangles = set()  # bonds need no such set: every bond is a Z-matrix bond or a ring closure
    for p in range(2, zmatrix.n_atoms):
        i, (j, k, _) = int(zmatrix.order[p]), (int(r) for r in zmatrix.refs[p])
        zangles.add((i, j, k))
        zangles.add((k, j, i))
    x = np.asarray(positions_nm, dtype=np.float64)
    out = {key: np.zeros(len(x)) for key in ("bonds: z-matrix", "bonds: ring closure", "angles: z-matrix",
                                              "angles: ring closure", "angles: implied")}
    for force in system.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for n in range(force.getNumBonds()):
                i, j, r0, k = force.getBondParameters(n)
                r = np.linalg.norm(x[:, i] - x[:, j], axis=-1)
                e = 0.5 * k.value_in_unit(k.unit) * (r - r0.value_in_unit(r0.unit)) ** 2 / kT
                out["bonds: ring closure" if frozenset((i, j)) in closures else "bonds: z-matrix"] += e
        elif isinstance(force, openmm.HarmonicAngleForce):
            for n in range(force.getNumAngles()):
                i, j, l, t0, k = force.getAngleParameters(n)
                a, b = x[:, i] - x[:, j], x[:, l] - x[:, j]
                cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
                theta = np.arccos(np.clip(cos, -1.0, 1.0))
                e = 0.5 * k.value_in_unit(k.unit) * (theta - t0.value_in_unit(t0.unit)) ** 2 / kT
                if frozenset((i, j)) in closures or frozenset((j, l)) in closures:
                    out["angles: ring closure"] += e
                elif (i, j, l) in zangles:
                    out["angles: z-matrix"] += e
                else:
                    out["angles: implied"] += e
    return out


def flow_positions(flow, encoding, bonds, n: int, seed: int) -> np.ndarray:
    """``n`` flow samples (nm); positions only for the CNF."""
    ctx = flow.condition(encoding, bonds)
    if flow.family == "egnn-cnf":
        g = torch.Generator().manual_seed(seed)
        x0 = flow.sample_prior(n, encoding.n_atoms, generator=g)
        xs, _ = flow.integrate_positions(x0, ctx, [0.0, 1.0], atol=1e-5, rtol=1e-5)
        return (xs[-1] * flow.length_scale).double().numpy()
    x, _ = flow.sample(ctx, n, generator=seed)
    return x.numpy()


def shuffled_md(trajectory, bonds, rng: np.random.Generator) -> np.ndarray:
    """MD frames with bond lengths and angles permuted across frames, rebuilt along the Z-matrix."""
    from openmm_tbg.internal_coordinates import from_internal, to_internal
    from openmm_tbg.zmatrix import build_zmatrix

    zm = build_zmatrix(trajectory.encoding, bonds)
    b, a, d = to_internal(torch.as_tensor(trajectory.positions, dtype=torch.float64), zm)
    for t in (b, a):
        for p in range(t.shape[1]):
            t[:, p] = t[rng.permutation(len(t)), p]
    return from_internal(b, a, d, zm).numpy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="checkpoint (repeatable; default: the shipped default model)")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                       "dipeptides"))
    parser.add_argument("--peptides", nargs="+", default=["AA", "NY"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--md-frames", type=int, default=200)
    parser.add_argument("--shuffle", action="store_true", help="add the shuffled-MD reference rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    dev = pick_device("cpu", args.threads)
    header(__file__, dev, samples=args.samples, md_frames=args.md_frames, seed=args.seed)
    from openmm_tbg.peptides import create_system

    models = args.model or [None]
    titles = ["peptide", "samples", "valid", "bonds", "angles", "torsions", "nonbonded+GB", "total"]
    table, split_table = [], []
    split_keys = ("bonds: z-matrix", "bonds: ring closure", "angles: z-matrix", "angles: ring closure",
                  "angles: implied")
    from openmm_tbg.zmatrix import build_zmatrix
    for name in args.peptides:
        traj = load_peptide(args.data, name, max_frames=args.md_frames)
        bonds = [(b[0].index, b[1].index) for b in traj.topology.bonds()]
        system = create_system(traj.topology)
        md = {k: np.median(v) for k, v in force_group_energies(system, traj.positions.astype(np.float64)).items()}
        zm = build_zmatrix(traj.encoding, bonds)
        md_split = {k: np.median(v) for k, v in bonded_split(system, zm, traj.positions).items()}
        rows = []
        if args.shuffle:
            rows.append(("MD, shuffled bonds+angles", shuffled_md(traj, bonds, np.random.default_rng(args.seed)),
                         None))
        for path in models:
            flow = load_model(path)
            x = flow_positions(flow, traj.encoding, bonds, args.samples, args.seed)
            checker = ValidityChecker(traj.topology, traj.encoding, reference_positions=traj.positions[0],
                                      **symmetry_options(flow))
            report = checker(x)
            label = f"{flow.family} {os.path.basename(flow.checkpoint_path)}"
            rows.append((label, report.positions[report.valid], f"{report.valid.sum()}/{len(x)}"))
        for label, x, valid in rows:
            if not len(x):
                table.append([name, label, valid, *["-"] * 5])
                continue
            e = force_group_energies(system, x)
            table.append([name, label, valid or "-", *(f"{np.median(e[k]) - md[k]:+.1f}" for k in
                                                        ("bonds", "angles", "torsions", "nonbonded+GB", "total"))])
            split = bonded_split(system, zm, x)
            # The split must add up to OpenMM's own bond and angle energies (same positions, same terms).
            for term, parts in (("bonds", split_keys[:2]), ("angles", split_keys[2:])):
                np.testing.assert_allclose(sum(split[k] for k in parts), e[term], rtol=1e-4, atol=1e-3)
            split_table.append([name, label, f"{len(zm.ring_closures)}",
                                *(f"{np.median(split[k]) - md_split[k]:+.1f}" for k in split_keys)])
    print("median per-term reduced energy of the samples minus that of MD frames (kT, 310 K)")
    markdown_table(titles, table)
    print()
    print("the bonds and angles above, split by their role in the Z-matrix (median excess over MD, kT)")
    markdown_table(["peptide", "samples", "ring closures", *split_keys], split_table)


if __name__ == "__main__":
    main()
