"""The Boltzmann generator x = S . F(z) with redundant latents and exact importance weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from openmm_nice.config import ModelConfig
from openmm_nice.energy.energies import Energy
from openmm_nice.flows.conditional import ConditionalGaussian
from openmm_nice.flows.transforms import LULinear, Transform, nice_flow

__all__ = ["BoltzmannGenerator", "Draw", "standard_normal_log_prob"]


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) of each row, shape (B,)."""
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


@dataclass
class Draw:
    """Everything one pass z -> x computes, each of batch size B.

    Attributes:
        z: Latents (B, D).
        x_flow: The model's x in flow space (B, d).
        y: The redundant part (B, D - d).
        x: Points in the target's coordinates (B, dim of the energy).
        log_p: log P(x_flow, y), the joint density of the flow output.
        log_q_y: log P^(y | x_flow) (zeros when D = d).
        ladj: log|det d x / d x_flow| of the coordinate map (zeros without one).
        u: Exact reduced energies U(x) (+inf where undefined).
    """

    z: Tensor
    x_flow: Tensor
    y: Tensor
    x: Tensor
    log_p: Tensor
    log_q_y: Tensor
    ladj: Tensor
    u: Tensor

    def log_weights(self, beta: float = 1.0, u: Tensor | None = None) -> Tensor:
        r"""Importance log-weights :math:`\log w = -\beta U + \mathrm{ladj} + \log\hat P(y|x) -
        \log P(x, y)`; an infinite or NaN energy gives :math:`-\infty` (weight 0).

        Arguments:
            beta: Inverse temperature relative to the target's (1 for the target itself).
            u: Energies to use instead of the exact ones (e.g. regularised for training).
        """
        u = self.u if u is None else u
        log_w = -beta * u + self.ladj + self.log_q_y - self.log_p
        bad = torch.isnan(log_w) | (log_w == math.inf)
        return torch.where(bad, torch.full_like(log_w, -math.inf), log_w)


_MODEL_DEFAULTS = ModelConfig()  # one set of defaults: the config's
_LOG_PROB_ROWS = 65536  # rows per flow pass when log_prob averages over draws of y


