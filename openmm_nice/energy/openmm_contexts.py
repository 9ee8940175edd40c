"""OpenMM Contexts that evaluate batches of configurations in place: one configuration per
call through the SWIG functions behind Context and State, or many per call on a System of
copies; the platforms and their properties."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import openmm

from openmm_nice.energy.replicas import copy_parameters
from openmm_nice.energy.torch_energy import TorchEvaluator
from openmm_nice.errors import UserInputError

GPU_PLATFORMS = ("CUDA", "OpenCL", "HIP")

# OpenMM's public Context/State methods wrap every value in openmm.unit, which costs more than
# evaluating a small molecule; the SWIG functions below are what those methods call. They are
# private: where a release renames or drops any of them, every call takes the public methods.
_swig = getattr(openmm, "_openmm", None)
_set_positions = getattr(_swig, "Context_setPositions", None)
_get_state = getattr(_swig, "Context_getState", None)
_get_potential_energy = getattr(_swig, "State_getPotentialEnergy", None)
_get_vector_as_numpy = getattr(_swig, "State__getVectorAsNumpy", None)
_get_parameter_derivatives = getattr(_swig, "State_getEnergyParameterDerivatives", None)
if None in (
    _set_positions,
    _get_state,
    _get_potential_energy,
    _get_parameter_derivatives,
):
    _get_vector_as_numpy = None  # the switch both evaluators test
_ENERGY_AND_FORCES = openmm.State.Energy + openmm.State.Forces
_FORCES_AND_DERIVATIVES = openmm.State.Forces + openmm.State.ParameterDerivatives


def _evaluate(
    context: openmm.Context, positions: np.ndarray, energies: np.ndarray, forces: np.ndarray
) -> None:
    """Write the energy (kJ/mol) and forces (kJ/mol/nm) of each configuration in place.

    Arguments:
        context: The Context to evaluate with.
        positions: Configurations of shape (n, N, 3) in nm, float64, C-contiguous rows.
        energies: Output of shape (n,).
        forces: Output of shape (n, N, 3), C-contiguous rows.
    """
    if _get_vector_as_numpy is None:  # OpenMM releases without the private fast path
        for i in range(len(positions)):
            context.setPositions(positions[i])
            state = context.getState(getEnergy=True, getForces=True)
            energies[i] = state.getPotentialEnergy()._value
            forces[i] = state.getForces(asNumpy=True)._value
        return
    for i in range(len(positions)):
        _set_positions(context, positions[i])
        state = _get_state(context, _ENERGY_AND_FORCES, False, -1)
        energies[i] = _get_potential_energy(state)
        _get_vector_as_numpy(state, openmm.State.Forces, forces[i])


def _evaluate_copies(
    context: openmm.Context,
    copies: int,
    positions: np.ndarray,
    energies: np.ndarray,
    forces: np.ndarray,
) -> None:
    """As :func:`_evaluate`, on a Context of :func:`replicate_system`'s copies.

    ``copies`` configurations cost one call; each copy's energy is the derivative of the energy
    by its copy parameter. A last block of fewer rows is padded with copies of its last row.
    """
    names = copy_parameters(copies)
    for start in range(0, len(positions), copies):
        block = positions[start : start + copies]
        out = forces[start : start + copies]
        n = len(block)
        if n < copies:
            padding = np.broadcast_to(block[-1], (copies - n, *block.shape[1:]))
            block = np.concatenate([block, padding])
            out = np.empty(block.shape)
        if _get_vector_as_numpy is None:
            context.setPositions(block.reshape(-1, 3))
            state = context.getState(forces=True, parameterDerivatives=True)
            out[...] = state.getForces(asNumpy=True)._value.reshape(out.shape)
            derivatives = state.getEnergyParameterDerivatives()
        else:
            _set_positions(context, block.reshape(-1, 3))
            state = _get_state(context, _FORCES_AND_DERIVATIVES, False, -1)
            _get_vector_as_numpy(state, openmm.State.Forces, out.reshape(-1, 3))
            derivatives = _get_parameter_derivatives(state)
        energies[start : start + n] = [derivatives[name] for name in names[:n]]
        if n < copies:
            forces[start : start + n] = out[:n]


def _evaluate_rows(
    context: openmm.Context,
    copies: int | None,
    positions: np.ndarray,
    energies: np.ndarray,
    forces: np.ndarray,
) -> None:
    """:func:`_evaluate` on a plain Context (copies None), else :func:`_evaluate_copies`."""
    if copies is None:
        _evaluate(context, positions, energies, forces)
    else:
        _evaluate_copies(context, copies, positions, energies, forces)


def available_platforms() -> list[str]:
    """The names of the OpenMM platforms this machine has, in OpenMM's order."""
    return [
        openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())
    ]


