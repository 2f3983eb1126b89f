"""Reduced potentials ``u = U / kT`` of batches of positions, from the user's own OpenMM System.

The flow proposes configurations; their Boltzmann weights need the energy of the user's exact Hamiltonian.
`ReducedPotential` evaluates it with one OpenMM Context per worker: a single in-process Context on GPU
platforms (one context saturates the device) and for small batches, or a pool of worker processes on the
CPU, each holding its own Context built from the System serialized with ``openmm.XmlSerializer``.

Non-finite positions or energies give ``u = +inf`` (importance weight 0, always rejected); they are counted
in `ReducedPotential.statistics`, never silently replaced.
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import Optional

import numpy as np
import openmm
from openmm import unit

from .checks import as_frames
# The platform choice lives in utils (one preference order for energies and MD); importable from here too.
from .utils import PLATFORM_PREFERENCE, select_platform  # noqa: F401

logger = logging.getLogger(__name__)

__all__ = ["ReducedPotential", "select_platform", "to_kelvin", "MOLAR_GAS_CONSTANT", "regularise",
           "reduced_potential_torch", "REGULARISATION_CUTOFF"]

#: Reduced potentials above this (relative to the batch's minimum, kT) are flattened linear-logarithmically for
#: gradients (`regularise`): clashes of 1e10 kT would otherwise dominate every training step.
REGULARISATION_CUTOFF = 1000.0

#: Molar gas constant in kJ/(mol K), the same value as openmm.unit's MOLAR_GAS_CONSTANT_R.
MOLAR_GAS_CONSTANT = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)

#: Temperatures outside this range (kelvin) are refused as almost certainly a unit mistake.
TEMPERATURE_RANGE_K = (1.0, 2000.0)


def to_kelvin(temperature, *, name: str = "temperature") -> float:
    """Convert a temperature to a float in kelvin, refusing wrong units and implausible values.

    Parameters
    ----------
    temperature : openmm.unit.Quantity or float
        A Quantity with temperature units, or a plain number taken as kelvin.
    name : str
        The argument's name, used in error messages.

    Returns
    -------
    float
        The temperature in kelvin.

    Raises
    ------
    TypeError
        If the Quantity does not have temperature units or the value is not a number.
    ValueError
        If the value lies outside 1-2000 K or is not finite.
    """
    if unit.is_quantity(temperature):
        if not temperature.unit.is_compatible(unit.kelvin):
            raise TypeError(
                f"{name} has units of {temperature.unit}, which are not temperature units. "
                f"Pass a temperature such as 310*openmm.unit.kelvin (or a plain number in kelvin).")
        value = temperature.value_in_unit(unit.kelvin)
    else:
        value = temperature
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in kelvin or an openmm.unit Quantity, got {temperature!r}. "
                        f"Pass e.g. 310*openmm.unit.kelvin.") from None
    low, high = TEMPERATURE_RANGE_K
    if not np.isfinite(value) or not (low <= value <= high):
        raise ValueError(
            f"{name} = {value} K is outside the supported range {low:g}-{high:g} K. "
            f"Check the units: pass e.g. 310*openmm.unit.kelvin.")
    return value


def _make_context(system: openmm.System, platform: openmm.Platform, properties: dict) -> openmm.Context:
    # Any integrator will do: the context is only used for energies.
    integrator = openmm.VerletIntegrator(0.001)
    context = openmm.Context(system, integrator, platform, properties)
    # Keep the integrator alive as long as the context.
    context._tbg_integrator = integrator
    return context


def _energies_kj(context: openmm.Context, positions: np.ndarray, forces: bool = False):
    """Potential energies (kJ/mol) of finite-position frames, and with ``forces`` their forces (kJ/mol/nm);
    errors from OpenMM give ``+inf`` energy (and zero force), as do non-finite forces.

    Returns ``(energies, n_errors)``, or ``(energies, forces, n_errors)`` with ``forces``; ``n_errors`` counts the
    frames whose evaluation raised an OpenMMException.
    """
    energies = np.full(len(positions), np.inf)
    f = np.zeros(positions.shape) if forces else None
    n_errors = 0
    for i, frame in enumerate(positions):
        try:
            context.setPositions(frame)
            state = context.getState(getEnergy=True, getForces=forces)
            energies[i] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            if forces:
                f[i] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        except openmm.OpenMMException as error:  # e.g. "Particle coordinate is NaN"
            n_errors += 1
            logger.debug("OpenMM could not evaluate frame %d: %s", i, error)
    if not forces:
        return energies, n_errors
    bad = ~np.isfinite(f).all(axis=(1, 2))
    energies[bad] = np.inf
    f[bad] = 0.0
    return energies, f, n_errors


# ----------------------------------------------------------------------------------------------------------
# Worker processes (CPU platform only). Module-level state so that the pool initializer can set it.
_WORKER_CONTEXT: Optional[openmm.Context] = None


def _worker_init(system_xml: str, platform_name: str, properties: dict) -> None:
    global _WORKER_CONTEXT
    system = openmm.XmlSerializer.deserialize(system_xml)
    _WORKER_CONTEXT = _make_context(system, openmm.Platform.getPlatformByName(platform_name), properties)


def _worker_energies(positions: np.ndarray, forces: bool = False):
    return _energies_kj(_WORKER_CONTEXT, positions, forces)


class ReducedPotential:
    """Reduced potentials ``u = U(x) / kT`` of batches of positions, from an OpenMM System.

    Parameters
    ----------
    system : openmm.System
        The user's System (the target Hamiltonian). It is serialized, so later changes to it are not seen.
    temperature : openmm.unit.Quantity or float
        Temperature (kelvin if a plain number), 1-2000 K.
    platform : None, str or openmm.Platform, optional
        OpenMM platform; None picks CUDA > OpenCL > CPU > Reference.
    n_workers : int, optional
        Number of worker processes with one Context each. Only used on the CPU and Reference platforms; GPU
        platforms always use one in-process Context. None means 1 (the CPU platform is itself multithreaded).
    min_frames_per_worker : int
        Batches smaller than ``n_workers * min_frames_per_worker`` are evaluated in-process, because
        sending them to workers costs more than it saves.
    platform_properties : dict, optional
        OpenMM platform properties, e.g. ``{"Precision": "mixed"}``.

    Attributes
    ----------
    kT : float
        Thermal energy in kJ/mol.
    statistics : dict
        ``n_evaluated`` (frames given), ``n_non_finite_positions``, ``n_non_finite_energy`` (including frames
        OpenMM refused to evaluate). Non-finite results are returned as ``+inf``.

    Examples
    --------
    >>> u = ReducedPotential(system, 310 * unit.kelvin)          # doctest: +SKIP
    >>> u(positions_nm)                                           # doctest: +SKIP
    """

    def __init__(self, system: openmm.System, temperature, platform=None, n_workers: Optional[int] = None,
                 min_frames_per_worker: int = 64, platform_properties: Optional[dict] = None):
        if not isinstance(system, openmm.System):
            raise TypeError(f"system must be an openmm.System, got {type(system).__name__}. "
                            f"Create one with openmm.app.ForceField.createSystem(topology, ...).")
        self.temperature = to_kelvin(temperature)
        self.kT = MOLAR_GAS_CONSTANT * self.temperature
        self.n_atoms = system.getNumParticles()
        self.platform = select_platform(platform)
        self._properties = dict(platform_properties or {})
        self._system_xml = openmm.XmlSerializer.serialize(system)
        name = self.platform.getName()
        if n_workers is None:
            n_workers = 1
        if int(n_workers) < 1:
            raise ValueError(f"n_workers must be at least 1, got {n_workers}.")
        if name not in ("CPU", "Reference") and n_workers > 1:
            logger.info("Platform %s uses one in-process context; ignoring n_workers=%d.", name, n_workers)
            n_workers = 1
        self.n_workers = int(n_workers)
        self.min_frames_per_worker = int(min_frames_per_worker)
        self._context = _make_context(openmm.XmlSerializer.deserialize(self._system_xml), self.platform,
                                      self._properties)
        self._pool = None
        self.statistics = {"n_evaluated": 0, "n_non_finite_positions": 0, "n_non_finite_energy": 0}
        logger.info("ReducedPotential: %d atoms, T = %.2f K, platform %s, %d worker(s).",
                    self.n_atoms, self.temperature, name, self.n_workers)

    # -- pool management ------------------------------------------------------------------------------------
    def _get_pool(self):
        if self._pool is None:
            # "spawn": a forked child would inherit OpenMM/torch thread state, which is not fork-safe.
            mp = multiprocessing.get_context("spawn")
            props = dict(self._properties)
            if self.platform.getName() == "CPU":
                props.setdefault("Threads", "1")
            self._pool = mp.Pool(self.n_workers, initializer=_worker_init,
                                 initargs=(self._system_xml, self.platform.getName(), props))
        return self._pool

    def close(self) -> None:
        """Shut down the worker processes (if any). The in-process context stays usable."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "ReducedPotential":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self):
        raise TypeError("ReducedPotential holds OpenMM contexts and cannot be pickled; create a new one from "
                        "the System in the other process.")

    # -- evaluation -----------------------------------------------------------------------------------------
    def _evaluate(self, positions_nm, forces: bool):
        """Energies (and forces) of finite frames, through the workers for large batches; counts failures."""
        x = as_frames(positions_nm, self.n_atoms, hint=f" The System has {self.n_atoms} particles.")
        n = len(x)
        finite = np.isfinite(x).all(axis=(1, 2))
        energies = np.full(n, np.inf)
        f = np.zeros(x.shape) if forces else None
        todo = np.flatnonzero(finite)
        n_errors = 0
        if len(todo) >= self.n_workers * self.min_frames_per_worker and self.n_workers > 1:
            chunks = np.array_split(todo, self.n_workers)
            jobs = [(x[c], forces) for c in chunks]
            for c, out in zip(chunks, self._get_pool().starmap(_worker_energies, jobs)):
                energies[c] = out[0]
                if forces:
                    f[c] = out[1]
                n_errors += out[-1]
        elif len(todo):
            out = _energies_kj(self._context, x[todo], forces)
            energies[todo], n_errors = out[0], out[-1]
            if forces:
                f[todo] = out[1]
        n_bad_positions = int(n - finite.sum())
        bad_energy = ~np.isfinite(energies) & finite
        energies[~np.isfinite(energies)] = np.inf  # -inf or NaN energies are failures too
        self.statistics["n_evaluated"] += n
        self.statistics["n_non_finite_positions"] += n_bad_positions
        self.statistics["n_non_finite_energy"] += int(bad_energy.sum())
        if n_bad_positions or bad_energy.any():
            logger.debug("%d frame(s) with non-finite positions, %d with non-finite energy (%d OpenMM errors).",
                         n_bad_positions, int(bad_energy.sum()), n_errors)
        return energies, f

    def energies(self, positions_nm) -> np.ndarray:
        """Potential energies in kJ/mol; ``+inf`` where positions or energies are not finite.

        Parameters
        ----------
        positions_nm : array_like or openmm.unit.Quantity, shape (n_frames, n_atoms, 3) or (n_atoms, 3)
            Positions in nm.

        Returns
        -------
        numpy.ndarray, shape (n_frames,)
        """
        return self._evaluate(positions_nm, forces=False)[0]

    def energies_and_forces(self, positions_nm) -> tuple[np.ndarray, np.ndarray]:
        """Potential energies (kJ/mol) and forces (kJ/mol/nm) of a batch, for training with the Hamiltonian.

        Parameters
        ----------
        positions_nm : array_like or openmm.unit.Quantity, shape (n_frames, n_atoms, 3) or (n_atoms, 3)
            Positions in nm.

        Returns
        -------
        energies : numpy.ndarray, shape (n_frames,)
            ``+inf`` where positions, energy or forces are not finite (counted in `statistics`).
        forces : numpy.ndarray, shape (n_frames, n_atoms, 3)
            ``-dU/dx``; zero where the energy is ``+inf``.
        """
        return self._evaluate(positions_nm, forces=True)

    def reduced_and_gradient(self, positions_nm) -> tuple[np.ndarray, np.ndarray]:
        """Reduced potentials ``u = U / kT`` and their gradients ``du/dx`` (1/nm); see `energies_and_forces`."""
        energies, forces = self.energies_and_forces(positions_nm)
        return energies / self.kT, -forces / self.kT

    def __call__(self, positions_nm) -> np.ndarray:
        """Reduced potentials ``u = U / kT`` (unitless); ``+inf`` for non-finite positions or energies.

        Parameters
        ----------
        positions_nm : array_like or openmm.unit.Quantity
            nm, shaped as for :meth:`energies`.

        Returns
        -------
        numpy.ndarray
            ``(n_frames,)`` reduced potentials.
        """
        return self.energies(positions_nm) / self.kT


