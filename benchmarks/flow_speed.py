"""Exact-likelihood flow sampling speed and peak memory by model size and dipeptide size.

The issue-4 table: samples/s with the exact log-likelihood (dopri5, atol = rtol = 1e-4, exact divergence at
every solver stage, TBG's way) for 23/38/51-atom dipeptides (AA, NY, WW) and 5x64 / 9x128 EGNNs, on the CPU
and, when one is available, the GPU. It is `sampling_speed.py` with the reference and the fast methods left
out, and the CNF family only; see that script for the accuracy of the faster paths and for the
internal-coordinate flow.

    python benchmarks/flow_speed.py --model openmm_tbg/models/tbg_dipeptides.pt --samples 4
"""

import sys

from sampling_speed import main  # a preset of that script (its directory is on sys.path when run)

if __name__ == "__main__":
    main(["--methods", "exact", "--no-reference", "--families", "cnf", *sys.argv[1:]])
