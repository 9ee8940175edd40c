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

The levels (``schedule``): ``"linear"`` spaces :math:`\beta_k = k/K` evenly. ``"adaptive"`` lets a
separate pilot run place them: its chains anneal with each step chosen so that the conditional
ESS of that step's incremental weights, :math:`\exp(\Delta\beta \log w)` under the chains'
current AIS weights, is CESS_TARGET (as adaptive sequential Monte Carlo chooses its
temperatures); the K reported levels then sit at equal shares of the pilot's thermodynamic
length, the sum of :math:`\sqrt{-\log \mathrm{CESS}}` over its steps, where equal steps of the
weights' log-variance make the AIS weights' variance smallest for K levels. Where the model is
poor the steps crowd near :math:`\beta = 0`, where :math:`\log w` is still spread widely. The
schedule comes from pilot chains only and is frozen before the reported chains start, so their
weights stay exact.

The moves are the one MALA kernel of :mod:`openmm_nice.sampling.mala`. Step sizes: one per level, fitted
beforehand on a separate pilot batch (adapted towards the kernel's target acceptance) and then
frozen, so that the kernels of the reported chains do not depend on those chains.

Preconditioning (``preconditioner="fisher"``): where the model is too wide in a few latent
directions, the target pulled back to the latent space is stiff along them, and the step size
that keeps the acceptance there makes every other direction crawl. A first pilot run estimates
the Fisher matrix :math:`F_1 = E[\nabla \log \pi_1\, \nabla \log \pi_1^T]` at its end
states (leaving out the tenth of them with the largest gradients, which sit in clashes;
eigenvalues held at 0.1 or more); level k then moves by MALA in the coordinates whitened by
:math:`F_{\beta_k} = (1 - \beta_k) I + \beta_k F_1` (the base's Hessian is I, so this is
exact along a Gaussian path). The matrix comes from pilot chains and is frozen, so the reported
weights stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.sampling.mala import (
    TARGET_ACCEPTANCE,
    adapt_step_size,
    mala_proposal_log_ratio,
    mala_step,
)

__all__ = [
    "AISResult",
    "PRECONDITIONERS",
    "SCHEDULES",
    "TARGET_ACCEPTANCE",
    "adaptive_betas",
    "annealed_importance_sampling",
    "fisher_matrix",
    "sample_as_configured",
]

PRECONDITIONERS = ("identity", "fisher")
SCHEDULES = ("linear", "adaptive")
# the adaptive pilot's step: the conditional ESS each of its steps keeps
CESS_TARGET = 0.99
# the adaptive pilot doubles its step's -log CESS whenever it has taken this many times K steps
# (a model far from its target has a long path; the pilot's cost stays a few times K levels)
PILOT_LEVELS_PER_LEVEL = 4
# the share of the pilot's end states, by gradient norm, that the Fisher estimate keeps
FISHER_QUANTILE = 0.9
# the smallest eigenvalue of the Fisher estimate (a latent scale of at most 1 / sqrt of it)
FISHER_FLOOR = 0.1


@dataclass
class AISResult:
    """Samples and exact AIS log-weights.

    Attributes:
        x: Samples in the target's coordinates (n, dim), float64.
        log_w: Log-weights (n,), float64 (-inf for chains that met an undefined energy).
        u: Exact reduced energies of x (n,), float64.
        acceptance: Mean Metropolis acceptance at each level (K,).
        step_sizes: The frozen MALA step size of each level (K,).
        betas: The levels' path parameters beta_1 < ... < beta_K = 1 (K,), float64.
    """

    x: Tensor
    log_w: Tensor
    u: Tensor
    acceptance: Tensor
    step_sizes: Tensor
    betas: Tensor


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

    def mala(
        self, beta: float, step: float, rng: torch.Generator | None, whiten: Tensor | None = None
    ) -> Tensor:
        """One MALA move of every chain, invariant for pi_beta; returns the accepted mask.

        With ``whiten`` = L (a fixed D x D matrix) the move is preconditioned MALA, MALA in the
        coordinates v with z = L v: drift L L^T grad, noise L xi; exact for any fixed L."""

        def evaluate(z: Tensor):
            log_w, grad_log_w, x, u = _evaluate(
                self.generator, z.to(self.precision), self.target_beta
            )
            return self.log_pi(z, log_w, beta), -z + beta * grad_log_w, (log_w, grad_log_w, x, u)

        carried = (self.log_w, self.grad_log_w, self.x, self.u)
        log_pi = self.log_pi(self.z, self.log_w, beta)
        grad = -self.z + beta * self.grad_log_w
        if whiten is None:
            self.z, _, _, carried, accept = mala_step(
                self.z, log_pi, grad, evaluate, step, rng, carried=carried, precision=self.precision
            )
            self.log_w, self.grad_log_w, self.x, self.u = carried
            return accept
        whiten = whiten.to(self.z)
        unwhiten = torch.linalg.inv(whiten)
        noise = torch.randn(self.z.shape, dtype=self.z.dtype, device=self.z.device, generator=rng)
        drift = grad @ whiten  # L^T grad, the drift in v
        proposal = self.z + (step * drift + math.sqrt(2 * step) * noise) @ whiten.T
        # rounded to the model's precision, the ratio taken at the point evaluated
        proposal = proposal.to(self.precision).to(self.z.dtype)
        log_pi_new, grad_new, carried_new = evaluate(proposal)
        with torch.no_grad():
            log_ratio = (log_pi_new - log_pi) + mala_proposal_log_ratio(
                self.z @ unwhiten.T, proposal @ unwhiten.T, drift, grad_new @ whiten, step
            )
            uniform = torch.rand(
                len(self.z), dtype=self.z.dtype, device=self.z.device, generator=rng
            )
            defined = torch.isfinite(log_pi_new) & torch.isfinite(grad_new).all(-1)
            # a chain whose own state is undefined takes any defined proposal
            accept = defined & (~torch.isfinite(log_pi) | (uniform.log() < log_ratio))

            def pick(new: Tensor, old: Tensor) -> Tensor:
                mask = accept.reshape(-1, *([1] * (new.dim() - 1)))
                return torch.where(mask, new.to(old.dtype), old)

            self.z = pick(proposal, self.z)
            self.log_w, self.grad_log_w, self.x, self.u = (
                pick(new, old) for new, old in zip(carried_new, carried, strict=True)
            )
        return accept


def fisher_matrix(chains: _Chains) -> Tensor:
    """The Fisher matrix of pi_1 in latent space from chains near it: E[g g^T] of the scores
    g = -z + grad log w over the chains with the smallest FISHER_QUANTILE of gradient norms,
    its eigenvalues held at FISHER_FLOOR or more (float64, D x D)."""
    finite = torch.isfinite(chains.log_w)
    scores = (-chains.z + chains.grad_log_w)[finite]
    if len(scores) < 2:
        return torch.eye(chains.z.shape[1], dtype=torch.float64, device=chains.z.device)
    norms = scores.norm(dim=1)
    scores = scores[norms <= torch.quantile(norms, FISHER_QUANTILE)]
    matrix = scores.T @ scores / len(scores)
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.clamp(min=FISHER_FLOOR)) @ vectors.T


