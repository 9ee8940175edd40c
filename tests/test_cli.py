"""The command line and its files, as the design's contracts describe them."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from openmm_nice.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "system": "double_well_1d",
    "model": {"latent_dim": 2, "layers": 2, "hidden": [8], "conditional_hidden": [8]},
    "training": {
        "steps": 40,
        "batch_size": 64,
        "anneal_steps": 20,
        "report_interval": 10,
        "checkpoint_interval": 20,
    },
}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_train_sample_reweight(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "--out", str(run), "--quiet"]) == 0
    for name in (
        "checkpoint.pt",
        "config.yaml",
        "metrics.csv",
        "summary.json",
        "loss.png",
        "figure1.png",
    ):
        assert (run / name).is_file(), name
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 40
    summary = json.loads((run / "summary.json").read_text())
    assert {"ess", "log_z", "log_z_error", "j_r", "j_r_error", "kl_bound"} <= set(summary)
    # the weights' tail diagnostic (a contract in DESIGN.md)
    assert {"max_weight_share", "pareto_k", "block_ess", "reliable"} <= set(summary)
    assert 0 < summary["max_weight_share"] <= 1 and len(summary["block_ess"]) == 4
    assert summary["kl_bound"] > -3 * summary["j_r_error"]  # a KL bound is non-negative

    samples = tmp_path / "s.npz"
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "5000", "--out", str(samples)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {"ess", "max_weight_share", "pareto_k", "block_ess", "reliable"} <= set(printed)
    with np.load(samples) as data:
        assert data["x"].shape == (5000, 1) and data["x"].dtype == np.float64
        assert data["log_w"].shape == (5000,) and data["u"].shape == (5000,)
        np.testing.assert_allclose(data["u"], DoubleWell_potential(data["x"][:, 0]))

    # latent-space AIS: from the command line, and from the run's sampling.ais_steps
    ais = tmp_path / "ais.npz"
    args = ["sample", str(run), "--n", "2000", "--out", str(ais), "--quiet"]
    for preconditioner, schedule in (("identity", "linear"), ("fisher", "adaptive")):
        options = ["--ais-preconditioner", preconditioner, "--ais-schedule", schedule]
        assert main([*args, "--ais-steps", "4", *options]) == 0
        with np.load(ais) as data:
            assert int(data["ais_steps"]) == 4 and np.isfinite(data["log_w"]).all()
            np.testing.assert_allclose(data["u"], DoubleWell_potential(data["x"][:, 0]))
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["sampling"] == {
        "ais_steps": 0,
        "ais_batch_size": 4096,
        "ais_preconditioner": "identity",
        "ais_schedule": "linear",
    }
    config = yaml.safe_load(tiny_config.read_text())
    config["sampling"] = {"ais_steps": 3}
    tiny_config.write_text(yaml.safe_dump(config))
    run_ais = tmp_path / "run_ais"
    assert main(["train", str(tiny_config), "--out", str(run_ais), "--quiet", "--steps", "5"]) == 0
    assert main(["sample", str(run_ais), "--n", "500", "--out", str(ais), "--quiet"]) == 0
    with np.load(ais) as data:
        assert int(data["ais_steps"]) == 3

    out = tmp_path / "rw"
    assert main(["reweight", str(samples), "--run", str(run), "--out", str(out)]) == 0
    report = json.loads((out / "summary.json").read_text())
    assert report["p(x0<0)"]["exact"] == pytest.approx(0.93273, abs=1e-5)
    assert (out / "profile_x0.png").is_file() and (out / "profile_x0_reweighted.csv").is_file()


def DoubleWell_potential(x):  # noqa: N802
    return x**4 - 4 * x**2 + x


def test_existing_run_needs_resume_and_bad_configs_are_named(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "--out", str(run), "--quiet", "--steps", "5"]) == 0
    assert main(["train", str(tiny_config), "--out", str(run), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("system: double_well_1d\ntraining:\n  batch: 3\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "training.batch" in capsys.readouterr().err
    bad.write_text("system: no_such_system\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "r3"), "--quiet"]) == 2
    assert "double_well_1d" in capsys.readouterr().err
    argv = ["train", str(tiny_config), "--out", str(tmp_path / "r4"), "--quiet"]
    assert main([*argv, "--set", "training.batch=3"]) == 2
    assert "training.batch; valid keys in training are" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run), "--set", "seed=1", "--quiet"]) == 2
    assert "differs from the one" in capsys.readouterr().err


def test_resume_is_exact_or_refused_and_keeps_config_yaml(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "--out", str(run), "--quiet", "--steps", "5"]) == 0
    saved = (run / "config.yaml").read_text()
    other = tmp_path / "other.yaml"
    config = yaml.safe_load(tiny_config.read_text())
    config["training"]["learning_rate"] = 0.01
    other.write_text(yaml.safe_dump(config))
    for argv in (
        [str(other)],
        ["--steps", "9"],
        ["--seed", "7"],
        ["--set", "model.layers=3"],
    ):
        capsys.readouterr()
        assert main(["train", *argv, "--resume", "--out", str(run), "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert "--resume: the config differs" in err
    assert "training.learning_rate" in _refusal(run, other, capsys)
    assert "training.steps" in _refusal(run, "--steps", capsys)
    assert (run / "config.yaml").read_text() == saved
    # the same config (given again, or the run's own) and another device resume
    argv = ["train", str(tiny_config), "--resume", "--out", str(run), "--quiet"]
    assert main([*argv, "--steps", "5", "--device", "cpu"]) == 0
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    assert (run / "config.yaml").read_text() == saved


def _refusal(run, what, capsys) -> str:
    argv = ["--steps", "9"] if what == "--steps" else [str(what)]
    capsys.readouterr()
    assert main(["train", *argv, "--resume", "--out", str(run), "--quiet"]) == 2
    return capsys.readouterr().err


def test_sweep_writes_j_r_per_latent_dimension(tmp_path, tiny_config, capsys):
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                str(tiny_config),
                "--latent-dims",
                "1,2",
                "--out",
                str(out),
                "--quiet",
                "--n-eval",
                "2000",
            ]
        )
        == 0
    )
    result = json.loads((out / "sweep.json").read_text())
    assert [r["latent_dim"] for r in result["results"]] == [1, 2]
    best = min(result["results"], key=lambda r: r["j_r"])
    assert result["chosen_latent_dim"] == best["latent_dim"]
    assert "chosen latent_dim" in capsys.readouterr().out


def test_sigkill_then_resume_finishes_with_continuous_metrics(tmp_path):
    config = dict(TINY)
    config["training"] = dict(
        TINY["training"], steps=3000, checkpoint_interval=25, report_interval=25
    )
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "openmm_nice.cli",
        "train",
        str(path),
        "--out",
        str(run),
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "checkpoint.pt").exists() and torch.load(
            run / "checkpoint.pt", weights_only=True
        )["step"] >= 100:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < killed_at < 3000
    resume = [
        sys.executable,
        "-m",
        "openmm_nice.cli",
        "train",
        "--resume",
        "--out",
        str(run),
        "--quiet",
    ]
    subprocess.run(resume, env=env, check=True, timeout=600)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3000
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert steps == list(range(25, steps[-1] + 1, 25))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes(
    tmp_path, tiny_config, capsys, monkeypatch, signum
):
    """The signal arrives during step 7 (of 40, checkpoints every 20): the step is finished,
    the checkpoint holds step 7, no summary is written, the handlers are put back, and the
    command says how to go on; the resumed run finishes."""
    from openmm_nice.training.trainer import Trainer

    take_step = Trainer._train_step

    def step_with_signal(self):
        if self.step == 6:
            os.kill(os.getpid(), signum)
        return take_step(self)

    monkeypatch.setattr(Trainer, "_train_step", step_with_signal)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "--out", str(run), "--quiet"]) == 128 + signum
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name} after step 7" in err and "--resume" in err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 7
    assert not (run / "summary.json").exists()
    assert {s: signal.getsignal(s) for s in before} == before
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 40
    assert (run / "summary.json").is_file()


def test_asking_for_a_gpu_without_one_is_a_clear_error(tmp_path, tiny_config, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", str(tiny_config), "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_and_sampling_on_the_gpu(tmp_path, tiny_config):
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "--out", str(run), "--device", "cuda", "--quiet"]) == 0
    samples = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "1000", "--out", str(samples), "--quiet"]) == 0
    with np.load(samples) as data:
        assert np.isfinite(data["log_w"]).all()


def test_mcmc_writes_the_chain_energies_angles_and_acceptance(tmp_path, alanine_run, capsys):
    import mdtraj

    from openmm_nice.analysis.observables import ramachandran
    from openmm_nice.runs import load_run

    out = tmp_path / "chain.dcd"
    args = ["mcmc", str(alanine_run), "--n-iterations", "4", "--langevin-steps", "5"]
    assert main([*args, "--proposals", "3", "--out", str(out), "--seed", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, target, _ = load_run(alanine_run)
    traj = mdtraj.load(str(out), top=target.mdtraj_topology())
    assert traj.n_frames == 4
    with np.load(tmp_path / "chain.npz") as data:
        x, u = data["x"], data["u"]
        assert x.shape == (4, 66) and (data["log_w"] == 0).all()
        np.testing.assert_allclose(traj.xyz.reshape(4, -1), x, atol=1e-5)  # DCD is float32
        np.testing.assert_allclose(u, target.energy(torch.as_tensor(x)).numpy(), rtol=1e-9)
        phi, psi = ramachandran(x, target.mdtraj_topology())
        np.testing.assert_allclose(data["phi"], phi)
        np.testing.assert_allclose(data["psi"], psi)
        assert data["accepted"].shape == (4,) and 0 <= data["accepted"].max() <= 3
        assert float(data["acceptance"]) == pytest.approx(data["accepted"].sum() / 12)
        assert float(data["acceptance"]) == pytest.approx(report["acceptance"])
    target.close()
    assert main([*args, "--out", str(tmp_path / "chain.npz"), "--quiet"]) == 2
    assert "trajectory" in capsys.readouterr().err


def test_no_module_of_the_package_imports_the_command_line():
    package = ROOT / "openmm_nice"
    for path in package.glob("*.py"):
        if path.name != "cli.py":
            text = path.read_text()
            assert "openmm_nice.cli" not in text and "from openmm_nice import cli" not in text, path


def test_user_errors_are_one_line_but_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    import openmm_nice.cli as cli
    from openmm_nice.errors import UserInputError

    def fails_with(error):
        def train_run(*args, **kwargs):
            raise error

        return train_run

    argv = ["train", str(ROOT / "examples" / "double_well_1d.yaml"), "--out", str(tmp_path / "r")]
    monkeypatch.setattr(cli, "train_run", fails_with(UserInputError("give a better value")))
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "openmm-nice train: error: give a better value"
    for bug in (ValueError("a bug"), TypeError("another bug")):
        monkeypatch.setattr(cli, "train_run", fails_with(bug))
        with pytest.raises(type(bug), match="bug"):
            main(argv)


def test_a_file_that_is_not_an_npz_and_a_latent_dim_below_d_get_one_line(tmp_path, capsys):
    config = tmp_path / "dw.yaml"
    config.write_text(yaml.safe_dump({"system": "double_well_1d"}))
    for content in (b"hello", b"PK\x03\x04 not a zip"):
        bad = tmp_path / "bad.npz"
        bad.write_bytes(content)
        argv = ["reweight", str(bad), "--config", str(config), "--out", str(tmp_path / "rw")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not an npz sample file" in err, err
    small = tmp_path / "small.yaml"
    small.write_text(
        yaml.safe_dump({"system": "alanine_dipeptide_vacuum", "model": {"latent_dim": 10}})
    )
    assert main(["train", str(small), "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.latent_dim is 10" in err and "at least 60" in err, err


def test_commands_run_torch_on_one_thread_unless_told_and_restore_the_callers(
    monkeypatch, tmp_path, capsys
):
    import openmm_nice.cli as cli
    from openmm_nice.errors import UserInputError

    seen = []

    def train_run(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise UserInputError("stop here")

    monkeypatch.setattr(cli, "train_run", train_run)
    argv = ["train", str(ROOT / "examples" / "double_well_1d.yaml"), "--out", str(tmp_path / "r")]
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        assert main(argv) == 2 and seen[-1] == 1  # the default: one thread
        assert main([*argv, "--threads", "2"]) == 2 and seen[-1] == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting is torch's business
        torch.set_num_threads(3)
        assert main(argv) == 2 and seen[-1] == 3
        assert torch.get_num_threads() == 3  # the caller's count is back after each command
        capsys.readouterr()
        assert main([*argv, "--threads", "0"]) == 2
        assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
