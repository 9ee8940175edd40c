"""Toy targets: values, exact log Z against independent quadrature, and input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_nice.energy.energies import (
    DoubleWell1D,
    DoubleWell2D,
    ManyWell,
    MuellerBrown,
    regularize_energy,
)


def _log_z_grid_2d(energy, lo, hi, n=801):
    g = np.linspace(lo, hi, n)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    pts = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], 1))
    u = energy(pts).numpy().reshape(n, n)
    m = u.min()
    h = g[1] - g[0]
    return float(np.log(np.exp(-(u - m)).sum() * h * h) - m)


def test_note_double_well_values_and_log_z():
    e = DoubleWell1D()
    x = torch.tensor([[0.0], [1.0], [-2.0]])
    torch.testing.assert_close(e(x), torch.tensor([0.0, -2.0, -2.0]))
    # midpoint rule on a different grid than the implementation's trapezoid rule
    g = np.linspace(-6, 6, 120001)
    u = g**4 - 4 * g**2 + g
    assert abs(e.log_partition_function() - math.log(np.exp(-u).sum() * (g[1] - g[0]))) < 1e-6
    assert abs(e.log_partition_function() - 5.03228) < 1e-5
    assert abs(e.probability_below(0, 0.0) - 0.93273) < 1e-5


@pytest.mark.parametrize(
    "energy, box", [(DoubleWell2D(), (-5, 5)), (ManyWell(2), (-5, 5)), (MuellerBrown(), None)]
)
def test_two_dimensional_log_z_against_grid(energy, box):
    if box is None:
        g = np.linspace(-3.0, 2.0, 1001)
        h = np.linspace(-1.5, 3.0, 1001)
        xx, yy = np.meshgrid(g, h, indexing="ij")
        u = energy(torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], 1))).numpy()
        m = u.min()
        ref = np.log(np.exp(-(u - m)).sum() * (g[1] - g[0]) * (h[1] - h[0])) - m
    else:
        ref = _log_z_grid_2d(energy, *box)
    assert abs(energy.log_partition_function() - ref) < 1e-3


def test_many_well_is_a_product_of_pairs():
    e16, e2 = ManyWell(16), ManyWell(2)
    assert math.isclose(
        e16.log_partition_function(), 8 * e2.log_partition_function(), rel_tol=1e-12
    )
    x = torch.randn(5, 16)
    torch.testing.assert_close(e16(x), sum(e2(x[:, i : i + 2]) for i in range(0, 16, 2)))
    assert len(e16.wells) == 8
    assert 0.1 < e16.probability_below(0, 0.0) < 0.2


def test_bad_input_is_a_clear_error():
    e = DoubleWell2D()
    with pytest.raises(ValueError, match=r"shape \(B, 2\), got \(3, 3\)"):
        e(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        e(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        e(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="even dimension"):
        ManyWell(3)


def test_non_finite_coordinates_give_infinite_energy_and_are_counted():
    e = DoubleWell2D()
    x = torch.tensor([[0.0, 0.0], [math.nan, 0.0], [math.inf, 1.0]], requires_grad=True)
    u = e(x)
    v = u.detach()
    assert math.isfinite(v[0]) and math.isinf(v[1]) and math.isinf(v[2]) and v[1] > 0
    assert int(e.non_finite_count) == 2
    u[0].backward()
    assert torch.isfinite(x.grad).all()


def test_regularized_energy_is_finite_and_exact_below_the_cut():
    u = torch.tensor([-5.0, 10.0, 1e3, 1e5, math.inf, math.nan], requires_grad=True)
    r = regularize_energy(u, cut=100.0, maximum=1e6)
    assert torch.isfinite(r).all()
    assert r[0] == -5.0 and r[1] == 10.0
    assert math.isclose(float(r[2].detach()), 100.0 + math.log1p(900.0))
    assert r[4] == 1e6 and r[5] == 1e6
    r[:4].sum().backward()
    assert torch.isfinite(u.grad).all()
    with pytest.raises(ValueError, match="below maximum"):
        regularize_energy(u, cut=10.0, maximum=1.0)
