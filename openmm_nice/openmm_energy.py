"""OpenMM Systems as batched reduced energies U(x) = E(x) / kT, evaluated in parallel contexts."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import openmm
import torch
from openmm import unit
from torch import Tensor
from torch.autograd.function import once_differentiable

from openmm_nice.energies import Energy
from openmm_nice.errors import UserInputError
from openmm_nice.replicas import copy_parameters, replicate_system
from openmm_nice.torch_energy import TorchEvaluator, TorchSystemEnergy

__all__ = ["OpenMMEnergy"]

_GPU_PLATFORMS = ("CUDA", "OpenCL", "HIP")
# What batching="auto" picks, from benchmarks/batched_energy.py (see OpenMMEnergy's docstring);
# GPU platforms were not measured.
_AUTO_BATCHING = {"Reference": "loop", "CPU": "copies"} | dict.fromkeys(_GPU_PLATFORMS, "copies")
_BATCHINGS = ("auto", "loop", "copies", "torch")
# Systems with these forces are evaluated as torch operations by batching="auto" on the host
# platforms, where that measured faster than the loop (benchmarks/torch_energy.py).
_GB_FORCES = (openmm.GBSAOBCForce, openmm.CustomGBForce)
_HOST_PLATFORMS = ("Reference", "CPU")
_START_TIMEOUT = 300.0  # seconds a worker may take to import, deserialize and create its Context
_POLL_INTERVAL = 0.2  # seconds between liveness checks while waiting for workers

# OpenMM's public Context/State methods wrap every value in openmm.unit, which costs more than
# evaluating a small molecule; the SWIG functions below are what those methods call.
_set_positions = openmm._openmm.Context_setPositions
_get_state = openmm._openmm.Context_getState
_get_potential_energy = openmm._openmm.State_getPotentialEnergy
_get_vector_as_numpy = getattr(openmm._openmm, "State__getVectorAsNumpy", None)
_get_parameter_derivatives = openmm._openmm.State_getEnergyParameterDerivatives
_ENERGY_AND_FORCES = openmm.State.Energy + openmm.State.Forces
_FORCES_AND_DERIVATIVES = openmm.State.Forces + openmm.State.ParameterDerivatives
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


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
    if _get_vector_as_numpy is None:  # OpenMM releases without the in-place reader
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


def _kelvin(temperature: unit.Quantity | float) -> float:
    """The temperature in kelvin, from a Quantity of temperature or a bare number in kelvin."""
    if unit.is_quantity(temperature):
        if not temperature.unit.is_compatible(unit.kelvin):
            raise TypeError(
                f"temperature must be a temperature, got {temperature} (unit {temperature.unit}); "
                "pass e.g. 300 * openmm.unit.kelvin or the number 300"
            )
        value = temperature.value_in_unit(unit.kelvin)
    else:
        value = temperature
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(
            f"temperature must be an openmm.unit temperature or a number in kelvin, got {value!r}"
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise UserInputError(f"temperature must be positive and finite, got {value} K")
    return value


def _checked_system(system: openmm.System, remove_constraints: bool) -> openmm.System:
    """A private copy of the System, refused if it has what the adapter cannot evaluate."""
    if not isinstance(system, openmm.System):
        raise TypeError(f"system must be an openmm.System, got {type(system).__name__}")
    n = system.getNumParticles()
    if n == 0:
        raise UserInputError("the System has no particles")
    virtual = [i for i in range(n) if system.isVirtualSite(i)]
    if virtual:
        raise UserInputError(
            f"the System has {len(virtual)} virtual sites (particles {virtual[:5]}"
            f"{'...' if len(virtual) > 5 else ''}); "
            "OpenMMEnergy needs every particle to be a free Cartesian coordinate: build the "
            "System without virtual sites (e.g. a force field without extra particles)"
        )
    if system.usesPeriodicBoundaryConditions():
        raise UserInputError(
            "the System uses periodic boundary conditions, which OpenMMEnergy does not support; "
            "build it with a nonperiodic method (e.g. nonbondedMethod=NoCutoff or "
            "CutoffNonPeriodic, or an implicit solvent)"
        )
    system = openmm.XmlSerializer.clone(system)
    n_constraints = system.getNumConstraints()
    if n_constraints and not remove_constraints:
        raise UserInputError(
            f"the System has {n_constraints} constraints, which a density on Cartesian coordinates "
            "cannot honour; build it with constraints=None (and rigidWater=False), or pass "
            "remove_constraints=True to drop them"
        )
    if n_constraints:
        warnings.warn(
            f"removing {n_constraints} constraints from the System; unless it was built with "
            "flexibleConstraints=True the constrained bonds now have no bond term, so building it "
            "with constraints=None is safer",
            stacklevel=3,
        )
        for i in reversed(range(n_constraints)):
            system.removeConstraint(i)
    return system


def _available_platforms() -> list[str]:
    return [
        openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())
    ]


def _platform_properties(
    name: str, properties: dict[str, Any] | None, n_workers: int
) -> tuple[str, dict[str, str]]:
    """The platform's exact name and its properties with this adapter's defaults filled in."""
    available = _available_platforms()
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
    if name in _GPU_PLATFORMS and "Precision" in valid:
        resolved.setdefault("Precision", "double")
    if name == "CPU":
        resolved.setdefault("Threads", str(max(1, _n_cores() // n_workers)))
    return name, resolved


def _n_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cores(n_contexts: int) -> list[int | None]:
    """The core each Context keeps to while it evaluates: the caller's (first) and each
    worker's, one allowed core each where there are enough of them; else None (the scheduler
    decides).

    Left to itself, Linux wakes a worker on the core of the thread that woke it, the caller,
    which then evaluates its own share of the batch there; for batches of a few milliseconds
    the two stay on one core (measured in benchmarks/RESULTS.md, energy throughput).
    """
    if not hasattr(os, "sched_getaffinity"):
        return [None] * n_contexts
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < n_contexts:
        return [None] * n_contexts
    return allowed[:n_contexts]


@contextlib.contextmanager
def _kept_to(core: int | None) -> Iterator[None]:
    """The calling thread kept to ``core`` inside the block (its affinity restored after)."""
    if core is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


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
class _EvaluatorSpec:
    """What each process builds its evaluator from; plain data, as it travels to workers."""

    system_xml: str
    batching: str  # "loop", "copies" or "torch"
    platform: str
    properties: dict[str, str]
    copies: int | None  # configurations per call with "copies", else None
    compile_after: float | None  # of a "torch" evaluator, see TorchEvaluator


class _ContextEvaluator:
    """An OpenMM Context that evaluates rows in place: one per call, or ``copies`` per call."""

    def __init__(self, spec: _EvaluatorSpec):
        self.context = _create_context(spec.system_xml, spec.platform, spec.properties)
        self.copies = spec.copies
        self.rows_per_call = spec.copies or 1

    def __call__(self, positions: np.ndarray, energies: np.ndarray, forces: np.ndarray) -> None:
        _evaluate_rows(self.context, self.copies, positions, energies, forces)


def _build_evaluator(spec: _EvaluatorSpec) -> _ContextEvaluator | TorchEvaluator:
    """The evaluator a process uses: a Context, or the System as torch operations."""
    if spec.batching == "torch":
        system = openmm.XmlSerializer.deserialize(spec.system_xml)
        # One torch thread per process, as one Context per process: on a core that another job
        # also uses, a second OpenMP thread waits at every operation's barrier.
        return TorchEvaluator(system, threads=1, compile_after=spec.compile_after)
    return _ContextEvaluator(spec)


def _buffer_views(
    buffer: memoryview, capacity: int, n_particles: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The views of a shared block.

    Returns:
        The next unclaimed row (1,) int64, positions (capacity, N, 3), energies (capacity,) and
        forces (capacity, N, 3), float64.
    """
    size = capacity * n_particles * 3
    next_row = np.ndarray((1,), dtype=np.int64, buffer=buffer)
    floats = np.ndarray((2 * size + capacity,), dtype=np.float64, buffer=buffer, offset=8)
    positions = floats[:size].reshape(capacity, n_particles, 3)
    forces = floats[size : 2 * size].reshape(capacity, n_particles, 3)
    return next_row, positions, floats[2 * size :], forces


