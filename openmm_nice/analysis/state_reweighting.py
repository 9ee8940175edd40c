r"""MD frames reweighted to another thermodynamic state: EXP from one state, MBAR from several.

Frames :math:`x_n` sampled in source states :math:`k = 1..K` (:math:`N_k` frames each, pooled)
get, for a target state of reduced energy :math:`u_t`, the log-weights

.. math:: \log w_n = \log N - u_t(x_n) - \log \sum_k N_k\, e^{f_k - u_k(x_n)},

with :math:`f_k` the sources' reduced free energies (:math:`f_1 = 0`) that pymbar's MBAR
solves for. For one source this is :math:`\log w_n = u_1(x_n) - u_t(x_n)`, and the free-energy
difference :math:`f_t - f_1 = -\log \frac1N \sum_n w_n` is pymbar's EXP (Zwanzig); for several,
the log-mean of the weights is MBAR's :math:`f_1 - f_t`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from openmm_nice.analysis.reweighting import (
    N_BOOTSTRAP,
    Estimate,
    bootstrap,
    bootstrap_spread,
    log_partition_function,
)
from openmm_nice.errors import UserInputError

__all__ = ["StateWeights", "reduced_energies", "state_log_weights", "reweight_frames"]


def _pymbar():
    from openmm_nice.molecule.systems import import_quietly

    return import_quietly("pymbar")


def reduced_energies(energy: Any, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """U = E/kT (N,) of frames x (N, 3n) in nm through an :class:`OpenMMEnergy`, in batches."""
    import torch

    if batch_size < 1:
        raise UserInputError(f"batch size must be at least 1, got {batch_size}")
    out = np.empty(len(x))
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            out[start : start + len(chunk)] = energy(chunk).double().numpy()
    return out


def _log_denominator(u_kn: np.ndarray, n_k: np.ndarray, f_k: np.ndarray) -> np.ndarray:
    """:math:`\\log \\sum_k N_k e^{f_k - u_k(x_n)}` of every pooled frame (N,)."""
    from scipy.special import logsumexp

    with np.errstate(divide="ignore"):
        return logsumexp(np.log(n_k)[:, None] + f_k[:, None] - u_kn, axis=0)


def state_log_weights(
    u_kn: np.ndarray, n_k: Sequence[int], u_target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Log-weights of pooled frames for a target state, and the sources' free energies.

    Arguments:
        u_kn: (K, N) reduced energy of every pooled frame in every source state; the frames
            are ordered by source, the first ``n_k[0]`` from source 0 and so on.
        n_k: (K,) frames of each source.
        u_target: (N,) reduced energy of every frame in the target state (inf where the
            target cannot evaluate it).

    Returns:
        (log_w (N,), f_k (K,)): the log-weights of the module docstring (-inf where the target
        energy is inf or NaN), and the sources' reduced free energies relative to source 0
        (MBAR's, or 0 for one source).

    Example:
        >>> u = np.array([[0.0, 1.0, 2.0]])
        >>> state_log_weights(u, [3], u[0] + 0.5)[0].tolist()
        [-0.5, -0.5, -0.5]
    """
    u_kn = np.atleast_2d(np.asarray(u_kn, dtype=np.float64))
    n_k = np.asarray(n_k, dtype=np.int64)
    u_target = np.asarray(u_target, dtype=np.float64)
    if u_kn.shape != (len(n_k), int(n_k.sum())) or u_target.shape != (u_kn.shape[1],):
        raise ValueError(
            f"u_kn {u_kn.shape}, n_k {n_k.tolist()} and u_target {u_target.shape} do not fit: "
            "u_kn must be (K, sum n_k) and u_target (sum n_k,)"
        )
    u_target = np.where(np.isnan(u_target), np.inf, u_target)
    if len(n_k) == 1:
        f_k = np.zeros(1)
        with np.errstate(invalid="ignore"):
            log_w = u_kn[0] - u_target
    else:
        f_k = np.asarray(_pymbar().MBAR(u_kn, n_k).f_k, dtype=np.float64)
        log_w = math.log(u_kn.shape[1]) - u_target - _log_denominator(u_kn, n_k, f_k)
    return np.where(np.isnan(log_w), -np.inf, log_w), f_k


