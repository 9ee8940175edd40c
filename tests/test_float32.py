"""The float32 path users get (conftest runs the rest in float64): training, AIS and the
openmmtools move on a molecule, and the toy's weights against float64 arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from openmm import unit
from openmmtools import cache, states

from openmm_nice.config import config_from_dict
from openmm_nice.energy.energies import DoubleWell1D
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.molecule.systems import alanine_dipeptide_vacuum
from openmm_nice.runs import load_run, sample_run, train_run

pytestmark = pytest.mark.float32


def test_the_default_dtype_here_is_float32():
    assert torch.get_default_dtype() == torch.float32


def test_float32_weights_agree_with_float64_arithmetic_of_the_same_model():
    import copy

    model = BoltzmannGenerator(DoubleWell1D(), latent_dim=2, layers=2, hidden=[8])
    model64 = copy.deepcopy(model).double()
    z = torch.randn(512, 2)
    draw32, draw64 = model.draw_from(z), model64.draw_from(z.double())
    assert draw32.x.dtype == torch.float32 and draw32.log_weights().dtype == torch.float32
    torch.testing.assert_close(draw32.x.double(), draw64.x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        draw32.log_weights().double(), draw64.log_weights(), rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow
def test_training_ais_and_the_move_run_in_float32(tmp_path):
    config = config_from_dict(
        {
            "system": "alanine_dipeptide_vacuum",
            "model": {"latent_dim": 62, "layers": 2, "hidden": [32], "conditional_hidden": [16]},
            "training": {"steps": 4, "batch_size": 32, "walkers": 16, "report_interval": 2},
        }
    )
    assert config.dtype == "float32"  # what a user's config gets
    run = tmp_path / "run"
    summary = train_run(config, run, quiet=True, n_eval=500)
    assert np.isfinite(summary["j_r"]) and 0 < summary["max_weight_share"] <= 1
    samples = sample_run(run, 300, ais_steps=3, seed=0)
    assert samples.x.dtype == np.float64 and np.isfinite(samples.log_w).mean() > 0.9
    assert (
        samples.ais_steps == 3
        and ((samples.ais_acceptance >= 0) & (samples.ais_acceptance <= 1)).all()
    )
    with load_run(run) as loaded:
        assert next(loaded.generator.parameters()).dtype == torch.float32
    from openmm_nice.sampling.moves import BoltzmannGeneratorMove

    alanine = alanine_dipeptide_vacuum()
    move = BoltzmannGeneratorMove(run, n_proposals=4, seed=0)
    sampler_state = states.SamplerState(alanine.positions * unit.nanometer)
    thermodynamic_state = states.ThermodynamicState(alanine.system, 300 * unit.kelvin)
    move.apply(thermodynamic_state, sampler_state, cache.ContextCache())
    assert move.statistics["n_proposed"] == 4
    assert np.isfinite(np.asarray(sampler_state.positions.value_in_unit(unit.nanometer))).all()
