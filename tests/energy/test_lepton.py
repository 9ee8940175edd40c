"""Lepton expressions in torch: OpenMM's own evaluation as the reference, parsing errors."""

from __future__ import annotations

import math

import numpy as np
import openmm
import pytest
import torch

from openmm_nice.energy.lepton import parse_expression

# Expressions of r covering Lepton's precedence, associativity, definitions and functions.
EXPRESSIONS = [
    "-r^2 + 2^-1*r - 3",
    "2^r^2",
    "r - 1 - 2*r/4/2",
    "a*b - c; a = r+1; b = c^2; c = sqrt(r)",
    "select(step(r-1), log(r), exp(-r)) + delta(r-1)",
    "min(r, 1.2) + max(r, 0.9) - abs(r - 1.1)",
    "sin(r)*cos(r) + tan(r/3) + sec(r) + csc(r) + cot(r)",
    "asin(r/3) + acos(r/4) + atan(r) + atan2(r, 2 - r)",
    "sinh(r) - cosh(r/2) + tanh(2*r)",
    "erf(r - 1) + erfc(r)",
    "square(r) + cube(r - 1) + recip(r) + floor(3*r) + ceil(2*r)",
    "1.5e-1*r^3 + .25/r^6 - 3.E0",
]


def openmm_values(expression: str, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenMM's energy E(r) and its derivative dE/dr, from a two-particle CustomBondForce."""
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
    force = openmm.CustomBondForce(expression)
    force.addBond(0, 1, [])
    system.addForce(force)
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    energies, derivatives = [], []
    for value in r:
        context.setPositions([[0, 0, 0], [value, 0, 0]])
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy()._value)
        derivatives.append(state.getForces(asNumpy=True)._value[0, 0])  # F0 = +dE/dr
    return np.array(energies), np.array(derivatives)


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_matches_openmm(expression):
    r = np.linspace(0.3, 1.9, 17) + 1e-3  # no ties or jumps exactly on the grid
    energy, derivative = openmm_values(expression, r)
    x = torch.tensor(r, requires_grad=True)
    value = parse_expression(expression).evaluate({"r": x})
    (gradient,) = torch.autograd.grad(value.sum(), x)
    np.testing.assert_allclose(value.detach().numpy(), energy, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gradient.numpy(), derivative, rtol=1e-10, atol=1e-10)


def test_lepton_conventions_at_kinks():
    """step(0) = 1; at a tie min's derivative goes to its second argument, max's to its
    first; abs has derivative 1 at 0: as Lepton differentiates them."""
    x = torch.tensor([0.0, 1.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0], requires_grad=True)
    values = {"x": x, "y": y}
    assert parse_expression("step(x)").evaluate(values).tolist() == [1.0, 1.0]
    for text, dx, dy in (("min(x, y)", 0.0, 1.0), ("max(x, y)", 1.0, 0.0)):
        gx, gy = torch.autograd.grad(parse_expression(text).evaluate(values).sum(), (x, y))
        assert gx.tolist() == [dx, dx] and gy.tolist() == [dy, dy]
    (gx,) = torch.autograd.grad(parse_expression("abs(x)").evaluate(values).sum(), x)
    assert gx.tolist() == [1.0, 1.0]


def test_numbers_follow_c():
    assert parse_expression("1/0").evaluate({}) == math.inf
    assert math.isnan(parse_expression("(-8)^(1/3)").evaluate({}))
    assert parse_expression("-2^2").evaluate({}) == -4.0


def test_bind_folds_what_does_not_depend_on_positions():
    expression = parse_expression("q*exp(-r/l) + c; c = sqrt(q) + l; l = 2")
    assert expression.variables == {"q", "r"}
    q = torch.tensor([1.0, 4.0])
    bound = expression.bind({"q": q})
    assert bound.variables == {"r"}
    r = torch.tensor([[0.5, 1.0]])
    expected = q * torch.exp(-r / 2) + torch.sqrt(q) + 2
    torch.testing.assert_close(bound.evaluate({"r": r}), expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(expression.evaluate({"q": q, "r": r}), expected, rtol=1e-15, atol=0)


def test_custom_functions():
    table = torch.tensor([10.0, 20.0, 30.0])
    lookup = (1, lambda i: table[i.long()])
    expression = parse_expression("f(i) + 1", {"f": lookup})
    assert expression.evaluate({"i": torch.tensor([0.0, 2.0])}).tolist() == [11.0, 31.0]
    with pytest.raises(ValueError, match=r"custom functions \['exp'\] would hide Lepton's"):
        parse_expression("exp(1)", {"exp": lookup})


@pytest.mark.parametrize(
    "text, match",
    [
        ("foo(r)", "unknown function 'foo'"),
        ("atan2(r)", "atan2 takes 2 arguments, got 1"),
        ("(r + 1", "unexpected end"),
        ("r + 1)", r"unexpected '\)'"),
        ("r $ 2", r"cannot parse '\$ 2'"),
        ("r*a; 2*r", "is not a definition"),
        ("r +", "unexpected end"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_expression(text)


def test_missing_variable():
    with pytest.raises(ValueError, match=r"no value for \['b'\]"):
        parse_expression("a + b").evaluate({"a": 1.0})
    with pytest.raises(TypeError, match="a string"):
        parse_expression(3.0)
