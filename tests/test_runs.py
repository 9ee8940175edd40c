"""Run folders through the library: train, load, sample as configured, and the process group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from openmm_nice.config import config_from_dict
from openmm_nice.errors import ConfigError, UserInputError
from openmm_nice.runs import Run, load_run, sample_run, train_run

TINY = {
    "system": "double_well_1d",
    "model": {"latent_dim": 2, "layers": 2, "hidden": [8], "conditional_hidden": [8]},
    "training": {"steps": 5, "batch_size": 32, "anneal_steps": 2, "report_interval": 5},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_run(config_from_dict(TINY), run, quiet=True, n_eval=500)
    return run


def test_a_loaded_run_unpacks_and_samples_as_configured(tiny_run, tmp_path):
    with load_run(tiny_run) as run:
        assert isinstance(run, Run)
        config, target, generator = run
        assert config.model.latent_dim == 2 and target.name == "double_well_1d"
        out = tmp_path / "s.npz"
        samples = sample_run(run, 300, out=out, ais_steps=2, seed=3)
    assert samples.x.shape == (300, 1) and samples.ais_steps == 2
    assert samples.ais_acceptance.shape == (2,)
    np.testing.assert_allclose(
        samples.u, samples.x[:, 0] ** 4 - 4 * samples.x[:, 0] ** 2 + samples.x[:, 0]
    )
    with np.load(out) as data:
        np.testing.assert_array_equal(data["log_w"], samples.log_w)
        assert int(data["ais_steps"]) == 2
    again = sample_run(tiny_run, 300, ais_steps=2, seed=3)  # from the folder: the same draws
    np.testing.assert_array_equal(again.x, samples.x)
    assert 0 < again.ess <= 1
    with pytest.raises(UserInputError, match="toy target"):
        sample_run(tiny_run, 10, traj=tmp_path / "s.dcd")


def test_training_leaves_a_process_group_it_did_not_create(tmp_path):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        summary = train_run(config_from_dict(TINY), tmp_path / "run", quiet=True, n_eval=200)
        assert summary["processes"] == 1 and summary["steps"] == 5
        assert dist.is_initialized()
        dist.barrier()  # and the group still works
    finally:
        dist.destroy_process_group()


def test_a_run_folder_must_be_new_unless_resumed(tiny_run):
    config = config_from_dict(TINY)
    with pytest.raises(FileExistsError, match="--resume"):
        train_run(config, tiny_run, quiet=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_run(config, tiny_run.parent / "new", resume=True, quiet=True)
    assert torch.load(tiny_run / "checkpoint.pt", weights_only=True)["step"] == 5


def test_a_run_saved_before_a_key_existed_loads_and_resumes_as_it_was_trained(tmp_path):
    """model.stiff_conditioning's default is "learned" (trained parameters); a run
    whose saved config lacks the key was written before it existed, without them: load_run and
    a resume read it with the value it was trained with, not today's default."""
    import yaml

    from openmm_nice.config import EARLIER_DEFAULTS, load_config
    from openmm_nice.runs import _check_resumed_config

    assert config_from_dict({}).model.stiff_conditioning == "learned"
    data = {
        "system": "alanine_dipeptide_vacuum",
        "model": {"latent_dim": 62, "layers": 2, "hidden": [8], "conditional_hidden": [8]},
        "training": {"steps": 2, "batch_size": 16, "beta_start": 1.0, "anneal_steps": 0},
    }
    data["model"].update({key: value for (_, key), value in EARLIER_DEFAULTS.items()})
    run = tmp_path / "old"
    train_run(config_from_dict(data), run, quiet=True, n_eval=50)
    # what the older version wrote: the same run without the keys it did not have
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in EARLIER_DEFAULTS:
        del state["config"][section][key], saved[section][key]
    torch.save(state, run / "checkpoint.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with load_run(run) as (config, _, generator):
        assert config.model.stiff_conditioning is False
        assert config.model.initial_torsions == "uniform"
        assert config.model.torsion_tree_smoothing == "fixed"
        assert not any("stiff" in name for name, _ in generator.named_parameters())
    resumed = load_config(run / "config.yaml", saved_run=True)
    _check_resumed_config(resumed, state, run / "checkpoint.pt")  # no difference: resumable
    with pytest.raises(ConfigError, match="model.stiff_conditioning"):
        _check_resumed_config(load_config(run / "config.yaml"), state, run / "checkpoint.pt")
