"""A buffer of the model's own samples with their proposal densities, for importance-weighted
forward KL at any inverse temperature."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from openmm_nice.flows.generator import BoltzmannGenerator

__all__ = ["SampleBuffer"]


class SampleBuffer:
    r"""Samples :math:`x_i` of earlier models, each with its energy and its proposal density.

    A sample drawn from a model :math:`q` (on the extended space when D > d) keeps
    :math:`U(x_i)` and :math:`\log q_i = \log P(x_i, y_i) - \log \hat P(y_i|x_i) -
    \mathrm{ladj}_i`, the log of the density that generated it in the target's coordinates,
    so that its importance weight for the Boltzmann distribution at an inverse temperature
    :math:`\beta` (relative to the target's) is

    .. math:: \log w_i(\beta) = -\beta\, U(x_i) - \log q_i,

    whatever model is being trained now: the weights stay exact while the model changes
    (TA-BG's buffer). Self-normalised over the buffer, they give a forward KL
    :math:`-\sum_i \bar w_i \log P_\theta(x_i)` with many more effective samples than one
    training batch, and samples from a higher temperature's models carry the modes they found
    into the colder target. The buffer keeps the newest ``capacity`` samples.

    Arguments:
        capacity: The most samples kept.

    Example:
        >>> from openmm_nice.energy.energies import DoubleWell1D
        >>> bg = BoltzmannGenerator(DoubleWell1D(), latent_dim=2, layers=2, hidden=[8])
        >>> buffer = SampleBuffer(1000)
        >>> buffer.add_draws(bg, 600, batch_size=256)
        >>> len(buffer), buffer.sample(8, beta=1.0).shape
        (600, torch.Size([8, 1]))
    """

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"a buffer needs a capacity >= 1 (an int), got {capacity!r}")
        self.capacity = capacity
        self.x: Tensor | None = None
        self.u: Tensor | None = None
        self.log_q: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.x is None else len(self.x)

    def add_draws(
        self,
        generator: BoltzmannGenerator,
        n: int,
        batch_size: int = 8192,
        rng: torch.Generator | None = None,
        ais_steps: int = 0,
        beta: float = 1.0,
    ) -> None:
        r"""Draw n samples of the generator as it is now and add them (dropping the oldest).

        With ``ais_steps`` = K > 0 each sample is the end of K levels of latent-space AIS
        towards the target at ``beta`` (:mod:`openmm_nice.sampling.ais`), whose exact log-weight
        :math:`\log w` stands in for the proposal density: :math:`\log q = -\log w -
        \beta U`, so that :math:`-\beta' U - \log q` is again an exact log-weight at any
        :math:`\beta'`, and the samples are closer to the target than the model's own.
        """
        if ais_steps:
            from openmm_nice.sampling.ais import annealed_importance_sampling

            result = annealed_importance_sampling(
                generator, n, ais_steps, batch_size, min(512, n), rng, beta=beta
            )
            finite = torch.isfinite(result.log_w)
            log_q = torch.where(finite, -result.log_w - beta * result.u, math.inf)
            self.add(result.x, result.u, log_q)
            return
        with torch.no_grad():
            for start in range(0, n, batch_size):
                d = generator.draw(min(batch_size, n - start), rng, float64=True)
                self.add(d.x, d.u, d.log_p - d.log_q_y - d.ladj)

    def add(self, x: Tensor, u: Tensor, log_q: Tensor) -> None:
        """Add samples x (B, dim) with energies u (B,) and proposal log-densities log_q (B,)."""
        x, u, log_q = (t.detach().double() for t in (x, u, log_q))
        if not (x.ndim == 2 and u.shape == log_q.shape == (x.shape[0],)):
            raise ValueError(
                f"expected x (B, dim), u (B,) and log_q (B,), got {tuple(x.shape)}, "
                f"{tuple(u.shape)} and {tuple(log_q.shape)}"
            )
        if self.x is not None:
            x, u, log_q = (torch.cat([old, new]) for old, new in zip(self.state, (x, u, log_q)))
        self.x, self.u, self.log_q = (t[-self.capacity :] for t in (x, u, log_q))

    @property
    def state(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.x is None:
            raise ValueError("the buffer is empty; add samples first")
        return self.x, self.u, self.log_q

    def log_weights(self, beta: float = 1.0) -> Tensor:
        r"""Importance log-weights :math:`-\beta U - \log q` of every sample (B,); an
        undefined energy gives :math:`-\infty`."""
        _, u, log_q = self.state
        log_w = -beta * u - log_q
        return torch.where(torch.isnan(log_w) | (log_w == math.inf), -math.inf, log_w)

    def normalized_weights(self, beta: float = 1.0) -> Tensor:
        """Self-normalised weights at ``beta`` (sum 1)."""
        log_w = self.log_weights(beta)
        if not torch.isfinite(log_w).any():
            raise ValueError("every sample in the buffer has weight 0 (undefined energies)")
        return torch.softmax(log_w, 0)

    def effective_sample_size(self, beta: float = 1.0) -> float:
        """Kish's effective sample size of the buffer's weights at ``beta``."""
        w = self.normalized_weights(beta)
        return float(1.0 / (w**2).sum())

    def sample(self, n: int, beta: float = 1.0, rng: torch.Generator | None = None) -> Tensor:
        """n samples drawn with replacement in proportion to their weights at ``beta``
        (importance resampling), shape (n, dim), float64."""
        x = self.state[0]
        index = torch.multinomial(self.normalized_weights(beta), n, True, generator=rng)
        return x[index]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "x": self.x, "u": self.u, "log_q": self.log_q}

    @classmethod
    def from_state_dict(cls, state: dict) -> SampleBuffer:
        buffer = cls(int(state["capacity"]))
        buffer.x, buffer.u, buffer.log_q = state["x"], state["u"], state["log_q"]
        return buffer
