"""An OpenMM System's potential energy as batched torch operations, built from its forces."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import openmm
import openmm.unit as unit
import torch
from torch import Tensor, nn

from openmm_nice.energy.lepton import Expression, parse_expression
from openmm_nice.errors import UserInputError

__all__ = ["ONE_4PI_EPS0", "TorchEvaluator", "TorchSystemEnergy", "supported_forces"]

# 1 / (4 pi epsilon_0) in kJ mol^-1 nm e^-2 from the CODATA 2018 constants, as OpenMM defines it.
ONE_4PI_EPS0 = 1.0 / (
    4.0 * math.pi * 1e-6 * 8.8541878128e-12 / (1.602176634e-19**2 * 6.02214076e23)
)
_OBC_DIELECTRIC_OFFSET = 0.009  # nm, OpenMM's GBSAOBCForce
_OBC_PROBE_RADIUS = 0.14  # nm
_OBC_ALPHA, _OBC_BETA, _OBC_GAMMA = 1.0, 0.8, 4.85  # OBC's type II parameters

# CustomGBForce's computation types, as OpenMM numbers them.
_SINGLE_PARTICLE = openmm.CustomGBForce.SingleParticle
_PARTICLE_PAIR = openmm.CustomGBForce.ParticlePair
_PARTICLE_PAIR_NO_EXCLUSIONS = openmm.CustomGBForce.ParticlePairNoExclusions


class _Geometry:
    """One batch of positions, with the distance of every particle pair computed when first asked.

    Pairs are numbered as ``torch.triu_indices(N, N, 1)`` numbers them: (0, 1), (0, 2), ...
    """

    def __init__(self, positions: Tensor, pair_i: Tensor, pair_j: Tensor):
        self.positions = positions
        self._pair_i = pair_i
        self._pair_j = pair_j
        self._distances: Tensor | None = None

    def distances(self) -> Tensor:
        """Distances (B, N(N-1)/2) of all pairs i < j."""
        if self._distances is None:
            delta = self.positions[:, self._pair_j] - self.positions[:, self._pair_i]
            self._distances = torch.linalg.vector_norm(delta, dim=-1)
        return self._distances

    def atoms(self, index: Tensor) -> Tensor:
        """Positions (B, M, 3) of the particles ``index`` (M,)."""
        return self.positions[:, index]


def _pair_numbers(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """The numbers of pairs (i, j), i != j, in the order of ``triu_indices(n, n, 1)``."""
    low, high = np.minimum(i, j), np.maximum(i, j)
    return low * n - low * (low + 1) // 2 + (high - low - 1)


def _angle(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The angle a-b-c in radians; atan2 keeps it accurate near 0 and pi."""
    u, v = a - b, c - b
    return torch.atan2(torch.linalg.cross(u, v).norm(dim=-1), (u * v).sum(-1))


def _dihedral(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """The dihedral angle a-b-c-d in (-pi, pi] with OpenMM's (IUPAC's) sign."""
    b1, b2, b3 = b - a, c - b, d - c
    n1, n2 = torch.linalg.cross(b1, b2), torch.linalg.cross(b2, b3)
    y = b2.norm(dim=-1) * (b1 * n2).sum(-1)
    return torch.atan2(y, (n1 * n2).sum(-1))


class _Term(nn.Module):
    """One force's energy in kJ/mol for a batch."""

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = False) -> None:
        # Parameters read from the System, not state: a model whose energy is computed here
        # saves and loads the same state dict as one whose energy OpenMM computes.
        super().register_buffer(name, tensor, persistent)

    def forward(self, geometry: _Geometry) -> Tensor:
        raise NotImplementedError


def _buffer(values, dtype=torch.float64) -> Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype)


class _HarmonicBonds(_Term):
    """HarmonicBondForce: E = k/2 (r - r0)^2."""

    def __init__(self, force: openmm.HarmonicBondForce):
        super().__init__()
        rows = [force.getBondParameters(i) for i in range(force.getNumBonds())]
        self.register_buffer("atoms", _buffer([r[:2] for r in rows], torch.long).reshape(-1, 2))
        self.register_buffer("length", _buffer([r[2]._value for r in rows]))
        self.register_buffer("k", _buffer([r[3]._value for r in rows]))

    def forward(self, geometry: _Geometry) -> Tensor:
        a, b = geometry.atoms(self.atoms[:, 0]), geometry.atoms(self.atoms[:, 1])
        r = torch.linalg.vector_norm(b - a, dim=-1)
        return (0.5 * self.k * (r - self.length) ** 2).sum(-1)


class _HarmonicAngles(_Term):
    """HarmonicAngleForce: E = k/2 (theta - theta0)^2."""

    def __init__(self, force: openmm.HarmonicAngleForce):
        super().__init__()
        rows = [force.getAngleParameters(i) for i in range(force.getNumAngles())]
        self.register_buffer("atoms", _buffer([r[:3] for r in rows], torch.long).reshape(-1, 3))
        self.register_buffer("angle", _buffer([r[3]._value for r in rows]))
        self.register_buffer("k", _buffer([r[4]._value for r in rows]))

    def forward(self, geometry: _Geometry) -> Tensor:
        theta = _angle(*(geometry.atoms(self.atoms[:, k]) for k in range(3)))
        return (0.5 * self.k * (theta - self.angle) ** 2).sum(-1)