def _whitening(fisher: Tensor | None, beta: float) -> Tensor | None:
    """L with L L^T = F_beta^-1, F_beta = (1 - beta) I + beta F_1; None without F_1."""
    if fisher is None:
        return None
    eye = torch.eye(len(fisher), dtype=fisher.dtype, device=fisher.device)
    cholesky = torch.linalg.cholesky((1.0 - beta) * eye + beta * fisher)
    return torch.linalg.solve_triangular(cholesky.T, eye, upper=True)


def _run_chains(
    generator: BoltzmannGenerator,
    n: int,
    betas: list[float],
    step_sizes: list[float] | None,
    rng: torch.Generator | None,
    beta: float = 1.0,
    fisher: Tensor | None = None,
) -> tuple[_Chains, Tensor, list[float], list[float]]:
    """Run n chains through the levels ``betas`` (beta_0 = 0 first); adapt the step sizes when
    none are given; with a Fisher matrix each level's move is preconditioned by it (see the
    module's docstring)."""
    adapt = step_sizes is None
    sizes = [] if adapt else list(step_sizes)
    step = _first_step(generator)
    chains = _Chains(generator, generator.latent(n, rng), beta)
    ais = torch.zeros(n, dtype=torch.float64, device=chains.z.device)
    acceptance = []
    for k in range(1, len(betas)):
        # the weight gathers pi_k / pi_{k-1} at the state reached before the level-k move
        ais = ais + (betas[k] - betas[k - 1]) * chains.log_w
        size = step if adapt else sizes[k - 1]
        whiten = _whitening(fisher, betas[k])
        rate = float(chains.mala(betas[k], size, rng, whiten).double().mean())
        acceptance.append(rate)
        if adapt:
            sizes.append(size)
            step = adapt_step_size(size, rate)
    return chains, ais, acceptance, sizes


