r"""Free energies from histograms of weighted samples: profiles F(s), maps F(a, b), divergences.

One estimator serves both: :math:`F = -\log p` of the (importance-weighted) histogram, shifted
to minimum 0, each bin's error the :func:`~openmm_nice.analysis.reweighting.bootstrap_spread` of its
value over (block) bootstrap resamples, with the shift held fixed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from openmm_nice.analysis.reweighting import (
    N_BOOTSTRAP,
    bootstrap,
    bootstrap_spread,
    sample_weights,
)
from openmm_nice.errors import UserInputError
from openmm_nice.io import atomic_write_text

__all__ = [
    "RAMACHANDRAN_BINS",
    "FreeEnergyProfile",
    "FreeEnergyMap",
    "free_energy_profile",
    "free_energy_map",
    "jensen_shannon_divergence",
]

RAMACHANDRAN_BINS = 36
"""Bins per axis of the Ramachandran maps the commands write (10 degrees each)."""


def _histogram_free_energy(
    coordinates: list[np.ndarray],
    w: np.ndarray,
    edges: list[np.ndarray],
    n_bootstrap: int,
    block_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probability of each bin, F = -log p - min, bootstrap error of F) of weighted samples."""
    sample = np.stack(coordinates, axis=1)

    def histogram(i: np.ndarray) -> np.ndarray:
        counts, _ = np.histogramdd(sample[i], bins=edges, weights=w[i])
        total = counts.sum()
        return counts / total if total > 0 else np.full(counts.shape, np.nan)

    p = histogram(np.arange(len(sample)))
    if np.isnan(p).any():
        raise UserInputError(
            "no sample with positive weight lies inside the histogram's range; widen the range"
        )
    with np.errstate(divide="ignore"):
        f = -np.log(p)
    shift = np.min(f[np.isfinite(f)])
    error = np.full(p.shape, np.nan)
    if n_bootstrap:

        def free_energy(i: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore", invalid="ignore"):
                return -np.log(histogram(i)) - shift

        error = bootstrap_spread(bootstrap(free_energy, len(sample), n_bootstrap, block_size, seed))
    return p, f - shift, error


@dataclass
class FreeEnergyProfile:
    """A free-energy profile F(s) in kT, shifted to minimum 0, with bootstrap errors.

    Attributes:
        centers: (bins,) bin centres.
        free_energy: (bins,) F of each bin; +inf where a bin is empty.
        error: (bins,) bootstrap error of ``free_energy`` (inf where over a tenth of the
            resamples leave the bin empty; NaN without a bootstrap).
    """

    centers: np.ndarray
    free_energy: np.ndarray
    error: np.ndarray

    def to_csv(self, path: str | os.PathLike, header: str = "s") -> None:
        """One row per bin: centre, F (kT), error (kT)."""
        rows = [f"{header},free_energy_kT,error_kT"]
        rows += [
            f"{c:.8g},{f:.8g},{e:.8g}"
            for c, f, e in zip(self.centers, self.free_energy, self.error)
        ]
        atomic_write_text(path, "\n".join(rows) + "\n")


def free_energy_profile(
    s,
    log_w=None,
    bins: int = 50,
    range: tuple[float, float] | None = None,
    n_bootstrap: int = N_BOOTSTRAP,
    block_size: int = 1,
    seed: int = 0,
) -> FreeEnergyProfile:
    r"""F(s) = -log p(s) along a coordinate, direct or importance-sampled.

    Arguments:
        s: The coordinate of each sample, shape (N,).
        log_w: Importance log-weights (N,), or None for the direct histogram.
        bins: Number of histogram bins.
        range: (lo, hi) of the histogram; default the samples' range.
        n_bootstrap: Resamples for the error bars (0: none).
        block_size: Consecutive samples per bootstrap block (see
            :func:`~openmm_nice.analysis.reweighting.bootstrap`).
        seed: Seed of the resamples.

    Returns:
        A :class:`FreeEnergyProfile`.

    Example:
        >>> p = free_energy_profile(np.array([0.1, 0.2, 0.9]), bins=2, range=(0, 1), n_bootstrap=0)
        >>> p.centers.tolist(), round(float(p.free_energy[1]), 6) == round(math.log(2), 6)
        ([0.25, 0.75], True)
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1:
        raise UserInputError(f"the coordinate must have shape (N,), got {s.shape}")
    if bins < 1:
        raise UserInputError(f"bins must be at least 1, got {bins}")
    w = sample_weights(log_w, len(s))
    lo, hi = (float(s.min()), float(s.max())) if range is None else range
    edges = np.linspace(lo, hi, bins + 1)
    _, f, error = _histogram_free_energy([s], w, [edges], n_bootstrap, block_size, seed)
    return FreeEnergyProfile(0.5 * (edges[1:] + edges[:-1]), f, error)


@dataclass
class FreeEnergyMap:
    """A 2-D free-energy map on [-pi, pi]^2 in kT, shifted to minimum 0.

    Attributes:
        edges: (bins + 1,) bin edges in radians, the same along both axes.
        probability: (bins, bins) probability of each bin, [i, j] for a in bin i, b in bin j.
        free_energy: (bins, bins) -log probability, minimum 0; +inf where a bin is empty.
        error: (bins, bins) bootstrap error of ``free_energy`` (inf where over a tenth of the
            resamples leave the bin empty; NaN without a bootstrap).
    """

    edges: np.ndarray
    probability: np.ndarray
    free_energy: np.ndarray
    error: np.ndarray

    @property
    def centers(self) -> np.ndarray:
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    def to_csv(
        self, path: str | os.PathLike, names: tuple[str, str] = ("phi_rad", "psi_rad")
    ) -> None:
        """One row per bin: centre along a, centre along b, probability, F (kT), error (kT)."""
        c = self.centers
        rows = [f"{names[0]},{names[1]},probability,free_energy_kT,error_kT"]
        rows += [
            f"{c[i]:.6f},{c[j]:.6f},{self.probability[i, j]:.8g},"
            f"{self.free_energy[i, j]:.6g},{self.error[i, j]:.4g}"
            for i in range(len(c))
            for j in range(len(c))
        ]
        atomic_write_text(path, "\n".join(rows) + "\n")


def free_energy_map(
    a,
    b,
    log_w=None,
    bins: int = RAMACHANDRAN_BINS,
    n_bootstrap: int = N_BOOTSTRAP,
    block_size: int = 1,
    seed: int = 0,
) -> FreeEnergyMap:
    r"""The free-energy map :math:`F(a, b) = -\log p(a, b)` of two angles, direct or weighted.

    Arguments:
        a, b: Angles in radians in [-pi, pi], shape (N,) (e.g. phi and psi).
        log_w: Importance log-weights (N,), or None for the direct histogram.
        bins: Bins per axis on [-pi, pi].
        n_bootstrap: Resamples for the error of each bin (0: no errors).
        block_size: Consecutive samples per bootstrap block (see
            :func:`~openmm_nice.analysis.reweighting.bootstrap`).
        seed: Seed of the resamples.

    Example:
        >>> m = free_energy_map(np.array([-3.0, -3.0, 0.1]), np.array([0.1, 0.1, 0.1]), bins=2)
        >>> m.probability.tolist()
        [[0.0, 0.6666666666666666], [0.0, 0.3333333333333333]]
        >>> round(float(m.free_energy[1, 1]), 6) == round(math.log(2), 6)
        True
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise UserInputError(
            f"angles must be two arrays of the same shape (N,), got {a.shape}, {b.shape}"
        )
    if bins < 1:
        raise UserInputError(f"bins must be at least 1, got {bins}")
    for name, angle in (("a", a), ("b", b)):
        if not np.all(np.abs(angle) <= math.pi + 1e-9):
            raise UserInputError(
                f"angle {name} has values outside [-pi, pi]; pass radians (np.deg2rad for degrees)"
            )
    w = sample_weights(log_w, len(a))
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    p, f, error = _histogram_free_energy([a, b], w, [edges, edges], n_bootstrap, block_size, seed)
    return FreeEnergyMap(edges, p, f, error)


def jensen_shannon_divergence(p, q) -> float:
    r"""Jensen-Shannon divergence (natural log) of two histograms of the same bins.

    :math:`JS = \tfrac12 KL(p \| m) + \tfrac12 KL(q \| m)`, :math:`m = (p + q)/2`, each histogram
    normalised to sum 1 first; it lies in :math:`[0, \log 2]`. (scipy's Jensen-Shannon
    distance, squared.)

    Example:
        >>> jensen_shannon_divergence([1, 1, 0], [1, 1, 0])
        0.0
        >>> round(jensen_shannon_divergence([1, 0], [0, 1]) / math.log(2), 12)
        1.0
    """
    from scipy.spatial.distance import jensenshannon

    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise UserInputError(f"histograms of {p.shape} and {q.shape} bins cannot be compared")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise UserInputError("histograms must be non-negative with a positive total")
    return float(jensenshannon(p, q) ** 2)
