"""Training by reverse KL (J, J_R), with annealing, reweighted forward KL and maximum likelihood."""

from __future__ import annotations

import bisect
import inspect
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from openmm_nice.analysis.reweighting import effective_sample_size
from openmm_nice.analysis.weight_diagnostics import max_weight_share, pareto_k
from openmm_nice.config import TrainingConfig
from openmm_nice.energy.energies import regularize_energy
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.training.buffer import SampleBuffer
from openmm_nice.training.walkers import Walkers

__all__ = [
    "Trainer",
    "TrainingInterrupted",
    "TrainingSchedule",
    "reverse_kl",
    "nll",
    "reweighted_forward_kl",
]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM after a whole step, its reporters (the
    checkpoint among them) told as at the end of a run; ``step`` is the last step taken and
    ``signum`` the signal. A ``KeyboardInterrupt``, so code that stops on Ctrl-C still does."""

    def __init__(self, step: int, signum: int):
        self.step = int(step)
        self.signum = int(signum)
        name = signal.Signals(signum).name
        super().__init__(f"{name} after step {self.step}: the checkpoint holds that step")


class _StopRequests:
    """While open, SIGINT and SIGTERM set ``signum`` instead of stopping the process at once, so
    that training stops between steps; the first signal puts the previous handler back, so a
    second one stops at once as before. Only in the main thread of a single process: ranks of a
    torch.distributed run could stop at different steps and wait on each other for ever."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        distributed = dist.is_available() and dist.is_initialized()
        if threading.current_thread() is threading.main_thread() and not distributed:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            # None: a handler not installed from Python (an embedding host's); the default then
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()


def reverse_kl(
    generator: BoltzmannGenerator, n: int, beta: float = 1.0, energy_cut: float = 1e3, rng=None
):
    r"""The reverse-KL loss :math:`J_R = \mathbb E_z[-\log w_\beta]` on n fresh latents.

    With :math:`\beta = 1` and the exact energy this is :math:`KL_R - \log Z`, the note's
    :math:`J_R` with every constant included (J when D = d); the gradient uses the
    regularised energy so that clashes give finite gradients.

    Returns:
        (loss, draw, parts) where parts holds the mean energy, log|det S| and the
        conditional term for reporting.
    """
    d = generator.draw(n, rng)
    u_train = regularize_energy(d.u, cut=energy_cut)
    per_sample = -d.log_weights(beta, u=u_train)
    with torch.no_grad():
        finite = torch.isfinite(d.u)
        parts = {
            "energy_kT": float(d.u[finite].mean()) if finite.any() else math.inf,
            "log_det_S": float(generator.linear.log_abs_det()),
            "conditional": float(-d.log_q_y.mean()),
        }
    return per_sample.mean(), d, parts


def reweighted_forward_kl(
    generator: BoltzmannGenerator, d, beta: float, energy_cut: float = 1e3, alpha: float = 1.0
) -> Tensor:
    r"""Forward KL estimated on the model's own samples with self-normalised weights.

    :math:`-\sum_i \bar w_i \log P(x_i, y_i)` with :math:`\bar w` the normalised weights at
    inverse temperature :math:`\beta` (detached) and the points detached: it is mass-covering,
    pulling density towards every region the weights find under-populated. With ``alpha`` > 1
    the weights are :math:`w_i^\alpha`, normalised: the gradient of the alpha-divergence
    :math:`D_\alpha(p \| q)` up to a positive factor (see :func:`alpha_weights`).
    """
    log_w = d.log_weights(beta, u=regularize_energy(d.u.detach(), cut=energy_cut)).detach()
    w = torch.softmax(alpha * log_w, 0)
    log_p = generator.flow_log_prob(d.x_flow.detach(), d.y.detach())
    return -(w * log_p).sum()


def nll(generator: BoltzmannGenerator, x_data: Tensor, rng=None) -> Tensor:
    """Mean negative log-likelihood (its bound for D > d) of data frames in target coordinates."""
    return -generator.log_prob(x_data, rng=rng).mean()