def regularise(u: np.ndarray, cutoff: float = REGULARISATION_CUTOFF) -> tuple[np.ndarray, np.ndarray]:
    """Linear-logarithmic regularisation of reduced potentials for gradients (as bgflow's ``LinLogCutoff``).

    ``u_reg = u`` below ``u_min + cutoff`` and ``u_c + log(1 + u - u_c)`` above it (``u_c = u_min + cutoff``,
    ``u_min`` the smallest finite ``u`` of the batch), so that a clash of 1e10 kT pulls no harder than a
    moderate strain. Importance weights and every reported figure use the true ``u``; this is for training.

    Parameters
    ----------
    u : numpy.ndarray
        Reduced potentials (kT); ``+inf`` entries stay ``+inf``.
    cutoff : float
        kT above the batch minimum where the logarithmic branch starts.

    Returns
    -------
    u_reg : numpy.ndarray
    slope : numpy.ndarray
        ``du_reg / du`` (1 below the cutoff, ``1 / (1 + u - u_c)`` above, 0 where ``u`` is infinite).
    """
    u = np.asarray(u, dtype=np.float64)
    finite = np.isfinite(u)
    if not finite.any():
        return u.copy(), np.zeros_like(u)
    u_c = float(u[finite].min()) + float(cutoff)
    excess = np.where(finite, u - u_c, 0.0)
    high = excess > 0
    u_reg = np.where(high, u_c + np.log1p(np.where(high, excess, 0.0)), u)
    slope = np.where(high, 1.0 / (1.0 + np.where(high, excess, 0.0)), 1.0)
    return u_reg, np.where(finite, slope, 0.0)


