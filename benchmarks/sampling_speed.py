"""Exact-likelihood sampling speed and log q accuracy of both model families, by method and thread count.

One table, one row per (torch threads, dipeptide, model, method). The EGNN CNF (``cnf``) rows draw the same
prior samples (same seed) with each method:

* ``baseline``: TBG's way: dopri5 at atol = rtol = 1e-4, exact divergence by a loop of 3N autograd calls at
  every solver stage;
* ``exact``: the same, with the fastest exact trace for the device (batched backward on CUDA, loop on CPU);
* ``gl-K``: dopri5 at 1e-4 integrates positions only; the exact divergence is evaluated at K Gauss-Legendre
  nodes in t (``TransferableFlow.sample(..., quadrature_nodes=K)``); ``gl-K:TOL`` solves the positions at TOL;
* ``default``: what `BoltzmannGeneratorSampler` and `TBGMove` use (``flow.sampling_options()``: gl-16 at 1e-5).

Their log q error is measured against a tight reference on the same prior draws (dopri5 at 1e-7, exact
divergence at every solver stage). The internal-coordinate flow (``ic``) has one method, ``one-pass``: exact
log q from the same pass that draws the sample; its error columns compare that log q with ``log_prob`` of the
returned positions (the density direction), i.e. they show that nothing is approximated.

Columns: flow samples/s (exact log q included); ``speed-up`` over the first method of the same CNF model (CNF
rows) or over the first CNF row of the same peptide and thread count (IC rows); energy evaluations/s of the
row's samples with `ReducedPotential` (OpenMM CPU platform with as many threads; timed separately); total
samples/s of flow plus energy; mean vector-field evaluations (NFE); RMS and max log q error in kT; process peak
memory. The first line is the machine and date.

Both families side by side on the sampler's default path, 1 and 2 threads (minutes on a 2-core CPU)::

    python benchmarks/sampling_speed.py --peptides AA NY WW --sizes 5x64 --methods default --threads 1 2 \\
        --samples 2 --ic-samples 256 --no-reference

Without ``--ic-model`` the IC rows use an untrained `InternalCoordinateFlow` of the default size (its speed
does not depend on the weights); ``--families cnf`` leaves them out. ``--samples 2 --sizes 5x64 --peptides AA``
with the default CNF methods runs in minutes too.
"""

from __future__ import annotations

import argparse
import resource

import numpy as np
import torch
from _harness import Table, Timer, header, pick_device

from openmm_tbg.checkpoint import load_model
from openmm_tbg.encoding import encode_topology
from openmm_tbg.energy import ReducedPotential
from openmm_tbg.flow import TransferableFlow
from openmm_tbg.nn.egnn import EGNNVectorField
from openmm_tbg.peptides import build_peptide

#: Size of the untrained internal-coordinate flow used without ``--ic-model`` (the shipped training recipe's).
IC_DEFAULT_SIZE = dict(n_rounds=3, hidden=64, n_blocks=1, n_bins=8)


def method_options(name: str, flow: TransferableFlow) -> dict:
    """Keyword arguments of ``TransferableFlow.sample`` for a method name."""
    if name == "reference":
        return dict(method="dopri5", atol=1e-7, rtol=1e-7, divergence="exact")
    if name == "baseline":
        return dict(method="dopri5", atol=1e-4, rtol=1e-4, divergence="exact-loop")
    if name == "exact":
        return dict(method="dopri5", atol=1e-4, rtol=1e-4, divergence="exact")
    if name == "default":
        return flow.sampling_options()
    if name.startswith("gl-"):
        nodes, _, tol = name[3:].partition(":")
        tol = float(tol) if tol else 1e-4
        return dict(method="dopri5", atol=tol, rtol=tol, divergence="exact", quadrature_nodes=int(nodes))
    raise ValueError(f"unknown method {name!r}: use baseline, exact, default, gl-K or gl-K:TOL (e.g. gl-16, "
                     f"gl-16:1e-5)")


