"""Z-matrices of molecules from their bond graph (which atoms place which), the torsions that
are rotamers of one another, and the handed torsions of stereocentres."""

from __future__ import annotations

from collections import deque

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit
import torch
from torch import Tensor

from openmm_nice.molecule.internal_coordinates import InternalCoordinates, validate_zmatrix

__all__ = ["build_zmatrix", "handed_torsions", "torsion_symmetries", "bond_graph"]


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
    elements, neighbours = bond_graph(topology)
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

    A proper torsion row r = (i, j, k, l) (l bonded to k) turns the atoms bonded to j (other than k)
    about the j-k bond. When those are n >= 2 atoms of one element with equal nonbonded parameters
    in ``system`` (if given), such as the hydrogens of a methyl group, the rotor is n-fold
    symmetric: the Boltzmann density of the torsion repeats every :math:`2\pi / n`, whatever the
    data happened to visit. :meth:`~openmm_nice.molecule.coordinates.MolecularTransform.from_data` uses this
    to symmetrise the torsion's fitted density (a better proposal; any density keeps the map exact).

    Returns:
        An int64 array of shape (N - 3,), in the order of the torsions of
        :class:`~openmm_nice.molecule.internal_coordinates.InternalCoordinates`.

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
    z = validate_zmatrix(zmatrix)
    elements, neighbours = bond_graph(topology)
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
    :func:`build_zmatrix`) at a centre j with four bonded neighbours fixes on which side of the
    plane (k, j, l) atom i lies: the sign of that torsion is the centre's handedness (about +-120
    degrees at an sp3 carbon). No thermal motion changes it (inverting a tetrahedral centre breaks
    bonds), and the mirror image of a molecule has the same energy, so a generator that may place i
    on either side can learn the other enantiomer, or mix both.
    :class:`~openmm_nice.molecule.coordinates.MolecularTransform` keeps such torsions on the reference's half
    circle, so that the Boltzmann distribution sampled is that of the given stereoisomer, as MD from
    the same structure samples it. Centres with three neighbours (planar sp2 atoms, amines, which
    invert) are left free.

    Arguments:
        topology: The molecule's ``openmm.app.Topology`` or ``mdtraj.Topology``.
        zmatrix: Integer array (N, 4) from :func:`build_zmatrix`.
        positions: One reference structure, shape (N, 3) or (3N,) or (1, 3N), in nm.

    Returns:
        An array of shape (N - 3,) of -1, 0 or +1 per torsion of
        :class:`~openmm_nice.molecule.internal_coordinates.InternalCoordinates`.

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
    z = validate_zmatrix(zmatrix)
    _, neighbours = bond_graph(topology)
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


def bond_graph(
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