class _PeriodicTorsions(_Term):
    """PeriodicTorsionForce: E = k (1 + cos(n phi - phi0))."""

    def __init__(self, force: openmm.PeriodicTorsionForce):
        super().__init__()
        rows = [force.getTorsionParameters(i) for i in range(force.getNumTorsions())]
        self.register_buffer("atoms", _buffer([r[:4] for r in rows], torch.long).reshape(-1, 4))
        self.register_buffer("periodicity", _buffer([r[4] for r in rows]))
        self.register_buffer("phase", _buffer([r[5]._value for r in rows]))
        self.register_buffer("k", _buffer([r[6]._value for r in rows]))

    def forward(self, geometry: _Geometry) -> Tensor:
        phi = _dihedral(*(geometry.atoms(self.atoms[:, k]) for k in range(4)))
        return (self.k * (1 + torch.cos(self.periodicity * phi - self.phase))).sum(-1)


class _RBTorsions(_Term):
    """RBTorsionForce: E = sum_n c_n cos(psi)^n, psi = phi - 180 degrees."""

    def __init__(self, force: openmm.RBTorsionForce):
        super().__init__()
        rows = [force.getTorsionParameters(i) for i in range(force.getNumTorsions())]
        self.register_buffer("atoms", _buffer([r[:4] for r in rows], torch.long).reshape(-1, 4))
        self.register_buffer("c", _buffer([[c._value for c in r[4:]] for r in rows]).reshape(-1, 6))

    def forward(self, geometry: _Geometry) -> Tensor:
        phi = _dihedral(*(geometry.atoms(self.atoms[:, k]) for k in range(4)))
        cos_psi = -torch.cos(phi)
        energy = self.c[:, 5]
        for n in range(4, -1, -1):  # Horner's rule
            energy = energy * cos_psi + self.c[:, n]
        return energy.sum(-1)


# OpenMM's nonbonded methods by number; NoCutoff is 0 for every force that has one.
_METHODS = ("NoCutoff", "CutoffNonPeriodic", "CutoffPeriodic", "Ewald", "PME", "LJPME")


# Numerical Recipes' bicubic coefficient matrix: the 16 coefficients of a cell from the values,
# the two first derivatives and the cross derivative at its four corners (counter-clockwise).
_BICUBIC = np.array(
    [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        [-3, 0, 0, 3, 0, 0, 0, 0, -2, 0, 0, -1, 0, 0, 0, 0],
        [2, 0, 0, -2, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, -3, 0, 0, 3, 0, 0, 0, 0, -2, 0, 0, -1],
        [0, 0, 0, 0, 2, 0, 0, -2, 0, 0, 0, 0, 1, 0, 0, 1],
        [-3, 3, 0, 0, -2, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, -3, 3, 0, 0, -2, -1, 0, 0],
        [9, -9, 9, -9, 6, 3, -3, -6, 6, -6, -3, 3, 4, 2, 1, 2],
        [-6, 6, -6, 6, -4, -2, 2, 4, -3, 3, 3, -3, -2, -1, -1, -2],
        [2, -2, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 2, -2, 0, 0, 1, 1, 0, 0],
        [-6, 6, -6, 6, -3, -3, 3, 3, -4, 4, 2, -2, -2, -2, -1, -1],
        [4, -4, 4, -4, 2, 2, -2, -2, 2, -2, -2, 2, 1, 1, 1, 1],
    ],
    dtype=np.float64,
)


def _cmap_coefficients(size: int, energy: np.ndarray) -> np.ndarray:
    """Bicubic coefficients (size, size, 4, 4) of a CMAP grid, as OpenMM builds them: the grid
    spans [0, 2 pi) in both angles, energy[i + size j] at (i delta, j delta); derivatives from
    periodic cubic splines along each axis, the cross derivative from the splines of the first
    derivative along the second axis."""
    from scipy.interpolate import CubicSpline

    delta = 2 * math.pi / size
    grid = np.arange(size + 1) * delta
    values = np.asarray(energy, dtype=np.float64).reshape(size, size).T  # [i (first), j]

    def along(a: np.ndarray, axis: int) -> np.ndarray:
        closed = np.concatenate([a, np.take(a, [0], axis=axis)], axis=axis)
        return CubicSpline(grid, closed, axis=axis, bc_type="periodic")(grid[:-1], 1)

    d1 = along(values, 0)
    d2 = along(values, 1)
    d12 = along(d1, 1)
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    corners = [(i, j), ((i + 1) % size, j), ((i + 1) % size, (j + 1) % size), (i, (j + 1) % size)]
    x = np.stack(
        [values[c] for c in corners]
        + [d1[c] * delta for c in corners]
        + [d2[c] * delta for c in corners]
        + [d12[c] * delta * delta for c in corners],
        axis=-1,
    )  # (size, size, 16)
    return (x @ _BICUBIC.T).reshape(size, size, 4, 4)


class _CMAPTorsions(_Term):
    """CMAPTorsionForce: each term's energy from its map at the two dihedrals (in [0, 2 pi)),
    interpolated bicubically within the grid cell as OpenMM does."""

    def __init__(self, force: openmm.CMAPTorsionForce):
        super().__init__()
        maps = [force.getMapParameters(k) for k in range(force.getNumMaps())]
        sizes = {size for size, _ in maps}
        if len(sizes) > 1:  # one grid size keeps the lookup one gather; force fields use one
            raise UserInputError(
                f"the System's CMAPTorsionForce has maps of sizes {sorted(sizes)}; the torch "
                "energy supports maps of one size: use batching='loop'"
            )
        self.size = sizes.pop() if sizes else 1
        coefficients = [
            _cmap_coefficients(
                size,
                energy.value_in_unit(unit.kilojoule_per_mole)
                if unit.is_quantity(energy)
                else energy,
            )
            for size, energy in maps
        ]
        self.register_buffer(
            "coefficients",
            _buffer(np.stack(coefficients) if coefficients else np.zeros((0, 1, 1, 4, 4))),
        )
        rows = [force.getTorsionParameters(k) for k in range(force.getNumTorsions())]
        self.register_buffer("map", _buffer([r[0] for r in rows], torch.long))
        self.register_buffer("atoms", _buffer([r[1:] for r in rows], torch.long).reshape(-1, 8))

    def forward(self, geometry: _Geometry) -> Tensor:
        atoms = [geometry.atoms(self.atoms[:, k]) for k in range(8)]
        two_pi = 2 * math.pi
        delta = two_pi / self.size
        cells, fractions = [], []
        for angle in (_dihedral(*atoms[:4]), _dihedral(*atoms[4:])):
            scaled = torch.remainder(angle, two_pi) / delta
            cell = scaled.detach().floor().clamp(0, self.size - 1)
            cells.append(cell.long())
            fractions.append(scaled - cell)
        c = self.coefficients[self.map, cells[0], cells[1]]  # (B, T, 4, 4)
        t, u = fractions
        powers_t = torch.stack([torch.ones_like(t), t, t * t, t * t * t], dim=-1)
        powers_u = torch.stack([torch.ones_like(u), u, u * u, u * u * u], dim=-1)
        return torch.einsum("btk,btkl,btl->b", powers_t, c, powers_u)


