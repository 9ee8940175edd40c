"""Dimensionless energies U(x) of batches, and toy targets with exact answers."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Energy",
    "DoubleWell1D",
    "DoubleWell2D",
    "MuellerBrown",
    "ManyWell",
    "regularize_energy",
    "TOY_SYSTEMS",
]


class Energy(torch.nn.Module):
    r"""A reduced (dimensionless) energy :math:`U(x) = E(x) / kT` of a batch of points.

    Subclasses implement :meth:`_energy`; calling the module validates the input, so that
    a wrong shape is a clear error and a non-finite coordinate gives :math:`U = +\infty`
    (importance weight 0) instead of a NaN.

    ``evaluation_count`` counts the configurations evaluated (rows of every call), the
    currency in which the cost of training and sampling is compared.

    Arguments:
        dim: The dimension d of a point.
    """

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"an energy needs dim >= 1, got {dim}")
        self.dim = int(dim)
        self.evaluation_count = 0
        self.register_buffer(
            "non_finite_count", torch.zeros((), dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "non_finite_energy_count", torch.zeros((), dtype=torch.long), persistent=False
        )

    @property
    def non_finite_total(self) -> int:
        """Configurations given weight 0 so far: non-finite coordinates (``non_finite_count``)
        and non-finite energies (``non_finite_energy_count``)."""
        return int(self.non_finite_count) + int(self.non_finite_energy_count)

    def forward(self, x: Tensor) -> Tensor:
        """Return U(x) of shape (B,) for x of shape (B, dim); a NaN energy is returned as +inf
        (weight 0) and counted."""
        x = self._validate(x)
        self.evaluation_count += x.shape[0]
        finite = torch.isfinite(x).all(dim=-1)
        if finite.all():
            return self._checked(self._energy(x))
        self.non_finite_count += int((~finite).sum())
        u = torch.full(x.shape[:1], math.inf, dtype=x.dtype, device=x.device)
        if finite.any():
            u = u.masked_scatter(finite, self._checked(self._energy(x[finite])))
        return u

    def _checked(self, u: Tensor) -> Tensor:
        bad = torch.isnan(u) | (u == math.inf)
        if bad.any():
            self.non_finite_energy_count += int(bad.sum())
            u = torch.where(torch.isnan(u), torch.full_like(u, math.inf), u)
        return u

    def _validate(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"expected a torch.Tensor of shape (B, {self.dim}), got {type(x).__name__}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point tensor (float32 or float64), got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"expected coordinates of shape (B, {self.dim}), got {tuple(x.shape)}; "
                "flatten each configuration into one row"
            )
        return x

    def _energy(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def log_partition_function(self) -> float:
        """The exact log Z = log of the integral of exp(-U), where it is known."""
        raise NotImplementedError(f"{type(self).__name__} has no exact log Z")


def _log_integral_1d(potential, lo: float = -10.0, hi: float = 10.0, n: int = 400_001) -> float:
    """log of the integral of exp(-potential(x)) over [lo, hi] by the trapezoid rule."""
    x = np.linspace(lo, hi, n)
    u = potential(x)
    shift = u.min()
    return float(np.log(np.trapezoid(np.exp(-(u - shift)), x)) - shift)


def _probability_below_1d(
    potential, threshold: float, lo: float = -10.0, hi: float = 10.0
) -> float:
    x = np.linspace(lo, hi, 400_001)
    u = potential(x)
    p = np.exp(-(u - u.min()))
    return float(np.trapezoid(p * (x < threshold), x) / np.trapezoid(p, x))


class DoubleWell1D(Energy):
    r"""The method note's double well :math:`U(x) = x^4 - 4x^2 + x` on the real line.

    Example:
        >>> u = DoubleWell1D()
        >>> round(u.log_partition_function(), 5)
        5.03228
    """

    def __init__(self):
        super().__init__(1)

    @staticmethod
    def potential(x):
        return x**4 - 4 * x**2 + x

    def _energy(self, x: Tensor) -> Tensor:
        return self.potential(x[:, 0])

    def log_partition_function(self) -> float:
        return _log_integral_1d(self.potential)

    def probability_below(self, index: int, threshold: float) -> float:
        """Exact probability that coordinate ``index`` lies below ``threshold``."""
        _check_index(index, 1)
        return _probability_below_1d(self.potential, threshold)

    wells = ((0, 0.0),)


class _PairedDoubleWell(Energy):
    """Independent pairs (x1, x2), each with U = a x1^4 + b x1^2 + c x1 + x2^2 / 2."""

    coefficients: tuple[float, float, float]

    def __init__(self, dim: int):
        if dim % 2:
            raise ValueError(f"{type(self).__name__} needs an even dimension, got {dim}")
        super().__init__(dim)

    def potential(self, x1):
        a, b, c = self.coefficients
        return a * x1**4 + b * x1**2 + c * x1

    def _energy(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, 0::2], x[:, 1::2]
        return (self.potential(x1) + 0.5 * x2**2).sum(dim=-1)

    def log_partition_function(self) -> float:
        pair = _log_integral_1d(self.potential) + 0.5 * math.log(2 * math.pi)
        return self.dim // 2 * pair

    def probability_below(self, index: int, threshold: float) -> float:
        """Exact probability that coordinate ``index`` lies below ``threshold``."""
        _check_index(index, self.dim)
        if index % 2:
            return 0.5 * (1 + math.erf(threshold / math.sqrt(2)))
        return _probability_below_1d(self.potential, threshold)

    @property
    def wells(self) -> tuple[tuple[int, float], ...]:
        """(coordinate, barrier position) of every double-well coordinate."""
        return tuple((i, 0.0) for i in range(0, self.dim, 2))


class DoubleWell2D(_PairedDoubleWell):
    r"""The Boltzmann-generator paper's 2D double well :math:`x_1^4 - 6x_1^2 + x_1 + x_2^2/2`."""

    coefficients = (1.0, -6.0, 1.0)

    def __init__(self):
        super().__init__(2)


