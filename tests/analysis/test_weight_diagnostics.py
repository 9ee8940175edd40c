"""The weights' diagnostics: the Pareto k-hat against exact tails and scipy's fit, block ESS, the
largest weight's share, the verdict, and what `sample` and `reweight` report of them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from scipy import stats

import openmm_nice
from openmm_nice.analysis.reweighting import effective_sample_size
from openmm_nice.analysis.weight_diagnostics import (
    block_ess,
    diagnose_region,
    diagnose_weights,
    generalized_pareto_fit,
    max_weight_share,
    pareto_k,
    pareto_k_threshold,
)
from openmm_nice.cli import main
from openmm_nice.errors import UserInputError


@pytest.mark.parametrize("k", [0.2, 0.5, 0.8, 1.1])
def test_pareto_k_of_exact_pareto_weights(k):
    # w = u^-k is Pareto with shape k: its tail is a generalized Pareto of the same k
    rng = np.random.default_rng(1)
    estimates = [pareto_k(-k * np.log(rng.uniform(size=20000))) for _ in range(12)]
    assert np.mean(estimates) == pytest.approx(k, abs=0.05)
    assert np.std(estimates) < 0.12


@pytest.mark.parametrize("shape", [-0.3, 0.25, 0.7])
def test_generalized_pareto_fit_agrees_with_scipys_maximum_likelihood(shape):
    x = stats.genpareto.rvs(shape, scale=1.7, size=4000, random_state=2)
    k, sigma = generalized_pareto_fit(x)
    k_ml, _, sigma_ml = stats.genpareto.fit(x, floc=0)
    assert k == pytest.approx(k_ml, abs=0.03)
    assert sigma == pytest.approx(sigma_ml, rel=0.05)


@pytest.mark.filterwarnings("error")
def test_exceedances_over_hundreds_of_orders_of_magnitude_fit_without_a_warning():
    # a training batch's weights: a quartile of the tail among the subnormal numbers
    heavy, sigma = generalized_pareto_fit(np.r_[np.full(20, 1e-310), np.linspace(0.1, 1, 10)])
    assert heavy > 1.0 and sigma > 0
    # nothing left to fit: the heaviest tail there is, which no verdict passes
    k, sigma = generalized_pareto_fit(np.r_[np.full(20, 5e-324), np.linspace(0.1, 1, 10)])
    assert k == math.inf and math.isnan(sigma)
    log_w = np.r_[np.full(400, -2000.0), np.full(60, -744.0), np.linspace(-5.0, 0.0, 10)]
    assert not diagnose_weights(log_w).reliable


def test_light_tailed_weights_are_reliable_and_heavy_tailed_ones_are_not():
    rng = np.random.default_rng(0)
    light = diagnose_weights(rng.normal(scale=0.3, size=40000))
    assert light.reliable and light.pareto_k < 0.3
    assert light.verdict.startswith("reliable")
    heavy = diagnose_weights(-1.0 * np.log(rng.uniform(size=40000)))  # k = 1: infinite mean
    assert not heavy.reliable and heavy.pareto_k > heavy.pareto_k_threshold
    assert "Pareto k" in heavy.verdict and "--ais-steps" in heavy.verdict
    assert "UNRELIABLE" in heavy.caption() and "UNRELIABLE" not in light.caption()


def test_a_shift_of_every_log_weight_changes_nothing():
    log_w = np.random.default_rng(3).gumbel(size=5000)
    a, b = diagnose_weights(log_w), diagnose_weights(log_w + 700.0)
    assert a.pareto_k == pytest.approx(b.pareto_k, abs=1e-9)
    assert a.max_weight_share == pytest.approx(b.max_weight_share, rel=1e-12)
    assert a.block_ess == pytest.approx(b.block_ess, rel=1e-12)


def test_block_ess_is_the_ess_of_each_block():
    log_w = np.random.default_rng(4).normal(scale=1.5, size=1003)
    blocks = block_ess(log_w, n_blocks=4)
    for b, value in enumerate(blocks):
        block = log_w[b * 250 : (b + 1) * 250]
        assert value == pytest.approx(effective_sample_size(block) / 250)
    assert diagnose_weights(log_w).ess == pytest.approx(effective_sample_size(log_w) / 1003)


def test_max_weight_share():
    assert max_weight_share(np.log([2.0, 1.0, 1.0])) == pytest.approx(0.5)
    assert max_weight_share(np.array([0.0, -np.inf])) == 1.0


def test_equal_weights_have_no_tail_and_zero_weights_are_counted():
    d = diagnose_weights(np.r_[np.zeros(1000), [-np.inf] * 7])
    assert d.pareto_k == -math.inf and d.reliable
    assert d.n == 1007 and d.n_zero_weight == 7
    assert d.max_weight_share == pytest.approx(1e-3)
    assert d.block_ess[-1] < 1.0  # the last block holds the zero weights


def test_too_few_samples_cannot_be_judged():
    d = diagnose_weights(np.random.default_rng(5).normal(size=12))
    assert math.isnan(d.pareto_k) and not d.reliable
    assert "too few" in d.verdict


def test_threshold_follows_the_sample_count():
    assert pareto_k_threshold(100) == pytest.approx(0.5)
    assert pareto_k_threshold(1000) == pytest.approx(2 / 3)
    assert pareto_k_threshold(10**6) == 0.7


@pytest.mark.parametrize(
    "bad", [np.array([0.0, np.nan]), np.array([np.inf, 0.0]), np.zeros((2, 2)), np.zeros(0)]
)
def test_bad_log_weights_are_refused(bad):
    with pytest.raises(UserInputError, match="log-weights"):
        diagnose_weights(bad)


def test_every_log_weight_minus_inf_is_refused():
    with pytest.raises(UserInputError, match="no sample has positive weight"):
        diagnose_weights(np.full(10, -np.inf))


def test_version_is_the_installed_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"openmm-nice {openmm_nice.__version__}"
    assert openmm_nice.__version__ != "0+unknown"  # the package is installed (pip install -e)


@pytest.fixture
def double_well_config(tmp_path):
    path = tmp_path / "dw.yaml"
    path.write_text(yaml.safe_dump({"system": "double_well_1d", "model": {"latent_dim": 2}}))
    return path


def _reweight(samples, config, out) -> int:
    argv = ["reweight", str(samples), "--config", str(config), "--out", str(out)]
    return main([*argv, "--n-bootstrap", "20"])


def test_reweight_marks_heavy_tailed_weights_unreliable(tmp_path, double_well_config, capsys):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(20000, 1))
    samples = tmp_path / "heavy.npz"
    np.savez(samples, x=x, log_w=-1.2 * np.log(rng.uniform(size=len(x))), u=np.zeros(len(x)))
    assert _reweight(samples, double_well_config, tmp_path / "rw") == 0
    captured = capsys.readouterr()
    assert "warning: importance weights unreliable" in captured.err
    summary = json.loads((tmp_path / "rw" / "summary.json").read_text())
    assert summary["reliable"] is False and "fail the tail diagnostic" in summary["warning"]
    assert summary["pareto_k"] > 0.7 and len(summary["block_ess"]) == 4
    assert 0 < summary["max_weight_share"] <= 1
    populations = [v for k, v in summary.items() if k.startswith("p(x0<")]
    assert populations and all(p["reweighted"]["reliable"] is False for p in populations)


def test_reweight_of_good_weights_says_nothing(tmp_path, double_well_config, capsys):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(20000, 1))
    samples = tmp_path / "good.npz"
    np.savez(samples, x=x, log_w=rng.normal(scale=0.2, size=len(x)), u=np.zeros(len(x)))
    assert _reweight(samples, double_well_config, tmp_path / "rw") == 0
    assert "warning" not in capsys.readouterr().err
    summary = json.loads((tmp_path / "rw" / "summary.json").read_text())
    assert summary["reliable"] is True and "warning" not in summary
    assert summary["ess"] > 0.9 and summary["pareto_k"] < 0.5


@pytest.mark.parametrize("seed", range(3))
def test_a_region_with_a_heavy_tail_fails_where_the_weights_as_a_whole_pass(seed):
    """The valine case: weights light-tailed overall, heavy-tailed inside a region the model
    draws often but badly (the region's largest weights far below the others)."""
    rng = np.random.default_rng(seed)
    n = 20000
    inside = rng.uniform(size=n) < 0.1
    log_w = np.where(
        inside, -8.0 + 1.1 * -np.log(rng.uniform(size=n)), 0.5 * -np.log(rng.uniform(size=n))
    )
    assert diagnose_weights(log_w).reliable
    region = diagnose_region(log_w, inside)
    assert region.pareto_k_inside > 0.8 and region.pareto_k_outside < 0.7
    assert not region.reliable and "inside the region is too heavy" in region.verdict
    # Kish's ESS on each side, the weights normalised within it
    for ess, side in ((region.ess_inside, inside), (region.ess_outside, ~inside)):
        w = np.exp(log_w[side] - log_w[side].max())
        assert ess == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-12)
    assert region.ess_inside < 0.2 * region.n_inside  # drawn often, worth few samples
    # the same weights with light tails on both sides pass
    light = np.where(inside, -8.0, 0.0) + rng.normal(scale=0.3, size=n)
    assert diagnose_region(light, inside).reliable


def test_a_region_the_samples_miss_cannot_be_judged():
    log_w = np.random.default_rng(0).normal(scale=0.3, size=5000)
    region = diagnose_region(log_w, np.zeros(5000, dtype=bool))
    assert not region.reliable and region.n_inside == 0 and "too few" in region.verdict
    assert region.ess_inside == 0.0 and region.ess_outside == pytest.approx(
        effective_sample_size(log_w), rel=1e-12
    )
    with pytest.raises(UserInputError, match="one boolean per sample"):
        diagnose_region(log_w, np.zeros(10, dtype=bool))
