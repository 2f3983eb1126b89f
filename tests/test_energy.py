"""Tests of openmm_tbg.energy: reduced potentials from a real OpenMM System."""

import numpy as np
import openmm
import pytest
from openmm import unit

from openmm_tbg.energy import MOLAR_GAS_CONSTANT, ReducedPotential, select_platform, to_kelvin
from openmm_tbg.testing import harmonic_chain


def chain_system(n_atoms=3, k=250.0):
    """n particles in a chain of HarmonicBondForce bonds with r0 = 0 (k in kJ/mol/nm^2)."""
    return harmonic_chain(n_atoms, spring_constant=k)[0]


def test_reduced_potential_matches_closed_form():
    k = 250.0
    system = chain_system(3, k)
    u = ReducedPotential(system, 300 * unit.kelvin, platform="Reference")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, 3))
    expected = 0.5 * k * (np.sum((x[:, 0] - x[:, 1]) ** 2, -1) + np.sum((x[:, 1] - x[:, 2]) ** 2, -1))
    np.testing.assert_allclose(u.energies(x), expected, rtol=1e-10)
    np.testing.assert_allclose(u(x), expected / (MOLAR_GAS_CONSTANT * 300.0), rtol=1e-10)
    # A single frame and a Quantity are accepted.
    np.testing.assert_allclose(u(x[0] * unit.nanometer), expected[:1] / u.kT, rtol=1e-10)
    assert u.statistics == {"n_evaluated": 15, "n_non_finite_positions": 0, "n_non_finite_energy": 0}


def test_non_finite_positions_and_energies_are_infinite_and_counted():
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
    force = openmm.CustomBondForce("1/r")  # infinite when the two particles coincide
    force.addBond(0, 1, [])
    system.addForce(force)
    u = ReducedPotential(system, 300.0, platform="Reference")
    x = np.zeros((4, 2, 3))
    x[0, 1] = [0.1, 0, 0]       # finite
    x[1, 0, 0] = np.nan         # NaN position
    x[2, 1, 2] = np.inf         # infinite position
    # x[3]: both particles at the origin -> 1/0
    values = u(x)
    assert np.isfinite(values[0]) and values[0] == pytest.approx(10.0 / u.kT)
    assert np.all(values[1:] == np.inf)
    assert u.statistics["n_non_finite_positions"] == 2
    assert u.statistics["n_non_finite_energy"] == 1
    assert u.statistics["n_evaluated"] == 4


def test_worker_processes_agree_with_in_process_context():
    system = chain_system(4)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 4, 3))
    x[3, 2, 1] = np.nan
    single = ReducedPotential(system, 310.0, platform="CPU")
    with ReducedPotential(system, 310.0, platform="CPU", n_workers=2, min_frames_per_worker=4) as pooled:
        np.testing.assert_allclose(pooled(x), single(x), rtol=1e-6)
        assert pooled._pool is not None  # the batch really went to the workers
        assert pooled.statistics["n_non_finite_positions"] == 1


def test_temperature_and_shape_errors():
    system = chain_system(2)
    with pytest.raises(TypeError, match="not temperature units"):
        ReducedPotential(system, 300 * unit.nanometer)
    with pytest.raises(ValueError, match="outside the supported range"):
        ReducedPotential(system, 0.0)
    with pytest.raises(ValueError, match="outside the supported range"):
        to_kelvin(5000 * unit.kelvin)
    assert to_kelvin(25 * unit.kelvin) == 25.0
    u = ReducedPotential(system, 300.0, platform="Reference")
    with pytest.raises(ValueError, match="shape"):
        u(np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="not available"):
        select_platform("NoSuchPlatform")
    assert select_platform(None).getName() in ("CUDA", "OpenCL", "CPU", "Reference")
