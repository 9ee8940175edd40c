r"""How far importance weights can be trusted: ESS over independent blocks, the largest weight's
share, and the Pareto k-hat of the weights' upper tail.

The ESS of self-normalised importance sampling is decided by the few largest weights: a draw
that happens to hold one sample far out in the tail has a low ESS, the next draw of the same
model a high one, and the estimates move with it. Three figures make that visible:

- ESS/N in each of ``n_blocks`` consecutive blocks of the samples (independent draws of a
  generator make independent blocks): one number per block, not one lucky number;
- the largest normalised weight, :math:`\max_i w_i / \sum_j w_j`;
- :math:`\hat k`, the shape of a generalized Pareto distribution fitted to the upper tail of the
  weights, as Pareto-smoothed importance sampling (PSIS; Vehtari, Simpson, Gelman, Yao and Gabry,
  JMLR 25, 2024) does it. Its variance is finite for :math:`k < 1/2`; PSIS's practical limit for
  a reliable estimate from S samples is :math:`\min(1 - 1/\log_{10} S,\ 0.7)`. Above it the
  estimate and its bootstrap error cannot be trusted however many samples there are.

The weights as a whole can pass while an estimate built on part of them fails: the probability
of a region is a ratio whose numerator is the sum of the weights inside it, and its convergence
is decided by the tail of those weights (PSIS checks the tail of h(x) w(x) for an expectation of
h). A model that draws a region often but badly has light-tailed weights overall and a heavy
tail inside the region, where a sample it has not yet drawn would hold much of the region's
mass. :func:`diagnose_region` fits the tails inside and outside a region apart.

The generalized Pareto fit is Zhang and Stephens' (Technometrics 51, 2009) empirical-Bayes
estimator with the weakly informative prior of the PSIS paper (no kept library here fits: the
arviz-stats release on the package index returns negative k for exact Pareto tails).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from openmm_nice.analysis.reweighting import (
    check_log_weights,
    effective_sample_size,
    normalized_weights,
)
from openmm_nice.errors import UserInputError

__all__ = [
    "WeightDiagnostics",
    "RegionDiagnostics",
    "diagnose_weights",
    "diagnose_region",
    "pareto_k",
    "pareto_k_threshold",
    "generalized_pareto_fit",
    "max_weight_share",
    "block_ess",
]

MIN_TAIL = 5
"""Fewest tail samples a k-hat is fitted on; with fewer the diagnostic is NaN (unreliable)."""


def generalized_pareto_fit(exceedances) -> tuple[float, float]:
    r"""Shape k and scale sigma of a generalized Pareto distribution fitted to exceedances.

    The posterior mean of Zhang and Stephens' profile parameter :math:`\theta` on a grid of
    :math:`30 + \lfloor\sqrt n\rfloor` points, then :math:`k = \overline{\log(1 - \theta x)}`
    (positive for heavy tails), :math:`\sigma = -k/\theta`, and k shrunk towards 1/2 by a
    prior worth 10 observations, as PSIS does.

    Arguments:
        exceedances: (n,) positive values above the tail's threshold, n >= 2.

    Returns:
        (k, sigma).

    Example:
        >>> u = np.random.default_rng(0).uniform(size=4000)
        >>> k, sigma = generalized_pareto_fit(u ** -0.5 - 1.0)  # exactly Pareto, k = 0.5
        >>> abs(k - 0.5) < 0.1
        True
    """
    x = np.sort(np.asarray(exceedances, dtype=np.float64))
    n = len(x)
    if n < 2 or not np.all(x > 0) or not np.isfinite(x).all():
        raise UserInputError("a generalized Pareto fit needs at least 2 positive, finite values")
    m = 30 + int(math.sqrt(n))
    theta = 1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    # Exceedances that span hundreds of orders of magnitude (a quartile among the subnormal
    # numbers) overflow some grid points; they carry no likelihood and are left out.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        theta = theta / (3.0 * x[int(n / 4 + 0.5) - 1]) + 1.0 / x[-1]
        k = np.log1p(-theta[:, None] * x[None, :]).mean(axis=1)
        log_lik = n * (np.log(-theta / k) - k - 1.0)
    kept = np.isfinite(log_lik)
    if not kept.any():
        return math.inf, math.nan  # no grid point has a likelihood: as heavy as a tail gets
    theta, log_lik = theta[kept], log_lik[kept]
    post = np.exp(log_lik - log_lik.max())
    post /= post.sum()
    theta_hat = float(np.sum(theta * post))
    k_hat = float(np.log1p(-theta_hat * x).mean())
    sigma = -k_hat / theta_hat
    prior = 10
    k_hat = (n * k_hat + prior * 0.5) / (n + prior)
    return k_hat, sigma


def _tail_length(n: int) -> int:
    """PSIS's tail: the min(n/5, 3 sqrt(n)) largest weights of n independent draws."""
    return int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))


