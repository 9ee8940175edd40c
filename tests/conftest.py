"""Shared fixtures: float64 by default for density tests, and a device fixture."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests run torch on one thread, as the package's commands do by default: their
    operations are small, and a second OpenMP thread makes each one wait for it (twice as slow
    on 2 cores, and several times slower while anything else runs: benchmarks/RESULTS.md,
    "Torch threads in the training process"). Tests of the thread settings set their own."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def float64_and_seed(request):
    """float64 by default; a test marked ``float32`` runs as users do, in torch's float32."""
    previous = torch.get_default_dtype()
    float32 = request.node.get_closest_marker("float32") is not None
    torch.set_default_dtype(torch.float32 if float32 else torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    return torch.device(request.param)


@pytest.fixture(scope="session")
def alanine_run(tmp_path_factory):
    """A run folder of alanine dipeptide in vacuum trained for 3 steps (a poor model), D > d."""
    from openmm_nice.config import config_from_dict
    from openmm_nice.runs import train_run

    config = config_from_dict(
        {
            "system": "alanine_dipeptide_vacuum",
            "seed": 0,
            "model": {"latent_dim": 62, "layers": 2, "hidden": [32], "conditional_hidden": [16]},
            "training": {
                "steps": 3,
                "batch_size": 32,
                "beta_start": 1.0,
                "anneal_steps": 0,
                "report_interval": 1,
            },
        }
    )
    run = tmp_path_factory.mktemp("alanine") / "run"
    train_run(config, run, quiet=True, n_eval=200)
    return run
