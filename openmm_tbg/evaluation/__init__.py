"""Evaluation of a Boltzmann generator against MD: ESS, energy-W2, torus-W2, basin populations, plots.

Metric functions are pure and work on unitless numpy arrays:

- energies are reduced potentials ``u = U / kT`` (kT units, as TBG reports energy-W2);
- angles are radians; torsions come from mdtraj;
- times are in the unit of the ``dt`` you pass (ps for the data set).

Conventions for MD autocorrelation: the *statistical inefficiency* ``g = 1 + 2 sum_{k>=1} rho_k`` (frames),
the *integrated autocorrelation time* ``tau_int = g dt / 2`` (Sokal's convention), and the number of
independent MD samples ``T / (2 tau_int) = n_frames / g``. For an AR(1) process with lag-1 correlation
``rho``, ``g = (1 + rho) / (1 - rho)``.

The pipeline (:func:`evaluate_peptide`, :func:`evaluate`, ``openmm-tbg evaluate``) draws importance-weighted
samples with :class:`openmm_tbg.sampler.BoltzmannGeneratorSampler` on the data set's Hamiltonian and compares
them with the MD frames of the data set; :func:`evaluate` writes ``results.md`` with a table and figures.

Modules: :mod:`.metrics` (ESS, W2 distances, basin populations), :mod:`.autocorrelation`, :mod:`.torsions`,
:mod:`.plots`, :mod:`.pipeline` (per peptide: sample, MD reference, metrics, figures; and over a split),
:mod:`.report` (``results.md``, merging) and :mod:`.cli`.
"""


from .autocorrelation import (backbone_observables, integrated_autocorrelation_time, md_independent_samples,
                              statistical_inefficiency)
from .cli import configure_parser, run_from_cli
from .metrics import (TORUS_W2_MAX_SAMPLES, TWO_PI, alpha_l_indicator, energy_w2, kish_ess, md_population,
                      torus_distance, torus_w2, weighted_population)
from .pipeline import (PeptideSamples, evaluate, evaluate_peptide, md_reference, peptide_figures, peptide_metrics,
                       sample_peptide)
from .plots import plot_energy_histogram, plot_ramachandran
from .report import md_convergence_flags, merge_results, write_report, write_results_markdown
from ..torsions import backbone_torsions, ramachandran_pairs, torsion_features

__all__ = [
    "kish_ess", "energy_w2", "torus_w2", "torus_distance", "backbone_torsions", "ramachandran_pairs",
    "statistical_inefficiency", "integrated_autocorrelation_time", "md_independent_samples",
    "md_population", "weighted_population", "plot_ramachandran", "plot_energy_histogram",
    "evaluate_peptide", "evaluate", "write_results_markdown", "configure_parser", "run_from_cli",
]
