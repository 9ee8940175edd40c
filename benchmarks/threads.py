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
from niceness import train_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/alanine_dipeptide.yaml")
    parser.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS")
    parser.add_argument("--repeats", type=int, default=2, help="trials of each setting")
    parser.add_argument("--start", type=int, default=50, help="step the rate is timed from")
    parser.add_argument("--stop", type=int, default=250, help="step the rate is timed to")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    try:
        settings = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if len(settings) < 2 or min(settings) < 1:
        parser.error("--threads needs at least two settings, each at least 1")
    if not 0 < args.start < args.stop or args.stop % args.start:
        parser.error("--start and --stop must satisfy 0 < start < stop, stop a multiple of start")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    overrides = [f"training.report_interval={args.start}"] + args.set
    rates: dict[int, list[float]] = {t: [] for t in settings}
    counters = cpu_counters()
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(len(settings) * args.repeats):
            threads = settings[trial % len(settings)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            rate = train_rate(
                args.config, Path(tmp) / f"trial{trial}", args.start, args.stop, overrides, env
            )
            rates[threads].append(rate)
            print(f"trial {trial}: OMP_NUM_THREADS={threads} {rate:.3f} steps/s", flush=True)
    stolen = stolen_fraction(counters, cpu_counters())
    mean = {t: sum(v) / len(v) for t, v in rates.items()}
    print(f"\n{'threads':8s} {'steps/s (each trial)':28s} mean   x {settings[0]} thread(s)")
    for t, values in rates.items():
        listed = ", ".join(f"{v:.3f}" for v in values)
        print(f"{t:<8d} {listed:28s} {mean[t]:.3f}  {mean[t] / mean[settings[0]]:.2f}")
    line = {
        "benchmark": "threads",
        "config": args.config,
        "overrides": args.set,
        "steps": [args.start, args.stop],
        "steps_per_s": {str(t): v for t, v in rates.items()},
        "ratio_to_first": {str(t): mean[t] / mean[settings[0]] for t in settings},
        "stolen_fraction": stolen,
        **machine_facts(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
