"""openmm-nice: Boltzmann generators for OpenMM systems with NICE flows."""

from __future__ import annotations

import os as _os

# Before torch loads its OpenMP runtime (which reads this once, when it loads): threads that
# wait for work sleep instead of spinning. With spinning threads, torch's two-thread kernels ran
# the implicit-solvent energies 14-19x slower beside two busy processes on a 2-core machine
# (benchmarks/RESULTS.md, "Torch threads beside busy processes"). A value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from importlib import metadata as _metadata  # noqa: E402

from openmm_nice.analysis.free_energy import (
    FreeEnergyMap,
    FreeEnergyProfile,
    free_energy_map,
    free_energy_profile,
    jensen_shannon_divergence,
)
from openmm_nice.analysis.observables import compute_observable, ramachandran
from openmm_nice.analysis.reweighting import (
    Estimate,
    bootstrap_error,
    effective_sample_size,
    expectation,
    log_partition_function,
    probability,
    region_free_energy,
)
from openmm_nice.analysis.state_reweighting import reweight_frames
from openmm_nice.analysis.weight_diagnostics import (
    RegionDiagnostics,
    WeightDiagnostics,
    block_ess,
    diagnose_region,
    diagnose_weights,
    max_weight_share,
    pareto_k,
)
from openmm_nice.config import Config, ConfigError, config_from_dict, load_config
from openmm_nice.energy.energies import (
    DoubleWell1D,
    DoubleWell2D,
    Energy,
    ManyWell,
    MuellerBrown,
    regularize_energy,
)
from openmm_nice.energy.openmm_energy import OpenMMEnergy, TorchEnergy
from openmm_nice.energy.torch_energy import TorchSystemEnergy
from openmm_nice.errors import UserInputError
from openmm_nice.flows.conditional import ConditionalGaussian
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.flows.transforms import AdditiveCoupling, LULinear, nice_flow
from openmm_nice.molecule.coordinates import MolecularTransform
from openmm_nice.molecule.internal_coordinates import InternalCoordinates
from openmm_nice.molecule.systems import (
    MolecularSystem,
    alanine_dipeptide_implicit,
    alanine_dipeptide_vacuum,
    from_pdb,
    from_xml,
    load_molecular_system,
)
from openmm_nice.molecule.zmatrix import build_zmatrix
from openmm_nice.runs import Run, Samples, load_run, sample_run, sweep_latent_dims, train_run
from openmm_nice.sampling.ais import annealed_importance_sampling
from openmm_nice.training.trainer import Trainer, TrainingInterrupted

__all__ = [
    "AdditiveCoupling",
    "BoltzmannGenerator",
    "BoltzmannGeneratorMove",
    "ConditionalGaussian",
    "Config",
    "ConfigError",
    "DoubleWell1D",
    "DoubleWell2D",
    "Energy",
    "Estimate",
    "FreeEnergyMap",
    "FreeEnergyProfile",
    "InternalCoordinates",
    "LULinear",
    "ManyWell",
    "MolecularSystem",
    "MolecularTransform",
    "MuellerBrown",
    "OpenMMEnergy",
    "Run",
    "Samples",
    "TorchEnergy",
    "TorchSystemEnergy",
    "Trainer",
    "TrainingInterrupted",
    "UserInputError",
    "WeightDiagnostics",
    "RegionDiagnostics",
    "alanine_dipeptide_implicit",
    "alanine_dipeptide_vacuum",
    "annealed_importance_sampling",
    "block_ess",
    "bootstrap_error",
    "build_zmatrix",
    "compute_observable",
    "config_from_dict",
    "diagnose_weights",
    "diagnose_region",
    "effective_sample_size",
    "expectation",
    "free_energy_map",
    "free_energy_profile",
    "from_pdb",
    "from_xml",
    "jensen_shannon_divergence",
    "load_config",
    "load_molecular_system",
    "load_run",
    "log_partition_function",
    "max_weight_share",
    "nice_flow",
    "pareto_k",
    "probability",
    "ramachandran",
    "region_free_energy",
    "regularize_energy",
    "reweight_frames",
    "sample_run",
    "sweep_latent_dims",
    "train_run",
]

try:  # one source: the installed package's metadata (pyproject.toml)
    __version__ = _metadata.version("openmm-nice")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    # The move subclasses openmmtools' MCMCMove; importing openmmtools takes seconds, so the
    # package imports it on first use only.
    if name == "BoltzmannGeneratorMove":
        from openmm_nice.sampling.moves import BoltzmannGeneratorMove

        return BoltzmannGeneratorMove
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
