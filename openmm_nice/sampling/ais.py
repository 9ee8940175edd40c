r"""Annealed importance sampling in the flow's latent space.

The model's own importance weights :math:`w(z)` (see :class:`~openmm_nice.flows.generator.
BoltzmannGenerator`) define a path of densities on the latent space

.. math:: \pi_\beta(z) \propto \mathcal N(z; 0, I)\, w(z)^\beta, \qquad 0 = \beta_0 < \dots < \beta_K = 1,

from the base Gaussian (the model) to the target pulled back through the model,
:math:`\pi_1(z) \propto \mu(x)\, \hat P(y|x)\, |\det \partial(x, y)/\partial z|`. Each latent
starts as a fresh model draw and, at every level k, moves by one Metropolis-adjusted Langevin
(MALA) step that leaves :math:`\pi_{\beta_k}` invariant; its log-weight gathers
:math:`(\beta_k - \beta_{k-1}) \log w(z_{k-1})` (Neal's annealed importance sampling). The final
points with these weights are exact importance samples of the Boltzmann distribution, as the
one-shot weights are, and every sample is still an independent chain; :math:`K = 0` gives the
model's own weights back. In latent space the flow has already whitened the target, so the
Langevin steps can be long: this is the reparametrised ("NeuTra") AIS of the flow literature,
and stochastic layers of stochastic normalizing flows play the same role.

The moves are the one MALA kernel of :mod:`openmm_nice.sampling.mala`. Step sizes: one per level, fitted
beforehand on a separate pilot batch (adapted towards the kernel's target acceptance) and then
frozen, so that the kernels of the reported chains do not depend on those chains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.sampling.mala import TARGET_ACCEPTANCE, adapt_step_size, mala_step

__all__ = ["AISResult", "TARGET_ACCEPTANCE", "annealed_importance_sampling", "sample_as_configured"]


@dataclass
class AISResult:
    """Samples and exact AIS log-weights.

    Attributes:
        x: Samples in the target's coordinates (n, dim), float64.
        log_w: Log-weights (n,), float64 (-inf for chains that met an undefined energy).
        u: Exact reduced energies of x (n,), float64.
        acceptance: Mean Metropolis acceptance at each level (K,).
        step_sizes: The frozen MALA step size of each level (K,).
    """

    x: Tensor
    log_w: Tensor
    u: Tensor
    acceptance: Tensor
    step_sizes: Tensor


def _evaluate(
    generator: BoltzmannGenerator, z: Tensor, beta: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log w(z) (float64) for the target at inverse temperature ``beta`` (relative to the
    energy's), its gradient in z (zero where log w is not finite), x and u at z."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        d = generator.draw_from(z, float64=True)
        log_w = d.log_weights(beta)
        finite = torch.isfinite(log_w)
        total = torch.where(finite, log_w, torch.zeros_like(log_w)).sum()
        (grad,) = torch.autograd.grad(total, z)
    grad = torch.nan_to_num(grad.double(), nan=0.0, posinf=0.0, neginf=0.0)
    return log_w.detach(), grad, d.x.detach().double(), d.u.detach().double()


class _Chains:
    """The state of a batch of chains: latents (float64, rounded to the model's precision), and
    at them log w, its gradient in z, x and u."""

    def __init__(self, generator: BoltzmannGenerator, z: Tensor, target_beta: float = 1.0):
        self.generator = generator
        self.target_beta = target_beta
        self.precision = z.dtype
        self.z = z.double()
        self.log_w, self.grad_log_w, self.x, self.u = _evaluate(generator, z, target_beta)

    @staticmethod
    def log_pi(z: Tensor, log_w: Tensor, beta: float) -> Tensor:
        return -0.5 * (z**2).sum(-1) + beta * log_w

    def mala(self, beta: float, step: float, rng: torch.Generator | None) -> Tensor:
        """One MALA move of every chain, invariant for pi_beta; returns the accepted mask."""

        def evaluate(z: Tensor):
            log_w, grad_log_w, x, u = _evaluate(
                self.generator, z.to(self.precision), self.target_beta
            )
            return self.log_pi(z, log_w, beta), -z + beta * grad_log_w, (log_w, grad_log_w, x, u)

        self.z, _, _, carried, accept = mala_step(
            self.z,
            self.log_pi(self.z, self.log_w, beta),
            -self.z + beta * self.grad_log_w,
            evaluate,
            step,
            rng,
            carried=(self.log_w, self.grad_log_w, self.x, self.u),
            precision=self.precision,
        )
        self.log_w, self.grad_log_w, self.x, self.u = carried
        return accept


def _run_chains(
    generator: BoltzmannGenerator,
    n: int,
    steps: int,
    step_sizes: list[float] | None,
    rng: torch.Generator | None,
    beta: float = 1.0,
) -> tuple[_Chains, Tensor, list[float], list[float]]:
    """Run n chains through the K levels; adapt the step sizes when none are given."""
    adapt = step_sizes is None
    sizes = [] if adapt else list(step_sizes)
    step = 0.25 / math.sqrt(generator.latent_dim)
    chains = _Chains(generator, generator.latent(n, rng), beta)
    ais = torch.zeros(n, dtype=torch.float64, device=chains.z.device)
    acceptance = []
    betas = [k / steps for k in range(steps + 1)]
    for k in range(1, steps + 1):
        # the weight gathers pi_k / pi_{k-1} at the state reached before the level-k move
        ais = ais + (betas[k] - betas[k - 1]) * chains.log_w
        size = step if adapt else sizes[k - 1]
        rate = float(chains.mala(betas[k], size, rng).double().mean())
        acceptance.append(rate)
        if adapt:
            sizes.append(size)
            step = adapt_step_size(size, rate)
    return chains, ais, acceptance, sizes


def annealed_importance_sampling(
    generator: BoltzmannGenerator,
    n: int,
    steps: int,
    batch_size: int = 8192,
    pilot: int = 512,
    rng: torch.Generator | None = None,
    progress: bool = False,
    beta: float = 1.0,
) -> AISResult:
    """n independent AIS chains from the model to the target through ``steps`` levels.

    Arguments:
        generator: A trained :class:`BoltzmannGenerator`.
        n: Number of samples.
        steps: Number of levels K (one MALA move each); 0 returns the model's own weights.
        batch_size: Chains run together (memory: the flow's autograd graph of one batch).
        pilot: Chains of the separate pilot run that fits the step sizes (discarded).
        rng: torch random generator for the latents, noise and acceptances.
        progress: Show a progress bar over the batches.
        beta: Inverse temperature of the target, relative to the energy's (1: the target
            itself; training anneals through lower values).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if n < 1:
        raise ValueError(f"the number of samples must be positive, got {n}")
    if steps < 0:
        raise ValueError(f"the number of AIS steps must be 0 or more, got {steps}")
    if steps == 0:
        x, log_w, u = generator.sample_with_energies(n, batch_size, rng)
        if beta != 1.0:
            log_w = torch.where(torch.isfinite(u), log_w + (1.0 - beta) * u, -math.inf)
        empty = torch.zeros(0, dtype=torch.float64)
        return AISResult(x.double(), log_w.double(), u.double(), empty, empty)
    if pilot < 1:
        raise ValueError(f"the pilot batch must have at least one chain, got {pilot}")
    _, _, _, sizes = _run_chains(generator, pilot, steps, None, rng, beta)
    xs, log_ws, us, rates = [], [], [], []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="AIS", unit="batch")
    for start in starts:
        chains, ais, acceptance, _ = _run_chains(
            generator, min(batch_size, n - start), steps, sizes, rng, beta
        )
        xs.append(chains.x)
        log_ws.append(ais)
        us.append(chains.u)
        rates.append(torch.tensor(acceptance, dtype=torch.float64) * len(ais))
    acceptance = torch.stack(rates).sum(0) / n
    return AISResult(
        torch.cat(xs),
        torch.cat(log_ws),
        torch.cat(us),
        acceptance,
        torch.tensor(sizes, dtype=torch.float64),
    )


def sample_as_configured(
    generator: BoltzmannGenerator,
    n: int,
    sampling,
    ais_steps: int | None = None,
    batch_size: int = 65536,
    rng: torch.Generator | None = None,
    progress: bool = False,
) -> AISResult:
    """The samples ``openmm-nice sample`` draws for a run: ``sampling.ais_steps`` levels of AIS
    (``ais_steps`` overrides it) in chains of ``sampling.ais_batch_size``, or the model's own
    one-shot samples in batches of ``batch_size`` when there are no levels.

    Arguments:
        sampling: The run's :class:`~openmm_nice.config.SamplingConfig`.
    """
    steps = sampling.ais_steps if ais_steps is None else ais_steps
    return annealed_importance_sampling(
        generator,
        n,
        steps,
        batch_size=sampling.ais_batch_size if steps else batch_size,
        rng=rng,
        progress=progress,
    )
