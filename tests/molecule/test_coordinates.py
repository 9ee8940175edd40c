"""Internal coordinates: Z-matrix, exact round trips and log-determinants, flow-space map."""

from __future__ import annotations

import copy
import io
import math

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch
from openmmtools import testsystems

from openmm_nice.config import TORSION_FLOOR
from openmm_nice.molecule.coordinates import (
    STIFF_NETWORK,
    MolecularTransform,
    stiff_shift_and_log_scale,
    torsion_features,
)
from openmm_nice.molecule.internal_coordinates import InternalCoordinates
from openmm_nice.molecule.torsion_densities import (
    PARENT_BINS,
    SMOOTHING_CANDIDATES,
    SPARSE_BIN_FRAMES,
    circular_cdf,
    conditional_cdfs,
    conditional_log_density,
    cross_validated_smoothing,
    fit_torsion_tree,
    parent_bin_frames,
)
from openmm_nice.molecule.zmatrix import build_zmatrix, handed_torsions, torsion_symmetries


@pytest.fixture(scope="module")
def alanine():
    return testsystems.AlanineDipeptideVacuum(constraints=None)


@pytest.fixture(scope="module")
def zmatrix(alanine):
    return build_zmatrix(alanine.topology)


@pytest.fixture(scope="module")
def reference(alanine):
    """The reference structure as a (1, 66) float64 tensor in nm."""
    positions = alanine.positions.value_in_unit(unit.nanometer)
    return torch.tensor(np.asarray(positions), dtype=torch.float64).reshape(1, -1)


def rotation_zyz(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices Rz(alpha) Ry(beta) Rz(gamma) of shape (B, 3, 3) from (B, 3) angles."""

    def about(axis: int, angle: torch.Tensor) -> torch.Tensor:
        c, s = torch.cos(angle), torch.sin(angle)
        one, zero = torch.ones_like(angle), torch.zeros_like(angle)
        if axis == 2:
            rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
        else:
            rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    alpha, beta, gamma = angles.unbind(-1)
    return about(2, alpha) @ about(1, beta) @ about(2, gamma)


def random_rigid_motion(x: torch.Tensor) -> torch.Tensor:
    """x (B, 3N) rotated by random rotations and shifted by random translations."""
    batch = x.shape[0]
    scale = torch.tensor([2 * math.pi, math.pi, 2 * math.pi], dtype=x.dtype)
    angles = torch.rand(batch, 3, dtype=x.dtype) * scale
    moved = x.reshape(batch, -1, 3) @ rotation_zyz(angles).transpose(-1, -2)
    return (moved + torch.randn(batch, 1, 3, dtype=x.dtype)).reshape(batch, -1)


def perturbed(ic: InternalCoordinates, reference: torch.Tensor, batch: int) -> torch.Tensor:
    """Internal coordinates near the reference with uniformly random torsions."""
    q = ic.to_internal(reference)[0].expand(batch, -1).clone()
    n = ic.n_atoms
    q[:, : n - 1] *= 1 + 0.05 * torch.randn(batch, n - 1)
    q[:, n - 1 : 2 * n - 3] += 0.1 * torch.randn(batch, n - 2)
    q[:, 2 * n - 3 :] = (2 * torch.rand(batch, n - 3) - 1) * math.pi
    return q


def aligned(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x (B, 3N) optimally rotated and translated onto target (B, 3N) (Kabsch)."""
    batch = x.shape[0]
    a, b = x.reshape(batch, -1, 3), target.reshape(batch, -1, 3)
    a0, b0 = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    u, _, vh = torch.linalg.svd(a0.transpose(1, 2) @ b0)
    sign = torch.ones(batch, 3)
    sign[:, 2] = torch.sign(torch.linalg.det(u @ vh))
    rotation = u @ torch.diag_embed(sign) @ vh
    return (a0 @ rotation + b.mean(1, keepdim=True)).reshape(batch, -1)


def augmented_slogdet(forward, q: torch.Tensor, rigid: torch.Tensor) -> float:
    """log|det| of (t, Euler angles, q) -> R(angles) x_canonical(q) + t, by autograd."""

    def square_map(v: torch.Tensor) -> torch.Tensor:
        t, angles, inner = v[:3], v[3:6], v[6:]
        x = forward(inner.unsqueeze(0)).reshape(-1, 3)
        return (x @ rotation_zyz(angles.unsqueeze(0))[0].T + t).reshape(-1)

    jacobian = torch.autograd.functional.jacobian(square_map, torch.cat([rigid, q]))
    return torch.linalg.slogdet(jacobian)[1].item()


def bonded(topology) -> set[frozenset[int]]:
    return {frozenset((a.index, b.index)) for a, b in topology.bonds()}


def chain_topology(n_atoms: int, n_molecules: int = 1) -> app.Topology:
    topology = app.Topology()
    for _ in range(n_molecules):
        residue = topology.addResidue("MOL", topology.addChain())
        atoms = [topology.addAtom(f"C{i}", app.element.carbon, residue) for i in range(n_atoms)]
        for a, b in zip(atoms[:-1], atoms[1:], strict=True):
            topology.addBond(a, b)
    return topology


# Z-matrix


def test_zmatrix_follows_the_bond_graph(alanine, zmatrix):
    bonds = bonded(alanine.topology)
    n = alanine.topology.getNumAtoms()
    assert zmatrix.shape == (n, 4) and zmatrix.dtype == np.int64
    assert sorted(zmatrix[:, 0]) == list(range(n))
    root = zmatrix[0, 0]
    assert list(alanine.topology.atoms())[root].name == "CA"
    assert (zmatrix[0, 1:] == -1).all() and (zmatrix[1, 2:] == -1).all() and zmatrix[2, 3] == -1
    row_of = {atom: r for r, atom in enumerate(zmatrix[:, 0])}
    for r, (atom, j, k, torsion_ref) in enumerate(zmatrix):
        refs = [ref for ref in (j, k, torsion_ref) if ref >= 0]
        assert len(refs) == min(r, 3) and all(row_of[ref] < r for ref in refs)
        if r >= 1:
            assert frozenset((atom, j)) in bonds
        if r >= 2:
            assert frozenset((j, k)) in bonds
        if r >= 3:
            assert frozenset((k, torsion_ref)) in bonds or frozenset((j, torsion_ref)) in bonds
    # The frame atoms (rows 0-2) are heavy.
    elements = [a.element.symbol for a in alanine.topology.atoms()]
    assert all(elements[a] != "H" for a in zmatrix[:3, 0])


def test_zmatrix_from_mdtraj_topology_matches(alanine, zmatrix):
    np.testing.assert_array_equal(
        build_zmatrix(mdtraj.Topology.from_openmm(alanine.topology)), zmatrix
    )


def test_zmatrix_refuses_bad_topologies():
    with pytest.raises(ValueError, match="2 separate molecules"):
        build_zmatrix(chain_topology(4, n_molecules=2))
    with pytest.raises(ValueError, match="at least 3 atoms, the topology has 2"):
        build_zmatrix(chain_topology(2))
    with pytest.raises(TypeError, match="openmm.app.Topology or mdtraj.Topology"):
        build_zmatrix("not a topology")


def test_invalid_zmatrix_is_refused():
    with pytest.raises(ValueError, match=r"row 3 = \[3, 2, 1, 3\] is invalid"):
        InternalCoordinates([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 3]])
    with pytest.raises(ValueError, match="shape"):
        InternalCoordinates(np.zeros((2, 4), dtype=int))


# InternalCoordinates


def test_q_to_x_to_q_round_trip(zmatrix, reference):
    ic = InternalCoordinates(zmatrix)
    q = perturbed(ic, reference, 64)
    x, ladj = ic.to_cartesian(q)
    q_back, ladj_back = ic.to_internal(x)
    n = ic.n_atoms
    difference = q_back - q
    difference[:, 2 * n - 3 :] = torch.remainder(difference[:, 2 * n - 3 :] + math.pi, 2 * math.pi)
    difference[:, 2 * n - 3 :] -= math.pi
    assert difference.abs().max() < 1e-10
    torch.testing.assert_close(ladj_back, -ladj, rtol=0, atol=1e-10)


