"""torchrun training: two CPU processes match one, write their files once, and survive kill -9."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

CONFIG = {
    "system": "double_well_1d",
    "model": {"latent_dim": 2, "layers": 4, "hidden": [32], "conditional_hidden": [16]},
    "training": {
        "steps": 800,
        "batch_size": 256,
        "learning_rate": 0.003,
        "anneal_steps": 400,
        "report_interval": 20,
        "checkpoint_interval": 100,
    },
}
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "openmm_nice.cli",
        *args,
    ]


def _config(tmp_path: Path, **training) -> Path:
    config = {**CONFIG, "training": {**CONFIG["training"], **training}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_processes_match_one_and_write_files_once(tmp_path):
    path = _config(tmp_path)
    single, double = tmp_path / "single", tmp_path / "double"
    cli = [sys.executable, "-m", "openmm_nice.cli"]
    subprocess.run(
        [*cli, "train", str(path), "--out", str(single), "--quiet"],
        env=ENV,
        check=True,
        timeout=600,
    )
    subprocess.run(
        _torchrun("train", str(path), "--out", str(double), "--quiet"),
        env=ENV,
        check=True,
        timeout=600,
    )
    steps = [int(r["step"]) for r in csv.DictReader(open(double / "metrics.csv"))]
    assert steps == list(range(20, 801, 20))  # each report once, not once per rank
    assert sorted(p.name for p in double.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint.pt"
    ]
    assert not list(double.glob(".*tmp"))
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((double / "summary.json").read_text())
    assert s2["processes"] == 2 and s2["steps"] == 800
    exact = s1["log_z_exact"]
    for s in (s1, s2):
        assert abs(s["log_z"] - exact) < 5 * s["log_z_error"] + 0.02
        assert s["ess"] > 0.5
    assert abs(s1["kl_bound"] - s2["kl_bound"]) < 0.05


def test_kill_minus_nine_of_one_rank_stops_the_job_and_resume_completes(tmp_path):
    path = _config(tmp_path, steps=1500, checkpoint_interval=50)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _torchrun("train", str(path), "--out", str(run), "--quiet"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.2)
    assert (run / "checkpoint.pt").exists(), "training never wrote a checkpoint"
    workers = subprocess.run(
        ["pgrep", "-f", "-P", str(proc.pid), "openmm_nice.cli"], capture_output=True, text=True
    )
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2, workers.stdout
    os.kill(pids[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # an error, not a hang
    killed_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert killed_at < 1500, "the run ended before the kill"
    resume = _torchrun("train", "--resume", "--out", str(run), "--quiet")
    subprocess.run(resume, env=ENV, check=True, timeout=600)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1500
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    end = 1500
    assert steps == list(range(20, end + 1, 20)) + (
        [end] if end % 20 else []
    )  # the end is reported
