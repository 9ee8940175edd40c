"""`openmm-nice reweight`: sample files, and MD reweighted to new states (EXP and MBAR)."""

from __future__ import annotations

import json
import math

import mdtraj
import numpy as np
import openmm
import pytest
import yaml
from openmm import unit

from openmm_nice.analysis.reweighting import effective_sample_size, log_partition_function
from openmm_nice.cli import main
from openmm_nice.config import config_from_dict
from openmm_nice.molecule.systems import alanine_dipeptide_vacuum
from openmm_nice.sampling.md import run_md, write_md

SOURCE = {
    "system": "alanine_dipeptide_vacuum",
    "temperature": 300.0,
    "md": {"steps": 20000, "report_interval": 100, "equilibration_steps": 100},
}


@pytest.fixture(scope="module")
def molecule():
    return alanine_dipeptide_vacuum()


@pytest.fixture(scope="module")
def md(tmp_path_factory, molecule):
    """200 frames of MD at 300 K as npz and dcd, and the config that made them."""
    folder = tmp_path_factory.mktemp("md")
    config = folder / "source.yaml"
    config.write_text(yaml.safe_dump(SOURCE))
    result = run_md(config_from_dict(SOURCE), quiet=True)
    topology = mdtraj.Topology.from_openmm(molecule.topology)
    write_md(folder / "md.npz", result, topology)
    write_md(folder / "md.dcd", result, topology)
    return {
        "config": config,
        "npz": folder / "md.npz",
        "dcd": folder / "md.dcd",
        "x": result.frames,
    }


