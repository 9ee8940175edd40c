"""Facts about the machine and the software a benchmark ran on, for its JSON line."""

from __future__ import annotations

import json
import os

import openmm
import torch


def machine_facts() -> dict:
    """Usable cores, torch threads and the OpenMM and torch versions."""
    return {
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "openmm": openmm.__version__,
        "torch": torch.__version__,
    }


def cpu_counters() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat's first line: user, nice, system, idle,
    iowait, irq, softirq, steal, ...), in clock ticks; None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def stolen_fraction(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of the machine's CPU time between two :func:`cpu_counters` that the
    hypervisor gave to other guests (steal): a virtual core running other work at the host's
    call is slower for reasons no process here can see."""
    if before is None or after is None or len(before) < 8:
        return None
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta[:8])
    return delta[7] / total if total > 0 else None


def alanine_json_line(
    benchmark: str, args, loads: tuple[float, float], platforms: dict, **facts
) -> str:
    """The JSON line of an alanine-dipeptide energy benchmark (batch, repeats, machine, load,
    and any further ``facts``)."""
    return json.dumps(
        {
            "benchmark": benchmark,
            "system": "alanine_dipeptide_vacuum",
            "batch": args.batch,
            "repeats": args.repeats,
            **machine_facts(),
            "load_average": list(loads),
            **facts,
            "platforms": platforms,
        }
    )
