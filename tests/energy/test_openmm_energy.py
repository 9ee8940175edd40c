"""Tests of OpenMMEnergy: exact values and gradients, bad inputs, worker processes."""

from __future__ import annotations

import copy
import math
import os
import signal
import threading
import time

import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from openmmtools import testsystems

from openmm_nice.energy import openmm_contexts
from openmm_nice.energy.openmm_energy import OpenMMEnergy, TorchEnergy, torch_refusal
from openmm_nice.errors import UserInputError


def one_particle_system(expression: str = "x^2 + 2*y + 3*z^2*x") -> openmm.System:
    system = openmm.System()
    system.addParticle(1.0)
    force = openmm.CustomExternalForce(expression)
    force.addParticle(0, [])
    system.addForce(force)
    return system


def exact_one_particle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E = x^2 + 2y + 3z^2 x in kJ/mol and its gradient, for rows (x, y, z)."""
    a, b, c = x.unbind(-1)
    energy = a**2 + 2 * b + 3 * c**2 * a
    gradient = torch.stack([2 * a + 3 * c**2, torch.full_like(b, 2.0), 6 * c * a], dim=-1)
    return energy, gradient


@pytest.fixture(scope="module")
def alanine() -> testsystems.TestSystem:
    return testsystems.AlanineDipeptideVacuum(constraints=None)


@pytest.fixture(scope="module")
def alanine_batch(alanine) -> np.ndarray:
    """Perturbed alanine dipeptide configurations, shape (B, N, 3) in nm."""
    positions = np.asarray(alanine.positions.value_in_unit(unit.nanometer))
    rng = np.random.default_rng(1)
    return positions + 0.01 * rng.standard_normal((37, *positions.shape))


@pytest.fixture(scope="module")
def alanine_reference(alanine, alanine_batch) -> tuple[np.ndarray, np.ndarray]:
    """Energies (kJ/mol) and forces (kJ/mol/nm) from a plain OpenMM Context."""
    context = openmm.Context(
        alanine.system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    energies, forces = [], []
    for positions in alanine_batch:
        context.setPositions(positions * unit.nanometer)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        forces.append(
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        )
    return np.array(energies), np.array(forces)


@pytest.fixture(scope="module")
def alanine_two_workers(alanine):
    with OpenMMEnergy(alanine.system, 300 * unit.kelvin, n_workers=2) as energy:
        yield energy


def check_alanine(energy: OpenMMEnergy, batch: np.ndarray, reference, dtype=torch.float64):
    x = torch.tensor(batch.reshape(len(batch), -1), dtype=dtype, requires_grad=True)
    u = energy(x)
    u.sum().backward()
    assert u.shape == (len(batch),) and u.dtype == dtype and x.grad.dtype == dtype
    energies, forces = reference
    tolerance = 1e-6 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(u.detach().double().numpy() * energy.kT, energies, rtol=tolerance)
    gradient = x.grad.double().numpy().reshape(forces.shape) * energy.kT
    scale = np.abs(forces).max()
    np.testing.assert_allclose(gradient, -forces, rtol=tolerance, atol=tolerance * scale)


# --- values and gradients -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_particle_exact(dtype):
    energy = OpenMMEnergy(one_particle_system(), temperature=250.0)
    assert energy.dim == 3
    x = torch.tensor([[1.0, 2.0, 3.0], [-0.5, 0.25, -1.5], [0.0, 0.0, 0.0]], dtype=dtype)
    x.requires_grad_(True)
    u = energy(x)
    u.backward(torch.tensor([1.0, 2.0, -1.0], dtype=dtype))
    exact, gradient = exact_one_particle(x.detach().double())
    kT = (unit.MOLAR_GAS_CONSTANT_R * 250 * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
    assert energy.kT == pytest.approx(kT, rel=1e-15)
    assert u.dtype == dtype and x.grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(u.double(), exact / kT, rtol=tolerance, atol=tolerance)
    weights = torch.tensor([1.0, 2.0, -1.0])[:, None]
    torch.testing.assert_close(x.grad.double(), weights * gradient / kT, rtol=tolerance, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype):
    energy = OpenMMEnergy(one_particle_system(), temperature=300.0)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=dtype, requires_grad=True)
    u = energy(x)
    u.backward()
    assert u.dtype == dtype and x.grad.dtype == dtype
    exact, gradient = exact_one_particle(x.detach().double())
    torch.testing.assert_close(u.double(), exact / energy.kT, rtol=1e-2, atol=0.0)
    torch.testing.assert_close(x.grad.double(), gradient / energy.kT, rtol=1e-2, atol=0.0)


def test_one_particle_gradcheck():
    energy = OpenMMEnergy(one_particle_system(), temperature=300.0)
    x = torch.tensor([[0.3, -0.2, 0.7], [1.1, 0.4, -0.9]], requires_grad=True)
    assert torch.autograd.gradcheck(energy, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_alanine_matches_context(alanine, alanine_batch, alanine_reference):
    energy = OpenMMEnergy(alanine.system, 300 * unit.kelvin)
    assert energy.dim == 66 and energy.n_particles == 22
    check_alanine(energy, alanine_batch, alanine_reference)
    check_alanine(energy, alanine_batch, alanine_reference, dtype=torch.float32)


def test_alanine_gradient_against_finite_differences(alanine, alanine_batch):
    energy = OpenMMEnergy(alanine.system, 300.0)
    x = torch.tensor(alanine_batch[:2].reshape(2, -1), requires_grad=True)
    assert torch.autograd.gradcheck(energy, (x,), eps=1e-6, atol=1e-4, rtol=1e-5)


def test_two_workers_match_context(alanine_two_workers, alanine_batch, alanine_reference):
    check_alanine(alanine_two_workers, alanine_batch, alanine_reference)
    assert len(alanine_two_workers.worker_pids) == 1


def test_two_workers_any_batch_size(alanine_two_workers, alanine_batch, alanine_reference):
    """Batches smaller than, equal to and larger than the shared buffer so far."""
    energies, forces = alanine_reference
    for size in (1, 2, 5, 37, 3):
        check_alanine(alanine_two_workers, alanine_batch[:size], (energies[:size], forces[:size]))
    empty = alanine_two_workers(torch.zeros(0, 66))
    assert empty.shape == (0,)


def test_two_threads_sharing_one_energy_get_their_own_energies(
    alanine_two_workers, alanine_batch, alanine_reference
):
    # each thread evaluates its own half, over and over: with the shared block unguarded, one
    # thread's batch would land in the other's results
    import threading

    energies = alanine_reference[0]
    halves = (slice(0, 18), slice(18, 37))
    failures = []

    def work(half: slice) -> None:
        x = torch.tensor(alanine_batch[half].reshape(-1, 66))
        for _ in range(20):
            with torch.no_grad():
                u = alanine_two_workers(x).numpy() * alanine_two_workers.kT
            if not np.allclose(u, energies[half], rtol=1e-6):
                failures.append(half)

    threads = [threading.Thread(target=work, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures and not any(t.is_alive() for t in threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX")
def test_a_forked_child_starts_its_own_pool(alanine, alanine_batch, alanine_reference):
    energy = OpenMMEnergy(alanine.system, 300 * unit.kelvin, n_workers=2)
    x = torch.tensor(alanine_batch.reshape(len(alanine_batch), -1))
    with torch.no_grad():
        before = energy(x).numpy()  # the parent's workers are running now
    parent_workers = energy.worker_pids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: evaluate with a pool of its own, report, and leave at once
        code = 1
        try:
            with torch.no_grad():
                u = energy(x).numpy()
            ok = np.allclose(u * energy.kT, alanine_reference[0], rtol=1e-6)
            own = set(energy.worker_pids).isdisjoint(parent_workers)
            energy.close()
            code = 0 if ok and own else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    result = os.read(read, 1)
    os.waitpid(pid, 0)
    assert result == bytes([0])
    # the parent's pool is untouched by the child's
    assert energy.worker_pids == parent_workers
    with torch.no_grad():
        np.testing.assert_array_equal(energy(x).numpy(), before)
    energy.close()


def test_grad_not_required(alanine_two_workers, alanine_batch, alanine_reference):
    with torch.no_grad():
        u = alanine_two_workers(torch.tensor(alanine_batch.reshape(len(alanine_batch), -1)))
    np.testing.assert_allclose(u.numpy() * alanine_two_workers.kT, alanine_reference[0], rtol=1e-6)


def test_public_api_fallback_agrees(monkeypatch, alanine, alanine_batch, alanine_reference):
    """The path for OpenMM releases without the in-place force reader gives the same numbers."""
    monkeypatch.setattr(openmm_contexts, "_get_vector_as_numpy", None)
    check_alanine(OpenMMEnergy(alanine.system, 300.0), alanine_batch, alanine_reference)


@pytest.mark.parametrize("batching", ["auto", "loop"])
def test_cpu_platform(batching, alanine, alanine_batch, alanine_reference):
    energy = OpenMMEnergy(alanine.system, 300.0, platform="cpu", batching=batching, copies=3)
    assert energy.platform == "CPU" and "Threads" in energy.platform_properties
    assert energy.batching == ("copies" if batching == "auto" else "loop")
    check_alanine(energy, alanine_batch[:4], tuple(a[:4] for a in alanine_reference))


def _has_cuda() -> tuple[bool, str]:
    platforms = openmm_contexts.available_platforms()
    if "CUDA" not in platforms:
        return False, f"OpenMM has no CUDA platform here (platforms: {platforms})"
    if not torch.cuda.is_available():
        return False, "torch sees no GPU"
    return True, ""


@pytest.mark.skipif(not _has_cuda()[0], reason=_has_cuda()[1])
@pytest.mark.parametrize("n_workers", [1, 2])
def test_cuda_platform(n_workers, alanine, alanine_batch, alanine_reference):
    with OpenMMEnergy(alanine.system, 300.0, platform="CUDA", n_workers=n_workers) as energy:
        assert energy.platform_properties["Precision"] == "double"
        check_alanine(energy, alanine_batch, alanine_reference)
        x = torch.tensor(alanine_batch.reshape(len(alanine_batch), -1), device="cuda")
        x.requires_grad_(True)
        u = energy(x)
        u.sum().backward()
        assert u.device == x.device and x.grad.device == x.device
        np.testing.assert_allclose(
            u.detach().cpu().numpy() * energy.kT, alanine_reference[0], rtol=1e-6
        )


# --- batching ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alanine_copies_two_workers(alanine):
    with OpenMMEnergy(alanine.system, 300.0, n_workers=2, batching="copies", copies=4) as energy:
        yield energy


@pytest.mark.parametrize("copies", [1, 8, 64])
def test_copies_match_context(copies, alanine, alanine_batch, alanine_reference):
    """37 rows: one copy per call, 5 calls of 8 with the last padded, one call of 64 padded."""
    energy = OpenMMEnergy(alanine.system, 300.0, batching="copies", copies=copies)
    assert (energy.batching, energy.copies) == ("copies", copies)
    check_alanine(energy, alanine_batch, alanine_reference)
    check_alanine(energy, alanine_batch, alanine_reference, dtype=torch.float32)


def test_copies_two_workers(alanine_copies_two_workers, alanine_batch, alanine_reference):
    energies, forces = alanine_reference
    for size in (37, 1, 4, 5, 9):
        check_alanine(
            alanine_copies_two_workers, alanine_batch[:size], (energies[:size], forces[:size])
        )
    assert len(alanine_copies_two_workers.worker_pids) == 1


def test_copies_public_api_fallback(monkeypatch, alanine, alanine_batch, alanine_reference):
    monkeypatch.setattr(openmm_contexts, "_get_vector_as_numpy", None)
    energy = OpenMMEnergy(alanine.system, 300.0, batching="copies", copies=8)
    check_alanine(energy, alanine_batch[:11], tuple(a[:11] for a in alanine_reference))


def test_auto_batching(alanine):
    """auto: the mode measured faster per platform; torch for a GB System on the host
    platforms; loop for a System that neither torch nor copies can evaluate."""
    assert OpenMMEnergy(alanine.system, 300.0).batching == "loop"
    energy = OpenMMEnergy(alanine.system, 300.0, platform="CPU")
    assert (energy.batching, energy.copies) == ("copies", 32)
    system = copy.deepcopy(alanine.system)
    gbsa = openmm.GBSAOBCForce()
    for _ in range(system.getNumParticles()):
        gbsa.addParticle(0.0, 0.15, 1.0)
    system.addForce(gbsa)
    for platform in ("Reference", "CPU"):
        energy = OpenMMEnergy(system, 300.0, platform=platform)
        assert (energy.batching, energy.copies, energy.compile_after) == ("torch", None, 30.0)
    with pytest.raises(ValueError, match=r"GBSAOBCForce\) cannot be replicated.*'loop'"):
        OpenMMEnergy(system, 300.0, batching="copies")
    external = openmm.CustomExternalForce("x")
    external.addParticle(0, [])
    system.addForce(external)
    with pytest.warns(UserWarning) as record:  # each fallback says so, and why
        energy = OpenMMEnergy(system, 300.0, platform="CPU")
    assert (energy.batching, energy.copies, energy.compile_after) == ("loop", None, None)
    messages = [str(w.message) for w in record]
    assert any(
        "instead of the batched torch path" in m and "CustomExternalForce" in m for m in messages
    )
    assert any("instead of as copies" in m for m in messages)


@pytest.mark.parametrize(
    "keywords, error, match",
    [
        ({"batching": "vectorised"}, ValueError, "batching must be one of.*'vectorised'"),
        ({"copies": 0}, ValueError, "copies must be at least 1, got 0"),
        ({"copies": 2.0}, TypeError, "copies must be an int"),
        ({"compile_after": -1.0}, ValueError, "compile_after must be >= 0 seconds or None"),
        ({"compile_after": "soon"}, ValueError, "compile_after must be >= 0 seconds or None"),
    ],
)
def test_bad_batching(keywords, error, match):
    with pytest.raises(error, match=match):
        OpenMMEnergy(one_particle_system(), 300.0, **keywords)


# --- clashes and non-finite input ------------------------------------------------------------


@pytest.mark.parametrize("batching", ["loop", "copies"])
def test_clash_gives_infinite_energy_and_zero_gradient(
    batching, alanine, alanine_batch, alanine_reference
):
    batch = alanine_batch[:4].copy()
    batch[1, 5] = batch[1, 0]  # two atoms on top of each other: OpenMM returns NaN
    energy = OpenMMEnergy(alanine.system, 300.0, batching=batching, copies=4)
    x = torch.tensor(batch.reshape(4, -1), requires_grad=True)
    u = energy(x)
    u.sum().backward()
    assert math.isinf(u[1].item()) and u[1].item() > 0
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()
    assert int(energy.non_finite_energy_count) == 1
    keep = [0, 2, 3]
    np.testing.assert_allclose(
        u.detach().numpy()[keep] * energy.kT, alanine_reference[0][keep], rtol=1e-6
    )


@pytest.mark.filterwarnings("error::RuntimeWarning")  # inf - inf in a batch is expected
@pytest.mark.parametrize("workers", ["alanine_two_workers", "alanine_copies_two_workers"])
def test_non_finite_coordinates_are_counted(workers, alanine_batch, request):
    energy = request.getfixturevalue(workers)
    x = torch.tensor(alanine_batch[:9].reshape(9, -1))
    x[0, 4] = math.nan
    x[2, 0] = math.inf
    x[2, 1] = -math.inf
    x.requires_grad_(True)
    before = int(energy.non_finite_count)
    u = energy(x)
    u.sum().backward()
    assert torch.isinf(u[[0, 2]]).all() and torch.isfinite(u[1]) and torch.isfinite(u[3:]).all()
    assert torch.isfinite(x.grad).all()
    assert int(energy.non_finite_count) == before + 2


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.zeros(2, 65), ValueError, r"\(B, 66\).*\(2, 65\)"),
        (torch.zeros(66), ValueError, r"\(66,\)"),
        (torch.zeros(2, 66, dtype=torch.int64), TypeError, "floating-point"),
        (np.zeros((2, 66)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_coordinates(alanine, x, error, match):
    energy = OpenMMEnergy(alanine.system, 300.0)
    with pytest.raises(error, match=match):
        energy(x)


@pytest.mark.parametrize(
    "temperature, error, match",
    [
        (300 * unit.nanometer, TypeError, "nanometer"),
        ("300", TypeError, "'300'"),
        (-5.0, ValueError, "-5.0"),
        (math.nan, ValueError, "positive"),
    ],
)
def test_bad_temperature(temperature, error, match):
    with pytest.raises(error, match=match):
        OpenMMEnergy(one_particle_system(), temperature)


def test_temperature_units():
    energy = OpenMMEnergy(one_particle_system(), 300 * unit.kelvin)
    assert energy.temperature == 300.0 * unit.kelvin
    assert energy.kT == pytest.approx(2.494338785, rel=1e-9)
    assert OpenMMEnergy(one_particle_system(), 300).kT == energy.kT


def test_not_a_system():
    with pytest.raises(TypeError, match="openmm.System, got str"):
        OpenMMEnergy("system.xml", 300.0)


def test_constraints_refused_unless_removed(alanine, alanine_batch, alanine_reference):
    constrained = testsystems.AlanineDipeptideVacuum(constraints=openmm.app.HBonds).system
    with pytest.raises(ValueError, match="constraints=None.*remove_constraints=True"):
        OpenMMEnergy(constrained, 300.0)
    system = copy.deepcopy(alanine.system)
    system.addConstraint(0, 1, 0.109)
    with pytest.warns(UserWarning, match="removing 1 constraints"):
        energy = OpenMMEnergy(system, 300.0, remove_constraints=True)
    assert energy.system.getNumConstraints() == 0 and system.getNumConstraints() == 1
    check_alanine(energy, alanine_batch[:3], tuple(a[:3] for a in alanine_reference))


def test_virtual_sites_refused():
    system = one_particle_system()
    system.addParticle(0.0)
    system.addParticle(1.0)
    system.setVirtualSite(1, openmm.TwoParticleAverageSite(0, 2, 0.5, 0.5))
    with pytest.raises(ValueError, match="1 virtual sites"):
        OpenMMEnergy(system, 300.0)


def test_periodic_refused():
    system = one_particle_system()
    force = openmm.NonbondedForce()
    force.addParticle(0.0, 0.3, 1.0)
    force.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    system.addForce(force)
    with pytest.raises(ValueError, match="periodic boundary conditions"):
        OpenMMEnergy(system, 300.0)


def test_bad_platform():
    with pytest.raises(ValueError, match="'Nonexistent' is not available.*Reference"):
        OpenMMEnergy(one_particle_system(), 300.0, platform="Nonexistent")
    with pytest.raises(ValueError, match=r"unknown properties \['Colour'\]"):
        OpenMMEnergy(one_particle_system(), 300.0, platform_properties={"Colour": "red"})
    with pytest.raises(TypeError, match="dict"):
        OpenMMEnergy(one_particle_system(), 300.0, platform_properties=["Threads"])


@pytest.mark.parametrize("n_workers, error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_n_workers(n_workers, error):
    with pytest.raises(error, match="n_workers"):
        OpenMMEnergy(one_particle_system(), 300.0, n_workers=n_workers)


# --- worker processes ------------------------------------------------------------------------


def test_close_and_context_manager():
    x = torch.tensor([[0.5, 0.5, 0.5]])
    with OpenMMEnergy(one_particle_system(), 300.0, n_workers=2) as energy:
        assert energy.worker_pids == []  # started on the first call
        energy(torch.cat([x, x]))
        (pid,) = energy.worker_pids
    assert energy.worker_pids == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    energy(torch.cat([x, x]))  # a closed energy starts again
    assert len(energy.worker_pids) == 1
    clone = copy.deepcopy(energy)
    assert clone.worker_pids == []
    torch.testing.assert_close(clone(x), energy(x))
    energy.close()
    clone.close()


def test_dead_worker_raises_then_recovers(alanine_two_workers, alanine_batch, alanine_reference):
    energy = alanine_two_workers
    check_alanine(energy, alanine_batch[:4], tuple(a[:4] for a in alanine_reference))
    (pid,) = energy.worker_pids
    os.kill(pid, signal.SIGKILL)
    x = torch.tensor(alanine_batch[:4].reshape(4, -1))
    with pytest.raises(RuntimeError, match=f"pid {pid}.*died.*restarted"):
        energy(x)
    assert energy.worker_pids == []
    check_alanine(energy, alanine_batch, alanine_reference)
    assert energy.worker_pids != [pid]


def test_workers_leave_ctrl_c_and_sigterm_to_the_caller(
    alanine_two_workers, alanine_batch, alanine_reference
):
    """A signal to the whole process group (Ctrl-C, a scheduler's SIGTERM) does not kill the
    workers under a caller that stops between steps: they keep evaluating until it closes them."""
    energy = alanine_two_workers
    check_alanine(energy, alanine_batch[:4], tuple(a[:4] for a in alanine_reference))
    (pid,) = energy.worker_pids
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    check_alanine(energy, alanine_batch, alanine_reference)
    assert energy.worker_pids == [pid]


def test_worker_killed_during_batch(alanine_two_workers, alanine_batch):
    energy = alanine_two_workers
    energy(torch.tensor(alanine_batch[:2].reshape(2, -1)))
    (pid,) = energy.worker_pids
    x = torch.tensor(np.tile(alanine_batch.reshape(len(alanine_batch), -1), (1000, 1)))
    killer = threading.Timer(0.05, os.kill, (pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="died"):
        energy(x)
    killer.join()
    assert time.monotonic() - start < 30
    u = energy(x[:5])
    assert torch.isfinite(u).all()


def test_workers_start_from_a_script_without_a_main_guard(tmp_path):
    """'spawn' re-runs the caller's __main__ in each child; the workers must not."""
    import subprocess
    import sys

    script = tmp_path / "plain.py"
    script.write_text(
        "import torch\n"
        "from openmm_nice import OpenMMEnergy, alanine_dipeptide_vacuum\n"
        "m = alanine_dipeptide_vacuum()\n"
        "e = OpenMMEnergy(m.system, 300.0, n_workers=2, batching='loop')\n"
        "x = torch.tensor(m.positions.reshape(1, -1)).repeat(64, 1)\n"
        "u = e(x)\n"
        "print('ok', len(e.worker_pids), float(u.std()))\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "1", "0.0"]


def test_a_release_without_the_private_swig_calls_takes_the_public_methods():
    # as if OpenMM renamed one of the private functions: the import works, and so do energies
    script = """
import openmm
del openmm._openmm.State_getEnergyParameterDerivatives
from openmm import unit
from openmmtools import testsystems
from openmm_nice.energy import openmm_contexts
from openmm_nice.energy.openmm_energy import OpenMMEnergy
import torch
assert openmm_contexts._get_vector_as_numpy is None
alanine = testsystems.AlanineDipeptideVacuum(constraints=None)
x = torch.tensor(alanine.positions.value_in_unit(unit.nanometer)).reshape(1, -1)
with OpenMMEnergy(alanine.system, 300.0) as energy:
    print(float(energy(x)[0]))
"""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    alanine = testsystems.AlanineDipeptideVacuum(constraints=None)
    positions = torch.tensor(alanine.positions.value_in_unit(unit.nanometer)).reshape(1, -1)
    with OpenMMEnergy(alanine.system, 300.0) as energy:
        expected = float(energy(positions)[0])
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-12)


# --- the torch engine: the same contract in the calling process ------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_engine_matches_a_context(dtype, alanine, alanine_batch, alanine_reference):
    energy = TorchEnergy(alanine.system, 300 * unit.kelvin)
    x = torch.tensor(alanine_batch.reshape(len(alanine_batch), -1), dtype=dtype)
    x.requires_grad_(True)
    u = energy(x)
    u.sum().backward()
    assert u.dtype == dtype and x.grad.dtype == dtype and energy.evaluation_count == len(x)
    energies, forces = alanine_reference
    # float64 to 1e-8 relative (issue 32); float32 positions are rounded before the float64
    # evaluation, as OpenMMEnergy's are (its tolerance in check_alanine)
    tolerance = 1e-8 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(u.detach().double().numpy() * energy.kT, energies, rtol=tolerance)
    gradient = -x.grad.double().numpy().reshape(forces.shape) * energy.kT
    scale = np.abs(forces).max()
    np.testing.assert_allclose(gradient / scale, forces / scale, atol=tolerance)


def test_torch_engine_has_no_state_and_counts_non_finite_rows(alanine, alanine_batch):
    energy = TorchEnergy(alanine.system, 300.0)
    assert energy.state_dict() == {}  # a model saves the same state dict with either engine
    x = torch.tensor(alanine_batch[:3].reshape(3, -1))
    x[1, 0] = math.nan
    x[2, 63:66] = x[2, :3]  # two atoms that interact (the first and the last) on top of each other
    u = energy(x)
    assert math.isfinite(u[0]) and u[1] == math.inf and u[2] == math.inf
    assert energy.non_finite_total == 2


def test_torch_engine_refuses_a_force_by_name():
    system = one_particle_system()
    reason = torch_refusal(system)
    assert reason is not None and "CustomExternalForce" in reason
    with pytest.raises(UserInputError, match="CustomExternalForce"):
        TorchEnergy(system, 300.0)
    assert torch_refusal(testsystems.AlanineDipeptideImplicit(constraints=None).system) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_torch_engine_on_cuda(alanine, alanine_batch, alanine_reference):
    energy = TorchEnergy(alanine.system, 300.0).to("cuda")
    x = torch.tensor(alanine_batch.reshape(len(alanine_batch), -1), device="cuda")
    u = energy(x)
    assert u.device.type == "cuda"
    np.testing.assert_allclose(u.cpu().numpy() * energy.kT, alanine_reference[0], rtol=1e-8)
