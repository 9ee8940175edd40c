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
import os
import tempfile
from pathlib import Path

from _machine import cpu_counters, machine_facts, stolen_fraction
from niceness import add_rate_arguments, print_rates, rate_overrides, train_rate

ENGINES = ("openmm", "torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rate_arguments(parser)
    args = parser.parse_args()
    overrides = rate_overrides(parser, args)
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
    mean = print_rates(rates, "engine")
    ratio = mean["torch"] / mean["openmm"]
    print(f"torch / openmm: {ratio:.2f}x (the faster should be the default)")
    line = {
        "benchmark": "engines",
        "config": args.config,
        "overrides": args.set,
        "steps": [args.start, args.stop],
        "steps_per_s": rates,
        "torch_over_openmm": ratio,
        "stolen_fraction": stolen,
        # the trainings' torch threads: None is the command's default, one (machine_facts'
        # torch_threads is this process's own count)
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        **machine_facts(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
