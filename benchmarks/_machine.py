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


def alanine_json_line(benchmark: str, args, loads: tuple[float, float], platforms: dict) -> str:
    """The JSON line of an alanine-dipeptide energy benchmark (batch, repeats, machine, load)."""
    return json.dumps(
        {
            "benchmark": benchmark,
            "system": "alanine_dipeptide_vacuum",
            "batch": args.batch,
            "repeats": args.repeats,
            **machine_facts(),
            "load_average": list(loads),
            "platforms": platforms,
        }
    )
