r"""The generator as a Markov chain move: exact Metropolis-Hastings with independent proposals.

A trained generator is a proposal that does not depend on where a chain stands, so one
accepted step can carry it from one basin to another however high the barrier between them.
Accepting a proposal x' at x with probability

.. math:: \min\left(1, \frac{w(x')}{w(x)}\right), \qquad
    w = \frac{e^{-U}}{P} \quad \text{(the importance weight of the draw)},

makes the chain's stationary distribution the Boltzmann distribution :math:`\mu \propto
e^{-U}` exactly, whatever the model's errors: they only lower the acceptance. With redundant
latents (D > d) the model has no closed-form marginal P(x); the chain then lives on (x, y) with
target :math:`\mu(x) \hat P(y|x)`, whose x-marginal is :math:`\mu`. Each step first draws the
chain's y afresh from :math:`\hat P(y|x)`, an exact Gibbs step (so other moves may change x in
between), then proposes (x', y') from the model and accepts with the ratio of
:math:`w = e^{-U(x)} \hat P(y|x) / P(x, y)` (:meth:`Draw.log_weights
<openmm_nice.flows.generator.Draw.log_weights>`). U is the target's at the chain's temperature, which
need not be the training temperature.

:func:`independence_metropolis` is the kernel, for any energy; :class:`BoltzmannGeneratorMove` wraps
it as an ``openmmtools.mcmc.MCMCMove`` for OpenMM systems, and :func:`run_chain` runs the
chain of the ``openmm-nice mcmc`` command.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openmm
import torch
from openmm import unit
from torch import Tensor

from openmm_nice.energy.openmm_energy import OpenMMEnergy
from openmm_nice.errors import UserInputError
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.io import save_samples, write_trajectory
from openmm_nice.molecule.systems import import_quietly
from openmm_nice.runs import load_run

__all__ = [
    "independence_metropolis",
    "BoltzmannGeneratorMove",
    "SeededLangevinDynamicsMove",
    "ChainResult",
    "run_chain",
    "write_chain",
]

mcmc = import_quietly("openmmtools.mcmc")
states = import_quietly("openmmtools.states")
cache = import_quietly("openmmtools.cache")


@torch.no_grad()
def independence_metropolis(
    generator: BoltzmannGenerator,
    x: Tensor,
    u: Tensor,
    energy: Callable[[Tensor], Tensor],
    n_steps: int = 1,
    rng: torch.Generator | None = None,
    refresh_chunk: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Metropolis-Hastings steps of B chains with the generator's draws as proposals.

    At each of ``n_steps`` steps every chain's y is drawn afresh from :math:`\hat P(y|x)`
    (:meth:`BoltzmannGenerator.draw_at`), then an independent draw (x', y') of the model is
    accepted with probability :math:`\min(1, w(x', y') / w(x, y))`, with the log-weights of
    :meth:`Draw.log_weights <openmm_nice.flows.generator.Draw.log_weights>` under ``energy``. Both
    steps leave :math:`\mu(x) \hat P(y|x)` invariant, so the chains' x keep
    :math:`\mu \propto e^{-U}`. A proposal with an infinite or NaN energy is rejected; a chain
    whose own weight is undefined (a clash it started in) takes any proposal with a finite one.

    The proposals do not depend on the chains, so all ``n_steps * B`` are drawn in one batch,
    and so are ``refresh_chunk`` fresh y of every proposal that a later step could use (all
    but the last step's), for the steps after it is accepted; a chain that stays longer gets
    8 chunks more at a time. One small model pass per acceptance would cost far more than the
    arithmetic.

    Arguments:
        generator: The model. Its dtype is the arithmetic's: float64 makes the ratios exact to
            rounding, which the roundtrip of the closed-form inverse keeps small.
        x: The chains' points (B, energy dim) in the target's coordinates.
        u: Their reduced energies under ``energy``, shape (B,).
        energy: The reduced energy U of points (N, dim) -> (N,) whose Boltzmann distribution
            the chains sample, e.g. the model's own energy times T_train / T for another
            temperature.
        n_steps: Steps of each chain.
        rng: Random numbers for y, the proposals and the acceptance tests.
        refresh_chunk: Fresh y drawn at a time for a chain's current point.

    Returns:
        The chains' points and energies after the steps, and how many proposals each chain
        accepted, (B,) int64.

    Example:
        >>> from openmm_nice.energy.energies import DoubleWell1D
        >>> bg = BoltzmannGenerator(DoubleWell1D(), latent_dim=2, layers=2, hidden=[8])
        >>> x = torch.full((4, 1), -1.5)
        >>> x, u, accepted = independence_metropolis(bg, x, bg.energy(x), bg.energy, n_steps=3)
        >>> x.shape, u.shape, bool((accepted <= 3).all())
        (torch.Size([4, 1]), torch.Size([4]), True)
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if isinstance(refresh_chunk, bool) or not isinstance(refresh_chunk, int) or refresh_chunk < 1:
        raise ValueError(f"refresh_chunk must be a positive int, got {refresh_chunk!r}")
    x = x.to(device=generator.device, dtype=generator.dtype)
    u = u.to(device=generator.device, dtype=generator.dtype)
    chains = len(x)
    proposals = generator.draw(n_steps * chains, rng, energy=energy)
    log_w_new = proposals.log_weights().reshape(n_steps, chains)
    x_new = proposals.x.reshape(n_steps, chains, -1)
    u_new = proposals.u.reshape(n_steps, chains)
    # fresh weights of the proposals of every step but the last, (lookahead, n_steps - 1, chains)
    lookahead = min(refresh_chunk, n_steps - 1)
    if lookahead:
        ahead = _refreshed_log_weights(
            generator,
            x_new[:-1].reshape(-1, x_new.shape[-1]),
            u_new[:-1].reshape(-1),
            lookahead,
            rng,
        ).reshape(lookahead, n_steps - 1, chains)
    log_w = torch.empty(n_steps, chains, dtype=x.dtype, device=x.device)
    # log_w[s, c] holds the weight of chain c's current point with a fresh y for the steps
    # s < ready[c]
    ready = torch.zeros(chains, dtype=torch.int64, device=x.device)
    log_uniform = torch.rand(n_steps, chains, dtype=x.dtype, device=x.device, generator=rng).log()
    accepted = torch.zeros(chains, dtype=torch.int64, device=x.device)
    for step in range(n_steps):
        stale = ready <= step
        if stale.any():  # a chain that has stayed refresh_chunk steps tends to stay: 8 chunks
            n = min(8 * refresh_chunk, n_steps - step)
            log_w[step : step + n, stale] = _refreshed_log_weights(
                generator, x[stale], u[stale], n, rng
            )
            ready[stale] = step + n
        accept = log_uniform[step] < log_w_new[step] - log_w[step]  # NaN (both zero) rejects
        if not accept.any():
            continue
        x = torch.where(accept[:, None], x_new[step], x)
        u = torch.where(accept, u_new[step], u)
        accepted += accept
        k = min(lookahead, n_steps - step - 1)
        if k:
            log_w[step + 1 : step + 1 + k, accept] = ahead[:k, step, accept]
        ready[accept] = step + 1 + k
    return x, u, accepted


def _refreshed_log_weights(
    generator: BoltzmannGenerator, x: Tensor, u: Tensor, n: int, rng: torch.Generator | None
) -> Tensor:
    """log w of the points x (B, dim) with n fresh draws of y each, shape (n, B); for D = d,
    where there is no y, the one weight of each point, n times."""
    draws = 1 if generator.conditional is None else n
    at = generator.draw_at(x.repeat(draws, 1), u.repeat(draws), rng)
    return at.log_weights().reshape(draws, len(x)).expand(n, -1).clone()


@contextlib.contextmanager
def _one_thread():
    """torch on one thread: for a point at a time, waking a thread pool for each small tensor
    operation costs far more than the arithmetic (a thousand times more on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stream_seed(seed: int, n_proposed: int) -> int:
    """The seed of a move's random stream after ``n_proposed`` proposals: a move restored from
    a storage file continues with numbers it has not used before."""
    return int(np.random.SeedSequence([seed, n_proposed]).generate_state(1, np.uint64)[0])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class BoltzmannGeneratorMove(mcmc.MCMCMove):
    r"""An ``openmmtools.mcmc.MCMCMove`` whose proposals are independent draws of a generator.

    :meth:`apply` makes ``n_proposals`` steps of :func:`independence_metropolis` for the Boltzmann
    distribution of the thermodynamic state it is given: reduced potentials come from the
    state's own Context (:meth:`ThermodynamicState.reduced_potential`), so the state's
    temperature may differ from the training temperature, and the move serves every state of
    a parallel-tempering or replica-exchange sampler. The state's System must be the one the
    generator was trained on (up to thermostat and barostat, as
    ``ThermodynamicState.is_state_compatible`` decides); another is a ``ValueError``.

    For molecules the model lives in internal coordinates, without the rigid motion. The move keeps
    the current state's rotation and translation (the placement of the Z-matrix's canonical frame,
    :meth:`InternalCoordinates.rigid_motion
    <openmm_nice.molecule.internal_coordinates.InternalCoordinates.rigid_motion>`) and changes only the
    internal coordinates: an accepted proposal is placed where the molecule stood, so the positions
    stay continuous for the chain's other moves, and the target of the step, the conditional of the
    internal coordinates given the placement, is exact. Velocities are kept (they are independent of
    positions under the Boltzmann distribution).

    The generator's arithmetic runs in float64 on the CPU (a copy, if it is not already so):
    one point at a time, the CPU is faster than a GPU, and the acceptance ratios are exact to
    rounding.

    Arguments:
        run_or_generator: A run folder written by ``openmm-nice train``, or a
            :class:`~openmm_nice.flows.generator.BoltzmannGenerator` whose energy is an
            :class:`~openmm_nice.energy.openmm_energy.OpenMMEnergy`. Only a move built from a run
            folder can be serialised (openmmtools' ``__getstate__`` convention, e.g. by the
            storage files of multistate samplers): it stores the folder's path and the
            checkpoint's SHA-256, and is rebuilt from them.
        n_proposals: Proposals per :meth:`apply`.
        seed: Seed of the proposals and acceptance tests (None: a random one). A copy
            (``copy.deepcopy``, as multistate samplers make one per state) takes a seed drawn
            from its original's stream.

    Attributes:
        n_accepted: Proposals accepted so far.
        n_proposed: Proposals made so far.
        run: The run folder, or None for a move built from a generator.

    Example (a run trained by ``openmm-nice train``)::

        from openmm import unit
        from openmmtools import mcmc, states
        from openmm_nice import BoltzmannGeneratorMove, load_run

        _, target, _ = load_run("runs/ala2")
        thermodynamic_state = states.ThermodynamicState(target.molecule.system, 300 * unit.kelvin)
        sampler_state = states.SamplerState(target.molecule.positions * unit.nanometer)
        move = mcmc.SequenceMove(
            [mcmc.LangevinDynamicsMove(n_steps=500), BoltzmannGeneratorMove("runs/ala2")]
        )
        mcmc.MCMCSampler(thermodynamic_state, sampler_state, move).run(100)
    """

    def __init__(
        self,
        run_or_generator: str | Path | BoltzmannGenerator,
        n_proposals: int = 1,
        seed: int | None = None,
    ):
        super().__init__()
        if isinstance(run_or_generator, BoltzmannGenerator):
            generator, run, checksum = run_or_generator, None, None
        elif isinstance(run_or_generator, (str, Path)):
            run = Path(run_or_generator).resolve()
            generator, checksum = _load_generator(run), _sha256(run / "checkpoint.pt")
        else:
            raise TypeError(
                "BoltzmannGeneratorMove takes a run folder or a BoltzmannGenerator, got "
                f"{type(run_or_generator).__name__}"
            )
        self.n_accepted = 0
        self.n_proposed = 0
        self._setup(generator, run, checksum, n_proposals, seed)

    def _setup(
        self,
        generator: BoltzmannGenerator,
        run: Path | None,
        checksum: str | None,
        n_proposals: int,
        seed: int | None,
    ) -> None:
        if not isinstance(generator.energy, OpenMMEnergy):
            raise TypeError(
                "BoltzmannGeneratorMove needs a generator of an OpenMM system (its energy an "
                f"OpenMMEnergy), got {type(generator.energy).__name__}; for other energies use "
                "openmm_nice.sampling.moves.independence_metropolis"
            )
        if isinstance(n_proposals, bool) or not isinstance(n_proposals, int) or n_proposals < 1:
            raise ValueError(f"n_proposals must be a positive int, got {n_proposals!r}")
        if generator.dtype != torch.float64 or generator.device.type != "cpu":
            generator = copy.deepcopy(generator).to(device="cpu", dtype=torch.float64)
        self._generator = generator
        self._reference = states.ThermodynamicState(
            generator.energy.system, generator.energy.temperature
        )
        self._internal = getattr(generator.coordinates, "internal", None)
        self.run, self._checksum = run, checksum
        self.n_proposals = n_proposals
        self.seed = torch.Generator().seed() if seed is None else int(seed)
        self._rng = torch.Generator().manual_seed(_stream_seed(self.seed, self.n_proposed))

    @property
    def fraction_accepted(self) -> float:
        """Accepted over proposed proposals (NaN before the first)."""
        return self.n_accepted / self.n_proposed if self.n_proposed else math.nan

    @property
    def statistics(self) -> dict[str, int]:
        """The acceptance statistics, ``{"n_accepted", "n_proposed"}``."""
        return {"n_accepted": self.n_accepted, "n_proposed": self.n_proposed}

    @statistics.setter
    def statistics(self, value: dict[str, int]) -> None:
        self.n_accepted = int(value["n_accepted"])
        self.n_proposed = int(value["n_proposed"])

    def reset_statistics(self) -> None:
        """Set both counts to zero."""
        self.n_accepted = self.n_proposed = 0

    def apply(self, thermodynamic_state, sampler_state, context_cache=None) -> None:
        """Make ``n_proposals`` Metropolis-Hastings steps; modifies ``sampler_state``.

        Arguments:
            thermodynamic_state: An ``openmmtools.states.ThermodynamicState`` of the
                generator's System at any temperature.
            sampler_state: The ``openmmtools.states.SamplerState`` to move.
            context_cache: The ``openmmtools.cache.ContextCache`` whose Context evaluates the
                energies (None: openmmtools' global cache).
        """
        if not self._reference.is_state_compatible(thermodynamic_state):
            raise UserInputError(
                "the thermodynamic state's System is not the one the generator was trained on "
                "(openmmtools' is_state_compatible says no); build the ThermodynamicState from "
                "the run's System, e.g. openmm_nice.load_run(RUN)[1].molecule.system"
            )
        context, _ = self._get_context_cache(context_cache).get_context(thermodynamic_state)
        n_atoms = sampler_state.n_particles
        positions = torch.as_tensor(
            np.asarray(sampler_state.positions.value_in_unit(unit.nanometer)), dtype=torch.float64
        ).reshape(1, n_atoms, 3)
        if self._internal is None:
            rotation, translation = (
                torch.eye(3, dtype=torch.float64)[None],
                positions.new_zeros(1, 3),
            )
        else:
            rotation, translation = self._internal.rigid_motion(positions.reshape(1, -1))
        placed = lambda x: x.reshape(len(x), n_atoms, 3) @ rotation.mT + translation[:, None]

        def energy(x: Tensor) -> Tensor:
            u = torch.full((len(x),), math.inf, dtype=x.dtype)
            for i, row in enumerate(placed(x).numpy()):
                if np.isfinite(row).all():
                    context.setPositions(unit.Quantity(row, unit.nanometer))
                    u[i] = thermodynamic_state.reduced_potential(context)
            return u

        x = ((positions - translation[:, None]) @ rotation).reshape(1, -1)
        with _one_thread():
            x, _, accepted = independence_metropolis(
                self._generator, x, energy(x), energy, self.n_proposals, self._rng
            )
        self.n_proposed += self.n_proposals
        self.n_accepted += int(accepted.item())
        if accepted.item():
            sampler_state.positions = unit.Quantity(placed(x)[0].numpy(), unit.nanometer)

    def __getstate__(self) -> dict[str, Any]:
        if self.run is None:
            raise UserInputError(
                "a BoltzmannGeneratorMove built from a generator object cannot be serialised; "
                "build it from the run folder, BoltzmannGeneratorMove(RUN), to store it (e.g. "
                "in a multistate sampler's storage file)"
            )
        return {
            "run": str(self.run),
            "checkpoint_sha256": self._checksum,
            "n_proposals": self.n_proposals,
            "seed": self.seed,
            **self.statistics,
        }

    def __setstate__(self, serialization: dict[str, Any]) -> None:
        run = Path(serialization["run"])
        checksum = _sha256(run / "checkpoint.pt")
        if checksum != serialization["checkpoint_sha256"]:
            raise UserInputError(
                f"the checkpoint of {run} changed since this move was stored (SHA-256 "
                f"{checksum[:12]}..., stored {serialization['checkpoint_sha256'][:12]}...); the "
                "stored chain was sampled with another model: restore that run folder"
            )
        self.statistics = serialization
        self._setup(
            _load_generator(run), run, checksum, serialization["n_proposals"], serialization["seed"]
        )

    def __deepcopy__(self, memo: dict) -> BoltzmannGeneratorMove:
        # The generator is only read, so copies share it instead of reloading the run.
        twin = type(self).__new__(type(self))
        twin.statistics = self.statistics
        seed = int(torch.randint(0, 2**62, (), generator=self._rng))
        twin._setup(self._generator, self.run, self._checksum, self.n_proposals, seed)
        return twin

    def __str__(self) -> str:
        origin = "a generator" if self.run is None else str(self.run)
        return f"BoltzmannGeneratorMove({origin}, n_proposals={self.n_proposals})"


def _load_generator(run: Path) -> BoltzmannGenerator:
    _, target, generator = load_run(run, device="cpu")
    if not target.is_molecule:
        raise UserInputError(
            f"{run} was trained on the toy target {target.name!r}, not an OpenMM system; for "
            "toy energies use openmm_nice.sampling.moves.independence_metropolis"
        )
    return generator.to(torch.float64)


class SeededLangevinDynamicsMove(mcmc.LangevinDynamicsMove):
    """openmmtools' ``LangevinDynamicsMove`` with a seeded random stream.

    OpenMM seeds a Langevin integrator's noise when its Context is created, at random unless
    the integrator has a seed. This move's integrators carry ``seed``, so a chain run with a
    ``ContextCache`` of its own (which keeps one Context) is reproducible.

    Arguments:
        seed: The integrator's random number seed, 1 to 2**31 - 1 (OpenMM takes 0 as random).
        **kwargs: Those of ``LangevinDynamicsMove`` (timestep, collision_rate, n_steps, ...).
    """

    def __init__(self, seed: int = 1, **kwargs):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 < seed < 2**31:
            raise UserInputError(f"seed must be an int from 1 to 2**31 - 1, got {seed!r}")
        super().__init__(**kwargs)
        self.seed = seed

    def _get_integrator(self, thermodynamic_state):
        integrator = super()._get_integrator(thermodynamic_state)
        integrator.setRandomNumberSeed(self.seed)
        return integrator

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "seed": self.seed}

    def __setstate__(self, serialization: dict[str, Any]) -> None:
        super().__setstate__(serialization)
        self.seed = serialization["seed"]


