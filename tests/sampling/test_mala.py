"""The one MALA kernel: exact invariance for a known density, and its step-size rule."""

from __future__ import annotations

import math

import torch

from openmm_nice.sampling.mala import TARGET_ACCEPTANCE, adapt_step_size, mala_step

MEAN, STD = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 2.0])


def _gaussian(x):
    z = (x - MEAN) / STD.double()
    return -0.5 * (z**2).sum(-1), -z / STD.double(), (x.sum(-1),)


def test_chains_reach_and_keep_the_exact_gaussian():
    rng = torch.Generator().manual_seed(0)
    x = torch.zeros(4000, 2, dtype=torch.float64)
    log_pi, grad, _ = _gaussian(x)
    carried = (x.sum(-1),)
    step, rates = 0.3, []
    for k in range(300):
        x, log_pi, grad, carried, accept = mala_step(
            x, log_pi, grad, _gaussian, step, rng, carried=carried
        )
        rates.append(float(accept.double().mean()))
        if k < 100:  # adapt in the burn-in only, then a fixed kernel
            step = adapt_step_size(step, rates[-1])
    # 4000 independent chains: standard errors of the mean 0.008 and 0.03
    assert ((x.mean(0) - MEAN).abs() < 5 * STD.double() / math.sqrt(4000)).all()
    assert torch.allclose(x.std(0), STD.double(), rtol=0.05)
    # what follows the chains is the value at the chain's state
    assert torch.equal(carried[0], x.sum(-1))
    assert abs(sum(rates[100:]) / 200 - TARGET_ACCEPTANCE) < 0.1


def test_a_chain_at_an_undefined_state_takes_a_defined_proposal_and_never_an_undefined_one():
    def evaluate(x):
        inside = x[:, 0] > 0
        return torch.where(inside, -0.5 * (x**2).sum(-1), -math.inf), -x, ()

    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64).repeat(500, 1)
    log_pi, grad, _ = evaluate(x)
    rng = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, log_pi, grad, _, _ = mala_step(x, log_pi, grad, evaluate, 0.5, rng)
    started_inside = torch.arange(len(x)) % 2 == 1
    assert (x[started_inside, 0] > 0).all()  # never left the support
    assert (x[~started_inside, 0] > 0).float().mean() > 0.9  # found it


def test_proposals_are_rounded_to_the_evaluating_precision():
    seen = []

    def evaluate(x):
        seen.append(x.clone())
        return -0.5 * (x**2).sum(-1), -x, ()

    x = torch.full((8, 3), 0.1, dtype=torch.float64)
    log_pi, grad, _ = evaluate(x)
    mala_step(
        x, log_pi, grad, evaluate, 0.1, torch.Generator().manual_seed(2), precision=torch.float32
    )
    assert torch.equal(seen[-1], seen[-1].float().double())


def test_step_size_grows_above_the_target_acceptance_and_shrinks_below():
    assert adapt_step_size(0.1, 0.9) > 0.1 > adapt_step_size(0.1, 0.2)
    assert adapt_step_size(0.1, TARGET_ACCEPTANCE) == 0.1
