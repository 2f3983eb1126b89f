"""Test helpers for users' own models and for the test suite.

``assert_equivariant`` checks that a vector field ``v(t, x, tokens, mask=None)`` has the symmetries the flow
relies on: rotations and reflections act on its output as on its input, translations of the input leave it
unchanged, and permuting atoms with identical tokens permutes its output.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["random_orthogonal", "interchangeable_permutation", "assert_equivariant", "assert_detailed_balance",
           "LinearVectorField", "harmonic_chain", "toy_chain", "TOY_SIGMA_NM", "TOY_FLOW_STD_NM",
           "TOY_TEMPERATURE_K", "randomise_spline_heads", "reordered"]

#: The exactly solvable toy of the sampler and move tests: bond-vector standard deviation of the target (nm),
#: standard deviation of the flow (nm; wider than the target, so importance weights are bounded), temperature.
TOY_SIGMA_NM, TOY_FLOW_STD_NM, TOY_TEMPERATURE_K = 0.1, 0.11, 300.0


def random_orthogonal(generator: torch.Generator, reflection: bool, dtype=torch.float64) -> torch.Tensor:
    """A random 3 x 3 orthogonal matrix (Haar measure) with determinant -1 if ``reflection`` else +1."""
    a = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    if (torch.det(q) < 0) != reflection:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def interchangeable_permutation(tokens: torch.Tensor, generator: torch.Generator,
                                mask: torch.Tensor | None = None) -> torch.Tensor:
    """A random permutation of ``range(N)`` that only exchanges real atoms with identical token rows.

    Parameters
    ----------
    tokens : torch.Tensor
        ``(N, 3)`` integer tokens.
    generator : torch.Generator
        RNG.
    mask : torch.Tensor, optional
        ``(N,)`` bool, True = real atom; padding stays in place.

    Returns
    -------
    torch.Tensor
        ``(N,)`` long index array ``perm``; the permuted molecule is ``x[perm]``.
    """
    n = tokens.shape[0]
    perm = torch.arange(n)
    real = torch.ones(n, dtype=torch.bool) if mask is None else mask.cpu()
    rows = [tuple(r) for r in tokens.cpu().tolist()]
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if real[i]:
            groups.setdefault(row, []).append(i)
    for members in groups.values():
        if len(members) > 1:
            idx = torch.tensor(members)
            perm[idx] = idx[torch.randperm(len(members), generator=generator)]
    return perm


def assert_equivariant(
    vector_field,
    x: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
    t: float = 0.5,
    n_trials: int = 3,
    generator: torch.Generator | None = None,
    atol: float | None = None,
) -> None:
    """Check E(3) and permutation equivariance of a vector field; raise ``AssertionError`` if violated.

    For every trial a random orthogonal matrix (alternating proper rotations and reflections), a random
    translation and a random permutation of interchangeable atoms (identical token rows) are applied to ``x``;
    the output must transform as ``v(Q x P + b) = Q v(x) P``. Also checks that the output is mean-free over real
    atoms and zero at padding.

    Parameters
    ----------
    vector_field : callable
        ``vector_field(t, x, tokens, mask=None) -> (B, N, 3)``.
    x : torch.Tensor
        ``(B, N, 3)`` (or ``(N, 3)``) internal coordinates.
    tokens : torch.Tensor
        ``(N, 3)`` or ``(B, N, 3)`` integer tokens.
    mask : torch.Tensor, optional
        ``(B, N)`` bool, True = real atom.
    t : float
        Time at which the field is evaluated.
    n_trials : int
        Number of random transformations (at least 2 to include a reflection).
    generator : torch.Generator, optional
        RNG for the transformations; None uses a fixed seed (0) so that failures are reproducible.
    atol : float, optional
        Absolute tolerance; None uses ``1e-9`` (float64) or ``1e-4`` (float32) times ``max(1, max|v|)``.
    """
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"assert_equivariant: x must have shape (B, N, 3), got {tuple(x.shape)}.")
    B, N, _ = x.shape
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    batch_tokens = tokens if tokens.dim() == 3 else tokens.unsqueeze(0).expand(B, N, 3)
    real = torch.ones(B, N, dtype=torch.bool, device=x.device) if mask is None else mask

    def call(xx, tok):
        with torch.no_grad():
            return vector_field(t, xx, tok, mask=mask) if mask is not None else vector_field(t, xx, tok)

    v = call(x, tokens)
    if v.shape != x.shape:
        raise AssertionError(f"vector field output shape {tuple(v.shape)} differs from input {tuple(x.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise AssertionError("vector field output contains NaN or inf")
    scale = max(1.0, float(v.abs().max()))
    if atol is None:
        atol = (1e-9 if x.dtype == torch.float64 else 1e-4) * scale

    realf = real.to(x.dtype)[..., None]
    mean = (v * realf).sum(1) / realf.sum(1).clamp(min=1)
    if float(mean.abs().max()) > atol:
        raise AssertionError(f"output is not mean-free over real atoms: max |mean| = {float(mean.abs().max()):.3e}")
    if mask is not None and bool((v[~real] != 0).any()):
        raise AssertionError("output is not zero at padded atoms")

    for trial in range(n_trials):
        q = random_orthogonal(generator, reflection=(trial % 2 == 1), dtype=x.dtype).to(x.device)
        shift = (torch.randn(1, 1, 3, generator=generator, dtype=torch.float64) * 3).to(x.dtype).to(x.device)
        perms = torch.stack([
            interchangeable_permutation(batch_tokens[b], generator, real[b]) for b in range(B)
        ]).to(x.device)
        gather = perms[..., None].expand(B, N, 3)
        x_g = torch.gather(x @ q.T + shift, 1, gather)
        tok_g = torch.gather(batch_tokens, 1, perms[..., None].expand(B, N, 3))
        if tokens.dim() == 2:
            # Permutations only exchange identical rows, so the shared tokens are unchanged.
            tok_g = tokens
        v_g = call(x_g, tok_g)
        expected = torch.gather(v @ q.T, 1, gather)
        err = float((v_g - expected).abs().max())
        kind = "reflection" if trial % 2 else "rotation"
        if err > atol:
            raise AssertionError(
                f"vector field is not equivariant (trial {trial}: {kind} + translation + permutation of "
                f"interchangeable atoms): max |v(g x) - g v(x)| = {err:.3e} > atol = {atol:.3e}"
            )
        logger.debug("equivariance trial %d (%s): max error %.3e", trial, kind, err)


# ----------------------------------------------------------------------------------------------------------
# Exactly solvable toy problems for testing samplers and MCMC moves.


def randomise_spline_heads(flow, scale: float = 0.05, seed: int = 0):
    """Give an `InternalCoordinateFlow`'s coupling heads random weights and biases (normal, ``scale``; seeded).

    An untrained internal-coordinate flow is the identity on top of its base (zero heads), which tests of its
    Jacobians and densities would not exercise. Returns the flow (modified in place).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flow.layers:
            layer.head.weight.copy_(scale * torch.randn(layer.head.weight.shape, generator=g, dtype=flow.dtype))
            layer.head.bias.copy_(scale * torch.randn(layer.head.bias.shape, generator=g, dtype=flow.dtype))
    return flow


