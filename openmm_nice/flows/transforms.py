"""Bijections with exact log-Jacobians: NICE coupling, the learned matrix S, composition."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Transform",
    "ComposedTransform",
    "AdditiveCoupling",
    "LULinear",
    "FixedAffine",
    "mlp",
    "nice_flow",
]


class Transform(nn.Module):
    r"""A bijection :math:`y = f(x)` between batches of shape (B, d_in) and (B, d_out).

    Subclasses implement :meth:`call_and_ladj`, returning :math:`y` and
    :math:`\log|\det \partial y / \partial x|` of shape (B,), and :meth:`inverse_and_ladj`,
    returning :math:`x = f^{-1}(y)` and :math:`\log|\det \partial x / \partial y|`.
    Densities transform as :math:`\log p_Y(y) = \log p_X(x) - \mathrm{ladj}`.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class ComposedTransform(Transform):
    """Apply transforms in order; log-determinants add."""

    def __init__(self, transforms: Sequence[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ladj = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, step = t.call_and_ladj(x)
            ladj = ladj + step
        return x, ladj

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        ladj = y.new_zeros(y.shape[0])
        for t in reversed(self.transforms):
            y, step = t.inverse_and_ladj(y)
            ladj = ladj + step
        return y, ladj


def mlp(n_in: int, n_out: int, hidden: Sequence[int], zero_last: bool = False) -> nn.Sequential:
    """A multilayer perceptron with SiLU activations; ``zero_last`` starts it at the zero map."""
    sizes = [n_in, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    last = nn.Linear(sizes[-1], n_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class AdditiveCoupling(Transform):
    r"""NICE's additive coupling :math:`y_B = x_B + m(x_A)`, :math:`y_A = x_A`.

    The log-determinant is exactly 0 and the inverse is :math:`x_B = y_B - m(y_A)`.

    Arguments:
        mask: Boolean tensor of shape (d,), True for the conditioning part A.
        hidden: Hidden layer sizes of the network m.

    Example:
        >>> t = AdditiveCoupling(torch.tensor([True, False]), hidden=[8])
        >>> x = torch.randn(4, 2)
        >>> torch.allclose(t.inverse(t(x)), x)
        True
    """

    def __init__(self, mask: Tensor, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.ndim != 1 or mask.all() or not mask.any():
            raise ValueError("the coupling mask must be 1-D with both True and False entries")
        self.register_buffer("index_a", torch.nonzero(mask).flatten())
        self.register_buffer("index_b", torch.nonzero(~mask).flatten())
        self.shift = mlp(len(self.index_a), len(self.index_b), hidden, zero_last=True)

    def _couple(self, x: Tensor, sign: float) -> Tensor:
        out = x.clone()
        out[:, self.index_b] = x[:, self.index_b] + sign * self.shift(x[:, self.index_a])
        return out

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, 1.0), x.new_zeros(x.shape[0])

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(y, -1.0), y.new_zeros(y.shape[0])


class LULinear(Transform):
    r"""The invertible matrix S of the note, :math:`y = S x` with :math:`S = L U`.

    L is unit lower triangular and U upper triangular with diagonal
    :math:`\exp(s)`, so :math:`\log|\det S| = \sum s` exactly and S is always
    invertible. A fixed permutation mixes the coordinates before L U.

    Arguments:
        dim: The size D of S.
        scale: Initial diagonal of S (a float or a tensor of shape (D,)).
        permute: Whether to apply a fixed random permutation (reproducible from ``seed``).

    Example:
        >>> s = LULinear(3, scale=2.0)
        >>> x = torch.randn(5, 3)
        >>> y, ladj = s.call_and_ladj(x)
        >>> torch.allclose(ladj, torch.full((5,), 3 * math.log(2.0)))
        True
    """

    def __init__(self, dim: int, scale: float | Tensor = 1.0, permute: bool = False, seed: int = 0):
        super().__init__()
        self.dim = int(dim)
        scale = torch.as_tensor(scale, dtype=torch.get_default_dtype()).expand(self.dim)
        if not (scale > 0).all():
            raise ValueError("the initial scale of S must be positive")
        self.lower = nn.Parameter(torch.zeros(self.dim, self.dim))
        self.upper = nn.Parameter(torch.zeros(self.dim, self.dim))
        self.log_diag = nn.Parameter(scale.log().clone())
        perm = torch.arange(self.dim)
        if permute:
            perm = torch.randperm(self.dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)

    def matrix(self) -> Tensor:
        """The matrix S (D, D), permutation included."""
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.log_diag.exp())
        return (lower @ upper)[:, self.perm]

    def log_abs_det(self) -> Tensor:
        return self.log_diag.sum()

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x @ self.matrix().T
        return y, self.log_abs_det().expand(x.shape[0])

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.log_diag.exp())
        v = torch.linalg.solve_triangular(lower, y.T, upper=False, unitriangular=True)
        v = torch.linalg.solve_triangular(upper, v, upper=True)
        x = v.T[:, self.perm]
        return x, -self.log_abs_det().expand(y.shape[0])


class FixedAffine(Transform):
    """A fixed elementwise map y = shift + scale * x (a normalisation), not trained."""

    def __init__(self, shift: Tensor, scale: Tensor):
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.get_default_dtype())
        if not (scale > 0).all():
            raise ValueError("FixedAffine needs positive scales")
        self.register_buffer("shift", torch.as_tensor(shift, dtype=scale.dtype))
        self.register_buffer("scale", scale)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.shift + self.scale * x, self.scale.log().sum().expand(x.shape[0])

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return (y - self.shift) / self.scale, -self.scale.log().sum().expand(y.shape[0])


def nice_flow(dim: int, layers: int, hidden: Sequence[int], seed: int = 0) -> ComposedTransform:
    """A NICE flow F on R^dim: ``layers`` additive couplings with alternating halves.

    Odd layers swap the halves; for dim > 2 every second pair of layers uses a fixed random
    partition so that every coordinate conditions every other one.
    """
    if dim < 2:
        raise ValueError(
            f"a NICE coupling needs at least 2 latent dimensions, got {dim}; "
            "use latent_dim > dim for a one-dimensional target (the note's redundant latents)"
        )
    if layers < 1:
        raise ValueError(f"a NICE flow needs at least one coupling layer, got {layers}")
    generator = torch.Generator().manual_seed(seed)
    half = torch.arange(dim) < math.ceil(dim / 2)
    couplings = []
    for i in range(layers):
        if i % 2 == 0:
            if i % 4 == 2 and dim > 2:
                mask = half[torch.randperm(dim, generator=generator)]
            else:
                mask = torch.arange(dim) % 2 == 0
        else:
            mask = ~mask
        couplings.append(AdditiveCoupling(mask, hidden))
    return ComposedTransform(couplings)
