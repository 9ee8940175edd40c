r"""The Metropolis-adjusted Langevin (MALA) kernel, shared by every Markov chain of the package.

A batch of chains (rows) on a density :math:`\pi`: the proposal
:math:`x' = x + \epsilon \nabla \log \pi(x) + \sqrt{2\epsilon}\,\xi` is accepted with the
Metropolis-Hastings ratio, so that :math:`\pi` is left invariant exactly; its step size
:math:`\epsilon` adapts towards an acceptance of 0.574, the optimum in high dimension (Roberts and
Rosenthal, 1998). The walkers of training (:mod:`openmm_nice.training.walkers`, on :math:`\beta U` in the
target's coordinates) and latent-space AIS (:mod:`openmm_nice.sampling.ais`, on the annealed latent
density) run this one kernel with this one adaptation rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "TARGET_ACCEPTANCE",
    "adapt_step_size",
    "mala_proposal_log_ratio",
    "mala_step",
]

TARGET_ACCEPTANCE = 0.574  # optimal for MALA in high dimension (Roberts and Rosenthal, 1998)

# log(step) moves by ADAPTATION_GAIN * (acceptance - TARGET_ACCEPTANCE) per adaptation
ADAPTATION_GAIN = 1.0

# evaluate(x) -> (log pi(x), its gradient in x, other per-chain tensors to carry along)
Evaluate = Callable[[Tensor], tuple[Tensor, Tensor, Sequence[Tensor]]]


def mala_proposal_log_ratio(
    x: Tensor, x_new: Tensor, drift: Tensor, drift_new: Tensor, step: float
) -> Tensor:
    r""":math:`\log q(x | x') - \log q(x' | x)` of the MALA proposal
    :math:`q(x'|x) = \mathcal N(x + \epsilon \nabla\log\pi(x), 2\epsilon I)`, with ``drift`` the
    gradient of log pi at x and ``drift_new`` at x' (rows are chains)."""
    forward = ((x_new - x - step * drift) ** 2).sum(-1)
    backward = ((x - x_new - step * drift_new) ** 2).sum(-1)
    return (forward - backward) / (4 * step)


def adapt_step_size(step: float, acceptance: float) -> float:
    """The step size after a move with mean ``acceptance``: Robbins-Monro on log(step), towards
    :data:`TARGET_ACCEPTANCE`."""
    return step * math.exp(ADAPTATION_GAIN * (acceptance - TARGET_ACCEPTANCE))


def mala_step(
    x: Tensor,
    log_pi: Tensor,
    grad: Tensor,
    evaluate: Evaluate,
    step: float,
    rng: torch.Generator | None = None,
    *,
    carried: Sequence[Tensor] = (),
    precision: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
    r"""One MALA move of every chain, invariant for :math:`\pi`.

    Arguments:
        x: Current states (chains, dim).
        log_pi: :math:`\log \pi(x)` up to a constant (chains,); -inf or nan where undefined.
        grad: :math:`\nabla \log \pi(x)` (chains, dim), finite.
        evaluate: ``evaluate(x')`` returns :math:`\log \pi(x')`, its gradient and the other
            per-chain tensors (e.g. energies) that follow the chains; non-finite log pi or
            gradient means the proposal is refused.
        step: Step size :math:`\epsilon`.
        rng: Random generator of the noise and of the acceptance.
        carried: The current values of those other tensors (same order as ``evaluate``'s).
        precision: Round each proposal to this dtype before it is evaluated (the precision of
            the model that evaluates it), so that the ratio is the one of the point evaluated.

    Returns:
        ``(x, log_pi, grad, carried, accepted)`` after the move; ``accepted`` is a bool mask.
    """
    noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=rng)
    proposal = x + step * grad + math.sqrt(2 * step) * noise
    if precision is not None:
        proposal = proposal.to(precision).to(x.dtype)
    log_pi_new, grad_new, carried_new = evaluate(proposal)
    grad_new = grad_new.to(x.dtype)
    with torch.no_grad():
        log_ratio = (log_pi_new - log_pi).to(x.dtype) + mala_proposal_log_ratio(
            x, proposal, grad, grad_new, step
        )
        uniform = torch.rand(len(x), dtype=x.dtype, device=x.device, generator=rng)
        defined = torch.isfinite(log_pi_new) & torch.isfinite(grad_new).all(-1)
        # a chain whose own state is undefined takes any defined proposal
        accept = defined & (~torch.isfinite(log_pi) | (uniform.log() < log_ratio))

        def pick(new: Tensor, old: Tensor) -> Tensor:
            mask = accept.reshape(-1, *([1] * (new.dim() - 1)))
            return torch.where(mask, new.to(old.dtype), old)

        return (
            pick(proposal, x),
            pick(log_pi_new, log_pi),
            pick(grad_new, grad),
            [pick(new, old) for new, old in zip(carried_new, carried, strict=True)],
            accept,
        )
