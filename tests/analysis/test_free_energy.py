"""Histogram free energies: profiles and maps from one estimator, and the JS divergence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openmm_nice.analysis.free_energy import (
    free_energy_map,
    free_energy_profile,
    jensen_shannon_divergence,
)
from openmm_nice.energy.energies import DoubleWell1D


@pytest.fixture
def proposal_samples():
    """Samples of N(0, 1.5^2) with weights for the note's double well."""
    rng = np.random.default_rng(0)
    sigma = 1.5
    x = rng.normal(0, sigma, 400_000)
    log_q = -0.5 * (x / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
    log_w = -DoubleWell1D.potential(x) - log_q
    return x, log_w


def test_free_energy_profile_matches_the_exact_potential(proposal_samples):
    x, log_w = proposal_samples
    prof = free_energy_profile(x, log_w, bins=40, range=(-2.2, 2.2), n_bootstrap=30)
    u = DoubleWell1D.potential(prof.centers)
    ok = np.isfinite(prof.free_energy) & (u - u.min() < 5)
    diff = prof.free_energy[ok] - (u[ok] - u.min())
    # bin averaging shifts the minimum bin; compare shapes up to the fitted constant
    assert np.abs(diff - diff.mean()).max() < 0.15
    assert np.nanmin(prof.free_energy) == 0
    assert (prof.error[ok] < 0.2).all()


def test_free_energy_map_on_known_points():
    a = np.array([-3.0, 0.1, 0.1])
    b = np.array([0.1, 0.1, 2.0])
    fmap = free_energy_map(a, b, np.log([2.0, 1.0, 1.0]), bins=4, n_bootstrap=0)
    np.testing.assert_allclose(fmap.edges, np.linspace(-math.pi, math.pi, 5))
    expected = np.zeros((4, 4))
    expected[0, 2], expected[2, 2], expected[2, 3] = 0.5, 0.25, 0.25
    np.testing.assert_allclose(fmap.probability, expected)
    assert fmap.free_energy[0, 2] == 0.0
    assert fmap.free_energy[2, 2] == pytest.approx(math.log(2))
    assert np.isinf(fmap.free_energy[1, 1]) and np.isnan(fmap.error).all()  # no bootstrap
    # each point 30 times: every resample reaches the three bins
    direct = free_energy_map(np.repeat(a, 30), np.repeat(b, 30), bins=4, n_bootstrap=50)
    assert direct.probability[0, 2] == pytest.approx(1 / 3)
    assert np.isfinite(direct.error[0, 2]) and np.isinf(direct.error[1, 1])
    with pytest.raises(ValueError, match="radians"):
        free_energy_map(np.array([90.0]), np.array([0.0]))


def test_profile_and_map_are_one_estimator():
    """A map's marginal bins are a profile's: the same -log p with the same bootstrap errors."""
    rng = np.random.default_rng(3)
    a = rng.uniform(-math.pi, math.pi, 2000) * rng.uniform(0.2, 1.0, 2000)
    b = np.full_like(a, 0.5)  # every sample in one bin along b: the map is the profile of a
    log_w = rng.normal(size=len(a))
    fmap = free_energy_map(a, b, log_w, bins=6, n_bootstrap=40, block_size=5, seed=2)
    profile = free_energy_profile(
        a, log_w, bins=6, range=(-math.pi, math.pi), n_bootstrap=40, block_size=5, seed=2
    )
    column = 3  # b = 0.5 lies in the fourth of six bins on [-pi, pi]
    np.testing.assert_allclose(fmap.free_energy[:, column], profile.free_energy, rtol=1e-12)
    np.testing.assert_allclose(fmap.error[:, column], profile.error, rtol=1e-12)


def test_jensen_shannon_divergence():
    assert jensen_shannon_divergence([1, 2, 3], [1, 2, 3]) == 0.0
    assert jensen_shannon_divergence([1, 0], [0, 1]) == pytest.approx(math.log(2))
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    m = (p + q) / 2
    exact = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert jensen_shannon_divergence(p, q) == pytest.approx(exact, rel=1e-12)
    assert jensen_shannon_divergence(q, 3 * p) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match="cannot be compared"):
        jensen_shannon_divergence([1, 2], [1, 2, 3])
