"""The torch engine on one device: energy + forces per second against batch size, and the
implicit example trained to a budget of energy evaluations (issue 32 item 3).

Throughput (always): for each system of --systems (alanine dipeptide in vacuum and in implicit
solvent, openmmtools' Amber ff96 + OBC GBSA; the panel's alanine tetrapeptide, amber14 + OBC2,
d = 120) it times, best of --repeats after a warm-up call:
  * `TorchEnergy` (`engine: torch`) forward + backward of a batch on --device, for each batch
    size of --batches (energies in float64, as the engine computes them; the device
    synchronised before the clock is read);
  * OpenMM's own loop on one Context (setPositions + getState with energy and forces) on each
    platform of --platforms this machine has (CUDA, OpenCL where a GPU is; Reference, CPU),
    over --loop-frames configurations: what every published generator's CPU workers do.
Evaluations per second are batch / seconds.

Training (with --train-minutes M > 0): `openmm-nice train --config --device --set engine=torch`
with the config's own schedule, stopped at step --pilot-steps (a pilot: its metrics rows give
the steps per second and the energy evaluations per step past start-up); then the same config
trained for as many steps as reach --evaluations or fit M minutes, whichever is fewer (fewer
steps than the config's shrink its schedule in proportion, as `openmm-nice train --steps`
does); then `openmm-nice sample` with the
config's AIS levels and with none, and the weights' diagnostics (ESS/N over four blocks, the
largest weight's share, Pareto k).

It prints a table and one JSON line per part. A GPU session has minutes: run it on the CPU
first, end to end, with the second command below.

Usage:
    python benchmarks/gpu_engine.py --device cuda --train-minutes 6
    python benchmarks/gpu_engine.py --device cpu --batches 16,64 --loop-frames 20 --repeats 1 \\
        --train-minutes 1 --pilot-steps 20 --samples 400 --set training.map_refits=[] \\
        --set training.batch_size=64 --set training.walkers=64   # the end-to-end check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import openmm
import torch
from _machine import machine_facts  # benchmarks/ is on the path of a script run from it
from _panel import PANEL, ROOT
from _timing import forward_backward, own_loop
from niceness import train_rows

from openmm_nice import diagnose_weights
from openmm_nice.energy.openmm_contexts import available_platforms
from openmm_nice.energy.openmm_energy import TorchEnergy
from openmm_nice.molecule.systems import (
    alanine_dipeptide_implicit,
    alanine_dipeptide_vacuum,
    load_molecular_system,
)

SYSTEMS: dict[str, Callable] = {
    "vacuum": alanine_dipeptide_vacuum,
    "implicit": alanine_dipeptide_implicit,
    "tetrapeptide": lambda: load_molecular_system(PANEL["alanine_tetrapeptide_implicit"]["system"]),
}
TEMPERATURE = 300.0


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(function: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Least wall-clock seconds of one call over ``repeats`` calls, after one warm-up call."""
    function()
    _synchronise(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _synchronise(device)
        best = min(best, time.perf_counter() - start)
    return best


def throughput(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per (system, method, batch): evaluations (energy + forces) per second."""
    rows = []
    rng = np.random.default_rng(0)
    have = available_platforms()
    for name in args.systems:
        molecule = SYSTEMS[name]()
        n = molecule.system.getNumParticles()
        energy = TorchEnergy(molecule.system, TEMPERATURE).to(device)
        for batch in args.batches:
            noise = 0.005 * rng.standard_normal((batch, n, 3))
            x = torch.tensor((molecule.positions + noise).reshape(batch, -1), device=device)
            x.requires_grad_(True)

            seconds = _best(partial(forward_backward, energy, x), args.repeats, device)
            rows.append(_row(name, n, f"torch on {device}", batch, seconds))
            print(_line(rows[-1]), flush=True)
        frames = molecule.positions + 0.005 * rng.standard_normal((args.loop_frames, n, 3))
        for platform in (p for p in args.platforms if p in have):
            properties = {"Threads": "1"} if platform == "CPU" else {}
            integrator = openmm.VerletIntegrator(0.001)
            context = openmm.Context(
                molecule.system, integrator, openmm.Platform.getPlatformByName(platform), properties
            )
            seconds = _best(partial(own_loop, context, frames), args.repeats, torch.device("cpu"))
            rows.append(_row(name, n, f"OpenMM loop, {platform}", args.loop_frames, seconds))
            print(_line(rows[-1]), flush=True)
            del context, integrator
    return rows


def _row(system: str, atoms: int, method: str, batch: int, seconds: float) -> dict:
    return {
        "system": system,
        "atoms": atoms,
        "method": method,
        "batch": batch,
        "seconds": seconds,
        "evaluations_per_s": batch / seconds,
    }


def _line(row: dict) -> str:
    return (
        f"{row['system']:13s} {row['atoms']:5d} {row['method']:26s} {row['batch']:7d} "
        f"{row['evaluations_per_s']:14,.0f}"
    )


def _cli(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "openmm_nice.cli", *arguments], check=True)


def train(args: argparse.Namespace, work: Path) -> dict:
    """The pilot, the budgeted training and the samples' diagnostics."""
    overrides = ["engine=torch", f"seed={args.seed}", *args.set]
    common = ["--device", args.device, "--quiet"] + [f"--set={item}" for item in overrides]
    interval = max(args.pilot_steps // 5, 1)
    first, last = train_rows(
        args.config,
        work / "pilot",
        interval,
        args.pilot_steps,
        [*overrides, f"training.report_interval={interval}"],
        args.device,
    )
    pilot_steps = args.pilot_steps - interval
    pilot_s = float(last["elapsed_s"]) - float(first["elapsed_s"])
    steps_per_s = pilot_steps / pilot_s
    pilot_evaluations = float(last["energy_evaluations"]) - float(first["energy_evaluations"])
    per_step = pilot_evaluations / pilot_steps
    steps = int(min(args.evaluations / per_step, steps_per_s * 60 * args.train_minutes))
    steps = max(steps, args.pilot_steps)
    print(
        f"pilot: steps {interval}-{args.pilot_steps} in {pilot_s:.0f} s, {steps_per_s:.2f} steps/s, "
        f"{per_step:,.0f} evaluations per step -> {steps} steps",
        flush=True,
    )
    run = work / "run"
    start = time.perf_counter()
    _cli("train", args.config, "--out", str(run), "--steps", str(steps), *common)
    train_seconds = time.perf_counter() - start
    evaluations = json.loads((run / "summary.json").read_text())["energy_evaluations"]
    result = {
        "steps": steps,
        "train_s": train_seconds,
        "energy_evaluations": evaluations,
        "evaluations_per_s": evaluations / train_seconds,
    }
    for label, levels in (("flow", "0"), ("ais", None)):
        out = work / f"{label}.npz"
        extra = [] if levels is None else ["--ais-steps", levels]
        start = time.perf_counter()
        _cli(
            "sample",
            str(run),
            "--n",
            str(args.samples),
            "--out",
            str(out),
            "--seed",
            str(args.seed),
            "--device",
            args.device,
            "--quiet",
            *extra,
        )
        seconds = time.perf_counter() - start
        d = diagnose_weights(np.load(out)["log_w"])
        result[label] = {
            "ess_per_n": d.ess / d.n,
            "block_ess_per_n": [float(b) for b in d.block_ess],
            "max_weight_share": d.max_weight_share,
            "pareto_k": d.pareto_k,
            "seconds": seconds,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--systems", default="vacuum,implicit,tetrapeptide")
    parser.add_argument("--batches", default="256,1024,4096,16384,65536")
    parser.add_argument("--platforms", default="CUDA,OpenCL,CPU,Reference")
    parser.add_argument("--loop-frames", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-minutes", type=float, default=0.0, help="0: no training")
    parser.add_argument(
        "--config", default=str(ROOT / "examples" / "alanine_dipeptide_implicit.yaml")
    )
    parser.add_argument("--evaluations", type=float, default=1e8, help="the training's budget")
    parser.add_argument("--pilot-steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    args.systems = args.systems.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.platforms = args.platforms.split(",")
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {sorted(SYSTEMS)}")
    device = torch.device(args.device)
    facts = machine_facts()
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)

    print(f"{'system':13s} {'atoms':>5s} {'method':26s} {'batch':>7s} {'evaluations/s':>14s}")
    rows = throughput(args, device)
    print(
        json.dumps(
            {
                "benchmark": "gpu_engine",
                "part": "throughput",
                "device": str(device),
                "rows": rows,
                **facts,
            }
        )
    )
    if args.train_minutes > 0:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            result = train(args, work)
        print(
            f"\ntrained {result['steps']} steps in {result['train_s']:.0f} s: "
            f"{result['energy_evaluations']:.3g} evaluations ({result['evaluations_per_s']:,.0f}/s)"
        )
        for label in ("flow", "ais"):
            r = result[label]
            blocks = ", ".join(f"{b:.3f}" for b in r["block_ess_per_n"])
            print(
                f"{label:5s} ESS/N {r['ess_per_n']:.3f} (blocks {blocks}), largest weight "
                f"{r['max_weight_share']:.4f}, Pareto k {r['pareto_k']:.2f}, {r['seconds']:.0f} s"
            )
        print(
            json.dumps(
                {
                    "benchmark": "gpu_engine",
                    "part": "training",
                    "device": str(device),
                    "config": args.config,
                    "overrides": args.set,
                    **result,
                    **facts,
                }
            )
        )


if __name__ == "__main__":
    main()