class LinearVectorField(torch.nn.Module):
    """The closed-form vector field ``v(t, x) = rate * (x - mean(x))``.

    Integrated from t = 0 to 1 it maps the mean-free isotropic Gaussian prior of standard deviation ``s`` onto a
    mean-free isotropic Gaussian of standard deviation ``s * exp(rate)``, so the flow's density is known in
    closed form. It has the `EGNNVectorField.forward` signature and ignores the tokens.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, t, x, tokens, mask=None):
        if mask is None:
            return self.rate * (x - x.mean(dim=1, keepdim=True))
        m = mask.to(x.dtype).unsqueeze(-1)
        mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        return self.rate * (x - mean) * m


def harmonic_chain(n_particles: int = 3, sigma_nm: float = 0.1, temperature_K: float = 300.0, *,
                   spring_constant: float | None = None):
    """A chain of particles joined by harmonic springs of rest length 0: an exactly known Boltzmann density.

    With ``U = sum_bonds k/2 |x_i - x_j|^2`` and a tree of bonds, the bond vectors are independent Gaussians
    with variance ``sigma^2 = kT / k`` per Cartesian component, so e.g. ``|b|^2 / sigma^2`` is chi-square with
    3 degrees of freedom for every bond. Particles have mass 12 (amu).

    Parameters
    ----------
    n_particles : int
    sigma_nm : float
        Standard deviation of each bond-vector component at ``temperature_K``, nm.
    temperature_K : float
    spring_constant : float, optional
        ``k`` in kJ/mol/nm^2; when given it replaces ``kT / sigma_nm^2``.

    Returns
    -------
    system : openmm.System
    topology : openmm.app.Topology
        One residue "UNK" of carbon "atoms" C1..Cn bonded in a chain.
    encoding : openmm_tbg.encoding.AtomEncoding
        Every atom has its own atom-class token (no interchangeable atoms), no chiral centres.
    """
    import openmm
    from openmm import app

    from .encoding import AtomEncoding
    from .energy import MOLAR_GAS_CONSTANT

    kT = MOLAR_GAS_CONSTANT * temperature_K
    k = kT / sigma_nm**2 if spring_constant is None else float(spring_constant)
    system = openmm.System()
    bonds = openmm.HarmonicBondForce()
    topology = app.Topology()
    residue = topology.addResidue("UNK", topology.addChain("A"))
    atoms = []
    for i in range(n_particles):
        system.addParticle(12.0)
        atoms.append(topology.addAtom(f"C{i + 1}", app.element.carbon, residue))
    for i in range(n_particles - 1):
        bonds.addBond(i, i + 1, 0.0, k)
        topology.addBond(atoms[i], atoms[i + 1])
    system.addForce(bonds)
    encoding = AtomEncoding(
        residue_index=np.zeros(n_particles, dtype=np.int64), amino_acid=np.zeros(n_particles, dtype=np.int64),
        atom_class=np.arange(n_particles, dtype=np.int64), atom_names=tuple(a.name for a in atoms),
        residue_names=("UNK",) * n_particles, elements=("C",) * n_particles,
        masses=np.full(n_particles, 12.0))
    return system, topology, encoding


def toy_chain(n_particles: int = 3):
    """The exactly solvable toy of the sampler and move tests: (system, topology, encoding, flow).

    A `harmonic_chain` with bond-vector standard deviation ``TOY_SIGMA_NM`` at ``TOY_TEMPERATURE_K``, and a
    float64 flow with a `LinearVectorField` whose samples have standard deviation ``TOY_FLOW_STD_NM``.
    """
    from .flow import TransferableFlow

    system, topology, encoding = harmonic_chain(n_particles, TOY_SIGMA_NM, TOY_TEMPERATURE_K)
    flow = TransferableFlow(LinearVectorField(np.log(TOY_FLOW_STD_NM / 0.1)), length_scale=0.1,
                            prior_std=1.0).double()
    return system, topology, encoding, flow


def assert_detailed_balance(move, thermodynamic_state, sampler_state, state_function, target_probabilities,
                            n_steps: int = 2000, n_sigma: float = 5.0, context_cache=None) -> dict:
    """Check that an MCMC move leaves a known distribution invariant, with detailed balance between bins.

    The configuration space is cut into bins ``a = state_function(positions_nm)`` of known target probability
    ``pi_a``. Starting from ``sampler_state`` (which should be a sample of the target, so that the chain is
    stationary from the first step), the move is applied ``n_steps`` times and the bin of every state is
    recorded. Two things are tested, each within ``n_sigma`` standard errors derived from the sample size and
    the chain's statistical inefficiency (pymbar):

    1. occupancy: the fraction of states in bin ``a`` matches ``pi_a``;
    2. detailed balance: ``pi_a P(a->b) = pi_b P(b->a)`` for every pair of bins, with ``P(a->b)`` estimated from
       the transition counts. A move that is reversible with respect to a *different* distribution, or that is
       not reversible at all, fails.

    Parameters
    ----------
    move : openmmtools.mcmc.MCMCMove
    thermodynamic_state : openmmtools.states.ThermodynamicState
    sampler_state : openmmtools.states.SamplerState
        The starting state (copied; not modified).
    state_function : callable
        ``state_function(positions_nm: ndarray (n_atoms, 3)) -> int`` in ``range(len(target_probabilities))``.
    target_probabilities : array_like
        Exact target probability of each bin (sums to 1).
    n_steps : int
        Number of move applications.
    n_sigma : float
        Tolerance in standard errors.
    context_cache : openmmtools.cache.ContextCache, optional
        Default: a fresh cache.

    Returns
    -------
    dict
        ``bins`` (n_steps + 1,), ``counts`` (K, K) transition counts, ``occupancy`` (K,), ``occupancy_z`` (K,),
        ``balance_z`` (K, K), ``statistical_inefficiency``.

    Raises
    ------
    AssertionError
        If the occupancy or the detailed-balance condition is off by more than ``n_sigma`` standard errors.
    ValueError
        For bad arguments (bin outside the range, probabilities not summing to 1).
    """
    import copy

    from .quiet import quiet_openmmtools
    from .utils import to_nm

    with quiet_openmmtools():
        from openmmtools import cache
        from pymbar import timeseries

    pi = np.asarray(target_probabilities, dtype=np.float64)
    k = len(pi)
    if k < 2 or np.any(pi <= 0) or abs(pi.sum() - 1.0) > 1e-8:
        raise ValueError(f"target_probabilities must be >= 2 positive numbers summing to 1, got {pi}.")
    if context_cache is None:
        context_cache = cache.ContextCache()
    state = copy.deepcopy(sampler_state)

    def bin_of(s):
        b = int(state_function(to_nm(s.positions)))
        if not 0 <= b < k:
            raise ValueError(f"state_function returned {b}, outside range({k}).")
        return b

    bins = [bin_of(state)]
    for _ in range(int(n_steps)):
        move.apply(thermodynamic_state, state, context_cache=context_cache)
        bins.append(bin_of(state))
    bins = np.asarray(bins)
    n = len(bins)
    indicators = (bins[:, None] == np.arange(k)[None, :]).astype(np.float64)
    g = []
    for a in range(k):
        series = indicators[:, a]
        g.append(timeseries.statistical_inefficiency(series) if 0 < series.sum() < n else float(n))
    g = np.asarray(g)
    occupancy = indicators.mean(axis=0)
    occupancy_se = np.sqrt(pi * (1 - pi) * g / n)
    occupancy_z = (occupancy - pi) / occupancy_se
    counts = np.zeros((k, k))
    np.add.at(counts, (bins[:-1], bins[1:]), 1.0)
    visits = counts.sum(axis=1)
    if np.any(visits == 0):
        raise AssertionError(f"Bins {np.flatnonzero(visits == 0).tolist()} were never visited in {n_steps} "
                             f"steps (target probabilities {pi.tolist()}): the move does not sample the target.")
    p_hat = counts / visits[:, None]
    # Transitions out of a bin are correlated through the chain: inflate by the largest inefficiency.
    g_max = float(g.max())
    var = pi[:, None] ** 2 * p_hat * (1 - p_hat) / visits[:, None]
    flux = pi[:, None] * p_hat
    balance_se = np.sqrt(g_max * (var + var.T))
    balance_z = np.zeros((k, k))
    nonzero = balance_se > 0
    balance_z[nonzero] = (flux - flux.T)[nonzero] / balance_se[nonzero]
    # Pairs never seen in either direction carry no information; a one-sided pair with zero variance is a
    # violation only if its flux is clearly non-zero, which the occupancy test catches.
    result = {"bins": bins, "counts": counts, "occupancy": occupancy, "occupancy_z": occupancy_z,
              "balance_z": balance_z, "statistical_inefficiency": g}
    problems = []
    if np.any(np.abs(occupancy_z) > n_sigma):
        problems.append(f"bin occupancy {np.round(occupancy, 4).tolist()} differs from the target "
                        f"{np.round(pi, 4).tolist()} (z = {np.round(occupancy_z, 2).tolist()})")
    if np.any(np.abs(balance_z) > n_sigma):
        a, b = np.unravel_index(np.argmax(np.abs(balance_z)), balance_z.shape)
        problems.append(f"detailed balance violated between bins {a} and {b}: pi_a P(a->b) = {flux[a, b]:.4g}, "
                        f"pi_b P(b->a) = {flux[b, a]:.4g} (z = {balance_z[a, b]:.2f})")
    if problems:
        raise AssertionError(f"{type(move).__name__} over {n_steps} steps (statistical inefficiency "
                             f"{np.round(g, 2).tolist()}): " + "; ".join(problems) + ".")
    return result


def reordered(topology, positions_nm):
    """The same molecule with its atoms listed in reverse order within each residue (as when hydrogens come after
    the heavy atoms in a PDB file): ``(topology, positions in the new order, order)``, where ``order[i]`` is the
    original index of new atom ``i``. For tests and benchmarks of Systems whose particle order differs from a
    Topology's."""
    from openmm import app

    new = app.Topology()
    atoms, order = {}, []
    for chain in topology.chains():
        c = new.addChain(chain.id)
        for residue in chain.residues():
            r = new.addResidue(residue.name, c, residue.id)
            for atom in list(residue.atoms())[::-1]:
                atoms[atom.index] = new.addAtom(atom.name, atom.element, r, atom.id)
                order.append(atom.index)
    for a, b in topology.bonds():
        new.addBond(atoms[a.index], atoms[b.index])
    return new, np.asarray(positions_nm)[order], np.asarray(order)
