"""Importance-sampling estimates: ESS, log Z, expectations and free-energy profiles."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from openmm_nice.errors import UserInputError

__all__ = [
    "effective_sample_size",
    "log_partition_function",
    "bootstrap",
    "bootstrap_error",
    "expectation",
    "probability",
    "free_energy_profile",
    "FreeEnergyProfile",
    "normalized_weights",
]


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _check_log_w(log_w) -> np.ndarray:
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
    log_w = _check_log_w(log_w)
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
    :class:`~openmm_nice.generator.BoltzmannGenerator` it estimates the target's log Z.
    """
    log_w = _check_log_w(log_w)
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
    n_bootstrap: int = 200,
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


def bootstrap_error(
    statistic: Callable[..., float], *arrays, n_bootstrap: int = 200, seed: int = 0
) -> float:
    """Standard error of ``statistic(*arrays)`` from resampling rows with replacement."""
    arrays = tuple(_as_numpy(a) for a in arrays)

    def on_resample(i: np.ndarray) -> float:
        try:
            return statistic(*(a[i] for a in arrays))
        except ValueError:
            return math.nan  # a resample with no positive weight carries no estimate

    values = np.array(bootstrap(on_resample, len(arrays[0]), n_bootstrap, seed=seed))
    values = values[~np.isnan(values)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def expectation(values, log_w=None) -> tuple[float, float]:
    r"""Self-normalised estimate of :math:`\langle f \rangle_\mu` and its standard error.

    Without ``log_w`` the samples are used directly (mean and standard error of the mean).
    With weights the error is the delta-method one,
    :math:`\sqrt{\sum_i \bar w_i^2 (f_i - \hat f)^2}`.

    Arguments:
        values: f(x_i), shape (N,).
        log_w: Importance log-weights, shape (N,), or None for direct sampling.
    """
    f = _as_numpy(values)
    if log_w is None:
        return float(f.mean()), float(f.std(ddof=1) / math.sqrt(len(f))) if len(f) > 1 else math.nan
    w = normalized_weights(log_w)
    if f.shape != w.shape:
        raise UserInputError(f"values {f.shape} and log-weights {w.shape} must have the same shape")
    keep = w > 0
    mean = float(np.sum(w[keep] * f[keep]))
    return mean, float(np.sqrt(np.sum(w[keep] ** 2 * (f[keep] - mean) ** 2)))


def probability(mask, log_w=None) -> tuple[float, float]:
    """Probability of a region given by a boolean mask over samples, and its standard error."""
    return expectation(_as_numpy(mask).astype(np.float64), log_w)


@dataclass
class FreeEnergyProfile:
    """A free-energy profile F(s) in kT, shifted to minimum 0, with bootstrap errors."""

    centers: np.ndarray
    free_energy: np.ndarray
    error: np.ndarray

    def to_csv(self, path, header: str = "s") -> None:
        from openmm_nice.io import atomic_write_text

        rows = [f"{header},free_energy_kT,error_kT"]
        rows += [
            f"{c:.8g},{f:.8g},{e:.8g}"
            for c, f, e in zip(self.centers, self.free_energy, self.error)
        ]
        atomic_write_text(path, "\n".join(rows) + "\n")


def _profile(s: np.ndarray, w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    hist, _ = np.histogram(s, bins=edges, weights=w)
    density = hist / (hist.sum() * np.diff(edges))
    with np.errstate(divide="ignore"):
        return -np.log(density)


def free_energy_profile(
    s,
    log_w=None,
    bins: int = 50,
    range: tuple[float, float] | None = None,
    n_bootstrap: int = 100,
    seed: int = 0,
) -> FreeEnergyProfile:
    r"""F(s) = -log p(s) along a coordinate, direct or importance-sampled.

    Arguments:
        s: The coordinate of each sample, shape (N,).
        log_w: Importance log-weights (N,), or None for the direct histogram.
        bins: Number of histogram bins.
        range: (lo, hi) of the histogram; default the samples' range.
        n_bootstrap: Resamples for the error bars.

    Returns:
        A :class:`FreeEnergyProfile`; empty bins have F = +inf.
    """
    s = _as_numpy(s)
    w = np.ones_like(s) if log_w is None else normalized_weights(log_w)
    if s.shape != w.shape:
        raise UserInputError(
            f"coordinate {s.shape} and log-weights {w.shape} must have the same shape"
        )
    lo, hi = (float(s.min()), float(s.max())) if range is None else range
    edges = np.linspace(lo, hi, bins + 1)
    f = _profile(s, w, edges)
    shift = np.min(f[np.isfinite(f)]) if np.isfinite(f).any() else 0.0

    def resampled(i: np.ndarray) -> np.ndarray | None:
        return _profile(s[i], w[i], edges) if w[i].sum() > 0 else None

    boots = [b for b in bootstrap(resampled, len(s), n_bootstrap, seed=seed) if b is not None]
    boots = np.array(boots) - shift
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(boots)
        err = np.array(
            [
                np.std(col[ok], ddof=1) if ok.sum() > 1 else np.nan
                for col, ok in zip(boots.T, finite.T)
            ]
        )
    return FreeEnergyProfile(0.5 * (edges[1:] + edges[:-1]), f - shift, err)