def test_x_to_q_to_x_round_trip_up_to_rigid_motion(zmatrix, reference):
    ic = InternalCoordinates(zmatrix)
    x = random_rigid_motion(ic.to_cartesian(perturbed(ic, reference, 32))[0])
    x_canonical = ic.to_cartesian(ic.to_internal(x)[0])[0]
    assert (aligned(x_canonical, x) - x).abs().max() < 1e-10
    # The canonical frame: row 0 at the origin, row 1 on +x, row 2 in the xy-plane with y > 0.
    pos = x_canonical.reshape(32, -1, 3)
    a0, a1, a2 = zmatrix[:3, 0]
    assert pos[:, a0].abs().max() == 0
    assert (pos[:, a1, 0] > 0).all() and pos[:, a1, 1:].abs().max() == 0
    assert (pos[:, a2, 1] > 0).all() and pos[:, a2, 2].abs().max() == 0


def test_rigid_motion_places_the_canonical_frame_back_at_the_positions(zmatrix, reference):
    ic = InternalCoordinates(zmatrix)
    x = random_rigid_motion(ic.to_cartesian(perturbed(ic, reference, 16))[0])
    rotation, translation = ic.rigid_motion(x)
    torch.testing.assert_close(
        rotation.mT @ rotation, torch.eye(3).expand(16, 3, 3), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(16), rtol=0, atol=1e-12)
    canonical = ic.to_cartesian(ic.to_internal(x)[0])[0].reshape(16, -1, 3)
    placed = canonical @ rotation.mT + translation[:, None]
    assert (placed.reshape(16, -1) - x).abs().max() < 1e-10
    # another molecule's internal coordinates land in this one's frame
    other = canonical.roll(1, dims=0) @ rotation.mT + translation[:, None]
    moved_rotation, moved_translation = ic.rigid_motion(other.reshape(16, -1))
    torch.testing.assert_close(moved_rotation, rotation, rtol=0, atol=1e-12)
    torch.testing.assert_close(moved_translation, translation, rtol=0, atol=1e-12)


def test_log_jacobian_is_exact(zmatrix, reference):
    """slogdet of (t, ZYZ Euler angles, q) -> R x(q) + t is log sin(beta) + log J(q)."""
    ic = InternalCoordinates(zmatrix)
    q = perturbed(ic, reference, 3)
    for q_one in q:
        rigid = torch.cat([torch.randn(3), torch.tensor([0.7, 1.1, -2.0])])
        expected = math.log(math.sin(1.1)) + ic.to_cartesian(q_one.unsqueeze(0))[1].item()
        observed = augmented_slogdet(lambda v: ic.to_cartesian(v)[0], q_one, rigid)
        assert observed == pytest.approx(expected, abs=1e-9)
        # Non-trivial: log J differs by tens of units between configurations.
    ladj = ic.to_cartesian(q)[1]
    assert (ladj.max() - ladj.min()) > 0.1


def test_energy_is_invariant_to_the_removed_rigid_motion(alanine, zmatrix, reference):
    ic = InternalCoordinates(zmatrix)
    x = random_rigid_motion(reference.expand(4, -1) + 0.002 * torch.randn(4, reference.shape[1]))
    x_canonical = ic.to_cartesian(ic.to_internal(x)[0])[0]
    context = openmm.Context(
        alanine.system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )

    def energy(positions: torch.Tensor) -> float:
        context.setPositions(positions.reshape(-1, 3).numpy())
        state = context.getState(getEnergy=True)
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    for a, b in zip(x, x_canonical, strict=True):
        assert energy(b) == pytest.approx(energy(a), rel=1e-9, abs=1e-9)


def test_internal_coordinates_float32_and_shape_errors(zmatrix, reference):
    ic = InternalCoordinates(zmatrix)
    x = reference.float()
    q, ladj = ic.to_internal(x)
    x_back, ladj_back = ic.to_cartesian(q)
    assert q.dtype == ladj.dtype == x_back.dtype == ladj_back.dtype == torch.float32
    assert q.shape == (1, 60) and ladj.shape == (1,)
    assert (ic.to_internal(x_back)[0] - q).abs().max() < 1e-4
    with pytest.raises(ValueError, match=r"shape \(B, 66\), got \(66,\)"):
        ic.to_internal(reference[0])
    with pytest.raises(TypeError, match="float32 or float64"):
        ic.to_cartesian(torch.zeros(1, 60, dtype=torch.long))


