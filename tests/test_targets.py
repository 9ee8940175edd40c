"""Targets named by configs, and the training frames they load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_nice.config import config_from_dict
from openmm_nice.targets import build_target, load_frames


def test_a_list_of_frame_files_is_pooled_in_order(tmp_path):
    target = build_target(config_from_dict({"system": "double_well_2d"}))
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, x=np.zeros((3, 2)))
    np.savez(b, x=np.ones((2, 2)))
    frames = load_frames([a, b], target)
    torch.testing.assert_close(frames, torch.tensor([[0.0, 0]] * 3 + [[1.0, 1]] * 2))
    with pytest.raises(ValueError, match="the list of files is empty"):
        load_frames([], target)
    with pytest.raises(ValueError, match=r"expected \(F, 2\)"):
        np.savez(b, x=np.ones((2, 3)))
        load_frames([a, b], target)


@pytest.mark.parametrize("stiff", [False, True])
def test_torsion_tree_reaches_the_map_fitted_to_frames_and_refits(stiff):
    from openmm_nice.targets import build_generator, map_fitter

    model = {"torsion_tree": True, "layers": 2, "stiff_conditioning": stiff}
    config = config_from_dict({"system": "alanine_dipeptide_vacuum", "model": model})
    target = build_target(config)
    try:
        data = Path(__file__).parents[1] / "data" / "alanine_dipeptide_md.npz"
        frames = torch.as_tensor(np.load(data)["x"][:500])
        generator = build_generator(config, target, frames)
        assert (generator.coordinates.torsion_parent >= 0).any()
        weights = torch.rand(len(frames), generator=torch.Generator().manual_seed(0))
        refitted = map_fitter(config, target, generator.coordinates)(frames, weights)
        assert (refitted.torsion_parent >= 0).any()
        for coordinates in (generator.coordinates, refitted):
            assert coordinates.stiff_log_scale.any() == stiff  # config.model.stiff_conditioning
        generator.coordinates.load_state_dict(refitted.state_dict())
        x, log_w = generator.sample(4)
        assert torch.isfinite(x).all() and torch.isfinite(log_w).all()
    finally:
        target.close()


@pytest.mark.parametrize("initial", [None, "uniform"])
def test_the_data_free_map_starts_from_the_scan_unless_told_uniform(initial):
    """model.initial_torsions: the default scans each torsion's energy (alanine's methyl
    rotors and backbone get non-uniform densities); "uniform" keeps every torsion flat."""
    from openmm_nice.targets import build_generator

    model = {"layers": 2} if initial is None else {"layers": 2, "initial_torsions": initial}
    config = config_from_dict({"system": "alanine_dipeptide_vacuum", "model": model})
    target = build_target(config)
    try:
        cdf = build_generator(config, target).coordinates.torsion_cdf
        bins = cdf.shape[1] - 1
        flat = torch.linspace(0, 1, bins + 1, dtype=cdf.dtype)
        departure = (cdf - flat).abs().amax(dim=1)
        if initial is None:
            assert bins > 1 and (departure > 0.05).any()
        else:
            assert (departure < 1e-12).all()
    finally:
        target.close()


def one_particle_system():
    import openmm

    system = openmm.System()
    system.addParticle(1.0)
    force = openmm.CustomExternalForce("x^2")
    force.addParticle(0, [])
    system.addForce(force)
    return system


def test_the_engine_key_chooses_how_energies_are_computed():
    from openmm_nice.energy.openmm_energy import OpenMMEnergy, TorchEnergy
    from openmm_nice.errors import ConfigError, UserInputError
    from openmm_nice.targets import openmm_energy_for

    def energy_of(engine, system=None):
        config = config_from_dict({"system": "alanine_dipeptide_vacuum", "engine": engine})
        if system is not None:
            return openmm_energy_for(config, system)
        target = build_target(config)
        target.close()
        return target.energy

    assert isinstance(energy_of("openmm"), OpenMMEnergy)
    assert isinstance(config_from_dict({}).engine, str) and config_from_dict({}).engine == "openmm"
    assert isinstance(energy_of("torch"), TorchEnergy)
    assert isinstance(energy_of("auto"), TorchEnergy)  # every force of alanine is supported
    unsupported = one_particle_system()
    energy = energy_of("auto", unsupported)
    assert isinstance(energy, OpenMMEnergy)
    energy.close()
    with pytest.raises(UserInputError, match="engine: torch cannot.*CustomExternalForce"):
        energy_of("torch", unsupported)
    with pytest.raises(ConfigError, match="engine"):
        config_from_dict({"engine": "gpu"})


def test_a_model_trains_with_the_torch_engine_and_keeps_the_same_state(tmp_path):
    from openmm_nice.runs import load_run, train_run
    from openmm_nice.targets import build_generator

    def config(engine):
        return config_from_dict(
            {
                "system": "alanine_dipeptide_vacuum",
                "engine": engine,
                "model": {"latent_dim": 62, "layers": 2, "hidden": [16], "conditional_hidden": [8]},
                "training": {"steps": 2, "batch_size": 16, "beta_start": 1.0, "anneal_steps": 0},
            }
        )

    keys = {}
    for engine in ("openmm", "torch"):
        target = build_target(config(engine))
        keys[engine] = set(build_generator(config(engine), target).state_dict())
        target.close()
    assert keys["openmm"] == keys["torch"]
    summary = train_run(config("torch"), tmp_path / "run", quiet=True, n_eval=100)
    assert summary["energy_evaluations"] > 0 and "ess" in summary
    with load_run(tmp_path / "run") as (loaded, target, generator):
        assert loaded.engine == "torch" and type(target.energy).__name__ == "TorchEnergy"
        x, log_w = generator.sample(8)
        assert torch.isfinite(log_w).any()


@pytest.mark.parametrize("hidden", [0, 8])
def test_learned_stiff_conditioning_trains_from_zero_and_survives_map_refits(hidden):
    """model.stiff_conditioning: learned: the data-free map's A and B (and, with
    model.stiff_hidden, its hidden layer's W, w0, C, E) are parameters of the generator, A, B,
    C and E at zero, the trainer's steps move them, and a map refit keeps them (it refits the
    torsion densities, shifts and scales around them)."""
    from openmm_nice.targets import build_trainer

    config = config_from_dict(
        {
            "system": "alanine_dipeptide_vacuum",
            "model": {
                "latent_dim": 60,
                "layers": 2,
                "hidden": [16],
                "stiff_conditioning": "learned",
                "stiff_hidden": hidden,
            },
            "training": {
                "steps": 4,
                "batch_size": 64,
                "beta_start": 1.0,
                "anneal_steps": 0,
                "map_refits": [3],
                "refit_samples": 256,
                "refit_steps": 0,
            },
        }
    )
    target = build_target(config)
    try:
        trainer = build_trainer(config, target)
        coordinates = trainer.generator.coordinates
        own = ["stiff_mean", "stiff_log_scale"]
        if hidden:
            own += ["stiff_hidden_weight", "stiff_hidden_bias"]
            own += ["stiff_hidden_mean", "stiff_hidden_log_scale"]
        learned = [getattr(coordinates, name) for name in own]
        names = {n for n, p in trainer.generator.named_parameters() if any(p is q for q in learned)}
        assert names == {f"coordinates.{name}" for name in own}
        assert [name for name, p in zip(own, learned) if p.any()] == own[2:3]  # W random
        trainer.run(3)
        assert all(p.detach().abs().max() > 0 for p in learned)  # Adam moved them from zero
        before = [p.detach().clone() for p in learned]
        offset = coordinates.torsion_offset.clone()
        shift = coordinates.shift.clone()
        trainer.refit_map(1.0)  # what run() does at step 3, without the steps after it
        assert all(getattr(coordinates, n) is p for n, p in zip(own, learned, strict=True))
        for p, b in zip(learned, before, strict=True):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
        assert not torch.equal(coordinates.shift, shift) or not torch.equal(
            coordinates.torsion_offset, offset
        )  # the map itself was refitted
        x, log_w = trainer.generator.sample(8)
        assert torch.isfinite(x).all() and torch.isfinite(log_w).all()
    finally:
        target.close()
