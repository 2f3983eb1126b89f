"""Tests of openmm_tbg.validity: bond graph, relabelling of interchangeable atoms, chirality and mirroring."""

import numpy as np
import pytest
from openmm import unit

from openmm_tbg.encoding import chiral_centers, encode_topology, signed_volumes
from openmm_tbg.energy import ReducedPotential
from openmm_tbg.peptides import build_peptide
from openmm_tbg.validity import ValidityChecker


@pytest.fixture(scope="module")
def valine_peptide():
    """Ala-Val: two chiral CA centres and six interchangeable methyl hydrogens on two carbons."""
    pep = build_peptide("AV")
    x = np.asarray(pep.positions.value_in_unit(unit.nanometer))
    enc = encode_topology(pep.topology, x)
    return pep, enc, x


@pytest.fixture(scope="module")
def valine_v1_encoding(valine_peptide):
    """Ala-Val with the coarser v1 hydrogen classes: Val's six methyl H's (on CG1 and CG2) form one group,
    so a sample can match the bond graph only after relabelling (v2 never needs it for peptides)."""
    import dataclasses

    from openmm_tbg.encoding import ATOM_NAME_CLASSES_V1, atom_name_class_v1

    pep, enc, _ = valine_peptide
    v1 = [ATOM_NAME_CLASSES_V1.index(atom_name_class_v1(a.residue.name, a.name)) for a in pep.topology.atoms()]
    return dataclasses.replace(enc, atom_class=np.asarray(v1, dtype=np.int64))


def atom_index(topology, residue, name):
    return next(a.index for a in topology.atoms() if a.residue.index == residue and a.name == name)


def test_valid_structure_passes_unchanged(valine_peptide):
    pep, enc, x = valine_peptide
    checker = ValidityChecker(pep.topology, enc, reference_positions=x)
    report = checker(x)
    assert report.valid.tolist() == [True]
    np.testing.assert_array_equal(report.positions[0], x)
    assert report.counts == {"n": 1, "valid": 1, "non_finite_positions": 0, "bond_graph": 0, "relabelling": 0, "chirality": 0, "mirror_image": 0,
                             "mirrored": 0, "relabelled": 0}


def test_swapped_interchangeable_atoms_are_relabelled_to_the_right_energy(valine_peptide, valine_v1_encoding):
    pep, _, x = valine_peptide
    enc = valine_v1_encoding
    top = pep.topology
    h1, h2 = atom_index(top, 1, "HG11"), atom_index(top, 1, "HG21")  # same group, different carbons
    assert enc.groups[h1] == enc.groups[h2]
    swapped = x.copy()
    swapped[[h1, h2]] = x[[h2, h1]]
    checker = ValidityChecker(top, enc)
    assert (checker.bond_graph(swapped[None])[0] != checker.adjacency).any()  # plain comparison fails
    report = checker(swapped)
    assert report.valid[0] and report.relabelled[0]
    np.testing.assert_array_equal(checker.bond_graph(report.positions)[0], checker.adjacency)
    # Relabelling only permutes within groups, and the force field then sees the original molecule.
    assert np.array_equal(enc.groups[report.permutations[0]], enc.groups)
    u = ReducedPotential(pep.system, 310.0, platform="Reference")
    u_orig, u_swapped, u_fixed = u(np.stack([x, swapped, report.positions[0]]))
    assert abs(u_swapped - u_orig) > 1.0  # the swap really changes the energy seen by the force field
    assert u_fixed == pytest.approx(u_orig, abs=1e-6)
    assert checker.statistics["relabelled"] == 1