def test_loaded_zmatrix_replaces_the_placement_plan():
    chain = [[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]]
    other = [[1, -1, -1, -1], [0, 1, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]]
    ic = InternalCoordinates(chain)
    ic.load_state_dict(InternalCoordinates(other).state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(ic.to_internal(x), InternalCoordinates(other).to_internal(x))
    q = ic.to_internal(x)[0]
    torch.testing.assert_close(ic.to_cartesian(q), InternalCoordinates(other).to_cartesian(q))


# MolecularTransform


def near_reference(ic: InternalCoordinates, reference, count: int, noise) -> torch.Tensor:
    """``count`` internal coordinates near the reference's: bonds 2%, angles 0.05 rad and
    torsions 0.2 rad of ``noise(*shape)``, drawn in that order."""
    q = ic.to_internal(reference)[0].expand(count, -1).clone()
    n = ic.n_atoms
    q[:, : n - 1] *= 1 + 0.02 * noise(count, n - 1)
    q[:, n - 1 : 2 * n - 3] += 0.05 * noise(count, n - 2)
    q[:, 2 * n - 3 :] += 0.2 * noise(count, n - 3)
    return q


@pytest.fixture(scope="module")
def frames(zmatrix, reference):
    """200 synthetic frames: thermal-like bonds and angles, the first torsion in two modes."""
    # Module fixtures run before the float64 default of conftest, hence the explicit dtype.
    torch.manual_seed(1)
    noise = lambda *shape: torch.randn(*shape, dtype=torch.float64)
    ic = InternalCoordinates(zmatrix)
    q = near_reference(ic, reference, 200, noise)
    n = ic.n_atoms
    modes = torch.where(torch.rand(200) < 0.5, -2.0, 2.0)
    q[:, 2 * n - 3] = modes + 0.2 * noise(200)
    return random_rigid_motion(ic.to_cartesian(q)[0])


@pytest.fixture(scope="module")
def transform(zmatrix, frames):
    return MolecularTransform.from_data(zmatrix, frames.numpy())


def test_from_data_normalises_the_data(transform, frames):
    s = transform.inverse(frames)
    torch.testing.assert_close(s.mean(0), torch.zeros(60), rtol=0, atol=1e-10)
    torch.testing.assert_close(s.std(0), torch.ones(60), rtol=0, atol=1e-10)
    # The two torsion modes at -2 and +2 leave the widest gap around 0: the cut goes there.
    cut = transform.torsion_offset[0].item() + math.pi
    assert abs(math.remainder(cut, 2 * math.pi)) < 0.3


def test_from_reference_frame_maps_zero_to_the_reference(zmatrix, reference):
    t = MolecularTransform.from_data(zmatrix, reference.reshape(1, -1, 3))
    x = t(torch.zeros(1, 60))
    assert (aligned(x, reference) - reference).abs().max() < 1e-10
    n = t.internal.n_atoms
    assert t.scale[: n - 1].eq(0.05).all() and t.scale[2 * n - 3 :].eq(1.0).all()


def test_molecular_transform_round_trip(transform):
    s = torch.randn(64, 60)
    x, ladj = transform.call_and_ladj(s)
    s_back, ladj_back = transform.inverse_and_ladj(random_rigid_motion(x))
    assert (s_back - s).abs().max() < 1e-10
    torch.testing.assert_close(ladj_back, -ladj, rtol=0, atol=1e-10)


def test_molecular_transform_log_det_is_exact(transform):
    s = torch.randn(2, 60)
    ladj = transform.call_and_ladj(s)[1]
    for s_one, ladj_one in zip(s, ladj, strict=True):
        rigid = torch.cat([torch.randn(3), torch.tensor([-0.4, 2.5, 1.3])])
        observed = augmented_slogdet(transform, s_one, rigid)
        assert observed == pytest.approx(math.log(math.sin(2.5)) + ladj_one.item(), abs=1e-9)


def test_molecular_transform_state_dict_round_trip(transform, zmatrix, reference):
    buffer = io.BytesIO()
    torch.save(transform.state_dict(), buffer)
    buffer.seek(0)
    fresh = MolecularTransform.from_data(zmatrix, reference)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    s = torch.randn(8, 60)
    torch.testing.assert_close(fresh.call_and_ladj(s), transform.call_and_ladj(s), rtol=0, atol=0)


def test_molecular_transform_gradients_and_non_finite_input(transform):
    s = torch.randn(4, 60, requires_grad=True)
    x, ladj = transform.call_and_ladj(s)
    (x.square().sum() + ladj.sum()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # A non-finite bond, angle or torsion (which alone would saturate to a finite q).
    bad = torch.randn(4, 60)
    bad[0, 5], bad[1, 40], bad[2, 50] = math.nan, math.inf, -math.inf
    x, ladj = transform.call_and_ladj(bad)
    assert x[:3].isnan().all(dim=1).all()
    assert torch.isfinite(x[3]).all() and torch.isfinite(ladj[3])


def test_molecular_transform_float32(transform):
    s = torch.randn(16, 60)
    x, ladj = transform.call_and_ladj(s.float())
    assert x.dtype == ladj.dtype == torch.float32
    assert (transform.inverse(x) - s.float()).abs().max() < 1e-2
    torch.testing.assert_close(x.double(), transform(s), rtol=0, atol=1e-5)


def test_molecular_transform_errors(transform, zmatrix):
    with pytest.raises(ValueError, match=r"s of shape \(B, 60\), got \(4, 66\)"):
        transform(torch.zeros(4, 66))
    with pytest.raises(ValueError, match=r"x_frames must have shape \(F, 66\)"):
        MolecularTransform.from_data(zmatrix, np.zeros((3, 65)))
    with pytest.raises(ValueError, match="scale must be positive"):
        MolecularTransform(zmatrix, torch.zeros(60), torch.zeros(60), torch.zeros(19))


def test_uniform_torsions_are_the_erf_map(zmatrix, reference):
    t = MolecularTransform.from_data(zmatrix, reference.reshape(1, -1, 3))
    assert t.torsion_cdf.shape == (19, 2)
    n = t.internal.n_atoms
    s = torch.randn(32, 60)
    q = t.internal.to_internal(t(s))[0][:, 2 * n - 3 :]
    y = t.shift[2 * n - 3 :] + t.scale[2 * n - 3 :] * s[:, 2 * n - 3 :]
    expected = t.torsion_offset + math.pi * torch.erf(y / math.sqrt(2))
    difference = torch.remainder(q - expected + math.pi, 2 * math.pi) - math.pi
    assert difference.abs().max() < 1e-10


def test_torsion_densities_make_every_torsion_normal(transform, frames, zmatrix):
    """The bimodal first torsion of the fixture is normal in flow space with the fitted
    density, and far from normal with a uniform one."""

    def distance_from_normal(values: torch.Tensor) -> float:
        ordered = values.sort().values
        empirical = (torch.arange(len(ordered)) + 0.5) / len(ordered)
        return (torch.special.ndtr(ordered) - empirical).abs().max().item()

    first = 2 * transform.internal.n_atoms - 3
    s = transform.inverse(frames)[:, first]
    assert distance_from_normal(s) < 0.12
    uniform = MolecularTransform(
        zmatrix, transform.shift, transform.scale, transform.torsion_offset
    )
    y = uniform.inverse(frames)[:, first]
    assert distance_from_normal((y - y.mean()) / y.std()) > 0.2
    # The density has a floor (the default, ModelConfig's): every bin keeps floor / K or more.
    assert transform.torsion_cdf.diff(dim=1).min() >= TORSION_FLOOR / 360 * (1 - 1e-9)


def test_the_floor_reaches_the_maps_samples_where_the_smoothing_is_narrow(zmatrix, reference):
    """Frames that never leave a narrow well (0.1 rad): the map alone (s ~ N(0, I)) draws the
    unvisited arc at about the floor's share when the density is smoothed less than the well is
    wide. Smoothed wider, the density's well is wider than the frames', the standardisation
    squeezes the torsion (scale < 1), and the floor's arc lands in the normal's far tail: an
    arc the frames missed (a cis amide bond, a minor basin) is then out of the flow's reach."""
    torch.manual_seed(3)
    noise = lambda *shape: torch.randn(*shape, dtype=torch.float64)
    ic = InternalCoordinates(zmatrix)
    n = ic.n_atoms
    first = 2 * n - 3
    q = near_reference(ic, reference, 20000, noise)
    q[:, first] = -2.0 + 0.1 * noise(20000)
    frames = ic.to_cartesian(q)[0]
    floor = 0.005
    arc = 2 * math.pi - 1.2  # farther than 0.6 rad (6 standard deviations) from the well
    expected = floor * arc / (2 * math.pi)

    def unvisited_share(smoothing: float) -> float:
        t = MolecularTransform.from_data(zmatrix, frames, floor=floor, density_smoothing=smoothing)
        torsion = t.internal.to_internal(t(torch.randn(200000, 60)))[0][:, first]
        distance = (torsion + 2.0 + math.pi).remainder(2 * math.pi) - math.pi
        return distance.abs().gt(0.6).double().mean().item()

    # about half the floor's share: the standardisation still squeezes a little (scale 0.95),
    # and the floor's arc sits in the normal's tails, beyond |s| = 3 (measured 0.0021 of 0.0040)
    assert 0.3 * expected < unvisited_share(2.0) < 1.2 * expected
    assert unvisited_share(10.0) < 0.05 * expected  # measured 0


def test_energy_places_the_cut_on_a_barrier_inside_an_unvisited_region(zmatrix, reference):
    """Data in one narrow mode leave a wide empty arc; without an energy the cut goes to its
    middle, with one to the scanned barrier."""
    torch.manual_seed(2)
    ic = InternalCoordinates(zmatrix)
    n = ic.n_atoms
    first = 2 * n - 3
    q = ic.to_internal(reference)[0].expand(100, -1).clone()
    q[:, first] = -2.0 + 0.1 * torch.randn(100, dtype=torch.float64)
    frames = ic.to_cartesian(q)[0]
    barrier = 0.5

    def energy(x: torch.Tensor) -> torch.Tensor:
        torsion = ic.to_internal(x)[0][:, first]
        return 20 * torch.exp(-2 * (1 - torch.cos(torsion - barrier)))

    plain = MolecularTransform.from_data(zmatrix, frames)
    scanned = MolecularTransform.from_data(zmatrix, frames, energy=energy)
    cut = lambda t: math.remainder(t.torsion_offset[0].item() - math.pi, 2 * math.pi)
    assert abs(cut(plain) - (-2.0 + math.pi)) < 0.15
    assert abs(cut(scanned) - barrier) < 2 * math.pi / 72
    # The map stays exact whatever the cut.
    s = torch.randn(16, 60)
    x, ladj = scanned.call_and_ladj(s)
    s_back, ladj_back = scanned.inverse_and_ladj(x)
    assert (s_back - s).abs().max() < 1e-9 and (ladj + ladj_back).abs().max() < 1e-9


def test_a_refit_keeps_a_cut_that_still_lies_in_an_empty_region(zmatrix, reference):
    """Two narrow modes leave two empty arcs. A fit alone cuts in the middle of the wider; a
    refit given the current cut keeps it in the narrower, and moves it out of a mode."""
    torch.manual_seed(3)
    ic = InternalCoordinates(zmatrix)
    first = 2 * ic.n_atoms - 3
    q = ic.to_internal(reference)[0].expand(200, -1).clone()
    modes = torch.where(torch.arange(200) % 2 == 0, -2.0, 1.0).double()
    q[:, first] = modes + 0.1 * torch.randn(200, dtype=torch.float64)
    frames = ic.to_cartesian(q)[0]
    cut = lambda t: math.remainder(t.torsion_offset[0].item() - math.pi, 2 * math.pi)
    plain = MolecularTransform.from_data(zmatrix, frames)
    assert abs(abs(cut(plain)) - (math.pi - 0.5)) < 0.3  # the wider arc, through +-pi
    current = plain.torsion_offset - math.pi
    for kept in (-0.5, 0.2):  # inside the narrower empty arc (-1.7, 0.7)
        current[0] = kept
        refit = MolecularTransform.from_data(zmatrix, frames, cuts=current)
        assert cut(refit) == pytest.approx(kept)
        torch.testing.assert_close(refit.torsion_offset[1:], plain.torsion_offset[1:])
    current[0] = 1.0  # inside a mode: moved to where the fit alone puts it
    assert cut(MolecularTransform.from_data(zmatrix, frames, cuts=current)) == cut(plain)
    with pytest.raises(ValueError, match="cuts must hold 19 finite angles"):
        MolecularTransform.from_data(zmatrix, frames, cuts=current[:3])


def test_torsion_density_checks_and_reload(transform, zmatrix, reference):
    good = (torch.zeros(60), torch.ones(60), torch.zeros(19))
    with pytest.raises(ValueError, match=r"torsion_cdf must have shape \(19, K \+ 1\)"):
        MolecularTransform(zmatrix, *good, torch.zeros(19))
    flat = torch.tensor([0.0, 0.5, 0.5, 1.0]).expand(19, 4)
    with pytest.raises(ValueError, match="rise strictly from 0 to 1"):
        MolecularTransform(zmatrix, *good, flat)
    with pytest.raises(ValueError, match=r"floor must lie in \(0, 1\]"):
        MolecularTransform.from_data(zmatrix, torch.cat([reference, reference]), floor=0.0)
    # A uniform transform takes the fitted densities (another number of bins) from a state dict.
    fresh = MolecularTransform(zmatrix, *good)
    fresh.load_state_dict(transform.state_dict())
    s = torch.randn(8, 60)
    torch.testing.assert_close(fresh.call_and_ladj(s), transform.call_and_ladj(s), rtol=0, atol=0)


def test_methyl_rotors_are_three_fold_and_their_densities_symmetric(alanine, zmatrix, frames):
    orders = torsion_symmetries(alanine.topology, zmatrix, alanine.system)
    rotors = [i for i, order in enumerate(orders) if order > 1]
    # The methyl carbons of ACE (1), ALA (CB, 10) and NME (18) each carry one rotor torsion.
    assert sorted(zmatrix[3 + i, 1] for i in rotors) == [1, 10, 18]
    assert orders[rotors].tolist() == [3, 3, 3]
    t = MolecularTransform.from_data(zmatrix, frames.numpy(), symmetry=orders)
    third = torch.stack([t.torsion_cdf[:, k + 120] - t.torsion_cdf[:, k] for k in (0, 120, 240)])
    torch.testing.assert_close(third[:, rotors], torch.full((3, 3), 1 / 3), rtol=0, atol=1e-12)
    # The data put each rotor in one well: without the symmetry one third holds most mass.
    plain = MolecularTransform.from_data(zmatrix, frames.numpy())
    uneven = torch.stack(
        [plain.torsion_cdf[:, k + 120] - plain.torsion_cdf[:, k] for k in (0, 120, 240)]
    )
    assert (uneven[:, rotors].max(0).values > 0.5).all()
    with pytest.raises(ValueError, match="symmetry must hold 19 orders"):
        MolecularTransform.from_data(zmatrix, frames.numpy(), symmetry=[3])


def test_auto_smoothing_is_narrow_for_well_sampled_and_wide_for_sparse_torsions():
    rng = np.random.default_rng(0)
    narrow = np.radians(3.0) * rng.standard_normal((1, 4000))  # a stiff torsion, many frames
    sparse = np.radians(40.0) * rng.standard_normal((1, 40))  # a soft one, few frames
    assert cross_validated_smoothing(narrow, 360, 0.001) <= 3.0
    assert cross_validated_smoothing(sparse, 360, 0.001) >= 10.0
    # The chosen width predicts new data better than a fixed 10 degrees.
    fresh = np.radians(3.0) * rng.standard_normal(4000)
    held_out = {}
    for width in (cross_validated_smoothing(narrow, 360, 0.001), 10.0):
        cdf = circular_cdf(narrow[0] + math.pi, 360, width, 0.001)
        index = ((fresh + math.pi) * 360 / (2 * math.pi)).astype(int)
        held_out[width] = np.log(np.diff(cdf)[index]).mean()
    assert max(held_out, key=held_out.get) != 10.0


def test_from_data_with_auto_smoothing(zmatrix, frames, alanine):
    orders = torsion_symmetries(alanine.topology, zmatrix, alanine.system)
    t = MolecularTransform.from_data(
        zmatrix, frames.numpy(), density_smoothing="auto", symmetry=orders
    )
    assert len(t.density_smoothing) == 19
    assert set(t.density_smoothing) <= set(SMOOTHING_CANDIDATES)
    s = torch.randn(16, 60)
    x, ladj = t.call_and_ladj(s)
    back, minus = t.inverse_and_ladj(x)
    torch.testing.assert_close(back, s, rtol=0, atol=1e-7)
    torch.testing.assert_close(minus, -ladj, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="density_smoothing must be a positive width"):
        MolecularTransform.from_data(zmatrix, frames.numpy(), density_smoothing="wide")


# Stereocentres


def test_handed_torsions_of_alanine(alanine, zmatrix, reference):
    signs = handed_torsions(alanine.topology, zmatrix, reference)
    atoms = list(alanine.topology.atoms())
    neighbours = {a.index: set() for a in atoms}
    for a, b in alanine.topology.bonds():
        neighbours[a.index].add(b.index)
        neighbours[b.index].add(a.index)
    for (_, j, _, partner), sign in zip(zmatrix[3:], signs, strict=True):
        stereo = partner in neighbours[j] and len(neighbours[j]) == 4
        assert (sign != 0) == stereo
    # CA, the chiral centre, and the three methyl carbons: two sibling torsions each
    assert np.count_nonzero(signs) == 8
    ic = InternalCoordinates(zmatrix)
    torsions = ic.to_internal(reference)[0][0, 2 * ic.n_atoms - 3 :].numpy()
    assert (np.sign(torsions[signs != 0]) == signs[signs != 0]).all()
    # the mirror image has every handedness reversed
    assert (handed_torsions(alanine.topology, zmatrix, -reference) == -signs).all()


@pytest.fixture(scope="module")
def handed(alanine, zmatrix, reference):
    """A transform keeping alanine's stereocentres, fitted to 200 frames near the reference."""
    signs = handed_torsions(alanine.topology, zmatrix, reference)
    ic = InternalCoordinates(zmatrix)
    generator = torch.Generator().manual_seed(2)
    noise = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator)
    q = near_reference(ic, reference, 200, noise)
    frames = random_rigid_motion(ic.to_cartesian(q)[0])
    return MolecularTransform.from_data(zmatrix, frames, handedness=signs), signs, frames


def test_a_map_saved_before_handed_torsions_loads_on_the_whole_circle(handed, transform):
    """A state dict without torsion_sign (runs trained before stereocentres were kept) loads
    into a map built with handed torsions as the map it was: every torsion on the whole circle."""
    module = handed[0]
    assert (module.torsion_sign != 0).any()
    old = {k: v for k, v in transform.state_dict().items() if k != "torsion_sign"}
    module = copy.deepcopy(module)
    module.load_state_dict(old)
    assert (module.torsion_sign == 0).all()
    s = torch.randn(8, 60, dtype=torch.float64)
    torch.testing.assert_close(module.call_and_ladj(s), transform.call_and_ladj(s), rtol=0, atol=0)


def assert_exact_bijection(transform: MolecularTransform, euler: tuple[float, float, float]):
    """Round trips through a rigid motion to 1e-10, and the ladj of two samples against the
    autograd Jacobian of the map augmented by the rigid motion (Euler angles ``euler``)."""
    s = torch.randn(64, 60)
    x, ladj = transform.call_and_ladj(s)
    s_back, ladj_back = transform.inverse_and_ladj(random_rigid_motion(x))
    assert (s_back - s).abs().max() < 1e-10
    torch.testing.assert_close(ladj_back, -ladj, rtol=0, atol=1e-10)
    for s_one, ladj_one in zip(s[:2], ladj[:2], strict=True):
        rigid = torch.cat([torch.randn(3), torch.tensor(euler)])
        observed = augmented_slogdet(transform, s_one, rigid)
        expected = math.log(math.sin(euler[1])) + ladj_one.item()
        assert observed == pytest.approx(expected, abs=1e-9)


def test_handed_transform_round_trip_and_exact_log_det(handed):
    transform, signs, _ = handed
    assert_exact_bijection(transform, (0.7, 1.1, -2.0))
    # every sample, however far out in s, keeps the reference's handedness
    wide = 4 * torch.randn(1000, 60)
    n = transform.internal.n_atoms
    torsions = transform.internal.to_internal(transform(wide))[0][:, 2 * n - 3 :]
    kept = torch.as_tensor(signs != 0)
    assert (torch.sign(torsions[:, kept]) == torch.as_tensor(signs[signs != 0])).all()


def test_mirror_images_have_zero_density(handed):
    transform, _, frames = handed
    s, ladj = transform.inverse_and_ladj(frames[:5])
    assert torch.isfinite(ladj).all()
    mirror_s, mirror_ladj = transform.inverse_and_ladj(-frames[:5])
    assert torch.isfinite(mirror_s).all() and (mirror_ladj == -math.inf).all()
    with pytest.raises(ValueError, match="other handedness"):
        MolecularTransform.from_data(transform.internal.zmatrix, -frames, handedness=handed[1])


def test_weighted_fit_equals_the_fit_to_repeated_frames(zmatrix, frames):
    """Integer weights give the map fitted to frames repeated that many times."""
    counts = torch.randint(0, 4, (len(frames),), generator=torch.Generator().manual_seed(3))
    weighted = MolecularTransform.from_data(zmatrix, frames, weights=counts.double())
    repeated = MolecularTransform.from_data(zmatrix, frames.repeat_interleave(counts, dim=0))
    for name in ("torsion_offset", "torsion_cdf", "shift"):
        torch.testing.assert_close(getattr(weighted, name), getattr(repeated, name))
    # the weighted standard deviation is the population one, the repeated one has n - 1
    n = int(counts.sum())
    torch.testing.assert_close(weighted.scale, repeated.scale * math.sqrt((n - 1) / n))
    with pytest.raises(ValueError, match="non-negative"):
        MolecularTransform.from_data(zmatrix, frames, weights=-torch.ones(len(frames)))


def test_undefined_positions_give_undefined_flow_coordinates(transform):
    x = transform(torch.randn(3, 60))
    x[1] = math.nan
    s, ladj = transform.inverse_and_ladj(x)
    assert torch.isfinite(s[[0, 2]]).all() and s[1].isnan().any() and ladj[1].isnan()


@pytest.fixture(scope="module")
def tree(zmatrix, reference):
    """A transform with conditional torsions, fitted to 400 weighted frames in which torsion 5
    follows the mode of torsion 0 (psi following phi, as in a peptide's backbone basins)."""
    generator = torch.Generator().manual_seed(3)
    noise = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator)
    ic = InternalCoordinates(zmatrix)
    q = near_reference(ic, reference, 400, noise)
    n = ic.n_atoms
    first = torch.rand(400, generator=generator, dtype=torch.float64) < 0.3
    q[:, 2 * n - 3] = torch.where(first, -2.0, 1.5) + 0.2 * noise(400)
    q[:, 2 * n - 3 + 5] = torch.where(first, 2.5, -1.0) + 0.2 * noise(400)
    frames = random_rigid_motion(ic.to_cartesian(q)[0])
    weights = torch.rand(400, generator=generator, dtype=torch.float64) + 0.5
    return MolecularTransform.from_data(zmatrix, frames, weights=weights, torsion_tree=True)


