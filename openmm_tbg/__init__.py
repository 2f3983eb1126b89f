"""openmm_tbg: transferable Boltzmann generators for OpenMM.

Samples the Boltzmann distribution of small peptides with one trained flow that serves peptides it never saw
(Klein and Noe, "Transferable Boltzmann Generators"), with exact importance weights, and plugs into openmmtools
as an MCMC move (`TBGMove`). Two model families sit behind one interface (`openmm_tbg.model.Flow`):

- ``"internal-coordinate"`` (`InternalCoordinateFlow`, the default and the shipped model): a coupling flow over
  bond lengths, angles and dihedrals; exact log q in one pass; options `ICOptions` (none).
- ``"egnn-cnf"`` (`TransferableFlow`): TBG's E(3)-equivariant continuous normalizing flow; exact log q by an
  ODE solve, about four orders of magnitude slower on a CPU; options `ODEOptions`.

Start with ``BoltzmannGeneratorSampler(system, topology).sample(1000)``; ``sampler.refine()`` adapts the
model to one System with its energies and forces.
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
    "InternalCoordinateFlow": "openmm_tbg.icflow",
    # Sampling options, one class per family (`options=` of BoltzmannGeneratorSampler and TBGMove).
    "ODEOptions": "openmm_tbg.flow",
    "ICOptions": "openmm_tbg.icflow",
    "RefinementOptions": "openmm_tbg.refinement",
    # Warnings users may want to filter (warnings.filterwarnings("ignore", category=...)).
    "FewEffectiveSamplesWarning": "openmm_tbg.results",
    "UnreliableWeightsWarning": "openmm_tbg.results",
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
