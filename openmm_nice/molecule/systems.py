"""Molecular systems to sample: built-in test systems, PDB plus force field, serialized XML."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from openmm_nice.errors import UserInputError

__all__ = [
    "BUILT_IN_SYSTEMS",
    "MolecularSystem",
    "alanine_dipeptide_implicit",
    "alanine_dipeptide_vacuum",
    "from_pdb",
    "from_xml",
    "import_quietly",
    "load_molecular_system",
]

PathLike = str | os.PathLike


@dataclass
class MolecularSystem:
    """An OpenMM System with its topology and a reference structure.

    Arguments:
        system: The ``openmm.System`` that defines the energy.
        topology: The ``openmm.app.Topology`` (atoms, residues, bonds) of the same atoms.
        positions: Reference positions of shape (N, 3) in nm (converted to float64 numpy;
            an ``openmm.unit`` Quantity is converted to nm).
        name: A short label for logs and file names.
    """

    system: openmm.System
    topology: app.Topology
    positions: np.ndarray
    name: str

    def __post_init__(self) -> None:
        if unit.is_quantity(self.positions):
            self.positions = self.positions.value_in_unit(unit.nanometer)
        self.positions = np.array(self.positions, dtype=np.float64).reshape(-1, 3)
        counts = {
            "system particles": self.system.getNumParticles(),
            "topology atoms": self.topology.getNumAtoms(),
            "positions": len(self.positions),
        }
        if len(set(counts.values())) != 1:
            raise UserInputError(
                f"{self.name}: the atom counts disagree ({counts}); the System, Topology and "
                "positions must describe the same atoms in the same order"
            )

    @property
    def n_atoms(self) -> int:
        return len(self.positions)


def import_quietly(name: str):
    """The module ``name`` (e.g. ``openmmtools.mcmc``), without the banner that pymbar, which
    openmmtools imports, prints to stdout."""
    import contextlib
    import importlib
    import io
    import logging
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("pymbar").setLevel(logging.ERROR)
        return importlib.import_module(name)


def alanine_dipeptide_vacuum() -> MolecularSystem:
    """Alanine dipeptide (ACE-ALA-NME, 22 atoms) in vacuum from openmmtools, no constraints."""
    testsystems = import_quietly("openmmtools.testsystems")

    test = testsystems.AlanineDipeptideVacuum(constraints=None)
    return MolecularSystem(test.system, test.topology, test.positions, "alanine_dipeptide_vacuum")


def alanine_dipeptide_implicit() -> MolecularSystem:
    """Alanine dipeptide in implicit solvent from openmmtools, no constraints.

    openmmtools' ``AlanineDipeptideImplicit(constraints=None)``: the Amber ff96 System of
    :func:`alanine_dipeptide_vacuum` plus OBC GBSA (OpenMM's OBC1 as a CustomGBForce), no
    cutoff; the standard benchmark of Boltzmann generators.
    """
    testsystems = import_quietly("openmmtools.testsystems")

    test = testsystems.AlanineDipeptideImplicit(constraints=None)
    return MolecularSystem(test.system, test.topology, test.positions, "alanine_dipeptide_implicit")


def _existing(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    return path


def from_pdb(
    pdb_path: PathLike,
    forcefield: str | tuple[str, ...] | list[str] = ("amber14-all.xml",),
    name: str | None = None,
) -> MolecularSystem:
    """A System built from a PDB file with OpenMM force-field files, in vacuum or implicit solvent.

    The System has no cutoff (``NoCutoff``), no constraints and flexible water, because
    the flow moves every atom and the energy must see every degree of freedom. Adding an
    implicit-solvent file of OpenMM's (``"implicit/obc2.xml"``, ``"implicit/gbn2.xml"``, ...)
    to an Amber force field puts the molecule in implicit solvent (a CustomGBForce).

    Arguments:
        pdb_path: A PDB file with all atoms, hydrogens included.
        forcefield: Names of OpenMM force-field XML files (bundled names such as
            ``"amber14-all.xml"`` or ``["amber14-all.xml", "implicit/obc2.xml"]``, or paths),
            applied together.
        name: A label; the PDB file's stem by default.

    Returns:
        A :class:`MolecularSystem` with the PDB's positions as reference.
    """
    pdb_path = _existing(pdb_path, "PDB")
    names = (forcefield,) if isinstance(forcefield, str) else tuple(forcefield)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"forcefield must be a file name or a list of names, got {forcefield!r}")
    pdb = app.PDBFile(str(pdb_path))
    try:
        forcefield_all = app.ForceField(*names)
    except ValueError as error:
        raise UserInputError(
            f"cannot load force field {list(names)}: {error}; use files bundled with OpenMM "
            "such as 'amber14-all.xml' or 'amber99sbildn.xml', or paths to XML files"
        ) from None
    try:
        system = forcefield_all.createSystem(
            pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False
        )
    except ValueError as error:
        raise UserInputError(
            f"force field {list(names)} cannot parameterise {str(pdb_path)!r}: {error}; add the "
            "force-field files that define these residues, or add missing hydrogens first "
            "(e.g. with openmm.app.Modeller.addHydrogens)"
        ) from error
    return MolecularSystem(system, pdb.topology, pdb.positions, name or pdb_path.stem)


def from_xml(
    system_xml_path: PathLike, pdb_path: PathLike, name: str | None = None
) -> MolecularSystem:
    """A System deserialized from XML, with topology and positions from a PDB file.

    Arguments:
        system_xml_path: A file written by ``openmm.XmlSerializer.serialize(system)``.
        pdb_path: A PDB file with the same atoms in the same order.
        name: A label; the XML file's stem by default.

    Returns:
        A :class:`MolecularSystem` with the PDB's positions as reference.
    """
    xml_path = _existing(system_xml_path, "System XML")
    pdb_path = _existing(pdb_path, "PDB")
    try:
        system = openmm.XmlSerializer.deserialize(xml_path.read_text())
    except Exception as error:
        raise UserInputError(
            f"could not read an OpenMM System from {str(xml_path)!r} ({error}); write it with "
            "openmm.XmlSerializer.serialize(system)"
        ) from error
    if not isinstance(system, openmm.System):
        raise UserInputError(
            f"{str(xml_path)!r} holds a serialized {type(system).__name__}, not a System; "
            "write it with openmm.XmlSerializer.serialize(system)"
        )
    pdb = app.PDBFile(str(pdb_path))
    if system.getNumParticles() != pdb.topology.getNumAtoms():
        raise UserInputError(
            f"the System in {str(xml_path)!r} has {system.getNumParticles()} particles but "
            f"{str(pdb_path)!r} has {pdb.topology.getNumAtoms()} atoms; use the PDB the System "
            "was built from"
        )
    return MolecularSystem(system, pdb.topology, pdb.positions, name or xml_path.stem)


BUILT_IN_SYSTEMS = {
    "alanine_dipeptide_vacuum": alanine_dipeptide_vacuum,
    "alanine_dipeptide_implicit": alanine_dipeptide_implicit,
}
_SPEC_KEYS = ({"pdb"}, {"pdb", "forcefield"}, {"xml", "pdb"})


def load_molecular_system(spec: str | dict, base_dir: PathLike | None = None) -> MolecularSystem:
    """The molecular system a config names.

    Arguments:
        spec: A built-in name (``"alanine_dipeptide_vacuum"``,
            ``"alanine_dipeptide_implicit"``), ``{"pdb": path,
            "forcefield": [names]}`` (forcefield optional, amber14-all.xml by default), or
            ``{"xml": path, "pdb": path}``; either dict may add ``"name"``.
        base_dir: Directory that relative paths are resolved against (e.g. the config
            file's directory); the working directory by default.

    Returns:
        The :class:`MolecularSystem`.
    """
    if isinstance(spec, str):
        if spec not in BUILT_IN_SYSTEMS:
            raise UserInputError(
                f"unknown molecular system {spec!r}; built-in systems are {sorted(BUILT_IN_SYSTEMS)}, "
                "or give {'pdb': path, 'forcefield': [names]} or {'xml': path, 'pdb': path}"
            )
        return BUILT_IN_SYSTEMS[spec]()
    if not isinstance(spec, dict):
        raise TypeError(f"a molecular system spec is a name or a dict, got {type(spec).__name__}")
    name = spec.get("name")
    keys = set(spec) - {"name"}
    if keys not in _SPEC_KEYS:
        raise UserInputError(
            f"a molecular system dict has keys {sorted(spec)}; valid key sets are "
            "{'pdb', 'forcefield' (optional), 'name' (optional)} or "
            "{'xml', 'pdb', 'name' (optional)}"
        )

    def resolve(path: PathLike) -> Path:
        return Path(base_dir or ".") / Path(path)

    if "xml" in keys:
        return from_xml(resolve(spec["xml"]), resolve(spec["pdb"]), name=name)
    return from_pdb(resolve(spec["pdb"]), spec.get("forcefield", ("amber14-all.xml",)), name=name)