def test_torsion_tree_conditions_the_follower_on_its_leader(tree):
    parent = tree.torsion_parent.tolist()
    assert parent[5] == 0 or parent[0] == 5  # the strongest dependence is an edge
    assert tree.conditional_cdf.shape == (sum(p >= 0 for p in parent), 36, 361)
    # Given the leader in its first mode, the follower's density sits near 2.5, not near -1.
    n = tree.internal.n_atoms
    s = torch.randn(2000, 60)
    torsions = tree.internal.to_internal(tree(s))[0][:, 2 * n - 3 :]
    first = torsions[:, 0].sub(-2.0).abs() < 0.3
    second = torsions[:, 0].sub(1.5).abs() < 0.3
    follower = torsions[:, 5]
    assert (follower[first].sub(2.5).abs() < 0.8).float().mean() > 0.9
    assert (follower[second].sub(-1.0).abs() < 0.8).float().mean() > 0.9


def test_torsion_tree_round_trip_and_exact_log_det(tree):
    assert_exact_bijection(tree, (0.3, 1.9, -1.1))
    # gradients reach the parent's latent through the child's conditional map
    s = torch.randn(4, 60, requires_grad=True)
    x, ladj = tree.call_and_ladj(s)
    (x.square().sum() + ladj.sum()).backward()
    assert torch.isfinite(s.grad).all()
    x, _ = tree.call_and_ladj(s.detach().float())
    torch.testing.assert_close(x.double(), tree(s.detach()), rtol=0, atol=1e-5)


