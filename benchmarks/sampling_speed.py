"""Exact-likelihood sampling speed and log q accuracy, by method.

For each model size and dipeptide, every method draws the same prior samples (same seed) and returns
positions with log q. The error of log q is measured against a tight reference on the same prior draws:
dopri5 at atol = rtol = 1e-7 with the exact divergence integrated at every solver stage. Methods:

* ``baseline``: TBG's way: dopri5 at atol = rtol = 1e-4, exact divergence by a loop of 3N autograd calls at
  every solver stage;
* ``exact``: the same, with the fastest exact trace for the device (batched backward on CUDA, loop on CPU);
* ``gl-K``: dopri5 at 1e-4 integrates positions only; the exact divergence is evaluated at K Gauss-Legendre
  nodes in t (``TransferableFlow.sample(..., quadrature_nodes=K)``); ``gl-K:TOL`` solves the positions at TOL
  (the sampler's default is ``gl-16:1e-5``).

It prints a table (samples/s, speed-up over the baseline, RMS and max |log q error| in kT, peak memory) and the
machine and date. It scales down: ``--samples 2 --sizes 5x64 --peptides AA`` runs in minutes on a 2-core CPU.

Example::

    python benchmarks/sampling_speed.py --model openmm_tbg/models/tbg_dipeptides.pt --peptides AA NY WW \\
        --samples 4 --methods baseline exact gl-8 gl-16
"""

from __future__ import annotations

import argparse
import resource

import numpy as np
import torch
from _harness import Table, Timer, header, pick_device

from openmm_tbg.checkpoint import load_model
from openmm_tbg.encoding import encode_topology
from openmm_tbg.flow import TransferableFlow
from openmm_tbg.nn.egnn import EGNNVectorField
from openmm_tbg.peptides import build_peptide


def method_options(name: str, device: torch.device) -> dict:
    """Keyword arguments of ``TransferableFlow.sample`` for a method name."""
    if name == "reference":
        return dict(method="dopri5", atol=1e-7, rtol=1e-7, divergence="exact")
    if name == "baseline":
        return dict(method="dopri5", atol=1e-4, rtol=1e-4, divergence="exact-loop")
    if name == "exact":
        return dict(method="dopri5", atol=1e-4, rtol=1e-4, divergence="exact")
    if name.startswith("gl-"):
        nodes, _, tol = name[3:].partition(":")
        tol = float(tol) if tol else 1e-4
        return dict(method="dopri5", atol=tol, rtol=tol, divergence="exact", quadrature_nodes=int(nodes))
    raise ValueError(f"unknown method {name!r}: use baseline, exact, gl-K or gl-K:TOL (e.g. gl-16, gl-16:1e-5)")


def build_flow(size: str, model_path: str | None, device: torch.device) -> tuple[TransferableFlow, str]:
    """The trained model when its size matches ``size``, else a randomly initialised one of that size."""
    layers, hidden = (int(v) for v in size.lower().split("x"))
    trained = load_model(model_path or None, device=str(device))  # None: the shipped model
    cfg = trained.vector_field.config
    if model_path and (cfg["n_layers"], cfg["hidden"]) == (layers, hidden):
        return trained, "trained"
    # Other sizes: random weights, with the trained model's length scale so that the coordinates match.
    torch.manual_seed(0)
    flow = TransferableFlow(EGNNVectorField(n_layers=layers, hidden=hidden),
                            length_scale=trained.length_scale).to(device)
    return flow, "random init"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # process high-water mark (Linux: KiB)


def run(flow, tokens, n, options, seed, batch_size, device) -> tuple[np.ndarray, float, list]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with Timer(device) as timer:
        _, log_q = flow.sample(tokens, n, generator=seed, batch_size=batch_size, **options)
    return log_q.numpy(), timer.seconds, flow.last_stats["nfe"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="trained checkpoint; sizes that differ from it use random weights")
    parser.add_argument("--sizes", nargs="+", default=["5x64", "9x128"])
    parser.add_argument("--peptides", nargs="+", default=["AA", "NY", "WW"], help="AA 23, NY 38, WW 51 atoms")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=["baseline", "exact", "gl-8", "gl-16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the tight reference (speed only; error columns show '-')")
    args = parser.parse_args(argv)

    dev = pick_device(args.device, threads=args.threads)
    header(__file__, dev, threads=args.threads, samples=args.samples)
    table = Table([("model", 6), ("weights", 11), ("peptide", 7), ("atoms", 5), ("method", 10),
                   ("samples/s", 10, ".4f"), ("speed-up", 8, ".1f"), ("NFE", 6, "d"), ("rms err", 8, ".4f"),
                   ("max err", 8, ".4f"), ("peak MB", 8, ".0f")])
    table.header()
    for size in args.sizes:
        flow, weights = build_flow(size, args.model, dev)
        flow.eval()
        for seq in args.peptides:
            tokens = encode_topology(build_peptide(seq).topology).tokens
            n_atoms = tokens.shape[0]
            ref = None
            if not args.no_reference:
                ref, _, _ = run(flow, tokens, args.samples, method_options("reference", dev), args.seed,
                                args.batch_size, dev)
            base_rate = None
            for method in args.methods:
                log_q, seconds, nfe = run(flow, tokens, args.samples, method_options(method, dev), args.seed,
                                          args.batch_size, dev)
                rate = args.samples / seconds
                base_rate = rate if method == "baseline" else base_rate
                speedup = rate / base_rate if base_rate else "-"
                if ref is None:
                    errors = ("-", "-")
                else:
                    err = log_q - ref
                    errors = (float(np.sqrt(np.mean(err**2))), float(np.max(np.abs(err))))
                table.row(size, weights, seq, n_atoms, method, rate, speedup, int(np.mean(nfe)), *errors,
                          peak_memory_mb(dev))


if __name__ == "__main__":
    main()
