r"""Importance-sampling estimators: ESS, log Z, means, populations, with one error policy.

Every estimate takes log-weights (None for direct, unweighted samples) and gets its error the
same way: the spread of its values on (block) bootstrap resamples of the samples, see
:func:`bootstrap` and :func:`bootstrap_spread`. Blocks of consecutive samples
(``block_size`` > 1) are for correlated frames such as MD; independent samples of a generator
take ``block_size`` 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from openmm_nice.errors import UserInputError

__all__ = [
    "Estimate",
    "N_BOOTSTRAP",
    "check_log_weights",
    "effective_sample_size",
    "log_partition_function",
    "normalized_weights",
    "sample_weights",
    "bootstrap",
    "bootstrap_spread",
    "bootstrap_error",
    "expectation",
    "probability",
    "region_free_energy",
]


N_BOOTSTRAP = 200
"""Bootstrap resamples of every error bar the package gives, unless a caller asks otherwise."""


class Estimate(NamedTuple):
    """An estimate and its bootstrap error; unpacks as ``value, error``."""

    value: float
    error: float


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def check_log_weights(log_w) -> np.ndarray:
    """Log-weights as a float64 array, refused (naming the problem) unless 1-D, non-empty, free
    of NaN and +inf, and with at least one positive weight."""
    log_w = _as_numpy(log_w)
    if log_w.ndim != 1 or log_w.size == 0:
        raise UserInputError(f"log-weights must be a non-empty 1-D array, got shape {log_w.shape}")
    if np.isnan(log_w).any() or np.isposinf(log_w).any():
        raise UserInputError("log-weights contain NaN or +inf; weights of bad samples must be -inf")
    if not np.isfinite(log_w).any():
        raise UserInputError("every log-weight is -inf: no sample has positive weight")
    return log_w


def normalized_weights(log_w) -> np.ndarray:
    """Self-normalised weights w_i / sum_j w_j, computed stably from log w."""
    log_w = check_log_weights(log_w)
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


def effective_sample_size(log_w) -> float:
    r"""Kish's effective sample size :math:`(\sum w)^2 / \sum w^2` (divide by N for ESS/N).

    Example:
        >>> effective_sample_size(np.zeros(100))
        100.0
    """
    w = normalized_weights(log_w)
    return float(1.0 / np.sum(w**2))


def log_partition_function(log_w) -> float:
    r"""The importance estimate :math:`\log \hat Z = \log \frac1N \sum_i w_i`.

    Unbiased for Z itself (not for log Z); with log w as in
    :class:`~openmm_nice.flows.generator.BoltzmannGenerator` it estimates the target's log Z.
    """
    log_w = check_log_weights(log_w)
    m = log_w.max()
    return float(m + math.log(np.mean(np.exp(log_w - m))))


def _resample(n: int, block_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of one (block) bootstrap resample of n consecutive frames."""
    if block_size <= 1:
        return rng.integers(0, n, n)
    n_blocks = max(1, n // block_size)
    starts = np.arange(n_blocks) * block_size
    lengths = np.diff(np.append(starts, n))  # the last block takes the remainder
    chosen = rng.integers(0, n_blocks, n_blocks)
    return np.concatenate([np.arange(starts[b], starts[b] + lengths[b]) for b in chosen])


def bootstrap(
    statistic: Callable[[np.ndarray], Any],
    n: int,
    n_bootstrap: int = N_BOOTSTRAP,
    block_size: int = 1,
    seed: int = 0,
) -> list:
    """Values of ``statistic(indices)`` on bootstrap resamples of n samples.

    With ``block_size`` > 1 whole blocks of consecutive samples are resampled (the
    non-overlapping block bootstrap), as correlated MD frames need; 1 is the ordinary
    bootstrap of independent samples.

    Example:
        >>> x = np.arange(10.0)
        >>> len(bootstrap(lambda i: x[i].mean(), len(x), n_bootstrap=5, block_size=2))
        5
    """
    if block_size < 1:
        raise UserInputError(f"block_size must be at least 1, got {block_size}")
    if n_bootstrap < 2:
        raise UserInputError(f"n_bootstrap must be at least 2 for an error bar, got {n_bootstrap}")
    if n < 2 * block_size:
        raise UserInputError(
            f"{n} samples make fewer than 2 blocks of {block_size}; a bootstrap needs more "
            "samples or a smaller block size (--block-size)"
        )
    rng = np.random.default_rng(seed)
    return [statistic(_resample(n, block_size, rng)) for _ in range(n_bootstrap)]


def bootstrap_spread(replicates, axis: int = 0) -> np.ndarray | float:
    """The error of an estimate from its bootstrap replicates.

    Where every replicate is finite: their standard deviation. A replicate that is not finite
    (a resample that misses a rare region entirely puts an infinite free energy in it, and NaN
    marks one on which the estimate failed) is not dropped, which would shrink the error exactly
    where the region is rare: the error is then the half-width of the replicates' central 68%
    interval, in which a non-finite replicate ranks beyond every finite one. Where over 16% of
    the replicates are not finite, or fewer than 2 are finite, that interval is unbounded and
    the error inf.

    Arguments:
        replicates: The replicates along ``axis`` (one estimate, or an array of them).

    Returns:
        A float for 1-D replicates, else an array without ``axis``.

    Example:
        >>> float(bootstrap_spread([1.0, 3.0]))
        1.4142135623730951
        >>> float(bootstrap_spread([1.0, 3.0, np.inf]))
        inf
        >>> float(bootstrap_spread(list(range(20)) + [np.inf]))  # 1 of 21: ranked, not dropped
        7.0
    """
    values = np.moveaxis(np.asarray(replicates, dtype=np.float64), axis, 0)
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    safe = np.where(finite, values, 0.0)
    mean = safe.sum(axis=0) / np.maximum(count, 1)
    squares = np.where(finite, values - mean, 0.0) ** 2
    spread = np.sqrt(squares.sum(axis=0) / np.maximum(count - 1, 1))
    if not finite.all():
        ranked = np.where(np.isnan(values), np.inf, values)  # a failed replicate: unbounded
        low, high = np.percentile(ranked, [16, 84], axis=0, method="nearest")
        with np.errstate(invalid="ignore"):
            interval = np.where(np.isfinite(low) & np.isfinite(high), (high - low) / 2, np.inf)
        spread = np.where(count == len(values), spread, interval)
    spread = np.where((count >= (1 - 0.16) * len(values)) & (count >= 2), spread, np.inf)
    return float(spread) if spread.ndim == 0 else spread


def bootstrap_error(
    statistic: Callable[..., float],
    *arrays,
    n_bootstrap: int = N_BOOTSTRAP,
    block_size: int = 1,
    seed: int = 0,
) -> float:
    """The bootstrap error (:func:`bootstrap_spread`) of ``statistic(*arrays)``, resampling
    the arrays' rows together; a resample on which the statistic raises ``ValueError`` (e.g. one
    with no positive weight) counts as not finite.

    Example:
        >>> x = np.random.default_rng(0).normal(size=1000)
        >>> 0.025 < bootstrap_error(np.mean, x) < 0.04  # 1/sqrt(1000) = 0.032
        True
    """
    arrays = tuple(_as_numpy(a) for a in arrays)

    def on_resample(i: np.ndarray) -> float:
        try:
            return statistic(*(a[i] for a in arrays))
        except ValueError:
            return math.nan

    return bootstrap_spread(bootstrap(on_resample, len(arrays[0]), n_bootstrap, block_size, seed))


def sample_weights(log_w, n: int) -> np.ndarray:
    """Self-normalised weights of n samples (:func:`normalized_weights`), or uniform ones, 1/n,
    for direct samples (``log_w`` None).

    Example:
        >>> sample_weights(None, 4).tolist(), sample_weights(np.log([1.0, 3.0]), 2).tolist()
        ([0.25, 0.25, 0.25, 0.25], [0.25, 0.75])
    """
    w = np.full(n, 1.0 / n) if log_w is None else normalized_weights(log_w)
    if w.shape != (n,):
        raise UserInputError(
            f"values of shape ({n},) and log-weights of shape {w.shape} must have the same shape"
        )
    return w


def _weighted_mean(f: np.ndarray, w: np.ndarray, i: np.ndarray) -> float:
    total = w[i].sum()
    return float(np.sum(w[i] * f[i]) / total) if total > 0 else math.nan


def _wrap(angle):
    """Angles wrapped onto [-pi, pi)."""
    return (np.asarray(angle) + math.pi) % (2.0 * math.pi) - math.pi


def expectation(
    values,
    log_w=None,
    *,
    circular: bool = False,
    n_bootstrap: int = N_BOOTSTRAP,
    block_size: int = 1,
    seed: int = 0,
) -> Estimate:
    r"""The (self-normalised, weighted) mean :math:`\langle f \rangle` with its bootstrap error.

    For a periodic quantity (``circular=True``, radians) the mean is the circular one,
    :math:`\operatorname{atan2}(\langle\sin\rangle, \langle\cos\rangle)`, and its error the spread
    of the replicates' wrapped differences from it: an arithmetic mean of dihedrals near
    :math:`\pm\pi` would land near 0, where no sample is.

    Arguments:
        values: f(x_i), shape (N,).
        log_w: Importance log-weights (N,), or None for direct (unweighted) samples.
        circular: f is an angle in radians.
        n_bootstrap: Resamples for the error (0: no error, NaN).
        block_size: Consecutive samples per bootstrap block (see :func:`bootstrap`).
        seed: Seed of the resamples.

    Returns:
        An :class:`Estimate` (value, error).

    Example:
        >>> expectation(np.array([1.0, 2.0, 3.0]), np.log([1.0, 1.0, 2.0]), n_bootstrap=0)
        Estimate(value=2.25, error=nan)
        >>> round(abs(expectation([3.1, -3.1], circular=True, n_bootstrap=0).value), 3)
        3.142
    """
    f = _as_numpy(values)
    if f.ndim != 1:
        raise UserInputError(f"values must have shape (N,), got {f.shape}")
    w = sample_weights(log_w, len(f))
    if circular:
        s, c = np.sin(f), np.cos(f)

        def mean(i: np.ndarray) -> float:
            return float(np.arctan2(np.sum(w[i] * s[i]), np.sum(w[i] * c[i])))

        value = mean(np.arange(len(f)))
        if not n_bootstrap:
            return Estimate(value, math.nan)
        replicates = bootstrap(mean, len(f), n_bootstrap, block_size, seed)
        return Estimate(value, bootstrap_spread(_wrap(np.array(replicates) - value)))
    value = _weighted_mean(f, w, np.arange(len(f)))
    if not n_bootstrap:
        return Estimate(value, math.nan)
    replicates = bootstrap(lambda i: _weighted_mean(f, w, i), len(f), n_bootstrap, block_size, seed)
    return Estimate(value, bootstrap_spread(replicates))


def probability(
    inside, log_w=None, *, n_bootstrap: int = N_BOOTSTRAP, block_size: int = 1, seed: int = 0
) -> Estimate:
    """The probability of a region given by a boolean mask over the samples, with its error:
    the :func:`expectation` of the region's indicator.

    Example:
        >>> probability(np.arange(8) < 2, n_bootstrap=0)
        Estimate(value=0.25, error=nan)
    """
    indicator = _as_numpy(np.asarray(inside, dtype=bool))
    return expectation(indicator, log_w, n_bootstrap=n_bootstrap, block_size=block_size, seed=seed)


def region_free_energy(
    inside,
    log_w=None,
    n_bootstrap: int = N_BOOTSTRAP,
    block_size: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    r"""Population p of a region and its free energy relative to the rest, with errors.

    :math:`\Delta F = F_{in} - F_{out} = -\log \frac{p}{1 - p}` in kT. p and its error are
    :func:`probability`'s; the error of :math:`\Delta F` is the spread of the same bootstrap
    replicates taken through the log, so it holds where p is small and a linearisation does not.

    Arguments:
        inside: Boolean mask (N,) of the samples in the region.
        log_w: Importance log-weights (N,), or None for direct (unweighted) samples.
        n_bootstrap: Bootstrap resamples (0: no errors, NaN).
        block_size: Consecutive samples per bootstrap block (see :func:`bootstrap`).
        seed: Seed of the resamples.

    Returns:
        ``{"p", "p_error", "df_kT", "df_error_kT"}``; ``df_kT`` is inf when no sample is in the
        region (and -inf when all are), and its error then inf.

    Example:
        >>> r = region_free_energy(np.arange(100) < 20, n_bootstrap=50)
        >>> round(r["p"], 12), round(r["df_kT"], 6) == round(-math.log(0.2 / 0.8), 6)
        (0.2, True)
    """
    f = _as_numpy(np.asarray(inside, dtype=bool))
    w = sample_weights(log_w, len(f))
    p = _weighted_mean(f, w, np.arange(len(f)))
    value = -math.log(p / (1.0 - p)) if 0.0 < p < 1.0 else (math.inf if p == 0 else -math.inf)
    if not n_bootstrap:
        return {"p": p, "p_error": math.nan, "df_kT": value, "df_error_kT": math.nan}
    replicates = np.array(
        bootstrap(lambda i: _weighted_mean(f, w, i), len(f), n_bootstrap, block_size, seed)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        df = -np.log(replicates / (1.0 - replicates))
    return {
        "p": p,
        "p_error": bootstrap_spread(replicates),
        "df_kT": value,
        "df_error_kT": bootstrap_spread(df) if math.isfinite(value) else math.inf,
    }
