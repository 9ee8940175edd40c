"""benchmarks/coordinate_fit.py: each internal coordinate's fit, the flow against its weights."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import benchmarks/_machine.py

import coordinate_fit  # noqa: E402
from _panel import panel_config  # noqa: E402

from openmm_nice.cli import main as cli_main  # noqa: E402
from openmm_nice.config import apply_overrides, config_from_dict  # noqa: E402
from openmm_nice.runs import train_run  # noqa: E402


def test_moments_of_a_shifted_wide_gaussian_against_its_exact_weights():
    """q = N(0.5, 1.2^2) in the first column, N(0, 1) in the second, weights to p = N(0, 1):
    offset 0.5, width ratio 1.2 and KL(q || p) in closed form; the second column fits."""
    rng = np.random.default_rng(0)
    n = 400_000
    s = np.stack([0.5 + 1.2 * rng.standard_normal(n), rng.standard_normal(n)], axis=1)
    log_w = -0.5 * s[:, 0] ** 2 + 0.5 * ((s[:, 0] - 0.5) / 1.2) ** 2 + math.log(1.2)
    m = coordinate_fit.coordinate_moments(s, s, log_w)
    exact_kl = 0.5 * (1.2**2 + 0.5**2 - 1) - math.log(1.2)
    assert abs(m["offset"][0] - 0.5) < 0.02 and abs(m["ratio"][0] - 1.2) < 0.02
    assert abs(m["kl"][0] - exact_kl) < 0.01
    assert abs(m["offset"][1]) < 0.02 and abs(m["ratio"][1] - 1) < 0.02 and m["kl"][1] < 1e-3
    # a sample with a non-finite weight is left out, not propagated
    log_w[:10] = -np.inf
    assert np.isfinite(coordinate_fit.coordinate_moments(s, s, log_w)["kl"]).all()


def test_the_gaussian_kl_sees_a_correlation_the_marginals_miss():
    """q = N(0, I) against p = N(0, [[1, 0.8], [0.8, 1]]) (p's samples unweighted): every
    marginal fits, KL(q || p) = (tr C_p^-1 - 2 + log det C_p) / 2 = 1.267 nats."""
    rng = np.random.default_rng(1)
    n = 400_000
    s_q = rng.standard_normal((n, 2))
    s_p = rng.standard_normal((n, 2)) @ np.linalg.cholesky([[1, 0.8], [0.8, 1]]).T
    m = coordinate_fit.coordinate_moments(s_q, s_p, np.zeros(n))
    assert (m["kl"] < 1e-3).all()
    exact = 0.5 * (2 / 0.36 - 2 + math.log(0.36))
    assert abs(coordinate_fit.gaussian_kl(s_q, s_p, np.zeros(n)) - exact) < 0.02
    # and a fitted model has none
    assert abs(coordinate_fit.gaussian_kl(s_p[: n // 2], s_p[n // 2 :], np.zeros(n // 2))) < 1e-3


def test_the_marginals_given_a_state_see_a_shift_that_follows_it():
    """p: N(+1, 1) in state 0 and N(-1, 1) in state 1, half each; q: N(0, 1) in both. The
    unconditional marginals nearly agree (p is N(0, 2)-like); given the state each is off by
    one sd: 0.5 nats within, 0 for the shares."""
    rng = np.random.default_rng(2)
    n = 400_000
    label_q, label_p = rng.integers(0, 2, n), rng.integers(0, 2, n)
    s_q = rng.standard_normal((n, 1))
    s_p = rng.standard_normal((n, 1)) + np.where(label_p == 0, 1.0, -1.0)[:, None]
    log_w = np.zeros(n)
    assert coordinate_fit.coordinate_moments(s_q, s_p, log_w)["kl"][0] < 0.11
    shares, within, left_out = coordinate_fit.conditional_marginal_kl(
        s_q, label_q, s_p, label_p, log_w
    )
    assert abs(shares) < 1e-3 and abs(within - 0.5) < 0.02 and left_out == 0
    # a state the weights barely see (ESS 1) is left out, not read as a huge misfit
    log_w[(label_p == 1)] = -50.0
    log_w[np.flatnonzero(label_p == 1)[0]] = 0.0
    shares, within, left_out = coordinate_fit.conditional_marginal_kl(
        s_q, label_q, s_p, label_p, log_w
    )
    assert abs(left_out - np.mean(label_q == 1)) < 1e-12 and abs(within - 0.25) < 0.02


def test_the_state_bound_sees_only_the_states_shares():
    """q: two states, half each; weights that put 0.8 of the mass in state 0, constant within
    each state: the bound is 1 / (0.8^2 / 0.5 + 0.2^2 / 0.5) and equals the samples' ESS/N.
    Weights that also spread within a state lower the ESS, not the bound."""
    rng = np.random.default_rng(3)
    n = 100_000
    label = np.repeat([0, 1], n // 2)
    log_w = np.log(np.where(label == 0, 0.8, 0.2))
    exact = 1 / (0.8**2 / 0.5 + 0.2**2 / 0.5)
    bound = coordinate_fit.state_ess_bound(label, log_w)
    w = np.exp(log_w) / np.exp(log_w).sum()
    assert abs(bound - exact) < 1e-12 and abs(1 / (n * (w**2).sum()) - exact) < 1e-12
    spread = log_w + rng.standard_normal(n)
    w = np.exp(spread) / np.exp(spread).sum()
    assert 1 / (n * (w**2).sum()) < 0.5 * exact
    assert abs(coordinate_fit.state_ess_bound(label, spread) - exact) < 0.01
    # pairs of labels are joint states: a second column that splits state 0 evenly adds none
    both = np.stack([label, rng.integers(0, 2, n) * (label == 0)], axis=1)
    assert abs(coordinate_fit.state_ess_bound(both, log_w) - exact) < 1e-12


def test_torsion_states_are_the_three_rotor_wells():
    """A four-atom chain turned to torsions of 60, 180 and 300 degrees: states 0, 1, 2."""
    frames = []
    for degrees in (60.0, 180.0, 300.0, -60.0):
        a = np.radians(degrees)
        xyz = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [np.cos(a), 1.0, np.sin(a)]]
        frames.append(np.asarray(xyz)[::-1].ravel() * 0.15)  # atom 3 first, as a Z-matrix row
    zmatrix = np.array([[3, -1, -1, -1], [2, 3, -1, -1], [1, 2, 3, -1], [0, 1, 2, 3]])
    states = coordinate_fit.torsion_states(np.asarray(frames), zmatrix)
    assert states.shape == (4, 1)
    turned = coordinate_fit.dihedrals(np.asarray(frames).reshape(4, 4, 3), zmatrix[3:])[:, 0]
    expected = (np.mod(turned, 2 * np.pi) // (2 * np.pi / 3)).astype(int)
    assert sorted(states[:3, 0]) == [0, 1, 2] and (states[:, 0] == expected).all()
    assert states[2, 0] == states[3, 0]


def test_the_script_names_and_ranks_a_trained_molecule_s_coordinates(tmp_path, capsys):
    data = panel_config("alanine_dipeptide_vacuum")
    overrides = ["training.refit_samples=500", "training.refit_steps=2", "n_workers=1"]
    overrides += ["training.buffer_size=500", "training.walkers=16"]
    config = config_from_dict(apply_overrides(data, overrides))
    config.set_steps(3)
    train_run(config, tmp_path / "run", quiet=True, n_eval=200)
    samples = tmp_path / "ais.npz"
    sample = ["sample", str(tmp_path / "run"), "--n", "300", "--ais-steps", "2"]
    assert cli_main([*sample, "--out", str(samples), "--quiet"]) == 0
    argv = [str(tmp_path / "run"), "--n", "600", "--top", "5", "--target-samples", str(samples)]
    argv += ["--by-backbone", "--torsion-states"]
    assert coordinate_fit.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    record = json.loads(lines[-1])
    assert record["n"] == 600 and len(record["top"]) == 5
    assert record["target_samples"] == str(samples) and math.isfinite(record["kl_gaussian"])
    assert set(record["kl_by_backbone"]) == {"shares", "within", "total", "left_out"}
    states = record["torsion_states"]
    bounds = [*states["single"].values()] + [pair[2] for pair in states["pairs"]]
    assert len(states["single"]) == 3 and len(states["pairs"]) == 3
    assert all(states["flow_ess"] - 1e-9 <= b <= 1 + 1e-9 for b in bounds)
    kls = [row["kl"] for row in record["top"]]
    assert kls == sorted(kls, reverse=True)
    assert set(record["kl_sum"]) == {"bond", "angle", "torsion"} and record["kl_model"] >= 0
    names = [row["coordinate"] for row in record["top"]]
    assert all(name.split()[0] in {"bond", "angle", "torsion"} for name in names)
    # every atom of a coordinate's name is one of alanine dipeptide's (ACE1, ALA2, NME3)
    assert all(
        atom.split(":")[0][:3] in {"ACE", "ALA", "NME"}
        for n in names
        for atom in n.split()[1].split("-")
    )
