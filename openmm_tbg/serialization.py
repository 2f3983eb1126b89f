"""(De)serialisation of Topologies and atom encodings as JSON/YAML-safe dicts (sample files, `TBGMove` state)."""

from __future__ import annotations

import numpy as np

__all__ = ["topology_to_dict", "topology_from_dict", "encoding_to_dict", "encoding_from_dict"]

_ENCODING_ARRAYS = ("residue_index", "amino_acid", "atom_class")
_ENCODING_TUPLES = ("atom_names", "residue_names", "elements")


def topology_to_dict(topology) -> dict:
    atoms, residues = [], []
    for res in topology.residues():
        residues.append({"name": res.name, "id": res.id, "chain": res.chain.id})
    for atom in topology.atoms():
        atoms.append({"name": atom.name, "element": atom.element.symbol if atom.element is not None else None,
                      "residue": atom.residue.index})
    bonds = [[b[0].index, b[1].index] for b in topology.bonds()]
    return {"residues": residues, "atoms": atoms, "bonds": bonds}


def topology_from_dict(d: dict):
    from openmm.app import Element, Topology

    top = Topology()
    chains, residues, atoms = {}, [], []
    for r in d["residues"]:
        if r["chain"] not in chains:
            chains[r["chain"]] = top.addChain(r["chain"])
        residues.append(top.addResidue(r["name"], chains[r["chain"]], r["id"]))
    for a in d["atoms"]:
        element = Element.getBySymbol(a["element"]) if a["element"] else None
        atoms.append(top.addAtom(a["name"], element, residues[a["residue"]]))
    for i, j in d["bonds"]:
        top.addBond(atoms[i], atoms[j])
    return top


def encoding_to_dict(encoding) -> dict:
    """An `AtomEncoding` as a dict of lists (YAML/JSON-safe)."""
    out = {k: np.asarray(getattr(encoding, k)).astype(int).tolist() for k in _ENCODING_ARRAYS}
    out.update({k: list(getattr(encoding, k)) for k in _ENCODING_TUPLES})
    out["masses"] = np.asarray(encoding.masses, dtype=float).tolist()
    return out


def encoding_from_dict(d: dict):
    """Inverse of `encoding_to_dict`."""
    from .encoding import AtomEncoding

    kwargs = {k: np.asarray(d[k], dtype=np.int64) for k in _ENCODING_ARRAYS}
    kwargs.update({k: tuple(d[k]) for k in _ENCODING_TUPLES})
    kwargs["masses"] = np.asarray(d["masses"], dtype=np.float64)
    return AtomEncoding(**kwargs)
