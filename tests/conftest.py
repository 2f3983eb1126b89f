"""Shared pytest fixtures. Tests never read ../shared: small data lives in tests/data/."""

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """Directory with small data-set fixtures (AA, AC, GP, HT, NY: XY.pdb + XY.npz, splits.json)."""
    return DATA_DIR
