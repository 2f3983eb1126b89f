"""Packaging of openmm_tbg (transferable Boltzmann generators for OpenMM)."""

from setuptools import find_packages, setup

setup(
    name="openmm_tbg",
    version="0.1.0",
    description="Transferable Boltzmann generators for small peptides in OpenMM",
    packages=find_packages(include=["openmm_tbg", "openmm_tbg.*"]),
    package_data={"openmm_tbg": ["models/*.pt", "models/*.md"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "scipy",
        "networkx",
        "torch>=2.1",  # not pinned: users keep their own (CUDA or CPU) build
        "torchdiffeq",
        "openmm>=8.0",
        "openmmtools",
        "mdtraj",
        "PeptideBuilder",
        "biopython",  # imported directly by peptides.py (PeptideBuilder's own dependency)
        "pymbar",  # statistical inefficiency in openmm_tbg.testing (openmmtools' own dependency)
        "tqdm",
        "matplotlib",
        "pyyaml",
        "pot",  # optimal transport for the torus Wasserstein distance (evaluation)
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["openmm-tbg = openmm_tbg.cli:main"]},
)