def build_cnf(size: str, model_path: str | None, device: torch.device) -> tuple[TransferableFlow, str]:
    """The trained CNF (``model_path``, default the shipped CNF) when its size matches ``size``, else a
    randomly initialised one of that size with the trained model's length scale."""
    layers, hidden = (int(v) for v in size.lower().split("x"))
    # Default: the shipped CNF by its family name (the default shipped model is the internal-coordinate flow).
    trained = load_model(model_path or "egnn-cnf", device=str(device))
    if trained.family != "egnn-cnf":
        raise SystemExit(f"sampling_speed: --model {model_path} is a {trained.family!r} model; pass an egnn-cnf "
                         f"checkpoint (internal-coordinate models go to --ic-model).")
    cfg = trained.vector_field.config
    if (cfg["n_layers"], cfg["hidden"]) == (layers, hidden):
        return trained, "trained"
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's global RNG
        torch.manual_seed(0)
        flow = TransferableFlow(EGNNVectorField(n_layers=layers, hidden=hidden),
                                length_scale=trained.length_scale).to(device)
    return flow, "random init"


def build_ic(model_path: str | None, device: torch.device):
    """The internal-coordinate flow of ``--ic-model``, or an untrained one of the default size."""
    if model_path:
        flow = load_model(model_path, device=str(device))
        if flow.family != "internal-coordinate":
            raise SystemExit(f"sampling_speed: --ic-model {model_path} is a {flow.family!r} model; pass an "
                             f"internal-coordinate checkpoint (openmm-tbg train --family internal-coordinate).")
        return flow, "trained", f"{model_path} ({flow.checkpoint_sha256[:12]})"
    from openmm_tbg.icflow import InternalCoordinateFlow

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = InternalCoordinateFlow(statistics={}, **IC_DEFAULT_SIZE).to(device)
    size = ", ".join(f"{k}={v}" for k, v in IC_DEFAULT_SIZE.items())
    return flow, "untrained", f"untrained InternalCoordinateFlow(statistics={{}}, {size}), seed 0"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # process high-water mark (Linux: KiB)


def run(flow, context, n, options, seed, batch_size, device) -> tuple[np.ndarray, np.ndarray, float, list]:
    """Draw ``n`` samples; returns positions (nm), log q, wall seconds and NFE per batch (CNF only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with Timer(device) as timer:
        x, log_q = flow.sample(context, n, generator=seed, batch_size=batch_size, **options)
    return x.double().numpy(), log_q.numpy(), timer.seconds, flow.last_stats.get("nfe", [])


def energy_rate(potential: ReducedPotential, x: np.ndarray, min_frames: int) -> float:
    """Energy evaluations per second on the samples ``x`` (repeated up to ``min_frames`` frames)."""
    frames = np.concatenate([x] * max(1, -(-min_frames // len(x))))
    with Timer() as timer:
        potential(frames)
    return len(frames) / timer.seconds


def errors(log_q: np.ndarray, reference: np.ndarray | None) -> tuple:
    """RMS and max |log q - reference| over entries finite on both sides, or ``("-", "-")``."""
    if reference is None:
        return "-", "-"
    err = (log_q - reference)[np.isfinite(log_q) & np.isfinite(reference)]
    return (float(np.sqrt(np.mean(err**2))), float(np.max(np.abs(err)))) if err.size else ("-", "-")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="CNF checkpoint (default: the shipped CNF); sizes that differ from "
                                        "it use random weights")
    parser.add_argument("--sizes", nargs="+", default=["5x64", "9x128"], help="CNF sizes, LAYERSxHIDDEN")
    parser.add_argument("--peptides", nargs="+", default=["AA", "NY", "WW"], help="AA 23, NY 38, WW 51 atoms")
    parser.add_argument("--samples", type=int, default=4, help="CNF samples per row")
    parser.add_argument("--batch-size", type=int, default=None, help="CNF batch size (default: all samples)")
    parser.add_argument("--methods", nargs="+", default=["baseline", "exact", "gl-8", "gl-16"], help="CNF methods")
    parser.add_argument("--families", nargs="+", choices=["cnf", "ic"], default=["cnf", "ic"])
    parser.add_argument("--ic-model", default=None, help="internal-coordinate checkpoint (default: an untrained "
                                                         "flow of the default size)")
    parser.add_argument("--ic-samples", type=int, default=256, help="internal-coordinate samples per row")
    parser.add_argument("--ic-batch-size", type=int, default=None, help="default: all samples at once")
    parser.add_argument("--energy-frames", type=int, default=64,
                        help="time the energies on at least this many frames (the row's samples, repeated)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", nargs="+", type=int, default=[1], help="torch (and OpenMM CPU) threads; "
                                                                            "one row group per value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the CNF's tight reference (speed only; its error columns show '-')")
    return parser.parse_args(argv)


def cnf_rows(table: Table, cnfs: dict, encoding, bonds, u: ReducedPotential, args, dev, threads: int,
             seq: str) -> float | None:
    """Print the CNF rows of one peptide and thread count; returns the first row's samples/s."""
    first_rate = None
    for size, (flow, weights) in cnfs.items():
        flow.eval()
        tokens = flow.condition(encoding, bonds)
        ref = None
        if not args.no_reference:
            ref = run(flow, tokens, args.samples, method_options("reference", flow), args.seed, args.batch_size,
                      dev)[1]
        base_rate = None
        for method in args.methods:
            x, log_q, seconds, nfe = run(flow, tokens, args.samples, method_options(method, flow), args.seed,
                                         args.batch_size, dev)
            rate = args.samples / seconds
            base_rate = rate if base_rate is None else base_rate
            first_rate = rate if first_rate is None else first_rate
            e_rate = energy_rate(u, x, args.energy_frames)
            table.row("cnf", size, weights, seq, encoding.n_atoms, threads, method, rate, rate / base_rate, e_rate,
                      1.0 / (1.0 / rate + 1.0 / e_rate), int(np.mean(nfe)), *errors(log_q, ref),
                      peak_memory_mb(dev))
    return first_rate


