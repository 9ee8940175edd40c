"""Evaluations per second of OpenMMEnergy's batching modes, alanine dipeptide in vacuum.

For each platform it times, interleaved and best of --repeats:
  * OpenMMEnergy forward + backward with batching="loop" (one configuration per OpenMM call)
    and batching="copies" for each --copies K (K configurations per call on a System of K
    non-interacting copies, each copy's energy read as a parameter derivative), for each worker
    count;
  * on one Context in the calling process, without torch: the loop, copies with K = 32, and the
    other design, one force group per copy (K = 32, the most force groups OpenMM has): set the
    K positions once, then one getState(energy, forces) per group. Its System keeps OpenMM's
    native bonded forces; the nonbonded pairs are replicate_system's pair terms, since a
    NonbondedForce cannot be limited to one copy.
Then it prints a table (rate and ratio to the loop with the same workers) and one JSON line.

Usage: python benchmarks/batched_energy.py [--batch 1024] [--repeats 3] [--copies 8,16,32,64]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np
import openmm
import torch
from _machine import alanine_json_line  # benchmarks/ is on the path of a script run from it
from _timing import best_times, forward_backward
from openmm import unit

from openmm_nice.energy import openmm_contexts
from openmm_nice.energy.openmm_energy import OpenMMEnergy
from openmm_nice.energy.replicas import replicate_system
from openmm_nice.molecule.systems import alanine_dipeptide_vacuum

GROUP_COPIES = 32  # OpenMM has 32 force groups

# Forces the group design copies natively: term count, reader, writer, particles per term.
_SHIFT = {
    openmm.HarmonicBondForce: ("getNumBonds", "getBondParameters", "setBondParameters", 2),
    openmm.HarmonicAngleForce: ("getNumAngles", "getAngleParameters", "setAngleParameters", 3),
    openmm.PeriodicTorsionForce: (
        "getNumTorsions",
        "getTorsionParameters",
        "setTorsionParameters",
        4,
    ),
    openmm.CustomBondForce: ("getNumBonds", "getBondParameters", "setBondParameters", 2),
}


def groups_system(system: openmm.System, copies: int) -> openmm.System:
    """Copies of a bonded + NoCutoff nonbonded System, copy k's forces in force group k.

    Bonded forces stay native; the NonbondedForce becomes replicate_system's pair terms for one
    copy (which also carry its copy parameter and derivative; the others are not copied).
    """
    single = replicate_system(system, 1)  # kept alive: its forces belong to it
    (pairs,) = [
        force
        for force in single.getForces()
        if isinstance(force, openmm.CustomBondForce) and force.getNumPerBondParameters() == 3
    ]
    per_copy = [force for force in system.getForces() if type(force) in _SHIFT] + [pairs]
    n = system.getNumParticles()
    copied = openmm.System()
    for _ in range(copies):
        for i in range(n):
            copied.addParticle(system.getParticleMass(i))
    for k in range(copies):
        for force in per_copy:
            count, read, write, n_particles = _SHIFT[type(force)]
            clone = openmm.XmlSerializer.clone(force)
            for i in range(getattr(clone, count)()):
                values = getattr(clone, read)(i)
                shifted = [p + k * n for p in values[:n_particles]]
                getattr(clone, write)(i, *shifted, *values[n_particles:])
            clone.setForceGroup(k)
            copied.addForce(clone)
    return copied


def evaluate_groups(
    context: openmm.Context,
    copies: int,
    positions: np.ndarray,
    energies: np.ndarray,
    forces: np.ndarray,
) -> None:
    """Energies and forces of len(positions) (a multiple of copies) configurations, by group."""
    n_particles = positions.shape[1]
    buffer = np.empty((copies * n_particles, 3))
    for start in range(0, len(positions), copies):
        openmm_contexts._set_positions(context, positions[start : start + copies].reshape(-1, 3))
        for k in range(copies):
            mask = 1 << k if k < 31 else -(1 << 31)  # OpenMM takes the mask as a signed int
            state = openmm_contexts._get_state(
                context, openmm_contexts._ENERGY_AND_FORCES, False, mask
            )
            energies[start + k] = openmm_contexts._get_potential_energy(state)
            openmm_contexts._get_vector_as_numpy(state, openmm.State.Forces, buffer)
            forces[start + k] = buffer[k * n_particles : (k + 1) * n_particles]


def measure_platform(
    system: openmm.System,
    positions: np.ndarray,
    platform: str,
    workers: list[int],
    copies: list[int],
    repeats: int,
) -> dict[str, float]:
    """Best time (s per batch) of every method on one platform, measured interleaved."""
    x = torch.tensor(positions.reshape(len(positions), -1), requires_grad=True)
    energies: dict[str, OpenMMEnergy] = {}
    for n in workers:
        energies[f"loop_{n}"] = OpenMMEnergy(
            system, 300 * unit.kelvin, platform, n_workers=n, batching="loop"
        )
        for k in copies:
            energies[f"copies{k}_{n}"] = OpenMMEnergy(
                system, 300 * unit.kelvin, platform, n_workers=n, batching="copies", copies=k
            )
    methods: dict[str, Callable[[], None]] = {
        name: lambda energy=energy: forward_backward(energy, x) for name, energy in energies.items()
    }
    for method in methods.values():  # start workers and Contexts outside the timing
        method()
    loop_energy = energies[f"loop_{min(workers)}"]
    copies_energy = OpenMMEnergy(
        system, 300 * unit.kelvin, platform, n_workers=1, batching="copies", copies=GROUP_COPIES
    )
    copies_energy(x[:1])
    groups_context = openmm.Context(
        groups_system(system, GROUP_COPIES),
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName(platform),
        copies_energy.platform_properties,
    )
    out_e, out_f = np.empty(len(positions)), np.empty(positions.shape)
    loop_context, copies_context = (
        loop_energy._pool._evaluator.context,
        copies_energy._pool._evaluator.context,
    )
    methods["raw_loop"] = lambda: openmm_contexts._evaluate(loop_context, positions, out_e, out_f)
    methods[f"raw_copies{GROUP_COPIES}"] = lambda: openmm_contexts._evaluate_copies(
        copies_context, GROUP_COPIES, positions, out_e, out_f
    )
    methods[f"raw_groups{GROUP_COPIES}"] = lambda: evaluate_groups(
        groups_context, GROUP_COPIES, positions, out_e, out_f
    )
    times = best_times(methods, repeats)
    for energy in [*energies.values(), copies_energy]:
        energy.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="configurations per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timings per method, best kept")
    parser.add_argument("--platforms", default="Reference,CPU", help="comma-separated names")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--copies", default="8,16,32,64", help="comma-separated copies per call")
    args = parser.parse_args()
    workers = [int(n) for n in args.workers.split(",")]
    copies = [int(k) for k in args.copies.split(",")]
    if args.batch % GROUP_COPIES:
        parser.error(f"--batch must be a multiple of {GROUP_COPIES} for the force-group rows")

    molecule = alanine_dipeptide_vacuum()
    rng = np.random.default_rng(0)
    positions = molecule.positions + 0.01 * rng.standard_normal((args.batch, molecule.n_atoms, 3))

    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, float]] = {}
    rows = []
    for platform in args.platforms.split(","):
        times = measure_platform(
            molecule.system, positions, platform, workers, copies, args.repeats
        )
        result = {f"{name}_per_s": args.batch / seconds for name, seconds in times.items()}
        for n in workers:
            for name in [f"loop_{n}"] + [f"copies{k}_{n}" for k in copies]:
                ratio = times[f"loop_{n}"] / times[name]
                result[f"{name}_ratio"] = ratio
                label = (
                    "loop" if name.startswith("loop") else f"copies, K = {name[6:].split('_')[0]}"
                )
                rows.append(
                    (
                        platform,
                        f"OpenMMEnergy fwd+bwd, {label}",
                        str(n),
                        args.batch / times[name],
                        ratio,
                    )
                )
        for name, label in [
            ("raw_loop", "one Context, loop"),
            (f"raw_copies{GROUP_COPIES}", f"one Context, copies, K = {GROUP_COPIES}"),
            (f"raw_groups{GROUP_COPIES}", f"one Context, force group per copy, K = {GROUP_COPIES}"),
        ]:
            ratio = times["raw_loop"] / times[name]
            result[f"{name}_ratio"] = ratio
            rows.append((platform, label, "-", args.batch / times[name], ratio))
        results[platform] = result
    load_after = os.getloadavg()[0]

    print(
        f"alanine dipeptide (22 atoms), batch {args.batch}, best of {args.repeats}; "
        f"1-minute load average {load_before:.2f} before, {load_after:.2f} after"
    )
    print(f"{'platform':<10} {'method':<48} {'workers':>7} {'evals/s':>10} {'x loop':>7}")
    for platform, label, n, rate, ratio in rows:
        print(f"{platform:<10} {label:<48} {n:>7} {rate:>10,.0f} {ratio:>7.2f}")
    print(alanine_json_line("batched_energy", args, (load_before, load_after), results))


if __name__ == "__main__":
    main()
