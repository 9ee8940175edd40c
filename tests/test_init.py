"""The public API: every exported name resolves, and openmmtools is imported on first use only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openmm_nice

ROOT = Path(__file__).resolve().parent.parent


def test_every_exported_name_resolves():
    for name in openmm_nice.__all__:
        assert getattr(openmm_nice, name) is not None, name
    for name in ("load_config", "config_from_dict", "train_run", "load_run", "sample_run"):
        assert name in openmm_nice.__all__


def test_the_move_is_imported_lazily():
    script = (
        "import sys, openmm_nice\n"
        "assert 'openmmtools' not in sys.modules\n"
        "assert openmm_nice.BoltzmannGeneratorMove.__module__ == 'openmm_nice.moves'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)