def _refuse_cutoff(force: openmm.Force, method: int) -> None:
    if method != 0:
        name = _METHODS[method] if method < len(_METHODS) else str(method)
        raise UserInputError(
            f"the System's {type(force).__name__} uses the nonbonded method {name}; the torch "
            "energy supports NoCutoff only: build the System with nonbondedMethod=NoCutoff, or "
            "use batching='loop'"
        )


class _Nonbonded(_Term):
    """NonbondedForce with NoCutoff or CutoffNonPeriodic: Coulomb and Lennard-Jones over every
    pair, with exceptions.

    Pairs use Lorentz-Berthelot mixing; an exception replaces its pair's parameters, and one
    with zero charge product and zero epsilon removes the pair, as in OpenMM. With
    CutoffNonPeriodic, as OpenMM computes it, a pair that is not an exception interacts only
    within the cutoff r_c, its Coulomb term by the reaction field,
    k q_i q_j (1/r + k_rf r^2 - c_rf) with k_rf = (eps - 1) / ((2 eps + 1) r_c^3) and
    c_rf = 3 eps / ((2 eps + 1) r_c) (eps: the reaction-field dielectric), and its
    Lennard-Jones term cut at r_c, or switched off from the switching distance by
    1 - 10 t^3 + 15 t^4 - 6 t^5; exceptions keep plain Coulomb and Lennard-Jones at any
    distance.
    """

    def __init__(self, force: openmm.NonbondedForce, pair_i: np.ndarray, pair_j: np.ndarray):
        super().__init__()
        method = force.getNonbondedMethod()
        if method != openmm.NonbondedForce.CutoffNonPeriodic:
            _refuse_cutoff(force, method)
        if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
            raise UserInputError(
                "the System's NonbondedForce has parameter offsets, which the torch energy does "
                "not support; use batching='loop'"
            )
        n = force.getNumParticles()
        rows = [force.getParticleParameters(i) for i in range(n)]
        charge = np.array([r[0]._value for r in rows])
        sigma = np.array([r[1]._value for r in rows])
        epsilon = np.array([r[2]._value for r in rows])
        charge_product = charge[pair_i] * charge[pair_j]
        pair_sigma = 0.5 * (sigma[pair_i] + sigma[pair_j])
        pair_epsilon = np.sqrt(epsilon[pair_i] * epsilon[pair_j])
        exception = np.zeros(len(pair_i), bool)
        for k in range(force.getNumExceptions()):
            i, j, q, s, e = force.getExceptionParameters(k)
            m = _pair_numbers(np.array([i]), np.array([j]), n)[0]
            charge_product[m], pair_sigma[m], pair_epsilon[m] = q._value, s._value, e._value
            exception[m] = True
        keep = np.flatnonzero((charge_product != 0) | (pair_epsilon != 0))
        self.register_buffer("pairs", _buffer(keep, torch.long))
        self.register_buffer("charge_product", _buffer(ONE_4PI_EPS0 * charge_product[keep]))
        self.register_buffer("sigma6", _buffer(pair_sigma[keep] ** 6))
        self.register_buffer("four_epsilon", _buffer(4 * pair_epsilon[keep]))
        self.register_buffer("exception", _buffer(exception[keep], torch.bool))
        self._all_pairs = len(keep) == len(pair_i)
        self.cutoff = None
        if method == openmm.NonbondedForce.CutoffNonPeriodic:
            cutoff = force.getCutoffDistance().value_in_unit(unit.nanometer)
            dielectric = force.getReactionFieldDielectric()
            self.cutoff = cutoff
            self.k_rf = (dielectric - 1) / ((2 * dielectric + 1) * cutoff**3)
            self.c_rf = 3 * dielectric / ((2 * dielectric + 1) * cutoff)
            self.switch = (
                force.getSwitchingDistance().value_in_unit(unit.nanometer)
                if force.getUseSwitchingFunction()
                else None
            )

    def forward(self, geometry: _Geometry) -> Tensor:
        r = geometry.distances()
        if not self._all_pairs:
            r = r[:, self.pairs]
        inverse = 1 / r
        s6 = self.sigma6 * inverse**6
        coulomb = self.charge_product * inverse
        lennard_jones = self.four_epsilon * s6 * (s6 - 1)
        if self.cutoff is None:
            return (coulomb + lennard_jones).sum(-1)
        field = self.charge_product * (self.k_rf * r * r - self.c_rf)
        switched = lennard_jones
        if self.switch is not None:
            t = ((r - self.switch) / (self.cutoff - self.switch)).clamp(0.0, 1.0)
            switched = lennard_jones * (1 - t**3 * (10 - 15 * t + 6 * t * t))
        cut = torch.where(r < self.cutoff, coulomb + field + switched, torch.zeros_like(r))
        return torch.where(self.exception, coulomb + lennard_jones, cut).sum(-1)


