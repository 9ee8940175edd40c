"""The composed generator: exact densities and unbiased importance weights for D = d and D > d."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_nice.analysis.reweighting import bootstrap_error, log_partition_function, probability
from openmm_nice.energy.energies import DoubleWell1D, DoubleWell2D
from openmm_nice.flows import generator as generator_module
from openmm_nice.flows.generator import BoltzmannGenerator, standard_normal_log_prob


def _random_generator(energy, latent_dim, scale=1.5, seed=0):
    torch.manual_seed(seed)
    bg = BoltzmannGenerator(energy, latent_dim=latent_dim, layers=4, hidden=[16], scale=scale)
    with torch.no_grad():
        for p in bg.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return bg


@pytest.mark.parametrize("latent_dim", [1, 2, 3])
def test_draw_density_agrees_with_the_closed_form_inverse(latent_dim):
    bg = _random_generator(DoubleWell1D(), latent_dim)
    d = bg.draw(64)
    torch.testing.assert_close(bg.flow_log_prob(d.x_flow, d.y), d.log_p, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("latent_dim", [1, 3])
def test_draw_at_a_drawn_point_recovers_its_latent_and_weight(latent_dim):
    bg = _random_generator(DoubleWell1D(), latent_dim)
    d = bg.draw(64)
    at = bg.draw_at(d.x, d.u, rng=torch.Generator().manual_seed(1))
    torch.testing.assert_close(at.x_flow, d.x_flow, rtol=0, atol=0)
    again = bg.draw_from(at.z)  # z is the inverse of (x, the fresh y)
    torch.testing.assert_close(again.x, d.x, rtol=0, atol=1e-10)
    torch.testing.assert_close(again.log_weights(), at.log_weights(), rtol=0, atol=1e-10)
    if latent_dim == 1:  # D = d: nothing is drawn, the point's weight is the draw's own
        torch.testing.assert_close(at.log_weights(), d.log_weights(), rtol=0, atol=1e-10)
    else:  # y is drawn afresh from P^(y|x)
        assert (at.y - d.y).abs().min() > 0
    with pytest.raises(ValueError, match="shape"):
        bg.draw_at(d.x, d.u[:3])


def test_draw_with_another_energy_weights_by_that_energy():
    bg = _random_generator(DoubleWell1D(), 2)
    z = torch.randn(16, 2)
    own, hot = bg.draw_from(z), bg.draw_from(z, energy=lambda x: 0.5 * bg.energy(x))
    torch.testing.assert_close(hot.u, 0.5 * own.u)
    torch.testing.assert_close(hot.log_weights(), own.log_weights(beta=0.5))


def test_joint_density_is_the_change_of_variables_with_an_autograd_jacobian():
    bg = _random_generator(DoubleWell2D(), 2)
    z = torch.randn(5, 2)

    def push(v):
        x, y, _ = bg.flow_forward(v[None])
        return torch.cat([x, y], -1)[0]

    _, _, log_p = bg.flow_forward(z)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(push, z[i])
        ref = standard_normal_log_prob(z[i : i + 1])[0] - torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(log_p[i], ref)


@pytest.mark.parametrize("rows", [65536, 310], ids=["one-pass", "chunked"])
def test_marginal_log_prob_for_redundant_latents_matches_quadrature_over_y(rows, monkeypatch):
    # rows: the flow passes' batch limit; 310 splits the 20,000 draws of y into 194 chunks of 103
    # and a last one of 18
    monkeypatch.setattr(generator_module, "_LOG_PROB_ROWS", rows)
    bg = _random_generator(DoubleWell1D(), 2)
    x = torch.tensor([[-1.2], [0.3], [1.4]])
    grid = torch.linspace(-12, 12, 24001)
    exact = []
    for xi in x:
        lp = bg.flow_log_prob(xi.expand(len(grid), 1), grid[:, None])
        exact.append(torch.logsumexp(lp, 0) + math.log(grid[1] - grid[0]))
    exact = torch.stack(exact)
    with torch.no_grad():
        estimate = bg.log_prob(x, n_y=20000, rng=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0)


def test_log_prob_refuses_fewer_than_one_draw_of_y():
    with pytest.raises(ValueError, match="n_y must be at least 1"):
        _random_generator(DoubleWell1D(), 2).log_prob(torch.zeros(2, 1), n_y=0)


def test_log_prob_is_exact_without_redundant_latents():
    bg = _random_generator(DoubleWell2D(), 2)
    d = bg.draw(16)
    torch.testing.assert_close(bg.log_prob(d.x), d.log_p)


@pytest.mark.parametrize(
    "energy, latent_dim", [(DoubleWell1D(), 2), (DoubleWell1D(), 3), (DoubleWell2D(), 2)]
)
def test_importance_weights_are_unbiased_even_for_a_poor_model(energy, latent_dim):
    bg = _random_generator(energy, latent_dim, scale=2.0)
    x, log_w = bg.sample(200_000, rng=torch.Generator().manual_seed(1))
    log_w = log_w.numpy()
    est = log_partition_function(log_w)
    err = bootstrap_error(log_partition_function, log_w, n_bootstrap=50)
    assert abs(est - energy.log_partition_function()) < 5 * err + 1e-3
    p, p_err = probability(x[:, 0].numpy() < 0, log_w)
    assert abs(p - energy.probability_below(0, 0.0)) < 5 * p_err + 1e-3


def test_non_finite_points_get_zero_weight_not_nan():
    bg = _random_generator(DoubleWell1D(), 2)
    d = bg.draw(4)
    d.u = torch.tensor([1.0, math.inf, math.nan, 2.0])
    log_w = d.log_weights()
    assert torch.isfinite(log_w[[0, 3]]).all()
    assert (log_w[[1, 2]] == -math.inf).all()


def test_latent_dim_below_the_target_dimension_is_refused():
    with pytest.raises(ValueError, match="latent_dim must be at least"):
        BoltzmannGenerator(DoubleWell2D(), latent_dim=1)


def test_sample_shapes_and_chunking_are_consistent():
    bg = _random_generator(DoubleWell1D(), 2)
    x1, w1 = bg.sample(1000, batch_size=1000, rng=torch.Generator().manual_seed(3))
    x2, w2 = bg.sample(1000, batch_size=128, rng=torch.Generator().manual_seed(3))
    assert x1.shape == (1000, 1) and w1.shape == (1000,)
    assert np.isfinite(w1.numpy()).all()
    torch.testing.assert_close(x1, x2)
