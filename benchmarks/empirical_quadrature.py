"""Can a quadrature rule fitted to one model's divergence curves beat Gauss-Legendre at few nodes?

The exact log-likelihood needs int_0^1 div v(x(t), t) dt. Gauss-Legendre needs about 12-16 nodes for the
0.1 kT bar on the shipped model (``quadrature_error.py``); issue 7's CPU target needs 6 or fewer. This script
tests an empirical rule: K nodes and weights fitted (weights by least squares, nodes by Nelder-Mead, with the
weights summing to 1) so that they integrate the divergence curves of *training* peptides, then scored on
curves of *test* peptides. Each curve is the exact divergence at 48 Gauss-Legendre nodes along a tight
(dopri5 1e-7) trajectory; its degree-47 Legendre interpolant gives the curve at any t, and its 48-node
integral is the reference. Errors are in kT.

It prints the singular values of the training curves (how many shapes the family has), then for each K the
train and test RMS/max errors of Gauss-Legendre and of the fitted rule, and the fitted nodes.

    python benchmarks/empirical_quadrature.py --train MV NV CE IF RG QP NK KM QI MC TH HD RD EV \\
        --test AA NY RL HT GP KQ AT LW TD --samples 4 --nodes 4 6 8 --cache curves.npz

Scaled down (a few minutes): ``--train CE NV --test AA --samples 2 --nodes 4 6``.
"""

from __future__ import annotations

import argparse
import os
import zlib

import numpy as np
import torch
from numpy.polynomial import legendre
from _harness import Table, divergence_along, header, pick_device
from scipy.optimize import minimize

from openmm_tbg.checkpoint import load_model
from openmm_tbg.encoding import encode_topology
from openmm_tbg.flow import gauss_legendre

N_REFERENCE = 48


def divergence_curves(flow, pdb_path: str, n_samples: int, seed: int) -> np.ndarray:
    """(48, n_samples) exact divergence at the 48 Gauss-Legendre nodes of tight trajectories."""
    from openmm import app

    tokens = flow.condition(encode_topology(app.PDBFile(pdb_path).topology))
    x0 = flow.sample_prior(n_samples, tokens.shape[0], generator=torch.Generator().manual_seed(seed))
    return divergence_along(flow, tokens, x0, gauss_legendre(N_REFERENCE)[0], 1e-7)[0]


def curve_family(curves: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Legendre coefficients (C, 48), reference integrals (C,) and peptide names of all curves."""
    nodes, weights = gauss_legendre(N_REFERENCE)
    names = [name for name, v in curves.items() for _ in range(v.shape[1])]
    values = np.concatenate([v.T for v in curves.values()])  # (C, 48)
    coefficients = np.linalg.solve(legendre.legvander(2 * nodes - 1, N_REFERENCE - 1), values.T).T
    return coefficients, values @ weights, names


def at(coefficients: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(C, K) curves at times t."""
    return np.stack([legendre.legval(2 * tt - 1, coefficients.T) for tt in np.atleast_1d(t)], 1)


def fit_weights(t: np.ndarray, coefficients: np.ndarray, integrals: np.ndarray) -> np.ndarray:
    """Least-squares weights at nodes t, constrained (by a heavy row) to sum to 1."""
    a = at(coefficients, t)
    heavy = 1e3 * np.abs(a).mean()
    return np.linalg.lstsq(np.vstack([a, heavy * np.ones(len(t))]), np.r_[integrals, heavy], rcond=None)[0]


def fit_rule(n_nodes: int, coefficients: np.ndarray, integrals: np.ndarray, seed: int):
    """Nodes (by Nelder-Mead on logit(t), from Gauss-Legendre and two jittered starts) and their weights."""
    def loss(p):
        t = np.sort(1 / (1 + np.exp(-p)))
        return np.mean((at(coefficients, t) @ fit_weights(t, coefficients, integrals) - integrals) ** 2)

    g, _ = gauss_legendre(n_nodes)
    rng = np.random.default_rng(seed)
    best = None
    for trial in range(3):
        start = np.log(g / (1 - g)) + (0 if trial == 0 else rng.normal(0, 0.3, n_nodes))
        result = minimize(loss, start, method="Nelder-Mead", options=dict(maxiter=4000, xatol=1e-6, fatol=1e-10))
        best = result if best is None or result.fun < best.fun else best
    t = np.sort(1 / (1 + np.exp(-best.x)))
    return t, fit_weights(t, coefficients, integrals)


def errors(t, w, coefficients, integrals) -> tuple[float, float]:
    e = at(coefficients, t) @ w - integrals
    return float(np.sqrt(np.mean(e**2))), float(np.abs(e).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "dipeptides"))
    parser.add_argument("--train", nargs="+", required=True, help="peptides the rule is fitted to")
    parser.add_argument("--test", nargs="+", required=True, help="peptides the rule is scored on")
    parser.add_argument("--samples", type=int, default=4, help="trajectories per peptide")
    parser.add_argument("--nodes", nargs="+", type=int, default=[4, 6, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="npz file that stores (and reuses) the curves")
    args = parser.parse_args(argv)

    dev = pick_device("cpu", threads=args.threads)
    flow = load_model(args.model)
    header(__file__, dev, model=flow.checkpoint_sha256[:12], samples_per_peptide=args.samples,
           threads=args.threads)
    cached = dict(np.load(args.cache)) if args.cache and os.path.exists(args.cache) else {}
    curves = {}
    for name in dict.fromkeys(args.train + args.test):
        key = f"{name}_{args.samples}_{args.seed}"
        if key not in cached:  # the prior draws depend on the peptide's name, not on its place in the lists
            cached[key] = divergence_curves(flow, os.path.join(args.data, f"{name}.pdb"), args.samples,
                                            args.seed + zlib.crc32(name.encode()) % 100000)
            if args.cache:
                np.savez(args.cache, **cached)
        curves[name] = cached[key]
    train = curve_family({n: curves[n] for n in args.train})
    test = curve_family({n: curves[n] for n in args.test})
    grid = np.linspace(0, 1, 200)
    shapes = at(train[0], grid)
    sv = np.linalg.svd(shapes - shapes.mean(0), compute_uv=False)
    print(f"train: {len(train[1])} curves of {len(args.train)} peptides; test: {len(test[1])} curves of "
          f"{len(args.test)} peptides")
    if len(train[1]) > 1 and sv[0] > 0:
        print("singular values of the centred training curves, relative:",
              " ".join(f"{v:.1e}" for v in sv[:12] / sv[0]))
    table = Table([("K", 3, "d"), ("rule", 8), ("train rms", 9, ".3f"), ("train max", 9, ".3f"),
                   ("test rms", 9, ".3f"), ("test max", 9, ".3f")])
    table.header()
    for n_nodes in args.nodes:
        g, gw = gauss_legendre(n_nodes)
        t, w = fit_rule(n_nodes, *train[:2], seed=args.seed)
        for label, (nodes, weights) in (("GL", (g, gw)), ("fitted", (t, w))):
            tr, te = errors(nodes, weights, *train[:2]), errors(nodes, weights, *test[:2])
            table.row(n_nodes, label, tr[0], tr[1], te[0], te[1], tail=f"  {np.array2string(nodes, precision=3)}")
        e = at(test[0], t) @ w - test[1]
        worst = {}
        for name, value in zip(test[2], e):
            worst[name] = max(worst.get(name, 0.0), abs(float(value)))
        print(f"{'':>3} {'':>8} fitted, test max |error| by peptide: "
              + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
