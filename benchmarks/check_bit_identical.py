"""Do two source trees of openmm_tbg draw bit-identical samples with the same seed?

``BoltzmannGeneratorSampler(pep.system, pep.topology, seed=0).sample(8)`` on AA (``build_peptide("AA")``, the
shipped default model and ODE options, batch size 8) is run once per tree, each in its own Python process with
``PYTHONPATH=<tree>`` so that it imports that tree's ``openmm_tbg`` (the process prints the file it imported and
refuses to run if it is not the intended tree). Positions and log-weights are then compared exactly; the
script prints their largest absolute differences and exits with status 1 if they differ. A side can also be a
``.npz`` saved by an earlier run, so the slow side need not be repeated.

    git worktree add /tmp/before f14804f
    python benchmarks/check_bit_identical.py compare /tmp/before . --save-a /tmp/before.npz
    python benchmarks/check_bit_identical.py compare /tmp/before.npz .
    git worktree remove /tmp/before

It takes some minutes of CPU per tree (exact likelihoods of the CNF: 16 quadrature nodes, 3N backward passes
at each). ``run --out FILE.npz`` draws the samples with whatever ``openmm_tbg`` is importable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: What is compared exactly; the other saved arrays are there to explain a difference.
COMPARED = ("positions", "log_weights")
SAVED = COMPARED + ("log_q", "reduced_potentials", "valid")


def draw(out: str, expect_tree: str | None, n: int, seed: int, threads: int) -> None:
    """Draw the samples with the importable openmm_tbg and save them (and which file was imported) to ``out``."""
    import torch

    torch.set_num_threads(int(threads))
    import openmm_tbg
    from openmm_tbg import BoltzmannGeneratorSampler, build_peptide

    module = str(Path(openmm_tbg.__file__).resolve())
    print(f"openmm_tbg imported from {module}", flush=True)
    if expect_tree is not None and not module.startswith(str(Path(expect_tree).resolve()) + os.sep):
        raise SystemExit(f"check_bit_identical: openmm_tbg was imported from {module}, not from the tree "
                         f"{expect_tree}; run from a directory without another openmm_tbg on sys.path.")
    pep = build_peptide("AA")
    sampler = BoltzmannGeneratorSampler(pep.system, pep.topology, seed=seed, batch_size=n)
    try:
        start = time.perf_counter()
        result = sampler.sample(n, progress=False)
        seconds = time.perf_counter() - start
    finally:
        sampler.close()
    print(f"{n} samples in {seconds:.1f} s; ESS {result.ess:.4f}; valid {int(result.valid.sum())}/{n}", flush=True)
    np.savez(out, module=module, **{k: np.asarray(getattr(result, k)) for k in SAVED})


def load_side(side: str, save: str | None, n: int, seed: int, threads: int) -> dict:
    """The saved arrays of one side: a ``.npz`` file as it is, or a source tree run in a subprocess."""
    if side.endswith(".npz"):
        with np.load(side, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    tree = Path(side).resolve()
    if not (tree / "openmm_tbg" / "__init__.py").is_file():
        raise SystemExit(f"check_bit_identical: {side} is neither a .npz file nor a source tree with "
                         f"openmm_tbg/__init__.py.")
    with tempfile.TemporaryDirectory() as scratch:
        out = save or os.path.join(scratch, "samples.npz")
        env = dict(os.environ, PYTHONPATH=str(tree))
        # Run from the scratch directory, so that the working directory cannot shadow the tree's package.
        subprocess.run([sys.executable, os.path.abspath(__file__), "run", "--out", os.path.abspath(out),
                        "--expect-tree", str(tree), "--samples", str(n), "--seed", str(seed),
                        "--threads", str(threads)], env=env, cwd=scratch, check=True)
        with np.load(out, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over entries, where equal infinities (log-weight -inf of rejected samples) count as 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):  # inf - inf where exactly one side's entry is not the other's
        diff = np.where(same, 0.0, np.abs(a - b))
    return float(np.nanmax(diff)) if diff.size else 0.0


def compare(a: dict, b: dict) -> bool:
    """Print the comparison of two sides; True if positions and log-weights are bit-identical."""
    print(f"A: {a['module']}\nB: {b['module']}")
    identical = True
    for key in SAVED:
        x, y = a[key], b[key]
        if x.shape != y.shape:
            print(f"{key:>18}: shapes differ, {x.shape} vs {y.shape}")
            identical &= key not in COMPARED
            continue
        bits = np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
        print(f"{key:>18}: {'bit-identical' if bits else 'DIFFERENT'}, max |A - B| = {max_abs_difference(x, y):.3e}")
        identical &= bits or key not in COMPARED
    print("bit-identical" if identical else "NOT bit-identical")
    return identical


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="draw the samples with the importable openmm_tbg and save them")
    run.add_argument("--out", required=True, help=".npz file to write")
    run.add_argument("--expect-tree", default=None, help="refuse to run unless openmm_tbg comes from this tree")
    cmp = sub.add_parser("compare", help="compare two trees or saved .npz files")
    cmp.add_argument("a", help="source tree (e.g. a git worktree of the old commit) or .npz")
    cmp.add_argument("b", help="source tree or .npz")
    cmp.add_argument("--save-a", default=None, help="keep side A's samples in this .npz (when A is a tree)")
    cmp.add_argument("--save-b", default=None, help="keep side B's samples in this .npz (when B is a tree)")
    for p in (run, cmp):
        p.add_argument("--samples", type=int, default=8)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the same on both sides)")
    args = parser.parse_args(argv)
    if args.command == "run":
        draw(args.out, args.expect_tree, args.samples, args.seed, args.threads)
        return
    a = load_side(args.a, args.save_a, args.samples, args.seed, args.threads)
    b = load_side(args.b, args.save_b, args.samples, args.seed, args.threads)
    sys.exit(0 if compare(a, b) else 1)


if __name__ == "__main__":
    main()
