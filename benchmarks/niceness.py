"""Training beside other work: the example's steps per second alone and beside a busy process.

Users share machines. This benchmark trains a config (the vacuum alanine example by default) in
a subprocess, as `openmm-nice train` does, and stops it once metrics.csv reports --stop steps;
the rate is taken between the rows of --start and --stop steps (past the start-up: the workers,
the map, the first draws). Each trial runs alone or beside one single-threaded busy loop
(`nice -n 19 python -c "while True: pass"`), in the order alone, busy, alone, busy, ..., so that
the ratio of the two conditions' mean rates is measured in one run on one machine. A ratio near
1 means the training yields nothing to a process the user has asked to run at the lowest
priority, which is what nice 19 promises; issue 32 asks for at most 1.5.

With --beside training the other process is a second training of the same config at normal
priority (two users' jobs, or one user's two molecules, on one machine), and --threads N sets
OMP_NUM_THREADS for both trainings (torch's threads per process): two trainings cannot both run
at full speed on two cores, so the fair ratio there is 2, and a ratio far above it is a collapse.

Usage: python benchmarks/niceness.py [--config examples/alanine_dipeptide.yaml] [--repeats 2]
       [--start 50] [--stop 300] [--beside busy|training] [--threads N]
       [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_counters, machine_facts, stolen_fraction


@contextlib.contextmanager
def busy_process(busy: bool):
    """A single-threaded busy loop at nice 19 inside the block (nothing when not ``busy``)."""
    if not busy:
        yield
        return
    loop = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        loop.kill()
        loop.wait()


def train_command(
    config: str, out: Path, overrides: list[str], device: str | None = None
) -> list[str]:
    """The `openmm-nice train` command line of ``config`` into ``out``, quiet, with the
    overrides (and ``--device`` when one is given)."""
    command = [sys.executable, "-m", "openmm_nice.cli", "train", config, "--out", str(out)]
    command += ["--quiet"] + [f"--set={item}" for item in overrides]
    if device is not None:
        command += ["--device", device]
    return command


@contextlib.contextmanager
def other_training(config: str, out: Path, overrides: list[str], env: dict, warm: int):
    """A second `openmm-nice train` of ``config`` inside the block, at normal priority, past
    its first ``warm`` steps (its start-up) before the block starts."""
    command = train_command(config, out, overrides)
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while not any(int(r["step"]) >= warm for r in _rows(out / "metrics.csv")):
            if run.poll() is not None:
                raise RuntimeError(f"the other training ended (rc {run.returncode}) at its start")
            time.sleep(0.5)
        yield
    finally:
        run.kill()
        run.wait()


def _rows(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    with metrics.open() as f:
        return [row for row in csv.DictReader(f) if row.get("elapsed_s")]


def train_rows(
    config: str,
    out: Path,
    start: int,
    stop: int,
    overrides: list[str],
    device: str | None = None,
    env: dict | None = None,
) -> tuple[dict, dict]:
    """The metrics rows of steps start and stop of `openmm-nice train` (the config's own
    schedule, on ``device`` or the config's, in the environment ``env`` or this one's); the
    run is stopped once the second is written."""
    run = subprocess.Popen(
        train_command(config, out, overrides, device),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        while True:
            rows = {int(r["step"]): r for r in _rows(out / "metrics.csv")}
            if stop in rows and start in rows:
                return rows[start], rows[stop]
            if run.poll() is not None:
                raise RuntimeError(
                    f"training ended (rc {run.returncode}) before step {stop} was reported:\n"
                    + run.stderr.read()[-2000:]
                )
            time.sleep(0.5)
    finally:
        run.kill()
        run.wait()


def train_rate(
    config: str, out: Path, start: int, stop: int, overrides: list[str], env: dict | None = None
) -> float:
    """Steps per second of `openmm-nice train` between the metrics rows of steps start and
    stop (:func:`train_rows`)."""
    first, last = train_rows(config, out, start, stop, overrides, env=env)
    return (stop - start) / (float(last["elapsed_s"]) - float(first["elapsed_s"]))


def add_rate_arguments(parser: argparse.ArgumentParser, stop: int = 300) -> None:
    """The options every training-rate benchmark shares: the config, the trials of each
    condition, the steps the rate is timed between, and config overrides."""
    parser.add_argument("--config", default="examples/alanine_dipeptide.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="trials of each condition")
    parser.add_argument("--start", type=int, default=50, help="step the rate is timed from")
    parser.add_argument("--stop", type=int, default=stop, help="step the rate is timed to")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


def rate_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The trainings' overrides (metrics every --start steps, then --set), once the shared
    options are checked."""
    if not 0 < args.start < args.stop:
        parser.error("--start and --stop must satisfy 0 < start < stop")
    if args.stop % args.start:
        parser.error("--stop must be a multiple of --start (metrics are written every --start)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return [f"training.report_interval={args.start}"] + args.set


def print_rates(rates: dict[str, list[float]], heading: str = "condition") -> dict[str, float]:
    """A table of each condition's rates and their mean; returns the means."""
    mean = {c: sum(v) / len(v) for c, v in rates.items()}
    print(f"\n{heading:10s} {'steps/s (each trial)':28s} mean")
    for condition, values in rates.items():
        listed = ", ".join(f"{v:.3f}" for v in values)
        print(f"{condition:10s} {listed:28s} {mean[condition]:.3f}")
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rate_arguments(parser)
    parser.add_argument(
        "--beside",
        choices=["busy", "training"],
        default="busy",
        help="the other process: a nice-19 busy loop, or a second training of the config",
    )
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the trainings")
    args = parser.parse_args()
    overrides = rate_overrides(parser, args)
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    other = args.beside
    rates: dict[str, list[float]] = {"alone": [], other: []}
    counters = cpu_counters()
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(2 * args.repeats):
            condition = ("alone", other)[trial % 2]
            if condition == "training":
                beside = other_training(
                    args.config, Path(tmp) / f"other{trial}", overrides, env, args.start
                )
            else:
                beside = busy_process(condition == "busy")
            with beside:
                rate = train_rate(
                    args.config, Path(tmp) / f"trial{trial}", args.start, args.stop, overrides, env
                )
            rates[condition].append(rate)
            print(f"trial {trial}: {condition:8s} {rate:.2f} steps/s", flush=True)
    stolen = stolen_fraction(counters, cpu_counters())
    mean = print_rates(rates)
    slowdown = mean["alone"] / mean[other]
    if other == "busy":
        print(f"slowdown beside a nice-19 busy process: {slowdown:.2f}x (issue 32: at most 1.5x)")
    else:
        print(f"slowdown beside a second training: {slowdown:.2f}x (a fair share of 2 cores: 2x)")
    line = {
        "benchmark": "niceness",
        "config": args.config,
        "beside": other,
        "omp_num_threads": env.get("OMP_NUM_THREADS"),
        "overrides": args.set,
        "steps": [args.start, args.stop],
        "steps_per_s": rates,
        "slowdown": slowdown,
        "stolen_fraction": stolen,
        **machine_facts(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