def test_torsion_tree_state_dict_loads_into_a_plain_transform_and_back(tree, transform):
    fresh = MolecularTransform.from_data(tree.internal.zmatrix, transform(torch.randn(2, 60)))
    fresh.load_state_dict(tree.state_dict())
    s = torch.randn(8, 60)
    torch.testing.assert_close(fresh.call_and_ladj(s), tree.call_and_ladj(s), rtol=0, atol=0)
    # a map saved before conditional torsions existed has no parents and loads as such
    old = {
        k: v
        for k, v in transform.state_dict().items()
        if k not in ("torsion_parent", "conditional_cdf")
    }
    fresh.load_state_dict(old)
    assert (fresh.torsion_parent == -1).all() and fresh.conditional_cdf.shape[0] == 0
    torch.testing.assert_close(fresh.call_and_ladj(s), transform.call_and_ladj(s), rtol=0, atol=0)


def test_torsion_tree_ignores_a_frame_of_negligible_weight():
    """A frame whose importance weight is 1e-200, alone in its bins: the product of its two
    marginal masses underflows, yet its share of the mutual information stays negligible, so
    the forest is the one of the other frames (it was an infinite information, hence an edge)."""
    rng = np.random.default_rng(0)
    leader = rng.uniform(-math.pi, math.pi, 5000)
    torsions = np.stack(
        [leader, rng.uniform(-math.pi, math.pi, 5000), leader + rng.normal(0, 0.2, 5000)], axis=1
    )
    torsions = np.remainder(torsions + math.pi, 2 * math.pi) - math.pi
    # the other frames keep torsions 1 and 2 out of their last 30-degree bin; the odd frame sits there
    torsions[:, 1:] = np.where(torsions[:, 1:] > 2.6, 2.0, torsions[:, 1:])
    odd = np.array([[0.0, 3.0, 3.0]])
    weights = np.full(5000, 1 / 5000)
    eligible = np.ones(3, dtype=bool)
    alone = fit_torsion_tree(torsions, weights, eligible)
    assert alone[2] == 0 or alone[0] == 2
    with np.errstate(divide="raise", invalid="raise"):
        joined = fit_torsion_tree(
            np.concatenate([torsions, odd]), np.append(weights, 1e-200), eligible
        )
    np.testing.assert_array_equal(joined, alone)


