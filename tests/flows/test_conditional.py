"""The conditional Gaussian P^(y|x): exact log-density and sampling."""

from __future__ import annotations

import torch

from openmm_nice.flows.conditional import ConditionalGaussian


def test_log_prob_matches_torch_normal():
    g = ConditionalGaussian(3, 2, hidden=[8])
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    mean, scale = g.mean_and_scale(x)
    ref = torch.distributions.Normal(mean, scale).log_prob(y).sum(-1)
    torch.testing.assert_close(g.log_prob(y, x), ref)
    assert (scale > 0).all()


def test_starts_as_the_standard_normal_and_samples_follow_it():
    g = ConditionalGaussian(1, 1, hidden=[8])
    x = torch.zeros(200000, 1)
    y = g.sample(x, torch.Generator().manual_seed(0)).detach()
    assert abs(float(y.mean())) < 0.01 and abs(float(y.std()) - 1) < 0.01
    torch.testing.assert_close(g.mean_and_scale(x[:1])[1], torch.ones(1, 1), atol=1e-3, rtol=0)


def test_gradients_reach_both_networks():
    g = ConditionalGaussian(2, 3, hidden=[8])
    g.log_prob(torch.randn(16, 3), torch.randn(16, 2)).sum().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None, name
