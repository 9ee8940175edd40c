"""The conditional Gaussian P^(y|x) = N(y; M(x), Sigma(x)) of the redundant latents."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from openmm_nice.flows.transforms import mlp

__all__ = ["ConditionalGaussian"]

_MIN_SCALE = 1e-4


class ConditionalGaussian(nn.Module):
    r"""A diagonal Gaussian :math:`\hat P(y|x) = \mathcal N(y; M(x), \mathrm{diag}\,\sigma(x)^2)`.

    M and :math:`\sigma` are separate networks; :math:`\sigma = \mathrm{softplus}(\cdot) +
    10^{-4}` keeps :math:`\Sigma` positive definite.

    Arguments:
        x_dim: The dimension d of x.
        y_dim: The dimension D - d of y.
        hidden: Hidden layer sizes of both networks.

    Example:
        >>> g = ConditionalGaussian(1, 2, hidden=[8])
        >>> x = torch.randn(5, 1)
        >>> y = g.sample(x)
        >>> g.log_prob(y, x).shape
        torch.Size([5])
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.x_dim, self.y_dim = int(x_dim), int(y_dim)
        self.mean = mlp(self.x_dim, self.y_dim, hidden, zero_last=True)
        self.raw_scale = mlp(self.x_dim, self.y_dim, hidden, zero_last=True)
        # softplus(0.5413) = 1: the conditional starts as N(0, I), the latent's own law.
        nn.init.constant_(self.raw_scale[-1].bias, math.log(math.e - 1))

    def mean_and_scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """M(x) and the standard deviations sigma(x), both of shape (B, D - d)."""
        return self.mean(x), softplus(self.raw_scale(x)) + _MIN_SCALE

    def log_prob(self, y: Tensor, x: Tensor) -> Tensor:
        r""":math:`\log \hat P(y|x)` of shape (B,), all constants included."""
        mean, scale = self.mean_and_scale(x)
        r = (y - mean) / scale
        return (-0.5 * r**2 - scale.log()).sum(-1) - 0.5 * self.y_dim * math.log(2 * math.pi)

    def sample(self, x: Tensor, rng: torch.Generator | None = None) -> Tensor:
        """Draw y ~ P^(y|x), one per row of x, shape (B, D - d)."""
        mean, scale = self.mean_and_scale(x)
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=rng)
        return mean + scale * noise