def weighted_nll(
    generator: BoltzmannGenerator,
    x: Tensor,
    weights: Tensor,
    rng=None,
    alpha: float = 1.0,
    log_target: Tensor | None = None,
) -> Tensor:
    """Negative log-likelihood of weighted samples (e.g. the walkers), weights renormalised.

    With ``alpha`` > 1 each weight is multiplied by the sample's own importance weight under
    the model, :math:`(p / q_\theta)^{\alpha - 1}` with ``log_target`` the log of p (up to a
    constant) at x: the gradient of the alpha-divergence (:func:`alpha_weights`).

    A sample where the model's density is undefined (a map refitted since it got there) does
    not count; its infinite log density stays out of the graph, whose gradient it would make
    nan."""
    log_p = generator.log_prob(x, rng=rng)
    defined = torch.isfinite(log_p)
    if not defined.all():
        x, weights = x[defined], weights[defined]
        log_target = None if log_target is None else log_target[defined]
        log_p = generator.log_prob(x, rng=rng)
    if alpha != 1.0:
        if log_target is None:
            raise ValueError("alpha != 1 needs log_target, the target's log density at x")
        weights = weights * alpha_weights(log_target.to(log_p) - log_p.detach(), alpha)
    weights = (weights / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)).to(log_p)
    return -(weights * log_p).sum()


def alpha_weights(log_w: Tensor, alpha: float) -> Tensor:
    r"""The factors :math:`w^{\alpha - 1}` (rescaled by a constant, detached) that turn a
    forward-KL gradient on samples of p into the gradient of the alpha-divergence.

    :math:`D_\alpha(p \| q_\theta) \propto \int p^\alpha q_\theta^{1-\alpha}` has the gradient
    :math:`-(\alpha - 1) \mathbb E_p[w^{\alpha-1} \nabla \log q_\theta]` with
    :math:`w = p / q_\theta`: the forward KL's (alpha = 1) with each sample of p weighted by
    its importance weight to the power alpha - 1. Alpha = 2 is the divergence whose minimum
    maximises the importance-sampling ESS (:math:`ESS/N = 1 / (1 + \chi^2)`) and that FAB
    minimises: it leans on the samples the model under-weights most, the tail that decides
    the ESS of many samples.

    Example:
        >>> alpha_weights(torch.tensor([0.0, 1.0, -math.inf]), 2.0)
        tensor([0.3679, 1.0000, 0.0000])
    """
    scaled = (alpha - 1.0) * log_w.detach()
    finite = torch.isfinite(scaled)
    top = scaled[finite].max() if finite.any() else scaled.new_zeros(())
    return torch.exp(torch.where(finite | (scaled < 0), scaled - top, scaled.new_tensor(-math.inf)))


