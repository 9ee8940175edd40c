r"""Parallel tempering with Hamiltonian Monte Carlo moves, many independent ladders in one batch.

OpenMM evaluates one configuration per call, so a replica-exchange reference on OpenMM's
platforms (openmmtools' samplers) runs its replicas one after another. Here every replica of
every ladder is one row of a batch: a :class:`~openmm_nice.energy.torch_energy.TorchSystemEnergy`
(or any batched potential) evaluates them all at once on the CPU or a GPU, and the ladders are
independent repeats of one protocol.

Each iteration moves every replica by one Hamiltonian Monte Carlo trajectory at its state's
temperature (velocities drawn afresh from the Maxwell-Boltzmann distribution, ``trajectory_steps``
velocity Verlet steps of ``timestep``, the end accepted by the Metropolis rule on the total
energy, as openmmtools' ``HMCIntegrator``), so each state's configurational ensemble is exact
whatever the step. Then neighbouring temperatures exchange their replicas, even pairs and odd
pairs in turn, ``exchange_sweeps`` times, each exchange accepted with probability
:math:`\min(1, e^{(\beta_s - \beta_{s+1})(U_a - U_b)})` for replica ``a`` at state ``s`` and
``b`` at ``s + 1``. Exchanges need no new energy: every replica's energy is known.

Units are OpenMM's: positions in nm, energies in kJ/mol, masses in amu (Da), time in ps,
temperatures in K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import openmm.unit as unit
import torch
from torch import Tensor

from openmm_nice.errors import UserInputError

__all__ = ["MOLAR_GAS_CONSTANT", "ParallelTempering", "geometric_temperatures"]

MOLAR_GAS_CONSTANT = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)


def geometric_temperatures(t_min: float, t_max: float, n: int) -> list[float]:
    """``n`` temperatures from ``t_min`` to ``t_max`` in geometric progression (openmmtools'
    ParallelTemperingSampler spaces them so)."""
    if n < 1 or not 0 < t_min <= t_max:
        raise UserInputError(
            f"temperatures need n >= 1 and 0 < t_min <= t_max, got n={n}, "
            f"t_min={t_min}, t_max={t_max}"
        )
    if n == 1:
        return [float(t_min)]
    ratio = (t_max / t_min) ** (1.0 / (n - 1))
    return [float(t_min * ratio**k) for k in range(n)]


@dataclass
class Iteration:
    """One iteration's record, every tensor with leading dims (ladders, replicas).

    ``positions`` (L, K, n) nm, ``energy`` (L, K) kJ/mol of each replica, ``state`` (L, K) the
    index of the temperature each replica is at after the iteration's exchanges."""

    positions: Tensor
    energy: Tensor
    state: Tensor


