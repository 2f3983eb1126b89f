"""Valid-sample fraction of one or more models on the test dipeptides, without energies.

Validity (bond graph and chirality, `ValidityChecker`, with the mirroring and relabelling that the model's
density allows) depends on the positions only. For the EGNN CNF this script integrates the flow's positions
(dopri5, atol = rtol = 1e-4) and skips the costly exact divergence, about 10-20x cheaper per sample than
`openmm-tbg evaluate`; an internal-coordinate flow samples as usual (its exact likelihood is one pass). It prints
one row per peptide and model (valid %, binomial standard error, rejections by reason) and the mean over
peptides. ``--broken-pairs K`` adds, per peptide, the K atom pairs whose bonding (distance below the checker's
cutoff) most often differs from the Topology in the ``bond_graph`` rejections: "broken" for a Topology bond
that is too long, "extra" for two unbonded atoms that are too close.

    python benchmarks/validity_rate.py --models openmm_tbg/models/tbg_dipeptides.pt other.pt --samples 64
    python benchmarks/validity_rate.py --peptides GP --samples 1000 --broken-pairs 5      # the default model
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from _harness import Table, header, pick_device

from openmm_tbg.checkpoint import load_model
from openmm_tbg.data import read_splits
from openmm_tbg.encoding import encode_topology
from openmm_tbg.validity import REJECTION_REASONS, ValidityChecker


def valid_counts(flow, pdb_path: str, n: int, seed: int, batch_size: int,
                 broken_pairs: int = 0) -> dict:
    """Draw ``n`` flow samples of the peptide in ``pdb_path`` (positions only for the CNF) and check them.

    Returns the checker's statistics and, with ``broken_pairs``, ``"pairs"``: the most frequent atom pairs
    whose bonding differs from the Topology in the ``bond_graph`` rejections, as ``(count, kind, atom, atom)``.
    """
    import collections

    from openmm import app

    from openmm_tbg.sampler import symmetry_options
    from openmm_tbg.utils import to_nm

    pdb = app.PDBFile(pdb_path)
    encoding = encode_topology(pdb.topology)
    checker = ValidityChecker(pdb.topology, encoding, reference_positions=to_nm(pdb.positions),
                              **symmetry_options(flow))
    atoms = [f"{a.residue.name}{a.residue.index + 1}:{a.name}" for a in pdb.topology.atoms()]
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = collections.Counter()
    if flow.family == "egnn-cnf":
        tokens = flow.condition(encoding)
    else:
        context = flow.condition(encoding, [(b[0].index, b[1].index) for b in pdb.topology.bonds()])
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        if flow.family == "egnn-cnf":
            x0 = flow.sample_prior(m, encoding.n_atoms, generator=generator)
            x1 = flow.integrate_positions(x0, tokens, [0.0, 1.0], method="dopri5", atol=1e-4, rtol=1e-4)[0][-1]
            x = (x1 * flow.length_scale).double().numpy()
        else:
            x = flow.sample(context, m, generator=generator, batch_size=m)[0].detach().double().numpy()
        report = checker(x, rng=rng)
        bad = np.flatnonzero(report.reasons == "bond_graph")
        if broken_pairs and len(bad):
            for adjacency in checker.bond_graph(x[bad]):
                for i, j in np.argwhere(np.triu(adjacency != checker.adjacency)):
                    pairs[("extra" if adjacency[i, j] else "broken", atoms[i], atoms[j])] += 1
    counts = dict(checker.statistics)
    if broken_pairs:
        counts["pairs"] = [(c, *key) for key, c in pairs.most_common(broken_pairs)]
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[None], help="checkpoints (default: the shipped model)")
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--peptides", nargs="+", default=None, help="default: every peptide of --split")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--broken-pairs", type=int, default=0,
                        help="also list the K atom pairs that most often break the bond graph (default 0: off)")
    parser.add_argument("--json", default=None, help="also write the counts to this file")
    args = parser.parse_args(argv)

    dev = pick_device("cpu", threads=args.threads)
    names = args.peptides or read_splits(args.data)[args.split]
    header(__file__, dev, threads=args.threads, samples_per_peptide=args.samples, data=args.data)
    rows = Table([("model", 12), ("peptide", 7), ("valid %", 8, ".1f"), ("+-", 5, ".1f")])
    rows.header(tail="  rejections (mirrored, relabelled)")
    table = {}
    for model in args.models:
        flow = load_model(model)
        flow = flow.float() if flow.family == "egnn-cnf" else flow  # positions only: float32 is enough
        tag = flow.checkpoint_sha256[:12]
        rates = []
        for name in names:
            c = valid_counts(flow, os.path.join(args.data, f"{name}.pdb"), args.samples, args.seed, args.batch_size,
                             args.broken_pairs)
            p = c["valid"] / c["n"]
            rates.append(p)
            table.setdefault(tag, {})[name] = c
            rejected = ", ".join(f"{k} {c[k]}" for k in REJECTION_REASONS if c.get(k))
            rows.row(tag, name, 100 * p, 100 * np.sqrt(p * (1 - p) / c["n"]),
                     tail=f"  {rejected or '-'} ({c['mirrored']}, {c['relabelled']})")
            for count, kind, a, b in c.get("pairs", []):
                print(f"    {count:6d} of {c['bond_graph']} bond_graph rejections: {kind} {a}-{b}")
        rows.row(tag, "mean", 100 * np.mean(rates), "",
                 tail=f"  over {len(names)} peptides; {sum(r == 0 for r in rates)} with no valid sample")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(table, fh, indent=1)


if __name__ == "__main__":
    main()