def test_adaptive_tree_smoothing_widens_sparse_parent_bins_and_fits_them_better():
    """A child torsion (psi) whose basin follows its parent (phi); the parent's minor basin
    holds 1% of 100,000 importance-weighted frames (weights log-normal, as a model's are there).
    Fitted to one draw and scored on another, the adaptive widths give the minor basin a
    higher held-out log-density, leave the major basin as it was, and leave a bin with at
    least SPARSE_BIN_FRAMES effective frames exactly as the fixed width does."""

    def draw(seed: int):
        rng = np.random.default_rng(seed)
        minor = rng.uniform(size=100_000) < 0.01
        parent = np.where(minor, 1.2, -1.4) + 0.25 * rng.normal(size=100_000)
        child = np.where(minor, -1.0, 2.6) + 0.35 * rng.normal(size=100_000)
        weights = np.exp(np.where(minor, 1.5, 0.2) * rng.normal(size=100_000))
        return np.remainder(child + math.pi, 2 * math.pi), parent, weights / weights.sum(), minor

    child, parent, weights, _ = draw(0)
    fits = {
        name: conditional_cdfs(child, parent, 360, 2.0, 0.005, weights, sparse)
        for name, sparse in (("fixed", None), ("adaptive", SPARSE_BIN_FRAMES))
    }
    # the score is a density of the child given the parent: it integrates to 1 on the circle
    grid = (np.arange(36_000) + 0.5) * 2 * math.pi / 36_000
    for a in (-1.4, 1.2, 0.33):
        mass = np.exp(conditional_log_density(fits["adaptive"], grid, np.full(36_000, a)))
        assert mass.mean() * 2 * math.pi == pytest.approx(1.0, abs=1e-9)
    child2, parent2, weights2, minor2 = draw(1)
    score = {name: conditional_log_density(cdfs, child2, parent2) for name, cdfs in fits.items()}
    inside = lambda region, name: weights2[region] @ score[name][region] / weights2[region].sum()
    assert inside(minor2, "adaptive") > inside(minor2, "fixed") + 0.03  # 0.12 nats here
    assert inside(~minor2, "adaptive") == pytest.approx(inside(~minor2, "fixed"), abs=0.01)
    # the minor basin's bins became smoother: no longer a comb of narrow spikes
    centres = -math.pi + (np.arange(PARENT_BINS) + 0.5) * 2 * math.pi / PARENT_BINS
    near = np.abs(centres - 1.2) < 0.3  # the parent bins of the minor basin
    spikes = lambda cdfs: np.diff(cdfs[near], axis=1).max()
    assert spikes(fits["adaptive"]) < 0.8 * spikes(fits["fixed"])
    # equal weights in numbers above SPARSE_BIN_FRAMES per bin: the fixed width, exactly
    rng = np.random.default_rng(2)
    many = 36 * 4000
    even = rng.uniform(-math.pi, math.pi, many)
    equal = np.full(many, 1.0 / many)
    values = rng.uniform(0, 2 * math.pi, many)
    np.testing.assert_array_equal(
        conditional_cdfs(values, even, 360, 2.0, 0.005, equal, SPARSE_BIN_FRAMES),
        conditional_cdfs(values, even, 360, 2.0, 0.005, equal),
    )
    # a bin whose only frames weigh 1e-200 (their squares underflow): still a density
    half = rng.uniform(-math.pi, 0.0, 1000)
    tiny = np.append(np.full(1000, 1e-3 * (1 - 2e-200)), [1e-200, 1e-200])
    cdfs = conditional_cdfs(
        rng.uniform(0, 2 * math.pi, 1002),
        np.append(half, [2.0, 2.0]),
        360,
        2.0,
        0.005,
        tiny,
        SPARSE_BIN_FRAMES,
    )
    assert np.isfinite(cdfs).all() and (np.diff(cdfs, axis=1) > 0).all()
    # each bin's Kish frames, against the shares written out bin by bin
    parents = np.append(half, [2.0, 2.0])
    frames = parent_bin_frames(parents, tiny)
    position = np.remainder(parents + math.pi, 2 * math.pi) * PARENT_BINS / (2 * math.pi) - 0.5
    j0 = np.remainder(np.floor(position), PARENT_BINS).astype(int)
    lam = position - np.floor(position)
    for j in range(PARENT_BINS):
        share = tiny * ((j0 == j) * (1 - lam) + ((j0 + 1) % PARENT_BINS == j) * lam)
        share = share / share.max() if share.max() > 0 else share
        expected = share.sum() ** 2 / (share**2).sum() if share.any() else 0.0
        assert frames[j] == pytest.approx(expected, rel=1e-12)
    assert (
        1
        <= frames[np.abs(-math.pi + (np.arange(PARENT_BINS) + 0.5) * math.pi / 18 - 2) < 0.2].max()
        <= 2
    )
    with pytest.raises(ValueError, match="sparse_frames must be a positive number"):
        conditional_cdfs(values, even, 360, 2.0, 0.005, equal, 0.0)


def test_the_map_takes_the_tree_smoothing_it_is_given(tree, zmatrix):
    frames = tree(torch.randn(300, 60))
    fitted = {
        how: MolecularTransform.from_data(zmatrix, frames, torsion_tree=True, tree_smoothing=how)
        for how in ("fixed", "adaptive")
    }
    # 300 frames: every parent bin is sparse, so adaptive smooths each child density wider
    assert fitted["fixed"].conditional_cdf.shape == fitted["adaptive"].conditional_cdf.shape
    assert not torch.equal(fitted["fixed"].conditional_cdf, fitted["adaptive"].conditional_cdf)
    assert_exact_bijection(fitted["adaptive"], (0.2, 0.7, 1.3))
    with pytest.raises(ValueError, match="tree_smoothing must be 'fixed' or 'adaptive'"):
        MolecularTransform.from_data(zmatrix, frames, torsion_tree=True, tree_smoothing="wide")


def test_torsion_tree_checks(zmatrix):
    good = (torch.zeros(60), torch.ones(60), torch.zeros(19))
    parent = torch.full((19,), -1)
    cdf = torch.linspace(0, 1, 5).expand(1, 3, 5)
    child_of_0 = parent.clone().index_fill(0, torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="conditional_cdf is None"):
        MolecularTransform(zmatrix, *good, None, None, child_of_0)
    cyclic = parent.clone()
    cyclic[1], cyclic[2] = 2, 1
    with pytest.raises(ValueError, match="cycle"):
        MolecularTransform(
            zmatrix, *good, None, None, cyclic, torch.linspace(0, 1, 2).expand(2, 3, 2)
        )
    with pytest.raises(ValueError, match="another torsion's index"):
        MolecularTransform(
            zmatrix, *good, None, None, parent.clone().index_fill(0, torch.tensor([3]), 3), cdf
        )
    sign = torch.zeros(19)
    sign[4] = 1
    handed_child = parent.clone().index_fill(0, torch.tensor([4]), 0)
    with pytest.raises(ValueError, match="whole circle"):
        MolecularTransform(
            zmatrix, *good, None, sign, handed_child, torch.linspace(0, 1, 2).expand(1, 3, 2)
        )
    with pytest.raises(ValueError, match=r"conditional_cdf must have shape \(1, P, 2\)"):
        MolecularTransform(zmatrix, *good, None, None, child_of_0, cdf)


@pytest.fixture(scope="module")
def stiff(zmatrix, reference):
    """A transform whose bonds and angles follow the torsions, fitted to 3,000 weighted frames
    in which the first angle's mean and the first bond's spread follow sin(torsion 0)."""
    generator = torch.Generator().manual_seed(5)
    noise = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator)
    ic = InternalCoordinates(zmatrix)
    q = near_reference(ic, reference, 3000, noise)
    n = ic.n_atoms
    leader = 3 * torch.rand(3000, generator=generator, dtype=torch.float64) - 1.5
    q[:, 2 * n - 3] = leader
    q[:, n - 1] = q[0, n - 1] + 0.1 * torch.sin(leader) + 0.03 * noise(3000)
    q[:, 0] = q[0, 0] * torch.exp(0.02 * torch.exp(0.5 * torch.sin(leader)) * noise(3000))
    weights = torch.rand(3000, generator=generator, dtype=torch.float64) + 0.5
    frames = random_rigid_motion(ic.to_cartesian(q)[0])
    fitted = MolecularTransform.from_data(zmatrix, frames, weights=weights, stiff_conditioning=True)
    return fitted, frames, weights, leader