class _StepLoss(nn.Module):
    """One step's loss as a module, so that DistributedDataParallel can wrap it."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.generator = trainer.generator
        self._trainer = [trainer]  # a list, so that the trainer is not registered as a submodule

    def forward(
        self,
        beta: float,
        data: Tensor | None,
        refit_buffer: SampleBuffer | _PooledSamples | None = None,
    ) -> tuple[Tensor, dict, Tensor | None]:
        t = self._trainer[0]
        if refit_buffer is not None:  # the maximum-likelihood steps that follow a map refit
            ml = t.buffer_nll(beta, refit_buffer)
            return ml, {"buffer_nll": float(ml.detach())}, None
        rkl, d, state = reverse_kl(self.generator, t.batch_size, beta, t.energy_cut, t.rng)
        state["reverse_kl"] = float(rkl.detach())
        weight = {name: schedule(t.step) for name, schedule in t.weights.items()}
        alpha = t.forward_alpha(t.step)
        loss = weight["kl"] * rkl
        if weight["reweighted_fkl"] > 0:
            loss = loss + weight["reweighted_fkl"] * reweighted_forward_kl(
                self.generator, d, beta, t.energy_cut, alpha
            )
        if data is not None:
            ml = nll(self.generator, data.to(d.x.device), t.rng)
            state["nll"] = float(ml.detach())
            loss = loss + t.ml_weight_at(t.step) * ml
        if weight["buffer"] > 0 and len(t.buffer) > 0:
            pooled = t.pooled_buffer(beta)
            ml = t.buffer_nll(beta, pooled, alpha)
            state["buffer_nll"] = float(ml.detach())
            state["buffer_ess"] = t.buffer.effective_sample_size(beta)
            loss = loss + weight["buffer"] * ml
        if t.walkers > 0 and weight["walker"] > 0:
            walkers, state["walker_exchange"], state["walker_acceptance"] = t.move_walkers(d, beta)
            ml = weighted_nll(
                self.generator,
                walkers.x.to(d.x.dtype),
                walkers.normalized_weights(),
                t.rng,
                alpha,
                log_target=-beta * walkers.u.to(d.x.dtype),
            )
            state["walker_nll"] = float(ml.detach())
            loss = loss + weight["walker"] * ml
        return loss, state, d.log_weights().detach()


class WeightSchedule:
    """A loss weight as a function of the step: a constant, or piecewise linear through
    ``(step, weight)`` points and constant beyond the first and the last.

    Example:
        >>> w = WeightSchedule([(0, 1.0), (100, 1.0), (200, 0.0)])
        >>> w(50), w(150), w(1000), WeightSchedule(0.5)(7)
        (1.0, 0.5, 0.0, 0.5)
    """

    def __init__(self, weight: float | Sequence[Sequence[float]]):
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            points = [(0, float(weight))]
        else:
            points = [(int(step), float(value)) for step, value in weight]
        if not points or any(v < 0 or not math.isfinite(v) for _, v in points):
            raise ValueError(
                f"a loss weight must be >= 0 (or (step, weight >= 0) points), got {weight!r}"
            )
        if any(b[0] < a[0] for a, b in zip(points[:-1], points[1:])):
            raise ValueError(f"the steps of a weight schedule must not decrease, got {weight!r}")
        self.points = tuple(points)

    def __call__(self, step: int) -> float:
        steps = [p[0] for p in self.points]
        k = bisect.bisect_right(steps, step)
        if k == 0:
            return self.points[0][1]
        if k == len(steps):
            return self.points[-1][1]
        (s0, v0), (s1, v1) = self.points[k - 1], self.points[k]
        return v0 + (v1 - v0) * (step - s0) / (s1 - s0)

    @property
    def maximum(self) -> float:
        return max(v for _, v in self.points)

    def __repr__(self) -> str:
        return f"WeightSchedule({list(self.points)})"


_DEFAULTS = TrainingConfig()  # one set of defaults: the config's, the ones that work


@dataclass
class TrainingSchedule:
    """Inverse temperature and learning-rate factor as functions of the step (defaults: the
    config's, :class:`~openmm_nice.config.TrainingConfig`)."""

    steps: int
    beta_start: float = _DEFAULTS.beta_start
    anneal_steps: int = _DEFAULTS.anneal_steps
    lr_schedule: str = _DEFAULTS.lr_schedule
    anneal_start: int = _DEFAULTS.anneal_start

    def beta(self, step: int) -> float:
        """``beta_start`` until ``anneal_start``, then geometric to 1 over ``anneal_steps``."""
        if step < self.anneal_start:
            return self.beta_start
        step -= self.anneal_start
        if self.anneal_steps <= 0 or step >= self.anneal_steps:
            return 1.0
        # geometric in beta: equal ratios between neighbouring temperatures
        return self.beta_start ** (1.0 - step / self.anneal_steps)

    def lr_factor(self, step: int) -> float:
        if self.lr_schedule == "constant" or self.steps <= 0:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / self.steps)) * 0.99 + 0.01


