"""The exact transform between centre-free Cartesian coordinates and internal coordinates plus a rotation.

Along a `ZMatrix`, build position ``p`` has a bond length ``b_p`` (p >= 1, nm), an angle ``theta_p`` (p >= 2,
rad, in (0, pi)) and a dihedral ``phi_p`` (p >= 3, rad, in [-pi, pi)). Together with a global orientation
``R`` in SO(3) these are 3N - 3 coordinates, as many as the centre-of-geometry-free subspace has.

Base measure
------------
Densities of both model families live on the 3(N-1)-dimensional centre-of-geometry-free subspace with the
Lebesgue measure of an orthonormal basis of that subspace (nm). With ``x = y + 1 (x) c`` (``c`` the plain
centroid) ``d^{3N} x = N^{3/2} d^{3N-3} y d^3 c``, and placing atom 0 at ``t``, atom 1 in spherical and
every further atom in NeRF coordinates gives ``d^{3N} x = d^3 t prod_{p>=1} b_p^2 prod_{p>=2} sin(theta_p)
db dtheta dphi dR`` with ``dR`` the Haar measure ``sin(alpha) dalpha dbeta dgamma`` (ZYZ Euler angles, total
8 pi^2). Hence, for a density ``q_ic`` on the internal coordinates and a uniform orientation,

    log q(y) = log q_ic - log(8 pi^2) + 3/2 log N - sum_p 2 log b_p - sum_p log sin(theta_p),

which `log_jacobian` returns (without ``log q_ic``). ``tests/test_internal_coordinates.py`` checks it against
a brute-force autograd Jacobian.

Where a Z-matrix built with ``ring_closure="distance"`` replaces the angle ``theta_p`` by the closure distance
``r_p = |x_i - x_c|`` (`openmm_tbg.zmatrix`), the change of variables adds ``log |dr_p / dtheta_p|`` (at fixed
bond, dihedral and earlier atoms, ``dr/dtheta = b (x_i - x_c) . (e_jk + cos(theta) u) / (r sin(theta))`` with
``u`` the unit bond vector and ``e_jk`` the unit vector from atom k to atom j); `log_jacobian` takes the
positions for it. Configurations on the other branch (``dr/dtheta < 0``) have zero density
(`closure_branch_ok`).

All functions work on torch tensors of any float dtype; use float64 where accuracy matters (the round trip is
exact to ~1e-12 nm in float64).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .zmatrix import ZMatrix

__all__ = ["to_internal", "from_internal", "log_jacobian", "closure_branch_ok", "dihedral", "random_rotations",
           "LOG_SO3_VOLUME"]

#: log of the Haar volume of SO(3) in ZYZ Euler angles, 8 pi^2.
LOG_SO3_VOLUME = math.log(8.0 * math.pi ** 2)


def dihedral(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Dihedral angle a-b-c-d in [-pi, pi] (IUPAC sign, as mdtraj), over the last axis of (..., 3) tensors."""
    b0 = a - b
    b1 = c - b
    b2 = d - c
    b1n = b1 / torch.linalg.norm(b1, dim=-1, keepdim=True)
    v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
    x = (v * w).sum(-1)
    y = (torch.cross(b1n, v, dim=-1) * w).sum(-1)
    return torch.atan2(y, x)


