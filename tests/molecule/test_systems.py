"""Molecular systems: the built-in alanine dipeptide, PDB plus force field, XML plus PDB."""

from __future__ import annotations

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from openmm_nice.energy.openmm_energy import OpenMMEnergy
from openmm_nice.molecule.systems import (
    MolecularSystem,
    alanine_dipeptide_implicit,
    alanine_dipeptide_vacuum,
    from_pdb,
    from_xml,
    load_molecular_system,
)


@pytest.fixture(scope="module")
def alanine() -> MolecularSystem:
    return alanine_dipeptide_vacuum()


@pytest.fixture
def pdb_path(alanine, tmp_path):
    path = tmp_path / "alanine.pdb"
    with open(path, "w") as handle:
        app.PDBFile.writeFile(alanine.topology, alanine.positions * unit.nanometer, handle)
    return path


@pytest.fixture
def xml_path(alanine, tmp_path):
    path = tmp_path / "alanine_system.xml"
    path.write_text(openmm.XmlSerializer.serialize(alanine.system))
    return path


def energy(molecular: MolecularSystem, positions: np.ndarray | None = None) -> float:
    """Potential energy in kJ/mol from a direct Reference-platform Context."""
    context = openmm.Context(
        molecular.system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    context.setPositions(molecular.positions if positions is None else positions)
    state = context.getState(getEnergy=True)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def test_alanine_dipeptide_vacuum(alanine):
    assert alanine.name == "alanine_dipeptide_vacuum"
    assert alanine.n_atoms == 22 and alanine.topology.getNumAtoms() == 22
    assert alanine.positions.shape == (22, 3) and alanine.positions.dtype == np.float64
    assert alanine.system.getNumConstraints() == 0
    assert not alanine.system.usesPeriodicBoundaryConditions()
    assert np.isfinite(energy(alanine))


def test_alanine_dipeptide_implicit(alanine):
    implicit = alanine_dipeptide_implicit()
    assert implicit.name == "alanine_dipeptide_implicit" and implicit.n_atoms == 22
    assert [a.name for a in implicit.topology.atoms()] == [a.name for a in alanine.topology.atoms()]
    assert implicit.system.getNumConstraints() == 0
    assert not implicit.system.usesPeriodicBoundaryConditions()
    (gb,) = [f for f in implicit.system.getForces() if isinstance(f, openmm.CustomGBForce)]
    assert gb.getNonbondedMethod() == openmm.CustomGBForce.NoCutoff
    # The same prmtop: without its GB force the System is the vacuum one, and the GB energy
    # (polar solvation of a polar molecule plus a small surface term) is negative.
    np.testing.assert_array_equal(implicit.positions, alanine.positions)
    without_gb = openmm.XmlSerializer.clone(implicit.system)
    without_gb.removeForce(
        [isinstance(f, openmm.CustomGBForce) for f in without_gb.getForces()].index(True)
    )
    vacuum = energy(alanine)
    assert energy(MolecularSystem(without_gb, implicit.topology, implicit.positions, "")) == (
        pytest.approx(vacuum, rel=1e-12)
    )
    assert energy(implicit) < vacuum


@pytest.mark.parametrize("solvent", ["implicit/obc2.xml", "implicit/gbn2.xml"])
def test_from_pdb_implicit_solvent(pdb_path, alanine, solvent):
    """PDB + force field + an implicit-solvent file: a GB force without cutoff, which
    OpenMMEnergy evaluates (as torch operations by default) exactly as a Context does."""
    molecular = from_pdb(pdb_path, forcefield=["amber14-all.xml", solvent])
    forces = [type(f).__name__ for f in molecular.system.getForces()]
    assert "CustomGBForce" in forces and molecular.system.getNumConstraints() == 0
    (gb,) = [f for f in molecular.system.getForces() if isinstance(f, openmm.CustomGBForce)]
    assert gb.getNonbondedMethod() == openmm.CustomGBForce.NoCutoff
    vacuum = from_pdb(pdb_path, forcefield="amber14-all.xml")
    assert energy(molecular) < energy(vacuum)
    with OpenMMEnergy(molecular.system, 300.0) as reduced:
        assert reduced.batching == "torch"
        u = reduced(torch.as_tensor(molecular.positions.reshape(1, -1)))
        assert u.item() * reduced.kT == pytest.approx(energy(molecular), rel=1e-10)


def test_from_pdb(pdb_path, alanine):
    molecular = from_pdb(pdb_path)
    assert molecular.name == "alanine" and molecular.n_atoms == 22
    assert molecular.system.getNumConstraints() == 0
    assert not molecular.system.usesPeriodicBoundaryConditions()
    # The PDB keeps 0.001 nm precision.
    np.testing.assert_allclose(molecular.positions, alanine.positions, atol=6e-4)
    assert np.isfinite(energy(molecular))
    other = from_pdb(pdb_path, forcefield="amber99sbildn.xml", name="ildn")
    assert other.name == "ildn" and np.isfinite(energy(other))


def test_from_pdb_errors(pdb_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pdb"):
        from_pdb(tmp_path / "missing.pdb")
    with pytest.raises(ValueError, match="no_such_field.xml"):
        from_pdb(pdb_path, forcefield=["amber14-all.xml", "no_such_field.xml"])
    with pytest.raises(ValueError, match="cannot parameterise"):
        from_pdb(pdb_path, forcefield=["amber14/tip3p.xml"])
    with pytest.raises(TypeError, match="forcefield"):
        from_pdb(pdb_path, forcefield=[1])


def test_from_xml_reproduces_the_serialized_system(xml_path, pdb_path, alanine):
    molecular = from_xml(xml_path, pdb_path)
    assert molecular.name == "alanine_system" and molecular.n_atoms == 22
    assert energy(molecular, alanine.positions) == pytest.approx(energy(alanine), rel=1e-12)


def test_from_xml_errors(xml_path, pdb_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.xml"):
        from_xml(tmp_path / "nothere.xml", pdb_path)
    with pytest.raises(FileNotFoundError, match="nothere.pdb"):
        from_xml(xml_path, tmp_path / "nothere.pdb")
    small = openmm.System()
    for _ in range(3):
        small.addParticle(1.0)
    small_path = tmp_path / "small.xml"
    small_path.write_text(openmm.XmlSerializer.serialize(small))
    with pytest.raises(ValueError, match="3 particles but .* 22 atoms"):
        from_xml(small_path, pdb_path)
    garbage = tmp_path / "garbage.xml"
    garbage.write_text("not xml")
    with pytest.raises(ValueError, match="could not read an OpenMM System"):
        from_xml(garbage, pdb_path)


def test_molecular_system_checks_atom_counts(alanine):
    with pytest.raises(ValueError, match="atom counts disagree"):
        MolecularSystem(alanine.system, alanine.topology, alanine.positions[:21], "bad")


def test_load_molecular_system(pdb_path, xml_path, tmp_path):
    assert load_molecular_system("alanine_dipeptide_vacuum").n_atoms == 22
    implicit = load_molecular_system("alanine_dipeptide_implicit")
    assert implicit.name == "alanine_dipeptide_implicit"
    by_pdb = load_molecular_system({"pdb": str(pdb_path), "forcefield": ["amber14-all.xml"]})
    assert by_pdb.n_atoms == 22
    by_xml = load_molecular_system({"xml": xml_path.name, "pdb": pdb_path.name}, base_dir=tmp_path)
    assert by_xml.n_atoms == 22 and by_xml.name == "alanine_system"
    named = load_molecular_system({"pdb": str(pdb_path), "name": "ala"})
    assert named.name == "ala"


def test_load_molecular_system_errors(pdb_path):
    with pytest.raises(ValueError, match="alanine_dipeptide_implicit.*alanine_dipeptide_vacuum"):
        load_molecular_system("alanine_tripeptide")
    with pytest.raises(ValueError, match="valid key sets"):
        load_molecular_system({"pdb": str(pdb_path), "forcefields": ["amber14-all.xml"]})
    with pytest.raises(ValueError, match="valid key sets"):
        load_molecular_system({"xml": "a.xml", "pdb": "a.pdb", "forcefield": ["x.xml"]})
    with pytest.raises(TypeError, match="a name or a dict"):
        load_molecular_system(["alanine_dipeptide_vacuum"])
