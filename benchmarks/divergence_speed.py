"""Cost of one exact divergence (trace of the EGNN Jacobian), by implementation and batch size.

Prints, for each dipeptide and batch size, the wall time of one vector-field forward pass and of one exact
divergence (forward + 3N backward passes), in units of forward passes, for:

* ``loop``: one ``torch.autograd.grad`` per coordinate (3N calls; what the CPU uses);
* ``batched-K``: ``is_grads_batched`` over chunks of K unit vectors (what CUDA uses; ``batched-all`` = one
  chunk of all 3N);
* ``loop+compile`` (with ``--compile``): the loop through ``torch.compile(vector_field)``. Compilation and
  the first call are excluded from the timing; the *forwards* column still divides by the eager forward pass,
  and a separate ``forward+compile`` row gives the compiled forward pass alone.

All implementations must agree to float32 round-off; the table shows the largest difference from ``loop``.
A divergence costing ~N forward passes or more is why exact likelihoods are expensive, and why the quadrature
path (``quadrature_nodes``) evaluates it at a few times only.

    python benchmarks/divergence_speed.py --peptides AA NY --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from openmm_tbg.checkpoint import load_model
from openmm_tbg.encoding import encode_topology
from openmm_tbg.flow import divergence_exact_batched, divergence_exact_loop
from openmm_tbg.peptides import build_peptide


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--peptides", nargs="+", default=["AA", "NY"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--chunks", nargs="+", default=["8", "all"], help="is_grads_batched chunk sizes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the fastest is reported")
    parser.add_argument("--compile", action="store_true", help="also time the loop through torch.compile")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    flow = load_model(args.model, device=str(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    cfg = flow.vector_field.config
    print(f"# divergence_speed.py  {datetime.date.today()}  device={device} ({name})  threads={args.threads}  "
          f"torch {torch.__version__}  model {cfg['n_layers']}x{cfg['hidden']} ({flow.checkpoint_sha256[:12]})")
    print(f"{'peptide':>7} {'atoms':>5} {'batch':>5} {'method':>11} {'seconds':>9} {'per sample':>10} "
          f"{'forwards':>8} {'max diff':>8}")
    for seq in args.peptides:
        tokens = flow._as_tokens(encode_topology(build_peptide(seq).topology))
        n_atoms = tokens.shape[0]
        for batch in args.batch_sizes:
            x = flow.sample_prior(batch, n_atoms, generator=torch.Generator().manual_seed(0)).to(device) * 0.5
            t = torch.full((batch,), 0.7, device=device)
            forward = float("inf")
            for _ in range(args.repeats):
                with torch.no_grad():
                    _sync(device)
                    start = time.perf_counter()
                    flow.vector_field(t, x, tokens)
                    _sync(device)
                    forward = min(forward, time.perf_counter() - start)
            eager = flow.vector_field
            methods = {"loop": (eager, divergence_exact_loop)}
            for chunk in args.chunks:
                size = 3 * n_atoms if chunk == "all" else int(chunk)
                methods[f"batched-{chunk}"] = (
                    eager, (lambda size: lambda v, xx: divergence_exact_batched(v, xx, size))(size))
            if args.compile:
                compiled = torch.compile(eager, dynamic=False)
                with torch.no_grad():  # compile (and warm up) the forward-only graph
                    compiled(t, x, tokens)
                    best = float("inf")
                    for _ in range(args.repeats):
                        _sync(device)
                        start = time.perf_counter()
                        compiled(t, x, tokens)
                        _sync(device)
                        best = min(best, time.perf_counter() - start)
                print(f"{seq:>7} {n_atoms:>5} {batch:>5} {'forward+compile':>11} {best:9.4f} {best / batch:10.4f} "
                      f"{best / forward:8.2f} {'-':>8}", flush=True)
                methods["loop+compile"] = (compiled, divergence_exact_loop)
            reference = None
            for method, (vector_field, fn) in methods.items():
                best, div = float("inf"), None
                warmups = 1 if vector_field is not eager else 0
                for repeat in range(warmups + args.repeats):
                    xx = x.clone().requires_grad_(True)
                    with torch.enable_grad():
                        _sync(device)
                        start = time.perf_counter()
                        div = fn(vector_field(t, xx, tokens), xx)
                        _sync(device)
                        if repeat >= warmups:
                            best = min(best, time.perf_counter() - start)
                reference = div if reference is None else reference
                diff = float((div - reference).abs().max())
                print(f"{seq:>7} {n_atoms:>5} {batch:>5} {method:>11} {best:9.4f} {best / batch:10.4f} "
                      f"{best / forward:8.0f} {diff:8.1e}", flush=True)


if __name__ == "__main__":
    main()
