r"""Persistent MCMC walkers that give the training a mass-covering maximum-likelihood target.

Reverse KL is mode-seeking: while the inverse temperature is annealed towards the target, a
flow can drop a well it had covered and never see it again. The walkers here keep a population
of K points distributed, approximately, as :math:`\mu_\beta(x) \propto e^{-\beta U(x)}` at the
current inverse temperature, and the trainer adds the model's negative log-likelihood of the
walkers to its loss (a forward-KL term, mass-covering). Each training step moves them by

1. one independence Metropolis-Hastings step whose proposals are the model's own samples of
   the step: walker :math:`x` becomes proposal :math:`x'` with probability
   :math:`\min(1, w_\beta(x') / w_\beta(x))`, :math:`w_\beta = e^{-\beta U} / P`; this moves
   walkers between wells however high the barrier, and rebalances their populations towards
   :math:`\mu_\beta` as beta changes;
2. ``steps`` Metropolis-adjusted Langevin (MALA) steps on :math:`\beta U` with exact forces,
   the one kernel of :mod:`openmm_nice.sampling.mala` with its step-size adaptation; this relaxes the
   walkers within their wells, where the model is still wrong.

This is the scheme of adaptive Monte Carlo with normalising flows (a flow trained by maximum
likelihood on chains that it helps to mix), used here as a training signal only: estimates
still come from the final model's exact importance weights, so any imperfection of the walkers
costs efficiency, never bias. For D > d the model's density of a walker, needed in step 1, is
the one-sample estimate of :meth:`BoltzmannGenerator.log_prob` (a pseudo-marginal chain).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.sampling.mala import adapt_step_size, mala_proposal_log_ratio, mala_step

__all__ = ["Walkers", "mala_proposal_log_ratio"]  # the kernel's ratio, re-exported


class Walkers:
    """K Markov chains in the target's coordinates, moved at a given inverse temperature.

    Arguments:
        x: Initial positions (K, dim) (the model's first samples, or data frames).
        u: Their reduced energies U (K,).
        step_size: Initial MALA step size (in units of x squared per unit of force: the
            proposal is :math:`x - \\epsilon \\beta \\nabla U + \\sqrt{2 \\epsilon} \\xi`).

    Example:
        >>> from openmm_nice.energy.energies import DoubleWell1D
        >>> energy = DoubleWell1D()
        >>> x = torch.zeros(4, 1, dtype=torch.float64)
        >>> walkers = Walkers(x, energy(x))
        >>> acceptance = walkers.langevin(energy, beta=1.0, steps=5)
        >>> walkers.x.shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        x: Tensor,
        u: Tensor,
        step_size: float = 1e-3,
        beta: float | None = None,
        log_weight: Tensor | None = None,
    ):
        if x.ndim != 2 or u.shape != x.shape[:1]:
            raise ValueError(
                f"walkers need x of shape (K, dim) and u of shape (K,), got {tuple(x.shape)} "
                f"and {tuple(u.shape)}"
            )
        self.x = x.detach().clone()
        self.u = u.detach().clone()
        self.step_size = float(step_size)
        self.beta = beta  # the inverse temperature the population's weights refer to
        self.log_weight = torch.zeros_like(self.u) if log_weight is None else log_weight.clone()

    def normalized_weights(self) -> Tensor:
        """The walkers' self-normalised weights (uniform unless :meth:`anneal` reweighted)."""
        return torch.softmax(self.log_weight, 0)

    @torch.no_grad()
    def anneal(
        self, beta: float, rng: torch.Generator | None = None, threshold: float = 0.5
    ) -> bool:
        r"""Move the population's target from its inverse temperature to ``beta``
        (population annealing, a sequential Monte Carlo sampler).

        Each walker's weight gathers :math:`e^{-(\beta - \beta_{old}) U}`; once the weights'
        effective sample size falls below ``threshold`` times the number of walkers, the
        population is resampled (systematic resampling) and the weights reset. The walkers'
        shares of the wells then follow the Boltzmann distribution as beta changes, without
        any walker crossing a barrier: a well whose free energy rises loses walkers, one whose
        free energy falls gains copies, which the MALA steps then spread.

        Returns:
            Whether the population was resampled.
        """
        if self.beta is None:
            self.beta = float(beta)
            return False
        if beta == self.beta:
            return False
        step = -(beta - self.beta) * self.u
        self.log_weight = torch.nan_to_num(self.log_weight + step, nan=-math.inf, posinf=-math.inf)
        self.beta = float(beta)
        w = self.normalized_weights()
        if not torch.isfinite(w).all() or float(1.0 / (w**2).sum()) >= threshold * len(w):
            return False
        k = len(w)
        start = torch.rand((), dtype=w.dtype, device=w.device, generator=rng)
        positions = (start + torch.arange(k, dtype=w.dtype, device=w.device)) / k
        index = torch.searchsorted(torch.cumsum(w, 0), positions).clamp_max(k - 1)
        self.x, self.u = self.x[index], self.u[index]
        self.log_weight = torch.zeros_like(self.u)
        return True

    def __len__(self) -> int:
        return len(self.x)

    @torch.no_grad()
    def exchange(
        self,
        generator: BoltzmannGenerator,
        x_new: Tensor,
        u_new: Tensor,
        log_w_new: Tensor,
        beta: float,
        rng: torch.Generator | None = None,
    ) -> float:
        r"""One independence Metropolis-Hastings step with the model's samples as proposals.

        Arguments:
            generator: The model that drew the proposals.
            x_new, u_new: K proposals and their reduced energies.
            log_w_new: Their log-weights at ``beta``, :math:`-\beta U + \log\hat P(y|x) -
                \log P(x, y)` (+ the coordinate map's log-det).
            beta: Inverse temperature relative to the target's.

        Returns:
            The fraction of walkers that moved.
        """
        k = len(self.x)
        if len(x_new) < k:
            raise ValueError(f"need at least {k} proposals for {k} walkers, got {len(x_new)}")
        x_new, u_new, log_w_new = x_new[:k].detach(), u_new[:k].detach(), log_w_new[:k].detach()
        log_p = generator.log_prob(self.x.to(generator.dtype), rng=rng).to(self.u.dtype)
        log_w_old = -beta * self.u - log_p
        # a walker with an undefined weight (a clash it started in) takes any finite proposal
        log_w_old = torch.where(torch.isnan(log_w_old), -math.inf, log_w_old)
        uniform = torch.rand(k, dtype=self.u.dtype, device=self.u.device, generator=rng)
        accept = torch.log(uniform) < log_w_new.to(self.u.dtype) - log_w_old
        accept &= torch.isfinite(u_new) & torch.isfinite(log_w_new)
        self.x = torch.where(accept[:, None], x_new.to(self.x.dtype), self.x)
        self.u = torch.where(accept, u_new.to(self.u.dtype), self.u)
        return float(accept.double().mean())

    def langevin(
        self,
        energy,
        beta: float,
        steps: int,
        rng: torch.Generator | None = None,
        coordinates=None,
    ) -> float:
        r"""``steps`` MALA steps on beta * U (:func:`~openmm_nice.sampling.mala.mala_step`), the step size
        adapted after each (:func:`~openmm_nice.sampling.mala.adapt_step_size`). Returns the mean
        acceptance.

        With ``coordinates`` (a bijection s -> x with ``call_and_ladj`` and ``inverse_and_ladj``,
        such as a molecule's :class:`~openmm_nice.molecule.coordinates.MolecularTransform`) the
        chains move in s, on the density :math:`\pi(s) \propto e^{-\beta U(x(s))} |\det
        \partial x / \partial s|`, whose image in x is the same :math:`e^{-\beta U}`. In
        Cartesian coordinates the stiffest bond sets the step (about 1e-6 nm^2 for a peptide, a
        hundredth of an angstrom), so the chains relax within their wells and never turn a
        side chain; in the map's standardised coordinates every bond, angle and torsion has its
        own scale, and a step turns torsions by degrees.
        """
        if steps <= 0:
            return float("nan")
        if coordinates is not None:
            return self._langevin_in(coordinates, energy, beta, steps, rng)

        def evaluate(x: Tensor):
            u, grad = self._energy_and_gradient(energy, x)
            return -beta * u, -beta * grad, (u,)

        x, u = self.x, self.u
        grad = -beta * self._energy_and_gradient(energy, x)[1]
        accepted = 0.0
        for _ in range(steps):
            x, _, grad, (u,), accept = mala_step(
                x, -beta * u, grad, evaluate, self.step_size, rng, carried=(u,)
            )
            rate = float(accept.double().mean())
            accepted += rate
            self.step_size = adapt_step_size(self.step_size, rate)
        self.x, self.u = x.detach(), u.detach()
        return accepted / steps

    def _langevin_in(self, coordinates, energy, beta: float, steps: int, rng) -> float:
        """:meth:`langevin` in the coordinates s of ``coordinates`` (float64)."""

        def evaluate(s: Tensor):
            with torch.enable_grad():
                s = s.detach().requires_grad_(True)
                x, ladj = coordinates.call_and_ladj(s)
                u = energy(x)
                log_pi = -beta * u + ladj
                defined = torch.isfinite(log_pi)
                (grad,) = torch.autograd.grad(torch.where(defined, log_pi, 0.0).sum(), s)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            return log_pi.detach(), grad, (x.detach(), u.detach())

        with torch.no_grad():
            s = coordinates.inverse_and_ladj(self.x.double())[0]
        log_pi, grad, (x, u) = evaluate(s)
        accepted = 0.0
        for _ in range(steps):
            s, log_pi, grad, (x, u), accept = mala_step(
                s, log_pi, grad, evaluate, self.step_size, rng, carried=(x, u)
            )
            rate = float(accept.double().mean())
            accepted += rate
            self.step_size = adapt_step_size(self.step_size, rate)
        self.x, self.u = x.to(self.x.dtype), u.to(self.u.dtype)
        return accepted / steps

    @staticmethod
    def _energy_and_gradient(energy, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            u = energy(x)
            finite = torch.isfinite(u)
            (grad,) = torch.autograd.grad(torch.where(finite, u, 0.0).sum(), x)
        return u.detach(), torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    def state_dict(self) -> dict:
        return {
            "x": self.x,
            "u": self.u,
            "step_size": self.step_size,
            "beta": self.beta,
            "log_weight": self.log_weight,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Walkers:
        """The walkers that :meth:`state_dict` saved."""
        return cls(
            state["x"], state["u"], state["step_size"], state.get("beta"), state.get("log_weight")
        )
