"""Geometric observables of molecular frames: backbone dihedrals, and distances, angles and
dihedrals named by atom indices."""

from __future__ import annotations

from typing import Any

import numpy as np

from openmm_nice.errors import UserInputError

__all__ = ["OBSERVABLE_UNITS", "ramachandran", "parse_observable", "compute_observable"]

_OBSERVABLE_ATOMS = {"distance": 2, "angle": 3, "dihedral": 4}
OBSERVABLE_UNITS = {"distance": "nm", "angle": "rad", "dihedral": "rad"}
"""The unit of each kind of observable."""


def _trajectory(x: np.ndarray, topology: Any):
    import mdtraj

    return mdtraj.Trajectory(np.asarray(x).reshape(len(x), topology.n_atoms, 3), topology)


def ramachandran(x: np.ndarray, topology: Any) -> tuple[np.ndarray, np.ndarray]:
    """Backbone dihedrals (phi, psi) in radians of frames x (N, 3 n_atoms) of a dipeptide.

    For a longer peptide these are the first residue's phi and psi.

    Arguments:
        x: Frames in nm, flattened in the topology's atom order.
        topology: The mdtraj Topology.

    Returns:
        (phi, psi), each of shape (N,), float64.
    """
    import mdtraj

    traj = _trajectory(x, topology)
    _, phi = mdtraj.compute_phi(traj)
    _, psi = mdtraj.compute_psi(traj)
    if phi.shape[1] == 0 or psi.shape[1] == 0:
        raise UserInputError("the molecule has no backbone phi/psi dihedral")
    return phi[:, 0].astype(np.float64), psi[:, 0].astype(np.float64)


def parse_observable(spec: str, n_atoms: int) -> tuple[str, list[int]]:
    """The kind and atoms of an observable spec, checked against n_atoms.

    Example:
        >>> parse_observable("dihedral:4,6,8,14", 22)
        ('dihedral', [4, 6, 8, 14])
    """
    usage = "use dihedral:i,j,k,l, angle:i,j,k or distance:i,j with 0-based atom indices"
    kind, _, atoms = spec.partition(":")
    if kind not in _OBSERVABLE_ATOMS:
        raise UserInputError(f"unknown observable {spec!r}; {usage}")
    try:
        indices = [int(a) for a in atoms.split(",")]
    except ValueError:
        raise UserInputError(f"bad atom indices in observable {spec!r}; {usage}") from None
    if len(indices) != _OBSERVABLE_ATOMS[kind]:
        raise UserInputError(
            f"observable {spec!r}: a {kind} needs {_OBSERVABLE_ATOMS[kind]} atoms, got "
            f"{len(indices)}; {usage}"
        )
    bad = [i for i in indices if not 0 <= i < n_atoms]
    if bad:
        raise UserInputError(
            f"observable {spec!r}: atom indices {bad} are out of range for {n_atoms} atoms "
            f"(0 to {n_atoms - 1})"
        )
    if len(set(indices)) != len(indices):
        raise UserInputError(f"observable {spec!r} repeats an atom; {usage}")
    return kind, indices


def compute_observable(spec: str, x: np.ndarray, topology: Any) -> np.ndarray:
    """Values (N,) of an observable spec (see :func:`parse_observable`) on frames x (N, 3n):
    distances in nm, angles and dihedrals in radians."""
    import mdtraj

    kind, indices = parse_observable(spec, topology.n_atoms)
    compute = {
        "distance": mdtraj.compute_distances,
        "angle": mdtraj.compute_angles,
        "dihedral": mdtraj.compute_dihedrals,
    }[kind]
    return compute(_trajectory(x, topology), [indices])[:, 0].astype(np.float64)
