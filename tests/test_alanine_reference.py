"""benchmarks/alanine_reference.py's batched engine: the dihedral restraint and the windows."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

_DIR = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(_DIR))  # the script imports benchmarks/_machine.py
_spec = importlib.util.spec_from_file_location("alanine_reference", _DIR / "alanine_reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

mdtraj = pytest.importorskip("mdtraj")


@pytest.fixture(scope="module")
def molecule():
    from openmm_nice.molecule.systems import alanine_dipeptide_vacuum

    m = alanine_dipeptide_vacuum()
    return m, mdtraj.Topology.from_openmm(m.topology)


def backbone_atoms(mdtop) -> np.ndarray:
    return np.array([reference.mdtraj_indices(mdtop, name) for name in ("phi", "psi")])


def test_restraint_is_zero_at_mdtraj_angles_and_its_forces_are_minus_its_gradient(molecule):
    from openmm_nice.analysis.observables import ramachandran

    m, mdtop = molecule
    rng = np.random.default_rng(0)
    x = m.positions[None] + 0.05 * rng.standard_normal((8, m.n_atoms, 3))
    angles = np.stack(ramachandran(x.reshape(8, -1), mdtop), axis=1)
    atoms = backbone_atoms(mdtop)
    energy, _ = reference.dihedral_restraint(x, atoms, angles, 100.0)
    np.testing.assert_allclose(energy, 0.0, atol=1e-6)  # mdtraj's angles are float32
    # across the periodic seam: 0.3 rad from each centre on both axes
    shifted = angles + np.array([0.3, math.pi - 0.1])
    energy, forces = reference.dihedral_restraint(x, atoms, shifted, 100.0)
    np.testing.assert_allclose(energy, 0.5 * 100.0 * (0.3**2 + (math.pi - 0.1) ** 2), rtol=1e-5)
    h = 1e-6
    for atom in atoms.ravel()[:4]:
        for axis in range(3):
            xp, xm = x.copy(), x.copy()
            xp[:, atom, axis] += h
            xm[:, atom, axis] -= h
            numeric = -(
                reference.dihedral_restraint(xp, atoms, shifted, 100.0)[0]
                - reference.dihedral_restraint(xm, atoms, shifted, 100.0)[0]
            ) / (2 * h)
            np.testing.assert_allclose(forces[:, atom, axis], numeric, rtol=1e-5, atol=1e-4)


def test_batched_windows_hold_their_angles(molecule):
    """Four windows on (phi, psi), one of them across phi's barrier from the minimised start
    (phi > 0), two repeats, all equilibrated at once: every kept frame of each repeat lies near
    its window's centre, and the repeats' noise differs."""
    m, mdtop = molecule

    class Bar:
        def update(self, n):
            pass

    args = argparse.Namespace(k=100.0, ps=0.5, sample_ps=0.1, equilibrate_ps=0.5)
    centres = np.array([[-1.4, 1.2], [-1.4, -0.7], [1.1, -0.8], [-2.6, 2.7]])
    runs = reference.run_repeats_batched(m, mdtop, centres, args, seeds=[3, 4], bar=Bar())
    assert len(runs) == 2
    for run in runs:
        assert run["phi"].shape == run["window"].shape == (4 * 5,)
        angles = np.stack([run["phi"], run["psi"]], axis=1)
        distance = reference.periodic_distance(angles, centres[run["window"]])
        # the restraint's standard deviation is sqrt(kT / k) = 0.16 rad
        assert distance.max() < 0.8, distance.max()
    assert not np.allclose(runs[0]["phi"], runs[1]["phi"])


def test_rotation_about_a_bond_turns_the_dihedral_and_keeps_the_geometry(molecule):
    m, mdtop = molecule
    x = m.positions
    phi = reference.mdtraj_indices(mdtop, "phi")
    moving = np.arange(8, m.n_atoms)  # CA and everything after it: the CA side of N-CA
    turned = reference.rotate_about_bond(x, phi[1], phi[2], moving, 1.3)
    before, after = (reference.dihedral_angle(y, phi) for y in (x, turned))
    assert math.remainder(after - before - 1.3, 2 * math.pi) == pytest.approx(0.0, abs=1e-10)
    for a, b in mdtop.bonds:
        d0 = np.linalg.norm(x[a.index] - x[b.index])
        assert np.linalg.norm(turned[a.index] - turned[b.index]) == pytest.approx(d0, rel=1e-10)


def test_window_starts_sit_at_their_centres_with_every_amide_trans(molecule):
    """Start structures on phi's barrier (phi = 0) and across it from the minimised structure
    (phi > 0): near each centre, no amide bond cis (pulling by the restraint alone flipped
    about one window in ten); the cis test itself on a structure with an amide turned."""
    m, mdtop = molecule
    centres = np.array([[-1.4, 1.2], [0.0, 0.0], [1.1, -0.8], [1.0, 2.8], [3.0, -3.0]])
    starts = reference.window_starts(m, mdtop, centres, 100.0)
    phi, psi = reference.ramachandran(starts.reshape(len(starts), -1), mdtop)
    distance = reference.periodic_distance(np.stack([phi, psi], axis=1), centres)
    assert distance.max() < 0.8, distance
    amides = reference.amide_torsions(mdtop)
    assert amides.tolist() == [[1, 4, 6, 8], [8, 14, 16, 18]]
    assert not reference.cis_amide(starts.reshape(len(starts), -1), amides, mdtop).any()
    cis = reference.rotate_about_bond(m.positions, 4, 6, np.arange(6, m.n_atoms), math.pi)
    assert reference.cis_amide(cis.reshape(1, -1), amides, mdtop).tolist() == [[True, False]]
