"""The shipped examples do what the README and the issues promise."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from openmm_nice.analysis.reweighting import (
    effective_sample_size,
    log_partition_function,
    probability,
)
from openmm_nice.cli import main

ROOT = Path(__file__).resolve().parent.parent
# shortened molecule runs: the map refits and the buffer additions draw 1,024 samples (not 100,000
# and 4,096), so that the smoke tests spend their time on every stage, not on one
SMALL_DRAWS = ["--set", "training.refit_samples=1024", "--set", "training.buffer_draws=1024"]


def _readme_main_job() -> list[list[str]]:
    """The openmm-nice commands of the README's first (main-job) command line."""
    lines = (ROOT / "README.md").read_text().splitlines()
    command = next(line.strip() for line in lines if line.startswith("    pip install"))
    parts = [shlex.split(p) for p in command.split("&&")]
    assert parts[0][:2] == ["pip", "install"]
    return [p for p in parts[1:] if p[0] == "openmm-nice"]


def test_readme_main_job_runs_shortened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "data").symlink_to(ROOT / "data")
    commands = _readme_main_job()
    assert commands[0][1] == "train"
    for argv in commands:
        args = argv[1:]
        if args[0] == "train":  # 20 steps; the map refit and the buffer take 1,024 draws each
            args += ["--steps", "20", "--quiet", *SMALL_DRAWS]
        if args[0] == "sample":  # the configured AIS levels on 256 samples
            args[args.index("--n") + 1] = "256"
        assert main(args) == 0, argv


@pytest.mark.slow
def test_note_example_meets_the_accuracy_of_issue_2(tmp_path):
    """The full default training of the note's example (about a minute here)."""
    run, samples = tmp_path / "run", tmp_path / "s.npz"
    assert (
        main(["train", str(ROOT / "examples/double_well_1d.yaml"), "--out", str(run), "--quiet"])
        == 0
    )
    assert main(["sample", str(run), "--n", "200000", "--out", str(samples), "--quiet"]) == 0
    with np.load(samples) as data:
        x, log_w = data["x"][:, 0], data["log_w"]
    assert effective_sample_size(log_w) / len(log_w) >= 0.95
    assert abs(log_partition_function(log_w) - 5.03228) < 0.01
    assert abs(probability(x < 0, log_w, n_bootstrap=0).value - 0.93273) < 0.003
    assert abs(probability(x < 0, n_bootstrap=0).value - 0.93273) < 0.01
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kl_bound"] >= -3 * summary["j_r_error"]


def test_alanine_example_trains_and_samples_with_openmm_energies(tmp_path):
    """examples/alanine_dipeptide.yaml as shipped (data-free), shortened to a few
    steps: the sample file's u is OpenMM's E/kT of its x, and the trajectory loads."""
    import mdtraj
    import openmm
    import openmm.unit as unit

    from openmm_nice.molecule.systems import alanine_dipeptide_vacuum

    run = tmp_path / "run"
    config = str(ROOT / "examples" / "alanine_dipeptide.yaml")
    shortened = ["--steps", "3", "--quiet", *SMALL_DRAWS]
    assert main(["train", config, "--out", str(run), *shortened]) == 0
    samples, traj = tmp_path / "s.npz", tmp_path / "s.dcd"
    assert main(["sample", str(run), "--n", "64", "--out", str(samples), "--traj", str(traj)]) == 0
    with np.load(samples) as data:
        x, log_w, u = data["x"], data["log_w"], data["u"]
    assert x.shape == (64, 66) and x.dtype == np.float64 and log_w.shape == u.shape == (64,)
    molecule = alanine_dipeptide_vacuum()
    context = openmm.Context(
        molecule.system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    kt = unit.MOLAR_GAS_CONSTANT_R * 300 * unit.kelvin
    for i in (0, 63):
        context.setPositions(x[i].reshape(-1, 3))
        expected = context.getState(getEnergy=True).getPotentialEnergy() / kt
        assert u[i] == pytest.approx(expected, rel=1e-9, abs=1e-6)
    assert mdtraj.load(str(traj), top=mdtraj.Topology.from_openmm(molecule.topology)).n_frames == 64


@pytest.mark.parametrize("config", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_trains_with_a_set_override(tmp_path, config):
    run = tmp_path / config.stem
    assert (
        main(["train", str(config), "--set", "training.steps=10", "--out", str(run), "--quiet"])
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["n"] == 20000
