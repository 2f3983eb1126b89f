"""The amino-acid vocabulary of the transferable models, and the error for topologies outside what they serve.

The bottom of the peptide modules: `openmm_tbg.chirality` and `openmm_tbg.encoding` both use these names (and
`encoding` re-exports them), so that neither has to import the other.
"""

from __future__ import annotations

__all__ = ["AMINO_ACIDS", "UnsupportedTopologyError"]

#: The 20 standard amino acids (three-letter codes); the index is the amino-acid token.
AMINO_ACIDS: tuple[str, ...] = (
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
    "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL",
)


class UnsupportedTopologyError(ValueError):
    """The topology (or its coordinates) is not something the transferable flow can handle."""