class BoltzmannGenerator(nn.Module):
    r"""A NICE Boltzmann generator :math:`(x, y) = S \cdot F(z)`, :math:`z \sim \mathcal N(0, I_D)`.

    F is a stack of additive couplings (log-det 0), S an LU-parametrised matrix with exact
    :math:`\log|\det S|`. For D > d the redundant part y is modelled by
    :math:`\hat P(y|x) = \mathcal N(M(x), \Sigma(x))`, and importance weights

    .. math:: \log w = -U(x) + \log \hat P(y|x) - \log P(x, y)

    are unbiased for the Boltzmann distribution :math:`\mu(x) \propto e^{-U(x)}` for any D.
    An optional ``coordinates`` transform maps the flow's x to the energy's coordinates
    (internal coordinates of a molecule), with its log-det entering the weights.

    Arguments:
        energy: The target's reduced energy U.
        latent_dim: D >= d (None for D = d).
        layers: Number of coupling layers in F.
        hidden: Hidden sizes of each coupling network.
        conditional_hidden: Hidden sizes of the networks M and Sigma.
        coordinates: Optional bijection from flow space to the energy's coordinates; its
            attribute ``dim`` is the flow-space dimension d.
        scale: Initial diagonal of S.
        seed: Seed of the fixed partitions and permutation.

    Example:
        >>> from openmm_nice.energy.energies import DoubleWell1D
        >>> bg = BoltzmannGenerator(DoubleWell1D(), latent_dim=2, layers=2, hidden=[8])
        >>> x, log_w = bg.sample(10)
        >>> x.shape, log_w.shape
        (torch.Size([10, 1]), torch.Size([10]))
    """

    def __init__(
        self,
        energy: Energy,
        latent_dim: int | None = None,
        layers: int = _MODEL_DEFAULTS.layers,
        hidden: Sequence[int] = tuple(_MODEL_DEFAULTS.hidden),
        conditional_hidden: Sequence[int] = tuple(_MODEL_DEFAULTS.conditional_hidden),
        coordinates: Transform | None = None,
        scale: float = _MODEL_DEFAULTS.scale,
        seed: int = 0,
    ):
        super().__init__()
        self.energy = energy
        self.coordinates = coordinates
        self.dim = energy.dim if coordinates is None else int(coordinates.dim)
        self.latent_dim = self.dim if latent_dim is None else int(latent_dim)
        if self.latent_dim < self.dim:
            raise ValueError(
                f"latent_dim must be at least the dimension of x ({self.dim}), got {self.latent_dim}"
            )
        self.flow = (
            nice_flow(self.latent_dim, layers, hidden, seed) if self.latent_dim > 1 else None
        )
        self.linear = LULinear(self.latent_dim, scale=scale, permute=self.latent_dim > 2, seed=seed)
        self.conditional = (
            ConditionalGaussian(self.dim, self.latent_dim - self.dim, conditional_hidden)
            if self.latent_dim > self.dim
            else None
        )

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (latents are drawn there)."""
        return self.linear.log_diag.device

    @property
    def dtype(self) -> torch.dtype:
        return self.linear.log_diag.dtype

    def latent(self, n: int, rng: torch.Generator | None = None) -> Tensor:
        """n draws of z ~ N(0, I_D) in the model's dtype and device."""
        return torch.randn(n, self.latent_dim, dtype=self.dtype, device=self.device, generator=rng)

    def flow_forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_flow, y, log P(x_flow, y)) for latents z."""
        h, ladj = (z, z.new_zeros(z.shape[0])) if self.flow is None else self.flow.call_and_ladj(z)
        h, ladj_s = self.linear.call_and_ladj(h)
        log_p = standard_normal_log_prob(z) - ladj - ladj_s
        return h[:, : self.dim], h[:, self.dim :], log_p

    def flow_inverse(self, x_flow: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(z, log P(x_flow, y)) of given points, by the closed-form inverse of S and F."""
        h, ladj_s = self.linear.inverse_and_ladj(torch.cat([x_flow, y], dim=-1))
        if self.flow is None:
            return h, standard_normal_log_prob(h) + ladj_s
        z, ladj_f = self.flow.inverse_and_ladj(h)
        return z, standard_normal_log_prob(z) + ladj_s + ladj_f

    def flow_log_prob(self, x_flow: Tensor, y: Tensor) -> Tensor:
        """log P(x_flow, y) of given points, by the closed-form inverse of S and F."""
        return self.flow_inverse(x_flow, y)[1]

    def _from_target(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.coordinates is None:
            return x, x.new_zeros(x.shape[0])
        return self.coordinates.inverse_and_ladj(x)

    def draw(
        self,
        n: int,
        rng: torch.Generator | None = None,
        float64: bool = False,
        energy: Callable[[Tensor], Tensor] | None = None,
    ) -> Draw:
        """One pass of n latents through the model, with exact energies (differentiable).

        With ``float64`` the target-space points, their energies and hence the log-weights are
        in float64 whatever the model's dtype (for sample files and estimates). ``energy``, a
        reduced energy of points (B, dim) in the target's coordinates, replaces the model's own
        (e.g. the target at another temperature).
        """
        return self.draw_from(self.latent(n, rng), float64, energy)

    def draw_from(
        self,
        z: Tensor,
        float64: bool = False,
        energy: Callable[[Tensor], Tensor] | None = None,
    ) -> Draw:
        """Like :meth:`draw` for given latents z of shape (B, D) (differentiable in z)."""
        n = z.shape[0]
        x_flow, y, log_p = self.flow_forward(z)
        if self.conditional is None:
            log_q_y = log_p.new_zeros(n)
        else:
            log_q_y = self.conditional.log_prob(y, x_flow)
        if float64:
            x_flow, y, log_p, log_q_y = (t.double() for t in (x_flow, y, log_p, log_q_y))
        if self.coordinates is None:
            x, ladj = x_flow, x_flow.new_zeros(n)
        else:
            x, ladj = self.coordinates.call_and_ladj(x_flow)
        u = (self.energy if energy is None else energy)(x)
        return Draw(z, x_flow, y, x, log_p, log_q_y, ladj, u)

    def draw_at(self, x: Tensor, u: Tensor, rng: torch.Generator | None = None) -> Draw:
        r"""The :class:`Draw` of given points x with reduced energies u, y drawn afresh.

        x_flow and the coordinate map's log-det come from the inverse of the coordinates, y
        from :math:`\hat P(y|x)` (nothing for D = d), and z from the closed-form inverse of S
        and F. On the extended space (x, y), whose target is :math:`\mu(x) \hat P(y|x)`,
        drawing y is an exact Gibbs step, and :meth:`Draw.log_weights` is the weight of the
        point that a Metropolis-Hastings move with the model's draws as proposals needs
        (:func:`openmm_nice.sampling.moves.independence_metropolis`).

        Arguments:
            x: Points in the target's coordinates, shape (B, energy.dim).
            u: Their reduced energies (B,), the model's own target's or another's.
            rng: Random numbers for y.

        Example:
            >>> from openmm_nice.energy.energies import DoubleWell1D
            >>> bg = BoltzmannGenerator(DoubleWell1D(), latent_dim=2, layers=2, hidden=[8])
            >>> d = bg.draw(3)
            >>> torch.allclose(bg.draw_at(d.x, d.u).x_flow, d.x_flow)
            True
        """
        if x.ndim != 2 or x.shape[1] != self.energy.dim or u.shape != x.shape[:1]:
            raise ValueError(
                f"expected x of shape (B, {self.energy.dim}) and u of shape (B,), got "
                f"{tuple(x.shape)} and {tuple(u.shape)}"
            )
        x_flow, minus_ladj = self._from_target(x)
        if self.conditional is None:
            y, log_q_y = x_flow[:, :0], x_flow.new_zeros(x.shape[0])
        else:
            y = self.conditional.sample(x_flow, rng)
            log_q_y = self.conditional.log_prob(y, x_flow)
        z, log_p = self.flow_inverse(x_flow, y)
        return Draw(z, x_flow, y, x, log_p, log_q_y, -minus_ladj, u)

    @torch.no_grad()
    def sample(
        self, n: int, batch_size: int = 65536, rng: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw n independent samples.

        Returns:
            x: Samples in the target's coordinates, shape (n, energy.dim).
            log_w: Importance log-weights, shape (n,); see the class docstring.
        """
        x, log_w, _ = self.sample_with_energies(n, batch_size, rng)
        return x, log_w

    @torch.no_grad()
    def sample_with_energies(
        self, n: int, batch_size: int = 65536, rng: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Like :meth:`sample`, also returning the exact reduced energies u (n,)."""
        if n < 1:
            raise ValueError(f"the number of samples must be positive, got {n}")
        xs, log_ws, us = [], [], []
        for start in range(0, n, batch_size):
            d = self.draw(min(batch_size, n - start), rng, float64=True)
            xs.append(d.x)
            log_ws.append(d.log_weights())
            us.append(d.u)
        return torch.cat(xs), torch.cat(log_ws), torch.cat(us)

    def log_prob(self, x: Tensor, n_y: int = 1, rng: torch.Generator | None = None) -> Tensor:
        r"""log P(x) of data points in the target's coordinates, shape (B,).

        For D = d this is exact. For D > d it is the importance estimate
        :math:`\log \frac{1}{K}\sum_k P(x, y_k) / \hat P(y_k|x)` with
        :math:`y_k \sim \hat P(y|x)`, a stochastic lower bound in expectation (tight when
        :math:`\hat P(y|x) = P(y|x)`), with K = ``n_y``.
        """
        if x.ndim != 2 or x.shape[1] != self.energy.dim:
            raise ValueError(f"expected x of shape (B, {self.energy.dim}), got {tuple(x.shape)}")
        x_flow, ladj = self._from_target(x)
        if self.conditional is None:
            return self.flow_log_prob(x_flow, x_flow[:, :0]) + ladj
        if n_y < 1:
            raise ValueError(f"n_y must be at least 1, got {n_y}")
        # the n_y draws of y for every row go through the flow as one batch, in chunks of about
        # _LOG_PROB_ROWS rows, so that a large n_y costs memory in proportion to the chunk only
        per_chunk = max(1, _LOG_PROB_ROWS // max(1, len(x_flow)))
        partial = []
        for start in range(0, n_y, per_chunk):
            k = min(per_chunk, n_y - start)
            rows = x_flow.repeat(k, 1)  # k copies of the batch, draw-major
            y = self.conditional.sample(rows, rng)
            terms = self.flow_log_prob(rows, y) - self.conditional.log_prob(y, rows)
            partial.append(torch.logsumexp(terms.view(k, len(x_flow)), 0))
        return torch.logsumexp(torch.stack(partial), 0) - math.log(n_y) + ladj
