"""OpenMM Systems as batched reduced energies U(x) = E(x) / kT, evaluated in parallel contexts."""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import numpy as np
import openmm
import torch
from openmm import unit
from torch import Tensor
from torch.autograd.function import once_differentiable

from openmm_nice.energy.context_pool import ContextPool
from openmm_nice.energy.energies import Energy
from openmm_nice.energy.openmm_contexts import GPU_PLATFORMS, EvaluatorSpec, resolve_platform
from openmm_nice.energy.replicas import replicate_system
from openmm_nice.energy.torch_energy import TorchSystemEnergy
from openmm_nice.errors import UserInputError

__all__ = ["ENGINES", "OpenMMEnergy", "TorchEnergy", "torch_refusal"]
# What batching="auto" picks, from benchmarks/batched_energy.py (see OpenMMEnergy's docstring);
# GPU platforms were not measured.
_AUTO_BATCHING = {"Reference": "loop", "CPU": "copies"} | dict.fromkeys(GPU_PLATFORMS, "copies")
_BATCHINGS = ("auto", "loop", "copies", "torch")
# Systems with these forces are evaluated as torch operations by batching="auto" on the host
# platforms, where that measured faster than the loop (benchmarks/torch_energy.py).
_GB_FORCES = (openmm.GBSAOBCForce, openmm.CustomGBForce)
_HOST_PLATFORMS = ("Reference", "CPU")
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

_POOL_CREATION = threading.Lock()


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
            (:class:`~openmm_nice.energy.torch_energy.TorchSystemEnergy`, float64, one torch thread,
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
            (:class:`~openmm_nice.energy.torch_energy.TorchEvaluator`); 0 compiles at the first
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
        platform, properties = resolve_platform(platform, platform_properties, n_workers)
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
            except ValueError as error:
                if batching == "torch":
                    raise
                mode = _AUTO_BATCHING.get(platform, "loop")
                warnings.warn(
                    f'batching="auto" evaluates this System with OpenMM ("{mode}"), one '
                    f"configuration per call, instead of the batched torch path: {error}",
                    stacklevel=2,
                )
        if mode == "copies":
            try:
                evaluated = replicate_system(system, copies)
            except ValueError as error:
                if batching == "copies":
                    raise
                mode = "loop"
                warnings.warn(
                    f'batching="auto" evaluates this System one configuration per call ("loop") '
                    f"instead of as copies: {error}",
                    stacklevel=2,
                )
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
        self.compile_after = compile_after if mode == "torch" else None
        self._spec = EvaluatorSpec(
            system_xml=openmm.XmlSerializer.serialize(evaluated),
            batching=mode,
            platform=platform,
            properties=properties,
            copies=self.copies,
            compile_after=self.compile_after,
        )
        self._pool: ContextPool | None = None

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

    def _pool_or_start(self) -> ContextPool:
        pool = self._pool
        if pool is None:
            with _POOL_CREATION:  # two threads' first calls make one pool
                if self._pool is None:
                    self._pool = ContextPool(self._spec, self.n_workers, self.n_particles)
                pool = self._pool
        return pool

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


ENGINES = ("openmm", "torch", "auto")
"""How a System's energy is computed (the config's ``engine``): OpenMM Contexts
(:class:`OpenMMEnergy`), torch operations in the calling process (:class:`TorchEnergy`), or
``auto``, torch where it evaluates every force of the System."""


def torch_refusal(system: openmm.System) -> str | None:
    """Why :class:`TorchEnergy` cannot evaluate ``system`` (the first force or feature it does
    not support), or None where it can."""
    try:
        TorchSystemEnergy(system)
    except UserInputError as error:
        return str(error)
    return None


class TorchEnergy(Energy):
    r"""The reduced energy :math:`U(x) = E(x) / kT` of an OpenMM System as batched torch
    operations in the calling process, on the device of the positions.

    The same contract as :class:`OpenMMEnergy` (rows of N positions in nm, U in x's dtype,
    gradients :math:`-F/kT`), computed by
    :class:`~openmm_nice.energy.torch_energy.TorchSystemEnergy`: no worker processes, no copy
    to the host, forces by autograd. Energies are computed in float64 whatever the dtype of x
    (a float32 model's weights still rest on float64 energies) and agree with OpenMM's
    Reference platform to about 1e-14 relative. The module's buffers follow ``.to(device)``;
    a :class:`~openmm_nice.flows.generator.BoltzmannGenerator` moves its energy with itself.
    Its buffers are not state: a model saves the same state dict with either engine.

    Arguments:
        system: The System: every force one that
            :func:`~openmm_nice.energy.torch_energy.supported_forces` names, no cutoffs, no
            virtual sites, no periodic box (a force it cannot evaluate is refused by name).
        temperature: An ``openmm.unit`` temperature, or a number in kelvin.
        remove_constraints: Drop the System's constraints (with a warning) instead of refusing.

    Example:
        >>> import openmm
        >>> system = openmm.System()
        >>> for _ in range(2):
        ...     _ = system.addParticle(1.0)
        >>> bonds = openmm.HarmonicBondForce()
        >>> _ = bonds.addBond(0, 1, 0.1, 1000.0)
        >>> _ = system.addForce(bonds)
        >>> energy = TorchEnergy(system, 300.0)
        >>> x = torch.tensor([[0.0, 0.0, 0.0, 0.2, 0.0, 0.0]], dtype=torch.float64)
        >>> round(energy(x).item() * energy.kT, 10)  # k/2 (r - r0)^2 in kJ/mol
        5.0
    """

    def __init__(
        self,
        system: openmm.System,
        temperature: unit.Quantity | float,
        remove_constraints: bool = False,
    ):
        system = _checked_system(system, remove_constraints)
        kelvin = _kelvin(temperature)
        potential = TorchSystemEnergy(system)  # refuses, by name, a force it cannot evaluate
        super().__init__(3 * system.getNumParticles())
        self.system = system
        self.n_particles = system.getNumParticles()
        self.temperature = kelvin * unit.kelvin
        self.kT = (unit.MOLAR_GAS_CONSTANT_R * self.temperature).value_in_unit(
            unit.kilojoule_per_mole
        )
        self.potential = potential

    def _energy(self, x: Tensor) -> Tensor:
        return (self.potential(x.double()) / self.kT).to(x.dtype)

    def close(self) -> None:
        """Nothing to stop (no worker processes): here so that either engine can be closed."""

    def __enter__(self) -> TorchEnergy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        return f"n_particles={self.n_particles}, temperature={self.temperature}"
