"""openmm-nice: Boltzmann generators for OpenMM systems with NICE flows."""

from __future__ import annotations

from openmm_nice.conditional import ConditionalGaussian
from openmm_nice.coordinates import InternalCoordinates, MolecularTransform, build_zmatrix
from openmm_nice.energies import (
    DoubleWell1D,
    DoubleWell2D,
    Energy,
    ManyWell,
    MuellerBrown,
    regularize_energy,
)
from openmm_nice.generator import BoltzmannGenerator
from openmm_nice.openmm_energy import OpenMMEnergy
from openmm_nice.reweighting import (
    effective_sample_size,
    expectation,
    free_energy_profile,
    log_partition_function,
)
from openmm_nice.systems import (
    MolecularSystem,
    alanine_dipeptide_implicit,
    alanine_dipeptide_vacuum,
    load_molecular_system,
)
from openmm_nice.torch_energy import TorchSystemEnergy
from openmm_nice.training import Trainer
from openmm_nice.transforms import AdditiveCoupling, LULinear, nice_flow

__all__ = [
    "AdditiveCoupling",
    "BoltzmannGenerator",
    "ConditionalGaussian",
    "DoubleWell1D",
    "DoubleWell2D",
    "Energy",
    "InternalCoordinates",
    "LULinear",
    "ManyWell",
    "MolecularSystem",
    "MolecularTransform",
    "MuellerBrown",
    "OpenMMEnergy",
    "TorchSystemEnergy",
    "Trainer",
    "alanine_dipeptide_implicit",
    "alanine_dipeptide_vacuum",
    "build_zmatrix",
    "effective_sample_size",
    "expectation",
    "free_energy_profile",
    "load_molecular_system",
    "log_partition_function",
    "nice_flow",
    "regularize_energy",
]
__version__ = "0.1.0"
