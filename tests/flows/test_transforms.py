"""Every bijection passes the same properties: round trip, exact log-det, gradients, reload."""

from __future__ import annotations

import io
import math

import pytest
import torch

from openmm_nice.flows.transforms import (
    AdditiveCoupling,
    ComposedTransform,
    FixedAffine,
    LULinear,
    nice_flow,
)


def _randomize(t: torch.nn.Module) -> torch.nn.Module:
    # freshly built couplings are the identity; perturb so the properties are not trivial
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return t


FACTORIES = {
    "coupling": lambda: AdditiveCoupling(torch.tensor([True, False, True, False, False]), [16]),
    "lu_linear": lambda: LULinear(5, scale=torch.tensor([0.5, 1.0, 2.0, 3.0, 0.7])),
    "lu_linear_permuted": lambda: LULinear(5, scale=1.5, permute=True, seed=3),
    "fixed_affine": lambda: FixedAffine(torch.randn(5), torch.rand(5) + 0.5),
    "nice_flow": lambda: nice_flow(5, 6, [16], seed=1),
    "composed": lambda: ComposedTransform([nice_flow(5, 4, [8]), LULinear(5, 2.0, permute=True)]),
}


@pytest.fixture(params=sorted(FACTORIES))
def name(request):
    return request.param


@pytest.fixture
def transform(name):
    return _randomize(FACTORIES[name]())


def test_round_trip(transform):
    x = torch.randn(64, 5)
    y, ladj = transform.call_and_ladj(x)
    x_back, ladj_inv = transform.inverse_and_ladj(y)
    assert y.shape == x.shape and ladj.shape == (64,)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-10, rtol=1e-10)


def test_log_det_matches_autograd_jacobian(transform):
    x = torch.randn(4, 5)
    _, ladj = transform.call_and_ladj(x)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: transform(v[None])[0], x[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jac)[1], atol=1e-10, rtol=1e-10)


def test_gradients_reach_every_parameter(transform):
    x = torch.randn(32, 5, requires_grad=True)
    y, ladj = transform.call_and_ladj(x)
    (y.square().sum() + y.sum() ** 2 - ladj.sum()).backward()
    assert torch.isfinite(x.grad).all()
    for name, p in transform.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_save_and_reload(name, transform):
    buffer = io.BytesIO()
    torch.save(transform.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = FACTORIES[name]()
    fresh.load_state_dict(state)
    x = torch.randn(8, 5)
    torch.testing.assert_close(fresh(x), transform(x))


def test_additive_coupling_log_det_is_exactly_zero():
    t = _randomize(AdditiveCoupling(torch.tensor([True, False]), [8]))
    assert torch.equal(t.call_and_ladj(torch.randn(10, 2))[1], torch.zeros(10))


def test_lu_linear_log_det_equals_slogdet_of_its_matrix():
    s = _randomize(LULinear(4, 2.0, permute=True))
    torch.testing.assert_close(s.log_abs_det(), torch.linalg.slogdet(s.matrix())[1])
    assert math.isclose(float(LULinear(3, 2.0).log_abs_det().detach()), 3 * math.log(2.0))


def test_bad_construction_is_a_clear_error():
    with pytest.raises(ValueError, match="both True and False"):
        AdditiveCoupling(torch.tensor([True, True]))
    with pytest.raises(ValueError, match="redundant latents"):
        nice_flow(1, 4, [8])
    with pytest.raises(ValueError, match="positive"):
        LULinear(2, scale=-1.0)
