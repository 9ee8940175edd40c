"""MCMC walkers: MALA and flow-proposal exchanges sample e^{-beta U}; the trainer resumes them."""

from __future__ import annotations

import math

import pytest
import torch

from openmm_nice.energy.energies import DoubleWell1D, Energy
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.io import load_checkpoint, save_checkpoint
from openmm_nice.training.trainer import Trainer
from openmm_nice.training.walkers import Walkers


class Harmonic(Energy):
    """U = x^2 / 2 in every coordinate: e^{-beta U} is N(0, 1 / beta)."""

    def _energy(self, x):
        return 0.5 * (x**2).sum(-1)


def test_langevin_samples_the_tempered_density_and_adapts_its_step():
    energy = Harmonic(2)
    rng = torch.Generator().manual_seed(0)
    x = torch.full((4000, 2), 3.0, dtype=torch.float64)  # all start far out in a tail
    walkers = Walkers(x, energy(x), step_size=1e-4)
    acceptance = walkers.langevin(energy, beta=0.5, steps=400, rng=rng)
    assert 0.4 < acceptance < 0.8
    assert walkers.step_size > 1e-2  # grown from a far too small start
    # 4000 walkers: standard errors 0.022 (mean) and 0.045 (variance 2)
    torch.testing.assert_close(
        walkers.x.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.1, rtol=0
    )
    torch.testing.assert_close(
        walkers.x.var(0), torch.full((2,), 2.0, dtype=torch.float64), atol=0.2, rtol=0
    )
    torch.testing.assert_close(walkers.u, energy(walkers.x))


class Sinh:
    """x = sinh(s) in each coordinate: a nonlinear bijection with log|dx/ds| = sum log cosh s."""

    def call_and_ladj(self, s):
        return torch.sinh(s), torch.log(torch.cosh(s)).sum(-1)

    def inverse_and_ladj(self, x):
        s = torch.asinh(x)
        return s, -torch.log(torch.cosh(s)).sum(-1)


def test_langevin_in_other_coordinates_samples_the_same_density_in_x():
    # chains that move in s = asinh(x) still sample e^{-beta U(x)} in x: the Jacobian enters
    # their density (without it they would sample e^{-beta U} in s, variance far from 2)
    energy = Harmonic(2)
    rng = torch.Generator().manual_seed(1)
    x = torch.full((4000, 2), 3.0, dtype=torch.float64)
    walkers = Walkers(x, energy(x), step_size=1e-3)
    acceptance = walkers.langevin(energy, beta=0.5, steps=400, rng=rng, coordinates=Sinh())
    assert 0.4 < acceptance < 0.8
    torch.testing.assert_close(
        walkers.x.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.1, rtol=0
    )
    torch.testing.assert_close(
        walkers.x.var(0), torch.full((2,), 2.0, dtype=torch.float64), atol=0.2, rtol=0
    )
    torch.testing.assert_close(walkers.u, energy(walkers.x))


def test_exchange_with_model_proposals_reaches_the_other_well():
    """Independence Metropolis-Hastings with a broad model: walkers all started in the left
    well of the note's double well end up in both, in the exact proportion."""
    energy = DoubleWell1D()
    model = BoltzmannGenerator(energy, layers=1, hidden=[4], scale=1.5).double()
    rng = torch.Generator().manual_seed(1)
    x = torch.full((4000, 1), -1.47, dtype=torch.float64)
    walkers = Walkers(x, energy(x))
    moved = []
    for _ in range(60):
        with torch.no_grad():
            d = model.draw(4000, rng)
        moved.append(walkers.exchange(model, d.x, d.u, d.log_weights(), 1.0, rng))
    assert 0.05 < sum(moved) / len(moved) < 0.9
    left = float((walkers.x < 0).double().mean())
    exact = energy.probability_below(0, 0.0)  # 0.93273
    assert left == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 4000) + 0.01)
    torch.testing.assert_close(walkers.u, energy(walkers.x))


def test_walkers_reject_bad_shapes_and_take_finite_proposals_over_clashes():
    with pytest.raises(ValueError, match="shape"):
        Walkers(torch.zeros(3, 2), torch.zeros(2))
    energy = DoubleWell1D()
    model = BoltzmannGenerator(energy, layers=1, hidden=[4]).double()
    x = torch.zeros(8, 1, dtype=torch.float64)
    walkers = Walkers(x, torch.full((8,), math.inf, dtype=torch.float64))
    with torch.no_grad():
        d = model.draw(8)
    assert walkers.exchange(model, d.x, d.u, d.log_weights(), 1.0) == 1.0
    with pytest.raises(ValueError, match="at least 8 proposals"):
        walkers.exchange(model, d.x[:4], d.u[:4], d.log_weights()[:4], 1.0)


def _trainer(steps=12):
    torch.manual_seed(0)
    bg = BoltzmannGenerator(
        DoubleWell1D(), latent_dim=2, layers=2, hidden=[8], conditional_hidden=[8]
    )
    return Trainer(
        bg,
        steps=steps,
        batch_size=64,
        walkers=32,
        walker_steps=3,
        beta_start=0.2,
        anneal_steps=6,
        seed=3,
    )


