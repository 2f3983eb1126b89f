"""Z-matrices and the exact Cartesian <-> internal-coordinate transform (round trip, Jacobian, chirality)."""

import math

import numpy as np
import pytest
import torch
from openmm import app

from openmm_tbg.encoding import encode_topology, signed_volumes, chiral_centers
from openmm_tbg.internal_coordinates import (closure_branch_ok, dihedral, from_internal,
                                             log_jacobian, random_rotations, to_internal)
from openmm_tbg.peptides import build_peptide
from openmm_tbg.zmatrix import build_zmatrix

FIXTURES = ("AA", "AC", "GP", "HT", "NY")


def _molecule(fixture_dir, name):
    pdb = app.PDBFile(str(fixture_dir / f"{name}.pdb"))
    encoding = encode_topology(pdb.topology)
    bonds = [(b[0].index, b[1].index) for b in pdb.topology.bonds()]
    frames = np.load(fixture_dir / f"{name}.npz")["positions"].astype(np.float64) * 1e-4
    return encoding, bonds, frames


def _kabsch_rmsd(x, y):
    """RMSD after the best *proper* rotation (a mirror image does not align)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    u, _, vt = np.linalg.svd(x.T @ y)
    d = np.sign(np.linalg.det(u @ vt))
    r = u @ np.diag([1, 1, d]) @ vt
    return float(np.sqrt(((x @ r - y) ** 2).sum(1).mean()))


@pytest.mark.parametrize("ring_closure", ["angle", "distance"])
@pytest.mark.parametrize("name", FIXTURES)
def test_round_trip_is_exact_on_md_frames(fixture_dir, name, ring_closure):
    encoding, bonds, frames = _molecule(fixture_dir, name)
    zm = build_zmatrix(encoding, bonds, ring_closure=ring_closure)
    x = torch.as_tensor(frames[:50])
    assert bool(closure_branch_ok(x, zm).all())  # MD frames lie on the branch the density lives on
    y, support = from_internal(*to_internal(x, zm), zm, return_support=True)
    assert bool(support.all())
    worst = max(_kabsch_rmsd(a, b) for a, b in zip(x.numpy(), y.numpy()))
    assert worst < 1e-9
    # internal coordinates of the rebuilt frames equal the originals
    for a, b in zip(to_internal(x, zm), to_internal(y, zm)):
        diff = torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi
        assert float(diff.abs().max()) < 1e-9


def test_every_amino_acid_and_ring_closures():
    """All 20 amino acids in one chain: the build covers every atom, closes each ring once and is exact."""
    pep = build_peptide("ACDEFGHIKLMNPQRSTVWY")
    encoding = encode_topology(pep.topology)
    bonds = [(b[0].index, b[1].index) for b in pep.topology.bonds()]
    zm = build_zmatrix(encoding, bonds)
    assert sorted(zm.order.tolist()) == list(range(encoding.n_atoms))
    # rings: F, H, P, W (two), Y -> 6 closures; the spanning tree has N - 1 bonds
    assert len(zm.ring_closures) == 6 and len(bonds) == encoding.n_atoms - 1 + 6
    x = torch.as_tensor(np.asarray(pep.positions.value_in_unit(pep.positions.unit)), dtype=torch.float64)[None]
    y = from_internal(*to_internal(x, zm), zm)
    assert _kabsch_rmsd(x[0].numpy(), y[0].numpy()) < 1e-9
    # references are placed before the atom they place
    position = zm.position_of
    for p in range(1, encoding.n_atoms):
        refs = [r for r in zm.refs[p] if r >= 0]
        assert len(refs) == min(p, 3) and all(position[r] < p for r in refs)


def test_chirality_is_a_narrow_improper_dihedral(fixture_dir):
    """CB at CA is placed by an improper dihedral whose sign is the chirality: flipping it gives D."""
    encoding, bonds, frames = _molecule(fixture_dir, "AA")
    zm = build_zmatrix(encoding, bonds)
    names = [encoding.atom_names[i] for i in zm.order]
    cb = [p for p, nm in enumerate(names) if nm == "CB"]
    assert all(zm.improper[p] for p in cb)
    b, a, d = to_internal(torch.as_tensor(frames[:200]), zm)
    for p in cb:
        assert float(d[:, p].std()) < 0.2 and abs(float(d[:, p].mean())) > 1.5  # single narrow mode near +-2.1
    centers = chiral_centers(encoding)
    flipped = d.clone()
    flipped[:, cb[0]] = -flipped[:, cb[0]]
    flipped[:, [p for p, nm in enumerate(names) if nm == "HA"]] *= -1
    x_d = from_internal(b, a, flipped, zm).numpy()
    vol_l = signed_volumes(frames[:200], centers)
    vol_d = signed_volumes(x_d, centers)
    assert np.all(vol_l > 0)
    assert np.all(vol_d[:, 0] < 0) and np.all(vol_d[:, 1:] > 0)


def test_dihedral_sign_matches_mdtraj(fixture_dir):
    import mdtraj

    encoding, bonds, frames = _molecule(fixture_dir, "AA")
    traj = mdtraj.Trajectory(frames[:20], mdtraj.Topology.from_openmm(app.PDBFile(str(fixture_dir / "AA.pdb")).topology))
    idx, phi = mdtraj.compute_phi(traj)
    x = torch.as_tensor(frames[:20])
    ours = dihedral(*(x[:, i] for i in idx[0])).numpy()
    np.testing.assert_allclose(ours, phi[:, 0], atol=1e-5)


def _euler(alpha, beta, gamma):
    def rz(t):
        c, s = torch.cos(t), torch.sin(t)
        zero, one = torch.zeros_like(t), torch.ones_like(t)
        return torch.stack([torch.stack([c, -s, zero]), torch.stack([s, c, zero]), torch.stack([zero, zero, one])])

    c, s = torch.cos(alpha), torch.sin(alpha)
    zero, one = torch.zeros_like(alpha), torch.ones_like(alpha)
    ry = torch.stack([torch.stack([c, zero, s]), torch.stack([zero, one, zero]), torch.stack([-s, zero, c])])
    return rz(beta) @ ry @ rz(gamma)


def _subspace_basis(n):
    """Orthonormal basis (3n, 3n - 3) of the centre-of-geometry-free subspace of R^{3n}."""
    q, _ = np.linalg.qr(np.eye(n) - 1.0 / n)
    basis = q[:, : n - 1]  # orthonormal basis of the mean-free vectors in R^n
    return torch.as_tensor(np.kron(basis, np.eye(3)))


@pytest.mark.parametrize("name,ring_closure", [("AA", "angle"), ("HT", "angle"), ("HT", "distance"),
                                               ("GP", "distance"), ("NY", "distance")])
def test_log_jacobian_matches_brute_force_autograd(fixture_dir, name, ring_closure):
    """log |det d y / d (internal, Euler angles)| by autograd equals the closed form (+ log sin alpha); with
    closure distances the angle of each closing atom is solved inside the build, so autograd differentiates
    through that solution."""
    encoding, bonds, frames = _molecule(fixture_dir, name)
    zm = build_zmatrix(encoding, bonds, ring_closure=ring_closure)
    assert (len(zm.closure_positions) > 0) == (ring_closure == "distance")
    n = encoding.n_atoms
    dof = torch.as_tensor(zm.dof_mask)
    ic0 = torch.stack(to_internal(torch.as_tensor(frames[3:4]), zm), -1)[0]
    basis = _subspace_basis(n)
    angles0 = torch.tensor([0.7, 1.9, -2.3], dtype=torch.float64)

    def y_of(params):
        ic = torch.zeros(n, 3, dtype=torch.float64)
        ic[dof] = params[:-3]
        rot = _euler(*params[-3:])[None]
        x = from_internal(ic[None, :, 0], ic[None, :, 1], ic[None, :, 2], zm, rot)[0]
        return basis.T @ x.reshape(-1)

    params = torch.cat([ic0[dof], angles0])
    jac = torch.autograd.functional.jacobian(y_of, params)
    assert jac.shape == (3 * n - 3, 3 * n - 3)
    brute = float(torch.linalg.slogdet(jac)[1])
    x0 = torch.as_tensor(frames[3:4])
    # The Haar volume of SO(3) in these Euler angles (R = Rz(beta) Ry(alpha) Rz(gamma), measure sin(alpha)):
    # int_0^pi sin(alpha) d alpha * (2 pi)^2 = 8 pi^2, computed here rather than taken from the module, so that
    # a wrong constant there does not cancel.
    so3_volume = 2.0 * (2 * math.pi) ** 2
    closed = (-float(log_jacobian(ic0[None, :, 0], ic0[None, :, 1], zm, positions=x0)[0]) - math.log(so3_volume)
              + math.log(math.sin(0.7)))
    assert brute == pytest.approx(closed, abs=1e-8)


def test_random_rotations_are_proper_and_uniform():
    """Haar measure on SO(3): the rotation angle omega has CDF (omega - sin omega) / pi, and the image of a fixed
    vector is uniform on the sphere (each coordinate uniform on [-1, 1]). Kolmogorov-Smirnov statistics against
    both, with the critical value of level 1e-4 for the sample size."""
    from scipy import stats

    n = 20000
    g = torch.Generator().manual_seed(1)
    r = random_rotations(n, g)
    np.testing.assert_allclose(torch.linalg.det(r).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose((r @ r.transpose(1, 2)).numpy(), np.broadcast_to(np.eye(3), (n, 3, 3)), atol=1e-12)
    critical = math.sqrt(-math.log(1e-4 / 2) / (2 * n))
    trace = r.diagonal(dim1=1, dim2=2).sum(-1).numpy()
    omega = np.arccos(np.clip((trace - 1) / 2, -1, 1))
    assert stats.kstest(omega, lambda w: (w - np.sin(w)) / np.pi).statistic < critical
    v = (r @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).numpy()
    for c in range(3):
        assert stats.kstest(v[:, c], stats.uniform(-1, 2).cdf).statistic < critical


def test_bad_bond_graphs_are_refused():
    from openmm_tbg.testing import harmonic_chain

    _, _, encoding = harmonic_chain(4)
    with pytest.raises(ValueError, match="not connected"):
        build_zmatrix(encoding, [(0, 1), (2, 3)])
    with pytest.raises(ValueError, match="distinct atoms"):
        build_zmatrix(encoding, [(0, 7)])


def test_closure_distance_branch_and_support(fixture_dir):
    """With closure distances, a configuration whose closing angle lies on the other branch (the distance
    falling as the angle grows) is flagged as outside the density's support, and an unreachable distance is
    reported by `from_internal` instead of giving NaN positions."""
    encoding, bonds, frames = _molecule(fixture_dir, "NY")
    zm_angle = build_zmatrix(encoding, bonds)
    zm = build_zmatrix(encoding, bonds, ring_closure="distance")
    (p,) = zm.closure_positions
    x = torch.as_tensor(frames[:4])
    b, a, d = to_internal(x, zm_angle)
    a_other = a.clone()
    a_other[:, p] = math.radians(60.0)  # the ring's closing angle folded in, past the turning point
    x_other = from_internal(b, a_other, d, zm_angle)
    assert not bool(closure_branch_ok(x_other, zm).any())
    assert bool(closure_branch_ok(x, zm).all())
    # The distance-parametrised build puts those coordinates back on the density's branch: not x_other.
    y = from_internal(*to_internal(x_other, zm), zm)
    assert min(_kabsch_rmsd(u, v) for u, v in zip(x_other.numpy(), y.numpy())) > 1e-3
    bz, az, dz = to_internal(x, zm)
    az = az.clone()
    az[1, p] = 5.0  # 5 nm: no angle reaches it
    y, support = from_internal(bz, az, dz, zm, return_support=True)
    assert support.tolist() == [True, False, True, True] and bool(torch.isfinite(y).all())
    with pytest.raises(ValueError, match="ring_closure"):
        build_zmatrix(encoding, bonds, ring_closure="bond")
    with pytest.raises(ValueError, match="pass the positions"):
        log_jacobian(bz, az, zm)
