"""The torch energy of a System against OpenMM's Reference platform, force by force."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from openmm_nice.energy import torch_energy
from openmm_nice.energy.openmm_energy import OpenMMEnergy
from openmm_nice.energy.torch_energy import ONE_4PI_EPS0, TorchEvaluator, TorchSystemEnergy
from openmm_nice.molecule.systems import (
    alanine_dipeptide_implicit,
    alanine_dipeptide_vacuum,
    from_pdb,
)

MD_FRAMES = Path(__file__).parents[2] / "data" / "alanine_dipeptide_md_500K.npz"
RTOL = 1e-9  # relative to each configuration's energy and largest force; OpenMM's: 1e-6


def reference(system: openmm.System, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies (kJ/mol) and forces (kJ/mol/nm) from a Reference-platform Context."""
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    energies, forces = [], []
    for configuration in positions:
        context.setPositions(configuration)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy()._value)
        forces.append(state.getForces(asNumpy=True)._value)
    return np.array(energies), np.array(forces)


def torch_values(system: openmm.System, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies and forces (by autograd) from TorchSystemEnergy, float64."""
    x = torch.tensor(positions.reshape(len(positions), -1), requires_grad=True)
    energy = TorchSystemEnergy(system)(x)
    (gradient,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach().numpy(), -gradient.numpy().reshape(positions.shape)


def assert_close(energies, forces, expected_energies, expected_forces, rtol=RTOL):
    energy_scale = np.maximum(np.abs(expected_energies), 1.0)
    assert (np.abs(energies - expected_energies) <= rtol * energy_scale).all(), (
        np.abs(energies - expected_energies) / energy_scale
    ).max()
    force_scale = np.abs(expected_forces).max(axis=(1, 2), keepdims=True)
    assert (np.abs(forces - expected_forces) <= rtol * force_scale).all(), (
        np.abs(forces - expected_forces) / force_scale
    ).max()


def with_only(system: openmm.System, force_type: type) -> openmm.System:
    """A System of the same particles with only the force of this type."""
    single = openmm.System()
    for i in range(system.getNumParticles()):
        single.addParticle(system.getParticleMass(i))
    (force,) = [f for f in system.getForces() if type(f) is force_type]
    single.addForce(openmm.XmlSerializer.clone(force))
    return single


def rb_torsions(system: openmm.System) -> openmm.System:
    """The System's torsions as an RBTorsionForce with random coefficients, alone."""
    (periodic,) = [f for f in system.getForces() if isinstance(f, openmm.PeriodicTorsionForce)]
    rb = openmm.RBTorsionForce()
    rng = np.random.default_rng(7)
    for k in range(periodic.getNumTorsions()):
        rb.addTorsion(*periodic.getTorsionParameters(k)[:4], *rng.normal(0.0, 5.0, 6))
    single = with_only(system, openmm.PeriodicTorsionForce)
    single.removeForce(0)
    single.addForce(rb)
    return single


def synthetic_gb(n: int) -> openmm.System:
    """A CustomGBForce that uses what the real ones do not: exclusions, a global parameter,
    coordinates, a ParticlePair value read by a SingleParticle one, values in pair terms."""
    force = openmm.CustomGBForce()
    force.addGlobalParameter("k", 0.5)
    force.addPerParticleParameter("q")
    force.addPerParticleParameter("a")
    force.addPerParticleParameter("t")
    force.addComputedValue("S", "a2*exp(-r^2/w); w=0.04", openmm.CustomGBForce.ParticlePair)
    force.addComputedValue("T", "S + x^2 - z + k*a", openmm.CustomGBForce.SingleParticle)
    # Tables that are not symmetric, looked up by an integer parameter t as GBn2 does.
    force.addTabulatedFunction("scale", openmm.Discrete1DFunction([1.0, 0.5, 2.0]))
    table = openmm.Discrete2DFunction(3, 2, [0.1, 0.2, 0.3, 0.5, 0.7, 1.1])
    force.addTabulatedFunction("offset", table)
    force.addEnergyTerm("scale(t)*q*T^2", openmm.CustomGBForce.SingleParticle)
    force.addEnergyTerm(
        "q1*q2*T1*T2/(r + offset(t1, min(t2, 1)))", openmm.CustomGBForce.ParticlePair
    )
    force.addEnergyTerm("k*(a1+a2)*exp(-r) + S1*S2", openmm.CustomGBForce.ParticlePairNoExclusions)
    rng = np.random.default_rng(3)
    for _ in range(n):
        force.addParticle([rng.normal(), rng.uniform(0.5, 1.5), rng.integers(3)])
    for i in range(n - 2):  # 1-2 and 1-3 pairs along the chain, as a force field excludes
        force.addExclusion(i, i + 1)
        force.addExclusion(i + 2, i)
    system = openmm.System()
    for _ in range(n):
        system.addParticle(1.0)
    system.addForce(force)
    return system


def custom_bonded(system: openmm.System) -> openmm.System:
    """The System's bonds, angles and torsions as CustomBondForce, CustomAngleForce and
    CustomTorsionForce with expressions that the harmonic forms do not have: odd powers, a
    global parameter, a term odd in the torsion (its sign convention), select and step."""
    forces = {type(f): f for f in system.getForces()}
    bonds = openmm.CustomBondForce("0.5*k*(r-r0)^2 + c*(r-r0)^3")
    bonds.addGlobalParameter("c", 300.0)
    bonds.addPerBondParameter("r0")
    bonds.addPerBondParameter("k")
    harmonic = forces[openmm.HarmonicBondForce]
    for k in range(harmonic.getNumBonds()):
        i, j, r0, kb = harmonic.getBondParameters(k)
        bonds.addBond(i, j, [r0._value, kb._value])
    angles = openmm.CustomAngleForce("k*(theta-theta0)^2 + g*cos(theta)")
    angles.addGlobalParameter("g", 2.0)
    angles.addPerAngleParameter("theta0")
    angles.addPerAngleParameter("k")
    harmonic = forces[openmm.HarmonicAngleForce]
    for k in range(harmonic.getNumAngles()):
        i, j, m, theta0, ka = harmonic.getAngleParameters(k)
        angles.addAngle(i, j, m, [theta0._value, 0.5 * ka._value])
    torsions = openmm.CustomTorsionForce(
        "k*(1+cos(n*theta-theta0)) + s*sin(theta) + select(step(theta), 0.1, 0.3)*theta^2"
    )
    torsions.addGlobalParameter("s", 1.5)
    for name in ("n", "theta0", "k"):
        torsions.addPerTorsionParameter(name)
    periodic = forces[openmm.PeriodicTorsionForce]
    for k in range(periodic.getNumTorsions()):
        *atoms, n, phase, kt = periodic.getTorsionParameters(k)
        torsions.addTorsion(*atoms, [n, phase._value, kt._value])
    custom = openmm.System()
    for i in range(system.getNumParticles()):
        custom.addParticle(system.getParticleMass(i))
    for force in (bonds, angles, torsions):
        custom.addForce(force)
    return custom


def custom_nonbonded(system: openmm.System) -> openmm.System:
    """The System's Lennard-Jones and Coulomb pairs as a CustomNonbondedForce (the exceptions'
    pairs excluded), scaled per particle type through a discrete table, with a global
    parameter."""
    (nonbonded,) = [f for f in system.getForces() if isinstance(f, openmm.NonbondedForce)]
    force = openmm.CustomNonbondedForce(
        "4*eps*((sig/r)^12 - (sig/r)^6) + kc*q1*q2/r + scale(t1)*scale(t2)*exp(-r);"
        "sig=0.5*(sigma1+sigma2); eps=sqrt(epsilon1*epsilon2)"
    )
    force.addGlobalParameter("kc", ONE_4PI_EPS0)
    for name in ("q", "sigma", "epsilon", "t"):
        force.addPerParticleParameter(name)
    force.addTabulatedFunction("scale", openmm.Discrete1DFunction([0.5, 1.0, 2.0]))
    for i in range(nonbonded.getNumParticles()):
        q, sigma, epsilon = nonbonded.getParticleParameters(i)
        force.addParticle([q._value, sigma._value, epsilon._value, i % 3])
    for k in range(nonbonded.getNumExceptions()):
        force.addExclusion(*nonbonded.getExceptionParameters(k)[:2])
    custom = openmm.System()
    for i in range(system.getNumParticles()):
        custom.addParticle(system.getParticleMass(i))
    custom.addForce(force)
    return custom


def amber19(pdb: Path) -> openmm.System | None:
    """Alanine dipeptide with amber19-all.xml (ff19SB: CMAP), or None where this OpenMM has no
    such file (OpenMM 8.2, the declared floor, has none)."""
    try:
        return from_pdb(pdb, ["amber19-all.xml"]).system
    except ValueError as error:
        if "amber19-all.xml" not in str(error):
            raise
        return None


def needs(molecules: dict, name: str) -> openmm.System:
    if molecules[name] is None:
        pytest.skip(f"this OpenMM has no force field files for {name}")
    return molecules[name]


@pytest.fixture(scope="module")
def molecules(tmp_path_factory) -> dict[str, openmm.System]:
    vacuum = alanine_dipeptide_vacuum()
    pdb = tmp_path_factory.mktemp("pdb") / "alanine.pdb"
    with open(pdb, "w") as handle:
        app.PDBFile.writeFile(vacuum.topology, vacuum.positions * unit.nanometer, handle)
    return {
        "vacuum": vacuum.system,
        "implicit": alanine_dipeptide_implicit().system,
        "obc2": from_pdb(pdb, ["amber14-all.xml", "implicit/obc2.xml"]).system,
        "gbn2": from_pdb(pdb, ["amber14-all.xml", "implicit/gbn2.xml"]).system,
        "amber99_obc": from_pdb(pdb, ["amber99sbildn.xml", "amber99_obc.xml"]).system,
        "amber19": amber19(pdb),
    }


@pytest.fixture(scope="module")
def configurations() -> dict[str, np.ndarray]:
    """Alanine dipeptide configurations (6, 22, 3) in nm: perturbed, MD, clashing."""
    rng = np.random.default_rng(0)
    reference_positions = alanine_dipeptide_vacuum().positions
    md = np.load(MD_FRAMES)["x"][::300][:6].reshape(6, 22, 3)
    clashing = md.copy()
    for row in clashing:  # one atom 0.01 to 0.05 nm from another
        i, j = rng.choice(22, size=2, replace=False)
        direction = rng.standard_normal(3)
        row[i] = row[j] + rng.uniform(0.01, 0.05) * direction / np.linalg.norm(direction)
    return {
        "random": reference_positions + 0.02 * rng.standard_normal((6, 22, 3)),
        "md": md,
        "clashing": clashing,
    }


FORCES = [
    ("vacuum", openmm.HarmonicBondForce),
    ("vacuum", openmm.HarmonicAngleForce),
    ("vacuum", openmm.PeriodicTorsionForce),
    ("vacuum", openmm.NonbondedForce),
    ("implicit", openmm.CustomGBForce),
    ("obc2", openmm.CustomGBForce),
    ("gbn2", openmm.CustomGBForce),
    ("amber99_obc", openmm.GBSAOBCForce),
    ("amber19", openmm.CMAPTorsionForce),
]


@pytest.mark.parametrize("kind", ["random", "md", "clashing"])
@pytest.mark.parametrize(
    "molecule, force_type", FORCES, ids=[f"{m}-{f.__name__}" for m, f in FORCES]
)
def test_force_matches_openmm(molecules, configurations, molecule, force_type, kind):
    system = with_only(needs(molecules, molecule), force_type)
    positions = configurations[kind]
    assert_close(*torch_values(system, positions), *reference(system, positions))


@pytest.mark.parametrize("kind", ["random", "md", "clashing"])
def test_rb_torsions_match_openmm(molecules, configurations, kind):
    system = rb_torsions(molecules["vacuum"])
    positions = configurations[kind]
    assert_close(*torch_values(system, positions), *reference(system, positions))


@pytest.mark.parametrize("kind", ["random", "md", "clashing"])
def test_synthetic_custom_gb_matches_openmm(configurations, kind):
    system = synthetic_gb(22)
    positions = configurations[kind]
    assert_close(*torch_values(system, positions), *reference(system, positions))


@pytest.mark.parametrize("kind", ["random", "md", "clashing"])
def test_custom_bonded_forces_match_openmm(molecules, configurations, kind):
    system = custom_bonded(molecules["vacuum"])
    positions = configurations[kind]
    assert_close(*torch_values(system, positions), *reference(system, positions))
    for k in range(3):  # and each force alone
        alone = custom_bonded(molecules["vacuum"])
        for other in sorted({0, 1, 2} - {k}, reverse=True):
            alone.removeForce(other)
        assert_close(*torch_values(alone, positions), *reference(alone, positions))


@pytest.mark.parametrize("kind", ["random", "md", "clashing"])
def test_custom_nonbonded_force_matches_openmm(molecules, configurations, kind):
    system = custom_nonbonded(molecules["vacuum"])
    positions = configurations[kind]
    assert_close(*torch_values(system, positions), *reference(system, positions))


def test_custom_nonbonded_force_with_groups_or_a_cutoff_is_refused():
    def force(groups: bool, method: int) -> openmm.CustomNonbondedForce:
        f = openmm.CustomNonbondedForce("a1*a2/r")
        f.addPerParticleParameter("a")
        for _ in range(2):
            f.addParticle([1.0])
        if groups:
            f.addInteractionGroup([0], [1])
        f.setNonbondedMethod(method)
        return f

    with pytest.raises(ValueError, match="interaction groups.*'loop'"):
        TorchSystemEnergy(two_particles(force(True, openmm.CustomNonbondedForce.NoCutoff)))
    with pytest.raises(ValueError, match="CutoffNonPeriodic"):
        TorchSystemEnergy(
            two_particles(force(False, openmm.CustomNonbondedForce.CutoffNonPeriodic))
        )


def reaction_field(system: openmm.System, switching: bool) -> openmm.System:
    """The System's NonbondedForce alone with CutoffNonPeriodic at 0.5 nm (alanine dipeptide is
    about 1 nm across), optionally with the switching function from 0.4 nm."""
    single = with_only(system, openmm.NonbondedForce)
    force = single.getForce(0)
    force.setNonbondedMethod(openmm.NonbondedForce.CutoffNonPeriodic)
    force.setCutoffDistance(0.5)
    force.setUseSwitchingFunction(switching)
    force.setSwitchingDistance(0.4)
    return single


@pytest.mark.parametrize("switching", [False, True])
@pytest.mark.parametrize("kind", ["random", "md", "clashing"])
def test_reaction_field_cutoff_matches_openmm(molecules, configurations, kind, switching):
    system = reaction_field(molecules["vacuum"], switching)
    positions = configurations[kind]
    x = positions.reshape(len(positions), -1, 3)
    r = np.linalg.norm(x[:, :, None] - x[:, None], axis=-1)
    assert ((r > 0.5) & (r < 1.2)).any() and ((r > 0.4) & (r < 0.5)).any()  # both regimes
    assert_close(*torch_values(system, positions), *reference(system, positions))


@pytest.mark.parametrize("kind", ["random", "md", "clashing"])
def test_random_cmap_maps_match_openmm(configurations, kind):
    # two rough maps (random values: the splines' derivatives matter), terms on both, and a
    # torsion pair that shares no atoms, so the grid's origin and orientation are tested
    rng = np.random.default_rng(5)
    force = openmm.CMAPTorsionForce()
    for _ in range(2):
        force.addMap(24, rng.normal(0.0, 3.0, 24 * 24).tolist())
    force.addTorsion(0, 4, 5, 6, 8, 6, 8, 14, 16)
    force.addTorsion(1, 8, 14, 16, 18, 14, 16, 18, 19)
    force.addTorsion(0, 0, 1, 4, 5, 10, 8, 14, 15)
    system = openmm.System()
    for _ in range(22):
        system.addParticle(1.0)
    system.addForce(force)
    positions = configurations[kind]
    assert_close(*torch_values(system, positions), *reference(system, positions))


def test_custom_bonded_force_with_an_unknown_variable_is_refused():
    force = openmm.CustomBondForce("k*r^2 + q")  # q: neither a parameter nor r
    force.addGlobalParameter("k", 1.0)
    force.addBond(0, 1, [])
    with pytest.raises(ValueError, match=r"CustomBondForce's energy.*\['q'\]"):
        TorchSystemEnergy(two_particles(force))


@pytest.mark.parametrize(
    "molecule", ["vacuum", "implicit", "obc2", "gbn2", "amber99_obc", "amber19"]
)
def test_whole_systems_match_openmm(molecules, configurations, molecule):
    system = needs(molecules, molecule)
    positions = np.concatenate(list(configurations.values()))
    assert_close(*torch_values(system, positions), *reference(system, positions))


def test_coulomb_constant_is_openmm_s():
    system = openmm.System()
    force = openmm.NonbondedForce()
    for _ in range(2):
        system.addParticle(1.0)
        force.addParticle(1.0, 1.0, 0.0)
    system.addForce(force)
    positions = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    (energy,), _ = reference(system, positions)
    assert energy == pytest.approx(ONE_4PI_EPS0, rel=1e-15)
    assert torch_values(system, positions)[0][0] == pytest.approx(ONE_4PI_EPS0, rel=1e-15)


def test_motion_remover_is_ignored(molecules):
    forces = [type(f).__name__ for f in molecules["implicit"].getForces()]
    assert "CMMotionRemover" in forces and "CMMotionRemover" in torch_energy.supported_forces()
    energy = TorchSystemEnergy(molecules["implicit"])
    assert len(energy.terms) == len(forces) - 1


def test_devices_and_float32(device, molecules, configurations):
    """The module moves with .to(device) and evaluates in the input's dtype."""
    system = molecules["implicit"]
    positions = configurations["md"]
    expected, _ = reference(system, positions)
    energy = TorchSystemEnergy(system).to(device)
    x = torch.tensor(positions.reshape(6, -1), device=device)
    np.testing.assert_allclose(energy(x).cpu().numpy(), expected, rtol=1e-12)
    single = energy.to(torch.float32)(x.float())
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.cpu().numpy(), expected, rtol=1e-4)