def test_relabelling_draws_uniformly_among_all_valid_relabellings(valine_peptide, valine_v1_encoding):
    import math

    pep, enc, x = valine_peptide
    top = pep.topology
    checker = ValidityChecker(top, enc)
    twins, lifts = checker._automorphism_parts()
    # Ala-Val: the H's of NH3+, of Ala's methyl and of Val's two methyls permute freely (CG1 and CG2 are
    # different tokens, O and OXT too): 3!^4 = 1296 automorphisms.
    assert len(lifts) * math.prod(math.factorial(len(t)) for t in twins) == 1296
    rng = np.random.default_rng(0)
    cg1_h = [atom_index(top, 1, f"HG1{j}") for j in (1, 2, 3)]
    n = 6000
    lands = []
    for _ in range(n):
        a = checker.random_automorphism(rng)
        assert np.array_equal(checker.adjacency[a][:, a], checker.adjacency)
        assert np.array_equal(enc.groups[a], enc.groups)
        lands.append(a[cg1_h[0]])
    # Uniform: HG11's label takes each H of CG1 with p = 1/3 (5 sigma).
    counts = np.array([lands.count(h) for h in cg1_h])
    assert counts.sum() == n and np.all(np.abs(counts / n - 1 / 3) < 5 * math.sqrt(2 / 9 / n))
    # The checker composes each relabelling with such a draw; every draw still gives the right molecule. (With
    # v2 classes a peptide never needs relabelling, so use the coarser v1 classes here.)
    checker = ValidityChecker(top, valine_v1_encoding)
    h1, h2 = atom_index(top, 1, "HG11"), atom_index(top, 1, "HG21")
    swapped = x.copy()
    swapped[[h1, h2]] = x[[h2, h1]]
    seen = set()
    for _ in range(30):
        report = checker(swapped, rng=rng)
        assert report.valid[0] and report.relabelled[0]
        np.testing.assert_array_equal(checker.bond_graph(report.positions)[0], checker.adjacency)
        seen.add(int(report.permutations[0][h1]))
    assert seen == {h2, cg1_h[1], cg1_h[2]}  # the sample atoms bonded to CG1


def test_broken_bond_graph_is_rejected(valine_peptide):
    pep, enc, x = valine_peptide
    top = pep.topology
    far = x.copy()
    far[atom_index(top, 0, "HA")] += [0.5, 0.0, 0.0]  # hydrogen torn off its carbon
    # Two atoms of different groups swapped: no within-group isomorphism exists.
    wrong = x.copy()
    i = atom_index(top, 1, "CG1")
    k = atom_index(top, 0, "CB")
    wrong[[i, k]] = x[[k, i]]
    nan = x.copy()
    nan[3, 1] = np.nan
    report = ValidityChecker(top, enc)(np.stack([far, wrong, nan, x]))
    assert report.reasons.tolist() == ["bond_graph", "bond_graph", "non_finite_positions", ""]
    assert report.counts["valid"] == 1 and report.counts["bond_graph"] == 2
    assert report.counts["non_finite_positions"] == 1


def test_mirror_images_are_mirrored_and_mixed_chirality_rejected(valine_peptide):
    pep, enc, x = valine_peptide
    top = pep.topology
    centers = chiral_centers(enc)
    assert len(centers) == 2 and np.all(signed_volumes(x, centers) > 0)
    mirror = -x
    # Invert only the first residue's CA: exchange the positions of HA and CB there (bond check off, since the
    # bond lengths no longer match; the chirality check is what is tested here).
    mixed = x.copy()
    ha, cb = atom_index(top, 0, "HA"), atom_index(top, 0, "CB")
    mixed[[ha, cb]] = x[[cb, ha]]
    vol = np.sign(signed_volumes(mixed, centers))[0]
    assert sorted(vol.tolist()) == [-1.0, 1.0]
    checker = ValidityChecker(top, enc, check_bonds=False)
    report = checker(np.stack([mirror, mixed, x]))
    assert report.valid.tolist() == [True, False, True]
    assert report.reasons[1] == "chirality"
    assert report.mirrored.tolist() == [True, False, False]
    np.testing.assert_allclose(report.positions[0], x)
    u = ReducedPotential(pep.system, 310.0, platform="Reference")
    assert u(mirror)[0] == pytest.approx(u(x)[0], rel=1e-9)  # why mirroring is needed at all
    assert checker.statistics["mirrored"] == 1 and checker.statistics["chirality"] == 1


def test_reference_with_missing_bond_and_toy_without_bonds_are_refused(valine_peptide):
    pep, enc, x = valine_peptide
    bonds = [(b[0].index, b[1].index) for b in pep.topology.bonds()][1:]
    with pytest.raises(ValueError, match="bond graph of reference_positions differs"):
        ValidityChecker.from_bonds(bonds, enc, reference_positions=x)
    with pytest.raises(ValueError, match="no bonds"):
        ValidityChecker.from_bonds([], enc)
    assert ValidityChecker.from_bonds([], enc, check_bonds=False)(x).valid[0]
