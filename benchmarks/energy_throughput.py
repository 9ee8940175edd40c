"""Evaluations per second of OpenMMEnergy against OpenMM's own loop, alanine dipeptide in vacuum.

For each platform it times, interleaved and best of --repeats:
  * OpenMM's own loop: setPositions + getState(getEnergy=True, getForces=True), nothing read;
  * the usual loop that also reads energy and forces with value_in_unit;
  * OpenMMEnergy's evaluation loop alone on one Context (OpenMM's work as the adapter does it);
  * OpenMMEnergy forward + backward (values and gradients) with each worker count.
OpenMMEnergy runs with batching="loop", one configuration per OpenMM call as OpenMM's own loop
does; benchmarks/batched_energy.py compares that with batching="copies".
The torch-side overhead is the time the calling process spends outside OpenMM's evaluation in
a forward + backward call (with workers it includes waiting for the last worker), measured by
timing the adapter's evaluation loop inside the call. Then it prints a table and one JSON line.

Usage: python benchmarks/energy_throughput.py [--batch 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import openmm
import torch
from _machine import (  # benchmarks/ is on the path of a script run from it
    alanine_json_line,
    cpu_counters,
    stolen_fraction,
)
from _timing import best_times, forward_backward, own_loop, timed
from openmm import unit
from openmmtools import testsystems

from openmm_nice.energy import openmm_contexts
from openmm_nice.energy.openmm_energy import OpenMMEnergy

KJ_PER_MOL_NM = unit.kilojoule_per_mole / unit.nanometer


def value_in_unit_loop(context: openmm.Context, positions: np.ndarray) -> None:
    energies, forces = np.empty(len(positions)), np.empty(positions.shape)
    for i, configuration in enumerate(positions):
        context.setPositions(configuration)
        state = context.getState(getEnergy=True, getForces=True)
        energies[i] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        forces[i] = state.getForces(asNumpy=True).value_in_unit(KJ_PER_MOL_NM)


class EvaluationClock:
    """Adds up the time this process spends in OpenMMEnergy's evaluation loop."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._evaluate = openmm_contexts._evaluate

    def __call__(self, *args) -> None:
        start = time.perf_counter()
        self._evaluate(*args)
        self.seconds += time.perf_counter() - start


def overhead(energy: OpenMMEnergy, x: torch.Tensor, repeats: int) -> float:
    """Least time (s) per forward + backward that the caller spends outside OpenMM's work."""
    clock = EvaluationClock()
    openmm_contexts._evaluate = clock
    try:
        best = float("inf")
        for _ in range(repeats):
            clock.seconds = 0.0
            best = min(best, timed(lambda: forward_backward(energy, x)) - clock.seconds)
    finally:
        openmm_contexts._evaluate = clock._evaluate
    return best


def measure_platform(
    system: openmm.System, positions: np.ndarray, platform: str, workers: list[int], repeats: int
) -> tuple[dict[str, float], dict[int, float]]:
    """Best times (s per batch) of every method on one platform, measured interleaved, and the
    overhead per batch (s) for each worker count."""
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform)
    )
    x = torch.tensor(positions.reshape(len(positions), -1), requires_grad=True)
    energies = {
        n: OpenMMEnergy(system, 300 * unit.kelvin, platform, n_workers=n, batching="loop")
        for n in workers
    }
    for energy in energies.values():  # start workers and Contexts outside the timing
        forward_backward(energy, x)
    single = energies[min(workers)]._pool._evaluator.context
    out_e, out_f = np.empty(len(positions)), np.empty(positions.shape)
    methods: dict[str, Callable[[], None]] = {
        "own_loop": lambda: own_loop(context, positions),
        "value_in_unit_loop": lambda: value_in_unit_loop(context, positions),
        "openmm_work": lambda: openmm_contexts._evaluate(single, positions, out_e, out_f),
    }
    for n, energy in energies.items():
        methods[f"openmm_energy_{n}"] = lambda energy=energy: forward_backward(energy, x)
    times = best_times(methods, repeats)
    overheads = {n: overhead(energy, x, repeats) for n, energy in energies.items()}
    for energy in energies.values():
        energy.close()
    return times, overheads


LABELS = {
    "own_loop": "OpenMM's own loop (nothing read)",
    "value_in_unit_loop": "usual loop, value_in_unit reads",
    "openmm_work": "OpenMMEnergy's evaluation loop alone",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="configurations per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timings per method, best kept")
    parser.add_argument("--platforms", default="Reference,CPU", help="comma-separated names")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = parser.parse_args()
    workers = [int(n) for n in args.workers.split(",")]

    test_system = testsystems.AlanineDipeptideVacuum(constraints=None)
    reference = np.asarray(test_system.positions.value_in_unit(unit.nanometer))
    rng = np.random.default_rng(0)
    positions = reference + 0.01 * rng.standard_normal((args.batch, *reference.shape))

    load_before = os.getloadavg()[0]
    counters_before = cpu_counters()
    results: dict[str, dict[str, float]] = {}
    rows = []
    for platform in args.platforms.split(","):
        times, overheads = measure_platform(
            test_system.system, positions, platform, workers, args.repeats
        )
        own = times["own_loop"]
        labels = LABELS | {
            f"openmm_energy_{n}": f"OpenMMEnergy fwd+bwd, {n} worker(s)" for n in workers
        }
        result: dict[str, float] = {}
        for name, label in labels.items():
            result[f"{name}_per_s"] = args.batch / times[name]
            result[f"{name}_ratio"] = own / times[name]
            rows.append((platform, label, args.batch / times[name], own / times[name]))
        for n in workers:
            result[f"overhead_ms_{n}"] = 1e3 * overheads[n]
            result[f"overhead_fraction_{n}"] = overheads[n] / times[f"openmm_energy_{n}"]
        results[platform] = result
    load_after = os.getloadavg()[0]
    stolen = stolen_fraction(counters_before, cpu_counters())

    print(
        f"alanine dipeptide (22 atoms), batch {args.batch}, best of {args.repeats}; "
        f"1-minute load average {load_before:.2f} before, {load_after:.2f} after; CPU time "
        f"stolen by the hypervisor: {'n/a' if stolen is None else f'{100 * stolen:.1f}%'}"
    )
    print(f"{'platform':<10} {'method':<40} {'evals/s':>10} {'x own loop':>11}")
    for platform, label, rate, ratio in rows:
        print(f"{platform:<10} {label:<40} {rate:>10,.0f} {ratio:>11.2f}")
    print("torch-side overhead: time per fwd+bwd the caller spends outside OpenMM's evaluation")
    for platform, result in results.items():
        for n in workers:
            print(
                f"  {platform:<10} {n} worker(s): {result[f'overhead_ms_{n}']:6.2f} ms per batch "
                f"({100 * result[f'overhead_fraction_{n}']:.1f}% of it)"
            )
    print(
        alanine_json_line(
            "energy_throughput",
            args,
            (load_before, load_after),
            results,
            cpu_time_stolen_fraction=stolen,
        )
    )


if __name__ == "__main__":
    main()
