"""The exact bijection between Cartesian positions and Z-matrix internal coordinates (bonds,
angles, torsions), with its log-Jacobian once the rigid motion is integrated out."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["InternalCoordinates"]


def validate_zmatrix(zmatrix: np.ndarray | Tensor) -> np.ndarray:
    """Check that every row references distinct atoms of earlier rows; return int64 (N, 4)."""
    z = np.asarray(torch.as_tensor(zmatrix).cpu())
    if z.ndim != 2 or z.shape[1] != 4 or z.shape[0] < 3:
        raise ValueError(
            f"a Z-matrix has shape (N, 4) with N >= 3, got {z.shape}; build it with build_zmatrix"
        )
    if not np.issubdtype(z.dtype, np.integer):
        raise TypeError(f"a Z-matrix holds integer atom indices, got dtype {z.dtype}")
    z = z.astype(np.int64)
    n = len(z)
    if sorted(z[:, 0].tolist()) != list(range(n)):
        raise ValueError(f"the first column of a Z-matrix must list each atom 0..{n - 1} once")
    row_of = {atom: r for r, atom in enumerate(z[:, 0].tolist())}
    for r, (atom, *refs) in enumerate(z.tolist()):
        needed, unused = refs[: min(r, 3)], refs[min(r, 3) :]
        bad = (
            any(u != -1 for u in unused)
            or any(a not in row_of or row_of[a] >= r for a in needed)
            or len({atom, *needed}) != len(needed) + 1
        )
        if bad:
            raise ValueError(
                f"Z-matrix row {r} = {[atom, *refs]} is invalid: row r needs min(r, 3) distinct "
                "references to atoms of earlier rows and -1 for the rest; build it with "
                "build_zmatrix"
            )
    return z


def _rebuild_after_load(module: InternalCoordinates, incompatible_keys: object) -> None:
    """Keep the placement plan in step with a Z-matrix loaded from a state dict."""
    module._build_plan()


def _placed(pj: Tensor, pk: Tensor, pl: Tensor, bond: Tensor, angle: Tensor, torsion: Tensor):
    """Position of i with |i-j| = bond, angle(i, j, k) = angle, dihedral(l, k, j, i) = torsion.

    All positions are (B, n, 3), the internal coordinates (B, n).
    """
    axis = pj - pk
    axis = axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True)
    normal = torch.linalg.cross(pk - pl, axis)
    normal = normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True)
    in_plane = torch.linalg.cross(normal, axis)
    radial = (bond * torch.sin(angle)).unsqueeze(-1)
    return (
        pj
        - (bond * torch.cos(angle)).unsqueeze(-1) * axis
        + radial * (torch.cos(torsion).unsqueeze(-1) * in_plane)
        + radial * (torch.sin(torsion).unsqueeze(-1) * normal)
    )


def _angles(pi: Tensor, pj: Tensor, pk: Tensor) -> Tensor:
    """The angle i-j-k in [0, pi]; atan2 keeps full precision near 0 and pi, unlike acos."""
    u, v = pi - pj, pk - pj
    return torch.atan2(torch.linalg.vector_norm(torch.linalg.cross(u, v), dim=-1), (u * v).sum(-1))


def _dihedrals(pi: Tensor, pj: Tensor, pk: Tensor, pl: Tensor) -> Tensor:
    """The IUPAC dihedral of the chain l-k-j-i in (-pi, pi]."""
    b0, b1, b2 = pk - pl, pj - pk, pi - pj
    n1, n2 = torch.linalg.cross(b0, b1), torch.linalg.cross(b1, b2)
    y = torch.linalg.vector_norm(b1, dim=-1) * (b0 * n2).sum(-1)
    return torch.atan2(y, (n1 * n2).sum(-1))


def check_batch(x: Tensor, dim: int, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} as a torch.Tensor of shape (B, {dim}), got {type(x)}")
    if not x.is_floating_point():
        raise TypeError(f"expected {name} as a float32 or float64 tensor, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected {name} of shape (B, {dim}), got {tuple(x.shape)}")


class InternalCoordinates(nn.Module):
    r"""The exact map between Cartesian positions and Z-matrix internal coordinates.

    For a Z-matrix with rows :math:`r = 0, \dots, N-1` (see
    :func:`~openmm_nice.molecule.zmatrix.build_zmatrix`) the internal coordinates are, in this order,

    .. math:: q = (b_1, \dots, b_{N-1},\ \theta_2, \dots, \theta_{N-1},\ \phi_3, \dots, \phi_{N-1})

    with :math:`b_r = |x_i - x_j|` in nm, :math:`\theta_r = \angle(i, j, k) \in (0, \pi)`
    and :math:`\phi_r` the dihedral i-j-k-l in :math:`(-\pi, \pi]` (IUPAC sign), for
    :math:`(i, j, k, l)` = row r. So ``q[:, r - 1]`` is a bond, ``q[:, N - 3 + r]`` an angle
    and ``q[:, 2N - 6 + r]`` a torsion, 3N - 6 numbers in all.

    :meth:`to_cartesian` builds positions in the canonical frame: row 0 at the origin, row 1
    on the +x axis, row 2 in the xy-plane with y > 0. Every configuration is
    :math:`x = R\, x_c(q) + t` for one rotation R and translation t, and the volume element is

    .. math:: d^{3N}x = d^3t\ d\mu(R)\ J(q)\ dq, \qquad
        J(q) = b_1^2 \prod_{r=2}^{N-1} b_r^2 \sin\theta_r,

    with :math:`\mu` the Haar measure of volume :math:`8\pi^2` (:math:`\sin\beta\,d\alpha\,
    d\beta\,d\gamma` in ZYZ Euler angles). Integrating the rigid motion out, a Boltzmann
    density :math:`e^{-U(x)}` becomes :math:`e^{-U(x(q))} J(q)` over q.

    Arguments:
        zmatrix: Integer array of shape (N, 4) from :func:`~openmm_nice.molecule.zmatrix.build_zmatrix`.

    Example:
        >>> ic = InternalCoordinates([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1]])
        >>> q = torch.tensor([[0.1, 0.2, torch.pi / 2]])
        >>> x, ladj = ic.to_cartesian(q)
        >>> x
        tensor([[0.0000, 0.0000, 0.0000, 0.1000, 0.0000, 0.0000, 0.1000, 0.2000, 0.0000]])
        >>> torch.allclose(ic.to_internal(x)[0], q)
        True
    """

    def __init__(self, zmatrix: np.ndarray | Tensor):
        super().__init__()
        self.register_buffer("zmatrix", torch.as_tensor(validate_zmatrix(zmatrix)))
        self._build_plan()
        self.register_load_state_dict_post_hook(_rebuild_after_load)

    @property
    def n_atoms(self) -> int:
        return self.zmatrix.shape[0]

    @property
    def dim(self) -> int:
        """The number 3N - 6 of internal coordinates."""
        return 3 * self.n_atoms - 6

    def _build_plan(self) -> None:
        """Index tensors for extracting q (row order) and placing atoms (by dependency depth)."""
        z = validate_zmatrix(self.zmatrix)
        n = len(z)
        depth = np.zeros(n, dtype=np.int64)
        for atom, *refs in z[3:]:
            depth[atom] = 1 + depth[refs].max()
        # Atoms of equal depth depend only on shallower ones, so each depth is placed at once.
        rows = 3 + np.argsort(depth[z[3:, 0]], kind="stable")
        self._generation_sizes = np.bincount(depth[z[rows, 0]])[1:].tolist()
        device = self.zmatrix.device
        plan = {
            "_rows": z.T,
            "_place_atom": z[rows, 0],
            "_place_refs": z[rows, 1:].T,
            "_place_columns": np.stack([rows - 1, rows - 2, rows - 3]),
            "_frame_atoms": z[1:3, 0],
        }
        for name, value in plan.items():
            tensor = torch.as_tensor(np.ascontiguousarray(value), device=device)
            self.register_buffer(name, tensor, persistent=False)
        # Row 2 hangs either on the root (at the origin) or on row 1 (on the +x axis).
        self._row2_on_root = bool(z[2, 1] == z[0, 0])

    def to_internal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Internal coordinates of Cartesian positions in any orientation.

        Arguments:
            x: Positions of shape (B, 3N) in nm, atoms in topology order (x, y, z per atom).

        Returns:
            q of shape (B, 3N - 6) in the order of the class docstring, and
            :math:`-\log J(q)` of shape (B,), the negative of :meth:`to_cartesian`'s ladj.
        """
        check_batch(x, 3 * self.n_atoms, "x")
        pos = x.reshape(x.shape[0], self.n_atoms, 3)
        pi, pj, pk, pl = (pos[:, rows] for rows in self._rows)
        bonds = torch.linalg.vector_norm(pi[:, 1:] - pj[:, 1:], dim=-1)
        angles = _angles(pi[:, 2:], pj[:, 2:], pk[:, 2:])
        torsions = _dihedrals(pi[:, 3:], pj[:, 3:], pk[:, 3:], pl[:, 3:])
        return torch.cat([bonds, angles, torsions], dim=1), -self._log_jacobian(bonds, angles)

    def to_cartesian(self, q: Tensor) -> tuple[Tensor, Tensor]:
        r"""Cartesian positions in the canonical frame from internal coordinates.

        Arguments:
            q: Internal coordinates of shape (B, 3N - 6): bonds (nm) > 0, angles in
                :math:`(0, \pi)`, torsions (any real; only their value mod :math:`2\pi` matters).

        Returns:
            x of shape (B, 3N) in nm in topology atom order, and :math:`\log J(q)` of shape (B,).
        """
        check_batch(q, self.dim, "q")
        n, batch = self.n_atoms, q.shape[0]
        bonds, angles, torsions = q.split([n - 1, n - 2, n - 3], dim=1)
        zero = q.new_zeros(batch)
        b1, b2, theta2 = bonds[:, 0], bonds[:, 1], angles[:, 0]
        along = b2 * torch.cos(theta2)
        x2 = along if self._row2_on_root else b1 - along
        frame = torch.stack(
            [
                torch.stack([b1, zero, zero], -1),
                torch.stack([x2, b2 * torch.sin(theta2), zero], -1),
            ],
            dim=1,
        )
        pos = q.new_zeros(batch, n, 3).index_copy(1, self._frame_atoms, frame)
        columns = self._place_columns
        bond, angle, torsion = bonds[:, columns[0]], angles[:, columns[1]], torsions[:, columns[2]]
        start = 0
        for size in self._generation_sizes:
            part = slice(start, start + size)
            pj, pk, pl = (pos[:, refs] for refs in self._place_refs[:, part])
            placed = _placed(pj, pk, pl, bond[:, part], angle[:, part], torsion[:, part])
            pos = pos.index_copy(1, self._place_atom[part], placed)
            start += size
        return pos.reshape(batch, 3 * n), self._log_jacobian(bonds, angles)

    def rigid_motion(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""The rotation R and translation t that place the canonical frame at positions x.

        Every configuration is :math:`x = R\, x_c(q) + t` atom by atom, with :math:`x_c(q)`
        the canonical-frame positions of :meth:`to_cartesian`: t is the position of the root
        atom (row 0), R's first column points from it to the atom of row 1, and its second
        lies in the plane of the first three atoms, towards the atom of row 2.

        Arguments:
            x: Positions of shape (B, 3N) in nm.

        Returns:
            R of shape (B, 3, 3), a proper rotation, and t of shape (B, 3), so that
            ``x_c @ R.mT + t`` (with x_c of shape (B, N, 3)) gives x back.

        Example:
            >>> ic = InternalCoordinates([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1]])
            >>> x = torch.tensor([[1.0, 1, 1, 1, 1.2, 1, 0.8, 1.2, 1]])
            >>> rotation, translation = ic.rigid_motion(x)
            >>> canonical = ic.to_cartesian(ic.to_internal(x)[0])[0].reshape(1, 3, 3)
            >>> torch.allclose(canonical @ rotation.mT + translation[:, None], x.reshape(1, 3, 3))
            True
        """
        check_batch(x, 3 * self.n_atoms, "x")
        pos = x.reshape(x.shape[0], self.n_atoms, 3)
        root = pos[:, int(self.zmatrix[0, 0])]
        first = pos[:, int(self.zmatrix[1, 0])] - root
        second = pos[:, int(self.zmatrix[2, 0])] - root
        e1 = first / torch.linalg.vector_norm(first, dim=-1, keepdim=True)
        in_plane = second - (second * e1).sum(-1, keepdim=True) * e1
        e2 = in_plane / torch.linalg.vector_norm(in_plane, dim=-1, keepdim=True)
        e3 = torch.linalg.cross(e1, e2)
        return torch.stack([e1, e2, e3], dim=-1), root

    @staticmethod
    def _log_jacobian(bonds: Tensor, angles: Tensor) -> Tensor:
        return 2 * torch.log(bonds).sum(1) + torch.log(torch.sin(angles)).sum(1)
