"""Sample quality against training time: valid fraction and Kish ESS of several checkpoints of one run.

For every model file (e.g. the copies of a training run's checkpoints) and every peptide, the script draws
``--samples`` proposals with exact importance weights (`BoltzmannGeneratorSampler`, the same seed for every
model) and prints one row per model: training steps and wall time from the checkpoint's metadata, the mean
valid fraction and Kish ESS, and each peptide's ESS. With a few thousand proposals an ESS below ~0.5 % rests
on fewer than 10 effective samples, so single entries are noisy; compare means and trends.

``--md-frames N`` adds a steadier figure: the mean log density of N MD frames per peptide (nats per degree of
freedom, 3n - 3 per peptide, averaged over the peptides), in the base measure that every model family shares
(`openmm_tbg.internal_coordinates`). Differences between models are differences of KL(MD || model) per degree
of freedom, so models with different coordinates (e.g. ``--ring-closure``) compare on it, where their training
losses do not.

``--unseen-pairs`` (internal-coordinate models) measures transfer on train peptides: each peptide is whitened
as if no training peptide had had its pair of amino acids, i.e. the table entries of its coordinates that span
both residues are taken out (and out of the pooled entries they were added to), so those coordinates fall back
as they do for an unseen peptide (`openmm_tbg.ic_statistics`). The network itself did see these peptides.

This is a tool for choosing training settings, so it refuses peptides of the data set's test split unless
``--allow-test`` is given (for a final report, not for tuning).

    python benchmarks/ess_by_checkpoint.py --models runs/ic/history/step*.pt --peptides AD KE PW VL FS MR
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from _harness import header, markdown_table, pick_device

from openmm_tbg import BoltzmannGeneratorSampler
from openmm_tbg.checkpoint import load_model
from openmm_tbg.data import load_peptide
from openmm_tbg.data.splits import check_not_test_split
from openmm_tbg.peptides import create_system

DEFAULT_PEPTIDES = ("AD", "KE", "PW", "VL", "FS", "MR")  # train split: charged, Pro, branched, aromatic, long


def without_pair_keys(flow, topology):
    """A copy of an internal-coordinate ``flow`` whose whitening table lacks the keys of ``topology`` that span
    two residues; their statistics are also subtracted from the amino-acid-free entries they were added to."""
    import copy

    from openmm_tbg.encoding import encode_topology
    from openmm_tbg.ic_statistics import WhiteningTable, generic_key, partial_key

    if flow.family != "internal-coordinate":
        raise SystemExit("--unseen-pairs needs internal-coordinate models (the CNF has no whitening table).")
    bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    # A key spans two residues exactly when partial_key strips the other residue's amino acid from it.
    keys = {k for ks in flow.condition(encode_topology(topology), bonds).zmatrix.keys for k in ks
            if k and partial_key(k) != k}
    entries = {k: list(v) for k, v in flow.table.entries.items()}
    for key in keys & set(entries):
        stats = entries.pop(key)
        g = generic_key(key)
        entries[g] = [a - b for a, b in zip(entries[g], stats)]
    out = copy.deepcopy(flow)
    out.table = WhiteningTable(entries, fallback=flow.table.fallback)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="model files (checkpoints of one run)")
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"),
                        help="data-set directory (default ../shared/data/dipeptides)")
    parser.add_argument("--peptides", nargs="+", default=list(DEFAULT_PEPTIDES),
                        help=f"peptides (default: {' '.join(DEFAULT_PEPTIDES)}, all in the train split)")
    parser.add_argument("--samples", type=int, default=2000, help="proposals per model and peptide (2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    parser.add_argument("--allow-test", action="store_true", help="allow test-split peptides (reports only)")
    parser.add_argument("--unseen-pairs", action="store_true",
                        help="whiten each peptide as if its pair of amino acids had not been in training")
    parser.add_argument("--md-frames", type=int, default=0,
                        help="also report the mean log density of this many MD frames per peptide (0: off)")
    args = parser.parse_args(argv)
    if not args.allow_test:
        try:
            check_not_test_split(args.peptides, args.data)
        except ValueError as exc:
            parser.error(f"{exc} This benchmark compares training settings, so it is run on train peptides; pass "
                         "--allow-test only to report on a finished model.")
    dev = pick_device("cpu", args.threads)
    header(__file__, dev, samples=args.samples, seed=args.seed, peptides=" ".join(args.peptides),
           unseen_pairs=args.unseen_pairs)
    molecules = []
    for name in args.peptides:
        traj = load_peptide(args.data, name, max_frames=max(1, args.md_frames))
        molecules.append((name, traj, create_system(traj.topology)))
    rows = []
    for path in args.models:
        flow = load_model(path)
        meta = torch.load(path, map_location="cpu", weights_only=True).get("metadata", {}).get("training", {})
        valid, ess, cells, md_log_q = [], [], [], []
        start = time.perf_counter()
        for name, traj, system in molecules:
            model = without_pair_keys(flow, traj.topology) if args.unseen_pairs else flow
            sampler = BoltzmannGeneratorSampler(system, traj.topology, model=model, seed=args.seed, device=dev)
            if args.md_frames:
                lq = sampler.log_prob(traj.positions.astype(np.float64))
                if not np.all(np.isfinite(lq)):  # counted, never dropped silently
                    print(f"# {os.path.basename(path)} {name}: {int((~np.isfinite(lq)).sum())} of {len(lq)} MD "
                          "frames outside the model's support (log q = -inf)")
                md_log_q.append(np.mean(lq) / (3 * traj.n_atoms - 3))
            result = sampler.sample(args.samples, progress=False)
            valid.append(result.n_valid / args.samples)
            ess.append(result.ess)
            cells.append(f"{100 * result.ess:.2f} ({100 * valid[-1]:.0f})")
        hours = meta.get("wall_time_s", float("nan")) / 3600
        md_cell = [f"{np.mean(md_log_q):.4f}"] if args.md_frames else []
        rows.append([os.path.basename(path), meta.get("steps", "?"), f"{hours:.2f}",
                     f"{100 * np.mean(valid):.1f}", f"{100 * np.mean(ess):.2f}", *md_cell, *cells,
                     f"{time.perf_counter() - start:.0f}"])
    md_title = ["MD log q per DOF"] if args.md_frames else []
    markdown_table(["model", "steps", "training h", "valid %", "mean ESS %", *md_title,
                    *[f"{n} ESS % (valid %)" for n in args.peptides], "wall s"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
