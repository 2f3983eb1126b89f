"""Shared code of the benchmark scripts: device, machine line, a CUDA-synchronised timer, table printers, and
the measurements that several benchmarks make (divergence along flow trajectories, MD speed).

The scripts import it as ``import _harness`` / ``from _harness import ...``: Python puts a script's own
directory first on ``sys.path``, so ``python benchmarks/<script>.py`` finds it from any working directory.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from openmm_tbg.utils import device_name, machine_line, resolve_device

__all__ = ["pick_device", "machine_line", "header", "sync", "Timer", "best_time", "Table", "markdown_table",
           "divergence_along", "molecule", "measure_md"]


# ----------------------------------------------------------------------------------------------------- machine
def pick_device(name: str = "auto", threads: int | None = None) -> torch.device:
    """The torch device of a ``--device`` option (``auto``: CUDA when available), setting torch's CPU threads."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    return resolve_device(name)


def header(script: str, dev: torch.device | None = None, **fields: Any) -> str:
    """Print and return the first line of a benchmark's output: script, machine line (CPU model, cores, GPU,
    torch and openmm versions, ISO date), the device used, and ``key=value`` settings."""
    parts = [f"# {os.path.basename(script)}", machine_line()]
    if dev is not None:
        parts.append(f"device={dev} ({device_name(dev)})")
    parts += [f"{k}={v}" for k, v in fields.items()]
    line = "  ".join(parts)
    print(line, flush=True)
    return line


# ----------------------------------------------------------------------------------------------------- timing
def sync(dev: torch.device | str | None) -> None:
    """Wait for the queued CUDA work of ``dev`` (no-op on the CPU), so that wall times are complete."""
    if dev is not None and torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


class Timer:
    """Wall time of a block in seconds, with CUDA synchronised at the start and the end.

    ``with Timer(dev) as t: work()`` then ``t.seconds``; ``t.cpu_seconds`` is the process CPU time.
    """

    def __init__(self, dev: torch.device | str | None = None):
        self.dev = dev
        self.seconds = float("nan")
        self.cpu_seconds = float("nan")

    def __enter__(self) -> "Timer":
        sync(self.dev)
        self._cpu, self._start = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.dev)
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu


def best_time(fn: Callable[[], Any], dev: torch.device | str | None = None, repeats: int = 1,
              warmups: int = 0) -> tuple[float, Any]:
    """Fastest wall time (s) of ``repeats`` timed calls of ``fn`` after ``warmups`` untimed ones, and the
    last call's result."""
    result = None
    for _ in range(warmups):
        result = fn()
    best = float("inf")
    for _ in range(repeats):
        with Timer(dev) as t:
            result = fn()
        best = min(best, t.seconds)
    return best, result


# ----------------------------------------------------------------------------------------------------- tables
class Table:
    """A fixed-width text table printed row by row.

    ``Table([("peptide", 7), ("rms err", 8, ".4f")])``: each column has a title, a width and an optional
    format for numbers; strings (e.g. ``"-"``) are printed as they are. Cells are right-aligned.
    """

    def __init__(self, columns: Sequence[tuple]):
        self.columns = [(c[0], int(c[1]), c[2] if len(c) > 2 else "") for c in columns]

    def header(self, tail: str = "") -> str:
        """Print and return the title line (``tail`` is appended after the last title)."""
        line = " ".join(f"{title:>{width}}" for title, width, _ in self.columns) + tail
        print(line, flush=True)
        return line

    def row(self, *values: Any, tail: str = "") -> str:
        """Print and return one row (``tail`` is appended after the last column)."""
        if len(values) != len(self.columns):
            raise ValueError(f"Table.row got {len(values)} values for {len(self.columns)} columns.")
        cells = [f"{v:>{w}}" if isinstance(v, str) else f"{v:>{w}{fmt}}" for v, (_, w, fmt) in
                 zip(values, self.columns)]
        line = " ".join(cells) + tail
        print(line, flush=True)
        return line