def _first_step(generator: BoltzmannGenerator) -> float:
    return 0.25 / math.sqrt(generator.latent_dim)


def _log_conditional_ess(log_a: Tensor, log_w: Tensor, delta: float) -> float:
    """log of the conditional ESS (between 1/n and 1) of the incremental weights
    exp(delta log w) under the normalised weights exp(log_a), over the chains where both are
    finite (a chain at an undefined energy is lost whatever the step)."""
    alive = torch.isfinite(log_a) & torch.isfinite(log_w)
    if not alive.any():
        return 0.0
    log_a, log_w = log_a[alive], log_w[alive]
    log_a = log_a - torch.logsumexp(log_a, 0)
    once = torch.logsumexp(log_a + delta * log_w, 0)
    twice = torch.logsumexp(log_a + 2 * delta * log_w, 0)
    return float(2 * once - twice)


def _next_step(log_a: Tensor, log_w: Tensor, left: float, log_target: float) -> float:
    """The largest step (at most ``left``) whose conditional ESS is at least exp(log_target),
    by bisection (the conditional ESS falls as the step grows)."""
    if _log_conditional_ess(log_a, log_w, left) >= log_target:
        return left
    low, high = 0.0, left
    for _ in range(60):
        middle = 0.5 * (low + high)
        if _log_conditional_ess(log_a, log_w, middle) >= log_target:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 + 1e-6 * high:
            break
    return max(low, 1e-12)


def adaptive_betas(
    generator: BoltzmannGenerator,
    steps: int,
    pilot: int = 512,
    rng: torch.Generator | None = None,
    beta: float = 1.0,
) -> list[float]:
    """K = ``steps`` levels 0 = beta_0 < ... < beta_K = 1 placed by a pilot run (see the
    module's docstring): its chains take steps of conditional ESS CESS_TARGET (more -log CESS
    per step if they need more than PILOT_LEVELS_PER_LEVEL K steps), and the levels split the
    pilot's thermodynamic length, sum of sqrt(-log CESS), evenly. The pilot's chains are
    discarded."""
    if steps < 1:
        raise ValueError(f"an adaptive schedule needs at least one level, got {steps}")
    chains = _Chains(generator, generator.latent(pilot, rng), beta)
    log_a = torch.zeros(pilot, dtype=torch.float64, device=chains.z.device)
    log_target = math.log(CESS_TARGET)
    step = _first_step(generator)
    path, length = [0.0], [0.0]
    while path[-1] < 1.0:
        if len(path) % (PILOT_LEVELS_PER_LEVEL * steps) == 0:
            log_target *= 2
        delta = _next_step(log_a, chains.log_w, 1.0 - path[-1], log_target)
        lost = -_log_conditional_ess(log_a, chains.log_w, delta)
        log_a = log_a + delta * chains.log_w
        # the last step ends exactly at 1
        path.append(1.0 if delta >= 1.0 - path[-1] else path[-1] + delta)
        length.append(length[-1] + math.sqrt(max(lost, 0.0)))
        rate = float(chains.mala(path[-1], step, rng).double().mean())
        step = adapt_step_size(step, rate)
    path_t = torch.tensor(path, dtype=torch.float64)
    length_t = torch.tensor(length, dtype=torch.float64)
    if float(length_t[-1]) <= 0.0:  # the model is the target: any spacing is as good
        return [k / steps for k in range(steps + 1)]
    marks = torch.linspace(0.0, float(length_t[-1]), steps + 1, dtype=torch.float64)
    # beta at each mark, linear between the pilot's steps
    index = torch.searchsorted(length_t, marks, right=True).clamp(1, len(path) - 1)
    lo, hi = length_t[index - 1], length_t[index]
    share = torch.where(hi > lo, (marks - lo) / (hi - lo).clamp(min=1e-300), torch.ones_like(marks))
    betas = path_t[index - 1] + share.clamp(0, 1) * (path_t[index] - path_t[index - 1])
    betas = betas.tolist()
    betas[0], betas[-1] = 0.0, 1.0
    # strictly increasing: a level that would repeat its predecessor moves halfway on
    for k in range(1, steps + 1):
        if betas[k] <= betas[k - 1]:
            betas[k] = betas[k - 1] + 0.5 * (1.0 - betas[k - 1]) / (steps + 1 - k)
    return betas