def potential_energies(molecule, x: np.ndarray) -> np.ndarray:
    """E (kJ/mol) of each frame from one OpenMM Context, independent of the package."""
    context = openmm.Context(
        molecule.system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    energies = []
    for frame in x:
        context.setPositions(frame.reshape(-1, 3))
        e = context.getState(getEnergy=True).getPotentialEnergy()
        energies.append(e.value_in_unit(unit.kilojoule_per_mole))
    return np.array(energies)


def kt(temperature: float) -> float:
    return (unit.MOLAR_GAS_CONSTANT_R * temperature * unit.kelvin).value_in_unit(
        unit.kilojoule_per_mole
    )


def reweight(*argv) -> int:
    return main(["reweight", *map(str, argv)])


def test_trajectory_to_its_own_temperature_has_zero_log_weights(tmp_path, md, capsys):
    out = tmp_path / "same"
    assert (
        reweight("--traj", md["npz"], "--config", md["config"], "--temperature", 300, "--out", out)
        == 0
    )
    with np.load(out / "reweighted.npz") as data:
        assert np.all(data["log_w"] == 0.0)
        np.testing.assert_array_equal(data["u"], data["u_source"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ess"] == pytest.approx(1.0, abs=1e-12)
    assert summary["log_z_ratio"] == 0.0 and summary["delta_f_kT"] == 0.0
    reweighted = dict(summary["phi>0"]["reweighted"])
    diagnostic = ("reliable", "verdict", "ess_inside", "ess_outside")
    tail = {k: reweighted.pop(k) for k in (*diagnostic, "pareto_k_inside", "pareto_k_outside")}
    assert summary["reliable"] is True
    assert summary["phi>0"]["direct"] == reweighted
    # 300 K MD never visits phi > 0 here: a region without samples cannot be judged
    assert reweighted["p"] == 0.0
    assert tail["reliable"] is False and "too few samples" in tail["verdict"]
    # equal weights: every frame (all outside) counts as one sample
    assert tail["ess_inside"] == 0.0 and tail["ess_outside"] == pytest.approx(len(md["x"]))
    assert "phi>0" in summary["warning"]
    assert "warning: the weights pass as a whole, but" in capsys.readouterr().err


def test_trajectory_to_another_temperature_matches_the_formula(tmp_path, md, molecule):
    energies = potential_energies(molecule, md["x"])
    u_300, u_330 = energies / kt(300.0), energies / kt(330.0)
    expected = -u_330 + u_300
    out = tmp_path / "hot"
    observable = "distance:0,10"
    argv = ["--traj", md["dcd"], "--config", md["config"], "--temperature", 330]
    assert reweight(*argv, "--out", out, "--observable", observable) == 0
    with np.load(out / "reweighted.npz") as data:
        # the dcd stores float32 positions: energies agree to that precision
        np.testing.assert_allclose(data["log_w"], expected, atol=2e-3)
        np.testing.assert_allclose(data["u_source"], u_300, rtol=1e-4)
        log_w, x = data["log_w"], data["x"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"]["temperature_K"] == 330.0
    assert summary["ess"] == pytest.approx(effective_sample_size(log_w) / len(log_w))
    assert summary["log_z_ratio"] == pytest.approx(log_partition_function(expected), abs=2e-3)
    assert summary["delta_f_kT"] == pytest.approx(-summary["log_z_ratio"])
    assert 0 < summary["ess"] < 1 and summary["block_size"] == 10
    w = np.exp(log_w - log_w.max())
    distance = np.linalg.norm(
        x.reshape(len(x), -1, 3)[:, 0] - x.reshape(len(x), -1, 3)[:, 10], axis=1
    )
    reweighted = summary["observables"][observable]["reweighted"]
    assert reweighted["mean"] == pytest.approx(np.sum(w * distance) / w.sum(), rel=1e-5)
    for name in ("ramachandran_direct.csv", "ramachandran_reweighted.csv", "ramachandran.png"):
        assert (out / name).is_file()


def test_trajectory_to_another_system_config(tmp_path, md):
    target = tmp_path / "target.yaml"
    target.write_text(yaml.safe_dump(dict(SOURCE, temperature=330.0)))
    by_config, by_temperature = tmp_path / "config", tmp_path / "temperature"
    base = ["--traj", md["npz"], "--config", md["config"]]
    assert reweight(*base, "--target-config", target, "--out", by_config) == 0
    assert reweight(*base, "--temperature", 330, "--out", by_temperature) == 0
    with (
        np.load(by_config / "reweighted.npz") as a,
        np.load(by_temperature / "reweighted.npz") as b,
    ):
        np.testing.assert_allclose(a["log_w"], b["log_w"], rtol=1e-9, atol=1e-9)


def test_npz_energies_must_belong_to_the_source_config(tmp_path, md, capsys):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(dict(SOURCE, temperature=330.0)))
    argv = ["--traj", md["npz"], "--config", wrong, "--temperature", 300, "--out", tmp_path / "x"]
    assert reweight(*argv) == 2
    assert "330 K" in capsys.readouterr().err
    bad = ["--observable", "dihedral:1,2,3"]
    assert (
        reweight(
            "--traj",
            md["npz"],
            "--config",
            md["config"],
            "--temperature",
            300,
            *bad,
            "--out",
            tmp_path / "y",
        )
        == 2
    )
    assert "needs 4 atoms" in capsys.readouterr().err


def test_wrong_combinations_and_files_are_named(tmp_path, md, capsys):
    out = str(tmp_path / "x")
    cases = [
        ((("--out", out)), "not neither"),
        (("s.npz", "--traj", md["npz"], "--config", md["config"], "--out", out), "not both"),
        (("--traj", md["npz"], "--temperature", 300, "--out", out), "--traj needs --config"),
        (("--traj", md["npz"], "--config", md["config"], "--out", out), "target state"),
        ((md["npz"], "--temperature", 300, "--out", out), "--traj FILE"),
        (
            (
                "--traj",
                tmp_path / "no.dcd",
                "--config",
                md["config"],
                "--temperature",
                300,
                "--out",
                out,
            ),
            "does not exist",
        ),
        ((tmp_path / "no.npz", "--out", out), "does not exist"),
    ]
    for argv, message in cases:
        assert reweight(*argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_atom_count_mismatches_are_named(tmp_path, md, capsys):
    top = mdtraj.Topology()
    residue = top.add_residue("X", top.add_chain())
    for i in range(3):
        top.add_atom(f"C{i}", mdtraj.element.carbon, residue)
    small = tmp_path / "small.dcd"
    mdtraj.Trajectory(np.zeros((2, 3, 3), np.float32), top).save(str(small))
    argv = ["--config", md["config"], "--temperature", 300, "--out", tmp_path / "x"]
    assert reweight("--traj", small, *argv) == 2
    assert "22 atoms" in capsys.readouterr().err
    np.savez(tmp_path / "small.npz", x=np.zeros((2, 9)), log_w=np.zeros(2), u=np.zeros(2))
    assert reweight("--traj", tmp_path / "small.npz", *argv) == 2
    assert "22 atoms" in capsys.readouterr().err
    assert reweight(tmp_path / "small.npz", "--config", md["config"], "--out", tmp_path / "y") == 2
    assert "22 atoms" in capsys.readouterr().err


def test_sample_file_of_a_molecule_gets_maps_populations_and_observables(tmp_path, md, molecule):
    # mirrored frames have the same energy and phi of the opposite sign: p(phi > 0) = 1/2
    x = np.concatenate([md["x"], -md["x"]])
    log_w = np.random.default_rng(0).normal(size=len(x))
    samples = tmp_path / "s.npz"
    np.savez(samples, x=x, log_w=log_w, u=np.zeros(len(x)))
    out = tmp_path / "rw"
    observables = ["dihedral:4,6,8,14", "angle:4,6,8", "distance:0,10"]
    argv = [samples, "--config", md["config"], "--out", out, "--n-bootstrap", 50]
    assert reweight(*argv, *[a for o in observables for a in ("--observable", o)]) == 0
    summary = json.loads((out / "summary.json").read_text())

    traj = mdtraj.Trajectory(
        x.reshape(len(x), -1, 3), mdtraj.Topology.from_openmm(molecule.topology)
    )
    phi = mdtraj.compute_phi(traj)[1][:, 0]
    w = np.exp(log_w - log_w.max())
    p = np.sum(w * (phi > 0)) / w.sum()
    direct, weighted = summary["phi>0"]["direct"], summary["phi>0"]["reweighted"]
    assert direct["p"] == pytest.approx(0.5) and direct["df_kT"] == pytest.approx(0.0, abs=1e-12)
    assert weighted["p"] == pytest.approx(p) and weighted["df_kT"] == pytest.approx(
        -math.log(p / (1 - p))
    )
    assert 0 < weighted["p_error"] < 0.2 and 0 < weighted["df_error_kT"] < 1
    assert summary["ess"] == pytest.approx(effective_sample_size(log_w) / len(log_w))

    rows = (out / "ramachandran_reweighted.csv").read_text().splitlines()
    assert rows[0] == "phi_rad,psi_rad,probability,free_energy_kT,error_kT"
    assert len(rows) == 1 + 36 * 36
    assert sum(float(r.split(",")[2]) for r in rows[1:]) == pytest.approx(1.0)
    assert (out / "ramachandran.png").stat().st_size > 0

    distance = mdtraj.compute_distances(traj, [[0, 10]])[:, 0]
    result = summary["observables"]["distance:0,10"]
    assert result["unit"] == "nm" and result["direct"]["mean"] == pytest.approx(distance.mean())
    assert result["reweighted"]["mean"] == pytest.approx(np.sum(w * distance) / w.sum())
    assert summary["observables"]["dihedral:4,6,8,14"]["unit"] == "rad"


def test_trajectories_of_two_states_are_pooled_by_mbar(tmp_path, md):
    hot_config = dict(SOURCE, temperature=330.0)
    hot = tmp_path / "hot.npz"
    write_md(hot, run_md(config_from_dict(hot_config), quiet=True), None)
    hot_yaml = tmp_path / "hot.yaml"
    hot_yaml.write_text(yaml.safe_dump(hot_config))
    out = tmp_path / "pooled"
    argv = ["--traj", md["npz"], "--config", md["config"], "--traj", hot, "--config", hot_yaml]
    assert reweight(*argv, "--temperature", 330, "--out", out, "--n-bootstrap", 20) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimator"] == "MBAR" and summary["n"] == 400
    # the target is the second source's state: its log Z ratio is MBAR's -f of that source
    f_hot = summary["sources"][1]["f_kT"]
    assert summary["log_z_ratio"] == pytest.approx(-f_hot, abs=1e-5)
    assert summary["sources"][0]["f_kT"] == 0.0 and summary["log_z_ratio_error"] > 0
    with np.load(out / "reweighted.npz") as data, np.load(hot) as frames:
        assert data["source"].tolist() == [0] * 200 + [1] * 200
        np.testing.assert_allclose(data["u_source"][200:], frames["u"], rtol=1e-9)
        np.testing.assert_allclose(data["u"][200:], frames["u"], rtol=1e-9)

    # one state given twice is EXP of it once
    single, twice = tmp_path / "single", tmp_path / "twice"
    base = ["--temperature", 330, "--n-bootstrap", 20]
    assert reweight("--traj", md["npz"], "--config", md["config"], *base, "--out", single) == 0
    argv = ["--traj", md["npz"], "--config", md["config"]] * 2
    assert reweight(*argv, *base, "--out", twice) == 0
    with np.load(single / "reweighted.npz") as a, np.load(twice / "reweighted.npz") as b:
        np.testing.assert_allclose(b["log_w"], np.tile(a["log_w"], 2), atol=1e-6)
