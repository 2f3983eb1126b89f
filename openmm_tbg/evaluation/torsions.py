"""Re-export of `openmm_tbg.torsions`, where the backbone torsions live (so that `openmm_tbg.figures` needs no
import of the evaluation package, which imports it)."""

from ..torsions import backbone_torsions, ramachandran_pairs, torsion_features

__all__ = ["backbone_torsions", "ramachandran_pairs", "torsion_features"]
