"""Shared pytest fixtures. Tests never read ../shared: small data lives in tests/data/."""

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """Directory with small data-set fixtures (AA, AC, GP, HT, NY: XY.pdb + XY.npz, splits.json)."""
    return DATA_DIR


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """One torch thread: the tests' tiny models are dominated by per-op overhead, and two OpenMP threads on a
    loaded 2-core machine were measured up to 500x slower per small matmul."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy():
    """The exactly solvable toy (see `openmm_tbg.testing.toy_chain`): a 3-particle harmonic chain and a flow
    with a closed-form density; (system, topology, encoding, flow)."""
    from openmm_tbg.testing import toy_chain

    return toy_chain(3)


def pytest_configure(config):
    # tests/test_cuda.py: `pytest -m cuda` selects the GPU checks (benchmarks/device_check.sh); skipped without CUDA.
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