def test_overlapping_atoms_give_non_finite_energy(molecules, configurations):
    positions = configurations["md"][:1].copy()
    positions[0, 1] = positions[0, 0]
    energies, _ = torch_values(molecules["implicit"], positions)
    assert not np.isfinite(energies[0])


# --- refusals --------------------------------------------------------------------------------


def two_particles(*forces: openmm.Force) -> openmm.System:
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
    for force in forces:
        system.addForce(force)
    return system


def nonbonded(method: int = openmm.NonbondedForce.NoCutoff) -> openmm.NonbondedForce:
    force = openmm.NonbondedForce()
    force.setNonbondedMethod(method)
    for _ in range(2):
        force.addParticle(0.5, 0.3, 0.5)
    return force


def gbsa(method: int) -> openmm.GBSAOBCForce:
    force = openmm.GBSAOBCForce()
    force.setNonbondedMethod(method)
    for _ in range(2):
        force.addParticle(0.5, 0.15, 0.8)
    return force


def external() -> openmm.CustomExternalForce:
    force = openmm.CustomExternalForce("x^2")
    force.addParticle(0, [])
    return force


def continuous_gb() -> openmm.CustomGBForce:
    force = openmm.CustomGBForce()
    force.addTabulatedFunction("f", openmm.Continuous1DFunction([0.0, 1.0, 2.0], 0.0, 1.0))
    force.addEnergyTerm("f(r)", openmm.CustomGBForce.ParticlePair)
    force.addParticle([])
    force.addParticle([])
    return force