def _block_size(capacity: int, n_particles: int) -> int:
    return 8 + 8 * capacity * (6 * n_particles + 1)


def _share_rows(
    evaluator: _ContextEvaluator | TorchEvaluator,
    views: tuple[np.ndarray, ...],
    n: int,
    n_contexts: int,
    lock: Any,
    while_waiting: Callable[[], None],
) -> None:
    """Claim and evaluate rows of the shared batch until none are left.

    Rows are claimed in shrinking chunks (guided scheduling), so that a Context slowed down by
    other work on its core takes fewer rows and the last claims are single calls of the
    evaluator's ``rows_per_call`` rows: one row, ``copies`` rows on a Context of copies.

    Arguments:
        evaluator: This process's evaluator.
        views: The shared block's views, from :func:`_buffer_views`.
        n: The batch size.
        n_contexts: How many Contexts share the batch.
        lock: The lock that guards the next-row counter.
        while_waiting: Called every poll interval while the lock is busy; it raises to give up.
    """
    next_row, positions, energies, forces = views
    while True:
        while not lock.acquire(timeout=_POLL_INTERVAL):
            while_waiting()
        start = int(next_row[0])
        rows_per_call = evaluator.rows_per_call
        calls = max(1, -(-(n - start) // rows_per_call) // (2 * n_contexts))
        stop = min(n, start + calls * rows_per_call)
        next_row[0] = stop
        lock.release()
        if start >= n:
            return
        evaluator(positions[start:stop], energies[start:stop], forces[start:stop])


@contextlib.contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Start processes without the caller's script: 'spawn' re-runs the parent's ``__main__``
    in each child before the target, so a script without an ``if __name__ == "__main__":``
    guard would build another OpenMMEnergy there, start workers during the child's start-up,
    and the child would die. The workers need nothing from ``__main__`` (their target and its
    arguments live in this package), so a bare ``__main__`` stands in while they start."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main


def _worker_main(
    connection: Connection,
    lock: Any,
    spec: _EvaluatorSpec,
    n_particles: int,
    n_contexts: int,
    core: int | None = None,
) -> None:
    """A worker process: one evaluator that shares the rows of each batch in shared memory,
    kept to ``core`` if one is given (see :func:`_cores`).

    A request is ``(memory_name, capacity, n)``: claim and evaluate rows of the n-row batch in
    that block until none are left, then reply None, or a traceback on failure. ``None`` or a
    closed pipe ends the worker.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides how to stop us
    if core is not None:
        os.sched_setaffinity(0, {core})
    try:
        evaluator = _build_evaluator(spec)
    except Exception:
        connection.send(traceback.format_exc())
        return
    parent = multiprocessing.parent_process()

    def exit_if_orphaned() -> None:
        if parent is not None and not parent.is_alive():
            raise SystemExit(1)

    connection.send(None)
    memory = None
    views: tuple[np.ndarray, ...] = ()
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            break
        if request is None:
            break
        name, capacity, n = request
        try:
            if memory is None or memory.name != name:
                views = ()
                if memory is not None:
                    memory.close()
                memory = SharedMemory(name=name)
                views = _buffer_views(memory.buf, capacity, n_particles)
            _share_rows(evaluator, views, n, n_contexts, lock, exit_if_orphaned)
        except Exception:
            connection.send(traceback.format_exc())
        else:
            connection.send(None)
    views = ()
    if memory is not None:
        memory.close()


def _stop(
    processes: list, connections: list[Connection], memory: list[SharedMemory], graceful: bool
) -> None:
    """Stop worker processes and free the shared memory (also the pool's finalizer)."""
    if graceful:
        for connection in connections:
            try:
                connection.send(None)
            except OSError:
                pass
    for process in processes:
        if graceful:
            process.join(timeout=5.0)
        if process.is_alive():
            process.kill()
        process.join(timeout=5.0)
    for connection in connections:
        connection.close()
    for block in memory:
        block.close()
        block.unlink()
    processes.clear()
    connections.clear()
    memory.clear()


class _ContextPool:
    """Contexts that share a batch: one in the calling process, the others in worker processes.

    The calling process would otherwise sit idle while the workers compute, so it evaluates rows
    itself; with one Context there are no worker processes at all. Workers receive the System as
    XML and exchange positions, energies and forces through one shared-memory block, so a batch
    costs one small message to and from each worker; all Contexts claim rows from a shared
    counter, so a Context whose core is busy with other work simply takes fewer rows.
    """

    def __init__(self, spec: _EvaluatorSpec, n_contexts: int, n_particles: int):
        self._spec = spec
        self._n_contexts = n_contexts
        self._n_particles = n_particles
        self._evaluator: _ContextEvaluator | TorchEvaluator | None = None
        self._processes: list = []
        self._connections: list[Connection] = []
        self._memory: list[SharedMemory] = []  # the current block, kept in a list for _stop
        self._views: tuple[np.ndarray, ...] = ()
        self._capacity = 0
        self._lock: Any = None
        self._caller_core: int | None = None  # set with the workers' cores, see _cores
        self._finalizer = weakref.finalize(
            self, _stop, self._processes, self._connections, self._memory, True
        )

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def evaluate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Energies (B,) in kJ/mol and forces (B, N, 3) in kJ/mol/nm of x (B, 3N) in nm.

        The arrays may live in shared memory: they are valid until the next call.
        """
        if self._evaluator is None:
            self._evaluator = _build_evaluator(self._spec)
        n = x.shape[0]
        if self._n_contexts == 1 or n <= self._evaluator.rows_per_call:
            positions = np.ascontiguousarray(x, dtype=np.float64).reshape(n, self._n_particles, 3)
            energies, forces = np.empty(n), np.empty(positions.shape)
            self._evaluator(positions, energies, forces)
            return energies, forces
        try:
            return self._evaluate_shared(x, n)
        except BaseException:
            self.stop(graceful=False)
            raise

    def _evaluate_shared(self, x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._processes:
            self._start()
        self._reserve(n)
        next_row, positions, energies, forces = self._views
        positions[:n].reshape(n, -1)[...] = x
        next_row[0] = 0
        self._check_alive()
        request = (self._memory[0].name, self._capacity, n)
        for i, connection in enumerate(self._connections):
            try:
                connection.send(request)
            except OSError:
                raise self._death(i) from None
        with _kept_to(self._caller_core):
            _share_rows(
                self._evaluator,
                self._views,
                n,
                self._n_contexts,
                self._lock,
                self._check_alive,
            )
        self._collect(list(range(len(self._connections))), timeout=None)
        return energies[:n], forces[:n]

    def _start(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._lock = spawn.Lock()
        with _main_script_hidden():
            self._spawn_workers(spawn)
        try:
            self._collect(list(range(len(self._processes))), timeout=_START_TIMEOUT)
        except BaseException:
            self.stop(graceful=False)
            raise

    def _spawn_workers(self, spawn: Any) -> None:
        self._caller_core, *cores = _cores(self._n_contexts)
        for i in range(self._n_contexts - 1):
            parent_end, child_end = spawn.Pipe()
            process = spawn.Process(
                target=_worker_main,
                args=(
                    child_end,
                    self._lock,
                    self._spec,
                    self._n_particles,
                    self._n_contexts,
                    cores[i],
                ),
                name=f"openmm-nice-worker-{i}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self._processes.append(process)
            self._connections.append(parent_end)

    def _reserve(self, n: int) -> None:
        """Make the shared block hold at least n configurations."""
        if n <= self._capacity:
            return
        capacity = max(n, 2 * self._capacity)
        block = SharedMemory(create=True, size=_block_size(capacity, self._n_particles))
        self._views = ()
        for old in self._memory:  # workers reattach by name on their next request
            old.close()
            old.unlink()
        self._memory[:] = [block]
        self._capacity = capacity
        self._views = _buffer_views(block.buf, capacity, self._n_particles)

    def _collect(self, pending: list[int], timeout: float | None) -> None:
        """Wait for a reply from each pending worker; raise if one fails, dies or times out."""
        start = time.monotonic()
        waiting = {self._connections[i]: i for i in pending}
        while waiting:
            sentinels = [process.sentinel for process in self._processes]
            ready = wait(list(waiting) + sentinels, timeout=_POLL_INTERVAL)
            for connection in [c for c in waiting if c in ready]:
                i = waiting.pop(connection)
                try:
                    reply = connection.recv()
                except (EOFError, OSError):
                    raise self._death(i) from None
                if reply is not None:
                    raise RuntimeError(
                        f"OpenMM worker process {i} (pid {self._processes[i].pid}) failed; the "
                        f"workers are restarted on the next call. Its traceback:\n{reply}"
                    )
            self._check_alive()
            if timeout is not None and time.monotonic() - start > timeout:
                raise RuntimeError(
                    f"OpenMM worker processes {sorted(waiting.values())} did not answer within "
                    f"{timeout} s; the workers are restarted on the next call"
                )

    def _check_alive(self) -> None:
        for i, process in enumerate(self._processes):
            if not process.is_alive():
                raise self._death(i)

    def _death(self, i: int) -> RuntimeError:
        process = self._processes[i]
        process.join(timeout=1.0)
        return RuntimeError(
            f"OpenMM worker process {i} (pid {process.pid}) died (exit code {process.exitcode}), "
            "so this batch was not evaluated; the workers are restarted on the next call"
        )

    def stop(self, graceful: bool = True) -> None:
        """Stop the worker processes and free the shared memory; the next call restarts them."""
        self._views = ()
        self._capacity = 0
        _stop(self._processes, self._connections, self._memory, graceful)

    def close(self) -> None:
        self.stop()
        self._evaluator = None
        self._finalizer.detach()


class _ReducedEnergy(torch.autograd.Function):
    """U = E / kT from OpenMM, with dU/dx = -F / kT from the same evaluation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, energy: OpenMMEnergy) -> Tensor:
        coordinates = x.detach().cpu()
        if coordinates.dtype not in _NUMPY_DTYPES:  # e.g. bfloat16, which numpy lacks
            coordinates = coordinates.double()
        coordinates = coordinates.numpy()
        finite = _finite_rows(coordinates)
        n_non_finite = len(finite) - int(finite.sum())
        if n_non_finite:  # as Energy.forward does, but without torch's thread pool
            energy.non_finite_count += n_non_finite
            coordinates = coordinates[finite]
        energies, forces = energy._pool_or_start().evaluate(coordinates)
        forces = forces.reshape(len(forces), energy.dim)
        u = energies / energy.kT
        bad = ~(np.isfinite(u) & _finite_rows(forces))
        n_bad = int(bad.sum())
        if n_bad:
            u[bad] = math.inf
            energy.non_finite_energy_count += n_bad
        gradient = None
        if ctx.needs_input_grad[0]:
            gradient = forces * (-1.0 / energy.kT)
            gradient[bad] = 0.0
        if n_non_finite:
            u = _scatter_rows(u, finite, math.inf)
            gradient = None if gradient is None else _scatter_rows(gradient, finite, 0.0)
        if gradient is not None:
            ctx.save_for_backward(torch.from_numpy(gradient))
        return _as_tensor(u, x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        (gradient,) = ctx.saved_tensors
        weights = grad_output.detach().to(device="cpu", dtype=torch.float64).numpy()
        return _as_tensor(weights[:, None] * gradient.numpy(), grad_output), None


def _finite_rows(rows: np.ndarray) -> np.ndarray:
    """Whether each row of a 2-D array is finite (a sum settles the usual all-finite case).

    The sum of a batch holding both signs of infinite force (two atoms on top of each
    other) is nan; that is an expected case, so numpy is not allowed to warn about it.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        total = rows.sum()
    if np.isfinite(total):
        return np.ones(len(rows), dtype=bool)
    return np.isfinite(rows).all(axis=1)


def _scatter_rows(rows: np.ndarray, where: np.ndarray, fill: float) -> np.ndarray:
    """An array with len(where) rows: ``rows`` where ``where`` is True, ``fill`` elsewhere."""
    out = np.full((len(where), *rows.shape[1:]), fill)
    out[where] = rows
    return out


def _as_tensor(array: np.ndarray, like: Tensor) -> Tensor:
    """A float64 array as a tensor of like's dtype and device.

    The conversion stays in numpy where it can: torch would split these element-wise operations
    across its thread pool, whose waiting threads then compete with the OpenMM workers for cores.
    """
    numpy_dtype = _NUMPY_DTYPES.get(like.dtype)
    if numpy_dtype is None:
        return torch.from_numpy(array).to(device=like.device, dtype=like.dtype)
    return torch.from_numpy(array.astype(numpy_dtype, copy=False)).to(like.device)


class OpenMMEnergy(Energy):
    r"""The reduced energy :math:`U(x) = E(x) / kT` of an OpenMM System, batched and differentiable.

    Each row of x is one configuration, the N particle positions in nm flattened in OpenMM's
    particle order, so ``dim = 3N``. OpenMM evaluates energy and forces together in float64 on
    the host; the gradient :math:`\partial U / \partial x = -F / kT` comes from the same pass.
    ``n_workers`` Contexts split each batch: one in the calling process and ``n_workers - 1`` in
    worker processes (started with 'spawn' on the first call and kept until :meth:`close`), which
    receive the System as XML and exchange coordinates through shared memory.

    Configurations whose energy or forces come back NaN or infinite (overlapping atoms) get
    :math:`U = +\infty` and a zero gradient, and are counted in ``non_finite_energy_count``;
    non-finite coordinates are counted in ``non_finite_count`` and never reach OpenMM.

    Arguments:
        system: The System; it must have no constraints, no virtual sites and no periodic box.
        temperature: An ``openmm.unit`` temperature or a number in kelvin.
        platform: The OpenMM platform by name: Reference, CPU, CUDA, OpenCL or HIP.
        platform_properties: Properties for the platform, e.g. ``{"DeviceIndex": "0"}``. GPU
            platforms default to ``Precision="double"``; CPU defaults ``Threads`` to the cores
            available divided by ``n_workers``.
        n_workers: How many Contexts, hence processes, share a batch.
        remove_constraints: Remove the System's constraints (with a warning) instead of
            refusing it.
        batching: How a Context evaluates its rows. ``"loop"``: one configuration per call,
            on the System itself. ``"copies"``: ``copies`` configurations per call, on a System
            of that many non-interacting copies (``replicas.replicate_system``), so B rows cost
            ceil(B / copies) calls, the last padded with copies of its last row; a System with
            forces that cannot be replicated is refused. ``"torch"``: no Context; each process
            evaluates its rows as torch operations built from the System's forces
            (:class:`~openmm_nice.torch_energy.TorchSystemEnergy`, float64, one torch thread,
            forces by autograd), so ``platform`` is not used; a System with a force that path
            does not know is refused, naming it. ``"auto"``: ``"torch"`` for a System with a
            generalized-Born force (GBSAOBCForce, CustomGBForce) on the Reference and CPU
            platforms if the torch path knows all its forces; otherwise whichever measured
            faster on the platform (below), and ``"loop"`` for a System that cannot be
            replicated. The ``batching`` attribute holds the mode chosen.
        copies: Configurations per call with ``batching="copies"`` (``copies`` attribute;
            None in the other modes).
        compile_after: With ``batching="torch"``: seconds of uncompiled evaluation after
            which each process compiles its evaluation with ``torch.compile``, which costs
            tens of seconds once and then runs several times faster
            (:class:`~openmm_nice.torch_energy.TorchEvaluator`); 0 compiles at the first
            call, None never (``compile_after`` attribute; None in the other modes).

    Batching: OpenMM returns only the total energy of a State, so a Context of copies needs a way
    to give each copy's energy. ``replicate_system`` gives copy k its own Custom forces whose
    energy is multiplied by a global parameter :math:`s_k = 1`, and OpenMM's energy parameter
    derivatives :math:`\partial E / \partial s_k = E_k` give every copy's energy in the same
    call as the forces. The price is that the Custom forms cost more per term than OpenMM's
    native forces, and every pair of atoms in the molecule (NoCutoff) is an explicit term.
    The alternative, one force group per copy (at most 32) read with one ``getState`` per group,
    keeps native forces but makes as many calls as the loop. Measured on alanine dipeptide,
    batch 1024, forward + backward, a busy 2-core CPU, no GPU (``benchmarks/batched_energy.py``,
    2026-11-25, in ``benchmarks/RESULTS.md``):

    * Reference: the loop wins, so ``"auto"`` is ``"loop"``: 68,600 evaluations/s against
      53,200 with copies (K = 8) to 42,100 (K = 64), 1 worker; Reference's per-call cost is
      small, and its Custom forces cost more per term than its native ones. One force group
      per copy ran at 0.58x the loop.
    * CPU: copies win, so ``"auto"`` is ``"copies"``: 46,700 evaluations/s with K = 32
      against 8,400 with the loop, 1 worker (5.5x), and 3.3x with 2 workers; the CPU
      platform's per-call cost is large and copies pay it once per K rows. One force group
      per copy ran at 1.3x the loop.
    * CUDA, OpenCL, HIP: ``"copies"``, unmeasured (no GPU was available); a GPU pays a kernel
      launch and a transfer per call, which copies share.

    The default ``copies=32`` was the fastest K on CPU with 1 worker in both runs of that day,
    K = 16 within 2%; with 2 workers on the busy cores K = 64 came first in both runs, by 28%
    in one and 77% in the other. A batch smaller than ``copies`` still costs one call of
    ``copies`` copies.

    The torch path (``benchmarks/torch_energy.py``, figures in ``benchmarks/RESULTS.md``):
    a generalized-Born force, which copies cannot replicate, makes Reference's loop about a
    hundred times slower than in vacuum for a small molecule, and the CPU platform pays a
    large cost per call; the torch path measured faster than both even uncompiled, so
    ``"auto"`` picks it for such Systems. In vacuum the uncompiled torch path is slower than
    Reference's loop and the compiled one faster, but its compile is repaid only after
    millions of evaluations, so ``"auto"`` keeps the loop there; ask for ``"torch"`` for long
    runs.

    Example:
        >>> import openmm
        >>> system = openmm.System()
        >>> _ = system.addParticle(1.0)
        >>> force = openmm.CustomExternalForce("x^2 + 2*y + 3*z")
        >>> _ = force.addParticle(0, [])
        >>> _ = system.addForce(force)
        >>> energy = OpenMMEnergy(system, temperature=300.0)
        >>> x = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
        >>> u = energy(x)
        >>> u.backward()
        >>> round(u.item() * energy.kT, 10)  # E = x^2 + 2y + 3z in kJ/mol
        3.0
        >>> [round(g * energy.kT, 10) for g in x.grad[0].tolist()]  # dE/dx = (2x, 2, 3)
        [2.0, 2.0, 3.0]
    """

    def __init__(
        self,
        system: openmm.System,
        temperature: unit.Quantity | float,
        platform: str = "Reference",
        platform_properties: dict[str, Any] | None = None,
        n_workers: int = 1,
        *,
        remove_constraints: bool = False,
        batching: str = "auto",
        copies: int = 32,
        compile_after: float | None = 30.0,
    ):
        system = _checked_system(system, remove_constraints)
        if isinstance(n_workers, bool) or not isinstance(n_workers, int):
            raise TypeError(f"n_workers must be an int, got {n_workers!r}")
        if n_workers < 1:
            raise UserInputError(f"n_workers must be at least 1, got {n_workers}")
        if batching not in _BATCHINGS:
            raise UserInputError(f"batching must be one of {_BATCHINGS}, got {batching!r}")
        if isinstance(copies, bool) or not isinstance(copies, int):
            raise TypeError(f"copies must be an int, got {copies!r}")
        if copies < 1:
            raise UserInputError(f"copies must be at least 1, got {copies}")
        if compile_after is not None and not (
            isinstance(compile_after, (int, float)) and compile_after >= 0
        ):
            raise UserInputError(
                f"compile_after must be >= 0 seconds or None, got {compile_after!r}"
            )
        kelvin = _kelvin(temperature)
        platform, properties = _platform_properties(platform, platform_properties, n_workers)
        evaluated = system
        mode = batching
        if batching == "auto":
            mode = _AUTO_BATCHING.get(platform, "loop")
            gb = any(isinstance(force, _GB_FORCES) for force in system.getForces())
            if gb and platform in _HOST_PLATFORMS:
                mode = "torch"
        if mode == "torch":
            try:
                TorchSystemEnergy(system)  # refuses what it cannot evaluate
            except ValueError:
                if batching == "torch":
                    raise
                mode = _AUTO_BATCHING.get(platform, "loop")
        if mode == "copies":
            try:
                evaluated = replicate_system(system, copies)
            except ValueError:
                if batching == "copies":
                    raise
                mode = "loop"
        super().__init__(3 * system.getNumParticles())
        self.system = system
        self.n_particles = system.getNumParticles()
        self.temperature = kelvin * unit.kelvin
        self.kT = (unit.MOLAR_GAS_CONSTANT_R * self.temperature).value_in_unit(
            unit.kilojoule_per_mole
        )
        self.platform = platform
        self.platform_properties = properties
        self.n_workers = n_workers
        self.batching = mode
        self.copies = copies if mode == "copies" else None
        self.register_buffer(
            "non_finite_energy_count", torch.zeros((), dtype=torch.long), persistent=False
        )
        self.compile_after = compile_after if mode == "torch" else None
        self._spec = _EvaluatorSpec(
            system_xml=openmm.XmlSerializer.serialize(evaluated),
            batching=mode,
            platform=platform,
            properties=properties,
            copies=self.copies,
            compile_after=self.compile_after,
        )
        self._pool: _ContextPool | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Return U(x) of shape (B,) for x of shape (B, dim) in nm."""
        # Energy.forward's checks for non-finite rows run as torch operations on the whole
        # batch; torch spreads those over its thread pool, whose threads then compete with
        # the OpenMM workers for cores. _ReducedEnergy does the same checks in numpy.
        x = self._validate(x)
        self.evaluation_count += x.shape[0]
        return self._energy(x)

    def _energy(self, x: Tensor) -> Tensor:
        return _ReducedEnergy.apply(x, self)

    def _pool_or_start(self) -> _ContextPool:
        if self._pool is None:
            self._pool = _ContextPool(self._spec, self.n_workers, self.n_particles)
        return self._pool

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running worker processes (empty before the first call)."""
        return [] if self._pool is None else self._pool.pids

    def close(self) -> None:
        """Stop the worker processes and free their shared memory; a later call restarts them."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> OpenMMEnergy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # best effort: the interpreter may be shutting down
            pass

    def __getstate__(self) -> dict[str, Any]:
        # Contexts and processes do not travel; a copy starts its own on its first call.
        state = self.__dict__.copy()
        state["_pool"] = None
        return state

    def extra_repr(self) -> str:
        return (
            f"n_particles={self.n_particles}, temperature={self.temperature}, "
            f"platform={self.platform!r}, n_workers={self.n_workers}, "
            f"batching={self.batching!r}, copies={self.copies}, compile_after={self.compile_after}"
        )
