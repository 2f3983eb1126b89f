"""openmm_tbg: transferable Boltzmann generators for OpenMM.

Samples the Boltzmann distribution of small peptides with an equivariant continuous normalizing flow
(Klein and Noe, "Transferable Boltzmann Generators") and plugs into openmmtools as an MCMC move.
"""

import importlib

__version__ = "0.1.0"

# Public API, imported lazily so that `import openmm_tbg` stays cheap (no torch/openmmtools at import).
_PUBLIC = {
    "BoltzmannGeneratorSampler": "openmm_tbg.sampler",
    "SampleResult": "openmm_tbg.sampler",
    "TBGMove": "openmm_tbg.moves",
    "load_model": "openmm_tbg.checkpoint",
    "save_model": "openmm_tbg.checkpoint",
    "build_peptide": "openmm_tbg.peptides",
    "encode_topology": "openmm_tbg.encoding",
    "TransferableFlow": "openmm_tbg.flow",
    # Warnings users may want to filter (warnings.filterwarnings("ignore", category=...)).
    "FewEffectiveSamplesWarning": "openmm_tbg.results",
    "HamiltonianMismatchWarning": "openmm_tbg.results",
    "SampleSizeWarning": "openmm_tbg.results",
    "TemperatureUnitWarning": "openmm_tbg.checks",
    "OutsideSupportWarning": "openmm_tbg.moves",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'openmm_tbg' has no attribute {name!r}")


def __dir__():
    return __all__
