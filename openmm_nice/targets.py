"""Targets named by configs: toy energies and OpenMM molecules, and the models built for them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openmm_nice.config import Config
from openmm_nice.energy.energies import TOY_SYSTEMS, Energy
from openmm_nice.errors import ConfigError, UserInputError
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.io import read_frames
from openmm_nice.training.trainer import Trainer

__all__ = [
    "Target",
    "build_target",
    "build_generator",
    "build_trainer",
    "load_frames",
    "map_fitter",
    "openmm_energy_for",
    "TOY_SYSTEMS",
]


@dataclass
class Target:
    """What a config's ``system`` names: the energy, and for molecules their structure.

    Attributes:
        name: The system's name.
        energy: The reduced energy U in the sample files' coordinates.
        molecule: The :class:`~openmm_nice.molecule.systems.MolecularSystem`, or None for toys.
    """

    name: str
    energy: Energy
    molecule: Any = None

    @property
    def is_molecule(self) -> bool:
        return self.molecule is not None

    def mdtraj_topology(self):
        import mdtraj

        return mdtraj.Topology.from_openmm(self.molecule.topology)

    def close(self) -> None:
        close = getattr(self.energy, "close", None)
        if close is not None:
            close()


def _toy(spec: Any) -> Target | None:
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict) and "name" in spec and spec["name"] in TOY_SYSTEMS:
        options = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        return None
    if name not in TOY_SYSTEMS:
        return None
    try:
        energy = TOY_SYSTEMS[name](**options)
    except TypeError as error:
        raise UserInputError(f"bad options {options} for system {name!r}: {error}") from None
    return Target(name, energy)


def build_target(config: Config) -> Target:
    """The target of ``config.system``: a toy name (with options), or a molecule."""
    toy = _toy(config.system)
    if toy is not None:
        return toy
    from openmm_nice.molecule.systems import load_molecular_system

    try:
        molecule = load_molecular_system(config.system)
    except ValueError as error:
        raise UserInputError(f"{error}; toy systems are: {', '.join(TOY_SYSTEMS)}") from None
    return Target(molecule.name, openmm_energy_for(config, molecule.system), molecule)


def openmm_energy_for(config: Config, system, temperature: float | None = None):
    """The reduced energy of an OpenMM System as the config computes it, at ``temperature``
    (default the config's, in kelvin): by its ``engine``, an
    :class:`~openmm_nice.energy.openmm_energy.OpenMMEnergy` with the config's platform and
    workers, or a :class:`~openmm_nice.energy.openmm_energy.TorchEnergy` (``auto``: torch where
    it evaluates every force of the System)."""
    from openmm_nice.energy.openmm_energy import OpenMMEnergy, TorchEnergy, torch_refusal

    temperature = config.temperature if temperature is None else temperature
    engine = config.engine
    if engine == "auto":
        engine = "openmm" if torch_refusal(system) else "torch"
    if engine == "torch":
        try:
            return TorchEnergy(system, temperature)
        except UserInputError as error:
            raise UserInputError(
                f"engine: torch cannot evaluate this System: {error}. Set engine: openmm (or "
                "auto, which takes OpenMM for such a System)"
            ) from None
    return OpenMMEnergy(
        system,
        temperature,
        platform=config.platform,
        platform_properties=config.platform_properties or None,
        n_workers=config.n_workers,
    )


def load_frames(path: str | Path | list[str | Path], target: Target) -> torch.Tensor:
    """Training frames (F, energy.dim) from an npz with ``x`` or an mdtraj-readable trajectory;
    a list of files gives their frames pooled, in order."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise UserInputError("training data: the list of files is empty")
        return torch.cat([load_frames(item, target) for item in path])
    topology = target.mdtraj_topology() if target.is_molecule else None
    x = read_frames(path, topology, what=f"training data of {target.name!r}")
    if x.ndim != 2 or x.shape[1] != target.energy.dim:
        raise UserInputError(
            f"frames in {path} have shape {x.shape}, expected (F, {target.energy.dim})"
        )
    return torch.as_tensor(x)


def build_generator(
    config: Config, target: Target, frames: torch.Tensor | None = None
) -> BoltzmannGenerator:
    """The model of ``config.model`` for ``target``; molecules get internal coordinates
    fitted to ``frames`` (MD data: torsion densities, and cuts placed with the target's energy)
    or, without frames, normalised around the reference structure."""
    coordinates = None
    if target.is_molecule:
        from openmm_nice.molecule.coordinates import MolecularTransform
        from openmm_nice.molecule.zmatrix import build_zmatrix, handed_torsions, torsion_symmetries

        molecule = target.molecule
        zmatrix = build_zmatrix(molecule.topology)
        reference = molecule.positions.reshape(1, -1)
        # the stereoisomer of the reference structure, whatever frames or samples say
        handedness = handed_torsions(molecule.topology, zmatrix, reference)
        if frames is None and config.model.initial_torsions == "scan":
            coordinates = MolecularTransform.from_data(
                zmatrix,
                reference,
                handedness=handedness,
                energy=target.energy,
                scan_beta=config.training.beta_start,
                floor=config.model.torsion_floor,
                density_smoothing=config.model.torsion_smoothing,
                # learned: parameters from zero; fitted: none until the first refit brings frames
                stiff_conditioning=config.model.stiff_conditioning,
                stiff_hidden=config.model.stiff_hidden,
            )
        elif frames is None:
            coordinates = MolecularTransform.from_data(
                zmatrix,
                reference,
                handedness=handedness,
                stiff_conditioning=config.model.stiff_conditioning,
                stiff_hidden=config.model.stiff_hidden,
            )
        else:
            # The energy places each torsion's cut on a barrier, not in a basin the data missed.
            coordinates = MolecularTransform.from_data(
                zmatrix,
                frames,
                floor=config.model.torsion_floor,
                density_smoothing=config.model.torsion_smoothing,  # 360 bins: 1 degree each
                energy=target.energy,
                symmetry=torsion_symmetries(molecule.topology, zmatrix, molecule.system),
                handedness=handedness,
                torsion_tree=config.model.torsion_tree,
                tree_smoothing=config.model.torsion_tree_smoothing,
                stiff_conditioning=config.model.stiff_conditioning,
                stiff_hidden=config.model.stiff_hidden,
            )
    m = config.model
    dim = target.energy.dim if coordinates is None else int(coordinates.dim)
    if m.latent_dim is not None and m.latent_dim < dim:
        what = "3N - 6 internal coordinates" if target.is_molecule else "coordinates"
        raise ConfigError(
            f"model.latent_dim is {m.latent_dim}, below the dimension of x for {target.name} "
            f"({dim}: {what}); set model.latent_dim to at least {dim} (D = d + 6 as in the "
            f"examples: {dim + 6})"
        )
    generator = BoltzmannGenerator(
        target.energy,
        latent_dim=m.latent_dim,
        layers=m.layers,
        hidden=m.hidden,
        conditional_hidden=m.conditional_hidden,
        coordinates=coordinates,
        scale=m.scale,
        seed=config.seed,
    )
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    return generator.to(device=torch.device(config.device), dtype=dtype)


def build_trainer(
    config: Config, target: Target, frames=None, reporters=(), seed: int | None = None
) -> Trainer:
    """A :class:`~openmm_nice.training.trainer.Trainer` of a new model, as ``config.training`` says."""
    generator = build_generator(config, target, frames)
    dtype = generator.dtype
    t = config.training
    fit_map = None
    if target.is_molecule and t.map_refits:
        fit_map = map_fitter(config, target, generator.coordinates)
    return Trainer.from_config(
        generator,
        t,
        data=None if frames is None else frames.to(dtype),
        fit_map=fit_map,
        seed=config.seed if seed is None else seed,
        reporters=reporters,
    )


def map_fitter(config: Config, target: Target, coordinates):
    """The function ``fit_map(x, weights)`` with which a :class:`~openmm_nice.training.trainer.Trainer`
    refits a molecule's coordinate map to weighted samples: the same Z-matrix, handedness and
    rotor symmetries as ``coordinates``, torsion densities smoothed and floored as
    ``config.model`` says."""
    from openmm_nice.molecule.coordinates import MolecularTransform
    from openmm_nice.molecule.zmatrix import torsion_symmetries

    molecule = target.molecule
    zmatrix = coordinates.internal.zmatrix.cpu().numpy()
    symmetry = torsion_symmetries(molecule.topology, zmatrix, molecule.system)
    handedness = coordinates.torsion_sign.cpu().numpy()

    def fit_map(x: torch.Tensor, weights: torch.Tensor):
        learned = None
        if config.model.stiff_conditioning == "learned":
            # the trained coefficients stay; shift and scale are refitted to what they leave
            learned = coordinates.stiff_coefficients()
        return MolecularTransform.from_data(
            zmatrix,
            x,
            floor=config.model.torsion_floor,
            density_smoothing=config.model.torsion_smoothing,
            symmetry=symmetry,
            weights=weights,
            handedness=handedness,
            torsion_tree=config.model.torsion_tree,
            tree_smoothing=config.model.torsion_tree_smoothing,
            stiff_conditioning=config.model.stiff_conditioning,
            stiff_hidden=config.model.stiff_hidden,
            stiff_coefficients=learned,
            # the map's cuts now (a refit keeps those that still lie where samples are thinnest)
            cuts=coordinates.torsion_offset.detach().cpu() - math.pi,
        )

    return fit_map
