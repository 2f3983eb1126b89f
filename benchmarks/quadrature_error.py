"""Error of quadrature rules for int_0^1 div v(x(t), t) dt, the costly part of an exact log-likelihood.

Each rule evaluates the exact divergence at K times on the same trajectories (positions from dopri5 at
1e-7, so that only the quadrature differs); the reference is 48-node Gauss-Legendre. Rules:

* ``gl``: Gauss-Legendre on [0, 1] (what ``quadrature_nodes=K`` uses);
* ``split:c:k``: composite, k Gauss-Legendre nodes on [0, c] and K-k on [c, 1];
* ``log:eps``: Gauss-Legendre in s with t = (1 - eps^s) / (1 - eps) (nodes crowd towards t = 1, where the
  flow contracts);
* ``pow:p``: Gauss-Legendre in s with t = 1 - (1 - s)^p.

The errors are in kT (log q units). The accuracy bar of the project is an RMS error <= 0.1 kT.

For ``gl`` rules the ``tail`` column tests a free per-sample error estimate: the RMS over samples of the
largest of the last two Legendre coefficients of the K-node interpolant of the divergence. It would be usable
if it tracked the error; it does not (see docs/performance.md).

    python benchmarks/quadrature_error.py --peptides AA --samples 6 --nodes 6 8 12 16
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _harness import Table, divergence_along, header, pick_device

from openmm_tbg.checkpoint import load_model
from openmm_tbg.encoding import encode_topology
from openmm_tbg.flow import gauss_legendre
from openmm_tbg.peptides import build_peptide


def rule(name: str, n_nodes: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Nodes and weights on [0, 1] of a named rule with ``n_nodes`` nodes (None if it does not apply)."""
    s, w = gauss_legendre(n_nodes)
    kind, *params = name.split(":")
    if kind == "gl":
        return s, w
    if kind == "log":
        eps = float(params[0])
        return (1 - eps**s) / (1 - eps), w * -np.log(eps) * eps**s / (1 - eps)
    if kind == "pow":
        p = float(params[0])
        return 1 - (1 - s) ** p, w * p * (1 - s) ** (p - 1)
    if kind == "split":
        c, k = float(params[0]), int(params[1])
        if not 0 < k < n_nodes:
            return None
        a, wa = gauss_legendre(k)
        b, wb = gauss_legendre(n_nodes - k)
        return np.r_[c * a, c + (1 - c) * b], np.r_[c * wa, (1 - c) * wb]
    raise ValueError(f"unknown rule {name!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--peptides", nargs="+", default=["AA"])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--nodes", nargs="+", type=int, default=[6, 8, 12, 16])
    parser.add_argument("--rules", nargs="+", default=["gl", "split:0.5:2", "split:0.6:2", "log:0.01", "pow:1.5"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dev = pick_device("cpu", threads=args.threads)
    flow = load_model(args.model)
    cfg = flow.vector_field.config
    header(__file__, dev, model=f"{cfg['n_layers']}x{cfg['hidden']}({flow.checkpoint_sha256[:12]})",
           samples=args.samples, threads=args.threads)
    table = Table([("peptide", 7), ("rule", 12), ("K", 3, "d"), ("rms err", 8, ".4f"), ("max err", 8, ".4f"),
                   ("tail", 8, ".3g")])
    table.header()
    for seq in args.peptides:
        tokens = flow.condition(encode_topology(build_peptide(seq).topology))
        x0 = flow.sample_prior(args.samples, tokens.shape[0], generator=torch.Generator().manual_seed(args.seed))
        def integral(nodes: np.ndarray, weights: np.ndarray, with_tail: bool = False):
            order = np.argsort(nodes)
            values = np.zeros((len(nodes), args.samples))
            values[order] = divergence_along(flow, tokens, x0, nodes[order], 1e-7, chunk=1)[0]
            if not with_tail:
                return weights @ values
            # Legendre coefficients of the interpolant through the K nodes (nodes on [0, 1] -> [-1, 1]).
            coefficients = np.linalg.solve(np.polynomial.legendre.legvander(2 * nodes - 1, len(nodes) - 1), values)
            return weights @ values, np.abs(coefficients[-2:]).max(0)

        reference = integral(*rule("gl", 48))
        for name in args.rules:
            for n_nodes in args.nodes:
                nodes_weights = rule(name, n_nodes)
                if nodes_weights is None:
                    continue
                if name == "gl":
                    value, tail = integral(*nodes_weights, with_tail=True)
                    tail = float(np.sqrt(np.mean(tail**2)))
                else:
                    value, tail = integral(*nodes_weights), "-"
                err = value - reference
                table.row(seq, name, n_nodes, float(np.sqrt(np.mean(err**2))), float(np.abs(err).max()), tail)


if __name__ == "__main__":
    main()