class _GBSAOBC(_Term):
    """GBSAOBCForce with NoCutoff: OBC type II generalized Born with the ACE surface term.

    As OpenMM computes it: Born radii from the HCT pair integrals over every j != i (with
    Tinker's correction when particle i lies inside j's scaled sphere), the polar energy over
    pairs i <= j, and 4 pi gamma (R + 0.14)^2 (R / B)^6 per particle.
    """

    def __init__(self, force: openmm.GBSAOBCForce, pair_i: np.ndarray, pair_j: np.ndarray):
        super().__init__()
        _refuse_cutoff(force, force.getNonbondedMethod())
        n = force.getNumParticles()
        rows = [force.getParticleParameters(i) for i in range(n)]
        charge = np.array([r[0]._value for r in rows])
        radius = np.array([r[1]._value for r in rows])
        offset_radius = radius - _OBC_DIELECTRIC_OFFSET
        scaled_radius = offset_radius * np.array([r[2] for r in rows])
        solute, solvent = force.getSoluteDielectric(), force.getSolventDielectric()
        prefactor = -ONE_4PI_EPS0 * (1 / solute - 1 / solvent) if solute and solvent else 0.0
        first, second = _ordered_pairs(n)
        self.register_buffer("receiver", _buffer(first, torch.long))
        self.register_buffer("ordered", _buffer(_pair_numbers(first, second, n), torch.long))
        self.register_buffer("offset_radius_i", _buffer(offset_radius[first]))
        self.register_buffer("scaled_radius_j", _buffer(scaled_radius[second]))
        self.register_buffer("offset_radius", _buffer(offset_radius))
        self.register_buffer("radius", _buffer(radius))
        self.register_buffer("self_charge", _buffer(0.5 * prefactor * charge**2))
        self.register_buffer("pair_charge", _buffer(prefactor * charge[pair_i] * charge[pair_j]))
        self.register_buffer("pair_i", _buffer(pair_i, torch.long))
        self.register_buffer("pair_j", _buffer(pair_j, torch.long))
        area = 4 * math.pi * force.getSurfaceAreaEnergy()._value
        self.register_buffer("surface", _buffer(area * (radius + _OBC_PROBE_RADIUS) ** 2))

    def born_radii(self, geometry: _Geometry) -> Tensor:
        r = geometry.distances()[:, self.ordered]
        o, s = self.offset_radius_i, self.scaled_radius_j
        upper = r + s
        lower = torch.maximum(o, (r - s).abs())
        inverse_r = 1 / r
        term = (
            1 / lower
            - 1 / upper
            + 0.25 * (r - s * s * inverse_r) * (1 / upper**2 - 1 / lower**2)
            + 0.5 * inverse_r * torch.log(lower / upper)
        )
        term = term + torch.where(o < s - r, 2 * (1 / o - 1 / lower), 0.0)
        term = torch.where(o < upper, term, 0.0)
        psi = 0.5 * self.offset_radius * _sum_into(term, self.receiver, len(self.radius))
        tanh = torch.tanh(psi * (_OBC_ALPHA + psi * (-_OBC_BETA + psi * _OBC_GAMMA)))
        return 1 / (1 / self.offset_radius - tanh / self.radius)

    def forward(self, geometry: _Geometry) -> Tensor:
        born = self.born_radii(geometry)
        r2 = geometry.distances() ** 2
        product = born[:, self.pair_i] * born[:, self.pair_j]
        f = torch.sqrt(r2 + product * torch.exp(-r2 / (4 * product)))
        polar = (self.pair_charge / f).sum(-1) + (self.self_charge / born).sum(-1)
        nonpolar = (self.surface * (self.radius / born) ** 6).sum(-1)
        return polar + nonpolar


def _ordered_pairs(n: int, excluded: set[tuple[int, int]] = frozenset()) -> tuple:
    """Ordered pairs (first, second) of particles, first != second, without excluded pairs."""
    first, second = np.nonzero(~np.eye(n, dtype=bool))
    return _without(first, second, excluded)


def _without(first: np.ndarray, second: np.ndarray, excluded: set[tuple[int, int]]) -> tuple:
    if not excluded:
        return first, second
    keep = np.array([(min(i, j), max(i, j)) not in excluded for i, j in zip(first, second)])
    return first[keep], second[keep]


def _sum_into(values: Tensor, receiver: Tensor, n: int) -> Tensor:
    """Per-particle sums (B, n) of pair values (B, M), pair k adding to particle receiver[k]."""
    return values.new_zeros(values.shape[0], n).index_add(1, receiver, values)


class _GBStep:
    """One computed value (``name`` set) or energy term (``name`` None) of a CustomGBForce."""

    def __init__(self, name: str | None, expression: Expression, kind: int, pairs: tuple | None):
        self.name = name
        self.expression = expression
        self.kind = kind
        self.pairs = pairs  # (first, second) particle indices of a pair step, else None


