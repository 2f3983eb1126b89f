"""The Markdown report of an evaluation (``results.md`` + ``results.json``) and merging separate runs into one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np


def md_convergence_flags(res: dict, rel_sem: float = 0.25) -> list[str]:
    """Reasons to distrust the MD reference of one peptide's result (rare basins with large run spread).

    A basin is flagged when its between-run standard error exceeds ``rel_sem`` of its population, or when some
    runs never visit a basin others do.
    """
    flags = []
    a = res["alpha_l_md"]
    if a["mean"] > 0 and a["n_runs"] > 1 and (a["sem"] > rel_sem * a["mean"] or a["runs_without_visit"] > 0):
        flags.append(f"alpha-L population {100 * a['mean']:.2f} +- {100 * a['sem']:.2f} % with "
                     f"{a['runs_without_visit']}/{a['n_runs']} runs never visiting it")
    elif a["mean"] == 0:
        flags.append(f"alpha-L never visited in {a['n_runs']} run(s) ({res['md_frames']} frames)")
    md = res["md_autocorrelation"]
    if md["n_independent"] < 100:
        flags.append(f"only {md['n_independent']:.0f} independent MD samples (tau_int {md['tau_int_ps']:.0f} ps)")
    return flags


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _pm(d: dict, scale=100.0) -> str:
    if not np.isfinite(d["mean"]):
        return "n/a"
    sem = d["sem"]
    return f"{scale * d['mean']:.1f} ± {scale * sem:.1f}" if np.isfinite(sem) else f"{scale * d['mean']:.1f}"


def _table(results: list[dict], link_dir: Path) -> list[str]:
    """The per-peptide table; figure links relative to ``link_dir``."""
    lines = []
    cols = ["peptide", "atoms", "valid %", "rejected", "ESS %", "Pareto k", "E-W2 raw", "E-W2 rew.", "T-W2 raw",
            "T-W2 rew.", "MD floor", "alpha-L MD %", "alpha-L BG %", "MD tau_int ps", "MD indep.",
            "BG eff. samples/s", "figures"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in results:
        rej = ", ".join(f"{k} {v}" for k, v in r["rejections"].items() if v) or "-"
        figs = " ".join(f"[{k}]({os.path.relpath(v, link_dir)})" for k, v in r.get("figures", {}).items())
        md = r["md_autocorrelation"]
        row = [r["name"], str(r["n_atoms"]), f"{100 * r['valid_fraction']:.1f}", rej, f"{100 * r['ess']:.2f}",
               _fmt(r.get("pareto_k", float("nan")), ".2f"),
               _fmt(r["energy_w2_raw"]), _fmt(r["energy_w2_reweighted"]), _fmt(r["torus_w2_raw"]),
               _fmt(r["torus_w2_reweighted"]), _fmt(r["torus_w2_md_baseline"]), _pm(r["alpha_l_md"]),
               _pm(r["alpha_l_bg"]), f"{md['tau_int_ps']:.0f}", f"{md['n_independent']:.0f}",
               _fmt(r["effective_samples_per_s"], ".3g"), figs or "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _summary(results: list[dict]) -> list[str]:
    """Summary lines over all peptides (ESS, validity, speed, W2)."""
    lines = []
    ess = np.array([r["ess"] for r in results])
    valid = np.array([r["valid_fraction"] for r in results])
    md_indep = [r["md_autocorrelation"]["n_independent"] for r in results]
    md_taus = [r["md_autocorrelation"]["tau_int_ps"] for r in results]
    lines += ["", "## Summary", "",
              f"- Peptides: {len(results)}; samples per peptide: "
              f"{', '.join(sorted({str(r['n_samples']) for r in results}))}.",
              f"- ESS (% of proposals): mean {100 * ess.mean():.2f}, median {100 * np.median(ess):.2f}, "
              f"min {100 * ess.min():.2f} ({results[int(ess.argmin())]['name']}), max {100 * ess.max():.2f} "
              f"({results[int(ess.argmax())]['name']}).",
              f"- Valid samples: mean {100 * valid.mean():.1f} %, min {100 * valid.min():.1f} %.",
              f"- BG effective samples per second (ESS x samples / wall s): median "
              f"{np.median([r['effective_samples_per_s'] for r in results]):.3g}; MD independent samples "
              f"in the reference data: median {np.median(md_indep):.0f} per peptide (tau_int median "
              f"{np.median(md_taus):.0f} ps).",
              ]
    for key, label in (("energy_w2_reweighted", "Energy-W2 reweighted (kT)"),
                       ("torus_w2_reweighted", "Torus-W2 reweighted (rad)")):
        v = np.array([r[key] for r in results], dtype=float)
        if np.isfinite(v).any():
            lines.append(f"- {label}: mean {np.nanmean(v):.3f}, median {np.nanmedian(v):.3f} over "
                         f"{int(np.isfinite(v).sum())} peptide(s) with valid samples.")
    return lines


def _convergence(results: list[dict]) -> list[str]:
    """The section naming peptides whose MD reference is under-converged."""
    lines = []
    flagged = [(r["name"], md_convergence_flags(r)) for r in results]
    flagged = [(n, f) for n, f in flagged if f]
    lines += ["", "## Where the MD reference is under-converged", ""]
    if flagged:
        lines.append("Differences in these observables between BG and MD are not evidence against the BG: "
                     "the MD estimate itself is uncertain.")
        lines.append("")
        for n, f in flagged:
            lines.append(f"- **{n}**: " + "; ".join(f))
    else:
        lines.append("No peptide flagged (alpha-L between-run error below 25 % of its population, >= 100 "
                     "independent MD samples).")
    return lines


def write_results_markdown(results: list[dict], path, *, header: Optional[dict] = None) -> str:
    """Write the evaluation table, figure links and summary to a Markdown file.

    Parameters
    ----------
    results : list of dict
        Outputs of :func:`evaluate_peptide`.
    path : path
        Markdown file; figure links are relative to its directory.
    header : dict, optional
        Key/value lines printed above the table (model, data, command, machine, ...).

    Returns
    -------
    str
        The path written.
    """
    path = Path(path)
    lines = ["# Boltzmann-generator evaluation against MD", ""]
    for k, v in (header or {}).items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "Energies in kT (reduced potentials), angles in radians. ESS is the Kish effective sample size "
              "as a fraction of all proposals (rejected proposals count as weight 0). *Pareto k* is the tail "
              "shape of the importance weights (PSIS diagnostic): above 0.7 the ESS, the reweighted values and "
              "the BG error bars are not reliable, and repeated runs disagree by more than those error bars. "
              "Torus-W2 is over all "
              "backbone phi/psi; *MD floor* is the torus-W2 between MD frames of even and odd runs at the BG's "
              "sample size (what a perfect generator would get, given MD's own convergence). alpha-L = phi > 0 "
              "(%), MD error = "
              "between-run standard error, BG error from the ESS. *MD indep.* = simulated time / (2 tau_int) of "
              "the slowest backbone observable (sin/cos phi/psi).", ""]
    lines += _table(results, path.parent)
    if results:
        lines += _summary(results) + _convergence(results)
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return str(path)


def write_report(results: list[dict], out_dir: Path, header: dict) -> None:
    """``results.md`` (table, figure links, summary) and ``results.json`` in ``out_dir``."""
    write_results_markdown(results, out_dir / "results.md", header=header)
    # Figures are stored relative to out_dir (merge_results reads them so), never as this machine's paths.
    stored = [dict(r, figures={k: os.path.relpath(v, out_dir) for k, v in r.get("figures", {}).items()})
              for r in results]
    with open(out_dir / "results.json", "w") as fh:
        json.dump({"header": header, "results": stored}, fh, indent=1, default=float)


def merge_results(part_dirs: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike] = "docs", *,
                  order: Optional[Sequence[str]] = None, command_line: Optional[str] = None) -> list[dict]:
    """Merge evaluations run separately (one process or machine per peptide) into one report.

    Parameters
    ----------
    part_dirs : sequence of path
        Output directories of :func:`evaluate` (each holds ``results.json`` and ``figures/``).
    out_dir : path
        Where the merged ``results.md``, ``results.json`` and ``figures/`` go; figure links are rewritten.
    order : sequence of str, optional
        Peptide order of the table (e.g. the split's order); others follow alphabetically.
    command_line : str, optional
        Recorded in the header as the merge command.

    Returns
    -------
    list of dict
        The merged per-peptide results.

    Raises
    ------
    FileNotFoundError
        A part directory has no ``results.json``.
    ValueError
        The parts evaluated different models, or one peptide appears twice.
    """
    import shutil

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    results, headers, seen = [], [], {}
    for part in part_dirs:
        path = Path(part) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: pass directories written by `openmm-tbg evaluate --out`.")
        with open(path) as fh:
            payload = json.load(fh)
        headers.append(payload.get("header", {}))
        for r in payload["results"]:
            if r["name"] in seen:
                raise ValueError(f"Peptide {r['name']} is in both {seen[r['name']]} and {part}; merge each once.")
            seen[r["name"]] = str(part)
            figures = {}
            for kind, fig in r.get("figures", {}).items():
                src = Path(fig) if Path(fig).is_absolute() else Path(part) / fig  # relative to the part
                if not src.exists():  # files written before figures were stored relative to their directory
                    src = Path(part) / "figures" / Path(fig).name
                dst = fig_dir / src.name
                if src.resolve() != dst.resolve():
                    shutil.copyfile(src, dst)
                figures[kind] = str(dst)
            r["figures"] = figures
            results.append(r)
    shas = sorted({r.get("model_sha256") for r in results})
    if len(shas) > 1:
        raise ValueError(f"The parts evaluated different models (sha256 {', '.join(str(x)[:12] for x in shas)}); "
                         "merge evaluations of one model only.")
    rank = {name: i for i, name in enumerate(order or [])}
    results.sort(key=lambda r: (rank.get(r["name"], len(rank)), r["name"]))
    header = dict(headers[0]) if headers else {}
    header["data"] = header.get("data", "").split(", peptides")[0].split(", split")[0] + \
        f", {len(results)} peptides: {', '.join(r['name'] for r in results)}"
    header["date"] = ", ".join(sorted({h.get("date", "?")[:10] for h in headers}))
    commands = sorted({h.get("command", "") for h in headers if h.get("command")})
    if commands:
        header["command"] = f"{len(headers)} runs of " + commands[0] + (" (and variants)" if len(commands) > 1 else "")
    if command_line:
        header["merged with"] = f"`{command_line}`"
    write_report(results, out_dir, header)
    return results