class _ReducedPotentialFunction:
    """Holder of the autograd function (built lazily so that importing energy does not import torch)."""

    function = None

    @classmethod
    def get(cls):
        if cls.function is None:
            import torch

            class ReducedPotentialFunction(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, potential, cutoff):
                    u, grad = potential.reduced_and_gradient(x.detach().cpu().double().numpy())
                    u_reg, slope = regularise(u, cutoff)
                    ctx.save_for_backward(torch.as_tensor(grad * slope[:, None, None]).to(x))
                    true = torch.as_tensor(u, dtype=torch.float64, device=x.device)
                    ctx.mark_non_differentiable(true)  # reported, never differentiated
                    return torch.as_tensor(u_reg, dtype=torch.float64, device=x.device), true

                @staticmethod
                def backward(ctx, grad_reg, grad_true):
                    (grad,) = ctx.saved_tensors
                    return grad * grad_reg.to(grad)[:, None, None], None, None

            cls.function = ReducedPotentialFunction
        return cls.function


def reduced_potential_torch(potential: "ReducedPotential", x, cutoff: float = REGULARISATION_CUTOFF):
    """Reduced potentials of a torch batch of positions, differentiable with respect to the positions.

    Energies and forces come from OpenMM (`ReducedPotential.reduced_and_gradient`); the backward pass returns
    ``du_reg/dx`` of the regularised potential (`regularise`), so that losses such as the reverse KL divergence
    ``E_q[u + log q]`` can differentiate through a flow's sampling path.

    Parameters
    ----------
    potential : ReducedPotential
    x : torch.Tensor
        ``(B, N, 3)`` positions, nm (any float dtype, any device; OpenMM runs on the platform of ``potential``).
    cutoff : float
        Regularisation cutoff, kT above the batch minimum.

    Returns
    -------
    u_reg : torch.Tensor
        ``(B,)`` float64 regularised reduced potentials, differentiable; ``+inf`` where the energy is not finite
        (its gradient is zero: leave such rows out of a loss).
    u : torch.Tensor
        ``(B,)`` float64 true reduced potentials, not differentiable (for weights and reports).
    """
    u_reg, u = _ReducedPotentialFunction.get().apply(x, potential, float(cutoff))
    return u_reg, u.detach()