def pareto_k(log_w) -> float:
    r"""The Pareto :math:`\hat k` of the weights' upper tail (NaN when it cannot be fitted).

    The largest :math:`M = \lceil\min(S/5, 3\sqrt S)\rceil` of the S positive weights, less the
    next one below them, are fitted by :func:`generalized_pareto_fit`. NaN: too few positive
    weights to fit a tail (under :data:`MIN_TAIL` in it), which is unreliable; -inf: a flat tail
    (the largest weights all equal), which is as light as a tail can be.

    Example:
        >>> u = np.random.default_rng(3).uniform(size=100000)
        >>> abs(pareto_k(-0.8 * np.log(u)) - 0.8) < 0.05  # weights u^-0.8: k = 0.8
        True
    """
    log_w = check_log_weights(log_w)
    finite = np.sort(log_w[np.isfinite(log_w)])
    m = _tail_length(len(finite))
    if m < MIN_TAIL or m >= len(finite):
        return math.nan
    tail, cut = finite[-m:], finite[-m - 1]
    top = finite[-1]
    exceedances = np.exp(tail - top) - np.exp(cut - top)
    exceedances = exceedances[exceedances > 0]
    if len(exceedances) < MIN_TAIL:
        return -math.inf  # the tail is (nearly) one value: no tail at all
    return generalized_pareto_fit(exceedances)[0]


def pareto_k_threshold(n: int) -> float:
    r"""PSIS's limit of a reliable :math:`\hat k` for n samples: :math:`\min(1 - 1/\log_{10} n,
    0.7)`.

    Example:
        >>> pareto_k_threshold(100), pareto_k_threshold(50000)
        (0.5, 0.7)
    """
    if n <= 10:
        return 0.0
    return min(1.0 - 1.0 / math.log10(n), 0.7)


def max_weight_share(log_w) -> float:
    r"""The largest normalised weight :math:`\max_i w_i / \sum_j w_j`.

    Example:
        >>> max_weight_share(np.log([1.0, 1.0, 2.0]))
        0.5
    """
    return float(normalized_weights(log_w).max())


def block_ess(log_w, n_blocks: int = 4) -> list[float]:
    r"""ESS/N of each of ``n_blocks`` consecutive, equal blocks of the samples (the last
    :math:`N \bmod n_{blocks}` samples left out); a block with no positive weight has ESS 0.

    Example:
        >>> [round(e, 6) for e in block_ess(np.log([1.0, 1.0, 1.0, 3.0]), n_blocks=2)]
        [1.0, 0.8]
    """
    log_w = check_log_weights(log_w)
    if n_blocks < 1:
        raise UserInputError(f"n_blocks must be at least 1, got {n_blocks}")
    size = len(log_w) // n_blocks
    if size < 1:
        raise UserInputError(f"{len(log_w)} samples cannot make {n_blocks} blocks")
    out = []
    for b in range(n_blocks):
        block = log_w[b * size : (b + 1) * size]
        positive = np.isfinite(block).any()
        out.append(effective_sample_size(block) / size if positive else 0.0)
    return out


