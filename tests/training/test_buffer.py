"""The sample buffer: exact importance weights at any beta, one-shot and AIS draws."""

from __future__ import annotations

import math

import pytest
import torch

from openmm_nice.energy.energies import DoubleWell1D
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.training.buffer import SampleBuffer
from openmm_nice.training.trainer import Trainer


@pytest.fixture(scope="module")
def model():
    """A double-well model trained briefly: a proposal that is right in shape, wrong in detail."""
    torch.manual_seed(0)
    bg = BoltzmannGenerator(
        DoubleWell1D(), latent_dim=2, layers=4, hidden=[32], conditional_hidden=[16]
    ).double()
    Trainer(
        bg,
        steps=600,
        batch_size=256,
        learning_rate=3e-3,
        reweighted_fkl_weight=1.0,
        beta_start=0.2,
        anneal_steps=300,
        seed=1,
    ).run()
    return bg


def _p_left(buffer: SampleBuffer, beta: float) -> float:
    w = buffer.normalized_weights(beta)
    return float((w * (buffer.x[:, 0] < 0)).sum())


def _exact_p_left(beta: float) -> float:
    x = torch.linspace(-5, 5, 200_001, dtype=torch.float64)
    density = torch.exp(-beta * DoubleWell1D.potential(x))
    return float(density[x < 0].sum() / density.sum())


@pytest.mark.parametrize("ais_steps", [0, 5])
def test_weights_are_exact_at_any_beta(model, ais_steps):
    buffer = SampleBuffer(40_000)
    buffer.add_draws(
        model, 40_000, rng=torch.Generator().manual_seed(2), ais_steps=ais_steps, beta=0.5
    )
    # samples drawn (or annealed) towards beta = 0.5 give exact weights at 0.5 and at 1: the
    # self-normalised estimates agree with quadrature within about 3 standard errors
    for beta in (0.5, 1.0):
        assert _p_left(buffer, beta) == pytest.approx(_exact_p_left(beta), abs=0.02)
    assert 0 < buffer.effective_sample_size(1.0) <= len(buffer)


def test_the_buffer_keeps_the_newest_samples_and_round_trips():
    buffer = SampleBuffer(5)
    buffer.add(torch.arange(4.0)[:, None], torch.zeros(4), torch.zeros(4))
    buffer.add(torch.arange(4.0, 7.0)[:, None], torch.zeros(3), torch.zeros(3))
    assert buffer.x[:, 0].tolist() == [2, 3, 4, 5, 6]
    copy = SampleBuffer.from_state_dict(buffer.state_dict())
    assert torch.equal(copy.x, buffer.x) and copy.capacity == 5
    buffer.add(torch.zeros(1, 1), torch.tensor([math.inf]), torch.zeros(1))
    assert buffer.log_weights()[-1] == -math.inf
    with pytest.raises(ValueError, match="capacity"):
        SampleBuffer(0)
    with pytest.raises(ValueError, match="empty"):
        SampleBuffer(3).log_weights()
