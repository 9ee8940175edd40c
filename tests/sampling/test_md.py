"""`openmm-nice md`: plain Langevin MD of a config's system, written as npz or trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import pytest
import yaml
from openmm import unit

from openmm_nice.cli import main
from openmm_nice.molecule.systems import alanine_dipeptide_vacuum

DATA = Path(__file__).resolve().parents[2] / "data"

TINY_MD = {
    "system": "alanine_dipeptide_vacuum",
    "temperature": 300.0,
    "md": {"steps": 2000, "report_interval": 500, "equilibration_steps": 100},
}


@pytest.fixture(scope="module")
def molecule():
    return alanine_dipeptide_vacuum()


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "md.yaml"
    path.write_text(yaml.safe_dump(TINY_MD))
    return path


def reduced_energy(molecule, positions_nm: np.ndarray, temperature: float) -> float:
    """E/kT of one configuration from a fresh OpenMM Context, independent of the package."""
    context = openmm.Context(
        molecule.system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    context.setPositions(positions_nm.reshape(-1, 3))
    energy = context.getState(getEnergy=True).getPotentialEnergy()
    kt = unit.MOLAR_GAS_CONSTANT_R * temperature * unit.kelvin
    return energy / kt


def test_md_npz_has_frames_and_reduced_energies(tmp_path, config, molecule):
    out = tmp_path / "md.npz"
    assert main(["md", str(config), "--out", str(out), "--quiet"]) == 0
    with np.load(out) as data:
        x, log_w, u, time_ps = data["x"], data["log_w"], data["u"], data["time_ps"]
    assert x.shape == (4, 66) and x.dtype == np.float64
    np.testing.assert_array_equal(log_w, np.zeros(4))
    np.testing.assert_allclose(time_ps, [0.5, 1.0, 1.5, 2.0])
    for frame in (0, 3):
        assert u[frame] == pytest.approx(reduced_energy(molecule, x[frame], 300.0), rel=1e-9)
    info = json.loads(out.with_name("md.npz.json").read_text())
    assert info["command"] == f"openmm-nice md {config} --out {out}"
    assert info["steps"] == 2000 and info["frames"] == 4 and info["seed"] == 0
    assert info["simulated_ns"] == pytest.approx(0.002)
    assert info["temperature_K"] == 300.0 and info["platform"] == "Reference"
    assert info["ns_per_day"] > 0 and info["config"]["md"]["report_interval"] == 500


def test_md_at_another_temperature_for_hot_training_data(tmp_path, config, molecule):
    out = tmp_path / "hot.npz"
    assert main(["md", str(config), "--out", str(out), "--temperature", "500", "--quiet"]) == 0
    with np.load(out) as data:
        x, u = data["x"], data["u"]
    assert u[0] == pytest.approx(reduced_energy(molecule, x[0], 500.0), rel=1e-9)
    info = json.loads(out.with_name("hot.npz.json").read_text())
    assert info["temperature_K"] == 500.0
    assert info["command"] == f"openmm-nice md {config} --out {out} --temperature 500"
    assert main(["md", str(config), "--out", str(out), "--temperature", "-5", "--quiet"]) == 2


def test_md_dcd_loads_with_mdtraj_and_matches_the_npz_run(tmp_path, config, molecule):
    dcd, npz = tmp_path / "md.dcd", tmp_path / "same.npz"
    for out in (dcd, npz):
        argv = ["md", str(config), "--out", str(out), "--quiet", "--seed", "3", "--steps", "1500"]
        assert main(argv) == 0
    traj = mdtraj.load(str(dcd), top=mdtraj.Topology.from_openmm(molecule.topology))
    assert traj.n_frames == 3 and traj.n_atoms == 22
    with np.load(npz) as data:
        # the same seed on the Reference platform gives the same trajectory
        np.testing.assert_allclose(traj.xyz.reshape(3, -1), data["x"], atol=1e-5)
    info = json.loads(dcd.with_name("md.dcd.json").read_text())
    assert info["command"].endswith("--steps 1500 --seed 3")
    assert info["seed"] == 3 and info["frames"] == 3


def test_md_refuses_bad_outputs_and_systems_before_running(tmp_path, config, capsys):
    assert main(["md", str(config), "--out", str(tmp_path / "md.txt"), "--quiet"]) == 2
    assert ".dcd" in capsys.readouterr().err
    toy = tmp_path / "toy.yaml"
    toy.write_text("system: double_well_1d\n")
    assert main(["md", str(toy), "--out", str(tmp_path / "toy.npz"), "--quiet"]) == 2
    assert "toy target" in capsys.readouterr().err
    assert main(["md", str(config), "--out", str(tmp_path / "a.npz"), "--steps", "10"]) == 2
    assert "report_interval" in capsys.readouterr().err
    assert main(["md", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "b.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def phi_of(molecule, x: np.ndarray) -> np.ndarray:
    traj = mdtraj.Trajectory(
        x.reshape(len(x), -1, 3), mdtraj.Topology.from_openmm(molecule.topology)
    )
    return mdtraj.compute_dihedrals(traj, [[4, 6, 8, 14]])[:, 0]


def test_md_seeded_from_a_frame_samples_that_basin(tmp_path, config, molecule):
    """--start: MD begun in C7ax (phi > 0), a basin that 300 K MD from the system's own
    structure (phi < 0) does not reach in a few ps."""
    seeds = tmp_path / "seeds.npz"
    plain = tmp_path / "plain.npz"
    assert main(["md", str(config), "--out", str(plain), "--quiet"]) == 0
    with np.load(plain) as data:
        assert np.all(phi_of(molecule, data["x"]) < 0)
        frames = data["x"].copy()
    # a C7ax structure: frame 660 of the committed 500 K data (phi = 1.0, psi = -1.2)
    with np.load(DATA / "alanine_dipeptide_md_500K.npz") as data:
        frames[1] = data["x"][660]
    np.savez(seeds, x=frames)
    out = tmp_path / "c7ax.npz"
    argv = ["md", str(config), "--out", str(out), "--quiet", "--start", str(seeds)]
    assert main([*argv, "--start-frame", "1"]) == 0
    with np.load(out) as data:
        phi = phi_of(molecule, data["x"])
        assert np.all((phi > 0) & (phi < 2.2)), phi
        assert data["u"][0] == pytest.approx(reduced_energy(molecule, data["x"][0], 300.0))
    info = json.loads(out.with_name("c7ax.npz.json").read_text())
    assert info["command"].endswith(f"--start {seeds} --start-frame 1")
    assert info["start"] == f"{seeds}[1]"


def test_md_start_errors_name_the_problem(tmp_path, config, capsys):
    out = str(tmp_path / "x.npz")
    seeds = tmp_path / "seeds.npz"
    np.savez(seeds, x=np.zeros((2, 66)))
    assert main(["md", str(config), "--out", out, "--start", str(seeds), "--start-frame", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    np.savez(seeds, x=np.zeros((2, 30)))
    assert main(["md", str(config), "--out", out, "--start", str(seeds)]) == 2
    assert "has 22" in capsys.readouterr().err
    np.savez(seeds, x=np.full((2, 66), np.nan))
    assert main(["md", str(config), "--out", out, "--start", str(seeds)]) == 2
    assert "NaN" in capsys.readouterr().err
    assert main(["md", str(config), "--out", out, "--start", str(tmp_path / "none.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.savez(seeds, positions=np.zeros((2, 66)))
    assert main(["md", str(config), "--out", out, "--start", str(seeds)]) == 2
    assert "has no array 'x'" in capsys.readouterr().err


def test_md_takes_set_overrides_and_records_them(tmp_path, config, capsys):
    out = tmp_path / "set.npz"
    argv = ["md", str(config), "--out", str(out), "--quiet", "--set", "md.report_interval=1000"]
    assert main(argv) == 0
    info = json.loads(out.with_name("set.npz.json").read_text())
    assert info["frames"] == 2 and info["config"]["md"]["report_interval"] == 1000
    assert info["command"].endswith("--set md.report_interval=1000")
    assert main([*argv[:-1], "md.report_intervall=1000"]) == 2
    assert "valid keys in md are" in capsys.readouterr().err