@dataclass
class ChainResult:
    """One chain of :func:`run_chain`, a frame per iteration.

    Attributes:
        x: Positions (F, 3N) in nm, flattened in OpenMM atom order, float64.
        u: Reduced energies E/kT (F,) at the chain's temperature.
        accepted: Proposals of the generator accepted in each iteration (F,).
        n_proposals: The generator's proposals per iteration.
        langevin_steps: Langevin steps per iteration.
        temperature: The chain's temperature in K.
        timestep_fs: The Langevin time step in fs.
        topology: The molecule's ``openmm.app.Topology``.
        wall_time_s: Wall-clock seconds of the iterations.
    """

    x: np.ndarray
    u: np.ndarray
    accepted: np.ndarray
    n_proposals: int
    langevin_steps: int
    temperature: float
    timestep_fs: float
    topology: Any
    wall_time_s: float

    @property
    def acceptance(self) -> float:
        """The fraction of the generator's proposals accepted (NaN without proposals)."""
        proposed = len(self.accepted) * self.n_proposals
        return float(self.accepted.sum() / proposed) if proposed else math.nan

    @property
    def evaluations_per_iteration(self) -> int:
        """Energy evaluations of one iteration: a force evaluation per Langevin step, and the
        move's evaluation of the current state and of each proposal."""
        return self.langevin_steps + (1 + self.n_proposals if self.n_proposals else 0)


