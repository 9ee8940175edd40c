"""The README's Python example runs as printed, saved as a script without a main guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    """The ```python blocks of the README's Python section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def run_script(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` saved as a script, from a folder that holds the repository's data/."""
    script = tmp_path / "example.py"
    script.write_text(code)
    (tmp_path / "data").symlink_to(ROOT / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_outputs(tmp_path: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ESS/N after AIS" in result.stdout and "kT" in result.stdout
    assert (tmp_path / "runs" / "alanine_pdb" / "ramachandran.csv").is_file()


def test_readme_python_example_runs_as_a_plain_script(tmp_path):
    code = python_blocks()[0]
    assert "__main__" not in code and '"n_workers": 2' in code
    check_outputs(tmp_path, run_script(tmp_path, code))


def test_readme_flow_example_runs():
    namespace: dict = {}
    exec(python_blocks()[1], namespace)
    assert namespace["x"].shape == (1000, 1)