def test_trainer_with_walkers_reports_them_and_resumes_exactly(tmp_path):
    states = []

    class Keep:
        def describeNextReport(self, trainer):  # noqa: N802
            return 1

        def report(self, trainer, state):
            states.append(state)

    full = _trainer()
    full.reporters = [Keep()]
    full.run()
    assert all(0 <= s["walker_exchange"] <= 1 and 0 <= s["walker_acceptance"] <= 1 for s in states)
    assert all(math.isfinite(s["walker_nll"]) for s in states)

    first = _trainer()
    first.run(5)
    save_checkpoint(tmp_path / "c.pt", first.state_dict())
    saved = load_checkpoint(tmp_path / "c.pt")  # weights_only=True
    assert saved["walkers"]["x"].shape == (32, 1)
    second = _trainer()
    second.load_state_dict(saved)
    second.run()
    torch.testing.assert_close(second._walkers.x, full._walkers.x)
    for a, b in zip(second.generator.parameters(), full.generator.parameters()):
        torch.testing.assert_close(a, b)


def test_trainer_refuses_more_walkers_than_proposals():
    bg = BoltzmannGenerator(DoubleWell1D(), layers=1, hidden=[4])
    with pytest.raises(ValueError, match="walkers must be between 0 and batch_size"):
        Trainer(bg, steps=1, batch_size=16, walkers=32)


def test_population_annealing_follows_the_boltzmann_shares_of_the_wells():
    """Walkers equilibrated at beta 0.2 and annealed to 1 by reweighting and resampling alone
    (no move crosses the barrier) end with the exact share of the left well at beta = 1."""
    energy = DoubleWell1D()
    generator = torch.Generator().manual_seed(5)
    grid = torch.linspace(-4, 4, 400_001, dtype=torch.float64)

    def exact_left(beta: float) -> float:
        density = torch.exp(-beta * DoubleWell1D.potential(grid))
        return float(density[grid < 0].sum() / density.sum())

    # 20,000 exact draws at beta = 0.2 by inverse-CDF sampling on the grid
    density = torch.exp(-0.2 * DoubleWell1D.potential(grid))
    cdf = torch.cumsum(density, 0) / density.sum()
    x = grid[torch.searchsorted(cdf, torch.rand(20_000, dtype=torch.float64, generator=generator))]
    walkers = Walkers(x[:, None], energy(x[:, None]), beta=0.2)
    resampled = 0
    for beta in torch.linspace(0.2, 1.0, 41)[1:].tolist():
        resampled += walkers.anneal(beta, generator)
    w = walkers.normalized_weights()
    left = float((w * (walkers.x[:, 0] < 0)).sum())
    assert resampled > 0 and walkers.beta == 1.0
    assert left == pytest.approx(exact_left(1.0), abs=0.01)  # 0.933 (0.615 at beta 0.2)
    copy = Walkers.from_state_dict(walkers.state_dict())
    assert copy.beta == 1.0 and torch.equal(copy.log_weight, walkers.log_weight)


def test_walkers_of_a_molecule_move_in_the_maps_coordinates():
    from openmm_nice.config import config_from_dict
    from openmm_nice.targets import build_target, build_trainer

    def trainer(walker_coordinates):
        config = config_from_dict(
            {
                "system": "alanine_dipeptide_vacuum",
                "model": {"latent_dim": 60, "layers": 2, "hidden": [16]},
                "training": {
                    "steps": 4,
                    "batch_size": 32,
                    "beta_start": 1.0,
                    "anneal_steps": 0,
                    "walkers": 32,
                    "walker_steps": 10,
                    "walker_coordinates": walker_coordinates,
                },
            }
        )
        target = build_target(config)
        return target, build_trainer(config, target)

    moved = {}
    for space in ("cartesian", "internal"):
        target, t = trainer(space)
        try:
            t.run()  # 40 MALA steps: the step size adapted to its space
            walkers = t._walkers
            # the cached energies are those of the chains' positions (a stale cache is off by
            # kT); float32 positions of terms of hundreds of kT leave about 1e-5 kT between
            # two evaluations, which is no staleness
            torch.testing.assert_close(walkers.u, target.energy(walkers.x), rtol=1e-5, atol=1e-3)
            internal = t.generator.coordinates.internal
            n = internal.n_atoms
            before = internal.to_internal(walkers.x.double())[0][:, 2 * n - 3 :]
            walkers.langevin(
                target.energy,
                1.0,
                20,
                torch.Generator().manual_seed(0),
                t.generator.coordinates if space == "internal" else None,
            )
            after = internal.to_internal(walkers.x.double())[0][:, 2 * n - 3 :]
            turned = torch.remainder(after - before + math.pi, 2 * math.pi) - math.pi
            moved[space] = float(turned.abs().mean())
            # the chains stay where the model's density is defined (the map's image)
            ladj = t.generator.coordinates.inverse_and_ladj(walkers.x.double())[1]
            assert torch.isfinite(ladj).all() and torch.isfinite(walkers.u).all()
        finally:
            target.close()
    assert min(moved.values()) > 0.01, moved  # radians: both kernels turn the torsions
    with pytest.raises(ValueError, match="walker_coordinates: internal needs"):
        Trainer(
            BoltzmannGenerator(DoubleWell1D(), latent_dim=2, layers=2, hidden=[4]),
            walkers=4,
            batch_size=4,
            walker_coordinates="internal",
        )
