"""Two or more `openmm-tbg evaluate` reports side by side, against the targets of the energy-training issue.

Reads each ``results.json`` (written by ``openmm-tbg evaluate --out DIR``) and prints one markdown table: per
model the mean, median and minimum Kish ESS, the mean and minimum valid fraction (GP's named: its proline ring
closure is the hardest case), and on how many peptides where MD puts alpha-L at >= 1 % the reweighted BG
population lies within two standard errors of MD (combined error: MD's between-run error and the BG's from its
ESS) and how many of those have a BG error below half the MD population (so that "within 2 SE" is not vacuous).
Then one row per peptide with the ESS of every model. Nothing is sampled here; the figures are those of the
reports, whose header names the machine and date.

    python benchmarks/compare_evaluations.py docs/ic/results.json docs/ic_energy/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np


def load(path: str) -> tuple[str, dict, dict]:
    with open(path) as fh:
        report = json.load(fh)
    label = os.path.basename(str(report["header"].get("model", path)).split(" ")[0])
    return label, report["header"], {r["name"]: r for r in report["results"]}


def alpha_l_agreement(rows: dict) -> tuple[int, int, int]:
    """(peptides with MD alpha-L >= 1 %, of them within 2 combined SE, of them also with BG SE < MD / 2)."""
    n = within = informative = 0
    for r in rows.values():
        md, bg = r["alpha_l_md"], r["alpha_l_bg"]
        if md["mean"] < 0.01:
            continue
        n += 1
        se = math.hypot(md["sem"], bg["sem"])
        if abs(bg["mean"] - md["mean"]) <= 2 * se:
            within += 1
            informative += bg["sem"] < md["mean"] / 2
    return n, within, informative


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="results.json files of openmm-tbg evaluate")
    args = parser.parse_args(argv)
    models = [load(p) for p in args.reports]
    names = sorted(set.intersection(*(set(rows) for _, _, rows in models)))
    for label, header, _ in models:
        print(f"# {label}: {header.get('machine', '?')}; {header.get('samples per peptide', '?')} proposals; "
              f"{header.get('command', '')}")
    print(f"\n{len(names)} peptides in common.\n")
    print("| model | ESS mean % | ESS median % | ESS min % | valid mean % | valid min % | GP valid % | "
          "alpha-L within 2 SE (MD >= 1 %) | of them with BG SE < MD/2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, _, rows in models:
        ess = np.array([rows[n]["ess"] for n in names]) * 100
        valid = np.array([rows[n]["valid_fraction"] for n in names]) * 100
        gp = f"{rows['GP']['valid_fraction'] * 100:.1f}" if "GP" in names else "-"
        n, within, informative = alpha_l_agreement({k: rows[k] for k in names})
        print(f"| {label} | {ess.mean():.2f} | {np.median(ess):.2f} | {ess.min():.2f} | {valid.mean():.1f} | "
              f"{valid.min():.1f} | {gp} | {within} of {n} | {informative} |")
    print("\n| peptide | " + " | ".join(f"{label} ESS % (alpha-L BG % vs MD %)" for label, _, _ in models) + " |")
    print("|---|" + "---|" * len(models))
    for name in names:
        cells = []
        for _, _, rows in models:
            r = rows[name]
            cells.append(f"{r['ess'] * 100:.2f} ({r['alpha_l_bg']['mean'] * 100:.1f} +- "
                         f"{r['alpha_l_bg']['sem'] * 100:.1f} vs {r['alpha_l_md']['mean'] * 100:.1f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
