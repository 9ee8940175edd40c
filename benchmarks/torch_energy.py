"""Evaluations per second of the torch energy path against OpenMM's loop, alanine dipeptide
in vacuum and in implicit solvent (openmmtools, OBC GBSA).

For each system it times, interleaved and best of --repeats, energy and forces of a batch:
  * OpenMM's own loop on one Context (setPositions + getState, nothing read), Reference and
    CPU (Threads = 1) platforms;
  * OpenMMEnergy forward + backward with batching="loop" (Reference), for each worker count;
  * OpenMMEnergy forward + backward with batching="torch", compiled (torch.compile, done
    before the timing; its time is reported) and uncompiled, for each worker count;
  * the compiled TorchEvaluator alone in this process with 1 and 2 torch threads.
Then it prints a table and one JSON line. With --compile-times it instead times the first call
(256 rows, 1 thread) of a TorchEvaluator with compile_after=0 on an empty inductor cache (a
fresh TORCHINDUCTOR_CACHE_DIR), then of a second one on the cache the first filled.

Usage: python benchmarks/torch_energy.py [--batch 1024] [--repeats 3] [--workers 1,2]
       python benchmarks/torch_energy.py --compile-times
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable

import numpy as np
import openmm
import torch
from _machine import machine_facts  # benchmarks/ is on the path of a script run from it
from _timing import best_times, forward_backward, own_loop, timed

from openmm_nice.energy.openmm_energy import OpenMMEnergy
from openmm_nice.energy.torch_energy import TorchEvaluator
from openmm_nice.molecule.systems import alanine_dipeptide_implicit, alanine_dipeptide_vacuum

SYSTEMS = {"vacuum": alanine_dipeptide_vacuum, "implicit": alanine_dipeptide_implicit}


def measure_system(
    name: str, batch: int, workers: list[int], repeats: int
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Best times (s per batch) of every method, measured interleaved; compile times (s); labels."""
    molecule = SYSTEMS[name]()
    system = molecule.system
    rng = np.random.default_rng(0)
    positions = molecule.positions + 0.01 * rng.standard_normal((batch, *molecule.positions.shape))
    x = torch.tensor(positions.reshape(batch, -1), requires_grad=True)
    methods: dict[str, Callable[[], None]] = {}
    labels: dict[str, str] = {}
    compile_seconds: dict[str, float] = {}
    for platform, properties in (("Reference", {}), ("CPU", {"Threads": "1"})):
        context = openmm.Context(
            system,
            openmm.VerletIntegrator(0.001),
            openmm.Platform.getPlatformByName(platform),
            properties,
        )
        methods[f"own_loop_{platform}"] = lambda context=context: own_loop(context, positions)
        labels[f"own_loop_{platform}"] = f"OpenMM's own loop, {platform}, 1 thread"
    energies = []
    for n in workers:
        for batching, compile_after, label in (
            ("loop", None, "loop (Reference)"),
            ("torch", None, "torch, uncompiled"),
            ("torch", 0.0, "torch, compiled"),
        ):
            energy = OpenMMEnergy(
                system, 300.0, n_workers=n, batching=batching, compile_after=compile_after
            )
            key = f"{batching}{'_compiled' if compile_after == 0.0 else ''}_{n}"
            compile_seconds[key] = timed(lambda energy=energy: forward_backward(energy, x))
            methods[key] = lambda energy=energy: forward_backward(energy, x)
            labels[key] = f"OpenMMEnergy fwd+bwd, {label}, {n} worker(s)"
            energies.append(energy)
    out_e, out_f = np.empty(batch), np.empty(positions.shape)
    for threads in (1, 2):
        evaluator = TorchEvaluator(system, threads=threads, compile_after=0.0)
        key = f"evaluator_{threads}"
        compile_seconds[key] = timed(lambda e=evaluator: e(positions, out_e, out_f))
        methods[key] = lambda e=evaluator: e(positions, out_e, out_f)
        labels[key] = f"TorchEvaluator alone, compiled, {threads} torch thread(s)"
    times = best_times(methods, repeats)
    for energy in energies:
        energy.close()
    compiled = {k: v for k, v in compile_seconds.items() if "compiled" in k or "evaluator" in k}
    return times, compiled, labels


def compile_times(name: str) -> dict[str, float]:
    """Seconds of a compiled TorchEvaluator's first call, on an empty and on a filled cache."""
    molecule = SYSTEMS[name]()
    positions = np.repeat(molecule.positions[None], 256, axis=0)
    energies, forces = np.empty(256), np.empty(positions.shape)
    times = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        for key in ("cold_cache_s", "warm_cache_s"):
            torch._dynamo.reset()  # forget this process's compiled code; the disk cache stays
            evaluator = TorchEvaluator(molecule.system, compile_after=0.0)
            times[key] = timed(lambda e=evaluator: e(positions, energies, forces))
    del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="configurations per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timings per method, best kept")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--systems", default="vacuum,implicit", help="vacuum and/or implicit")
    parser.add_argument(
        "--compile-times", action="store_true", help="time torch.compile, cold and warm cache"
    )
    args = parser.parse_args()
    workers = [int(n) for n in args.workers.split(",")]
    if args.compile_times:
        load_before = os.getloadavg()[0]
        results = {name: compile_times(name) for name in args.systems.split(",")}
        load_after = os.getloadavg()[0]
        print(f"1-minute load average {load_before:.2f} before, {load_after:.2f} after")
        for name, times in results.items():
            print(
                f"{name}: first compiled call {times['cold_cache_s']:.1f} s on an empty cache, "
                f"{times['warm_cache_s']:.1f} s on a filled one"
            )
        print(
            json.dumps(
                {
                    "benchmark": "torch_energy_compile",
                    **machine_facts(),
                    "load_average": [load_before, load_after],
                    "systems": results,
                }
            )
        )
        return

    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, float]] = {}
    rows = []
    for name in args.systems.split(","):
        times, compile_seconds, labels = measure_system(name, args.batch, workers, args.repeats)
        loop = times[f"loop_{min(workers)}"]
        result: dict[str, float] = {}
        for key, label in labels.items():
            result[f"{key}_per_s"] = args.batch / times[key]
            rows.append((name, label, args.batch / times[key], loop / times[key]))
        for key, seconds in compile_seconds.items():
            result[f"{key}_first_call_s"] = seconds
        results[name] = result
    load_after = os.getloadavg()[0]

    print(
        f"alanine dipeptide (22 atoms), batch {args.batch}, energy and forces, best of "
        f"{args.repeats}; 1-minute load average {load_before:.2f} before, {load_after:.2f} after"
    )
    print(f"{'system':<9} {'method':<62} {'evals/s':>10} {'x loop':>7}")
    for name, label, rate, ratio in rows:
        print(f"{name:<9} {label:<62} {rate:>10,.0f} {ratio:>7.2f}")
    print("first calls of the compiled paths (compile included), s:")
    for name, result in results.items():
        firsts = {k: v for k, v in result.items() if k.endswith("_first_call_s")}
        print(
            f"  {name}: "
            + ", ".join(f"{k[: -len('_first_call_s')]} {v:.1f}" for k, v in firsts.items())
        )
    print(
        json.dumps(
            {
                "benchmark": "torch_energy",
                "batch": args.batch,
                "repeats": args.repeats,
                **machine_facts(),
                "load_average": [load_before, load_after],
                "systems": results,
            }
        )
    )


if __name__ == "__main__":
    main()
