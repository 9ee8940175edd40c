"""Reweighting frames to another state: EXP from one Gaussian state, MBAR from two, exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openmm_nice.analysis.reweighting import expectation, log_partition_function
from openmm_nice.analysis.state_reweighting import StateWeights, state_log_weights


def gaussian_states(betas, n, seed=0):
    """Frames of u_k(x) = beta_k x^2 / 2 (N(0, 1/beta_k)), pooled, with every u_k on them."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1 / math.sqrt(b), n) for b in betas])
    u_kn = np.array([b * x**2 / 2 for b in betas])
    return x, u_kn, np.repeat(np.arange(len(betas)), n)


def log_z(beta):
    return 0.5 * math.log(2 * math.pi / beta)


@pytest.mark.parametrize("betas", [[1.0], [1.0, 0.5]], ids=["EXP", "MBAR"])
def test_gaussian_states_reweighted_to_a_third(betas):
    n, beta_t = 20000, 0.7
    x, u_kn, source = gaussian_states(betas, n)
    log_w, f_k = state_log_weights(u_kn, [n] * len(betas), beta_t * x**2 / 2)
    weights = StateWeights(log_w, beta_t * x**2 / 2, u_kn, source, f_k)
    assert weights.estimator == ("EXP" if len(betas) == 1 else "MBAR")
    # the sources' free energies f_k - f_0 = log Z_0 - log Z_k
    np.testing.assert_allclose(f_k, [log_z(betas[0]) - log_z(b) for b in betas], atol=0.03)
    value, error = weights.log_z_ratio(n_bootstrap=50)
    assert value == pytest.approx(log_partition_function(log_w), abs=1e-6)
    assert 0 < error < 0.05
    assert abs(value - (log_z(beta_t) - log_z(betas[0]))) < 4 * error
    second, second_error = expectation(x**2, log_w, n_bootstrap=50)
    assert abs(second - 1 / beta_t) < 4 * second_error


def test_a_state_given_twice_is_exp_of_it_once():
    x, u_kn, _ = gaussian_states([1.0], 5000)
    u_t = 0.8 * x**2 / 2
    once, _ = state_log_weights(u_kn, [5000], u_t)
    twice, f_k = state_log_weights(
        np.vstack([u_kn, u_kn])[:, np.r_[0:5000, 0:5000]], [5000, 5000], np.r_[u_t, u_t]
    )
    np.testing.assert_allclose(f_k, [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(twice, np.r_[once, once], atol=1e-6)


def test_frames_the_target_cannot_evaluate_get_no_weight():
    log_w, _ = state_log_weights(np.zeros((1, 3)), [3], np.array([0.0, np.inf, np.nan]))
    assert log_w.tolist() == [0.0, -np.inf, -np.inf]
    with pytest.raises(ValueError, match="do not fit"):
        state_log_weights(np.zeros((2, 3)), [3], np.zeros(3))
