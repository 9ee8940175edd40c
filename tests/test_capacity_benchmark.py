"""The affine-coupling yardstick of benchmarks/capacity.py: exact inverse and log-determinant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from openmm_nice.flows.transforms import nice_flow

_PATH = Path(__file__).parents[1] / "benchmarks" / "capacity.py"
_spec = importlib.util.spec_from_file_location("capacity_benchmark", _PATH)
capacity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capacity)


def test_affine_yardstick_inverts_and_its_log_det_matches_autograd():
    torch.manual_seed(0)
    flow = capacity.affine_flow(nice_flow(5, 4, [16]), [16]).double()
    for p in flow.parameters():  # away from the identity the couplings start at
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(6, 5, dtype=torch.float64)
    y, ladj = flow.call_and_ladj(x)
    back, ladj_inverse = flow.inverse_and_ladj(y)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(ladj_inverse, -ladj)
    for i in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0], x[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jacobian)[1])
    # the same partitions as the NICE flow it replaces
    nice = nice_flow(5, 4, [16])
    for a, b in zip(nice.transforms, flow.transforms):
        assert torch.equal(a.index_a, b.index_a) and torch.equal(a.index_b, b.index_b)