@dataclass(frozen=True)
class WeightDiagnostics:
    """How far a set of importance weights can be trusted.

    Attributes:
        n: Samples.
        n_zero_weight: Samples of weight 0 (infinite or NaN energies, log w = -inf).
        ess: Kish's ESS over N, on all samples.
        block_ess: ESS/N of each consecutive block (:func:`block_ess`).
        max_weight_share: The largest normalised weight.
        pareto_k: :func:`pareto_k` (NaN: too few samples to fit a tail).
        pareto_k_threshold: :func:`pareto_k_threshold` of the positive weights' count.
        reliable: ``pareto_k`` is not NaN and at most the threshold.
        verdict: One line saying so, with the reason.
    """

    n: int
    n_zero_weight: int
    ess: float
    block_ess: tuple[float, ...]
    max_weight_share: float
    pareto_k: float
    pareto_k_threshold: float
    reliable: bool
    verdict: str

    def as_dict(self) -> dict:
        """The figures as a JSON-ready dict (``block_ess`` a list)."""
        d = asdict(self)
        d["block_ess"] = list(self.block_ess)
        return d

    def caption(self) -> str:
        """A short line for a figure: ESS/N, blocks, largest weight, k-hat."""
        blocks = ", ".join(f"{e:.3g}" for e in self.block_ess)
        return (
            f"N = {self.n:,}, ESS/N {self.ess:.3g} (blocks {blocks}), largest weight "
            f"{self.max_weight_share:.2g}, Pareto k {self.pareto_k:.2f}"
            + ("" if self.reliable else " UNRELIABLE")
        )


def diagnose_weights(log_w, n_blocks: int = 4) -> WeightDiagnostics:
    r"""ESS/N overall and in blocks, the largest weight's share and the tail's Pareto
    :math:`\hat k`, with a verdict.

    The weights are unreliable where :math:`\hat k` exceeds :func:`pareto_k_threshold` (the
    weights' tail is too heavy for the estimate or its error bar to be trusted) or cannot be
    fitted (too few positive weights).

    Arguments:
        log_w: (N,) importance log-weights; -inf for samples of weight 0.
        n_blocks: Blocks for the block ESS (fewer when N is smaller).

    Returns:
        A :class:`WeightDiagnostics`.

    Example:
        >>> d = diagnose_weights(np.random.default_rng(0).normal(scale=0.3, size=4000))
        >>> d.reliable, round(d.ess, 2), len(d.block_ess)
        (True, 0.91, 4)
    """
    log_w = check_log_weights(log_w)
    n = len(log_w)
    positive = np.isfinite(log_w)
    w = normalized_weights(log_w)
    k = pareto_k(log_w)
    threshold = pareto_k_threshold(int(positive.sum()))
    if math.isnan(k):
        reliable = False
        verdict = (
            f"unreliable: {int(positive.sum())} samples of positive weight are too few to "
            "judge the weights' tail; draw more samples"
        )
    elif k > threshold:
        reliable = False
        verdict = (
            f"unreliable: the weights' tail is too heavy (Pareto k {k:.2f} > {threshold:.2f}); "
            "estimates and their error bars may be far off: train the model further or "
            "sample with AIS (--ais-steps)"
        )
    else:
        reliable = True
        verdict = f"reliable: Pareto k {k:.2f} <= {threshold:.2f}"
    return WeightDiagnostics(
        n=n,
        n_zero_weight=int(n - positive.sum()),
        ess=float(1.0 / np.sum(w**2) / n),
        block_ess=tuple(block_ess(log_w, min(n_blocks, n))),
        max_weight_share=float(w.max()),
        pareto_k=k,
        pareto_k_threshold=threshold,
        reliable=reliable,
        verdict=verdict,
    )