class ParallelTempering:
    """Ladders of replicas of one potential, moved by HMC and exchanged between temperatures.

    Arguments:
        potential: Energies (B,) in kJ/mol of positions (B, n) in nm, differentiable (forces
            by autograd), e.g. a TorchSystemEnergy on the device.
        masses: (n / 3,) particle masses in amu (one per particle: x, y, z share it).
        temperatures: The ladder's temperatures in K, increasing.
        positions: Starting positions, (n,) for every replica or (L, K, n).
        n_ladders: Independent ladders L (repeats of the protocol).
        timestep: Velocity Verlet step in ps.
        trajectory_steps: Steps per HMC trajectory.
        exchange_sweeps: Alternating even/odd sweeps of neighbour exchanges per iteration.
        seed: The torch Generator's seed (velocities, Metropolis and exchange draws).

    Example:
        >>> import torch
        >>> harmonic = lambda x: 0.5 * 100.0 * (x**2).sum(-1)  # kJ/mol/nm^2
        >>> pt = ParallelTempering(harmonic, torch.tensor([12.0]), [300.0, 600.0],
        ...     torch.zeros(3, dtype=torch.float64), n_ladders=2, timestep=0.002,
        ...     trajectory_steps=10, seed=1)
        >>> record = pt.step()
        >>> tuple(record.positions.shape), tuple(record.state.shape)
        ((2, 2, 3), (2, 2))
    """

    def __init__(
        self,
        potential: Callable[[Tensor], Tensor],
        masses: Tensor,
        temperatures: list[float],
        positions: Tensor,
        *,
        n_ladders: int = 1,
        timestep: float,
        trajectory_steps: int,
        exchange_sweeps: int = 1,
        seed: int = 0,
    ):
        temperatures = [float(t) for t in temperatures]
        if not temperatures or any(t <= 0 for t in temperatures):
            raise UserInputError(f"temperatures must be positive kelvins, got {temperatures}")
        if any(b <= a for a, b in zip(temperatures, temperatures[1:])):
            raise UserInputError(f"temperatures must increase, got {temperatures}")
        if n_ladders < 1 or trajectory_steps < 1 or exchange_sweeps < 0 or timestep <= 0:
            raise UserInputError(
                "n_ladders and trajectory_steps must be >= 1, exchange_sweeps >= 0 and the "
                f"timestep positive; got {n_ladders}, {trajectory_steps}, {exchange_sweeps}, "
                f"{timestep}"
            )
        positions = torch.as_tensor(positions)
        n = positions.shape[-1]
        n_states = len(temperatures)
        masses = torch.as_tensor(masses, dtype=positions.dtype, device=positions.device)
        if masses.ndim != 1 or 3 * masses.numel() != n or (masses <= 0).any():
            raise UserInputError(
                f"masses must be one positive mass per particle ({n // 3} for positions of "
                f"{n} coordinates), got shape {tuple(masses.shape)}"
            )
        if positions.ndim == 1:
            positions = positions.expand(n_ladders, n_states, n)
        if tuple(positions.shape) != (n_ladders, n_states, n):
            raise UserInputError(
                f"positions must be (n,) or (ladders, replicas, n) = ({n_ladders}, {n_states}, "
                f"{n}), got {tuple(positions.shape)}"
            )
        self.potential = potential
        self.temperatures = temperatures
        self.timestep = float(timestep)
        self.trajectory_steps = int(trajectory_steps)
        self.exchange_sweeps = int(exchange_sweeps)
        like = {"dtype": positions.dtype, "device": positions.device}
        self.kT = torch.tensor(temperatures, **like) * MOLAR_GAS_CONSTANT  # (K,)
        self.inverse_mass = (1.0 / masses).repeat_interleave(3)  # (n,)
        self.generator = torch.Generator(device=positions.device).manual_seed(int(seed))
        self.x = positions.clone().contiguous()
        # replica r of ladder l is at state[l, r]; replica_at[l, s] is the replica at state s
        self.state = torch.arange(n_states, device=positions.device).repeat(n_ladders, 1)
        self.replica_at = self.state.clone()
        self.energy, self.gradient = self._evaluate(self.x)
        self.n_accepted = torch.zeros(n_states, dtype=torch.long, device=positions.device)
        self.n_proposed = torch.zeros_like(self.n_accepted)
        self.n_exchanges_accepted = torch.zeros(max(n_states - 1, 0), **like)
        self.n_exchanges_proposed = torch.zeros_like(self.n_exchanges_accepted)
        self._parity = 0

    def _evaluate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Energies (L, K) and their gradients (L, K, n) of positions (L, K, n)."""
        flat = x.reshape(-1, x.shape[-1]).detach().requires_grad_(True)
        with torch.enable_grad():
            energy = self.potential(flat)
            (gradient,) = torch.autograd.grad(energy.sum(), flat)
        return energy.detach().reshape(x.shape[:-1]), gradient.reshape(x.shape)

    def _uniform(self, shape) -> Tensor:
        return torch.rand(shape, generator=self.generator, dtype=self.x.dtype, device=self.x.device)

    def hmc(self) -> Tensor:
        """One HMC trajectory for every replica at its state's temperature; returns (L, K) the
        accepted moves."""
        kT = self.kT[self.state].unsqueeze(-1)  # (L, K, 1)
        velocity = torch.randn(
            self.x.shape, generator=self.generator, dtype=self.x.dtype, device=self.x.device
        ) * torch.sqrt(kT * self.inverse_mass)
        kinetic = 0.5 * (velocity**2 / self.inverse_mass).sum(-1)
        x, gradient, dt = self.x, self.gradient, self.timestep
        energy = self.energy
        for _ in range(self.trajectory_steps):
            velocity = velocity - 0.5 * dt * gradient * self.inverse_mass
            x = x + dt * velocity
            energy, gradient = self._evaluate(x)
            velocity = velocity - 0.5 * dt * gradient * self.inverse_mass
        kinetic_new = 0.5 * (velocity**2 / self.inverse_mass).sum(-1)
        delta = (energy + kinetic_new) - (self.energy + kinetic)  # kJ/mol
        log_ratio = -delta / kT.squeeze(-1)
        accept = torch.log(self._uniform(log_ratio.shape)) < log_ratio  # NaN energies: rejected
        self.x = torch.where(accept.unsqueeze(-1), x, self.x)
        self.energy = torch.where(accept, energy, self.energy)
        self.gradient = torch.where(accept.unsqueeze(-1), gradient, self.gradient)
        self.n_accepted += torch.zeros_like(self.n_accepted).scatter_add_(
            0, self.state.reshape(-1), accept.reshape(-1).long()
        )
        self.n_proposed += torch.bincount(self.state.reshape(-1), minlength=len(self.kT))
        return accept

    def exchange(self) -> None:
        """Alternating even and odd sweeps of neighbour exchanges, ``exchange_sweeps`` of them."""
        n_states = len(self.temperatures)
        ladders = torch.arange(self.x.shape[0], device=self.x.device).unsqueeze(-1)
        beta = 1.0 / self.kT
        for _ in range(self.exchange_sweeps if n_states > 1 else 0):
            lower = torch.arange(self._parity, n_states - 1, 2, device=self.x.device)
            self._parity = 1 - self._parity
            if lower.numel() == 0:  # two states and the odd sweep: no pair
                continue
            a = self.replica_at[:, lower]  # (L, P) at state s
            b = self.replica_at[:, lower + 1]  # at state s + 1
            energy_a, energy_b = self.energy[ladders, a], self.energy[ladders, b]
            log_ratio = (beta[lower] - beta[lower + 1]) * (energy_a - energy_b)
            accept = torch.log(self._uniform(log_ratio.shape)) < log_ratio
            self.replica_at[:, lower] = torch.where(accept, b, a)
            self.replica_at[:, lower + 1] = torch.where(accept, a, b)
            self.n_exchanges_accepted[lower] += accept.sum(0).to(self.kT.dtype)
            self.n_exchanges_proposed[lower] += accept.shape[0]
        self.state = torch.empty_like(self.state)
        self.state.scatter_(
            1, self.replica_at, torch.arange(n_states, device=self.x.device).expand_as(self.state)
        )

    def step(self) -> Iteration:
        """One iteration: an HMC trajectory for every replica, then the exchanges."""
        self.hmc()
        self.exchange()
        return Iteration(self.x, self.energy, self.state.clone())

    def reduced_potentials(self, energy: Tensor) -> Tensor:
        """u (..., S) = U / kT_s of energies (...) in kJ/mol at every state s."""
        return energy.unsqueeze(-1) / self.kT

    @property
    def acceptance(self) -> list[float]:
        """The HMC acceptance at each state so far."""
        return (self.n_accepted / self.n_proposed.clamp(min=1)).tolist()

    @property
    def exchange_acceptance(self) -> list[float]:
        """The exchange acceptance of each neighbouring pair (s, s + 1) so far."""
        return (self.n_exchanges_accepted / self.n_exchanges_proposed.clamp(min=1)).tolist()

    @property
    def mean_acceptance(self) -> float:
        return float(self.n_accepted.sum()) / max(float(self.n_proposed.sum()), 1.0)

    def __repr__(self) -> str:
        return (
            f"ParallelTempering(ladders={self.x.shape[0]}, temperatures="
            f"{[round(t, 1) for t in self.temperatures]}, timestep={self.timestep} ps, "
            f"trajectory_steps={self.trajectory_steps}, exchange_sweeps={self.exchange_sweeps})"
        )