@dataclass
class StateWeights:
    """Pooled frames of K source states reweighted to a target state.

    Attributes:
        log_w: (N,) log-weights for the target (see :func:`state_log_weights`).
        u_target: (N,) reduced energies in the target state.
        u_kn: (K, N) reduced energies in each source state.
        source: (N,) the source state each frame was sampled in.
        f_k: (K,) the sources' reduced free energies relative to source 0.
    """

    log_w: np.ndarray
    u_target: np.ndarray
    u_kn: np.ndarray
    source: np.ndarray
    f_k: np.ndarray

    @property
    def estimator(self) -> str:
        """``"EXP"`` for one source state, ``"MBAR"`` for several."""
        return "EXP" if len(self.f_k) == 1 else "MBAR"

    @property
    def u_source(self) -> np.ndarray:
        """(N,) each frame's reduced energy in the state it was sampled in."""
        return self.u_kn[self.source, np.arange(len(self.source))]

    def log_z_ratio(
        self, n_bootstrap: int = N_BOOTSTRAP, block_size: int = 1, seed: int = 0
    ) -> Estimate:
        r""":math:`\log (Z_t / Z_1) = f_1 - f_t` with its (block) bootstrap error.

        The value is pymbar's: EXP for one source state, MBAR for several. Each bootstrap
        resample of the pooled frames is estimated afresh (MBAR solved again on it), so the
        error holds the uncertainty of the sources' free energies too.
        """
        n_k = np.bincount(self.source, minlength=len(self.f_k))
        if self.estimator == "EXP":
            w_f = -self.log_w  # the target's energy minus the source's: EXP's work
            value = -float(
                _pymbar().other_estimators.exp(w_f, compute_uncertainty=False)["Delta_f"]
            )
        else:
            value = log_partition_function(self.log_w)
        if not n_bootstrap:
            return Estimate(value, math.nan)

        def resampled(i: np.ndarray) -> float:
            i = i[np.argsort(self.source[i], kind="stable")]
            counts = np.bincount(self.source[i], minlength=len(n_k))
            if (counts == 0).any():
                return math.nan
            log_w, _ = state_log_weights(self.u_kn[:, i], counts, self.u_target[i])
            return log_partition_function(log_w) if np.isfinite(log_w).any() else math.nan

        replicates = bootstrap(resampled, len(self.log_w), n_bootstrap, block_size, seed)
        return Estimate(value, bootstrap_spread(replicates))


def reweight_frames(
    frames: Sequence[np.ndarray],
    source_energies: Sequence[Any],
    target_energy: Any = None,
    target_temperature: float | None = None,
    batch_size: int = 8192,
) -> StateWeights:
    r"""Frames of one or several source states reweighted to a target state.

    Arguments:
        frames: Per source state, its frames (N_k, 3n) in nm.
        source_energies: Per source state, its :class:`~openmm_nice.energy.openmm_energy.OpenMMEnergy`
            (System and temperature).
        target_energy: The :class:`OpenMMEnergy` of the target System at its temperature, or
            None for the first source's System at ``target_temperature``: then
            :math:`u_t = u_1 T_1 / T_t` exactly, with no further energy evaluation, so that the
            same temperature gives :math:`\log w = 0` exactly.
        target_temperature: The target temperature in K when ``target_energy`` is None.
        batch_size: Frames per energy evaluation.

    Returns:
        The :class:`StateWeights`; every source energy is evaluated on every frame.
    """
    if len(frames) != len(source_energies) or not frames:
        raise ValueError(
            f"give one energy per source state: {len(frames)} sets of frames, "
            f"{len(source_energies)} energies"
        )
    x = np.concatenate(frames)
    n_k = np.array([len(f) for f in frames])
    source = np.repeat(np.arange(len(frames)), n_k)
    u_kn = np.stack([reduced_energies(energy, x, batch_size) for energy in source_energies])
    own = u_kn[source, np.arange(len(x))]
    bad = ~np.isfinite(own)
    if bad.any():
        raise UserInputError(
            f"{int(bad.sum())} of {len(x)} frames have an infinite or NaN energy in the state "
            "they come from, so they cannot have been sampled from it; check that each "
            "trajectory's config is the state it was run in"
        )
    if target_energy is None:
        if target_temperature is None:
            raise UserInputError("give a target energy or a target temperature")
        from openmm import unit

        t_source = source_energies[0].temperature.value_in_unit(unit.kelvin)
        u_target = u_kn[0] * (t_source / float(target_temperature))
    else:
        u_target = reduced_energies(target_energy, x, batch_size)
    log_w, f_k = state_log_weights(u_kn, n_k, u_target)
    return StateWeights(log_w, u_target, u_kn, source, f_k)