class _CustomGB(_Term):
    """CustomGBForce with NoCutoff: its computed values and energy terms as OpenMM defines them.

    A pair computed value of particle i sums its expression over every j != i (particle1 = i,
    particle2 = j); a pair energy term sums over pairs i < j (particle1 = i, particle2 = j);
    ParticlePair skips the excluded pairs, ParticlePairNoExclusions does not. Per-particle
    parameters and computed values take the suffix 1 or 2 in pair expressions. Global
    parameters take their default values.
    """

    def __init__(self, force: openmm.CustomGBForce, pair_i: np.ndarray, pair_j: np.ndarray):
        super().__init__()
        _refuse_cutoff(force, force.getNonbondedMethod())
        n = force.getNumParticles()
        self.n = n
        functions = {}
        for k in range(force.getNumTabulatedFunctions()):
            name = force.getTabulatedFunctionName(k)
            functions[name] = _tabulated(force.getTabulatedFunction(k), name)
        self.names = [
            force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())
        ]
        self.particle_parameters = np.array(
            [force.getParticleParameters(i) for i in range(n)], dtype=np.float64
        ).reshape(n, len(self.names))
        self.globals = {
            force.getGlobalParameterName(k): force.getGlobalParameterDefaultValue(k)
            for k in range(force.getNumGlobalParameters())
        }
        excluded = set()
        for k in range(force.getNumExclusions()):
            i, j = force.getExclusionParticles(k)
            excluded.add((min(i, j), max(i, j)))
        value_pairs = {
            _PARTICLE_PAIR: _ordered_pairs(n, excluded),
            _PARTICLE_PAIR_NO_EXCLUSIONS: _ordered_pairs(n),
        }
        term_pairs = {
            _PARTICLE_PAIR: _without(pair_i, pair_j, excluded),
            _PARTICLE_PAIR_NO_EXCLUSIONS: (pair_i, pair_j),
        }
        self.steps = []
        for k in range(force.getNumComputedValues()):
            name, text, kind = force.getComputedValueParameters(k)
            expression = parse_expression(text, functions)
            self._check(expression, kind, f"computed value {name!r}")
            self.steps.append(_GBStep(name, expression, kind, value_pairs.get(kind)))
        for k in range(force.getNumEnergyTerms()):
            text, kind = force.getEnergyTermParameters(k)
            expression = parse_expression(text, functions)
            self._check(expression, kind, "energy term")
            self.steps.append(_GBStep(None, expression, kind, term_pairs.get(kind)))
        self._bound: dict[tuple[torch.dtype, torch.device], list] = {}
        self._bind(torch.float64, torch.device("cpu"))  # the usual case, bound outside any compile

    def _check(self, expression: Expression, kind: int, what: str) -> None:
        """Refuse a variable that is no parameter, earlier computed value or coordinate."""
        names = set(self.names) | {step.name for step in self.steps if step.name is not None}
        if kind == _SINGLE_PARTICLE:
            known = names | {"x", "y", "z"}
        else:
            known = {f"{name}{k}" for name in names for k in (1, 2)} | {"r"}
        unknown = sorted(expression.variables - known - set(self.globals))
        if unknown:
            raise UserInputError(
                f"the CustomGBForce's {what} {expression.text!r} uses {unknown}, which are "
                "not its parameters, earlier computed values or coordinates"
            )

    def _bind(self, dtype: torch.dtype, device: torch.device) -> list:
        """Per step: the expression with its parameters bound, and its pairs' index tensors."""
        key = (dtype, device)
        if key not in self._bound:
            parameters = torch.as_tensor(self.particle_parameters, dtype=dtype, device=device)
            bound = []
            for step in self.steps:
                values = dict(self.globals)
                if step.pairs is None:
                    values |= {name: parameters[:, k] for k, name in enumerate(self.names)}
                    bound.append((step, step.expression.bind(values), None))
                    continue
                first, second = (torch.as_tensor(p, device=device) for p in step.pairs)
                for k, name in enumerate(self.names):
                    values[f"{name}1"] = parameters[first, k]
                    values[f"{name}2"] = parameters[second, k]
                numbers = _pair_numbers(*step.pairs, self.n)
                # None when the pairs are all pairs in order, so no gather is needed
                numbers = (
                    None
                    if np.array_equal(numbers, np.arange(len(numbers)))
                    else torch.as_tensor(numbers, device=device)
                )
                bound.append((step, step.expression.bind(values), (first, second, numbers)))
            self._bound[key] = bound
        return self._bound[key]

    def forward(self, geometry: _Geometry) -> Tensor:
        positions = geometry.positions
        batch = positions.shape[0]
        computed: dict[str, Tensor] = {}
        energy = positions.new_zeros(batch)
        for step, expression, pairs in self._bind(positions.dtype, positions.device):
            needed = expression.variables
            if pairs is None:
                values = {name: computed[name] for name in needed & computed.keys()}
                for k, axis in enumerate("xyz"):
                    if axis in needed:
                        values[axis] = positions[..., k]
                size = self.n
            else:
                first, second, numbers = pairs
                values = {}
                if "r" in needed:
                    distances = geometry.distances()
                    values["r"] = distances if numbers is None else distances[:, numbers]
                for name, value in computed.items():
                    for suffix, index in (("1", first), ("2", second)):
                        if name + suffix in needed:
                            values[name + suffix] = value[:, index]
                size = len(first)
            result = _per_batch(expression.evaluate(values), batch, size, positions)
            if step.name is None:
                energy = energy + result.sum(-1)
            elif pairs is None:
                computed[step.name] = result
            else:
                computed[step.name] = _sum_into(result, pairs[0], self.n)
        return energy


