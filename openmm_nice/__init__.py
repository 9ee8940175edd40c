"""openmm-nice: Boltzmann generators for OpenMM systems with NICE flows."""

from __future__ import annotations

from openmm_nice.energies import (
    DoubleWell1D,
    DoubleWell2D,
    Energy,
    ManyWell,
    MuellerBrown,
    regularize_energy,
)

__all__ = [
    "DoubleWell1D",
    "DoubleWell2D",
    "Energy",
    "ManyWell",
    "MuellerBrown",
    "regularize_energy",
]
__version__ = "0.1.0"