def resolve_platform(
    name: str, properties: dict[str, Any] | None, n_workers: int
) -> tuple[str, dict[str, str]]:
    """The platform's exact name and its properties with this adapter's defaults filled in."""
    available = available_platforms()
    by_lower = {p.lower(): p for p in available}
    if not isinstance(name, str) or name.lower() not in by_lower:
        raise UserInputError(
            f"OpenMM platform {name!r} is not available; available platforms: "
            f"{', '.join(available)} (openmm.Platform.getPluginLoadFailures() says why others "
            "did not load)"
        )
    name = by_lower[name.lower()]
    platform = openmm.Platform.getPlatformByName(name)
    if properties is not None and not isinstance(properties, dict):
        raise TypeError(
            f"platform_properties must be a dict of property names to values, got {properties!r}"
        )
    resolved = {str(key): str(value) for key, value in (properties or {}).items()}
    valid = list(platform.getPropertyNames())
    unknown = sorted(set(resolved) - set(valid))
    if unknown:
        raise UserInputError(
            f"unknown properties {unknown} for OpenMM platform {name}; valid ones: {valid}"
        )
    if name in GPU_PLATFORMS and "Precision" in valid:
        resolved.setdefault("Precision", "double")
    if name == "CPU":
        resolved.setdefault("Threads", str(max(1, _n_cores() // n_workers)))
    return name, resolved


def _n_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _create_context(system_xml: str, platform: str, properties: dict[str, str]) -> openmm.Context:
    system = openmm.XmlSerializer.deserialize(system_xml)
    integrator = openmm.VerletIntegrator(0.001)
    try:
        return openmm.Context(
            system, integrator, openmm.Platform.getPlatformByName(platform), properties
        )
    except openmm.OpenMMException as error:
        raise UserInputError(
            f"could not create an OpenMM Context on platform {platform} with properties "
            f"{properties}: {error}"
        ) from error


@dataclass(frozen=True)
class EvaluatorSpec:
    """What each process builds its evaluator from; plain data, as it travels to workers."""

    system_xml: str
    batching: str  # "loop", "copies" or "torch"
    platform: str
    properties: dict[str, str]
    copies: int | None  # configurations per call with "copies", else None
    compile_after: float | None  # of a "torch" evaluator, see TorchEvaluator


class ContextEvaluator:
    """An OpenMM Context that evaluates rows in place: one per call, or ``copies`` per call."""

    def __init__(self, spec: EvaluatorSpec):
        self.context = _create_context(spec.system_xml, spec.platform, spec.properties)
        self.copies = spec.copies
        self.rows_per_call = spec.copies or 1

    def __call__(self, positions: np.ndarray, energies: np.ndarray, forces: np.ndarray) -> None:
        _evaluate_rows(self.context, self.copies, positions, energies, forces)


def build_evaluator(spec: EvaluatorSpec) -> ContextEvaluator | TorchEvaluator:
    """The evaluator a process uses: a Context, or the System as torch operations."""
    if spec.batching == "torch":
        system = openmm.XmlSerializer.deserialize(spec.system_xml)
        # One torch thread per process, as one Context per process: on a core that another job
        # also uses, a second OpenMP thread waits at every operation's barrier.
        return TorchEvaluator(system, threads=1, compile_after=spec.compile_after)
    return ContextEvaluator(spec)