class _CustomBonded(_Term):
    """CustomBondForce (variable r), CustomAngleForce (theta, radians) and CustomTorsionForce
    (theta, the dihedral in (-pi, pi] with OpenMM's sign): the force's Lepton expression of
    that variable, its per-term parameters and its global parameters (at their defaults),
    summed over the force's terms."""

    # per class: atoms per term, the variable, and the methods that read the force
    _KINDS = {
        openmm.CustomBondForce: (2, "r", "Bond"),
        openmm.CustomAngleForce: (3, "theta", "Angle"),
        openmm.CustomTorsionForce: (4, "theta", "Torsion"),
    }

    def __init__(self, force: openmm.Force):
        super().__init__()
        self.n_atoms, variable, noun = self._KINDS[type(force)]
        count = getattr(force, f"getNum{noun}s")()
        self.names = [
            getattr(force, f"getPer{noun}ParameterName")(k)
            for k in range(getattr(force, f"getNumPer{noun}Parameters")())
        ]
        rows = [getattr(force, f"get{noun}Parameters")(k) for k in range(count)]
        self.register_buffer(
            "atoms",
            _buffer([r[: self.n_atoms] for r in rows], torch.long).reshape(-1, self.n_atoms),
        )
        self.parameters = np.array([list(r[self.n_atoms]) for r in rows], dtype=np.float64).reshape(
            count, len(self.names)
        )
        self.globals = {
            force.getGlobalParameterName(k): force.getGlobalParameterDefaultValue(k)
            for k in range(force.getNumGlobalParameters())
        }
        self.variable = variable
        self.expression = parse_expression(force.getEnergyFunction())
        unknown = sorted(
            self.expression.variables - {variable} - set(self.names) - set(self.globals)
        )
        if unknown:
            raise UserInputError(
                f"the {type(force).__name__}'s energy {self.expression.text!r} uses {unknown}, "
                "which are not its parameters or its variable"
            )
        self._bound: dict[tuple[torch.dtype, torch.device], Expression] = {}

    def _bind(self, dtype: torch.dtype, device: torch.device) -> Expression:
        key = (dtype, device)
        if key not in self._bound:
            parameters = torch.as_tensor(self.parameters, dtype=dtype, device=device)
            values = dict(self.globals)
            values |= {name: parameters[:, k] for k, name in enumerate(self.names)}
            self._bound[key] = self.expression.bind(values)
        return self._bound[key]

    def forward(self, geometry: _Geometry) -> Tensor:
        positions = geometry.positions
        atoms = [geometry.atoms(self.atoms[:, k]) for k in range(self.n_atoms)]
        if self.n_atoms == 2:
            value = torch.linalg.vector_norm(atoms[1] - atoms[0], dim=-1)
        elif self.n_atoms == 3:
            value = _angle(*atoms)
        else:
            value = _dihedral(*atoms)
        expression = self._bind(positions.dtype, positions.device)
        energy = expression.evaluate({self.variable: value})
        return _per_batch(energy, positions.shape[0], len(self.atoms), positions).sum(-1)


class _CustomNonbonded(_Term):
    """CustomNonbondedForce with NoCutoff: its Lepton expression of r over every pair i < j that
    is not excluded, per-particle parameters with the suffixes 1 and 2 (OpenMM requires the
    expression to be symmetric in the two), global parameters at their defaults, discrete
    tabulated functions. Interaction groups and computed values are refused."""

    def __init__(self, force: openmm.CustomNonbondedForce, pair_i: np.ndarray, pair_j: np.ndarray):
        super().__init__()
        _refuse_cutoff(force, force.getNonbondedMethod())
        name = "CustomNonbondedForce"
        if force.getNumInteractionGroups() > 0:
            raise UserInputError(
                f"the System's {name} has interaction groups, which the torch energy does not "
                "evaluate: use batching='loop'"
            )
        if getattr(force, "getNumComputedValues", lambda: 0)() > 0:
            raise UserInputError(
                f"the System's {name} has computed values, which the torch energy does not "
                "evaluate: use batching='loop'"
            )
        n = force.getNumParticles()
        functions = {}
        for k in range(force.getNumTabulatedFunctions()):
            fname = force.getTabulatedFunctionName(k)
            functions[fname] = _tabulated(force.getTabulatedFunction(k), fname, name)
        self.names = [
            force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())
        ]
        self.particle_parameters = np.array(
            [force.getParticleParameters(i) for i in range(n)], dtype=np.float64
        ).reshape(n, len(self.names))
        self.globals = {
            force.getGlobalParameterName(k): force.getGlobalParameterDefaultValue(k)
            for k in range(force.getNumGlobalParameters())
        }
        excluded = set()
        for k in range(force.getNumExclusions()):
            i, j = force.getExclusionParticles(k)
            excluded.add((min(i, j), max(i, j)))
        self.n = n
        self.pairs = _without(pair_i, pair_j, excluded)
        self.expression = parse_expression(force.getEnergyFunction(), functions)
        known = {f"{p}{k}" for p in self.names for k in (1, 2)} | {"r"} | set(self.globals)
        unknown = sorted(self.expression.variables - known)
        if unknown:
            raise UserInputError(
                f"the {name}'s energy {self.expression.text!r} uses {unknown}, which are not "
                "its parameters or r"
            )
        numbers = _pair_numbers(*self.pairs, n)
        self.register_buffer("numbers", _buffer(numbers, torch.long))
        self._bound: dict[tuple[torch.dtype, torch.device], Expression] = {}

    def _bind(self, dtype: torch.dtype, device: torch.device) -> Expression:
        key = (dtype, device)
        if key not in self._bound:
            parameters = torch.as_tensor(self.particle_parameters, dtype=dtype, device=device)
            first, second = (torch.as_tensor(p, device=device) for p in self.pairs)
            values = dict(self.globals)
            for k, pname in enumerate(self.names):
                values[f"{pname}1"] = parameters[first, k]
                values[f"{pname}2"] = parameters[second, k]
            self._bound[key] = self.expression.bind(values)
        return self._bound[key]

    def forward(self, geometry: _Geometry) -> Tensor:
        positions = geometry.positions
        r = geometry.distances()[:, self.numbers]
        energy = self._bind(positions.dtype, positions.device).evaluate({"r": r})
        return _per_batch(energy, positions.shape[0], len(self.numbers), positions).sum(-1)


