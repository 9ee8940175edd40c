"""Estimators against exact answers: ESS, log Z, expectations and profiles by quadrature."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openmm_nice.energies import DoubleWell1D
from openmm_nice.reweighting import (
    bootstrap_error,
    effective_sample_size,
    expectation,
    free_energy_profile,
    log_partition_function,
    probability,
)


@pytest.fixture
def proposal_samples():
    """Samples of N(0, 1.5^2) with weights for the note's double well."""
    rng = np.random.default_rng(0)
    sigma = 1.5
    x = rng.normal(0, sigma, 400_000)
    log_q = -0.5 * (x / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
    log_w = -DoubleWell1D.potential(x) - log_q
    return x, log_w


def test_ess_of_equal_and_degenerate_weights():
    assert effective_sample_size(np.zeros(50)) == pytest.approx(50)
    assert effective_sample_size(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(1)
    assert effective_sample_size(np.log([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)


def test_log_z_and_expectations_against_quadrature(proposal_samples):
    x, log_w = proposal_samples
    e = DoubleWell1D()
    est = log_partition_function(log_w)
    err = bootstrap_error(log_partition_function, log_w, n_bootstrap=50)
    assert 0 < err < 0.01
    assert abs(est - e.log_partition_function()) < 4 * err
    p, p_err = probability(x < 0, log_w)
    assert abs(p - e.probability_below(0, 0.0)) < 4 * p_err
    g = np.linspace(-6, 6, 200001)
    dens = np.exp(-DoubleWell1D.potential(g))
    exact_mean = np.trapezoid(g * dens, g) / np.trapezoid(dens, g)
    mean, m_err = expectation(x, log_w)
    assert abs(mean - exact_mean) < 4 * m_err


def test_direct_expectation_is_the_sample_mean():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    mean, err = expectation(values)
    assert mean == 2.5 and err == pytest.approx(np.std(values, ddof=1) / 2)


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


def test_bad_log_weights_are_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        effective_sample_size(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="every log-weight is -inf"):
        log_partition_function(np.array([-np.inf, -np.inf]))
    with pytest.raises(ValueError, match="1-D"):
        log_partition_function(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="same shape"):
        expectation(np.zeros(3), np.zeros(4))