def offsets() -> openmm.NonbondedForce:
    force = nonbonded()
    force.addGlobalParameter("lambda", 1.0)
    force.addParticleParameterOffset("lambda", 0, 0.1, 0.0, 0.0)
    return force


@pytest.mark.parametrize(
    "make, match",
    [
        (external, r"a CustomExternalForce, which the torch energy cannot evaluate.*'loop'"),
        (
            lambda: gbsa(openmm.GBSAOBCForce.CutoffNonPeriodic),
            r"GBSAOBCForce uses the nonbonded method CutoffNonPeriodic.*'loop'",
        ),
        (continuous_gb, r"'f' is a Continuous1DFunction.*'loop'"),
        (offsets, r"parameter offsets.*'loop'"),
    ],
)
def test_unsupported_forces_are_refused(make, match):
    system = two_particles(make())
    with pytest.raises(ValueError, match=match):
        TorchSystemEnergy(system)
    with pytest.raises(ValueError, match=match):
        OpenMMEnergy(system, 300.0, batching="torch")


def test_virtual_sites_and_periodic_systems_are_refused():
    system = two_particles(nonbonded())
    system.addParticle(0.0)
    system.setVirtualSite(2, openmm.TwoParticleAverageSite(0, 1, 0.5, 0.5))
    system.getForce(0).addParticle(0.0, 0.1, 0.0)
    with pytest.raises(ValueError, match="virtual sites"):
        TorchSystemEnergy(system)
    periodic = two_particles(nonbonded(openmm.NonbondedForce.PME))
    with pytest.raises(ValueError, match="periodic boundary conditions"):
        TorchSystemEnergy(periodic)