def _per_batch(value, batch: int, size: int, like: Tensor) -> Tensor:
    """A value (a number, or a tensor of shape (size,) or (B, size)) as a (B, size) tensor."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.expand(batch, size)


def _tabulated(
    function: openmm.TabulatedFunction, name: str, owner: str = "CustomGBForce"
) -> tuple[int, Callable]:
    """A discrete tabulated function as (number of arguments, torch function); others refused.

    OpenMM rounds each argument to the nearest integer and stores the table with the first
    argument varying fastest.
    """
    kind = type(function).__name__
    parameters = function.getFunctionParameters()
    if kind == "Discrete1DFunction":
        shape, table = (len(parameters),), parameters
    elif kind in ("Discrete2DFunction", "Discrete3DFunction"):
        shape, table = tuple(parameters[:-1]), parameters[-1]
    else:
        raise UserInputError(
            f"the {owner}'s tabulated function {name!r} is a {kind}; the torch energy "
            "supports Discrete1DFunction, Discrete2DFunction and Discrete3DFunction only: "
            "use batching='loop'"
        )
    values = torch.as_tensor(np.asarray(table, dtype=np.float64))

    def lookup(*args: Tensor) -> Tensor:
        index, stride = 0, 1
        for arg, size in zip(args, shape):
            k = torch.floor(arg + 0.5).long()
            if bool(((k < 0) | (k >= size)).any()):
                raise UserInputError(
                    f"tabulated function {name!r} called with an argument outside [0, {size - 1}]"
                )
            index, stride = index + k * stride, stride * size
        return values.to(device=args[0].device, dtype=args[0].dtype)[index]

    return len(shape), lookup


_IGNORED = (openmm.CMMotionRemover,)
_TERMS: dict[type, Callable] = {
    openmm.HarmonicBondForce: lambda force, i, j: _HarmonicBonds(force),
    openmm.HarmonicAngleForce: lambda force, i, j: _HarmonicAngles(force),
    openmm.PeriodicTorsionForce: lambda force, i, j: _PeriodicTorsions(force),
    openmm.RBTorsionForce: lambda force, i, j: _RBTorsions(force),
    openmm.NonbondedForce: _Nonbonded,
    openmm.GBSAOBCForce: _GBSAOBC,
    openmm.CustomGBForce: _CustomGB,
    openmm.CustomBondForce: lambda force, i, j: _CustomBonded(force),
    openmm.CustomAngleForce: lambda force, i, j: _CustomBonded(force),
    openmm.CustomTorsionForce: lambda force, i, j: _CustomBonded(force),
    openmm.CustomNonbondedForce: _CustomNonbonded,
    openmm.CMAPTorsionForce: lambda force, i, j: _CMAPTorsions(force),
}


def supported_forces() -> list[str]:
    """Names of the force classes :class:`TorchSystemEnergy` evaluates (or ignores, as CMMotionRemover)."""
    return sorted(cls.__name__ for cls in (*_TERMS, *_IGNORED))


class TorchSystemEnergy(nn.Module):
    r"""The potential energy of an OpenMM System, as batched torch operations on any device.

    The System's forces are read once and written as torch code: HarmonicBondForce,
    HarmonicAngleForce, PeriodicTorsionForce, RBTorsionForce, CMAPTorsionForce, NonbondedForce
    (NoCutoff, or CutoffNonPeriodic with its reaction field), GBSAOBCForce, CustomGBForce and
    CustomNonbondedForce with NoCutoff, and CustomBondForce, CustomAngleForce and
    CustomTorsionForce (the custom forces' expressions translated by
    :mod:`openmm_nice.energy.lepton`); CMMotionRemover has no energy. A System with any other
    force,
    or a cutoff, is refused with an error naming it. Forces are the negative gradient, by
    autograd. The module's buffers follow ``.to(device)``; the expressions of a CustomGBForce
    are bound to the dtype and device of the positions when first used.

    Arguments:
        system: The System; no virtual sites and no periodic box. Constraints add no energy
            and are ignored.

    Example:
        >>> import openmm
        >>> system = openmm.System()
        >>> for _ in range(2):
        ...     _ = system.addParticle(1.0)
        >>> bonds = openmm.HarmonicBondForce()
        >>> _ = bonds.addBond(0, 1, 0.1, 1000.0)  # r0 = 0.1 nm, k = 1000 kJ/mol/nm^2
        >>> _ = system.addForce(bonds)
        >>> energy = TorchSystemEnergy(system)
        >>> x = torch.tensor([[0.0, 0.0, 0.0, 0.2, 0.0, 0.0]], dtype=torch.float64)
        >>> round(energy(x).item(), 10)  # k/2 (r - r0)^2 in kJ/mol
        5.0
    """

    def __init__(self, system: openmm.System):
        super().__init__()
        if not isinstance(system, openmm.System):
            raise TypeError(f"system must be an openmm.System, got {type(system).__name__}")
        n = system.getNumParticles()
        if any(system.isVirtualSite(i) for i in range(n)):
            raise UserInputError(
                "the System has virtual sites, which the torch energy does not place; build "
                "it without them, or use batching='loop'"
            )
        if system.usesPeriodicBoundaryConditions():
            raise UserInputError(
                "the System uses periodic boundary conditions; the torch energy supports "
                "nonperiodic Systems only (nonbondedMethod=NoCutoff)"
            )
        self.n_particles = n
        pair_i, pair_j = np.triu_indices(n, 1)
        terms = []
        for force in system.getForces():
            if isinstance(force, _IGNORED):
                continue
            build = _TERMS.get(type(force))
            if build is None:
                raise UserInputError(
                    f"the System has a {type(force).__name__}, which the torch energy cannot "
                    f"evaluate (it knows {', '.join(supported_forces())}); use batching='loop' "
                    "(OpenMM evaluates it) or remove the force"
                )
            terms.append(build(force, pair_i, pair_j))
        self.terms = nn.ModuleList(terms)
        self.register_buffer("pair_i", _buffer(pair_i, torch.long), persistent=False)
        self.register_buffer("pair_j", _buffer(pair_j, torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Energies (B,) in kJ/mol of positions x, (B, 3N) or (B, N, 3), in nm."""
        positions = x.reshape(x.shape[0], self.n_particles, 3)
        geometry = _Geometry(positions, self.pair_i, self.pair_j)
        energy = positions.new_zeros(positions.shape[0])
        for term in self.terms:
            energy = energy + term(geometry)
        return energy


