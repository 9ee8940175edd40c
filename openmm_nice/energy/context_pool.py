"""A pool of evaluators that share each batch: one in the calling process, the others in worker
processes started without the caller's script, exchanging rows through shared memory."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from openmm_nice.energy.openmm_contexts import ContextEvaluator, EvaluatorSpec, build_evaluator
from openmm_nice.energy.torch_energy import TorchEvaluator

_INHERITED: list = []  # evaluators a forked child inherited and must not destroy
_START_TIMEOUT = 300.0  # seconds a worker may take to import, deserialize and create its Context
_POLL_INTERVAL = 0.2  # seconds between liveness checks while waiting for workers


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
    evaluator: ContextEvaluator | TorchEvaluator,
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
    spec: EvaluatorSpec,
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
    # the caller decides how to stop us: Ctrl-C and a SIGTERM sent to the whole process group
    # (a scheduler's) let it finish its step and close the pool; its exit closes our pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if core is not None:
        os.sched_setaffinity(0, {core})
    try:
        evaluator = build_evaluator(spec)
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


class ContextPool:
    """Contexts that share a batch: one in the calling process, the others in worker processes.

    The calling process would otherwise sit idle while the workers compute, so it evaluates rows
    itself; with one Context there are no worker processes at all. Workers receive the System as
    XML and exchange positions, energies and forces through one shared-memory block, so a batch
    costs one small message to and from each worker; all Contexts claim rows from a shared
    counter, so a Context whose core is busy with other work simply takes fewer rows.

    A pool is safe to share: calls from several threads take turns (one batch at a time owns the
    Contexts and the shared block), and a process forked from the owner (``os.fork``,
    multiprocessing's fork) starts Contexts and workers of its own on its first call, leaving
    the parent's alone.
    """

    def __init__(self, spec: EvaluatorSpec, n_contexts: int, n_particles: int):
        self._spec = spec
        self._n_contexts = n_contexts
        self._n_particles = n_particles
        self._call_lock = threading.Lock()
        self._fresh_state()

    def _fresh_state(self) -> None:
        """No Context, worker or shared block yet, owned by this process."""
        self._owner_pid = os.getpid()
        self._evaluator: ContextEvaluator | TorchEvaluator | None = None
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

    def _adopt_after_fork(self) -> None:
        """In a forked child: forget the parent's Context (its threads did not survive the fork),
        workers and shared block without touching them (they are the parent's), and start
        afresh."""
        self._finalizer.detach()  # the parent's workers and block are the parent's to stop
        # Destroying a Context copied by fork can wait forever on threads that did not survive
        # it: the copy is kept, never freed, for the life of this process.
        _INHERITED.append(self._evaluator)
        for block in self._memory:
            with contextlib.suppress(Exception):
                block.close()  # this process's mapping only; the parent unlinks the block
        self._call_lock = threading.Lock()  # a copy may have been held by a thread not forked
        self._fresh_state()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def evaluate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Energies (B,) in kJ/mol and forces (B, N, 3) in kJ/mol/nm of x (B, 3N) in nm.

        The arrays are the caller's own copies (the shared block is reused by the next call,
        perhaps from another thread).
        """
        if os.getpid() != self._owner_pid:
            self._adopt_after_fork()
        with self._call_lock:
            return self._evaluate(x)

    def _evaluate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._evaluator is None:
            self._evaluator = build_evaluator(self._spec)
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
        return energies[:n].copy(), forces[:n].copy()

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
        if os.getpid() != self._owner_pid:
            self._adopt_after_fork()  # the parent's workers are not this process's to stop
            return
        self._views = ()
        self._capacity = 0
        _stop(self._processes, self._connections, self._memory, graceful)

    def close(self) -> None:
        self.stop()
        self._evaluator = None
        self._finalizer.detach()
