"""Training: losses, annealing, deterministic resume, and reporters."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from openmm_nice.analysis.reweighting import effective_sample_size
from openmm_nice.energy.energies import DoubleWell1D
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.io import load_checkpoint
from openmm_nice.training.reporters import METRIC_COLUMNS, CheckpointReporter, MetricsReporter
from openmm_nice.training.trainer import (
    Trainer,
    TrainingSchedule,
    alpha_weights,
    nll,
    reverse_kl,
    reweighted_forward_kl,
    weighted_nll,
)


def _trainer(reporters=(), steps=20, **kw):
    torch.manual_seed(0)
    bg = BoltzmannGenerator(
        DoubleWell1D(), latent_dim=2, layers=2, hidden=[8], conditional_hidden=[8]
    )
    options = dict(batch_size=64, reweighted_fkl_weight=1.0, beta_start=0.2, anneal_steps=10)
    options.update(kw)
    return Trainer(bg, steps=steps, seed=7, reporters=reporters, **options)


def test_reverse_kl_is_the_mean_negative_log_weight():
    t = _trainer()
    loss, d, parts = reverse_kl(t.generator, 256, 1.0, rng=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, -d.log_weights().mean())
    # J_R = E[U] - E[log|det S|...]: the energy part is reported in kT
    assert parts["energy_kT"] == pytest.approx(float(d.u.detach().mean()))


def test_schedule_anneals_beta_geometrically_and_decays_the_learning_rate():
    s = TrainingSchedule(100, beta_start=0.1, anneal_steps=50)
    assert s.beta(0) == pytest.approx(0.1) and s.beta(25) == pytest.approx(0.1**0.5)
    assert s.beta(50) == 1.0 and s.beta(99) == 1.0
    assert s.lr_factor(0) == pytest.approx(1.0) and s.lr_factor(100) == pytest.approx(0.01)


def test_training_lowers_the_loss():
    t = _trainer(steps=150, learning_rate=3e-3, anneal_steps=0, reweighted_fkl_weight=0.0)
    before = float(reverse_kl(t.generator, 4096, rng=torch.Generator().manual_seed(1))[0].detach())
    t.run()
    after = float(reverse_kl(t.generator, 4096, rng=torch.Generator().manual_seed(1))[0].detach())
    assert after < before - 0.1


def test_maximum_likelihood_term_uses_the_data():
    data = torch.randn(500, 1) * 0.3 - 1.4
    t = _trainer(steps=5, ml_weight=1.0, data=data)
    t.run()
    assert torch.isfinite(nll(t.generator, data[:10]))
    with pytest.raises(ValueError, match="needs data"):
        _trainer(ml_weight=1.0)


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    straight = _trainer(steps=20)
    straight.run()

    first = _trainer([CheckpointReporter(tmp_path / "c.pt", interval=10)], steps=20)
    first.run(10)
    second = _trainer(steps=20)
    second.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    assert second.step == 10
    second.run()
    for a, b in zip(straight.generator.parameters(), second.generator.parameters()):
        torch.testing.assert_close(a, b)


def test_metrics_reporter_writes_units_and_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    t = _trainer([MetricsReporter(path, interval=5)], steps=20)
    t.run()
    rows = list(csv.DictReader(open(path)))
    assert tuple(rows[0].keys()) == METRIC_COLUMNS
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    MetricsReporter(path, interval=5, resume_step=10)
    assert [int(r["step"]) for r in csv.DictReader(open(path))] == [5, 10]

    # a file written before a column was added is rewritten with today's columns
    rows = list(csv.reader(open(path)))
    old = [c for c in METRIC_COLUMNS if c != "buffer_ess"]
    with open(path, "w") as handle:
        handle.write(",".join(old) + "\n")
        for r in rows[1:]:
            handle.write(",".join(v for c, v in zip(METRIC_COLUMNS, r) if c != "buffer_ess"))
            handle.write("\n")
    MetricsReporter(path, interval=5, resume_step=5)
    rows = list(csv.DictReader(open(path)))
    assert tuple(rows[0].keys()) == METRIC_COLUMNS and [r["step"] for r in rows] == ["5"]
    assert rows[0]["buffer_ess"] == "" and float(rows[0]["loss"]) == float(rows[0]["loss"])


def test_ml_weight_moves_linearly_to_its_final_value():
    data = torch.randn(64, 1)
    t = _trainer(steps=10, ml_weight=1.0, ml_weight_final=0.2, data=data)
    assert t.ml_weight_at(0) == 1.0 and t.ml_weight_at(10) == pytest.approx(0.2)
    assert t.ml_weight_at(5) == pytest.approx(0.6)
    t.run()
    assert _trainer(steps=10, ml_weight=0.5, data=data).ml_weight_at(7) == 0.5
    with pytest.raises(ValueError, match="ml_weight_final must be >= 0"):
        _trainer(ml_weight=1.0, ml_weight_final=-1.0, data=data)


def test_schedule_holds_beta_start_before_the_anneal():
    s = TrainingSchedule(100, beta_start=0.25, anneal_steps=40, anneal_start=20)
    assert s.beta(0) == s.beta(19) == 0.25
    assert s.beta(40) == pytest.approx(0.25**0.5) and s.beta(60) == 1.0


def test_buffer_term_trains_the_model_from_its_own_weighted_samples():
    """Forward KL on the buffer alone (no reverse KL) moves the model towards the target."""
    t = _trainer(
        steps=200,
        learning_rate=3e-3,
        kl_weight=0.0,
        reweighted_fkl_weight=0.0,
        beta_start=1.0,
        anneal_steps=0,
        buffer_size=4096,
        buffer_weight=1.0,
        buffer_interval=20,
        buffer_draws=1024,
    )

    def ess() -> float:
        _, log_w = t.generator.sample(20000, rng=torch.Generator().manual_seed(3))
        return effective_sample_size(log_w) / 20000

    before = ess()
    t.run()
    assert len(t.buffer) == 4096 and ess() > before + 0.1  # 0.14 -> 0.37 when written
    with pytest.raises(ValueError, match="buffer_weight > 0 needs buffer_size"):
        _trainer(buffer_weight=1.0)


def test_buffer_term_pools_the_walkers_by_effective_sample_size():
    """A buffer whose weights rest on one sample hands the forward KL to the walkers; a buffer
    of many even weights keeps it (the walkers' share is ESS_w / (ESS_b + ESS_w))."""
    t = _trainer(steps=3, buffer_size=1000, buffer_weight=1.0, walkers=32, buffer_interval=1)
    t.run()
    assert t._walkers is not None and len(t.buffer) > 0
    n = len(t.buffer)
    x = torch.linspace(-2, 2, n).double()[:, None]
    walker_share = 32 / (1 + 32)  # the walkers start with even weights
    t.buffer.x, t.buffer.u = x, torch.zeros(n, dtype=torch.float64)
    t.buffer.log_q = torch.full((n,), 50.0, dtype=torch.float64)
    t.buffer.log_q[0] = 0.0  # exp(50) times the weight of any other sample
    pooled = t.pooled_buffer(1.0)
    assert float(pooled.weights[n:].sum()) == pytest.approx(walker_share, rel=1e-6)
    t.buffer.log_q = torch.zeros(n, dtype=torch.float64)  # n even weights
    pooled = t.pooled_buffer(1.0)
    assert float(pooled.weights[n:].sum()) == pytest.approx(32 / (n + 32), rel=1e-6)
    assert float(pooled.weights.sum()) == pytest.approx(1.0)
    # the metrics see the buffer's own effective size
    state = t._train_step()
    assert state["buffer_ess"] == pytest.approx(n, rel=1e-6)


def test_alpha_weighted_nll_is_the_gradient_of_the_alpha_divergence():
    """On a grid (exact quadrature, D = d so that log q is exact, float64), the NLL of samples
    of p weighted by alpha_weights has the gradient of log int p^alpha q^(1 - alpha) divided
    by alpha - 1, for alpha = 2 and 1.5; alpha = 1 is the forward KL's."""
    torch.manual_seed(0)
    target = DoubleWell1D()
    bg = BoltzmannGenerator(target, latent_dim=1, layers=2, hidden=[8]).double()
    x = torch.linspace(-3.0, 3.0, 2001, dtype=torch.float64)[:, None]
    log_p = -target(x)
    p = torch.softmax(log_p, 0)  # quadrature weights of p on the grid
    params = list(bg.parameters())
    for alpha in (2.0, 1.5, 1.0):
        loss = weighted_nll(bg, x, p, alpha=alpha, log_target=log_p)
        got = torch.autograd.grad(loss, params)
        log_q = bg.log_prob(x)
        if alpha == 1.0:
            exact = -(p * log_q).sum()
        else:
            divergence = torch.logsumexp(alpha * log_p + (1 - alpha) * log_q, 0)
            exact = divergence / (alpha - 1)
        want = torch.autograd.grad(exact, params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="log_target"):
        weighted_nll(bg, x, p, alpha=2.0)


def test_alpha_weights_are_powers_of_the_weights_and_ignore_undefined_samples():
    log_w = torch.tensor([0.0, 2.0, -1.0, -math.inf, math.nan], dtype=torch.float64)
    w = alpha_weights(log_w, 1.5)
    expected = torch.exp(0.5 * (log_w[:3] - 2.0))
    torch.testing.assert_close(w[:3], expected)
    assert w[3] == 0 and w[4] == 0
    torch.testing.assert_close(alpha_weights(log_w[:3], 1.0), torch.ones(3, dtype=torch.float64))


def test_reweighted_forward_kl_with_alpha_weights_the_batch_by_w_to_the_alpha():
    t = _trainer()
    _, d, _ = reverse_kl(t.generator, 256, 1.0, rng=torch.Generator().manual_seed(0))
    log_w = d.log_weights(1.0).detach()
    log_p = t.generator.flow_log_prob(d.x_flow.detach(), d.y.detach())
    want = -(torch.softmax(2.0 * log_w, 0) * log_p).sum()
    torch.testing.assert_close(reweighted_forward_kl(t.generator, d, 1.0, alpha=2.0), want)


def test_forward_alpha_trains_every_mass_covering_term_and_is_checked():
    """forward_alpha 2 on the reweighted forward KL, the buffer and the walkers: steps run
    and the loss stays finite; alpha below 1 is refused, by the trainer and the config."""
    t = _trainer(
        steps=6,
        buffer_size=1000,
        buffer_weight=1.0,
        buffer_interval=2,
        walkers=32,
        forward_alpha=[[0, 1.0], [3, 2.0]],
    )
    t.run()
    assert t.forward_alpha(5) == 2.0 and t.forward_alpha(0) == 1.0
    state = t._train_step()
    assert math.isfinite(state["loss"]) and math.isfinite(state["buffer_nll"])
    with pytest.raises(ValueError, match="forward_alpha must be >= 1"):
        _trainer(forward_alpha=0.5)
    from openmm_nice.config import TrainingConfig

    with pytest.raises(ValueError, match="forward_alpha"):
        TrainingConfig(forward_alpha=[[0, 2.0], [10, 0.5]])
    assert Trainer.from_config(t.generator, TrainingConfig(forward_alpha=2.0)).forward_alpha(0) == 2


class _Shift(torch.nn.Module):
    """A one-dimensional coordinate map x = s + offset, standing in for a molecule's."""

    dim = 1

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.register_buffer("offset", torch.tensor([offset]))

    def call_and_ladj(self, s):
        return s + self.offset, s.new_zeros(s.shape[0])

    def inverse_and_ladj(self, x):
        return x - self.offset, x.new_zeros(x.shape[0])


def test_map_refit_loads_the_fitted_map_and_realigns_the_model():
    torch.manual_seed(0)
    bg = BoltzmannGenerator(
        DoubleWell1D(),
        latent_dim=2,
        layers=2,
        hidden=[8],
        conditional_hidden=[8],
        coordinates=_Shift(),
    )
    seen = {}

    def fit_map(x, weights):
        seen["n"], seen["total"] = len(x), float(weights.sum())
        return _Shift(float((weights * x[:, 0]).sum()))  # centre the map on the weighted mean

    t = Trainer(
        bg,
        steps=4,
        batch_size=64,
        seed=7,
        map_refits=[2],
        fit_map=fit_map,
        refit_samples=2000,
        refit_steps=20,
    )
    t.run(2)
    parameters = [p.detach().clone() for p in bg.parameters()]
    t.run()
    assert seen["n"] == 2000 and seen["total"] == pytest.approx(1.0)
    assert bg.coordinates.offset.item() != 0.0
    assert any((a != b).any() for a, b in zip(parameters, bg.parameters()))
    with pytest.raises(ValueError, match="map_refits needs fit_map"):
        Trainer(bg, steps=4, map_refits=[2])


def test_map_refit_pools_the_walkers_with_the_model_samples_by_effective_sample_size():
    """The walkers hold a well the model has lost; the refitted map must see it."""
    torch.manual_seed(0)
    bg = BoltzmannGenerator(
        DoubleWell1D(), latent_dim=1, layers=2, hidden=[8], coordinates=_Shift()
    )
    seen = {}

    def fit_map(x, weights):
        seen["x"], seen["weights"] = x.clone(), weights.clone()
        return _Shift(0.0)

    t = Trainer(
        bg,
        steps=3,
        batch_size=64,
        seed=1,
        walkers=64,
        map_refits=[2],
        fit_map=fit_map,
        refit_samples=500,
        refit_steps=2,
    )
    t.run(2)
    walkers = t._walkers
    walkers.x = torch.full_like(walkers.x, 7.0)  # a well far from every model sample
    t.run()
    x, weights = seen["x"], seen["weights"]
    assert len(x) == 500 + 64 and float(weights.sum()) == pytest.approx(1.0)
    on_walkers = x[:, 0] == 7.0
    assert on_walkers.sum() == 64
    # the walkers' share is their ESS (64, equal weights) over the two ESS together
    w_model = weights[~on_walkers] / weights[~on_walkers].sum()
    ess_model = 1.0 / float((w_model**2).sum())
    assert float(weights[on_walkers].sum()) == pytest.approx(64 / (64 + ess_model))


def test_one_set_of_defaults_and_from_config():
    """Trainer's defaults are the config's, and from_config passes every training field."""
    from openmm_nice.config import TrainingConfig

    bg = BoltzmannGenerator(DoubleWell1D(), latent_dim=2, layers=2, hidden=[8])
    plain, defaults = Trainer(bg), TrainingConfig()
    assert plain.steps == defaults.steps and plain.weights["reweighted_fkl"](0) == 1.0
    assert plain.schedule.beta_start == defaults.beta_start == 0.1
    custom = TrainingConfig(steps=7, kl_weight=0.5, anneal_start=2, buffer_size=10)
    t = Trainer.from_config(bg, custom, seed=3)
    assert (t.steps, t.weights["kl"](0), t.schedule.anneal_start, t.buffer_size) == (7, 0.5, 2, 10)


def test_non_finite_energies_are_counted_in_metrics_and_summary(tmp_path, monkeypatch):
    from openmm_nice.config import config_from_dict
    from openmm_nice.energy.energies import DoubleWell1D
    from openmm_nice.runs import train_run

    class Holey(DoubleWell1D):
        """The double well with U = NaN beyond x = 1.5: those samples have weight 0."""

        def _energy(self, x):
            u = super()._energy(x)
            return torch.where(x[:, 0] > 1.5, torch.full_like(u, float("nan")), u)

    energy = Holey()
    u = energy(torch.tensor([[0.0], [2.0], [float("inf")]]))
    assert u[1] == float("inf") and u[2] == float("inf") and torch.isfinite(u[0])
    assert energy.non_finite_total == 2

    config = config_from_dict(
        {
            "system": "double_well_1d",
            "model": {"latent_dim": 2, "layers": 2, "hidden": [8]},
            "training": {"steps": 20, "batch_size": 256, "report_interval": 10},
        }
    )
    from openmm_nice.targets import TOY_SYSTEMS

    monkeypatch.setitem(TOY_SYSTEMS, "double_well_1d", Holey)
    summary = train_run(config, tmp_path / "run", quiet=True, n_eval=2000)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    counts = [int(r["non_finite_energies"]) for r in rows]
    assert counts == sorted(counts) and counts[-1] > 0  # the initial model reaches x > 1.5
    assert summary["non_finite_energies"] >= counts[-1]
    assert summary["n_zero_weight"] > 0  # of the summary's own samples
