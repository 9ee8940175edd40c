"""Estimators against exact answers: ESS, log Z, expectations, populations, bootstrap errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openmm_nice.analysis.reweighting import (
    bootstrap,
    bootstrap_error,
    bootstrap_spread,
    effective_sample_size,
    expectation,
    log_partition_function,
    probability,
    region_free_energy,
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


def test_direct_expectation_is_the_sample_mean_with_its_standard_error():
    values = np.random.default_rng(4).normal(size=5000)
    mean, err = expectation(values)
    assert mean == pytest.approx(values.mean(), abs=1e-15)
    assert err == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)), rel=0.15)


def test_weighted_errors_agree_with_the_delta_method(proposal_samples):
    """The bootstrap error of a weighted mean is the delta method's, where that one holds."""
    x, log_w = proposal_samples
    x, log_w = x[:20000], log_w[:20000]
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    for f in (x, (x < 0).astype(float)):
        mean, err = expectation(f, log_w, n_bootstrap=300)
        assert mean == pytest.approx(np.sum(w * f))
        assert err == pytest.approx(np.sqrt(np.sum(w**2 * (f - mean) ** 2)), rel=0.2)
    assert probability(x < 0, log_w, n_bootstrap=300) == expectation(
        (x < 0).astype(float), log_w, n_bootstrap=300
    )


def test_region_free_energy_error_agrees_with_the_delta_method():
    rng = np.random.default_rng(1)
    inside = rng.random(20000) < 0.1
    r = region_free_energy(inside, n_bootstrap=300)
    p = inside.mean()
    assert r["p"] == pytest.approx(p) and r["df_kT"] == pytest.approx(-math.log(p / (1 - p)))
    binomial = math.sqrt(p * (1 - p) / len(inside))
    assert r["p_error"] == pytest.approx(binomial, rel=0.2)
    assert r["df_error_kT"] == pytest.approx(binomial / (p * (1 - p)), rel=0.2)
    assert (r["p"], r["p_error"]) == probability(inside, n_bootstrap=300)
    none = region_free_energy(np.zeros(10, bool), n_bootstrap=10)
    assert none["p"] == 0.0 and none["df_kT"] == math.inf and none["df_error_kT"] == math.inf


def test_block_bootstrap_sees_correlation():
    # each independent value repeated 10 times: blocks of 10 see 100 samples, not 1000
    values = np.repeat(np.random.default_rng(2).normal(size=100), 10)
    plain = expectation(values, n_bootstrap=300).error
    blocked = expectation(values, n_bootstrap=300, block_size=10).error
    assert blocked / plain == pytest.approx(math.sqrt(10), rel=0.25)
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        bootstrap(lambda i: 0.0, 10, block_size=6)


def test_circular_mean_of_angles_near_pi():
    m = expectation(np.array([math.pi - 0.1, -math.pi + 0.1, math.pi - 0.05]), circular=True)
    assert abs(m.value) > 3.0 and m.error < 0.1


def test_bad_log_weights_are_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        effective_sample_size(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="every log-weight is -inf"):
        log_partition_function(np.array([-np.inf, -np.inf]))
    with pytest.raises(ValueError, match="1-D"):
        log_partition_function(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="same shape"):
        expectation(np.zeros(3), np.zeros(4))


def test_bootstrap_spread_ranks_non_finite_replicates_instead_of_dropping_them():
    rng = np.random.default_rng(0)
    finite = rng.normal(size=180)
    assert bootstrap_spread(finite) == pytest.approx(finite.std(ddof=1))  # as before
    with_misses = np.r_[finite, [np.inf] * 20]  # 10% of resamples missed the region
    low, high = np.percentile(finite, [16, 84])
    spread = bootstrap_spread(with_misses)
    # the misses widen the interval: dropping them would give the finite ones' spread
    assert math.isfinite(spread) and spread > (high - low) / 2
    assert bootstrap_spread(np.r_[finite, [np.nan] * 20]) == pytest.approx(spread)
    assert bootstrap_spread(np.r_[finite, [np.inf] * 40]) == math.inf  # 18%: unbounded
    columns = bootstrap_spread(np.stack([finite, np.r_[finite[:170], [np.inf] * 10]], axis=1))
    assert columns[0] == pytest.approx(finite.std(ddof=1)) and columns[1] > columns[0] * 0.9
