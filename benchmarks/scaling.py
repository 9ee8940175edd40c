"""Training steps per second and samples per second with 1 and 2 torchrun processes.

Each row trains the same config for the same number of steps with the same total batch (split
over the processes), then samples from the result. Prints a table, then one JSON line.

    python benchmarks/scaling.py                                   # note's example, CPU
    python benchmarks/scaling.py --config examples/alanine_dipeptide.yaml --steps 100
    python benchmarks/scaling.py --device cuda                     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _train(config: str, out: Path, steps: int, processes: int, device: str) -> dict:
    cli = ["-m", "openmm_nice.cli", "train", config, "--out", str(out), "--steps", str(steps)]
    cli += ["--device", device, "--quiet"]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={processes}", *cli]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "train_s": summary["training_time_s"]}


def _sampling_rate(run: Path, n: int) -> float:
    from openmm_nice.runs import load_run

    _, target, generator = load_run(run)
    try:
        generator.sample(min(n, 1000))  # start workers, warm caches
        start = time.perf_counter()
        generator.sample(n)
        return n / (time.perf_counter() - start)
    finally:
        target.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/double_well_1d.yaml")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in [int(v) for v in args.processes.split(",")]:
            run = Path(tmp) / f"p{p}"
            timing = _train(args.config, run, args.steps, p, args.device)
            rate = _sampling_rate(run, args.samples)
            rows.append(
                {
                    "processes": p,
                    "steps_per_s": args.steps / timing["train_s"],
                    "wall_s": timing["wall_s"],
                    "samples_per_s": rate,
                }
            )
    base = rows[0]["steps_per_s"]
    print(f"{'processes':>9} {'steps/s':>9} {'speed-up':>9} {'run wall s':>11} {'samples/s':>11}")
    for r in rows:
        print(
            f"{r['processes']:>9} {r['steps_per_s']:>9.1f} {r['steps_per_s'] / base:>9.2f} "
            f"{r['wall_s']:>11.1f} {r['samples_per_s']:>11.0f}"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, " + (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    )
    print(
        json.dumps(
            {
                "benchmark": "scaling",
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine,
                "config": args.config,
                "steps": args.steps,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