class ManyWell(_PairedDoubleWell):
    r"""The FAB paper's many-well: d/2 independent pairs of :math:`x_1^4 - 6x_1^2 - x_1/2 + x_2^2/2`.

    It has :math:`2^{d/2}` modes.
    """

    coefficients = (1.0, -6.0, -0.5)

    def __init__(self, dim: int = 16):
        super().__init__(dim)


class MuellerBrown(Energy):
    r"""The Mueller-Brown potential scaled to reduced units, :math:`U = \beta \, V_{MB}(x)`.

    Arguments:
        beta: The inverse temperature applied to the raw potential (default 0.1).
    """

    _A = (-200.0, -100.0, -170.0, 15.0)
    _a = (-1.0, -1.0, -6.5, 0.7)
    _b = (0.0, 0.0, 11.0, 0.6)
    _c = (-10.0, -10.0, -6.5, 0.7)
    _x0 = (1.0, 0.0, -0.5, -1.0)
    _y0 = (0.0, 0.5, 1.5, 1.0)
    _grid = ((-3.0, 2.0), (-1.5, 3.0))
    wells = ((0, -0.25),)

    def __init__(self, beta: float = 0.1):
        super().__init__(2)
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = float(beta)

    def potential(self, x, y):
        exp = torch.exp if isinstance(x, Tensor) else np.exp
        v = 0.0
        for A, a, b, c, x0, y0 in zip(self._A, self._a, self._b, self._c, self._x0, self._y0):
            dx, dy = x - x0, y - y0
            v = v + A * exp(a * dx**2 + b * dx * dy + c * dy**2)
        return self.beta * v

    def _energy(self, x: Tensor) -> Tensor:
        return self.potential(x[:, 0], x[:, 1])

    def _density_grid(self, n: int = 2001):
        (x_lo, x_hi), (y_lo, y_hi) = self._grid
        gx, gy = np.linspace(x_lo, x_hi, n), np.linspace(y_lo, y_hi, n)
        u = self.potential(gx[:, None], gy[None, :])
        return gx, gy, u

    def log_partition_function(self) -> float:
        gx, gy, u = self._density_grid()
        shift = u.min()
        z = np.trapezoid(np.trapezoid(np.exp(-(u - shift)), gy, axis=1), gx)
        return float(np.log(z) - shift)

    def probability_below(self, index: int, threshold: float) -> float:
        """Exact probability that coordinate ``index`` lies below ``threshold``."""
        _check_index(index, 2)
        gx, gy, u = self._density_grid()
        p = np.exp(-(u - u.min()))
        below = (gx[:, None] < threshold) if index == 0 else (gy[None, :] < threshold)
        mass = lambda f: np.trapezoid(np.trapezoid(f, gy, axis=1), gx)  # noqa: E731
        return float(mass(p * below) / mass(p))


def _check_index(index: int, dim: int) -> None:
    if not 0 <= index < dim:
        raise ValueError(f"coordinate index {index} is out of range for dimension {dim}")


def regularize_energy(u: Tensor, cut: float = 1e3, maximum: float = 1e9) -> Tensor:
    r"""A finite, smooth stand-in for U used only as a training loss.

    Below ``cut`` it is U itself; above, it grows as ``cut + log(1 + U - cut)``; it is
    capped at ``maximum`` and +inf or NaN become ``maximum``. Importance weights must
    always use the exact U.

    Arguments:
        u: Reduced energies, any shape.
        cut: Where the logarithmic branch starts (in kT).
        maximum: The value given to inf or NaN energies and the cap.
    """
    if not cut < maximum:
        raise ValueError(f"cut ({cut}) must be below maximum ({maximum})")
    bad = ~torch.isfinite(u)
    safe = torch.where(bad, torch.zeros_like(u), u)
    high = safe > cut
    excess = torch.where(high, safe - cut, torch.zeros_like(safe))
    reg = torch.where(high, cut + torch.log1p(excess), safe)
    reg = torch.clamp(reg, max=maximum)
    return torch.where(bad, torch.full_like(u, maximum), reg)


TOY_SYSTEMS = {
    "double_well_1d": DoubleWell1D,
    "double_well_2d": DoubleWell2D,
    "mueller_brown": MuellerBrown,
    "many_well": ManyWell,
}
"""The toy targets a config's ``system`` may name."""