def test_stiff_normalisation_follows_the_torsions(stiff):
    transform, frames, weights, leader = stiff
    s = transform.inverse(frames)
    n = transform.internal.n_atoms
    w = weights / weights.sum()
    # the conditional map leaves the first angle and bond standard normal given the torsion,
    # where the unconditional one leaves their mean and spread following it
    plain = MolecularTransform.from_data(transform.internal.zmatrix, frames, weights=weights)
    s_plain = plain.inverse(frames)
    for values in (s[:, n - 1], s[:, 0]):
        assert abs(w @ values) < 1e-8 and abs(w @ values.square() - 1) < 1e-8
    low, high = leader < -0.75, leader > 0.75
    angle, bond = s[:, n - 1], s[:, 0]
    # (the ridge leaves a few percent of the dependence: 50 pseudo-frames among 2,700 effective)
    shift = abs(angle[low].mean() - angle[high].mean())
    assert shift < 0.15 * abs(s_plain[low, n - 1].mean() - s_plain[high, n - 1].mean())
    assert 0.8 < bond[low].std() / bond[high].std() < 1.25
    assert bond[low].std() / bond[high].std() > 0.8 * s_plain[low, 0].std() / s_plain[high, 0].std()
    assert s_plain[low, 0].std() / s_plain[high, 0].std() < 0.6
    # which shows up as a wider spread of the fitted frames' log-density under the plain map
    log_q = lambda t: (
        -0.5 * t.inverse_and_ladj(frames)[0].square().sum(1) + t.inverse_and_ladj(frames)[1]
    )
    assert w @ log_q(transform) > w @ log_q(plain) + 0.5


def test_stiff_normalisation_round_trip_and_exact_log_det(stiff):
    transform = stiff[0]
    assert transform.stiff_mean.abs().max() > 0.1 and transform.stiff_log_scale.abs().max() > 0.1
    assert_exact_bijection(transform, (-0.5, 0.8, 2.2))
    s = torch.randn(4, 60, requires_grad=True)
    x, ladj = transform.call_and_ladj(s)
    (x.square().sum() + ladj.sum()).backward()
    assert torch.isfinite(s.grad).all()
    x32, _ = transform.call_and_ladj(s.detach().float())
    torch.testing.assert_close(x32.double(), transform(s.detach()), rtol=0, atol=1e-5)


def test_stiff_normalisation_state_dict_and_old_maps(stiff, transform):
    fresh = MolecularTransform.from_data(transform.internal.zmatrix, transform(torch.randn(2, 60)))
    fresh.load_state_dict(stiff[0].state_dict())
    s = torch.randn(8, 60)
    torch.testing.assert_close(fresh.call_and_ladj(s), stiff[0].call_and_ladj(s), rtol=0, atol=0)
    # a map saved before the stiff coordinates followed the torsions loads without it
    old = {
        k: v
        for k, v in transform.state_dict().items()
        if k not in ("stiff_mean", "stiff_log_scale")
    }
    fresh.load_state_dict(old)
    assert not fresh.stiff_mean.any() and not fresh.stiff_log_scale.any()
    torch.testing.assert_close(fresh.call_and_ladj(s), transform.call_and_ladj(s), rtol=0, atol=0)
    with pytest.raises(ValueError, match="stiff_mean must hold finite numbers of shape"):
        MolecularTransform(
            transform.internal.zmatrix,
            transform.shift,
            transform.scale,
            transform.torsion_offset,
            stiff_mean=torch.zeros(3, 3),
        )


def assert_starts_as_and_trains(learned: MolecularTransform, start: MolecularTransform, names):
    """``learned`` is the map ``start`` (to 1e-12), and the gradient of a loss through x and
    the ladj reaches each of its parameters ``names``."""
    s = torch.randn(16, 60)
    torch.testing.assert_close(learned.call_and_ladj(s), start.call_and_ladj(s), rtol=0, atol=1e-12)
    x, ladj = learned.call_and_ladj(s)
    (x.square().sum() + ladj.sum()).backward()
    for name in names:
        assert getattr(learned, name).grad.abs().max() > 0, name


def test_learned_stiff_normalisation_starts_as_the_plain_map_and_trains(stiff):
    """stiff_conditioning="learned": A and B are parameters at zero, the map is the plain one,
    and the gradient of a loss through x and the ladj reaches both."""
    _, frames, weights, _ = stiff
    zmatrix = stiff[0].internal.zmatrix
    plain = MolecularTransform.from_data(zmatrix, frames, weights=weights)
    learned = MolecularTransform.from_data(
        zmatrix, frames, weights=weights, stiff_conditioning="learned"
    )
    named = dict(learned.named_parameters())
    assert set(named) == {"stiff_mean", "stiff_log_scale"}
    assert not learned.stiff_mean.any() and not learned.stiff_log_scale.any()
    # at zero only the ladj's sum of l reaches B: its features' column sums
    assert_starts_as_and_trains(learned, plain, ("stiff_mean", "stiff_log_scale"))


def test_learned_stiff_normalisation_is_exact_and_kept_by_refits(stiff):
    """With nonzero learned A and B the map stays an exact bijection; a refit keeps them and
    fits shift and scale to what they leave: refitting with the regression's own A and B
    gives back the regression's map, so the shift does not count m's mean twice."""
    fitted, frames, weights, _ = stiff
    zmatrix = fitted.internal.zmatrix
    coefficients = (fitted.stiff_mean, fitted.stiff_log_scale)
    refit = MolecularTransform.from_data(
        zmatrix,
        frames,
        weights=weights,
        stiff_conditioning="learned",
        stiff_coefficients=coefficients,
    )
    assert refit.learned_stiff and isinstance(refit.stiff_mean, torch.nn.Parameter)
    torch.testing.assert_close(refit.stiff_mean.detach(), fitted.stiff_mean, rtol=0, atol=0)
    s = torch.randn(32, 60)
    torch.testing.assert_close(refit.call_and_ladj(s), fitted.call_and_ladj(s), rtol=0, atol=1e-10)
    assert_exact_bijection(refit, (0.4, 0.9, -1.3))
    # other coefficients (as training leaves them): the frames are still standard in s
    with torch.no_grad():
        trained = (0.5 * fitted.stiff_mean + 0.01, -0.7 * fitted.stiff_log_scale)
    other = MolecularTransform.from_data(
        zmatrix, frames, weights=weights, stiff_conditioning="learned", stiff_coefficients=trained
    )
    assert_exact_bijection(other, (-1.0, 2.0, 0.3))
    n = other.internal.n_atoms
    s_frames = other.inverse(frames)[:, : 2 * n - 3]
    w = weights / weights.sum()
    torch.testing.assert_close(w @ s_frames, torch.zeros(2 * n - 3), rtol=0, atol=1e-8)
    torch.testing.assert_close(w @ s_frames.square(), torch.ones(2 * n - 3), rtol=0, atol=1e-8)
    # loading a refit's state keeps the parameters themselves (the optimiser holds them)
    kept = refit.stiff_mean
    refit.load_state_dict(other.state_dict())
    assert refit.stiff_mean is kept and torch.equal(kept.detach(), trained[0])
    torch.testing.assert_close(refit.call_and_ladj(s), other.call_and_ladj(s), rtol=0, atol=0)


def test_learned_stiff_normalisation_from_one_structure(zmatrix, reference):
    """The data-free start: zero parameters give the plain one-frame map; given coefficients,
    the reference keeps its place (s = 0) and its spread."""
    plain = MolecularTransform.from_data(zmatrix, reference)
    learned = MolecularTransform.from_data(zmatrix, reference, stiff_conditioning="learned")
    assert learned.learned_stiff and learned._stiff
    s = torch.randn(8, 60)
    torch.testing.assert_close(learned.call_and_ladj(s), plain.call_and_ladj(s), rtol=0, atol=1e-12)
    shape = learned.stiff_mean.shape
    generator = torch.Generator().manual_seed(3)
    a, b = (0.1 * torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in "ab")
    moved = MolecularTransform.from_data(
        zmatrix, reference, stiff_conditioning="learned", stiff_coefficients=(a, b)
    )
    s_reference = moved.inverse(torch.as_tensor(reference).reshape(1, -1))
    assert s_reference.abs().max() < 1e-9
    assert_exact_bijection(moved, (0.2, 1.4, 0.6))
    with pytest.raises(ValueError, match="stiff_conditioning must be False, True"):
        MolecularTransform.from_data(zmatrix, reference, stiff_conditioning="yes")
    with pytest.raises(ValueError, match="only with stiff_conditioning='learned'"):
        MolecularTransform.from_data(zmatrix, reference, stiff_coefficients=(a, b))
    with pytest.raises(ValueError, match=r"stiff_coefficients must be 2 finite arrays"):
        MolecularTransform.from_data(
            zmatrix, reference, stiff_conditioning="learned", stiff_coefficients=(a[:3], b)
        )


