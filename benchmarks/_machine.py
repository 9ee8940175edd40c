"""Facts about the machine and the software a benchmark ran on, for its JSON line."""

from __future__ import annotations

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
