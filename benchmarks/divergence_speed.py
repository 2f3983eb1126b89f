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

import torch
from _harness import Table, best_time, header, pick_device

from openmm_tbg.checkpoint import load_model
from openmm_tbg.encoding import encode_topology
from openmm_tbg.flow import divergence_exact_batched, divergence_exact_loop
from openmm_tbg.peptides import build_peptide


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

    dev = pick_device(args.device, threads=args.threads)
    flow = load_model(args.model, device=str(dev))
    cfg = flow.vector_field.config
    header(__file__, dev, threads=args.threads,
           model=f"{cfg['n_layers']}x{cfg['hidden']}({flow.checkpoint_sha256[:12]})")
    table = Table([("peptide", 7), ("atoms", 5), ("batch", 5), ("method", 11), ("seconds", 9, ".4f"),
                   ("per sample", 10, ".4f"), ("forwards", 8, ".2f"), ("max diff", 8, ".1e")])
    table.header()
    for seq in args.peptides:
        tokens = flow.condition(encode_topology(build_peptide(seq).topology))
        n_atoms = tokens.shape[0]
        for batch in args.batch_sizes:
            x = flow.sample_prior(batch, n_atoms, generator=torch.Generator().manual_seed(0)).to(dev) * 0.5
            t = torch.full((batch,), 0.7, device=dev)
            with torch.no_grad():
                forward, _ = best_time(lambda: flow.vector_field(t, x, tokens), dev, args.repeats)
            eager = flow.vector_field
            methods = {"loop": (eager, divergence_exact_loop)}
            for chunk in args.chunks:
                size = 3 * n_atoms if chunk == "all" else int(chunk)
                methods[f"batched-{chunk}"] = (
                    eager, (lambda size: lambda v, xx: divergence_exact_batched(v, xx, size))(size))
            if args.compile:
                compiled = torch.compile(eager, dynamic=False)
                with torch.no_grad():  # compile (and warm up) the forward-only graph
                    best, _ = best_time(lambda: compiled(t, x, tokens), dev, args.repeats, warmups=1)
                table.row(seq, n_atoms, batch, "forward+compile", best, best / batch, best / forward, "-")
                methods["loop+compile"] = (compiled, divergence_exact_loop)
            reference = None
            for method, (vector_field, fn) in methods.items():
                def divergence(vector_field=vector_field, fn=fn):
                    xx = x.clone().requires_grad_(True)
                    with torch.enable_grad():
                        return fn(vector_field(t, xx, tokens), xx)

                warmups = 1 if vector_field is not eager else 0
                best, div = best_time(divergence, dev, args.repeats, warmups=warmups)
                reference = div if reference is None else reference
                table.row(seq, n_atoms, batch, method, best, best / batch, f"{best / forward:8.0f}",
                          float((div - reference).abs().max()))


if __name__ == "__main__":
    main()
