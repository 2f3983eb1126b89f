"""Test helpers for users' own models and for the test suite.

``assert_equivariant`` checks that a vector field ``v(t, x, tokens, mask=None)`` has the symmetries the flow
relies on: rotations and reflections act on its output as on its input, translations of the input leave it
unchanged, and permuting atoms with identical tokens permutes its output.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["random_orthogonal", "interchangeable_permutation", "assert_equivariant"]


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
