"""The training rate with each number of torch threads in the training process, in one run.

Torch parallelises each operation over OMP_NUM_THREADS threads. The package makes waiting threads
sleep (OMP_WAIT_POLICY=PASSIVE, so that a shared machine does not collapse), which makes every
parallel region pay for waking them; the models here are small, and their operations many. This
benchmark trains a config (the vacuum alanine example by default) as `openmm-nice train` does, in
a subprocess with OMP_NUM_THREADS set to each value of --threads in turn (1, 2, 1, 2, ...), and
takes the steps per second between the metrics rows of --start and --stop steps (past the
start-up), so that the ratio of the settings' mean rates is measured on one machine in one run.
Run it alone: two heavy jobs on two cores slow each other several-fold.

Usage: python benchmarks/threads.py [--config examples/alanine_dipeptide.yaml] [--threads 1,2]
       [--repeats 2] [--start 50] [--stop 250] [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _machine import cpu_counters, machine_facts, stolen_fraction
from niceness import add_rate_arguments, print_rates, rate_overrides, train_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rate_arguments(parser, stop=250)
    parser.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS")
    args = parser.parse_args()
    try:
        settings = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if len(settings) < 2 or min(settings) < 1:
        parser.error("--threads needs at least two settings, each at least 1")
    overrides = rate_overrides(parser, args)
    rates: dict[str, list[float]] = {str(t): [] for t in settings}
    counters = cpu_counters()
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(len(settings) * args.repeats):
            threads = settings[trial % len(settings)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            rate = train_rate(
                args.config, Path(tmp) / f"trial{trial}", args.start, args.stop, overrides, env
            )
            rates[str(threads)].append(rate)
            print(f"trial {trial}: OMP_NUM_THREADS={threads} {rate:.3f} steps/s", flush=True)
    stolen = stolen_fraction(counters, cpu_counters())
    mean = print_rates(rates, "threads")
    ratio = {t: mean[t] / mean[str(settings[0])] for t in rates}
    print(
        f"each against {settings[0]} thread(s): "
        + ", ".join(f"{t}: {r:.2f}" for t, r in ratio.items())
    )
    line = {
        "benchmark": "threads",
        "config": args.config,
        "overrides": args.set,
        "steps": [args.start, args.stop],
        "steps_per_s": rates,
        "ratio_to_first": ratio,
        "stolen_fraction": stolen,
        **machine_facts(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