def _angle(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Angle a-b-c in [0, pi]; atan2 keeps it accurate near 0 and pi."""
    u, v = a - b, c - b
    return torch.atan2(torch.linalg.norm(torch.cross(u, v, dim=-1), dim=-1), (u * v).sum(-1))


def to_internal(x: torch.Tensor, zmatrix: ZMatrix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Internal coordinates of Cartesian positions.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, 3)`` positions (nm), in topology atom order.
    zmatrix : ZMatrix

    Returns
    -------
    bonds, angles, dihedrals : torch.Tensor
        ``(B, N)`` each, indexed by build position; 0 where a position has no such coordinate. ``angles``
        holds the closure distance (nm) at `ZMatrix.closure_positions`.
    """
    order = torch.as_tensor(zmatrix.order, device=x.device)
    refs = torch.as_tensor(zmatrix.refs, device=x.device).clamp(min=0)  # -1 entries are masked below
    xi = x[:, order]
    xj, xk, xl = x[:, refs[:, 0]], x[:, refs[:, 1]], x[:, refs[:, 2]]
    mask = torch.as_tensor(zmatrix.dof_mask, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    bonds = torch.where(mask[:, 0], torch.linalg.norm(xi - xj, dim=-1), zero)
    angles = torch.where(mask[:, 1], _angle(xi, xj, xk), zero)
    dihedrals = torch.where(mask[:, 2], dihedral(xl, xk, xj, xi), zero)
    closing = zmatrix.closure_positions
    if len(closing):
        cp = torch.as_tensor(closing, device=x.device)
        partner = torch.as_tensor(zmatrix.closure_partner[closing], device=x.device)
        angles = angles.clone()
        angles[:, cp] = torch.linalg.norm(xi[:, cp] - x[:, partner], dim=-1)
    return bonds, angles, dihedrals


def _closure_angle(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, partner: torch.Tensor, bond: torch.Tensor,
                   torsion: torch.Tensor, distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta, ok)``: the angle that puts the `_place` point at ``distance`` from ``partner``, on the branch
    where the distance grows with the angle; ``ok`` is False where no angle in (0, pi) on that branch does
    (theta is then clamped to a finite placeholder)."""
    bc = c - b
    bc = bc / torch.linalg.norm(bc, dim=-1, keepdim=True)
    n = torch.cross(b - a, bc, dim=-1)
    n = n / torch.linalg.norm(n, dim=-1, keepdim=True)
    m = torch.cross(n, bc, dim=-1)
    v = torch.cos(torsion)[..., None] * m + torch.sin(torsion)[..., None] * n
    d0 = c - partner
    # |x - partner|^2 = |d0|^2 + bond^2 + 2 bond (P cos(theta) + Q sin(theta)) = A + 2 bond R cos(theta - alpha)
    p_, q_ = -(d0 * bc).sum(-1), (d0 * v).sum(-1)
    r_, alpha = torch.hypot(p_, q_), torch.atan2(q_, p_)
    cos_arg = (distance * distance - (d0 * d0).sum(-1) - bond * bond) / (2 * bond * r_)
    # d distance / d theta = -bond R sin(theta - alpha) / distance > 0  <=>  theta = alpha - arccos(cos_arg)
    theta = torch.remainder(alpha - torch.arccos(cos_arg.clamp(-1.0, 1.0)) + math.pi, 2 * math.pi) - math.pi
    ok = (cos_arg.abs() < 1) & (theta > 0) & (distance > 0)
    return torch.where(ok, theta, torch.full_like(theta, math.pi / 2)), ok


def _place(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bond: torch.Tensor, angle: torch.Tensor,
           torsion: torch.Tensor) -> torch.Tensor:
    """NeRF: the point d with |d - c| = bond, angle(d, c, b) = angle and dihedral(a, b, c, d) = torsion."""
    bc = c - b
    bc = bc / torch.linalg.norm(bc, dim=-1, keepdim=True)
    n = torch.cross(b - a, bc, dim=-1)
    n = n / torch.linalg.norm(n, dim=-1, keepdim=True)
    m = torch.cross(n, bc, dim=-1)
    bond, angle, torsion = bond[..., None], angle[..., None], torsion[..., None]
    return c + bond * (-torch.cos(angle) * bc + torch.sin(angle) * (torch.cos(torsion) * m
                                                                     + torch.sin(torsion) * n))


def from_internal(bonds: torch.Tensor, angles: torch.Tensor, dihedrals: torch.Tensor, zmatrix: ZMatrix,
                  rotations: torch.Tensor | None = None, return_support: bool = False):
    """Cartesian positions from internal coordinates (inverse of `to_internal` up to rotation/translation).

    Parameters
    ----------
    bonds, angles, dihedrals : torch.Tensor
        ``(B, N)`` by build position (nm, rad).
    zmatrix : ZMatrix
    rotations : torch.Tensor, optional
        ``(B, 3, 3)`` orientations applied to the canonical frame (atom 0 at the origin, atom 1 on +z, atom 2
        in the xz half-plane with x > 0).
    return_support : bool
        Also return which rows are configurations: False where a closure distance (``ring_closure=
        "distance"``) cannot be reached on its branch with an angle in (0, pi); such rows hold finite
        placeholder positions.

    Returns
    -------
    torch.Tensor
        ``(B, N, 3)`` positions in topology atom order, centroid at the origin.
    support : torch.Tensor
        ``(B,)`` bool, with ``return_support`` only.
    """
    B, N = bonds.shape
    pos = [None] * N  # by build position
    zeros = torch.zeros(B, dtype=bonds.dtype, device=bonds.device)
    pos[0] = torch.zeros(B, 3, dtype=bonds.dtype, device=bonds.device)
    pos[1] = torch.stack([zeros, zeros, bonds[:, 1]], -1)
    position = zmatrix.position_of
    j2 = int(position[zmatrix.refs[2, 0]])
    sign = -1.0 if j2 == 1 else 1.0  # atom 2 bonded to atom 1 (angle at 1, towards atom 0 = -z) or to atom 0
    offset = pos[j2]
    pos[2] = offset + torch.stack([bonds[:, 2] * torch.sin(angles[:, 2]), zeros,
                                   sign * bonds[:, 2] * torch.cos(angles[:, 2])], -1)
    x = torch.zeros(B, N, 3, dtype=bonds.dtype, device=bonds.device)
    x[:, :3] = torch.stack(pos[:3], 1)
    support = torch.ones(B, dtype=torch.bool, device=bonds.device)
    closing = zmatrix.closure_partner >= 0
    for level in zmatrix.levels:
        lv = torch.as_tensor(level, device=bonds.device)
        r = torch.as_tensor(position[zmatrix.refs[level]], device=bonds.device)  # (L, 3) build positions
        theta = angles[:, lv]
        if closing[level].any():
            sel = level[closing[level]]
            k = torch.as_tensor(np.flatnonzero(closing[level]), device=bonds.device)
            rs = r[k]
            partner = torch.as_tensor(position[zmatrix.closure_partner[sel]], device=bonds.device)
            closure_theta, ok = _closure_angle(x[:, rs[:, 2]], x[:, rs[:, 1]], x[:, rs[:, 0]], x[:, partner],
                                               bonds[:, sel], dihedrals[:, sel], angles[:, sel])
            theta = theta.clone()
            theta[:, k] = closure_theta
            support &= ok.all(1)
        x[:, lv] = _place(x[:, r[:, 2]], x[:, r[:, 1]], x[:, r[:, 0]], bonds[:, lv], theta, dihedrals[:, lv])
    out = torch.empty_like(x)
    out[:, torch.as_tensor(zmatrix.order, device=bonds.device)] = x
    if rotations is not None:
        out = out @ rotations.transpose(-1, -2)
    out = out - out.mean(1, keepdim=True)
    return (out, support) if return_support else out


def _closure_slopes(x: torch.Tensor, zmatrix: ZMatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dr/dtheta, sin(theta))`` ``(B, C)`` at the closure positions of positions ``x`` (atom order)."""
    closing = zmatrix.closure_positions
    i = torch.as_tensor(zmatrix.order[closing], device=x.device)
    j = torch.as_tensor(zmatrix.refs[closing, 0], device=x.device)
    k = torch.as_tensor(zmatrix.refs[closing, 1], device=x.device)
    c = torch.as_tensor(zmatrix.closure_partner[closing], device=x.device)
    e = x[:, j] - x[:, k]
    e = e / torch.linalg.norm(e, dim=-1, keepdim=True)
    u = x[:, i] - x[:, j]
    b = torch.linalg.norm(u, dim=-1)
    u = u / b[..., None]
    cos = -(u * e).sum(-1)
    sin = torch.linalg.norm(torch.cross(u, e, dim=-1), dim=-1)
    d = x[:, i] - x[:, c]
    r = torch.linalg.norm(d, dim=-1)
    return b * (d * (e + cos[..., None] * u)).sum(-1) / (r * sin), sin


def closure_branch_ok(x: torch.Tensor, zmatrix: ZMatrix) -> torch.Tensor:
    """``(B,)`` bool: every closure distance of ``x`` grows with its angle (the branch the density lives on);
    all True for Z-matrices without closure distances."""
    if not len(zmatrix.closure_positions):
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    slope, _ = _closure_slopes(x, zmatrix)
    return (slope > 0).all(1)


def log_jacobian(bonds: torch.Tensor, angles: torch.Tensor, zmatrix: ZMatrix,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """``log q(y) - log q_ic`` for a uniform orientation (module notes): ``(B,)``.

    ``- log(8 pi^2) + 3/2 log N - sum 2 log b - sum log sin(theta)`` over the coordinates the Z-matrix has,
    plus ``sum log |dr/dtheta|`` over closure distances, which needs the ``positions`` ``(B, N, 3)`` (nm, atom
    order) they were measured on or built into.
    """
    mask = torch.as_tensor(zmatrix.dof_mask, device=bonds.device)
    closing = zmatrix.closure_positions
    if len(closing):
        if positions is None:
            raise ValueError("log_jacobian: this Z-matrix has closure distances (ring_closure='distance'); pass "
                             "the positions.")
        mask = mask.clone()
        mask[torch.as_tensor(closing, device=bonds.device), 1] = False
    one = torch.ones((), dtype=bonds.dtype, device=bonds.device)
    log_b = torch.log(torch.where(mask[:, 0], bonds, one)).sum(-1)
    log_sin = torch.log(torch.sin(torch.where(mask[:, 1], angles, one * (math.pi / 2)))).sum(-1)
    n = zmatrix.n_atoms
    out = -LOG_SO3_VOLUME + 1.5 * math.log(n) - 2.0 * log_b - log_sin
    if len(closing):
        slope, sin = _closure_slopes(positions.to(bonds.dtype), zmatrix)
        out = out + (torch.log(slope.abs()) - torch.log(sin)).sum(-1)
    return out


def random_rotations(n: int, generator: torch.Generator | None = None, dtype=torch.float64,
                     device=None) -> torch.Tensor:
    """``(n, 3, 3)`` rotation matrices drawn uniformly (Haar) from normalised Gaussian quaternions."""
    gen_device = generator.device if generator is not None else device
    q = torch.randn(n, 4, generator=generator, dtype=dtype, device=gen_device).to(device)
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], -1).reshape(n, 3, 3)