@dataclass(frozen=True)
class RegionDiagnostics:
    """How far the importance-sampled probability of a region (and its free energy against the
    rest) can be trusted: the tails of the weights inside and outside it, each fitted apart.

    Attributes:
        n_inside: Samples of positive weight inside the region.
        n_outside: Samples of positive weight outside it.
        ess_inside: Kish's effective sample size of the weights inside the region (0 where
            none is positive): how many independent samples its probability rests on, where
            ``n_inside`` counts what the generator drew there.
        ess_outside: The same outside.
        pareto_k_inside: :func:`pareto_k` of the weights inside (NaN: too few to fit).
        pareto_k_outside: The same outside.
        pareto_k_threshold: :func:`pareto_k_threshold` of the smaller of the two counts.
        reliable: Both tails fitted and at most the threshold, and the weights as a whole
            reliable (:func:`diagnose_weights`).
        verdict: One line saying so, with the reason.
    """

    n_inside: int
    n_outside: int
    ess_inside: float
    ess_outside: float
    pareto_k_inside: float
    pareto_k_outside: float
    pareto_k_threshold: float
    reliable: bool
    verdict: str

    def as_dict(self) -> dict:
        return asdict(self)


def diagnose_region(log_w, inside, weights: WeightDiagnostics | None = None) -> RegionDiagnostics:
    r"""The tail diagnostic of a region's importance-sampled probability: :math:`\hat k` of the
    weights inside the region and outside it, each against PSIS's limit.

    :math:`P = \sum_{in} w / \sum w` and :math:`\Delta F = -\log(P / (1 - P))` converge as the
    slower of the two sums does, so both tails must be light; and the weights as a whole must
    pass :func:`diagnose_weights`.

    Arguments:
        log_w: (N,) importance log-weights; -inf for samples of weight 0.
        inside: (N,) booleans, True in the region.
        weights: The weights' own diagnostics, if already computed.

    Returns:
        A :class:`RegionDiagnostics`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> inside = rng.uniform(size=20000) < 0.3
        >>> light = rng.normal(scale=0.3, size=20000)
        >>> diagnose_region(light, inside).reliable
        True
        >>> heavy = np.where(inside, -1.2 * np.log(rng.uniform(size=20000)), light)
        >>> d = diagnose_region(heavy, inside)  # weights u^-1.2 inside the region: k = 1.2
        >>> d.reliable, d.pareto_k_inside > 1.0
        (False, True)
    """
    log_w = check_log_weights(log_w)
    inside = np.asarray(inside, dtype=bool)
    if inside.shape != log_w.shape:
        raise UserInputError(
            f"the region has {inside.shape} entries for {log_w.shape} weights; give one boolean "
            "per sample"
        )
    weights = diagnose_weights(log_w) if weights is None else weights
    positive = np.isfinite(log_w)
    n_in, n_out = int((positive & inside).sum()), int((positive & ~inside).sum())
    ess_in = effective_sample_size(log_w[inside]) if n_in else 0.0
    ess_out = effective_sample_size(log_w[~inside]) if n_out else 0.0
    k_in = pareto_k(log_w[inside]) if n_in else math.nan
    k_out = pareto_k(log_w[~inside]) if n_out else math.nan
    threshold = pareto_k_threshold(min(n_in, n_out))
    sides = {"inside": k_in, "outside": k_out}
    unfit = [side for side, k in sides.items() if math.isnan(k)]
    heavy = [side for side, k in sides.items() if k > threshold]
    if not weights.reliable:
        verdict = f"unreliable: the weights as a whole fail ({weights.verdict})"
    elif unfit:
        verdict = (
            f"unreliable: too few samples of positive weight {' and '.join(unfit)} the region "
            f"({n_in} inside, {n_out} outside) to judge the tail; draw more samples"
        )
    elif heavy:
        ks = ", ".join(f"{side} {sides[side]:.2f}" for side in heavy)
        verdict = (
            f"unreliable: the weights' tail {' and '.join(heavy)} the region is too heavy "
            f"(Pareto k {ks} > {threshold:.2f}); a few samples decide its probability, and a "
            "draw that misses them is off by more than its error bar"
        )
    else:
        verdict = f"reliable: Pareto k inside {k_in:.2f}, outside {k_out:.2f} <= {threshold:.2f}"
    return RegionDiagnostics(
        n_inside=n_in,
        n_outside=n_out,
        ess_inside=ess_in,
        ess_outside=ess_out,
        pareto_k_inside=k_in,
        pareto_k_outside=k_out,
        pareto_k_threshold=threshold,
        reliable=verdict.startswith("reliable"),
        verdict=verdict,
    )