def annealed_importance_sampling(
    generator: BoltzmannGenerator,
    n: int,
    steps: int,
    batch_size: int = 8192,
    pilot: int = 512,
    rng: torch.Generator | None = None,
    progress: bool = False,
    beta: float = 1.0,
    preconditioner: str = "identity",
    schedule: str = "linear",
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
        preconditioner: ``"identity"`` (plain MALA in latent space) or ``"fisher"`` (MALA
            whitened by the Fisher matrix that a first pilot run measures; see the module's
            docstring). Either way the weights are exact.
        schedule: ``"linear"`` (beta_k = k / K) or ``"adaptive"`` (levels placed by a pilot
            run's conditional ESS; see the module's docstring). Either way the weights are
            exact.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(
            f"preconditioner must be one of {', '.join(PRECONDITIONERS)}, got {preconditioner!r}"
        )
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
        return AISResult(x.double(), log_w.double(), u.double(), empty, empty, empty)
    if pilot < 1:
        raise ValueError(f"the pilot batch must have at least one chain, got {pilot}")
    if schedule == "adaptive":
        betas = adaptive_betas(generator, steps, pilot, rng, beta)
    else:
        betas = [k / steps for k in range(steps + 1)]
    fisher = None
    if preconditioner == "fisher":
        first, _, _, _ = _run_chains(generator, pilot, betas, None, rng, beta)
        fisher = fisher_matrix(first)
    _, _, _, sizes = _run_chains(generator, pilot, betas, None, rng, beta, fisher)
    xs, log_ws, us, rates = [], [], [], []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="AIS", unit="batch")
    for start in starts:
        chains, ais, acceptance, _ = _run_chains(
            generator, min(batch_size, n - start), betas, sizes, rng, beta, fisher
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
        torch.tensor(betas[1:], dtype=torch.float64),
    )


def sample_as_configured(
    generator: BoltzmannGenerator,
    n: int,
    sampling,
    ais_steps: int | None = None,
    batch_size: int = 65536,
    rng: torch.Generator | None = None,
    progress: bool = False,
    preconditioner: str | None = None,
    schedule: str | None = None,
) -> AISResult:
    """The samples ``openmm-nice sample`` draws for a run: ``sampling.ais_steps`` levels of AIS
    (``ais_steps`` overrides it) in chains of ``sampling.ais_batch_size``, or the model's own
    one-shot samples in batches of ``batch_size`` when there are no levels.

    Arguments:
        sampling: The run's :class:`~openmm_nice.config.SamplingConfig`.
        preconditioner: Overrides ``sampling.ais_preconditioner``.
        schedule: Overrides ``sampling.ais_schedule``.
    """
    steps = sampling.ais_steps if ais_steps is None else ais_steps
    return annealed_importance_sampling(
        generator,
        n,
        steps,
        batch_size=sampling.ais_batch_size if steps else batch_size,
        rng=rng,
        progress=progress,
        preconditioner=preconditioner or sampling.ais_preconditioner,
        schedule=schedule or sampling.ais_schedule,
    )
