"""Geometric observables of molecular frames: backbone dihedrals, and distances, angles and
dihedrals named by atom indices."""

from __future__ import annotations

from typing import Any

import numpy as np

from openmm_nice.errors import UserInputError

__all__ = [
    "OBSERVABLE_UNITS",
    "ramachandran",
    "backbone_indices",
    "peptide_bond_indices",
    "dihedrals",
    "cis_frames",
    "parse_observable",
    "compute_observable",
]

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


def _openmm_topology(topology: Any):
    return topology.to_openmm() if hasattr(topology, "to_openmm") else topology


def backbone_indices(topology: Any) -> tuple[np.ndarray, np.ndarray]:
    """(R, 4) atom indices of phi (C(i-1), N, CA, C) and of psi (N, CA, C, N(i+1)) of every
    residue that has both, in sequence order (an OpenMM or mdtraj Topology)."""
    import mdtraj

    top = (
        topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
    )
    traj = mdtraj.Trajectory(np.zeros((1, top.n_atoms, 3)), top)
    phi, _ = mdtraj.compute_phi(traj)
    psi, _ = mdtraj.compute_psi(traj)
    psi_by_ca = {int(row[1]): row for row in psi}
    keep = [i for i, row in enumerate(phi) if int(row[2]) in psi_by_ca]
    return phi[keep], np.array([psi_by_ca[int(phi[i][2])] for i in keep]).reshape(-1, 4)


def peptide_bond_indices(topology: Any) -> np.ndarray:
    """(B, 4) atom indices of each peptide bond's omega (CA or CH3, C, N, CA or C of a cap), in
    sequence order, the caps' bonds included (an OpenMM or mdtraj Topology)."""
    residues = list(_openmm_topology(topology).residues())
    rows = []
    for previous, residue in zip(residues, residues[1:]):
        before = {a.name: a.index for a in previous.atoms()}
        after = {a.name: a.index for a in residue.atoms()}
        if "C" not in before or "N" not in after:
            continue
        first = before.get("CA", before.get("CH3"))
        last = after.get("CA", after.get("C"))
        rows.append((first, before["C"], after["N"], last))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def dihedrals(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Dihedral angles in radians, (T, K), of frames x (T, n_atoms, 3) or (T, 3 n_atoms) in nm,
    for (K, 4) atom index rows, as mdtraj computes them."""
    import mdtraj

    x = np.asarray(x)
    traj = mdtraj.Trajectory(x.reshape(len(x), -1, 3), None)
    return mdtraj.compute_dihedrals(traj, np.asarray(indices)).astype(np.float64)


def cis_frames(x: np.ndarray, topology: Any) -> np.ndarray:
    """(T,) True where any peptide bond of the frame is cis (|omega| < 90 degrees)."""
    omega = dihedrals(x, peptide_bond_indices(topology))
    return (np.abs(omega) < np.pi / 2).any(axis=1)


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
