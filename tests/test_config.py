"""Configs are validated: unknown keys and wrong types are errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from openmm_nice.config import ConfigError, config_from_dict, load_config
from openmm_nice.training.trainer import WeightSchedule

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    config = load_config(path)
    assert config.training.steps > 0


def test_defaults_and_round_trip():
    config = config_from_dict({"system": "double_well_2d", "model": {"latent_dim": 3}})
    assert config.model.latent_dim == 3 and config.training.batch_size == 512
    again = config_from_dict(config.to_dict())
    assert again == config


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"training\.stpes.*valid keys in training are: steps"):
        config_from_dict({"training": {"stpes": 10}})
    with pytest.raises(ConfigError, match="unknown config key.*tempreature"):
        config_from_dict({"tempreature": 300})


def test_wrong_types_and_ranges_are_named():
    with pytest.raises(ConfigError, match=r"training\.steps: expected an integer, got 'many'"):
        config_from_dict({"training": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"model\.hidden\[1\]"):
        config_from_dict({"model": {"hidden": [64, "wide"]}})
    with pytest.raises(ConfigError, match=r"temperature: expected a number > 0, got -1"):
        config_from_dict({"temperature": -1})
    with pytest.raises(ConfigError, match="needs training.data"):
        config_from_dict({"training": {"ml_weight": 1.0}})
    with pytest.raises(ConfigError, match=r"dtype: expected 'float32' or 'float64'"):
        config_from_dict({"dtype": "bfloat16"})  # no mixed precision for densities
    with pytest.raises(ConfigError, match="beta_start"):
        config_from_dict({"training": {"beta_start": 0.0}})
    with pytest.raises(ConfigError, match="ml_weight_final > 0\\) needs training.data"):
        config_from_dict({"training": {"ml_weight_final": 0.5}})
    with pytest.raises(ConfigError, match=r"training\.walkers must be between 0 and"):
        config_from_dict({"training": {"batch_size": 64, "walkers": 128}})
    with pytest.raises(
        ConfigError, match=r"model\.torsion_smoothing: expected a number or 'auto', got 'wide'"
    ):
        config_from_dict({"model": {"torsion_smoothing": "wide"}})
    assert (
        config_from_dict({"model": {"torsion_smoothing": "auto"}}).model.torsion_smoothing == "auto"
    )
    with pytest.raises(ConfigError, match=r"model\.torsion_floor: expected a number > 0, got 0"):
        config_from_dict({"model": {"torsion_floor": 0}})
    with pytest.raises(ConfigError, match=r"sampling\.ais_steps: expected a number >= 0, got -2"):
        config_from_dict({"sampling": {"ais_steps": -2}})
    with pytest.raises(ConfigError, match=r"sampling\.ais_stpes.*valid keys in sampling"):
        config_from_dict({"sampling": {"ais_stpes": 2}})
    with pytest.raises(ConfigError, match=r"model\.torsion_floor: expected a number <= 1"):
        config_from_dict({"model": {"torsion_floor": 1.5}})
    with pytest.raises(
        ConfigError, match=r"training\.lr_schedule: expected 'cosine' or 'constant'"
    ):
        config_from_dict({"training": {"lr_schedule": "linear"}})
    with pytest.raises(ConfigError, match=r"training\.map_refits\[1\]: expected a number >= 0"):
        config_from_dict({"training": {"map_refits": [10, -1]}})


def test_assignments_are_checked_like_the_yaml_and_a_refused_one_changes_nothing():
    config = config_from_dict({"training": {"batch_size": 64}})
    with pytest.raises(ConfigError, match=r"training\.steps: expected a number >= 0, got -3"):
        config.training.steps = -3
    with pytest.raises(ConfigError, match=r"training\.walkers must be between 0 and"):
        config.training.walkers = 128  # each key in range, the pair not
    assert config.training.walkers == 0 and config.training.steps == 4000
    with pytest.raises(ConfigError, match=r"temperature: expected a number > 0"):
        config.temperature = 0.0
    assert config.temperature == 300.0
    config.training.walkers = 32
    assert config.training.walkers == 32


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "frames.npz").write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text("system: double_well_1d\ntraining:\n  data: frames.npz\n")
    assert load_config(path).training.data == str(tmp_path / "frames.npz")


def test_a_list_of_data_files_resolves_each_against_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("system: double_well_1d\ntraining:\n  data: [a.npz, /elsewhere/b.npz]\n")
    assert load_config(path).training.data == [str(tmp_path / "a.npz"), "/elsewhere/b.npz"]


def test_fewer_steps_shorten_the_anneal_so_training_ends_at_the_target():
    config = config_from_dict(
        {
            "training": {
                "steps": 4000,
                "anneal_steps": 2500,
                "refit_steps": 500,
                "kl_weight": [[0, 1.0], [2000, 1.0], [2500, 0.25]],
                "forward_alpha": [[0, 1.0], [3000, 2.0]],
                "walker_weight": 0.5,
            }
        }
    )
    config.set_steps(800)
    t = config.training
    assert t.steps == 800 and t.anneal_steps == 500 and t.refit_steps == 100
    # the loss weights change at the same stages of the shorter run
    assert t.kl_weight == [[0, 1.0], [400, 1.0], [500, 0.25]]
    assert t.forward_alpha == [[0, 1.0], [600, 2.0]] and t.walker_weight == 0.5
    config.set_steps(100000)
    assert t.anneal_steps == 500 and t.kl_weight[-1] == [500, 0.25]
    config.set_steps(2)  # stages that fall on one step stay in order; a refit keeps one step
    assert t.kl_weight == [[0, 1.0], [0, 1.0], [0, 0.25]] and t.refit_steps == 1
    assert WeightSchedule(t.kl_weight)(0) == 0.25 and WeightSchedule(t.kl_weight)(1) == 0.25


def test_overrides_set_keys_before_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("system: double_well_1d\ntraining:\n  steps: 4000\n")
    config = load_config(
        path, ["training.steps=10", "model.hidden=[32, 16]", "seed=7", "model.latent_dim=null"]
    )
    assert config.training.steps == 10 and config.model.hidden == [32, 16] and config.seed == 7
    assert config.model.latent_dim is None and config.training.batch_size == 512
    config = load_config(path, ["system={pdb: mol.pdb}", "system.forcefield=[amber14-all.xml]"])
    assert config.system == {"pdb": str(tmp_path / "mol.pdb"), "forcefield": ["amber14-all.xml"]}
    with pytest.raises(ConfigError, match=r"training\.stpes; valid keys in training are: steps"):
        load_config(path, ["training.stpes=10"])
    with pytest.raises(ConfigError, match="unknown config key 'tempreature'"):
        load_config(path, ["tempreature=300"])
    with pytest.raises(ConfigError, match=r"training\.steps: expected an integer, got 'ten'"):
        load_config(path, ["training.steps=ten"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["training.steps"])
    with pytest.raises(ConfigError, match="not a mapping; set the whole"):
        load_config(path, ["system.pdb=mol.pdb"])


def test_system_specs_are_typed_and_their_paths_resolved(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("system: {xml: sys.xml, pdb: /abs/mol.pdb, name: mol}\n")
    assert load_config(path).system == {
        "xml": str(tmp_path / "sys.xml"),
        "pdb": "/abs/mol.pdb",
        "name": "mol",
    }
    toy = config_from_dict({"system": {"name": "many_well", "dim": 4}})
    assert toy.system == {"name": "many_well", "dim": 4}
    with pytest.raises(ConfigError, match="unknown system 'no_such'.*double_well_1d"):
        config_from_dict({"system": "no_such"})
    with pytest.raises(
        ConfigError, match="many_well has no option.*dimension; its options are: dim"
    ):
        config_from_dict({"system": {"name": "many_well", "dimension": 4}})
    with pytest.raises(ConfigError, match=r"system\.forcefeld; valid keys in system are: pdb"):
        config_from_dict({"system": {"pdb": "mol.pdb", "forcefeld": ["amber14-all.xml"]}})
    with pytest.raises(ConfigError, match=r"system\.pdb: expected a string, got 3"):
        config_from_dict({"system": {"xml": "s.xml", "pdb": 3}})
    with pytest.raises(ConfigError, match="is not a system"):
        config_from_dict({"system": {"forcefield": ["amber14-all.xml"]}})


def test_empty_sections_take_their_defaults_and_types_are_strict():
    config = config_from_dict({"training": None, "model": {"scale": 2}})
    assert config.training.steps == 4000 and config.model.scale == 2.0
    with pytest.raises(ConfigError, match=r"training\.steps: expected an integer, got 10\.0"):
        config_from_dict({"training": {"steps": 10.0}})
    with pytest.raises(ConfigError, match=r"seed: expected an integer, got True"):
        config_from_dict({"seed": True})


def test_loss_weights_take_schedules():
    config = config_from_dict({"training": {"kl_weight": [[0, 1.0], [100, 0.0]]}})
    assert config.training.kl_weight == [[0, 1.0], [100, 0.0]]
    for bad in ([[100, 1.0], [0, 0.0]], [[0, -1.0]], -0.5):
        with pytest.raises(ConfigError, match="kl_weight must be a weight >= 0"):
            config_from_dict({"training": {"kl_weight": bad}})