class _PooledSamples:
    """Weighted samples x of one distribution from several estimators, with their reduced
    energies u (at the target's temperature), resampled by weight."""

    def __init__(self, x: Tensor, u: Tensor, weights: Tensor):
        self.x, self.u, self.weights = x, u.to(x), weights / weights.sum()

    def join(self, x: Tensor, u: Tensor, weights: Tensor) -> _PooledSamples:
        """Both sets, each with a share of the mass proportional to its effective sample
        size (Kish), so that the set that knows more counts more."""
        weights = (weights / weights.sum()).to(self.weights)
        ess = [1.0 / (w**2).sum() for w in (self.weights, weights)]
        share = ess[1] / (ess[0] + ess[1])
        return _PooledSamples(
            torch.cat([self.x, x.to(self.x)]),
            torch.cat([self.u, u.to(self.x)]),
            torch.cat([(1 - share) * self.weights, share * weights]),
        )

    def sample(self, n: int, rng: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples (and their energies) resampled by weight."""
        index = torch.multinomial(self.weights, n, True, generator=rng)
        return self.x[index], self.u[index]


class Trainer:
    r"""Trains a :class:`BoltzmannGenerator`; reporters see every state, the trainer never prints.

    The loss of a step is ``kl_weight * J_R(beta) + reweighted_fkl_weight * forward KL(beta)
    + buffer_weight * NLL(buffer) + ml_weight * NLL(data) + walker_weight * NLL(walkers)``,
    with beta held at ``beta_start`` for ``anneal_start`` steps, then annealed geometrically
    to 1 over ``anneal_steps`` and, with ``ml_weight_final``, the ML weight moved linearly from
    ``ml_weight`` to it over the steps (e.g. 0, for the reverse KL to finish alone; on
    alanine dipeptide that lowered the ESS, see benchmarks/RESULTS.md). The walkers
    (``walkers`` > 0 of them, see :mod:`openmm_nice.training.walkers`) are MCMC chains at the current
    beta that take the step's model samples as independence proposals and ``walker_steps``
    MALA steps; they start from the model's first samples. With many modes, a loss led by the
    walkers' likelihood (``kl_weight`` 0.1, no reweighted forward KL) keeps every mode at its
    population where the full reverse KL pulls the minor ones down (the 16-dimensional
    many-well in benchmarks/RESULTS.md).

    Data-free training of molecules (the recipe of ``examples/alanine_dipeptide.yaml``) starts
    hot, where barriers are low and the reverse KL finds every basin, and cools. Two things
    carry what the hot models found to the target: the buffer (:class:`~openmm_nice.training.buffer.
    SampleBuffer`: ``buffer_draws`` model samples added every ``buffer_interval`` steps, the
    newest ``buffer_size`` kept, whose NLL under importance resampling at the current beta is
    a mass-covering forward KL; pooled with the walkers by effective sample size, see
    :meth:`pooled_buffer`), and refits of the coordinate map (at each step listed in
    ``map_refits``: ``refit_samples`` new samples, ``fit_map(x, weights)`` fitted to the
    weighted buffer, then ``refit_steps`` maximum-likelihood steps, see :meth:`refit_map`),
    which give each torsion a density learned from the model's own weighted samples instead
    of MD data.

    Reporters follow OpenMM's protocol: ``describeNextReport(trainer)`` returns the number of
    steps until the reporter wants the next state, and ``report(trainer, state)`` receives a dict
    with the step, the loss and its parts, the batch's ESS/N, beta and the learning rate.

    Arguments:
        generator: The model.
        steps: Total optimisation steps.
        batch_size: Latents per step.
        learning_rate: Adam's step size before the schedule.
        data: Optional MD frames (F, energy.dim) for the ML term.
        ml_weight_final: Optional ML weight at the last step (linear from ``ml_weight``).
        forward_alpha: The mass-covering terms (reweighted forward KL, buffer, walkers)
            follow the gradient of the alpha-divergence :math:`D_\alpha(p \| q)`: 1 is the
            forward KL, 2 the chi-square divergence, whose minimum maximises the ESS
            (:func:`alpha_weights`). A number or ``(step, alpha)`` points, as the weights.
        seed: Seed of the latent draws (and data minibatches).
        walkers: Number of MCMC walkers (0: none); at most ``batch_size``.
        walker_weight: Weight of their negative log-likelihood in the loss.
        walker_steps: MALA steps per training step.
        walker_coordinates: Where those steps move: ``"cartesian"``, or ``"internal"``, the
            coordinate map's flow space (:meth:`~openmm_nice.training.walkers.Walkers.langevin`).
        walker_resampling: Population annealing: as beta changes, the walkers are reweighted
            by :math:`e^{-\Delta\beta U}` and resampled when their weights degenerate
            (:meth:`~openmm_nice.training.walkers.Walkers.anneal`), so that their shares of the wells
            follow the Boltzmann distribution at every beta; their NLL is then weighted.
        anneal_start: Steps held at ``beta_start`` before the anneal.
        buffer_size: Samples the buffer keeps (0: no buffer term).
        buffer_weight: Weight of the buffer's importance-resampled NLL.
        buffer_batch_size: Buffer samples per step.
        buffer_interval: Steps between additions to the buffer.
        buffer_draws: Model samples added each time.
        buffer_ais_steps: Levels of latent-space AIS towards the current beta that each
            buffer (and refit) sample runs through (0: the model's own samples).
        map_refits: Steps before which the coordinate map is refitted.
        fit_map: ``fit_map(x, weights)`` returns a coordinate transform (its state is loaded
            into ``generator.coordinates``) fitted to samples x (B, dim) with weights (B,).
        refit_samples: Samples drawn for each refit.
        refit_steps: Maximum-likelihood steps after each refit.
        reporters: Reporter objects.
    """

    def __init__(
        self,
        generator: BoltzmannGenerator,
        steps: int = _DEFAULTS.steps,
        batch_size: int = _DEFAULTS.batch_size,
        learning_rate: float = _DEFAULTS.learning_rate,
        lr_schedule: str = _DEFAULTS.lr_schedule,
        kl_weight: float | Sequence[Sequence[float]] = _DEFAULTS.kl_weight,
        ml_weight: float = _DEFAULTS.ml_weight,
        ml_weight_final: float | None = _DEFAULTS.ml_weight_final,
        reweighted_fkl_weight: float | Sequence[Sequence[float]] = _DEFAULTS.reweighted_fkl_weight,
        forward_alpha: float | Sequence[Sequence[float]] = _DEFAULTS.forward_alpha,
        beta_start: float = _DEFAULTS.beta_start,
        anneal_steps: int = _DEFAULTS.anneal_steps,
        data: Tensor | None = None,
        ml_batch_size: int = _DEFAULTS.ml_batch_size,
        energy_cut: float = _DEFAULTS.energy_cut,
        grad_clip: float = _DEFAULTS.grad_clip,
        seed: int = 0,
        walkers: int = _DEFAULTS.walkers,
        walker_weight: float | Sequence[Sequence[float]] = _DEFAULTS.walker_weight,
        walker_steps: int = _DEFAULTS.walker_steps,
        walker_coordinates: str = _DEFAULTS.walker_coordinates,
        walker_resampling: bool = _DEFAULTS.walker_resampling,
        anneal_start: int = _DEFAULTS.anneal_start,
        buffer_size: int = _DEFAULTS.buffer_size,
        buffer_weight: float | Sequence[Sequence[float]] = _DEFAULTS.buffer_weight,
        buffer_batch_size: int = _DEFAULTS.buffer_batch_size,
        buffer_interval: int = _DEFAULTS.buffer_interval,
        buffer_draws: int = _DEFAULTS.buffer_draws,
        buffer_ais_steps: int = _DEFAULTS.buffer_ais_steps,
        map_refits: Sequence[int] = tuple(_DEFAULTS.map_refits),
        fit_map: Callable[[Tensor, Tensor], nn.Module] | None = None,
        refit_samples: int = _DEFAULTS.refit_samples,
        refit_steps: int = _DEFAULTS.refit_steps,
        reporters: Sequence = (),
    ):
        self.weights = {
            "kl": WeightSchedule(kl_weight),
            "reweighted_fkl": WeightSchedule(reweighted_fkl_weight),
            "buffer": WeightSchedule(buffer_weight),
            "walker": WeightSchedule(walker_weight),
        }
        self.forward_alpha = WeightSchedule(forward_alpha)
        if min(v for _, v in self.forward_alpha.points) < 1:
            raise ValueError(f"forward_alpha must be >= 1 (1: the forward KL), got {forward_alpha}")
        self.ml_weight = float(ml_weight)
        self.ml_weight_final = self.ml_weight if ml_weight_final is None else float(ml_weight_final)
        if self.ml_weight_final < 0:
            raise ValueError(f"ml_weight_final must be >= 0, got {ml_weight_final}")
        if self.uses_data and data is None:
            raise ValueError("ml_weight > 0 needs data frames for the maximum-likelihood term")
        if not 0 <= walkers <= batch_size:
            raise ValueError(
                f"walkers must be between 0 and batch_size ({batch_size}): each step's model "
                f"samples are their proposals; got {walkers}"
            )
        if map_refits and fit_map is None:
            raise ValueError(
                "map_refits needs fit_map, the function that fits the coordinate map to "
                "weighted samples (targets.build_trainer provides it for molecules)"
            )
        if map_refits and getattr(generator, "coordinates", None) is None:
            raise ValueError("map_refits needs a generator with a coordinate map (a molecule)")
        if self.weights["buffer"].maximum > 0 and buffer_size < 1:
            raise ValueError(f"buffer_weight > 0 needs buffer_size >= 1, got {buffer_size}")
        if min(buffer_batch_size, buffer_interval, buffer_draws, refit_samples) < 1:
            raise ValueError(
                "buffer_batch_size, buffer_interval, buffer_draws and refit_samples must be >= 1"
            )
        self.generator = generator
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.schedule = TrainingSchedule(
            self.steps, beta_start, anneal_steps, lr_schedule, int(anneal_start)
        )
        self.buffer = SampleBuffer(max(int(buffer_size), 1))
        self.buffer_size = int(buffer_size)
        self.buffer_batch_size = int(buffer_batch_size)
        self.buffer_interval = int(buffer_interval)
        self.buffer_draws = int(buffer_draws)
        if buffer_ais_steps < 0:
            raise ValueError(f"buffer_ais_steps must be >= 0, got {buffer_ais_steps}")
        self.buffer_ais_steps = int(buffer_ais_steps)
        self.map_refits = sorted({int(k) for k in map_refits})
        self.fit_map = fit_map
        self.refit_samples = int(refit_samples)
        self.refit_steps = int(refit_steps)
        self.data = data
        self.ml_batch_size = int(ml_batch_size)
        self.energy_cut = float(energy_cut)
        self.grad_clip = float(grad_clip)
        self.reporters = list(reporters)
        self.learning_rate = float(learning_rate)
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=self.learning_rate)
        self.rng = torch.Generator(device=generator.device).manual_seed(seed)
        self.data_rng = torch.Generator().manual_seed(seed + 1)
        self.walkers = int(walkers)
        self.walker_resampling = bool(walker_resampling)
        self.walker_steps = int(walker_steps)
        if walker_coordinates not in ("cartesian", "internal"):
            raise ValueError(
                f"walker_coordinates must be 'cartesian' or 'internal', got {walker_coordinates!r}"
            )
        if walker_coordinates == "internal" and getattr(generator, "coordinates", None) is None:
            raise ValueError(
                "walker_coordinates: internal needs a generator with a coordinate map (a "
                "molecule); use cartesian"
            )
        self.walker_coordinates = walker_coordinates
        self._walkers: Walkers | None = None
        self.step = 0
        self.elapsed = 0.0
        self._non_finite_before = 0  # non-finite energies of the run before a resume
        self._loss: nn.Module = _StepLoss(self)
        if dist.is_available() and dist.is_initialized():
            # each rank draws its own latents; DDP averages the gradients of the ranks' losses
            self._loss = nn.parallel.DistributedDataParallel(self._loss)

    @classmethod
    def from_config(
        cls,
        generator: BoltzmannGenerator,
        training: TrainingConfig,
        data: Tensor | None = None,
        fit_map: Callable[[Tensor, Tensor], nn.Module] | None = None,
        seed: int = 0,
        reporters: Sequence = (),
    ) -> Trainer:
        """A trainer as a config's ``training:`` section says (``training.data`` names files:
        pass their frames as ``data``; molecules pass the ``fit_map`` of
        :func:`openmm_nice.targets.map_fitter` when the section refits the map)."""
        options = {
            name: getattr(training, name)
            for name in inspect.signature(cls).parameters
            if name in TrainingConfig.model_fields and name != "data"
        }
        return cls(
            generator,
            data=data,
            fit_map=fit_map if training.map_refits else None,
            seed=seed,
            reporters=reporters,
            **options,
        )

    def _train_step(self) -> dict:
        beta = self.schedule.beta(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        batch = None
        if self.uses_data:
            idx = torch.randint(0, len(self.data), (self.ml_batch_size,), generator=self.data_rng)
            batch = self.data[idx]
        loss, state, log_w = self._loss(beta, batch)
        state.update(step=self.step + 1, beta=beta)
        if not torch.isfinite(loss):
            terms = ", ".join(
                f"{name} {value:.4g}"
                for name, value in state.items()
                if name in ("reverse_kl", "buffer_nll", "walker_nll", "nll", "energy_kT")
            )
            raise FloatingPointError(
                f"the loss became {float(loss)} at step {self.step + 1} ({terms}); lower the "
                "learning rate or the initial scale of S, or raise training.energy_cut"
            )
        loss.backward()  # under DistributedDataParallel this also averages the gradients
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.grad_clip)
        lr = self.learning_rate * self.schedule.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        state["learning_rate"] = lr
        self.optimizer.step()
        state["loss"] = float(loss.detach())
        state["ess"] = effective_sample_size(log_w) / len(log_w)
        state["max_weight_share"] = max_weight_share(log_w)
        state["pareto_k"] = pareto_k(log_w)
        return state

    @property
    def uses_data(self) -> bool:
        """Whether the data's NLL has a positive weight at some step."""
        return max(self.ml_weight, self.ml_weight_final) > 0

    def ml_weight_at(self, step: int) -> float:
        """The weight of the data's NLL at a step: ``ml_weight`` moving linearly to
        ``ml_weight_final`` over the run."""
        if self.steps <= 0:
            return self.ml_weight
        fraction = min(step, self.steps) / self.steps
        return self.ml_weight + (self.ml_weight_final - self.ml_weight) * fraction

    def move_walkers(self, d, beta: float) -> tuple[Walkers, float, float]:
        """Move the walkers one training step at ``beta``, with the draw ``d`` as proposals
        (the first step starts them at its first samples with finite energies).

        Returns:
            The walkers, the fraction that took a model sample, and the MALA acceptance.
        """
        with torch.no_grad():
            x, u = d.x.detach(), d.u.detach()
            if self._walkers is None:
                finite = torch.isfinite(u)
                order = torch.argsort((~finite).to(torch.int8), stable=True)[: self.walkers]
                self._walkers = Walkers(x[order], u[order])
            walkers = self._walkers
            if self.walker_resampling:
                walkers.anneal(beta, self.rng)
            exchanged = walkers.exchange(
                self.generator, x, u, d.log_weights(beta).detach(), beta, self.rng
            )
        if self.walker_coordinates == "internal":  # the map's image is the model's support
            coordinates = self.generator.coordinates
            accepted = walkers.langevin(
                self.generator.energy, beta, self.walker_steps, self.rng, coordinates
            )
        else:
            accepted = walkers.langevin(self._supported_energy, beta, self.walker_steps, self.rng)
        return walkers, exchanged, accepted

    def _supported_energy(self, x: Tensor) -> Tensor:
        """The energy, +inf outside the model's support (a stereocentre of the other
        handedness, which the coordinate map excludes), so that walkers stay where the model's
        density is defined."""
        u = self.generator.energy(x)
        coordinates = getattr(self.generator, "coordinates", None)
        if coordinates is None:
            return u
        with torch.no_grad():
            inside = torch.isfinite(coordinates.inverse_and_ladj(x.to(self.generator.dtype))[1])
        return torch.where(inside, u, math.inf)

    def buffer_batch(
        self, beta: float, buffer: SampleBuffer | _PooledSamples
    ) -> tuple[Tensor, Tensor]:
        """``buffer_batch_size`` samples of ``buffer`` resampled by their weights at ``beta``,
        and their reduced energies at the target's temperature."""
        if isinstance(buffer, SampleBuffer):
            buffer = _PooledSamples(buffer.x, buffer.u, buffer.normalized_weights(beta))
        x, u = buffer.sample(self.buffer_batch_size, self.rng)
        return x.to(self.generator.dtype), u.to(self.generator.dtype)

    def buffer_nll(
        self, beta: float, buffer: SampleBuffer | _PooledSamples, alpha: float = 1.0
    ) -> Tensor:
        """The NLL of a :meth:`buffer_batch` (with ``alpha`` > 1 each sample weighted by
        :func:`alpha_weights` of its weight under the model, at ``beta``); a walker in it where
        the model's density is undefined (a map refitted since it got there) does not count,
        as in :func:`weighted_nll`."""
        x, u = self.buffer_batch(beta, buffer)
        ones = torch.ones(len(x), dtype=x.dtype)
        return weighted_nll(self.generator, x, ones, self.rng, alpha, log_target=-beta * u)

    def pooled_buffer(self, beta: float, samples: SampleBuffer | None = None) -> _PooledSamples:
        """The buffer's (or ``samples``') samples weighted for ``beta``, pooled with the
        walkers (when there are any) in proportion to the two sets' effective sample sizes.

        Both estimate the Boltzmann distribution at ``beta``. While the model is poor, the
        buffer's weights rest on a handful of samples (tens of effective samples in 50,000)
        and a forward KL on them alone pulls the model onto those few points; the walkers,
        an MCMC population at ``beta``, then carry the term. Once the buffer's effective size
        is far above the walkers' count, the term is the buffer's as before."""
        samples = self.buffer if samples is None else samples
        pooled = _PooledSamples(samples.x, samples.u, samples.normalized_weights(beta))
        if self._walkers is not None:
            walkers = self._walkers
            pooled = pooled.join(walkers.x, walkers.u, walkers.normalized_weights())
        return pooled

    def refit_map(self, beta: float) -> None:
        """Refit the coordinate map to the model's own samples weighted for ``beta`` and to
        the walkers, then realign the model to it.

        Draws ``refit_samples`` samples, fits a new map to them and the buffer's samples
        (whose weights stay exact under any later model) weighted at ``beta`` with
        ``fit_map(x, weights)`` (e.g. torsion densities and cuts where the weighted samples
        are thinnest), and takes ``refit_steps`` maximum-likelihood steps on those samples
        resampled by their weights, so that the flow, which learned the old map's
        coordinates, describes the same distribution in the new ones. With walkers, they are
        a second estimate of the same distribution, one that keeps the wells the model has
        thinned out: the two weighted sets are pooled in proportion to their effective sample
        sizes, so that the map keeps its resolution wherever the walkers are. The new model
        samples then join the buffer.
        """
        samples = SampleBuffer(len(self.buffer) + self.refit_samples)
        if len(self.buffer):
            samples.add(*self.buffer.state)
        with torch.no_grad():
            samples.add_draws(
                self.generator,
                self.refit_samples,
                rng=self.rng,
                ais_steps=self.buffer_ais_steps,
                beta=beta,
            )
            pooled = self.pooled_buffer(beta, samples)
            fitted = self.fit_map(pooled.x, pooled.weights)
            state = fitted.state_dict()
            if dist.is_available() and dist.is_initialized():
                # every rank takes rank 0's map (whose shapes, e.g. the number of conditional
                # torsions, may differ from the map another rank fitted)
                box = [state if dist.get_rank() == 0 else None]
                dist.broadcast_object_list(box, 0)
                state = box[0]
            device = self.generator.device
            self.generator.coordinates.load_state_dict({k: v.to(device) for k, v in state.items()})
        lr = self.learning_rate * self.schedule.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(self.refit_steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(beta, None, pooled)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.grad_clip)
            self.optimizer.step()
        if self.buffer_size:
            self.buffer.add(*(t[-self.refit_samples :] for t in samples.state))

    def run(self, steps: int | None = None) -> None:
        """Train until ``steps`` (default: all configured steps) have been taken in total."""
        target = self.steps if steps is None else min(int(steps), self.steps)
        self.generator.train()
        next_report = [r.describeNextReport(self) for r in self.reporters]
        with _StopRequests() as stop:
            self._run_steps(target, next_report, stop)
        self.generator.eval()
        if stop.signum is not None:
            raise TrainingInterrupted(self.step, stop.signum)

    def _run_steps(self, target: int, next_report: list[int], stop: _StopRequests) -> None:
        """Steps until ``target``, or until a stop is requested: then the step in progress is
        finished and every reporter is told as at the end of the run."""
        while self.step < target:
            start = time.perf_counter()
            if self.step in self.map_refits:
                self.refit_map(self.schedule.beta(self.step))
            if self.weights["buffer"](self.step) > 0 and self.step % self.buffer_interval == 0:
                self.buffer.add_draws(
                    self.generator,
                    self.buffer_draws,
                    rng=self.rng,
                    ais_steps=self.buffer_ais_steps,
                    beta=self.schedule.beta(self.step),
                )
            state = self._train_step()
            self.step += 1
            self.elapsed += time.perf_counter() - start
            state["elapsed_s"] = self.elapsed
            state["energy_evaluations"] = self.generator.energy.evaluation_count
            state["non_finite_energies"] = self.non_finite_energies
            if stop.signum is not None:
                target = self.step
            for i, reporter in enumerate(self.reporters):
                next_report[i] -= 1
                if next_report[i] <= 0 or self.step == target:
                    reporter.report(self, state)
                    next_report[i] = reporter.describeNextReport(self)

    def state_dict(self) -> dict:
        """Everything needed to resume: model, optimiser, schedule, step, random states."""
        return {
            "model": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "rng": self.rng.get_state(),
            "data_rng": self.data_rng.get_state(),
            "walkers": None if self._walkers is None else self._walkers.state_dict(),
            "buffer": self.buffer.state_dict() if len(self.buffer) else None,
            "energy_evaluations": self.generator.energy.evaluation_count,
            "non_finite_energies": self.non_finite_energies,
        }

    @property
    def non_finite_energies(self) -> int:
        """Configurations of the run so far whose energy was not finite (weight 0)."""
        return self._non_finite_before + self.generator.energy.non_finite_total

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.rng.set_state(state["rng"])
        self.data_rng.set_state(state["data_rng"])
        walkers = state.get("walkers")
        if walkers is not None:
            self._walkers = Walkers.from_state_dict(walkers)
        if state.get("buffer") is not None:
            self.buffer = SampleBuffer.from_state_dict(state["buffer"])
        self.generator.energy.evaluation_count = int(state.get("energy_evaluations", 0))
        self._non_finite_before = int(state.get("non_finite_energies", 0)) - (
            self.generator.energy.non_finite_total
        )
