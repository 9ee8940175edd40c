"""Internal coordinates of a molecule: Z-matrix, exact bijection to Cartesians, flow-space map."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit
import torch
from torch import Tensor, nn

from openmm_nice.config import TORSION_FLOOR, TORSION_SMOOTHING
from openmm_nice.transforms import Transform

__all__ = [
    "build_zmatrix",
    "handed_torsions",
    "torsion_symmetries",
    "InternalCoordinates",
    "MolecularTransform",
]


def build_zmatrix(topology: app.Topology | mdtraj.Topology) -> np.ndarray:
    r"""A Z-matrix that places every atom from earlier atoms along the topology's bond graph.

    The root is a heavy atom near the centre of the bond graph (it minimises the larger
    graph distance to the two ends of a longest heavy-atom path), so that the frame atoms
    are heavy and reference chains are short. Atoms follow in breadth-first order, heavy
    neighbours before hydrogens. An atom i is placed by its bond partner j (the atom it was
    reached from), the angle partner k (j's own bond partner, or for children of the root the
    root's first child), and the torsion partner l, chosen as, in this order of preference:

    1. an earlier-placed other neighbour of j (a sibling of i): the torsion i-j-k-l is then
       fixed by the local geometry (about +-120 degrees for an sp3 centre, 180 for sp2), so
       only the first child of j carries the free rotor torsion and the siblings' torsions are
       narrow and nearly independent of it;
    2. an earlier-placed neighbour of k other than j (a proper torsion);
    3. any other earlier-placed atom (only for very short or unusual graphs).

    Arguments:
        topology: An ``openmm.app.Topology`` or ``mdtraj.Topology`` of one connected
            molecule with at least 3 atoms and its bonds.

    Returns:
        An int64 array of shape (N, 4); row r is ``[atom, j, k, l]`` with atom indices of the
        topology. Row 0 (the root) has ``j = k = l = -1``, row 1 has ``k = l = -1`` and row 2
        has ``l = -1``; every reference appears in an earlier row.

    Example:
        >>> top = app.Topology()
        >>> residue = top.addResidue("BUT", top.addChain())
        >>> atoms = [top.addAtom(f"C{i}", app.element.carbon, residue) for i in range(4)]
        >>> for a, b in zip(atoms[:-1], atoms[1:]):
        ...     _ = top.addBond(a, b)
        >>> build_zmatrix(top)
        array([[ 1, -1, -1, -1],
               [ 0,  1, -1, -1],
               [ 2,  1,  0, -1],
               [ 3,  2,  1,  0]])
    """
    elements, neighbours = _bond_graph(topology)
    hydrogen = [symbol in ("H", "D") for symbol in elements]
    n = len(hydrogen)
    if n < 3:
        raise ValueError(
            f"internal coordinates need at least 3 atoms, the topology has {n}; "
            "a molecule this small has no Z-matrix (use Cartesian coordinates)"
        )
    _check_connected(neighbours)
    root = _central_heavy_atom(hydrogen, neighbours)

    order = [root]
    parent = {root: -1}
    queue = deque([root])
    while queue:
        atom = queue.popleft()
        for other in sorted(neighbours[atom], key=lambda a: (hydrogen[a], a)):
            if other not in parent:
                parent[other] = atom
                order.append(other)
                queue.append(other)

    row_of = {atom: r for r, atom in enumerate(order)}
    rows = [[root, -1, -1, -1]]
    for r, atom in enumerate(order[1:], start=1):
        j = parent[atom]
        if r == 1:
            rows.append([atom, j, -1, -1])
            continue
        # The root has no parent; its first child (row 1) is the angle partner of its children.
        k = parent[j] if parent[j] >= 0 else order[1]
        if r == 2:
            rows.append([atom, j, k, -1])
            continue

        partner = (
            _earliest(neighbours[j] - {k}, row_of, r)
            or _earliest(neighbours[k] - {j}, row_of, r)
            or _earliest(set(order[:r]) - {j, k}, row_of, r)
        )
        rows.append([atom, j, k, partner[0]])
    return np.asarray(rows, dtype=np.int64)


def torsion_symmetries(
    topology: app.Topology | mdtraj.Topology,
    zmatrix: np.ndarray | Tensor,
    system: openmm.System | None = None,
) -> np.ndarray:
    r"""The rotational symmetry order of each Z-matrix torsion (1 where there is none).

    A proper torsion row r = (i, j, k, l) (l bonded to k) turns the atoms bonded to j (other
    than k) about the j-k bond. When those are n >= 2 atoms of one element with equal nonbonded parameters in
    ``system`` (if given), such as the hydrogens of a methyl group, the rotor is n-fold
    symmetric: the Boltzmann density of the torsion repeats every :math:`2\pi / n`, whatever
    the data happened to visit. :meth:`MolecularTransform.from_data` uses this to symmetrise
    the torsion's fitted density (a better proposal; any density keeps the map exact).

    Returns:
        An int64 array of shape (N - 3,), in the order of the torsions of
        :class:`InternalCoordinates`.

    Example:
        >>> top = app.Topology()
        >>> residue = top.addResidue("ETH", top.addChain())
        >>> c1, c2 = (top.addAtom(f"C{i}", app.element.carbon, residue) for i in (1, 2))
        >>> _ = top.addBond(c1, c2)
        >>> for c in (c1, c2):
        ...     for _ in range(3):
        ...         _ = top.addBond(c, top.addAtom("H", app.element.hydrogen, residue))
        >>> torsion_symmetries(top, build_zmatrix(top)).tolist()
        [1, 1, 3, 1, 1]
    """
    z = _validate_zmatrix(zmatrix)
    elements, neighbours = _bond_graph(topology)
    parameters: dict[int, tuple] = {}
    if system is not None:
        for force in system.getForces():
            if isinstance(force, openmm.NonbondedForce):
                for a in range(force.getNumParticles()):
                    charge, sigma, epsilon = force.getParticleParameters(a)
                    parameters[a] = (
                        round(charge.value_in_unit(openmm.unit.elementary_charge), 6),
                        round(sigma.value_in_unit(openmm.unit.nanometer), 6),
                        round(epsilon.value_in_unit(openmm.unit.kilojoule_per_mole), 6),
                    )

    def kind(a: int) -> tuple:
        return (elements[a], parameters.get(a))

    orders = []
    for _, j, k, partner in z[3:]:
        # A torsion placed against a sibling (l bonded to j) is a fixed relative angle, not
        # the rotor's own torsion.
        turned = sorted(neighbours[j] - {k})
        same = (
            partner not in neighbours[j]
            and len(turned) >= 2
            and len({kind(a) for a in turned}) == 1
        )
        orders.append(len(turned) if same else 1)
    return np.asarray(orders, dtype=np.int64)


def handed_torsions(
    topology: app.Topology | mdtraj.Topology,
    zmatrix: np.ndarray | Tensor,
    positions: np.ndarray | Tensor,
) -> np.ndarray:
    r"""The handedness of each stereocentre torsion of a structure, 0 for the other torsions.

    A Z-matrix row (i, j, k, l) whose torsion partner l is bonded to j (a sibling of i, see
    :func:`build_zmatrix`) at a centre j with four bonded neighbours fixes on which side of
    the plane (k, j, l) atom i lies: the sign of that torsion is the centre's handedness
    (about +-120 degrees at an sp3 carbon). No thermal motion changes it (inverting a
    tetrahedral centre breaks bonds), and the mirror image of a molecule has the same energy,
    so a generator that may place i on either side can learn the other enantiomer, or mix
    both. :class:`MolecularTransform` keeps such torsions on the reference's half circle,
    so that the Boltzmann distribution sampled is that of the given stereoisomer, as MD
    from the same structure samples it. Centres with three neighbours (planar sp2 atoms,
    amines, which invert) are left free.

    Arguments:
        topology: The molecule's ``openmm.app.Topology`` or ``mdtraj.Topology``.
        zmatrix: Integer array (N, 4) from :func:`build_zmatrix`.
        positions: One reference structure, shape (N, 3) or (3N,) or (1, 3N), in nm.

    Returns:
        An array of shape (N - 3,) of -1, 0 or +1 per torsion of :class:`InternalCoordinates`.

    Example:
        >>> top = app.Topology()
        >>> residue = top.addResidue("MET", top.addChain())
        >>> c = top.addAtom("C", app.element.carbon, residue)
        >>> hs = [top.addAtom(f"H{i}", app.element.hydrogen, residue) for i in range(4)]
        >>> for h in hs:
        ...     _ = top.addBond(c, h)
        >>> xyz = [[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
        ...        [0.63, -0.63, -0.63]]
        >>> handed_torsions(top, build_zmatrix(top), np.array(xyz) / 10).tolist()
        [1, -1]
    """
    z = _validate_zmatrix(zmatrix)
    _, neighbours = _bond_graph(topology)
    x = torch.as_tensor(np.asarray(positions, dtype=np.float64)).reshape(1, -1)
    if x.shape[1] != 3 * len(z):
        raise ValueError(
            f"positions must hold {len(z)} atoms (shape (N, 3) or (3N,)), got {tuple(x.shape)}"
        )
    with torch.no_grad():
        torsions = InternalCoordinates(z).to_internal(x)[0][0, 2 * len(z) - 3 :].numpy()
    signs = np.zeros(len(z) - 3, dtype=np.int64)
    for t, (_, j, _, partner) in enumerate(z[3:]):
        if partner in neighbours[j] and len(neighbours[j]) == 4:
            signs[t] = 1 if torsions[t] > 0 else -1
    return signs


def _earliest(candidates: set[int], row_of: dict[int, int], row: int) -> tuple[int] | tuple[()]:
    """The candidate placed first among those placed before ``row``, as a 0- or 1-tuple."""
    placed = [a for a in candidates if row_of[a] < row]
    return (min(placed, key=row_of.__getitem__),) if placed else ()


def _bond_graph(
    topology: app.Topology | mdtraj.Topology,
) -> tuple[list[str | None], list[set[int]]]:
    """Element symbols (None where unknown) and neighbour sets of the atoms of an OpenMM or
    mdtraj topology."""
    if isinstance(topology, app.Topology):
        atoms, bonds = list(topology.atoms()), list(topology.bonds())
    elif isinstance(topology, mdtraj.Topology):
        atoms, bonds = list(topology.atoms), list(topology.bonds)
    else:
        raise TypeError(
            f"expected an openmm.app.Topology or mdtraj.Topology, got {type(topology).__name__}"
        )
    elements = [None if a.element is None else a.element.symbol for a in atoms]
    neighbours: list[set[int]] = [set() for _ in atoms]
    for a, b in bonds:
        if a.index != b.index:
            neighbours[a.index].add(b.index)
            neighbours[b.index].add(a.index)
    return elements, neighbours


def _graph_distances(start: int, neighbours: list[set[int]]) -> np.ndarray:
    """Bond-graph distances from ``start`` (-1 where unreachable)."""
    distance = np.full(len(neighbours), -1, dtype=np.int64)
    distance[start] = 0
    queue = deque([start])
    while queue:
        atom = queue.popleft()
        for other in neighbours[atom]:
            if distance[other] < 0:
                distance[other] = distance[atom] + 1
                queue.append(other)
    return distance


def _check_connected(neighbours: list[set[int]]) -> None:
    not_first = _graph_distances(0, neighbours) < 0
    if not not_first.any():
        return
    components, unreached = 1, not_first.copy()
    while unreached.any():
        components += 1
        unreached &= _graph_distances(int(np.argmax(unreached)), neighbours) < 0
    first = np.flatnonzero(not_first)[:5].tolist()
    raise ValueError(
        f"the bond graph has {components} separate molecules (atoms {first}... are not bonded "
        "to atom 0); internal coordinates need one connected molecule: remove solvent and ions, "
        "or add the missing bonds (e.g. CONECT records for a ligand)"
    )


def _central_heavy_atom(hydrogen: list[bool], neighbours: list[set[int]]) -> int:
    """A heavy atom near the graph centre, by a double sweep over heavy atoms (O(N))."""
    candidates = np.array([i for i, h in enumerate(hydrogen) if not h] or range(len(hydrogen)))
    first = _graph_distances(int(candidates[0]), neighbours)
    end_a = int(candidates[np.argmax(first[candidates])])
    from_a = _graph_distances(end_a, neighbours)
    end_b = int(candidates[np.argmax(from_a[candidates])])
    from_b = _graph_distances(end_b, neighbours)
    # Smallest larger distance to the two ends first, then nearest the a-b path, then index.
    key = np.lexsort(
        (candidates, (from_a + from_b)[candidates], np.maximum(from_a, from_b)[candidates])
    )
    return int(candidates[key[0]])


def _validate_zmatrix(zmatrix: np.ndarray | Tensor) -> np.ndarray:
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


def _check_batch(x: Tensor, dim: int, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} as a torch.Tensor of shape (B, {dim}), got {type(x)}")
    if not x.is_floating_point():
        raise TypeError(f"expected {name} as a float32 or float64 tensor, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected {name} of shape (B, {dim}), got {tuple(x.shape)}")


class InternalCoordinates(nn.Module):
    r"""The exact map between Cartesian positions and Z-matrix internal coordinates.

    For a Z-matrix with rows :math:`r = 0, \dots, N-1` (see :func:`build_zmatrix`) the
    internal coordinates are, in this order,

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
        zmatrix: Integer array of shape (N, 4) from :func:`build_zmatrix`.

    Example:
        >>> ic = InternalCoordinates([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1]])
        >>> q = torch.tensor([[0.1, 0.2, math.pi / 2]])
        >>> x, ladj = ic.to_cartesian(q)
        >>> x
        tensor([[0.0000, 0.0000, 0.0000, 0.1000, 0.0000, 0.0000, 0.1000, 0.2000, 0.0000]])
        >>> torch.allclose(ic.to_internal(x)[0], q)
        True
    """

    def __init__(self, zmatrix: np.ndarray | Tensor):
        super().__init__()
        self.register_buffer("zmatrix", torch.as_tensor(_validate_zmatrix(zmatrix)))
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
        z = _validate_zmatrix(self.zmatrix)
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
        _check_batch(x, 3 * self.n_atoms, "x")
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
        _check_batch(q, self.dim, "q")
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
        _check_batch(x, 3 * self.n_atoms, "x")
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


class MolecularTransform(Transform):
    r"""The exact bijection from an unconstrained flow space :math:`s \in R^{3N-6}` to Cartesians.

    Each coordinate is first normalised, :math:`y = \mathrm{shift} + \mathrm{scale} \cdot s`,
    then mapped onto the domain of its internal coordinate:

    - bonds :math:`b = e^{y}` (nm), so s is a normalised log bond length;
    - angles :math:`\theta = \pi\,\sigma(y)`, with :math:`\sigma` the logistic sigmoid;
    - torsions :math:`\phi = c + G^{-1}(\Phi(y))`, with :math:`\Phi` the standard normal CDF,
      c the torsion's cut and G the CDF of a fixed density g on the circle cut at c: g is
      piecewise constant on K equal bins, so G is piecewise linear and both directions are
      closed-form, with :math:`d\phi/dy = \mathcal N(y; 0, 1) / g(\phi)`. With K = 1 (g
      uniform) this is :math:`\phi = \mathrm{offset} + \pi\,\mathrm{erf}(y / \sqrt 2)`, the
      cut at :math:`c = \mathrm{offset} - \pi`. Fitted to data (:meth:`from_data`), g is the
      data's smoothed torsion histogram mixed with a uniform floor, so that every torsion's data
      are normal in y whatever their modes (methyl rotors, the backbone's basins), and regions
      the data never visited keep a share of the volume;

    A torsion may have a parent torsion (``torsion_parent``): its density is then conditional
    on the parent's angle a, :math:`g(\phi \mid a) = (1 - \lambda) g_j(\phi) + \lambda
    g_{j+1}(\phi)` with :math:`g_j` piecewise constant on the same K bins, one for each of P
    bins of a, and :math:`\lambda` a's linear position between the centres of bins j and j + 1
    (periodic). The mixture is again piecewise constant on the K bins, so both directions stay
    closed-form (a bisection finds the bin) and the map is continuous in a. The Jacobian of
    (parent, child) is triangular, so the log-determinant keeps its form with
    :math:`g(\phi \mid a)` in place of :math:`g(\phi)`. The parents form a forest (fitted by
    :meth:`from_data` with ``torsion_tree``: a maximum-mutual-information spanning forest, the
    Chow-Liu tree), so that the map's torsion density is a tree-structured joint density: the
    backbone's (phi, psi) basins, for example, get their own psi distribution for each phi;

    and :meth:`InternalCoordinates.to_cartesian` places the atoms in the canonical frame. The
    log-determinant is the sum of :math:`\sum \log \mathrm{scale}`, the domain maps'
    :math:`\sum y_b + \sum [\log\pi + \log\sigma(y_\theta) + \log\sigma(-y_\theta)]
    + \sum [\log \mathcal N(y_\phi; 0, 1) - \log g(\phi)]` and :math:`\log J(q)`, so that with
    the rigid motion integrated out, :math:`\log p_X(x) = \log p_S(s) - \mathrm{ladj}`.

    Arguments:
        zmatrix: Integer array of shape (N, 4) from :func:`build_zmatrix`.
        shift: The normalisation's shift, shape (3N - 6,), in the order of
            :class:`InternalCoordinates` (log nm for bonds, logit(theta / pi) for angles).
        scale: The normalisation's positive scale, shape (3N - 6,).
        torsion_offset: The torsions' cuts plus pi, shape (N - 3,), in radians.
        torsion_cdf: G at the K + 1 bin edges from the cut, shape (N - 3, K + 1), rising
            strictly from 0 to 1; None for uniform torsions (K = 1).
        torsion_sign: Shape (N - 3,): 0 for a torsion on the whole circle (the map above),
            +1 or -1 for one kept on the half circle of that sign, the handedness of a
            stereocentre (see :func:`handed_torsions`), mapped by
            :math:`\phi = \pm\pi\,\sigma(y)`; None for all 0.
        torsion_parent: Shape (N - 3,): the index of each torsion's parent torsion, -1 for
            none; the parents form a forest over whole-circle torsions. None for all -1.
        conditional_cdf: Shape (C, P, K + 1), for the C torsions with a parent in increasing
            order: G at the K + 1 bin edges of :math:`g_j` for each of the P parent bins (bin
            j centred at :math:`-\pi + (j + 1/2) 2\pi / P`), each row rising strictly from 0
            to 1. None when no torsion has a parent.

    Use :meth:`from_data` to set shift, scale and offsets from a structure or a trajectory.
    All four are buffers (saved in the state dict, not trained) and are cast to the input's
    dtype, so the module works in float32 and float64. A row of s with a non-finite entry
    gives a NaN row of x (no error), which an energy treats as :math:`U = +\infty`.

    Example:
        >>> zmatrix = [[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]]
        >>> reference = torch.tensor([[0.0, 0, 0, 0.15, 0, 0, 0.2, 0.14, 0, 0.35, 0.15, 0.05]])
        >>> t = MolecularTransform.from_data(zmatrix, reference)
        >>> s = torch.randn(5, 6)
        >>> x, ladj = t.call_and_ladj(s)
        >>> x.shape, ladj.shape
        (torch.Size([5, 12]), torch.Size([5]))
        >>> torch.allclose(t.inverse(x), s, atol=1e-4)
        True
    """

    def __init__(
        self,
        zmatrix: np.ndarray | Tensor,
        shift: np.ndarray | Tensor,
        scale: np.ndarray | Tensor,
        torsion_offset: np.ndarray | Tensor,
        torsion_cdf: np.ndarray | Tensor | None = None,
        torsion_sign: np.ndarray | Tensor | None = None,
        torsion_parent: np.ndarray | Tensor | None = None,
        conditional_cdf: np.ndarray | Tensor | None = None,
    ):
        super().__init__()
        self.internal = InternalCoordinates(zmatrix)
        dim, n_torsions = self.internal.dim, self.internal.n_atoms - 3
        for name, value, size in (
            ("shift", shift, dim),
            ("scale", scale, dim),
            ("torsion_offset", torsion_offset, n_torsions),
        ):
            value = torch.as_tensor(value, dtype=torch.float64)
            if value.shape != (size,):
                raise ValueError(f"{name} must have shape ({size},), got {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} must be finite, got {value}")
            self.register_buffer(name, value)
        if not (self.scale > 0).all():
            raise ValueError(f"scale must be positive, got {self.scale}")
        if torsion_cdf is None:
            torsion_cdf = torch.tensor([0.0, 1.0]).expand(n_torsions, 2)
        cdf = torch.as_tensor(torsion_cdf, dtype=torch.float64).clone()
        if cdf.ndim != 2 or cdf.shape[0] != n_torsions or cdf.shape[1] < 2:
            raise ValueError(
                f"torsion_cdf must have shape ({n_torsions}, K + 1) with K >= 1, "
                f"got {tuple(cdf.shape)}"
            )
        if not (
            torch.isfinite(cdf).all()
            and (cdf[:, 0] == 0).all()
            and (cdf[:, -1] == 1).all()
            and (cdf.diff(dim=1) > 0).all()
        ):
            raise ValueError(
                "torsion_cdf must rise strictly from 0 to 1 along each row (every bin needs "
                "positive mass; from_data mixes in a uniform floor for this)"
            )
        self.register_buffer("torsion_cdf", cdf)
        sign = torch.zeros(n_torsions) if torsion_sign is None else torsion_sign
        sign = torch.as_tensor(sign, dtype=torch.float64).clone()
        if sign.shape != (n_torsions,) or not torch.isin(sign, sign.new_tensor([-1, 0, 1])).all():
            raise ValueError(
                f"torsion_sign must hold {n_torsions} values in {{-1, 0, 1}} (0: the whole "
                f"circle; +-1: that half circle, see handed_torsions), got {torsion_sign}"
            )
        self.register_buffer("torsion_sign", sign)
        parent = torch.full((n_torsions,), -1) if torsion_parent is None else torsion_parent
        parent = torch.as_tensor(parent).clone()
        if parent.shape != (n_torsions,) or parent.is_floating_point():
            raise ValueError(
                f"torsion_parent must hold {n_torsions} integer indices (-1: no parent), "
                f"got {torsion_parent}"
            )
        parent = parent.long()
        _check_torsion_forest(parent.tolist(), sign.tolist())
        self.register_buffer("torsion_parent", parent)
        n_children = int((parent >= 0).sum())
        if conditional_cdf is None:
            if n_children:
                raise ValueError(f"{n_children} torsions have a parent but conditional_cdf is None")
            conditional_cdf = torch.linspace(0, 1, cdf.shape[1]).expand(0, 1, -1)
        conditional = torch.as_tensor(conditional_cdf, dtype=torch.float64).clone()
        if (
            conditional.ndim != 3
            or conditional.shape[0] != n_children
            or conditional.shape[1] < 1
            or conditional.shape[2] != cdf.shape[1]
        ):
            raise ValueError(
                f"conditional_cdf must have shape ({n_children}, P, {cdf.shape[1]}) (one row "
                f"of the torsion_cdf's K + 1 edges for each child and parent bin), got "
                f"{tuple(conditional.shape)}"
            )
        if n_children and not (
            torch.isfinite(conditional).all()
            and (conditional[..., 0] == 0).all()
            and (conditional[..., -1] == 1).all()
            and (conditional.diff(dim=2) > 0).all()
        ):
            raise ValueError("conditional_cdf must rise strictly from 0 to 1 along each row")
        self.register_buffer("conditional_cdf", conditional)
        self._plan_torsion_tree()

    def _plan_torsion_tree(self) -> None:
        """The children of each depth of the torsion forest, with their parents and their rows
        of ``conditional_cdf``, as Python lists (the forward map sets them level by level)."""
        parent = self.torsion_parent.tolist()
        row = {t: i for i, t in enumerate(t for t, p in enumerate(parent) if p >= 0)}
        depth = []
        for t in range(len(parent)):
            d, p = 0, parent[t]
            while p >= 0:
                d, p = d + 1, parent[p]
            depth.append(d)
        self._tree_levels = [
            ([t for t in row if depth[t] == d], [row[t] for t in row if depth[t] == d])
            for d in range(1, max(depth, default=0) + 1)
        ]
        self._children = list(row)

    @property
    def dim(self) -> int:
        """The dimension 3N - 6 of the flow space."""
        return self.internal.dim

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict brings its own torsion densities, whatever their number of bins.
        cdf = state_dict.get(prefix + "torsion_cdf")
        if cdf is not None and cdf.shape != self.torsion_cdf.shape:
            self.torsion_cdf = self.torsion_cdf.new_empty(cdf.shape)
        if cdf is not None and prefix + "torsion_parent" not in state_dict:
            # saved before conditional torsions existed: every torsion has its own density
            state_dict[prefix + "torsion_parent"] = torch.full_like(self.torsion_parent, -1)
            state_dict[prefix + "conditional_cdf"] = torch.linspace(
                0, 1, cdf.shape[1], dtype=torch.float64
            ).expand(0, 1, -1)
        conditional = state_dict.get(prefix + "conditional_cdf")
        if conditional is not None and conditional.shape != self.conditional_cdf.shape:
            self.conditional_cdf = self.conditional_cdf.new_empty(conditional.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        parent = state_dict.get(prefix + "torsion_parent")
        if parent is not None:
            _check_torsion_forest(parent.tolist(), self.torsion_sign.tolist())
            self._plan_torsion_tree()

    @classmethod
    def from_data(
        cls,
        zmatrix: np.ndarray | Tensor,
        x_frames: np.ndarray | Tensor,
        min_scale: float = 1e-3,
        reference_scale: tuple[float, float, float] = (0.05, 0.15, 1.0),
        bins: int = 360,
        smoothing: float = 5.0,
        floor: float = TORSION_FLOOR,
        density_smoothing: float | str = TORSION_SMOOTHING,
        energy: Callable[[Tensor], Tensor] | None = None,
        symmetry: np.ndarray | Tensor | None = None,
        scan_frames: int = 32,
        scan_angles: int = 72,
        weights: np.ndarray | Tensor | None = None,
        handedness: np.ndarray | Tensor | None = None,
        torsion_tree: bool = False,
        cuts: np.ndarray | Tensor | None = None,
    ) -> MolecularTransform:
        r"""A transform normalised to a trajectory, or to one reference structure.

        With F >= 2 frames, each torsion's density g is its circular histogram (``bins`` bins,
        smoothed by a circular Gaussian of ``density_smoothing`` bins) mixed with a uniform
        density of weight ``floor``, and its cut lies in the least-populated region of the
        histogram smoothed by ``smoothing`` bins, so that no data mode is split. Where that region is wide (a basin the data
        never visited may lie in it), an ``energy`` chooses the cut inside it: each torsion is
        set to ``scan_angles`` values in ``scan_frames`` evenly spaced frames, and the cut goes
        where :math:`-\log \langle e^{-U} \rangle_\mathrm{frames}` is highest, a barrier
        rather than an unvisited basin. Shift and scale are then the mean and standard deviation
        (at least ``min_scale``) of each coordinate in its transformed space: log b,
        logit(theta / pi) and the torsion's :math:`y = \Phi^{-1}(G(\phi - c))`. The cut and g
        only decide how well the flow can fit; every choice is an exact bijection.

        With one frame, torsions are uniform (K = 1) with the cut opposite the reference
        torsion, shift is the reference's value (y = 0 for torsions) and scale is
        ``reference_scale`` = (bond, angle, torsion) for every coordinate of that kind. The
        defaults 0.05 (a 5% bond spread) and 0.15 (about 6 degrees near 110 degrees) are
        somewhat wider than thermal fluctuations at 300 K; 1.0 makes a standard normal s a
        uniform torsion.

        Arguments:
            zmatrix: Integer array of shape (N, 4) from :func:`build_zmatrix`.
            x_frames: Positions in nm of shape (F, 3N) or (F, N, 3), numpy or torch.
            min_scale: Floor on the data's scale, so that a stiff coordinate stays invertible.
            reference_scale: Scales (bond, angle, torsion) used for a single frame.
            bins: Number K of bins of the torsion densities and histograms.
            smoothing: Width in bins of the Gaussian that smooths the histograms.
            floor: Weight in (0, 1] of the uniform part of each torsion density.
            density_smoothing: Width in bins of the Gaussian that smooths the histograms
                of the torsion densities (a rough density would show up as noise in the
                importance weights, a too smooth one spreads narrow wells), or ``"auto"``:
                each torsion's own width, chosen from :data:`SMOOTHING_CANDIDATES` by
                cross-validation over contiguous blocks of frames (blocks, not single frames,
                because MD frames are correlated: a width must predict a stretch of
                trajectory it has not seen). Fast rotors then get narrow widths and torsions
                whose data cover their basins unevenly get wide ones.
            energy: Optional reduced energy of Cartesian positions (B, 3N) in nm, used to
                place cuts inside wide unvisited regions.
            symmetry: Optional rotational symmetry order of each torsion, shape (N - 3,),
                from :func:`torsion_symmetries`; an n-fold torsion's histogram counts each
                frame at its n equivalent angles, so that a rotor's wells get equal shares
                even where short MD visited them unequally.
            scan_frames: Number of frames the energy scan uses.
            scan_angles: Number of torsion values the energy scan tries.
            weights: Optional non-negative weights of the frames, shape (F,), e.g. the
                normalised importance weights of a generator's own samples, so that the
                densities, cuts, shifts and scales are those of the weighted ensemble
                (data-free training refits the map this way). Frames of weight 0 are unused.
            handedness: Optional ``torsion_sign`` of shape (N - 3,) from
                :func:`handed_torsions`: torsions with sign +-1 keep that half circle,
                normalised like angles (no density, no cut); every frame must lie in it.
            torsion_tree: Condition torsion densities on parent torsions (see the class
                docstring): the parents are a Chow-Liu forest of the (weighted) frames over
                the whole-circle torsions without a rotor symmetry, and each child's density
                in each of :data:`PARENT_BINS` parent bins is its weighted, smoothed histogram
                there, leaning to its marginal where the bin holds few frames. Needs F >= 2.
            cuts: Optional current cut of each torsion (radians, shape (N - 3,), e.g. a map's
                ``torsion_offset - pi``), for a refit: a cut is kept wherever the smoothed
                histogram is as low there as at its least-populated bin, so that a refit
                moves a cut only when the frames have reached it. Otherwise the choice
                between two empty regions would follow the noise at their edges, and a cut
                that jumps to the other one reorders the torsion's basins along the flow's
                coordinate, which the flow, trained on the old order, does not survive.

        Returns:
            A :class:`MolecularTransform` with float64 buffers.
        """
        internal = InternalCoordinates(zmatrix)
        n = internal.n_atoms
        x = torch.as_tensor(x_frames).detach().to("cpu", torch.float64)
        if x.ndim == 3:
            x = x.reshape(x.shape[0], -1)
        if x.ndim != 2 or x.shape[1] != 3 * n or x.shape[0] < 1:
            raise ValueError(
                f"x_frames must have shape (F, {3 * n}) or (F, {n}, 3) with F >= 1 for this "
                f"{n}-atom Z-matrix, got {tuple(x_frames.shape)}"
            )
        w = None
        if weights is not None:
            w = torch.as_tensor(weights).detach().to("cpu", torch.float64).reshape(-1)
            if w.shape != (x.shape[0],) or not torch.isfinite(w).all() or (w < 0).any():
                raise ValueError(
                    f"weights must be {x.shape[0]} finite non-negative numbers (one per frame), "
                    f"got shape {tuple(w.shape)}"
                )
            if not w.sum() > 0:
                raise ValueError("weights are all zero: no frame to fit the map to")
            keep = w > 0
            x, w = x[keep], w[keep] / w[keep].sum()
        if not torch.isfinite(x).all():
            raise ValueError("x_frames contains non-finite coordinates; remove those frames")
        with torch.no_grad():
            q = internal.to_internal(x)[0]
        bonds, angles, torsions = q.split([n - 1, n - 2, n - 3], dim=1)
        sign = torch.zeros(n - 3, dtype=torch.float64)
        if handedness is not None:
            sign = torch.as_tensor(np.asarray(handedness), dtype=torch.float64).reshape(-1)
            if sign.shape != (n - 3,):
                raise ValueError(
                    f"handedness must hold {n - 3} signs (one per torsion), got {tuple(sign.shape)}"
                )
        half = sign != 0
        signed = sign * torsions
        if (half & ((signed <= 0) | (signed >= math.pi))).any():
            raise ValueError(
                "some frames have a stereocentre of the other handedness than `handedness` "
                "says (a mirror image); fit the map to frames of the reference stereoisomer"
            )
        y_half = _logit_angle(signed.clamp(1e-12, math.pi - 1e-12))
        if x.shape[0] == 1 and w is None:
            offset = torsions[0]
            y_torsion = torch.where(half, y_half, 0.0)[0]
            shift = torch.cat([bonds[0].log(), _logit_angle(angles[0]), y_torsion])
            kinds = [(n - 1, 0), (n - 2, 1), (n - 3, 2)]
            scale = torch.cat(
                [
                    torch.full((size,), float(reference_scale[i]), dtype=torch.float64)
                    for size, i in kinds
                ]
            )
            scale[2 * n - 3 :] = torch.where(half, reference_scale[1], scale[2 * n - 3 :])
            return cls(zmatrix, shift, scale, offset, torsion_sign=sign)
        if not 0 < floor <= 1:
            raise ValueError(f"floor must lie in (0, 1], got {floor}")
        scan = None
        if energy is not None:
            scan = _torsion_scan(internal, q, energy, scan_frames, scan_angles)
        frame_weights = None if w is None else w.numpy()
        offsets, cdfs = [], []
        orders = np.ones(n - 3, dtype=np.int64) if symmetry is None else np.asarray(symmetry)
        if orders.shape != (n - 3,) or (orders < 1).any():
            raise ValueError(
                f"symmetry must hold {n - 3} orders >= 1 (one per torsion), got {orders}"
            )
        if density_smoothing != "auto" and (
            isinstance(density_smoothing, str) or not density_smoothing > 0
        ):
            raise ValueError(
                f"density_smoothing must be a positive width in bins or 'auto', "
                f"got {density_smoothing!r}"
            )
        if cuts is not None:
            cuts = torch.as_tensor(cuts).detach().to("cpu", torch.float64).reshape(-1).numpy()
            if cuts.shape != (n - 3,) or not np.isfinite(cuts).all():
                raise ValueError(
                    f"cuts must hold {n - 3} finite angles (one per torsion), got {cuts}"
                )
        widths = []
        for t, values in enumerate(torsions.T.numpy()):
            # each frame's n equivalent angles of an n-fold rotor: shape (n, F)
            copies = values[None] + 2 * math.pi * np.arange(orders[t])[:, None] / orders[t]
            values = copies.reshape(-1)
            copy_weights = None
            if frame_weights is not None:
                copy_weights = np.tile(frame_weights, orders[t])
            cut = _cut_angle(
                values,
                bins,
                smoothing,
                None if scan is None else scan[t],
                copy_weights,
                None if cuts is None else float(cuts[t]),
            )
            width = density_smoothing
            if width == "auto":
                width = _cross_validated_smoothing(copies - cut, bins, floor, frame_weights)
            widths.append(float(width))
            offsets.append(math.remainder(cut + math.pi, 2 * math.pi))
            cdfs.append(_circular_cdf(values - cut, bins, width, floor, copy_weights))
        offset = torch.where(half, 0.0, torch.tensor(offsets, dtype=torch.float64))
        cdf = torch.as_tensor(np.stack(cdfs))
        cdf[half] = torch.linspace(0, 1, bins + 1, dtype=torch.float64)  # unused there
        parent, conditional = None, None
        if torsion_tree:
            uniform = np.full(len(x), 1.0 / len(x)) if frame_weights is None else frame_weights
            values = torsions.numpy()
            parent = _torsion_tree(values, uniform, (orders == 1) & ~half.numpy())
            children = np.flatnonzero(parent >= 0)
            cut = np.asarray(offsets) - math.pi
            conditional = [
                _conditional_cdfs(
                    values[:, t] - cut[t], values[:, parent[t]], bins, widths[t], floor, uniform
                )
                for t in children
            ]
            conditional = np.stack(conditional) if len(children) else None
        unit = torch.ones(3 * n - 6, dtype=torch.float64)
        y_torsion = cls(zmatrix, 0 * unit, unit, offset, cdf, sign, parent, conditional)
        y_torsion = y_torsion._torsions_to_normal(torsions)[0]
        y = torch.cat([bonds.log(), _logit_angle(angles), y_torsion], dim=1)
        if w is None:
            mean, std = y.mean(0), y.std(0)
        else:
            mean = w @ y
            std = (w @ (y - mean) ** 2).sqrt()
        transform = cls(
            zmatrix, mean, std.clamp_min(min_scale), offset, cdf, sign, parent, conditional
        )
        transform.density_smoothing = widths  # what each torsion's density used, in bins
        return transform

    def call_and_ladj(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian positions (B, 3N) in nm from flow coordinates s (B, 3N - 6), and the ladj."""
        _check_batch(s, self.dim, "s")
        shift, scale = (b.to(s.dtype) for b in (self.shift, self.scale))
        y = shift + scale * s
        n = self.internal.n_atoms
        y_bond, y_angle, y_torsion = y.split([n - 1, n - 2, n - 3], dim=1)
        torsion, log_slope = self._torsions_from_normal(y_torsion)
        q = torch.cat([torch.exp(y_bond), math.pi * torch.sigmoid(y_angle), torsion], dim=1)
        x, log_jacobian = self.internal.to_cartesian(q)
        # An infinite angle or torsion saturates to a finite q; mark the row so that the
        # energy sees a non-finite configuration (U = +inf) instead of a degenerate one.
        x = torch.where(torch.isfinite(s).all(dim=1, keepdim=True), x, math.nan)
        return x, self._ladj_of_maps(y, scale, log_slope) + log_jacobian

    def inverse_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Flow coordinates s (B, 3N - 6) of positions x (B, 3N) in nm, and the inverse's ladj.

        A configuration outside the map's domain (a stereocentre of the other handedness than
        ``torsion_sign`` keeps) gets a finite s and ladj :math:`-\infty`: density 0.
        """
        _check_batch(x, 3 * self.internal.n_atoms, "x")
        shift, scale = (b.to(x.dtype) for b in (self.shift, self.scale))
        q, minus_log_jacobian = self.internal.to_internal(x)
        n = self.internal.n_atoms
        bonds, angles, torsions = q.split([n - 1, n - 2, n - 3], dim=1)
        y_torsion, log_slope, inside = self._torsions_to_normal(torsions)
        y = torch.cat([torch.log(bonds), _logit_angle(angles), y_torsion], dim=1)
        s = (y - shift) / scale
        ladj = minus_log_jacobian - self._ladj_of_maps(y, scale, log_slope)
        return s, torch.where(inside, ladj, -math.inf)

    def _torsions_from_normal(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Torsions (B, T) from their normalised values y, and log|d torsion / d y|."""
        torsion, log_g = _normal_to_torsion(y, self.torsion_offset, self.torsion_cdf)
        for children, rows in self._tree_levels:  # parents before their children
            index = torch.tensor(children, device=y.device)
            parents = self.torsion_parent[index]
            new, new_log_g = _conditional_normal_to_torsion(
                y[:, index],
                self.torsion_offset[index],
                self.conditional_cdf[torch.tensor(rows, device=y.device)],
                torsion[:, parents],
            )
            torsion = torsion.index_copy(1, index, new)
            log_g = log_g.index_copy(1, index, new_log_g)
        log_slope = -0.5 * math.log(2 * math.pi) - 0.5 * y**2 - log_g
        if not self.torsion_sign.any():
            return torsion, log_slope
        sign = self.torsion_sign.to(y.dtype)
        half = sign != 0
        return (
            torch.where(half, sign * math.pi * torch.sigmoid(y), torsion),
            torch.where(half, _log_slope_of_logistic(y), log_slope),
        )

    def _torsions_to_normal(self, torsion: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The inverse of :meth:`_torsions_from_normal`: y (B, T), log|d torsion / d y| and
        whether every torsion of a row lies in its map's domain (B,)."""
        y, log_g = _torsion_to_normal(
            torsion, self.torsion_offset, self.torsion_cdf, with_log_density=True
        )
        if self._children:
            index = torch.tensor(self._children, device=torsion.device)
            new, new_log_g = _conditional_torsion_to_normal(
                torsion[:, index],
                self.torsion_offset[index],
                self.conditional_cdf,
                torsion[:, self.torsion_parent[index]],
            )
            y, log_g = y.index_copy(1, index, new), log_g.index_copy(1, index, new_log_g)
        log_slope = -0.5 * math.log(2 * math.pi) - 0.5 * y**2 - log_g
        if not self.torsion_sign.any():
            return y, log_slope, torch.ones_like(y[:, 0], dtype=torch.bool)
        sign = self.torsion_sign.to(torsion.dtype)
        half = sign != 0
        signed = sign * torsion
        inside = ~half | ((signed > 0) & (signed < math.pi))
        # outside the half circle: a finite stand-in (the point's density is set to 0)
        signed = torch.where(inside, signed, math.pi / 2)
        y_half = _logit_angle(signed)
        return (
            torch.where(half, y_half, y),
            torch.where(half, _log_slope_of_logistic(y_half), log_slope),
            inside.all(dim=1),
        )

    def _ladj_of_maps(self, y: Tensor, scale: Tensor, log_slope: Tensor) -> Tensor:
        """log|det| of s -> q: normalisation plus the elementwise domain maps, at y, with
        ``log_slope`` the torsion maps' log-derivatives."""
        n = self.internal.n_atoms
        y_bond, y_angle, _ = y.split([n - 1, n - 2, n - 3], dim=1)
        angle = _log_slope_of_logistic(y_angle)
        return scale.log().sum() + y_bond.sum(1) + angle.sum(1) + log_slope.sum(1)


def _log_slope_of_logistic(y: Tensor) -> Tensor:
    """log d(pi sigma(y))/dy, the log-derivative of the maps onto (0, pi)."""
    return math.log(math.pi) + nn.functional.logsigmoid(y) + nn.functional.logsigmoid(-y)


def _logit_angle(angle: Tensor) -> Tensor:
    """logit(theta / pi), written so that angles near pi keep their precision."""
    return torch.log(angle) - torch.log(math.pi - angle)


def _bin_cdf(k: Tensor, cdf: Tensor) -> tuple[Tensor, Tensor]:
    """G at the lower edge of bins k (B, T), and the bins' masses, for cdf (T, K + 1)."""
    low = torch.gather(cdf, 1, k.T).T
    mass = torch.gather(cdf.diff(dim=1), 1, k.T).T
    return low, mass


def _normal_to_torsion(y: Tensor, offset: Tensor, cdf: Tensor) -> tuple[Tensor, Tensor]:
    """phi = c + G^{-1}(Phi(y)) for y (B, T), and log g(phi); computed in float64."""
    dtype = y.dtype
    y = y.double()
    n_bins = cdf.shape[1] - 1
    v = torch.special.ndtr(y)
    k = torch.searchsorted(cdf.contiguous(), v.T.contiguous(), right=True).T - 1
    k = k.clamp(0, n_bins - 1)
    low, mass = _bin_cdf(k, cdf)
    torsion, log_g = _inside_bin(v, k, low, mass, offset, n_bins)
    return torsion.to(dtype), log_g.to(dtype)


def _inside_bin(
    v: Tensor, k: Tensor, low: Tensor, mass: Tensor, offset: Tensor, n_bins: int
) -> tuple[Tensor, Tensor]:
    """The torsion at which a piecewise-linear G, of value ``low`` at the lower edge of bin k
    and rising by ``mass`` across it, reaches v; and log g there (the bin's density)."""
    width = 2 * math.pi / n_bins
    torsion = offset - math.pi + (k + (v - low) / mass) * width
    return torsion, (mass / width).log()


def _bin_position(torsion: Tensor, offset: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """A torsion's position in bins on the circle cut at offset - pi (float64), and its bin
    k; an undefined torsion (NaN positions) stays NaN, through a valid bin index."""
    width = 2 * math.pi / n_bins
    position = torch.remainder(torsion.double() - (offset - math.pi), 2 * math.pi) / width
    k = torch.nan_to_num(position.floor(), nan=0.0).clamp(0, n_bins - 1).long()
    return position, k


def _torsion_to_normal(
    torsion: Tensor, offset: Tensor, cdf: Tensor, with_log_density: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """The inverse of :func:`_normal_to_torsion` on the circle cut at offset - pi: y (B, T),
    and with ``with_log_density`` also log g(phi)."""
    dtype = torsion.dtype
    n_bins = cdf.shape[1] - 1
    width = 2 * math.pi / n_bins
    position, k = _bin_position(torsion, offset, n_bins)
    low, mass = _bin_cdf(k, cdf)
    v = low + (position - k) * mass
    y = torch.special.ndtri(v).to(dtype)
    if not with_log_density:
        return y
    return y, (mass / width).log().to(dtype)


def _check_torsion_forest(parent: list[int], sign: list[float]) -> None:
    """Raises ValueError unless ``parent`` is a forest over whole-circle torsions."""
    n = len(parent)
    for t, p in enumerate(parent):
        if not -1 <= p < n or p == t:
            raise ValueError(f"torsion_parent[{t}] = {p} is not -1 or another torsion's index")
        if p >= 0 and (sign[t] != 0 or sign[p] != 0):
            raise ValueError(
                f"torsion {t} and its parent {p} must both lie on the whole circle "
                "(torsion_sign 0): a handed torsion has no conditional density"
            )
    for t in range(n):
        p, steps = parent[t], 0
        while p >= 0:
            p, steps = parent[p], steps + 1
            if steps > n:
                raise ValueError(f"torsion_parent has a cycle through torsion {t}")


def _parent_bins(angle: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """The two parent bins j, j + 1 (mod P) whose centres enclose each angle, and the angle's
    linear position lambda in [0, 1) between them."""
    position = torch.remainder(angle + math.pi, 2 * math.pi) * n_bins / (2 * math.pi) - 0.5
    low = torch.nan_to_num(position.floor(), nan=0.0)
    lam = position - low
    j = torch.remainder(low, n_bins).long()
    return j, torch.remainder(j + 1, n_bins), lam


def _mixed_cdf(cdf: Tensor, j0: Tensor, j1: Tensor, lam: Tensor, k: Tensor) -> Tensor:
    """(1 - lam) G_j0(edge k) + lam G_j1(edge k) for cdf (C, P, K + 1) and indices (B, C)."""
    n_children, n_parent, n_edges = cdf.shape
    flat = cdf.reshape(-1)
    base = torch.arange(n_children, device=cdf.device) * (n_parent * n_edges)
    return (1 - lam) * flat[base + j0 * n_edges + k] + lam * flat[base + j1 * n_edges + k]


def _conditional_normal_to_torsion(
    y: Tensor, offset: Tensor, cdf: Tensor, parent_angle: Tensor
) -> tuple[Tensor, Tensor]:
    """phi = c + G(. | a)^{-1}(Phi(y)) for y (B, C) with parent angles a (B, C), and
    log g(phi | a); computed in float64."""
    dtype = y.dtype
    y, parent_angle = y.double(), parent_angle.double()
    n_bins = cdf.shape[2] - 1
    j0, j1, lam = _parent_bins(parent_angle, cdf.shape[1])
    v = torch.special.ndtr(y)
    # bisection for the bin k: the largest k in [0, K - 1] with G(edge k | a) <= v
    low_k = torch.zeros_like(j0)
    high_k = torch.full_like(j0, n_bins - 1)
    for _ in range(max(1, math.ceil(math.log2(n_bins))) + 1):
        middle = (low_k + high_k + 1) // 2
        below = _mixed_cdf(cdf, j0, j1, lam, middle) <= v
        low_k = torch.where(below, middle, low_k)
        high_k = torch.where(below, high_k, middle - 1)
    k = low_k
    low = _mixed_cdf(cdf, j0, j1, lam, k)
    mass = _mixed_cdf(cdf, j0, j1, lam, k + 1) - low
    torsion, log_g = _inside_bin(v, k, low, mass, offset, n_bins)
    return torsion.to(dtype), log_g.to(dtype)


def _conditional_torsion_to_normal(
    torsion: Tensor, offset: Tensor, cdf: Tensor, parent_angle: Tensor
) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`_conditional_normal_to_torsion`: y (B, C) and log g(phi | a)."""
    dtype = torsion.dtype
    n_bins = cdf.shape[2] - 1
    width = 2 * math.pi / n_bins
    j0, j1, lam = _parent_bins(parent_angle.double(), cdf.shape[1])
    position, k = _bin_position(torsion, offset, n_bins)
    low = _mixed_cdf(cdf, j0, j1, lam, k)
    mass = _mixed_cdf(cdf, j0, j1, lam, k + 1) - low
    y = torch.special.ndtri(low + (position - k) * mass)
    return y.to(dtype), (mass / width).log().to(dtype)


PARENT_BINS = 36
"""Bins of a parent torsion's angle (10 degrees) on which a child's density is conditioned."""

TREE_BINS = 12
"""Bins (30 degrees) of each torsion in the histograms that estimate mutual information."""

TREE_PRIOR = 2.0
"""Pseudo-count with which a parent bin's density of its child leans to the child's marginal."""


def _torsion_tree(torsions: np.ndarray, weights: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Parents (T,) of a maximum-mutual-information spanning forest (Chow-Liu) over the
    eligible torsions (F, T) of weighted frames, -1 for a root or an ineligible torsion. Edges
    whose histogram estimate of the mutual information (TREE_BINS x TREE_BINS bins) does not
    exceed its bias (TREE_BINS - 1)^2 / (2 ESS) are left out; each tree is rooted at its node of
    largest total mutual information, which keeps the trees shallow."""
    n_torsions = torsions.shape[1]
    p = TREE_BINS
    ess = 1.0 / float(np.sum(weights**2))
    bins = np.minimum(
        (np.remainder(torsions + math.pi, 2 * math.pi) * p / (2 * math.pi)).astype(np.int64),
        p - 1,
    )
    marginals = [np.bincount(bins[:, t], weights, minlength=p) for t in range(n_torsions)]
    # in logs: the product of two marginals' tiny masses (importance weights of 1e-200) would
    # underflow to 0 and make the information infinite
    with np.errstate(divide="ignore"):
        log_marginals = [np.log(m) for m in marginals]
    bias = (p - 1) ** 2 / (2 * ess)
    edges = []
    nodes = np.flatnonzero(eligible)
    for a_index, a in enumerate(nodes):
        for b in nodes[a_index + 1 :]:
            joint = np.bincount(bins[:, a] * p + bins[:, b], weights, minlength=p * p)
            joint = joint.reshape(p, p)
            log_outer = log_marginals[a][:, None] + log_marginals[b][None, :]
            kept = joint > 0
            information = float(np.sum(joint[kept] * (np.log(joint[kept]) - log_outer[kept])))
            if information > bias:
                edges.append((information - bias, int(a), int(b)))
    root = list(range(n_torsions))

    def find(t: int) -> int:
        while root[t] != t:
            root[t] = root[root[t]]
            t = root[t]
        return t

    neighbours: dict[int, list[tuple[int, float]]] = {t: [] for t in range(n_torsions)}
    for information, a, b in sorted(edges, reverse=True):  # Kruskal, strongest first
        if find(a) != find(b):
            root[find(a)] = find(b)
            neighbours[a].append((b, information))
            neighbours[b].append((a, information))
    parent = -np.ones(n_torsions, dtype=np.int64)
    seen = np.zeros(n_torsions, dtype=bool)
    strength = {t: sum(i for _, i in neighbours[t]) for t in range(n_torsions)}
    for start in sorted(range(n_torsions), key=lambda t: -strength[t]):
        if seen[start]:
            continue
        seen[start] = True
        queue = [start]
        while queue:
            node = queue.pop(0)
            for child, _ in neighbours[node]:
                if not seen[child]:
                    seen[child], parent[child] = True, node
                    queue.append(child)
    return parent


def _conditional_cdfs(
    values: np.ndarray,
    parent_values: np.ndarray,
    bins: int,
    smoothing: float,
    floor: float,
    weights: np.ndarray,
) -> np.ndarray:
    """G (PARENT_BINS, bins + 1) of a child torsion's density in each parent bin: its
    smoothed histogram (angles measured from its cut) with the frames weighted by their share
    of that bin (linear between bin centres), leaning to the child's marginal with TREE_PRIOR
    pseudo-frames where the bin holds few (effective) frames, and mixed with a uniform floor."""
    ess = 1.0 / float(np.sum(weights**2))
    j0, j1, lam = (v.numpy() for v in _parent_bins(torch.as_tensor(parent_values), PARENT_BINS))
    marginal = _smoothed_histogram(values, bins, smoothing, weights)
    marginal /= marginal.sum()
    cdfs = np.empty((PARENT_BINS, bins + 1))
    for j in range(PARENT_BINS):
        share = weights * ((j0 == j) * (1 - lam) + (j1 == j) * lam)
        frames = float(share.sum()) * ess
        density = marginal
        if share.sum() > 0:
            density = _smoothed_histogram(values, bins, smoothing, share)
            density = (frames * density / density.sum() + TREE_PRIOR * marginal) / (
                frames + TREE_PRIOR
            )
        cdfs[j] = _floored_cdf(density, floor)
    return cdfs


def _smoothed_histogram(
    angles: np.ndarray, bins: int, smoothing: float, weights: np.ndarray | None = None
) -> np.ndarray:
    """(Weighted) counts of angles (taken mod 2 pi from 0) in ``bins`` bins, smoothed around
    the circle."""
    position = np.remainder(angles, 2 * math.pi) * bins / (2 * math.pi)
    index = np.minimum(position.astype(np.int64), bins - 1)
    return _smooth_counts(np.bincount(index, weights, minlength=bins), smoothing)


def _smooth_counts(counts: np.ndarray, smoothing: float) -> np.ndarray:
    """Bin counts around the circle convolved with a Gaussian of ``smoothing`` bins."""
    bins = len(counts)
    reach = int(math.ceil(3 * smoothing))
    smooth = np.zeros(bins)
    for shift in range(-reach, reach + 1):
        weight = math.exp(-0.5 * (shift / max(smoothing, 1e-12)) ** 2)
        smooth += weight * np.roll(counts.astype(np.float64), shift)
    return smooth


SMOOTHING_CANDIDATES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 14.0, 20.0, 30.0)
"""Widths in bins among which ``density_smoothing="auto"`` chooses."""


def _cross_validated_smoothing(
    copies: np.ndarray,
    bins: int,
    floor: float,
    weights: np.ndarray | None = None,
    folds: int = 5,
) -> float:
    """The width of :data:`SMOOTHING_CANDIDATES` whose floored, smoothed histogram gives the
    highest (weighted) log-likelihood to held-out contiguous blocks of frames; ``copies``
    (n, F) holds each frame's n symmetry-equivalent angles (kept in the same block), and
    ``weights`` (F,) optional frame weights."""
    n_copies, n_frames = copies.shape
    if n_frames < 2 * folds:
        return 10.0
    w = np.ones(n_frames) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.broadcast_to(w, (n_copies, n_frames))
    edges = np.linspace(0, n_frames, folds + 1).round().astype(np.int64)
    position = np.remainder(copies, 2 * math.pi) * bins / (2 * math.pi)
    index = np.minimum(position.astype(np.int64), bins - 1)
    scores = []
    for width in SMOOTHING_CANDIDATES:
        score = 0.0
        for k in range(folds):
            held = np.zeros(n_frames, dtype=bool)
            held[edges[k] : edges[k + 1]] = True
            counts = np.bincount(index[:, ~held].ravel(), w[:, ~held].ravel(), minlength=bins)
            smooth = _smooth_counts(counts, width)
            density = (1 - floor) * smooth / smooth.sum() + floor / bins
            score += (w[:, held] * np.log(density[index[:, held]])).sum()
        scores.append(score)
    return SMOOTHING_CANDIDATES[int(np.argmax(scores))]


def _circular_cdf(
    angles: np.ndarray,
    bins: int,
    smoothing: float,
    floor: float,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """G at the bin edges of the (weighted) smoothed histogram of angles measured from the
    cut, mixed with a uniform floor: shape (bins + 1,), from exactly 0 to exactly 1."""
    return _floored_cdf(_smoothed_histogram(angles, bins, smoothing, weights), floor)


def _floored_cdf(density: np.ndarray, floor: float) -> np.ndarray:
    """G at the bin edges of a binned density (any positive scale) mixed with a uniform
    density of weight ``floor``: shape (bins + 1,), from exactly 0 to exactly 1."""
    mass = (1 - floor) * density / density.sum() + floor / len(density)
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def _torsion_scan(
    internal: InternalCoordinates,
    q: Tensor,
    energy: Callable[[Tensor], Tensor],
    n_frames: int,
    n_angles: int,
) -> np.ndarray:
    """-log <exp(-U)> over evenly spaced frames with each torsion set to each of n_angles
    values from -pi: shape (T, n_angles), in kT."""
    n = internal.n_atoms
    pick = np.unique(np.linspace(0, len(q) - 1, min(n_frames, len(q))).round().astype(np.int64))
    frames = q[torch.as_tensor(pick)]
    values = -math.pi + 2 * math.pi * torch.arange(n_angles, dtype=torch.float64) / n_angles
    scan = np.empty((n - 3, n_angles))
    with torch.no_grad():
        for t in range(n - 3):
            trial = frames.repeat(n_angles, 1)
            trial[:, 2 * n - 3 + t] = values.repeat_interleave(len(frames))
            u = torch.as_tensor(energy(internal.to_cartesian(trial)[0])).double()
            u = torch.nan_to_num(u.reshape(n_angles, len(frames)), nan=math.inf)
            scan[t] = (math.log(len(frames)) - torch.logsumexp(-u, dim=1)).numpy()
    return scan


def _cut_angle(
    angles: np.ndarray,
    bins: int,
    smoothing: float,
    scan: np.ndarray | None,
    weights: np.ndarray | None = None,
    keep: float | None = None,
) -> float:
    """Where to cut a torsion's circle: in the least-populated region of the (weighted)
    smoothed histogram; at ``keep`` (the current cut) if it lies in that region; otherwise
    with a scan at its highest scanned free energy there, else in the middle of the widest
    such region."""
    smooth = _smoothed_histogram(angles + math.pi, bins, smoothing, weights)  # bins from -pi
    lowest = smooth <= smooth.min() * (1 + 1e-9)
    if keep is not None:
        kept = math.remainder(keep, 2 * math.pi)
        if lowest[min(int((kept + math.pi) * bins / (2 * math.pi)), bins - 1)]:
            return kept
    centres = -math.pi + (np.arange(bins) + 0.5) * 2 * math.pi / bins
    if scan is not None:
        # The scanned value nearest each bin centre (scan values start at -pi, evenly spaced).
        nearest = np.round((centres + math.pi) * len(scan) / (2 * math.pi)).astype(np.int64)
        score = np.where(lowest, scan[nearest % len(scan)], -math.inf)
        if np.isfinite(score).any() and np.ptp(score[lowest]) != 0:
            return float(centres[np.argmax(score)])
    # Walk the circle from a bin above the minimum so that no low run is split at the seam.
    start = int(np.argmin(lowest))
    best_start, best_length, run = 0, 0, 0
    for step in range(1, bins + 1):
        index = (start + step) % bins
        run = run + 1 if lowest[index] else 0
        if run > best_length:
            best_start, best_length = index - run + 1, run
    middle = best_start + (best_length - 1) / 2
    return (middle + 0.5) * 2 * math.pi / bins % (2 * math.pi) - math.pi
