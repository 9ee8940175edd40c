"""Many non-interacting copies of a vacuum System in one System, each copy's energy readable apart."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import openmm
from openmm import unit

from openmm_nice.errors import UserInputError

__all__ = ["copy_parameters", "replicate_system"]

# 1/(4 pi eps0) in kJ nm / mol / e^2 as OpenMM 8.6's NonbondedForce uses it (2018 CODATA
# constants); the older 138.935456 is 3e-9 away, too far for a 1e-9 comparison.
_ONE_4PI_EPS0 = 138.93545764438198
_PREFIX = "openmm_nice_copy_"
_PAIR_ENERGY = (
    f"{_ONE_4PI_EPS0!r}*chargeprod/r + 4*epsilon*((sigma/r)^12 - (sigma/r)^6)"  # NoCutoff form
)
_RB_ENERGY = "c0 + c1*p + c2*p^2 + c3*p^3 + c4*p^4 + c5*p^5; p = cos(theta - 3.141592653589793)"


@dataclass
class _Terms:
    """One force's terms in custom form: what each copy's force is built from."""

    kind: type  # a key of _BUILD
    energy: str
    per_term: list[str]  # per-term parameter names
    terms: list[tuple[tuple[int, ...], tuple[float, ...]]]  # particles and parameters
    group: int
    global_parameters: list[tuple[str, float]] = field(default_factory=list)
    derivatives: list[str] = field(default_factory=list)  # the original force's derivatives


# The Custom forces copied as they are: term count, term reader, per-term parameter count and name.
_READ = {
    openmm.CustomBondForce: (
        "getNumBonds",
        "getBondParameters",
        "getNumPerBondParameters",
        "getPerBondParameterName",
    ),
    openmm.CustomAngleForce: (
        "getNumAngles",
        "getAngleParameters",
        "getNumPerAngleParameters",
        "getPerAngleParameterName",
    ),
    openmm.CustomTorsionForce: (
        "getNumTorsions",
        "getTorsionParameters",
        "getNumPerTorsionParameters",
        "getPerTorsionParameterName",
    ),
    openmm.CustomExternalForce: (
        "getNumParticles",
        "getParticleParameters",
        "getNumPerParticleParameters",
        "getPerParticleParameterName",
    ),
}
# The forces built: constructor from the energy, per-term parameter declaration, term adder.
# CustomExternalForce cannot differentiate by a parameter, so its terms become one-particle
# CustomCompoundBondForce terms.
_BUILD = {
    openmm.CustomBondForce: (
        openmm.CustomBondForce,
        "addPerBondParameter",
        lambda force, particles, parameters: force.addBond(*particles, parameters),
    ),
    openmm.CustomAngleForce: (
        openmm.CustomAngleForce,
        "addPerAngleParameter",
        lambda force, particles, parameters: force.addAngle(*particles, parameters),
    ),
    openmm.CustomTorsionForce: (
        openmm.CustomTorsionForce,
        "addPerTorsionParameter",
        lambda force, particles, parameters: force.addTorsion(*particles, parameters),
    ),
    openmm.CustomCompoundBondForce: (
        functools.partial(openmm.CustomCompoundBondForce, 1),
        "addPerBondParameter",
        lambda force, particles, parameters: force.addBond(particles, parameters),
    ),
}


def _md(value: unit.Quantity | float) -> float:
    """A number in OpenMM's MD units (nm, kJ/mol, radians, e) from a Quantity or a number."""
    if unit.is_quantity(value):
        return value.value_in_unit_system(unit.md_unit_system)
    return float(value)


def _custom_terms(force: openmm.Force) -> _Terms:
    kind = type(force)
    count, read, n_per_term, name = (getattr(force, method) for method in _READ[kind])
    terms = []
    for i in range(count()):
        *particles, parameters = read(i)
        terms.append((tuple(particles), tuple(parameters)))
    energy = force.getEnergyFunction()
    derivatives = []
    if kind is openmm.CustomExternalForce:
        kind = openmm.CustomCompoundBondForce
        energy += "; x = x1; y = y1; z = z1"
    else:
        derivatives = [
            force.getEnergyParameterDerivativeName(i)
            for i in range(force.getNumEnergyParameterDerivatives())
        ]
    return _Terms(
        kind,
        energy,
        [name(i) for i in range(n_per_term())],
        terms,
        force.getForceGroup(),
        [
            (force.getGlobalParameterName(i), force.getGlobalParameterDefaultValue(i))
            for i in range(force.getNumGlobalParameters())
        ],
        derivatives,
    )


def _harmonic_bond_terms(force: openmm.HarmonicBondForce) -> _Terms:
    terms = []
    for i in range(force.getNumBonds()):
        p1, p2, length, k = force.getBondParameters(i)
        terms.append(((p1, p2), (_md(length), _md(k))))
    return _Terms(
        openmm.CustomBondForce, "0.5*k*(r - r0)^2", ["r0", "k"], terms, force.getForceGroup()
    )