def test_learned_stiff_hidden_layer_starts_plain_is_exact_and_kept_by_refits(stiff):
    """stiff_hidden: a tanh layer between the torsions' features and m and l. It starts as
    the linear map (C = E = 0), the loss reaches C and E, the map stays an exact bijection with
    every coefficient nonzero, and a refit keeps all six coefficients (the optimiser's
    parameters) and leaves the frames standard in s."""
    _, frames, weights, _ = stiff
    zmatrix = stiff[0].internal.zmatrix
    linear = MolecularTransform.from_data(
        zmatrix, frames, weights=weights, stiff_conditioning="learned"
    )
    hidden = MolecularTransform.from_data(
        zmatrix, frames, weights=weights, stiff_conditioning="learned", stiff_hidden=8
    )
    assert set(dict(hidden.named_parameters())) == {"stiff_mean", "stiff_log_scale", *STIFF_NETWORK}
    assert hidden.stiff_hidden_weight.shape == (4 * 19, 8)
    assert hidden.stiff_hidden_weight.abs().max() > 0  # W random, so that C and E get gradients
    assert_starts_as_and_trains(hidden, linear, ("stiff_hidden_mean", "stiff_hidden_log_scale"))
    # every coefficient nonzero, as training leaves them
    generator = torch.Generator().manual_seed(11)
    trained = tuple(
        c + 0.05 * torch.randn(c.shape, generator=generator, dtype=torch.float64)
        for c in hidden.stiff_coefficients()
    )
    other = MolecularTransform.from_data(
        zmatrix,
        frames,
        weights=weights,
        stiff_conditioning="learned",
        stiff_hidden=8,
        stiff_coefficients=trained,
    )
    for kept, value in zip(other.stiff_coefficients(), trained, strict=True):
        assert torch.equal(kept, value)
    assert_exact_bijection(other, (0.3, 1.2, -0.4))
    n = other.internal.n_atoms
    s_frames = other.inverse(frames)[:, : 2 * n - 3]
    w = weights / weights.sum()
    torch.testing.assert_close(w @ s_frames, torch.zeros(2 * n - 3), rtol=0, atol=1e-8)
    torch.testing.assert_close(w @ s_frames.square(), torch.ones(2 * n - 3), rtol=0, atol=1e-8)
    # the hidden layer is not a linear function of the features: m of a sum is not the sum
    f = torsion_features(torch.rand(3, 19, dtype=torch.float64) * 6 - 3)
    network = trained[2:]
    m = lambda g: stiff_shift_and_log_scale(g, trained[0], trained[1], network)[0]
    assert (m(f[:1] + f[1:2]) - m(f[:1]) - m(f[1:2]) + m(0 * f[:1])).abs().max() > 1e-3
    # loading a refit's state keeps the parameters the optimiser holds
    held = dict(hidden.named_parameters())
    hidden.load_state_dict(other.state_dict())
    assert all(p is held[name] for name, p in hidden.named_parameters())
    s = torch.randn(16, 60)
    torch.testing.assert_close(hidden.call_and_ladj(s), other.call_and_ladj(s), rtol=0, atol=0)


def test_learned_stiff_hidden_layer_from_one_structure_and_bad_arguments(zmatrix, reference):
    plain = MolecularTransform.from_data(zmatrix, reference)
    hidden = MolecularTransform.from_data(
        zmatrix, reference, stiff_conditioning="learned", stiff_hidden=4
    )
    s = torch.randn(8, 60)
    torch.testing.assert_close(hidden.call_and_ladj(s), plain.call_and_ladj(s), rtol=0, atol=1e-12)
    generator = torch.Generator().manual_seed(2)
    moved = tuple(
        c + 0.1 * torch.randn(c.shape, generator=generator, dtype=torch.float64)
        for c in hidden.stiff_coefficients()
    )
    again = MolecularTransform.from_data(
        zmatrix, reference, stiff_conditioning="learned", stiff_hidden=4, stiff_coefficients=moved
    )
    # the reference keeps its place under the hidden layer too
    assert again.inverse(torch.as_tensor(reference).reshape(1, -1)).abs().max() < 1e-9
    assert_exact_bijection(again, (1.0, 0.5, 2.5))
    with pytest.raises(ValueError, match="needs stiff_conditioning='learned'"):
        MolecularTransform.from_data(zmatrix, reference, stiff_hidden=4)
    with pytest.raises(ValueError, match="stiff_hidden must be a width >= 0"):
        MolecularTransform.from_data(
            zmatrix, reference, stiff_conditioning="learned", stiff_hidden=-1
        )
    with pytest.raises(ValueError, match=r"stiff_coefficients must be 6 finite arrays"):
        MolecularTransform.from_data(
            zmatrix,
            reference,
            stiff_conditioning="learned",
            stiff_hidden=4,
            stiff_coefficients=moved[:2],
        )
    with pytest.raises(ValueError, match="a hidden layer of width 4, not stiff_hidden=5"):
        MolecularTransform.from_data(
            zmatrix,
            reference,
            stiff_conditioning="learned",
            stiff_hidden=5,
            stiff_coefficients=moved,
        )
    with pytest.raises(ValueError, match=r"stiff_network must be four finite arrays"):
        bad = (moved[2], moved[3], moved[4][:, :3], moved[5])
        MolecularTransform.from_data(
            zmatrix,
            reference,
            stiff_conditioning="learned",
            stiff_hidden=4,
            stiff_coefficients=(*moved[:2], *bad),
        )
    with pytest.raises(ValueError, match="it needs learned_stiff"):
        MolecularTransform(
            zmatrix, plain.shift, plain.scale, plain.torsion_offset, stiff_network=moved[2:]
        )
    with pytest.raises(ValueError, match="is not learned: it has no coefficients"):
        plain.stiff_coefficients()


def test_torsion_features_are_the_first_two_harmonics():
    torsion = torch.tensor([[0.3, -1.2]])
    expected = [
        [
            math.cos(0.3),
            math.sin(0.3),
            math.cos(0.6),
            math.sin(0.6),
            math.cos(-1.2),
            math.sin(-1.2),
            math.cos(-2.4),
            math.sin(-2.4),
        ]
    ]
    torch.testing.assert_close(torsion_features(torsion), torch.tensor(expected))


def test_scanned_torsions_follow_the_boltzmann_density_of_the_scan(zmatrix, reference):
    """One frame and an energy: torsion 0's density is exp(-beta E) of its scan, cut at the
    barrier; the map stays exact. A torsion whose scan is flat stays uniform."""
    ic = InternalCoordinates(zmatrix)
    first = 2 * ic.n_atoms - 3
    barrier, beta = 0.5, 0.25

    def energy(x: torch.Tensor) -> torch.Tensor:
        torsion = ic.to_internal(x)[0][:, first]
        return 40 * (1 - torch.cos(torsion - barrier - math.pi))

    scanned = MolecularTransform.from_data(zmatrix, reference, energy=energy, scan_beta=beta)
    cut = math.remainder(scanned.torsion_offset[0].item() - math.pi, 2 * math.pi)
    assert abs(cut - barrier) < 2 * math.pi / 360 + 1e-9
    torsion = ic.to_internal(scanned(torch.randn(20000, 60)))[0][:, first]
    centres = torch.linspace(-math.pi, math.pi, 37)[:-1] + math.pi / 36
    density = torch.exp(-beta * 40 * (1 - torch.cos(centres - barrier - math.pi)))
    expected = 20000 * density / density.sum()
    observed = torch.histc(torsion, 36, -math.pi, math.pi)
    big = expected > 200
    assert ((observed[big] - expected[big]).abs() < 5 * expected[big].sqrt()).all()
    assert observed[expected < 1].sum() < 0.02 * 20000  # the floor and the smoothing's tails
    other = ic.to_internal(scanned(torch.randn(20000, 60)))[0][:, first + 1]
    assert torch.histc(other, 6, -math.pi, math.pi).min() > 0.9 * 20000 / 6
    assert_exact_bijection(scanned, (0.2, 1.4, 0.9))
    with pytest.raises(ValueError, match="scan_beta must be positive"):
        MolecularTransform.from_data(zmatrix, reference, energy=energy, scan_beta=0.0)
