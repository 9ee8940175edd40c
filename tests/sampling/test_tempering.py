"""Batched parallel tempering: every state's ensemble exact against quadrature, the exchange rule,
the replicas' bookkeeping, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_nice.errors import UserInputError
from openmm_nice.sampling.tempering import (
    MOLAR_GAS_CONSTANT,
    ParallelTempering,
    geometric_temperatures,
)

WIDTH = 0.1  # nm: the wells at x = -0.1 and +0.1
HEIGHT = 12.5  # kJ/mol: the barrier, 5 kT at 300 K
TILT = 1.5  # kJ/mol per WIDTH: the right well lower
SPRING = 5000.0  # kJ/mol/nm^2 on y and z


def _well(x):
    """The tilted double well along x (numpy or torch), kJ/mol."""
    s = x / WIDTH
    return HEIGHT * (s**2 - 1) ** 2 - TILT * s


def _double_well(x: torch.Tensor) -> torch.Tensor:
    return _well(x[..., 0]) + 0.5 * SPRING * (x[..., 1:] ** 2).sum(-1)


def _quadrature(temperature: float) -> tuple[float, float]:
    """P(x > 0) and the mean of x of the double well's x at ``temperature``, by quadrature."""
    x = np.linspace(-3 * WIDTH, 3 * WIDTH, 200_001)
    u = _well(x)
    p = np.exp(-(u - u.min()) / (MOLAR_GAS_CONSTANT * temperature))
    p /= p.sum()
    return float(p[x > 0].sum()), float((p * x).sum())


def test_every_state_samples_its_exact_boltzmann_distribution():
    temperatures = geometric_temperatures(300.0, 1200.0, 4)
    start = torch.tensor([-WIDTH, 0.0, 0.0], dtype=torch.float64)  # all in the upper well
    pt = ParallelTempering(
        _double_well,
        torch.tensor([12.0]),
        temperatures,
        start,
        n_ladders=256,
        timestep=0.03,
        trajectory_steps=8,
        seed=3,
    )
    x0, states, y2 = [], [], []
    for k in range(500):
        record = pt.step()
        if k == 19:
            early = float((record.positions[..., 0][record.state == 0] > 0).double().mean())
        if k >= 100:
            x0.append(record.positions[..., 0].clone())
            states.append(record.state.clone())
            y2.append((record.positions[..., 1:] ** 2).mean(-1))
    x0, states, y2 = torch.stack(x0), torch.stack(states), torch.stack(y2)
    assert 0.3 < pt.mean_acceptance < 0.98
    assert min(pt.exchange_acceptance) > 0.1
    for s, temperature in enumerate(temperatures):
        at = states == s
        assert int(at.sum()) == 400 * 256  # one replica at each state in every ladder
        p_right, mean = _quadrature(temperature)
        assert float((x0[at] > 0).double().mean()) == pytest.approx(p_right, abs=0.02)
        assert float(x0[at].mean()) == pytest.approx(mean, abs=0.004)
        # the harmonic coordinates: <y^2> = kT / k exactly
        expected = MOLAR_GAS_CONSTANT * temperature / SPRING
        assert float(y2[at].mean()) == pytest.approx(expected, rel=0.03)
    # without exchanges the 300 K replicas are slow to leave the well they started in (after
    # 20 iterations 0.12 of them have crossed, against 0.56 with the ladder): the ladder is what
    # carries them across
    cold = ParallelTempering(
        _double_well,
        torch.tensor([12.0]),
        [300.0],
        start,
        n_ladders=256,
        timestep=0.03,
        trajectory_steps=8,
        seed=3,
    )
    for _ in range(20):
        cold.step()
    assert float((cold.x[..., 0] > 0).double().mean()) < 0.5 * early


def test_an_exchange_is_accepted_with_the_metropolis_probability():
    temperatures = [300.0, 450.0]
    n = 40_000
    pt = ParallelTempering(
        _double_well,
        torch.tensor([12.0]),
        temperatures,
        torch.zeros(3, dtype=torch.float64),
        n_ladders=n,
        timestep=0.001,
        trajectory_steps=1,
        seed=0,
    )
    for energy_cold, energy_hot in ((5.0, 3.0), (3.0, 5.0), (4.0, 4.0)):
        pt.energy = torch.tensor([energy_cold, energy_hot], dtype=torch.float64).repeat(n, 1)
        pt.replica_at = torch.arange(2).repeat(n, 1)
        pt._parity = 0
        pt.exchange()
        swapped = float((pt.replica_at[:, 0] == 1).double().mean())
        beta = [1.0 / (MOLAR_GAS_CONSTANT * t) for t in temperatures]
        expected = min(1.0, math.exp((beta[0] - beta[1]) * (energy_cold - energy_hot)))
        assert swapped == pytest.approx(expected, abs=4 * math.sqrt(0.25 / n))
        # the state of each replica is the inverse of the replica at each state
        assert torch.equal(pt.state.gather(1, pt.replica_at), torch.arange(2).repeat(n, 1))


def test_the_replicas_carry_their_own_energies_and_forces_through_the_exchanges():
    temperatures = geometric_temperatures(300.0, 900.0, 5)
    pt = ParallelTempering(
        _double_well,
        torch.tensor([12.0]),
        temperatures,
        torch.tensor([-WIDTH, 0.01, 0.0], dtype=torch.float64),
        n_ladders=7,
        timestep=0.03,
        trajectory_steps=5,
        exchange_sweeps=3,
        seed=1,
    )
    moved = torch.zeros(7, 5, dtype=torch.bool)
    for _ in range(50):
        record = pt.step()
        moved |= record.state != torch.arange(5)
        for ladder in range(7):  # a permutation, and its inverse
            assert sorted(record.state[ladder].tolist()) == list(range(5))
        assert torch.equal(pt.state.gather(1, pt.replica_at), torch.arange(5).repeat(7, 1))
    energy, gradient = pt._evaluate(pt.x)
    assert torch.allclose(pt.energy, energy, rtol=0, atol=1e-12)
    assert torch.allclose(pt.gradient, gradient, rtol=0, atol=1e-12)
    assert moved.any()
    u = pt.reduced_potentials(pt.energy)
    assert u.shape == (7, 5, 5)
    assert torch.allclose(u[..., 0] * 300.0, u[..., -1] * 900.0)


def test_bad_input_is_refused_with_the_problem_named():
    x = torch.zeros(3, dtype=torch.float64)
    mass = torch.tensor([12.0])
    kwargs = {"timestep": 0.001, "trajectory_steps": 5}
    with pytest.raises(UserInputError, match="increase"):
        ParallelTempering(_double_well, mass, [600.0, 300.0], x, **kwargs)
    with pytest.raises(UserInputError, match="positive kelvins"):
        ParallelTempering(_double_well, mass, [0.0, 300.0], x, **kwargs)
    with pytest.raises(UserInputError, match="one positive mass per particle"):
        ParallelTempering(_double_well, torch.tensor([12.0, 1.0]), [300.0], x, **kwargs)
    with pytest.raises(UserInputError, match=r"\(ladders, replicas, n\)"):
        ParallelTempering(_double_well, mass, [300.0], torch.zeros(2, 2, 3), **kwargs)
    with pytest.raises(UserInputError, match="trajectory_steps"):
        ParallelTempering(_double_well, mass, [300.0], x, timestep=0.001, trajectory_steps=0)
    with pytest.raises(UserInputError, match="t_min"):
        geometric_temperatures(300.0, 200.0, 3)
    assert geometric_temperatures(300.0, 1200.0, 3) == pytest.approx([300.0, 600.0, 1200.0])
