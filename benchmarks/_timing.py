"""Timing helpers shared by the energy benchmarks: OpenMM's own loop, the adapter's forward +
backward, and interleaved best-of timing."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import openmm
import torch

from openmm_nice.energy.openmm_energy import OpenMMEnergy


def own_loop(context: openmm.Context, positions: np.ndarray) -> None:
    """OpenMM's own loop on one Context: setPositions + getState(energy, forces), nothing read."""
    for configuration in positions:
        context.setPositions(configuration)
        context.getState(getEnergy=True, getForces=True)


def forward_backward(energy: OpenMMEnergy, x: torch.Tensor) -> None:
    """Energies and their gradients (x.grad) of a batch through the adapter."""
    x.grad = None
    energy(x).sum().backward()


def timed(function: Callable[[], None]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def best_times(methods: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Least seconds per call of each method over ``repeats`` rounds, the methods interleaved
    within a round so that a change in the machine's load reaches all of them alike."""
    times = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, method in methods.items():
            times[name] = min(times[name], timed(method))
    return times