def markdown_table(titles: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print and return a Markdown table (cells are printed with ``str``)."""
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ----------------------------------------------------------------------------------------------------- flows
def divergence_along(flow, tokens: torch.Tensor, x0: torch.Tensor, nodes: np.ndarray, tol: float, norm=None,
                     chunk: int = 8, t_end: float | None = None) -> tuple[np.ndarray, torch.Tensor, int]:
    """Exact divergence along the flow's trajectories, for the quadrature benchmarks.

    Positions go from t = 0 through the increasing times ``nodes`` (and ``t_end`` if given) by dopri5 at
    atol = rtol = ``tol`` (with torchdiffeq error ``norm`` if given); the divergence at ``chunk`` nodes at a time
    is one stacked batch. Returns the (K, B) float64 divergences (1/unit time, i.e. kT of log q per unit t),
    the positions at the last time and the number of position-only function evaluations.
    """
    times = np.r_[0.0, nodes, [] if t_end is None else [t_end]]
    xs, nfe = flow.integrate_positions(x0, tokens, times, method="dopri5", atol=tol, rtol=tol, norm=norm)
    node_times = torch.as_tensor(times[1:1 + len(nodes)], dtype=x0.dtype, device=x0.device)
    batch, n_atoms = x0.shape[:2]
    values = np.zeros((len(nodes), batch))
    for start in range(0, len(nodes), chunk):
        k = min(chunk, len(nodes) - start)
        t = node_times[start:start + k].repeat_interleave(batch)
        x = xs[1 + start:1 + start + k].reshape(k * batch, n_atoms, 3)
        values[start:start + k] = flow.divergence(t, x, tokens)[1].double().cpu().numpy().reshape(k, batch)
    return values, xs[-1], nfe


# ----------------------------------------------------------------------------------------------------- MD
#: The data set's MD settings: time step (fs), temperature (K), Langevin friction (1/ps).
TIMESTEP_FS, TEMPERATURE_K, FRICTION_PER_PS = 1.0, 310.0, 0.3


def molecule(sequence: str, data_dir: str | None):
    """(topology, positions in nm) of a dipeptide: the data set's PDB when available, else built."""
    from openmm_tbg.peptides import build_peptide
    from openmm_tbg.utils import to_nm

    if data_dir and os.path.exists(os.path.join(data_dir, f"{sequence}.pdb")):
        from openmm.app import PDBFile

        pdb = PDBFile(os.path.join(data_dir, f"{sequence}.pdb"))
        return pdb.topology, to_nm(pdb.positions)
    pep = build_peptide(sequence)
    return pep.topology, to_nm(pep.positions)


def measure_md(topology, positions_nm: np.ndarray, copies: int, steps: int, warmup: int, threads: int | None,
               platform_name: str = "CPU", seed: int = 0) -> dict:
    """Time ``steps`` MD steps of ``copies`` copies of a molecule in one System (after minimization + warmup).

    Returns
    -------
    dict
        ``copies``, ``atoms``, ``wall_s``, ``cpu_s`` (process CPU time, all threads), ``ns_per_day`` (per
        molecule), ``ns_per_day_total``, ``ps_per_cpu_s_total`` (summed over molecules).
    """
    import openmm
    from openmm import unit

    from openmm_tbg.data import build_separated_system
    from openmm_tbg.peptides import create_system
    from openmm_tbg.utils import select_platform

    if copies == 1:
        system, positions = create_system(topology), positions_nm
    else:
        system, _, positions, _ = build_separated_system([topology] * copies, [positions_nm] * copies)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE_K * unit.kelvin, FRICTION_PER_PS / unit.picosecond,
                                                 TIMESTEP_FS * unit.femtosecond)
    integrator.setRandomNumberSeed(seed + 1)
    props = {"Threads": str(threads)} if (threads and platform_name == "CPU") else {}
    context = openmm.Context(system, integrator, select_platform(platform_name), props)
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(TEMPERATURE_K * unit.kelvin, seed + 2)
    integrator.step(warmup)
    context.getState(getEnergy=True)
    with Timer() as t:
        integrator.step(steps)
        context.getState(getEnergy=True)  # the GPU platforms run asynchronously: wait for the steps
    ps = steps * TIMESTEP_FS * 1e-3
    return {"copies": copies, "atoms": system.getNumParticles(), "threads": threads, "steps": steps,
            "wall_s": t.seconds, "cpu_s": t.cpu_seconds, "ns_per_day": ps * 1e-3 / t.seconds * 86400.0,
            "ns_per_day_total": copies * ps * 1e-3 / t.seconds * 86400.0,
            "ps_per_cpu_s_total": copies * ps / t.cpu_seconds}
