"""replicate_system: K copies that never interact, each copy's energy and forces exact."""

from __future__ import annotations

import numpy as np
import openmm
import pytest

from openmm_nice.energy.replicas import copy_parameters, replicate_system
from openmm_nice.molecule.systems import alanine_dipeptide_vacuum

RTOL = 1e-9


def reference_context(system: openmm.System) -> openmm.Context:
    return openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )


def single_copies(system: openmm.System, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies (K,) and forces (K, N, 3) of each configuration, one at a time."""
    context = reference_context(system)
    energies, forces = [], []
    for configuration in positions:
        context.setPositions(configuration)
        state = context.getState(energy=True, forces=True)
        energies.append(state.getPotentialEnergy()._value)
        forces.append(state.getForces(asNumpy=True)._value)
    return np.array(energies), np.array(forces)


def replicated(
    system: openmm.System, positions: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Total energy, per-copy energies (K,) and per-copy forces (K, N, 3) in one K-copy Context."""
    copies = len(positions)
    context = reference_context(replicate_system(system, copies))
    context.setPositions(positions.reshape(-1, 3))
    state = context.getState(energy=True, forces=True, parameterDerivatives=True)
    derivatives = state.getEnergyParameterDerivatives()
    energies = np.array([derivatives[name] for name in copy_parameters(copies)])
    forces = state.getForces(asNumpy=True)._value.reshape(positions.shape)
    return state.getPotentialEnergy()._value, energies, forces


def check_copies(system: openmm.System, positions: np.ndarray) -> None:
    energies, forces = single_copies(system, positions)
    total, copy_energies, copy_forces = replicated(system, positions)
    np.testing.assert_allclose(copy_energies, energies, rtol=RTOL)
    assert total == pytest.approx(energies.sum(), rel=RTOL)
    scale = np.abs(forces).max()
    np.testing.assert_allclose(copy_forces, forces, rtol=RTOL, atol=RTOL * scale)


def test_alanine_copies_match_single_context():
    molecule = alanine_dipeptide_vacuum()
    rng = np.random.default_rng(3)
    positions = molecule.positions + 0.02 * rng.standard_normal((6, *molecule.positions.shape))
    positions[1] = positions[0]  # two copies on top of each other: they must not notice
    check_copies(molecule.system, positions)


def four_particles_every_force() -> openmm.System:
    """Four particles with every supported force, parameters that are not all alike."""
    system = openmm.System()
    for mass in (12.0, 1.0, 14.0, 16.0):
        system.addParticle(mass)
    bonds = openmm.HarmonicBondForce()
    bonds.addBond(0, 1, 0.11, 3e5)
    bonds.addBond(1, 2, 0.15, 2e5)
    angles = openmm.HarmonicAngleForce()
    angles.addAngle(0, 1, 2, 1.9, 400.0)
    angles.addAngle(1, 2, 3, 2.1, 300.0)
    torsions = openmm.PeriodicTorsionForce()
    torsions.addTorsion(0, 1, 2, 3, 3, 0.3, 1.5)
    torsions.addTorsion(0, 1, 2, 3, 1, 3.0, 0.7)
    rb = openmm.RBTorsionForce()
    rb.addTorsion(3, 2, 1, 0, 1.0, -0.5, 2.0, 0.3, -0.2, 0.1)
    nonbonded = openmm.NonbondedForce()
    for charge, sigma, epsilon in [
        (0.4, 0.3, 0.5),
        (-0.2, 0.25, 0.1),
        (0.3, 0.32, 0.6),
        (-0.5, 0.3, 0.4),
    ]:
        nonbonded.addParticle(charge, sigma, epsilon)
    nonbonded.addException(0, 1, 0.0, 1.0, 0.0)  # excluded
    nonbonded.addException(2, 1, 0.0, 1.0, 0.0)
    nonbonded.addException(0, 3, -0.1, 0.29, 0.2)  # scaled 1-4 pair with its own parameters
    custom_bond = openmm.CustomBondForce("scale*k*d^2; d = r - r0")
    custom_bond.addGlobalParameter("scale", 0.7)
    custom_bond.addEnergyParameterDerivative("scale")
    custom_bond.addPerBondParameter("k")
    custom_bond.addPerBondParameter("r0")
    custom_bond.addBond(2, 3, [5e4, 0.13])
    custom_angle = openmm.CustomAngleForce("a*cos(theta)^2")
    custom_angle.addPerAngleParameter("a")
    custom_angle.addAngle(0, 2, 3, [3.0])
    custom_torsion = openmm.CustomTorsionForce("b*sin(theta)")
    custom_torsion.addPerTorsionParameter("b")
    custom_torsion.addTorsion(1, 0, 3, 2, [2.5])
    external = openmm.CustomExternalForce("c*(x^2 + 2*y - z)")
    external.addPerParticleParameter("c")
    external.addParticle(0, [1.5])
    external.addParticle(3, [-0.5])
    external.setForceGroup(3)
    for force in (bonds, angles, torsions, rb, openmm.CMMotionRemover(), nonbonded):
        system.addForce(force)
    for force in (custom_bond, custom_angle, custom_torsion, external):
        system.addForce(force)
    return system


def test_every_supported_force():
    system = four_particles_every_force()
    chain = np.array([[0.0, 0.0, 0.0], [0.11, 0.0, 0.0], [0.16, 0.14, 0.0], [0.3, 0.15, 0.09]])
    rng = np.random.default_rng(4)
    positions = chain + 0.01 * rng.standard_normal((5, 4, 3))
    check_copies(system, positions)
    copies = replicate_system(system, 5)
    assert copies.getNumParticles() == 20
    assert not any(isinstance(force, openmm.CMMotionRemover) for force in copies.getForces())
    assert {force.getForceGroup() for force in copies.getForces()} == {0, 3}


def test_global_parameters_stay_shared():
    """The original's global parameters keep one value for all copies, and their derivatives."""
    system = four_particles_every_force()
    rng = np.random.default_rng(5)
    positions = np.array([[0.0, 0.0, 0.0], [0.11, 0.0, 0.0], [0.16, 0.14, 0.0], [0.3, 0.15, 0.09]])
    positions = positions + 0.01 * rng.standard_normal((3, 4, 3))
    single = reference_context(system)
    single.setParameter("scale", 1.3)
    expected = 0.0
    for configuration in positions:
        single.setPositions(configuration)
        state = single.getState(parameterDerivatives=True)
        expected += state.getEnergyParameterDerivatives()["scale"]
    context = reference_context(replicate_system(system, 3))
    context.setParameter("scale", 1.3)
    context.setPositions(positions.reshape(-1, 3))
    derivative = context.getState(parameterDerivatives=True).getEnergyParameterDerivatives()
    assert derivative["scale"] == pytest.approx(expected, rel=RTOL)


def with_force(force: openmm.Force) -> openmm.System:
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
    system.addForce(force)
    return system


def nonbonded(method: int) -> openmm.NonbondedForce:
    force = openmm.NonbondedForce()
    force.addParticle(0.1, 0.3, 0.5)
    force.addParticle(-0.1, 0.3, 0.5)
    force.setNonbondedMethod(method)
    return force


def offsets() -> openmm.NonbondedForce:
    force = nonbonded(openmm.NonbondedForce.NoCutoff)
    force.addGlobalParameter("lambda", 1.0)
    force.addParticleParameterOffset("lambda", 0, 0.1, 0.0, 0.0)
    return force


def gbsa() -> openmm.GBSAOBCForce:
    force = openmm.GBSAOBCForce()
    force.addParticle(0.1, 0.15, 1.0)
    force.addParticle(-0.1, 0.15, 1.0)
    return force


def custom_nonbonded() -> openmm.CustomNonbondedForce:
    force = openmm.CustomNonbondedForce("r")
    force.addParticle([])
    force.addParticle([])
    return force


def cmap() -> openmm.CMAPTorsionForce:
    force = openmm.CMAPTorsionForce()
    force.addMap(2, [0.0] * 4)
    return force


@pytest.mark.parametrize(
    "force, match",
    [
        (gbsa(), r"force 0 \(GBSAOBCForce\) cannot be replicated.*batching='loop'"),
        (custom_nonbonded(), r"CustomNonbondedForce\) cannot be replicated.*batching='loop'"),
        (cmap(), r"CMAPTorsionForce\) cannot be replicated"),
        (nonbonded(openmm.NonbondedForce.CutoffNonPeriodic), r"method 1, not NoCutoff.*'loop'"),
        (offsets(), "parameter offsets"),
    ],
)
def test_unsupported_forces_refused(force, match):
    with pytest.raises(ValueError, match=match):
        replicate_system(with_force(force), 4)


def test_reserved_parameter_name_refused():
    force = openmm.CustomExternalForce("openmm_nice_copy_0*x")
    force.addGlobalParameter("openmm_nice_copy_0", 1.0)
    force.addParticle(0, [])
    with pytest.raises(ValueError, match=r"\['openmm_nice_copy_0'\].*reserves"):
        replicate_system(with_force(force), 2)


@pytest.mark.parametrize("copies, error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_copies(copies, error):
    with pytest.raises(error, match="copies must be"):
        replicate_system(with_force(gbsa()), copies)
