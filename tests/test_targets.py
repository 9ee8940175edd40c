"""Targets named by configs, and the training frames they load."""

from __future__ import annotations

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
