"""Annealed importance sampling in latent space: exact weights, better than the model's own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_nice.analysis.reweighting import (
    bootstrap_error,
    effective_sample_size,
    log_partition_function,
    probability,
)
from openmm_nice.energy.energies import DoubleWell1D, DoubleWell2D, Energy
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.sampling.ais import (
    CESS_TARGET,
    PRECONDITIONERS,
    SCHEDULES,
    _Chains,
    _log_conditional_ess,
    _next_step,
    _whitening,
    adaptive_betas,
    annealed_importance_sampling,
    fisher_matrix,
)


class Harmonic(Energy):
    """U = x^2 / 2: log Z = d/2 log(2 pi)."""

    def _energy(self, x):
        return 0.5 * (x**2).sum(-1)


def _poor_model(energy, latent_dim, seed=0):
    torch.manual_seed(seed)
    bg = BoltzmannGenerator(energy, latent_dim=latent_dim, layers=4, hidden=[16], scale=2.0)
    with torch.no_grad():
        for p in bg.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return bg.double()


def test_zero_levels_are_the_models_own_weights():
    bg = _poor_model(DoubleWell1D(), 2)
    r = annealed_importance_sampling(bg, 500, 0, rng=torch.Generator().manual_seed(3))
    x, log_w, u = bg.sample_with_energies(500, rng=torch.Generator().manual_seed(3))
    torch.testing.assert_close(r.x, x)
    torch.testing.assert_close(r.log_w, log_w)
    torch.testing.assert_close(r.u, u)


def test_an_exact_model_gives_constant_weights_equal_to_log_z():
    """With the model equal to the target every level is the same density: each AIS weight
    is log Z exactly, however the chains moved."""
    energy = Harmonic(3)
    # as initialised, F = identity (zero last layers) and S = a permutation: exactly N(0, I)
    bg = BoltzmannGenerator(energy, layers=2, hidden=[8]).double()
    r = annealed_importance_sampling(bg, 256, 5, pilot=64)
    assert (r.acceptance > 0.2).all()
    torch.testing.assert_close(
        r.log_w, torch.full_like(r.log_w, 1.5 * math.log(2 * math.pi)), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(r.u, energy(r.x))


@pytest.mark.parametrize(
    "preconditioner, schedule",
    [(p, "linear") for p in PRECONDITIONERS] + [("identity", "adaptive")],
)
@pytest.mark.parametrize("energy, latent_dim", [(DoubleWell1D(), 2), (DoubleWell2D(), 3)])
def test_weights_are_unbiased_and_more_even_than_the_models(
    energy, latent_dim, preconditioner, schedule
):
    bg = _poor_model(energy, latent_dim)
    n = 20_000
    _, model_log_w = bg.sample(n, rng=torch.Generator().manual_seed(5))
    r = annealed_importance_sampling(
        bg,
        n,
        20,
        rng=torch.Generator().manual_seed(6),
        preconditioner=preconditioner,
        schedule=schedule,
    )
    log_w = r.log_w.numpy()
    assert effective_sample_size(log_w) > 1.5 * effective_sample_size(model_log_w.numpy())
    log_z = log_partition_function(log_w)
    err = bootstrap_error(log_partition_function, log_w, n_bootstrap=50)
    assert abs(log_z - energy.log_partition_function()) < 5 * err + 2e-3
    p, p_err = probability(r.x[:, 0].numpy() < 0, log_w)
    assert abs(p - energy.probability_below(0, 0.0)) < 5 * p_err + 2e-3
    torch.testing.assert_close(r.u, energy(r.x))
    assert 0.4 < float(r.acceptance.mean()) < 0.8  # the pilot's step sizes hit their mark


def test_undefined_energies_give_zero_weight_not_nan():
    class Wall(Energy):
        def _energy(self, x):  # undefined (inf) left of -1
            u = x[:, 0] ** 2 / 2
            return torch.where(x[:, 0] < -1, torch.full_like(u, math.inf), u)

    bg = _poor_model(Wall(1), 2)
    r = annealed_importance_sampling(bg, 2000, 5, pilot=64)
    assert not torch.isnan(r.log_w).any()
    dead = ~torch.isfinite(r.log_w)
    assert dead.any() and (r.x[~dead, 0] >= -1).all()
    assert np.isfinite(log_partition_function(r.log_w.numpy()))


def test_bad_arguments_are_refused():
    bg = _poor_model(DoubleWell1D(), 2)
    with pytest.raises(ValueError, match="AIS steps"):
        annealed_importance_sampling(bg, 10, -1)
    with pytest.raises(ValueError, match="positive"):
        annealed_importance_sampling(bg, 0, 3)
    with pytest.raises(ValueError, match="pilot"):
        annealed_importance_sampling(bg, 10, 3, pilot=0)
    with pytest.raises(ValueError, match="preconditioner must be one of identity, fisher"):
        annealed_importance_sampling(bg, 10, 3, preconditioner="diagonal")
    with pytest.raises(ValueError, match="schedule must be one of linear, adaptive"):
        annealed_importance_sampling(bg, 10, 3, schedule="geometric")


def test_the_conditional_ess_matches_its_definition_and_the_step_meets_the_target():
    gen = torch.Generator().manual_seed(4)
    log_a = torch.randn(300, dtype=torch.float64, generator=gen)
    log_w = 3 * torch.randn(300, dtype=torch.float64, generator=gen)
    log_w[:7] = -math.inf  # lost chains count for nothing, whatever the step
    alive = torch.isfinite(log_w)
    a = torch.softmax(log_a[alive], 0)
    for delta in (0.0, 0.01, 0.3):
        v = torch.exp(delta * log_w[alive])
        expected = float((a * v).sum() ** 2 / (a * v**2).sum())
        assert math.exp(_log_conditional_ess(log_a, log_w, delta)) == pytest.approx(expected)
    step = _next_step(log_a, log_w, 1.0, math.log(CESS_TARGET))
    assert 0 < step < 1
    assert math.exp(_log_conditional_ess(log_a, log_w, step)) == pytest.approx(CESS_TARGET)
    # room for less than the target's step: the rest of the path in one
    assert _next_step(log_a, log_w, 1e-6, math.log(CESS_TARGET)) == 1e-6


def test_the_adaptive_schedule_crowds_where_the_weights_spread():
    """A model far too wide for its target: the weights' spread is largest at beta = 0 and
    shrinks as the chains settle, so the adaptive levels start denser than the linear ones.
    An exact model (constant weights) keeps the even spacing."""
    bg = _poor_model(DoubleWell2D(), 3)
    betas = adaptive_betas(bg, 20, pilot=256, rng=torch.Generator().manual_seed(1))
    assert len(betas) == 21 and betas[0] == 0.0 and betas[-1] == 1.0
    steps = np.diff(betas)
    assert (steps > 0).all()
    assert steps[0] < 0.5 / 20 and steps[-1] > steps[0]
    exact = BoltzmannGenerator(Harmonic(3), layers=2, hidden=[8]).double()
    assert adaptive_betas(exact, 5, pilot=64) == pytest.approx([k / 5 for k in range(6)])
    # sampling places its levels by the same pilot (the same random stream gives the same ones)
    r = annealed_importance_sampling(
        bg, 64, 20, pilot=256, rng=torch.Generator().manual_seed(1), schedule="adaptive"
    )
    assert r.betas.tolist() == betas[1:]
    linear = annealed_importance_sampling(bg, 64, 20, pilot=64)
    assert linear.betas.tolist() == pytest.approx([k / 20 for k in range(1, 21)])
    assert set(SCHEDULES) == {"linear", "adaptive"}


def test_the_whitened_move_keeps_its_density_exactly():
    """pi_1 of an exact model is N(0, I); 40 moves whitened by a far-from-ideal matrix
    (scales 0.2 to 3, rotated) from exact draws must keep N(0, I). With the proposal ratio
    missing the reverse drift the chains' covariance leaves I (seen)."""
    energy = Harmonic(4)
    bg = BoltzmannGenerator(energy, layers=2, hidden=[8]).double()
    gen = torch.Generator().manual_seed(11)
    chains = _Chains(bg, bg.latent(20_000, gen))
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=gen))
    fisher = q @ torch.diag(torch.tensor([25.0, 4.0, 1.0, 0.11], dtype=torch.float64)) @ q.T
    accepted = []
    for _ in range(40):
        accepted.append(chains.mala(1.0, 0.08, gen, _whitening(fisher, 1.0)).double().mean())
    assert 0.2 < float(torch.stack(accepted).mean()) < 0.95
    z = chains.z
    torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=torch.float64), atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(4, dtype=torch.float64), atol=0.06, rtol=0)


def test_fisher_matrix_of_an_exact_model_is_the_identity():
    energy = Harmonic(3)
    bg = BoltzmannGenerator(energy, layers=2, hidden=[8]).double()
    chains = _Chains(bg, bg.latent(50_000, torch.Generator().manual_seed(2)))
    fisher = fisher_matrix(chains)
    # the trimmed tenth of largest scores shrinks E[z z^T] a little below I, evenly
    values = torch.linalg.eigvalsh(fisher)
    assert float(values.max() - values.min()) < 0.05 and 0.6 < float(values.mean()) < 1.0