def _harmonic_angle_terms(force: openmm.HarmonicAngleForce) -> _Terms:
    terms = []
    for i in range(force.getNumAngles()):
        p1, p2, p3, angle, k = force.getAngleParameters(i)
        terms.append(((p1, p2, p3), (_md(angle), _md(k))))
    return _Terms(
        openmm.CustomAngleForce,
        "0.5*k*(theta - theta0)^2",
        ["theta0", "k"],
        terms,
        force.getForceGroup(),
    )


def _periodic_torsion_terms(force: openmm.PeriodicTorsionForce) -> _Terms:
    terms = []
    for i in range(force.getNumTorsions()):
        p1, p2, p3, p4, periodicity, phase, k = force.getTorsionParameters(i)
        terms.append(((p1, p2, p3, p4), (float(periodicity), _md(phase), _md(k))))
    return _Terms(
        openmm.CustomTorsionForce,
        "k*(1 + cos(n*theta - phase))",
        ["n", "phase", "k"],
        terms,
        force.getForceGroup(),
    )


def _rb_torsion_terms(force: openmm.RBTorsionForce) -> _Terms:
    terms = []
    for i in range(force.getNumTorsions()):
        *particles, c0, c1, c2, c3, c4, c5 = force.getTorsionParameters(i)
        terms.append((tuple(particles), tuple(_md(c) for c in (c0, c1, c2, c3, c4, c5))))
    return _Terms(
        openmm.CustomTorsionForce,
        _RB_ENERGY,
        [f"c{i}" for i in range(6)],
        terms,
        force.getForceGroup(),
    )


def _nonbonded_terms(force: openmm.NonbondedForce, index: int) -> _Terms:
    """Every pair that interacts, Lorentz-Berthelot or exception parameters, as pair terms.

    Pairs with zero charge product and zero epsilon are left out: for r > 0 they add nothing.
    """
    if force.getNonbondedMethod() != openmm.NonbondedForce.NoCutoff:
        raise UserInputError(
            f"force {index} (NonbondedForce) uses nonbonded method "
            f"{force.getNonbondedMethod()}, not NoCutoff (0); replicate_system copies only "
            "NoCutoff nonbonded interactions (a cutoff would need reaction-field terms): build the "
            "System with nonbondedMethod=NoCutoff, or evaluate it with batching='loop'"
        )
    if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
        raise UserInputError(
            f"force {index} (NonbondedForce) has parameter offsets, which replicate_system does "
            "not copy; evaluate this System with batching='loop'"
        )
    n = force.getNumParticles()
    parameters = [tuple(_md(value) for value in force.getParticleParameters(i)) for i in range(n)]
    excluded = set()
    terms = []
    for i in range(force.getNumExceptions()):
        p1, p2, chargeprod, sigma, epsilon = force.getExceptionParameters(i)
        excluded.add((min(p1, p2), max(p1, p2)))
        chargeprod, sigma, epsilon = _md(chargeprod), _md(sigma), _md(epsilon)
        if chargeprod != 0 or epsilon != 0:
            terms.append(((p1, p2), (chargeprod, sigma, epsilon)))
    for i in range(n):
        qi, si, ei = parameters[i]
        for j in range(i + 1, n):
            qj, sj, ej = parameters[j]
            chargeprod, epsilon = qi * qj, math.sqrt(ei * ej)
            if (i, j) not in excluded and (chargeprod != 0 or epsilon != 0):
                terms.append(((i, j), (chargeprod, 0.5 * (si + sj), epsilon)))
    return _Terms(
        openmm.CustomBondForce,
        _PAIR_ENERGY,
        ["chargeprod", "sigma", "epsilon"],
        terms,
        force.getForceGroup(),
    )


_CONVERT = {
    openmm.HarmonicBondForce: _harmonic_bond_terms,
    openmm.HarmonicAngleForce: _harmonic_angle_terms,
    openmm.PeriodicTorsionForce: _periodic_torsion_terms,
    openmm.RBTorsionForce: _rb_torsion_terms,
    **dict.fromkeys(_READ, _custom_terms),
}


@functools.lru_cache(maxsize=8)
def copy_parameters(copies: int) -> tuple[str, ...]:
    """The global parameters whose energy derivatives are the copies' energies, in copy order."""
    return tuple(f"{_PREFIX}{k}" for k in range(copies))


