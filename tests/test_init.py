"""The public API: every exported name resolves, and openmmtools is imported on first use only."""

from __future__ import annotations

import os
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
        "assert openmm_nice.BoltzmannGeneratorMove.__module__ == 'openmm_nice.sampling.moves'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)


def test_no_import_cycle_among_the_package_modules():
    """Every import between the package's modules, lazy ones included, goes one way."""
    import ast
    from pathlib import Path

    package = Path(__file__).parents[1] / "openmm_nice"
    modules = {
        p.relative_to(package).with_suffix("").as_posix().replace("/", "."): p
        for p in package.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("openmm_nice")
            ):
                target = node.module.removeprefix("openmm_nice").lstrip(".")
                if target:
                    imported.add(target)
                else:
                    imported |= {a.name for a in node.names if a.name in modules}
        graph[name] = {m for m in imported if m in modules and m != name and m != "__init__"}

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    cycles = sorted(m for m in graph if m in reachable(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_openmp_threads_sleep_while_they_wait_unless_the_user_says_otherwise():
    """Importing the package before torch makes OpenMP's idle threads sleep (they spun, and
    collapsed the torch engine beside busy processes); a policy the user set is kept."""
    code = "import os, openmm_nice, torch\nprint(os.environ['OMP_WAIT_POLICY'])\n"
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given is not None:
            env["OMP_WAIT_POLICY"] = given
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert result.stdout.split()[-1] == expected
