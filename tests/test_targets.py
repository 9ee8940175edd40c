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


def test_torsion_tree_reaches_the_map_fitted_to_frames_and_refits():
    from openmm_nice.targets import build_generator, map_fitter

    config = config_from_dict(
        {"system": "alanine_dipeptide_vacuum", "model": {"torsion_tree": True, "layers": 2}}
    )
    target = build_target(config)
    try:
        data = Path(__file__).parents[1] / "data" / "alanine_dipeptide_md.npz"
        frames = torch.as_tensor(np.load(data)["x"][:500])
        generator = build_generator(config, target, frames)
        assert (generator.coordinates.torsion_parent >= 0).any()
        weights = torch.rand(len(frames), generator=torch.Generator().manual_seed(0))
        refitted = map_fitter(config, target, generator.coordinates)(frames, weights)
        assert (refitted.torsion_parent >= 0).any()
        generator.coordinates.load_state_dict(refitted.state_dict())
        x, log_w = generator.sample(4)
        assert torch.isfinite(x).all() and torch.isfinite(log_w).all()
    finally:
        target.close()
