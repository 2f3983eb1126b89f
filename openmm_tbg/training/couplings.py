"""Geometry of the flow-matching pairs: the mean-free prior, random rotations and the equivariant OT coupling.

The OT coupling permutes a prior sample within each group of interchangeable atoms (Hungarian algorithm) and
then rotates it onto the data frame (Kabsch, proper rotations only), which straightens the learned paths.
Coordinates are in the flow's internal units (nm / ``length_scale``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def masked_center(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract the plain mean over real atoms and zero the padding.

    Parameters
    ----------
    x : torch.Tensor
        (B, N, 3) coordinates.
    mask : torch.Tensor
        (B, N) bool, True for real atoms.
    """
    m = mask.to(x.dtype).unsqueeze(-1)
    mean = (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (x - mean) * m


def sample_mean_free_gaussian(
    mask: torch.Tensor, std: float = 1.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Isotropic Gaussian on the mean-free subspace of the real atoms (the flow's prior), zero at padding.

    Parameters
    ----------
    mask : torch.Tensor
        (B, N) bool, True for real atoms.
    std : float
        Standard deviation per internal degree of freedom.
    generator : torch.Generator, optional
        Source of randomness (CPU generator; the result is on CPU).
    """
    z = torch.randn(mask.shape + (3,), generator=generator, dtype=torch.float32) * std
    return masked_center(z, mask.cpu())


def random_rotations(n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` uniformly distributed proper rotation matrices (n, 3, 3), from normalised Gaussian quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=1,
    ).reshape(n, 3, 3)
    return rot.to(torch.float32)


def kabsch_rotation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Proper rotation ``R`` (det +1) minimising ``sum_i |R x_i - y_i|^2`` for centred point sets.

    Reflections are excluded: when the best orthogonal map is improper, the smallest singular direction is
    flipped (Kabsch 1976), so the returned matrix never mirrors (mirroring would change chirality).

    Parameters
    ----------
    x, y : numpy.ndarray
        (n, 3) centred coordinates.

    Returns
    -------
    numpy.ndarray
        (3, 3) rotation; the aligned points are ``x @ R.T``.
    """
    h = x.astype(np.float64).T @ y.astype(np.float64)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    d = 1.0 if d == 0 else d
    return vt.T @ np.diag([1.0, 1.0, d]) @ u.T


def equivariant_ot_coupling(
    x0: np.ndarray, x1: np.ndarray, groups: Sequence[np.ndarray], n_iterations: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equivariant optimal-transport alignment of one prior sample to one data frame.

    Permutes ``x0``'s atoms within each group of interchangeable atoms to minimise the summed squared
    distance to ``x1`` (``scipy.optimize.linear_sum_assignment``), then rotates it onto ``x1`` (Kabsch, proper
    rotations only). Because the prior is invariant under these permutations and rotations, the permuted and
    rotated sample is still a prior sample; only its pairing with ``x1`` changes.

    Parameters
    ----------
    x0, x1 : numpy.ndarray
        (n, 3) centred coordinates (internal units) of the prior sample and of the data frame.
    groups : sequence of numpy.ndarray
        Index arrays of interchangeable atoms (``AtomEncoding.interchangeable_groups()``).
    n_iterations : int
        Rounds of (permutation, rotation).

    Returns
    -------
    aligned : numpy.ndarray
        (n, 3) ``x0[perm] @ rotation.T``.
    perm : numpy.ndarray
        (n,) int permutation applied to ``x0``'s atoms (it maps only within groups).
    rotation : numpy.ndarray
        (3, 3) proper rotation.
    """
    n = x0.shape[0]
    if x1.shape != x0.shape:
        raise ValueError(f"x0 {x0.shape} and x1 {x1.shape} must have the same shape (n_atoms, 3).")
    x0 = x0.astype(np.float64)
    x1 = x1.astype(np.float64)
    perm = np.arange(n)
    rotation = np.eye(3)
    for _ in range(n_iterations):
        rotated = x0 @ rotation.T
        for g in groups:
            diff = x1[g][:, None, :] - rotated[g][None, :, :]
            cost = np.einsum("ijk,ijk->ij", diff, diff)  # cost[i, j]: data atom g[i] <- prior atom g[j]
            rows, cols = linear_sum_assignment(cost)
            perm[g[rows]] = g[cols]
        rotation = kabsch_rotation(x0[perm], x1)
    return x0[perm] @ rotation.T, perm, rotation