def ic_row(table: Table, ic: tuple, encoding, bonds, u: ReducedPotential, args, dev, threads: int, seq: str,
           cnf_rate: float | None) -> None:
    """Print the internal-coordinate row of one peptide and thread count (speed-up over ``cnf_rate``)."""
    flow, weights, _ = ic
    flow.eval()
    context = flow.condition(encoding, bonds)
    run(flow, context, min(8, args.ic_samples), {}, args.seed + 1, None, dev)  # warm-up
    x, log_q, seconds, _ = run(flow, context, args.ic_samples, {}, args.seed, args.ic_batch_size, dev)
    rate = args.ic_samples / seconds
    density = flow.log_prob(x, context, batch_size=args.ic_batch_size).numpy()
    e_rate = energy_rate(u, x, args.energy_frames)
    cfg = flow.config
    table.row("ic", f"{cfg['n_rounds']}x{cfg['hidden']}", weights, seq, encoding.n_atoms, threads, "one-pass", rate,
              rate / cnf_rate if cnf_rate else "-", e_rate, 1.0 / (1.0 / rate + 1.0 / e_rate), "-",
              *errors(log_q, density), peak_memory_mb(dev))


def main(argv=None) -> None:
    args = parse_args(argv)
    dev = pick_device(args.device, threads=args.threads[0])
    cnfs = {size: build_cnf(size, args.model, dev) for size in args.sizes} if "cnf" in args.families else {}
    ic = build_ic(args.ic_model, dev) if "ic" in args.families else None
    header(__file__, dev, threads=" ".join(map(str, args.threads)), cnf_samples=args.samples,
           ic_samples=args.ic_samples if ic else "-", ic_model=ic[2] if ic else "-")
    table = Table([("family", 6), ("model", 6), ("weights", 11), ("peptide", 7), ("atoms", 5), ("threads", 7),
                   ("method", 10), ("samples/s", 10, ".4g"), ("speed-up", 8, ".1f"), ("energy/s", 8, ".0f"),
                   ("total/s", 9, ".4g"), ("NFE", 5, "d"), ("rms err", 8, ".2e"), ("max err", 8, ".2e"),
                   ("peak MB", 7, ".0f")])
    table.header()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for seq in args.peptides:
            pep = build_peptide(seq)
            encoding = encode_topology(pep.topology)
            bonds = [(b[0].index, b[1].index) for b in pep.topology.bonds()]
            platform = "CPU" if dev.type == "cpu" else None
            properties = {"Threads": str(threads)} if platform == "CPU" else None
            with ReducedPotential(pep.system, 310.0, platform=platform, platform_properties=properties) as u:
                cnf_rate = cnf_rows(table, cnfs, encoding, bonds, u, args, dev, threads, seq)
                if ic is not None:
                    ic_row(table, ic, encoding, bonds, u, args, dev, threads, seq, cnf_rate)
    print("speed-up: over the first method of the same CNF model (cnf rows), over the first CNF row of the same "
          "peptide and threads (ic rows). err (kT): cnf vs the dopri5-1e-7 reference; ic sample vs log_prob.")


if __name__ == "__main__":
    main()
