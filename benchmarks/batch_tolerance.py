"""Does the batch size change the per-sample accuracy of the quadrature path's dopri5 solve?

torchdiffeq's adaptive solvers control the RMS of the error over the whole state tensor. With B samples in one
batch, one sample's local error counts only 1/sqrt(B) in that norm, so hard samples could be integrated less
accurately in large batches. This script integrates the same prior draws with ``quadrature_nodes=K`` at dopri5
1e-4 (TBG's tolerance, and the sampler's default before it moved to 1e-5; ``--tols`` sets others) in one batch,
one sample at a time, and in one batch with a per-sample norm (the largest per-sample RMS), and compares log q
and the final positions with a tight reference (per-sample norm at 1e-7, 48 Gauss-Legendre nodes).

    python benchmarks/batch_tolerance.py --peptide AA --samples 32 --tols 1e-4 1e-5 1e-6
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


def per_sample_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Largest per-sample RMS of a (B, N, 3) scaled error."""
    return tensor.reshape(tensor.shape[0], -1).pow(2).mean(1).sqrt().max()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--peptide", default="AA")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--tols", nargs="+", type=float, default=[1e-4],
                        help="dopri5 atol = rtol of the position solve (TBG: 1e-4; the sampler's default: 1e-5)")
    parser.add_argument("--no-singles", action="store_true", help="skip the one-sample-at-a-time solves")
    args = parser.parse_args(argv)

    dev = pick_device("cpu", threads=args.threads)
    flow = load_model(args.model)
    tokens = flow.condition(encode_topology(build_peptide(args.peptide).topology))
    n_atoms = tokens.shape[0]
    z = flow.sample_prior(args.samples, n_atoms, generator=torch.Generator().manual_seed(args.seed))

    def integral(x0, n_nodes, tol, norm=None):
        nodes, weights = gauss_legendre(n_nodes)
        values, x_end, nfe = divergence_along(flow, tokens, x0, nodes, tol, norm, t_end=1.0)
        return weights @ values, x_end, nfe

    header(__file__, dev, model=flow.checkpoint_sha256[:12], peptide=args.peptide, samples=args.samples,
           rule=f"gl-{args.nodes}", threads=args.threads)
    reference, x_reference, _ = integral(z, 48, 1e-7, per_sample_norm)
    table = Table([("solve", 32), ("rms err", 8, ".4f"), ("max err", 8, ".4f"), ("x dev median", 12, ".5f"),
                   ("x dev max", 10, ".5f"), ("NFE", 5)])
    table.header()

    def report(label, value, x, nfe):
        err = value - reference  # log q error in kT (the integral enters log q with unit weight)
        dev_nm = ((x - x_reference).norm(dim=-1).max(-1).values * flow.length_scale).numpy()  # nm, worst atom
        table.row(label, float(np.sqrt(np.mean(err**2))), float(np.abs(err).max()), float(np.median(dev_nm)),
                  float(dev_nm.max()), str(nfe))

    for tol in args.tols:
        report(f"tol {tol:g}, one batch of {args.samples}", *integral(z, args.nodes, tol))
        report(f"tol {tol:g}, per-sample norm", *integral(z, args.nodes, tol, per_sample_norm))
        if not args.no_singles:
            singles = [integral(z[i:i + 1], args.nodes, tol) for i in range(args.samples)]
            report(f"tol {tol:g}, one at a time", np.concatenate([s[0] for s in singles]),
                   torch.cat([s[1] for s in singles]), f"{np.mean([s[2] for s in singles]):.0f}")


if __name__ == "__main__":
    main()