def run_chain(
    run: str | Path,
    n_iterations: int,
    langevin_steps: int,
    n_proposals: int = 1,
    timestep_fs: float | None = None,
    collision_rate_per_ps: float | None = None,
    temperature: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> ChainResult:
    """A chain of ``langevin_steps`` Langevin steps then ``n_proposals`` generator proposals
    per iteration, an openmmtools ``MCMCSampler`` with a ``SequenceMove``, on a run's molecule.

    The chain starts from the molecule's own structure. Energies use the run's OpenMM platform.

    Arguments:
        run: A run folder written by ``openmm-nice train`` for a molecule.
        n_iterations: Iterations, one frame each.
        langevin_steps: Langevin steps per iteration (0: the generator's move alone).
        n_proposals: Generator proposals per iteration (0: Langevin dynamics alone).
        timestep_fs: Langevin time step in fs (default: the run's ``md.timestep_fs``).
        collision_rate_per_ps: Langevin collision rate in 1/ps (default: ``md.friction_per_ps``).
        temperature: The chain's temperature in K (default: the run's).
        seed: Seed of the proposals, the acceptance tests and the Langevin noise.
        progress: Show a progress bar.

    Returns:
        A :class:`ChainResult`.
    """
    from tqdm.auto import tqdm

    if n_iterations < 1:
        raise UserInputError(f"the number of iterations must be positive, got {n_iterations}")
    if langevin_steps < 0 or n_proposals < 0 or langevin_steps + n_proposals == 0:
        raise UserInputError(
            f"an iteration needs Langevin steps or proposals (>= 0, not both 0), got "
            f"langevin_steps={langevin_steps}, n_proposals={n_proposals}"
        )
    config, target, generator = load_run(Path(run), device="cpu")
    if not target.is_molecule:
        raise UserInputError(
            f"{run} was trained on the toy target {target.name!r}; mcmc needs a molecule"
        )
    temperature = config.temperature if temperature is None else float(temperature)
    timestep_fs = config.md.timestep_fs if timestep_fs is None else float(timestep_fs)
    if collision_rate_per_ps is None:
        collision_rate_per_ps = config.md.friction_per_ps
    if not (temperature > 0 and timestep_fs > 0 and collision_rate_per_ps > 0):
        raise UserInputError(
            f"temperature, time step and collision rate must be positive, got {temperature} K, "
            f"{timestep_fs} fs, {collision_rate_per_ps} /ps"
        )
    molecule = target.molecule
    moves = []
    if langevin_steps:
        moves.append(
            SeededLangevinDynamicsMove(
                seed=seed % (2**31 - 1) + 1,
                timestep=timestep_fs * unit.femtosecond,
                collision_rate=collision_rate_per_ps / unit.picosecond,
                n_steps=langevin_steps,
            )
        )
    move = None
    if n_proposals:
        move = BoltzmannGeneratorMove(generator, n_proposals, seed)
        moves.append(move)
    sampler = mcmc.MCMCSampler(
        states.ThermodynamicState(molecule.system, temperature * unit.kelvin),
        states.SamplerState(molecule.positions * unit.nanometer),
        mcmc.SequenceMove(moves),
    )
    # the sampler moves its own copies of the states
    thermodynamic_state, sampler_state = sampler.thermodynamic_state, sampler.sampler_state
    context_cache = cache.ContextCache(
        platform=openmm.Platform.getPlatformByName(config.platform),
        platform_properties=config.platform_properties or None,
    )
    x = np.empty((n_iterations, 3 * molecule.n_atoms))
    u = np.empty(n_iterations)
    accepted = np.zeros(n_iterations, dtype=np.int64)
    started = time.perf_counter()
    for i in tqdm(range(n_iterations), disable=not progress, unit="iteration", desc="mcmc"):
        before = 0 if move is None else move.n_accepted
        sampler.run(1, context_cache=context_cache)
        accepted[i] = 0 if move is None else move.n_accepted - before
        context, _ = context_cache.get_context(thermodynamic_state)
        sampler_state.apply_to_context(context, ignore_velocities=True)
        u[i] = thermodynamic_state.reduced_potential(context)
        x[i] = np.asarray(sampler_state.positions.value_in_unit(unit.nanometer)).reshape(-1)
    wall = time.perf_counter() - started
    return ChainResult(
        x,
        u,
        accepted,
        n_proposals,
        langevin_steps,
        temperature,
        timestep_fs,
        molecule.topology,
        wall,
    )


def write_chain(path: str | Path, result: ChainResult) -> Path:
    """Write a chain: the trajectory to ``path`` (any mdtraj format but .npz, e.g. .dcd), and
    beside it, with the suffix .npz, a sample file (``x``, ``log_w`` = 0, ``u``: the chain's
    frames count equally) with ``phi`` and ``psi`` in radians (for a molecule with a backbone),
    ``accepted`` per iteration, and ``acceptance``, ``temperature``, ``langevin_steps``,
    ``n_proposals``, ``timestep_fs``. Returns the npz's path."""
    import mdtraj

    from openmm_nice.analysis.observables import ramachandran

    path = Path(path)
    if path.suffix.lower() == ".npz":
        raise UserInputError(
            f"--out {str(path)!r} is the trajectory (e.g. .dcd); the energies and angles go "
            "beside it in an .npz of the same name"
        )
    topology = mdtraj.Topology.from_openmm(result.topology)
    write_trajectory(path, result.x, topology)
    extra: dict[str, Any] = {}
    try:
        extra["phi"], extra["psi"] = ramachandran(result.x, topology)
    except ValueError:
        pass  # no backbone
    data = path.with_suffix(".npz")
    save_samples(
        data,
        result.x,
        np.zeros(len(result.x)),
        result.u,
        accepted=result.accepted,
        acceptance=result.acceptance,
        temperature=result.temperature,
        langevin_steps=result.langevin_steps,
        n_proposals=result.n_proposals,
        timestep_fs=result.timestep_fs,
        **extra,
    )
    return data