def test_unknown_variable_in_custom_gb_is_refused():
    force = openmm.CustomGBForce()
    force.addPerParticleParameter("q")
    force.addComputedValue("B", "q + C", openmm.CustomGBForce.SingleParticle)
    force.addComputedValue("C", "q", openmm.CustomGBForce.SingleParticle)
    force.addParticle([1.0])
    with pytest.raises(ValueError, match=r"computed value 'B' 'q \+ C' uses \['C'\]"):
        TorchSystemEnergy(two_particles(force))


# --- the evaluator and OpenMMEnergy(batching="torch") ----------------------------------------


def test_evaluator_chunks_in_place(monkeypatch, molecules, configurations):
    monkeypatch.setattr(torch_energy, "_CHUNK_PAIRS", 64 * 231)  # 64 rows a chunk
    system = molecules["implicit"]
    positions = np.concatenate([configurations["md"]] * 25)  # 150 rows: 3 chunks
    evaluate = TorchEvaluator(system, compile_after=None)
    energies, forces = np.full(150, np.nan), np.full(positions.shape, np.nan)
    evaluate(positions, energies, forces)
    assert_close(energies, forces, *reference(system, positions))
    assert not evaluate.compiled and evaluate.uncompiled_seconds > 0


def test_evaluator_keeps_going_when_compile_fails(monkeypatch, molecules, configurations):
    def broken_compile(module, **options):
        def compiled(x):
            raise RuntimeError("no C++ compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    system = molecules["implicit"]
    evaluate = TorchEvaluator(system, compile_after=0)
    positions = configurations["random"]
    energies, forces = np.empty(6), np.empty(positions.shape)
    with pytest.warns(RuntimeWarning, match="torch.compile of the torch energy failed"):
        evaluate(positions, energies, forces)
    assert_close(energies, forces, *reference(system, positions))
    assert not evaluate.compiled
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the torch energy failed")
        evaluate(positions, energies, forces)  # no second attempt, no second warning


def test_evaluator_arguments(molecules):
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        TorchEvaluator(molecules["vacuum"], threads=0)
    with pytest.raises(ValueError, match="compile_after must be >= 0 seconds or None, got -1"):
        TorchEvaluator(molecules["vacuum"], compile_after=-1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, while compiling
def test_compiled_evaluator_matches_uncompiled(configurations):
    """A real torch.compile (tens of seconds on a cold cache) on a small GB System."""
    system = synthetic_gb(22)
    positions = configurations["random"]
    compiled = TorchEvaluator(system, compile_after=0)
    energies, forces = np.empty(6), np.empty(positions.shape)
    with warnings.catch_warnings():
        # a failed compile warns and falls back
        warnings.filterwarnings("error", message="torch.compile of the torch energy failed")
        compiled(positions, energies, forces)
    assert compiled.compiled
    assert_close(energies, forces, *reference(system, positions), rtol=1e-12)


@pytest.mark.parametrize("n_workers", [1, 2])
def test_openmm_energy_torch_matches_context(molecules, configurations, n_workers):
    system = molecules["implicit"]
    positions = np.concatenate(list(configurations.values()) * 12)  # 216 rows
    expected_energies, expected_forces = reference(system, positions)
    with OpenMMEnergy(system, 300.0, n_workers=n_workers, batching="torch") as energy:
        assert energy.batching == "torch"
        for dtype in (torch.float64, torch.float32):
            x = torch.tensor(positions.reshape(len(positions), -1), dtype=dtype)
            x.requires_grad_(True)
            u = energy(x)
            u.sum().backward()
            assert u.dtype == dtype and x.grad.dtype == dtype
            if dtype == torch.float64:
                assert_close(
                    u.detach().numpy() * energy.kT,
                    -x.grad.numpy().reshape(positions.shape) * energy.kT,
                    expected_energies,
                    expected_forces,
                )
        with torch.inference_mode():
            u = energy(torch.tensor(positions.reshape(len(positions), -1)))
        np.testing.assert_allclose(u.numpy() * energy.kT, expected_energies, rtol=RTOL)


def test_openmm_energy_torch_non_finite_rows(molecules, configurations):
    """As the other paths: NaN coordinates and overlapping atoms give U = inf, gradient 0."""
    positions = configurations["md"].reshape(6, -1).copy()
    positions[1, 4] = math.nan
    positions[3, 3:6] = positions[3, :3]  # atoms 0 and 1 on top of each other
    with OpenMMEnergy(molecules["implicit"], 300.0, batching="torch") as energy:
        x = torch.tensor(positions, requires_grad=True)
        u = energy(x)
        u.sum().backward()
        u = u.detach()
        assert math.isinf(u[1]) and math.isinf(u[3]) and torch.isfinite(u[[0, 2, 4, 5]]).all()
        assert (x.grad[[1, 3]] == 0).all() and torch.isfinite(x.grad).all()
        assert energy.non_finite_count == 1 and energy.non_finite_energy_count == 1