def _build(terms: _Terms, scale: str, offset: int) -> openmm.Force:
    """One copy's force: the terms with shifted particles, energy multiplied by ``scale``."""
    create, declare, add = _BUILD[terms.kind]
    main, *definitions = terms.energy.split(";")
    force = create(";".join([f"{scale}*({main})", *definitions]))
    for name in terms.per_term:
        getattr(force, declare)(name)
    for name, value in terms.global_parameters:
        force.addGlobalParameter(name, value)
    force.addGlobalParameter(scale, 1.0)
    for name in [*terms.derivatives, scale]:
        force.addEnergyParameterDerivative(name)
    for particles, parameters in terms.terms:
        add(force, [p + offset for p in particles], parameters)
    force.setForceGroup(terms.group)
    return force


def replicate_system(system: openmm.System, copies: int) -> openmm.System:
    r"""A System of ``copies`` non-interacting copies of a vacuum System.

    Copy k holds particles ``k N`` to ``(k + 1) N - 1``. No term couples two copies, whatever
    their positions: each copy's terms are the original's with shifted particle indices, and a
    NonbondedForce (NoCutoff only) becomes explicit pair terms over the molecule's own pairs
    (Lorentz-Berthelot mixing, exceptions with their own parameters). Each copy's terms live in
    Custom forces of its own whose energy is multiplied by a global parameter
    :math:`s_k = 1` (named ``copy_parameters(copies)[k]``) and which ask OpenMM for
    :math:`\partial E / \partial s_k = E_k`, so one
    ``getState(forces=True, parameterDerivatives=True)`` gives every copy's forces and energy.
    The total energy is :math:`\sum_k E_k`. CMMotionRemover is dropped (it adds no energy).

    Supported forces: HarmonicBondForce, HarmonicAngleForce, PeriodicTorsionForce,
    RBTorsionForce, NonbondedForce with NoCutoff and no parameter offsets, and
    Custom{Bond,Angle,Torsion,External}Force (their global parameters are shared by all copies,
    as in the original; a CustomExternalForce, which cannot differentiate by a parameter,
    becomes a one-particle CustomCompoundBondForce). Anything else, CMAPTorsionForce included,
    raises ``ValueError``. Pairs whose charge product and epsilon are both zero are left out;
    where the NonbondedForce gives NaN for two such atoms on top of each other, the copies give
    a finite energy.

    Arguments:
        system: A System with no constraints, no virtual sites and no periodic box.
        copies: How many copies, at least 1.

    Returns:
        The new System, with K N particles of the original masses.

    Example:
        >>> system = openmm.System()
        >>> for _ in range(2):
        ...     _ = system.addParticle(1.0)
        >>> bonds = openmm.HarmonicBondForce()
        >>> _ = bonds.addBond(0, 1, 0.1, 1000.0)
        >>> _ = system.addForce(bonds)
        >>> copies = replicate_system(system, 3)
        >>> copies.getNumParticles(), copies.getNumForces()
        (6, 3)
    """
    if isinstance(copies, bool) or not isinstance(copies, int):
        raise TypeError(f"copies must be an int, got {copies!r}")
    if copies < 1:
        raise UserInputError(f"copies must be at least 1, got {copies}")
    if system.getNumConstraints() or system.usesPeriodicBoundaryConditions():
        raise UserInputError(
            "replicate_system needs a System with no constraints and no periodic box "
            "(OpenMMEnergy refuses or removes those first)"
        )
    n = system.getNumParticles()
    if any(system.isVirtualSite(i) for i in range(n)):
        raise UserInputError("replicate_system needs a System without virtual sites")
    converted = []
    for index, force in enumerate(system.getForces()):
        kind = type(force)
        if kind is openmm.CMMotionRemover:
            continue
        if kind is openmm.NonbondedForce:
            converted.append(_nonbonded_terms(force, index))
        elif kind in _CONVERT:
            converted.append(_CONVERT[kind](force))
        else:
            raise UserInputError(
                f"force {index} ({kind.__name__}) cannot be replicated: the batched 'copies' path "
                "supports HarmonicBond/Angle, PeriodicTorsion, RBTorsion, NonbondedForce "
                "(NoCutoff) and Custom{Bond,Angle,Torsion,External}Force; evaluate this System "
                "with batching='loop'"
            )
    names = copy_parameters(copies)
    taken = {name for terms in converted for name, _ in terms.global_parameters}
    taken |= {name for terms in converted for name in terms.per_term}
    clash = sorted(name for name in taken if name.startswith(_PREFIX))
    if clash:
        raise UserInputError(
            f"the System already uses parameters {clash}, whose prefix {_PREFIX!r} "
            "replicate_system reserves; rename them or evaluate with batching='loop'"
        )
    replicated = openmm.System()
    for _ in range(copies):
        for i in range(n):
            replicated.addParticle(system.getParticleMass(i))
    for k, name in enumerate(names):
        for terms in converted:
            replicated.addForce(_build(terms, name, k * n))
    return replicated
