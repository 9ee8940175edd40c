"""Backbone and peptide-bond geometry of any peptide: indices from the topology, dihedrals."""

from __future__ import annotations

import mdtraj
import numpy as np
import pytest
from openmmtools import testsystems

from openmm_nice.analysis.observables import (
    backbone_indices,
    cis_frames,
    dihedrals,
    peptide_bond_indices,
    ramachandran,
)


@pytest.fixture(scope="module")
def alanine():
    return testsystems.AlanineDipeptideVacuum(constraints=None)


def _dihedral(p0, p1, p2, p3) -> float:
    """The textbook formula, independent of mdtraj."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1)
    v, w = b0 - np.dot(b0, b1) * b1, b2 - np.dot(b2, b1) * b1
    return float(np.arctan2(np.dot(np.cross(b1, v), w), np.dot(v, w)))


def _rotated(p, origin, axis, angle):
    """p rotated by angle about the line through origin along axis (Rodrigues)."""
    k = axis / np.linalg.norm(axis)
    v = p - origin
    return origin + (
        v * np.cos(angle) + np.cross(k, v) * np.sin(angle) + k * np.dot(k, v) * (1 - np.cos(angle))
    )


def test_backbone_and_peptide_bonds_of_a_dipeptide(alanine):
    x = np.asarray(alanine.positions.value_in_unit(alanine.positions.unit))
    phi_rows, psi_rows = backbone_indices(alanine.topology)
    assert phi_rows.shape == psi_rows.shape == (1, 4)
    names = [a.name for a in alanine.topology.atoms()]
    assert [names[i] for i in phi_rows[0]] == ["C", "N", "CA", "C"]
    assert [names[i] for i in psi_rows[0]] == ["N", "CA", "C", "N"]
    phi, psi = ramachandran(x.reshape(1, -1), mdtraj.Topology.from_openmm(alanine.topology))
    np.testing.assert_allclose(dihedrals(x[None], phi_rows)[0, 0], phi[0], atol=1e-6)
    np.testing.assert_allclose(dihedrals(x[None], psi_rows)[0, 0], psi[0], atol=1e-6)
    bonds = peptide_bond_indices(alanine.topology)
    assert [[names[i] for i in row] for row in bonds] == [
        ["CH3", "C", "N", "CA"],
        ["CA", "C", "N", "C"],
    ]


def test_dihedrals_match_the_formula_and_cis_bonds_are_found(alanine):
    x = np.asarray(alanine.positions.value_in_unit(alanine.positions.unit))
    bonds = peptide_bond_indices(alanine.topology)
    omega = dihedrals(x[None], bonds)[0]
    for row, value in zip(bonds, omega):
        assert value == pytest.approx(_dihedral(*x[row]), abs=1e-5)
    assert not cis_frames(x[None], alanine.topology)[0]
    # the fourth atom of the first omega turned half a circle about the C-N bond: cis
    a, b, c, d = bonds[0]
    cis = x.copy()
    cis[d] = _rotated(x[d], x[c], x[c] - x[b], np.pi)
    assert abs(dihedrals(cis[None], bonds)[0, 0]) < 0.2
    flags = cis_frames(np.stack([x, cis, x]), alanine.topology)
    np.testing.assert_array_equal(flags, [False, True, False])
    flat = np.stack([x, cis]).reshape(2, -1)  # (T, 3 n_atoms) frames too
    np.testing.assert_allclose(dihedrals(flat, bonds), dihedrals(np.stack([x, cis]), bonds))