# Rows per chunk: a chunk holds about this many particle pairs. It bounds the memory autograd
# keeps whatever the batch size, and a chunk that stays in cache runs faster: for alanine
# dipeptide (231 pairs) chunks of 256 rows ran faster compiled than chunks of 1024
# (benchmarks/RESULTS.md).
_CHUNK_PAIRS = 1 << 16


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch threads, restoring the previous number after."""
    previous = torch.get_num_threads()
    if previous == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TorchEvaluator:
    """Energies and forces of batches of positions by a :class:`TorchSystemEnergy`, in place.

    It evaluates float64 numpy positions in chunks (bounded memory) with ``threads`` torch
    threads, forces by autograd, and writes into the caller's arrays as
    :class:`~openmm_nice.energy.openmm_energy.OpenMMEnergy`'s evaluators do.

    Compiling: ``torch.compile`` makes each evaluation several times faster but costs tens of
    seconds once (less when its disk cache holds the compiled code). So the evaluator first runs
    uncompiled and compiles itself once its uncompiled evaluations have taken ``compile_after``
    seconds in all: a long job pays for the compile and gains, a short one never pays, and
    neither spends more than twice the time of the better choice known in hindsight (the
    rent-or-buy rule). If compiling fails (no C++ compiler, say) it warns once and stays
    uncompiled.

    Arguments:
        system: The System (or its :class:`TorchSystemEnergy`).
        threads: Torch threads during an evaluation (the previous number is restored after).
        compile_after: Seconds of uncompiled evaluation before compiling; 0 compiles at the
            first call, None never compiles.

    Example:
        >>> import openmm
        >>> system = openmm.System()
        >>> for _ in range(2):
        ...     _ = system.addParticle(1.0)
        >>> bonds = openmm.HarmonicBondForce()
        >>> _ = bonds.addBond(0, 1, 0.1, 1000.0)
        >>> _ = system.addForce(bonds)
        >>> evaluate = TorchEvaluator(system, compile_after=None)
        >>> positions = np.array([[[0.0, 0.0, 0.0], [0.2, 0.0, 0.0]]])
        >>> energies, forces = np.empty(1), np.empty((1, 2, 3))
        >>> evaluate(positions, energies, forces)
        >>> energies, forces[0, :, 0]  # E = k/2 (r - r0)^2, F = -dE/dx
        (array([5.]), array([ 100., -100.]))
    """

    rows_per_call = 64  # the unit of rows a worker claims: a call of fewer rows costs as much

    def __init__(
        self,
        system: openmm.System | TorchSystemEnergy,
        threads: int = 1,
        compile_after: float | None = 30.0,
    ):
        self.energy = system if isinstance(system, TorchSystemEnergy) else TorchSystemEnergy(system)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UserInputError(f"threads must be a positive int, got {threads!r}")
        if compile_after is not None and not compile_after >= 0:
            raise UserInputError(
                f"compile_after must be >= 0 seconds or None, got {compile_after!r}"
            )
        self.threads = threads
        self.compile_after = compile_after
        self.compiled = False  # whether evaluations now run compiled
        self.uncompiled_seconds = 0.0
        self._tried_compiling = False
        self._function: Callable[[Tensor], Tensor] = self.energy
        n = self.energy.n_particles
        self._chunk_rows = max(self.rows_per_call, _CHUNK_PAIRS // max(1, n * (n - 1) // 2))

    def __call__(self, positions: np.ndarray, energies: np.ndarray, forces: np.ndarray) -> None:
        """Write energies (n,) in kJ/mol and forces (n, N, 3) in kJ/mol/nm of positions (n, N, 3)
        in nm (float64, C-contiguous rows)."""
        with _torch_threads(self.threads), torch.inference_mode(False), torch.enable_grad():
            if self._should_compile():
                self._function = torch.compile(self.energy, dynamic=True)
                self.compiled = self._tried_compiling = True
            start = time.perf_counter()
            for first in range(0, len(positions), self._chunk_rows):
                rows = slice(first, first + self._chunk_rows)
                self._evaluate(positions[rows], energies[rows], forces[rows])
            if not self.compiled:
                self.uncompiled_seconds += time.perf_counter() - start

    def _should_compile(self) -> bool:
        return (
            not self._tried_compiling
            and self.compile_after is not None
            and self.uncompiled_seconds >= self.compile_after
        )

    def _evaluate(self, positions: np.ndarray, energies: np.ndarray, forces: np.ndarray) -> None:
        x = torch.from_numpy(positions.reshape(len(positions), -1)).requires_grad_(True)
        try:
            energy = self._function(x)
        except Exception as error:
            if self._function is self.energy:
                raise
            warnings.warn(
                f"torch.compile of the torch energy failed ({type(error).__name__}: {error}); "
                "it continues uncompiled, several times slower",
                RuntimeWarning,
                stacklevel=4,
            )
            self._function = self.energy
            self.compiled = False
            energy = self._function(x)
        (gradient,) = torch.autograd.grad(energy.sum(), x)
        energies[...] = energy.detach().numpy()
        np.negative(gradient.numpy(), out=forces.reshape(len(forces), -1))
