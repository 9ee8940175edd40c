"""The example's training rate with each energy engine, measured in one run (issue 32 item 4).

`engine: openmm` evaluates the batch in OpenMM Contexts (the caller and worker processes);
`engine: torch` writes the System's forces as torch operations in the training process. This
benchmark trains a config (the vacuum alanine example by default) with each engine in turn, as
`openmm-nice train` does, and takes the steps per second between the metrics rows of --start and
--stop steps (past the start-up), in the order openmm, torch, openmm, torch, ... so that the
ratio of the engines' mean rates is measured on one machine in one run. Run it alone: two heavy
jobs on two cores slow each other several-fold.

Usage: python benchmarks/engines.py [--config examples/alanine_dipeptide.yaml] [--repeats 2]
       [--start 50] [--stop 300] [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _machine import cpu_counters, machine_facts, stolen_fraction
from niceness import train_rate

ENGINES = ("openmm", "torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/alanine_dipeptide.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="trials of each engine")
    parser.add_argument("--start", type=int, default=50, help="step the rate is timed from")
    parser.add_argument("--stop", type=int, default=300, help="step the rate is timed to")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    if not 0 < args.start < args.stop or args.stop % args.start:
        parser.error("--start and --stop must satisfy 0 < start < stop, stop a multiple of start")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    overrides = [f"training.report_interval={args.start}"] + args.set
    rates: dict[str, list[float]] = {engine: [] for engine in ENGINES}
    counters = cpu_counters()
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(len(ENGINES) * args.repeats):
            engine = ENGINES[trial % len(ENGINES)]
            rate = train_rate(
                args.config,
                Path(tmp) / f"trial{trial}",
                args.start,
                args.stop,
                [*overrides, f"engine={engine}"],
            )
            rates[engine].append(rate)
            print(f"trial {trial}: engine {engine:6s} {rate:.2f} steps/s", flush=True)
    stolen = stolen_fraction(counters, cpu_counters())
    mean = {engine: sum(v) / len(v) for engine, v in rates.items()}
    ratio = mean["torch"] / mean["openmm"]
    print(f"\n{'engine':8s} {'steps/s (each trial)':28s} mean")
    for engine, values in rates.items():
        listed = ", ".join(f"{v:.2f}" for v in values)
        print(f"{engine:8s} {listed:28s} {mean[engine]:.2f}")
    print(f"torch / openmm: {ratio:.2f}x (the faster should be the default)")
    line = {
        "benchmark": "engines",
        "config": args.config,
        "overrides": args.set,
        "steps": [args.start, args.stop],
        "steps_per_s": rates,
        "torch_over_openmm": ratio,
        "stolen_fraction": stolen,
        **machine_facts(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
