"""The generator's Metropolis-Hastings move: exact chains on toys, and the openmmtools move."""

from __future__ import annotations

import copy
import math

import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from pymbar.timeseries import statistical_inefficiency_multiple

from openmm_nice import BoltzmannGenerator, BoltzmannGeneratorMove, DoubleWell1D, OpenMMEnergy
from openmm_nice.molecule.internal_coordinates import InternalCoordinates
from openmm_nice.molecule.zmatrix import build_zmatrix
from openmm_nice.runs import load_run
from openmm_nice.sampling.mala import mala_proposal_log_ratio
from openmm_nice.sampling.moves import (
    SeededLangevinDynamicsMove,
    cache,
    independence_metropolis,
    mcmc,
    run_chain,
    states,
)
from openmm_nice.training.trainer import Trainer

EXACT_LEFT = 0.93273  # P(x < 0) of the note's double well, DoubleWell1D().probability_below(0, 0)


def probability_below_zero(beta: float) -> float:
    """P(x < 0) under exp(-beta (x^4 - 4x^2 + x)), by quadrature."""
    x = np.linspace(-6.0, 6.0, 400_001)
    density = np.exp(-beta * DoubleWell1D.potential(x) - 10.0)
    return float(np.trapezoid(density * (x < 0), x) / np.trapezoid(density, x))


def poor_model(energy, latent_dim: int | None, steps: int = 20) -> BoltzmannGenerator:
    """A float64 generator trained for a few steps: it misplaces the wells' masses."""
    torch.manual_seed(0)
    bg = BoltzmannGenerator(
        energy, latent_dim=latent_dim, layers=2, hidden=[16], conditional_hidden=[16]
    ).double()
    Trainer(
        bg,
        steps=steps,
        batch_size=256,
        beta_start=1.0,
        anneal_steps=0,
        reweighted_fkl_weight=0.0,
        seed=0,
    ).run()
    return bg.eval()


@pytest.fixture(scope="module")
def poor_models() -> dict:
    return {latent_dim: poor_model(DoubleWell1D(), latent_dim) for latent_dim in (None, 2)}


def mala_step(energy, x, u, step: float, rng: torch.Generator):
    """One Metropolis-adjusted Langevin step of each chain, with a fixed step size."""

    def gradient(points):
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(points).sum(), points)
        return grad

    grad = gradient(x)
    noise = torch.randn(x.shape, generator=rng)
    x_new = x - step * grad + math.sqrt(2 * step) * noise
    u_new, grad_new = energy(x_new), gradient(x_new)
    log_a = -(u_new - u) + mala_proposal_log_ratio(x, x_new, -grad, -grad_new, step)
    accept = torch.log(torch.rand(len(x), generator=rng)) < log_a
    return torch.where(accept[:, None], x_new, x), torch.where(accept, u_new, u)


def run_toy_chains(
    bg,
    n_chains,
    n_iterations,
    proposals=1,
    mala_steps=0,
    beta=1.0,
    start=1.3,
    seed=1,
    refresh_chunk=4,
):
    """Chains from x = start of ``proposals`` steps of the move then ``mala_steps`` MALA steps
    per iteration; returns x after each iteration, shape (n_iterations, n_chains)."""
    rng = torch.Generator().manual_seed(seed)
    energy = lambda points: beta * bg.energy(points)
    x = torch.full((n_chains, 1), start)
    u = energy(x)
    trace = np.empty((n_iterations, n_chains))
    for i in range(n_iterations):
        x, u, _ = independence_metropolis(bg, x, u, energy, proposals, rng, refresh_chunk)
        for _ in range(mala_steps):
            x, u = mala_step(energy, x, u, 0.02, rng)
        trace[i] = x[:, 0].numpy()
    return trace


def check_population(inside: np.ndarray, exact: float) -> float:
    """Assert that chains (steps, chains) of the indicator x < 0 estimate ``exact`` within
    3 standard errors (from their integrated autocorrelation time); return the error."""
    g = statistical_inefficiency_multiple([inside[:, k] for k in range(inside.shape[1])])
    p = inside.mean()
    error = math.sqrt(p * (1 - p) * g / inside.size)
    assert abs(p - exact) < 3 * error, (p, exact, error)
    return error


def test_exact_population_of_the_toy():
    assert probability_below_zero(1.0) == pytest.approx(
        DoubleWell1D().probability_below(0, 0.0), abs=1e-6
    )
    assert probability_below_zero(1.0) == pytest.approx(EXACT_LEFT, abs=1e-5)


@pytest.mark.parametrize(
    "latent_dim, proposals, mala_steps, beta, refresh_chunk",
    [
        (None, 1, 0, 1.0, 4),
        (2, 1, 0, 1.0, 4),
        (2, 4, 0, 1.0, 4),  # several steps per call: batched proposals and refreshes of y
        # fresh y drawn one step ahead: chains that stay get theirs from later batches
        (2, 6, 0, 1.0, 1),
        (None, 1, 2, 1.0, 4),
        (2, 1, 2, 1.0, 4),
        (2, 1, 0, 0.75, 4),
    ],
)
def test_chains_of_a_poor_model_reproduce_the_exact_population(
    poor_models, latent_dim, proposals, mala_steps, beta, refresh_chunk
):
    bg = poor_models[latent_dim]
    trace = run_toy_chains(bg, 64, 300, proposals, mala_steps, beta, refresh_chunk=refresh_chunk)
    exact = probability_below_zero(beta)
    error = check_population((trace[50:] < 0).astype(float), exact)
    # the test has power: the model's own draws miss the answer by many such errors
    x, _ = bg.sample(20000, rng=torch.Generator().manual_seed(2))
    assert abs(float((x < 0).double().mean()) - exact) > 5 * error
    assert error < 0.012


def test_a_chain_started_in_the_wrong_well_visits_both_within_100_moves(poor_models):
    trace = run_toy_chains(poor_models[2], n_chains=16, n_iterations=100, start=1.3)
    assert (trace < 0).any(axis=0).all()  # every chain, started right, reached the left well


def test_a_proposal_replaces_a_chain_stuck_at_an_infinite_energy(poor_models):
    bg = poor_models[2]
    x = torch.full((8, 1), math.nan)
    x, u, accepted = independence_metropolis(bg, x, torch.full((8,), math.inf), bg.energy)
    assert (accepted == 1).all() and torch.isfinite(u).all() and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="n_steps"):
        independence_metropolis(bg, x, u, bg.energy, n_steps=0)
    with pytest.raises(ValueError, match="refresh_chunk"):
        independence_metropolis(bg, x, u, bg.energy, refresh_chunk=0)


# The openmmtools move on an OpenMM system: one particle in the double well


def one_particle_double_well(kt: float) -> openmm.System:
    """E = kT (x^4 - 4x^2 + x + (y^2 + z^2) / 2) in kJ/mol with x, y, z in nm."""
    system = openmm.System()
    system.addParticle(1.0)
    force = openmm.CustomExternalForce("energy_scale * (x^4 - 4*x^2 + x + 0.5*(y^2 + z^2))")
    force.addGlobalParameter("energy_scale", kt)
    force.addParticle(0, [])
    system.addForce(force)
    return system


@pytest.fixture(scope="module")
def particle():
    """The one-particle System at 300 K and a poor Cartesian model of it (D = d = 3)."""
    energy = OpenMMEnergy(one_particle_double_well(1.0), 300.0)
    system = one_particle_double_well(energy.kT)
    return system, poor_model(OpenMMEnergy(system, 300.0), None)


@pytest.mark.parametrize("langevin", [False, True])
def test_openmmtools_chains_reproduce_the_population_at_another_temperature(particle, langevin):
    system, bg = particle
    move = BoltzmannGeneratorMove(bg, n_proposals=4, seed=3)
    moves = [move]
    if langevin:
        dynamics = SeededLangevinDynamicsMove(
            seed=5, timestep=5 * unit.femtosecond, collision_rate=10 / unit.picosecond, n_steps=10
        )
        moves.insert(0, dynamics)
    thermodynamic_state = states.ThermodynamicState(system, 600 * unit.kelvin)
    sampler_state = states.SamplerState(np.array([[1.3, 0.0, 0.0]]) * unit.nanometer)
    sampler = mcmc.MCMCSampler(thermodynamic_state, sampler_state, mcmc.SequenceMove(moves))
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))
    trace = np.empty(2000)
    for i in range(len(trace)):
        sampler.run(1, context_cache=context_cache)
        trace[i] = sampler.sampler_state.positions[0, 0].value_in_unit(unit.nanometer)
    error = check_population((trace[50:, None] < 0).astype(float), probability_below_zero(0.5))
    # at the training temperature the answer differs by many errors: U is the state's
    assert abs(probability_below_zero(1.0) - probability_below_zero(0.5)) > 5 * error
    assert move.n_proposed == 4 * len(trace) and 0 < move.fraction_accepted < 1


# The openmmtools move on alanine dipeptide


@pytest.fixture(scope="module")
def alanine(alanine_run):
    _, target, _ = load_run(alanine_run)
    return target.molecule


def test_an_accepted_proposal_keeps_the_rigid_placement(alanine_run, alanine):
    move = BoltzmannGeneratorMove(alanine_run, n_proposals=1, seed=0)
    internal = InternalCoordinates(build_zmatrix(alanine.topology))  # the run's own Z-matrix
    frame = set(internal.zmatrix[:3, 0].tolist())
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    rotation *= np.linalg.det(rotation)  # a proper rotation
    positions = np.array(alanine.positions) @ rotation.T + [1.0, -2.0, 0.5]
    moved_atom = next(a for a in range(alanine.n_atoms) if a not in frame)
    positions[moved_atom] = positions[next(iter(frame))]  # a clash: any finite proposal wins
    sampler_state = states.SamplerState(positions * unit.nanometer)
    thermodynamic_state = states.ThermodynamicState(alanine.system, 300 * unit.kelvin)
    move.apply(thermodynamic_state, sampler_state, cache.ContextCache())
    assert move.statistics == {"n_accepted": 1, "n_proposed": 1}
    new = np.asarray(sampler_state.positions.value_in_unit(unit.nanometer))
    old_q, new_q = (
        internal.to_internal(torch.as_tensor(p).reshape(1, -1))[0] for p in (positions, new)
    )
    assert (old_q - new_q).abs().max() > 0.1  # the internal coordinates changed
    for before, after in zip(
        internal.rigid_motion(torch.as_tensor(positions).reshape(1, -1)),
        internal.rigid_motion(torch.as_tensor(new).reshape(1, -1)),
        strict=True,
    ):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-9)


def test_the_move_refuses_another_system_and_non_openmm_generators(alanine_run, alanine):
    move = BoltzmannGeneratorMove(alanine_run)
    system = copy.deepcopy(alanine.system)
    system.getForce(0).setBondParameters(0, *system.getForce(0).getBondParameters(0)[:2], 0.2, 1e5)
    sampler_state = states.SamplerState(alanine.positions * unit.nanometer)
    with pytest.raises(ValueError, match="not the one the generator was trained on"):
        move.apply(states.ThermodynamicState(system, 300 * unit.kelvin), sampler_state)
    with pytest.raises(TypeError, match="OpenMM system"):
        BoltzmannGeneratorMove(BoltzmannGenerator(DoubleWell1D()))
    with pytest.raises(ValueError, match="n_proposals"):
        BoltzmannGeneratorMove(alanine_run, n_proposals=0)


def test_serialisation_stores_the_run_and_the_statistics(alanine_run, tmp_path):
    from openmmtools.utils import deserialize, serialize

    move = BoltzmannGeneratorMove(alanine_run, n_proposals=3, seed=11)
    move.statistics = {"n_accepted": 2, "n_proposed": 9}
    restored = deserialize(serialize(move))
    assert isinstance(restored, BoltzmannGeneratorMove)
    assert (restored.run, restored.n_proposals, restored.seed) == (move.run, 3, 11)
    assert restored.statistics == move.statistics and restored.fraction_accepted == 2 / 9
    # copies share the model and draw their own seeds
    twin = copy.deepcopy(move)
    assert twin._generator is move._generator and twin.seed != move.seed
    with pytest.raises(ValueError, match="cannot be serialised"):
        serialize(BoltzmannGeneratorMove(load_run(alanine_run)[2]))
    stored = serialize(move)
    stored["run"] = str(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"another model")
    with pytest.raises(ValueError, match="changed since this move was stored"):
        deserialize(stored)


def test_sequence_of_langevin_and_the_move_in_an_mcmc_sampler(alanine_run, alanine):
    move = BoltzmannGeneratorMove(alanine_run, n_proposals=2, seed=0)
    dynamics = mcmc.LangevinDynamicsMove(timestep=1 * unit.femtosecond, n_steps=20)
    thermodynamic_state = states.ThermodynamicState(alanine.system, 350 * unit.kelvin)
    sampler_state = states.SamplerState(alanine.positions * unit.nanometer)
    sampler = mcmc.MCMCSampler(
        thermodynamic_state, sampler_state, mcmc.SequenceMove([dynamics, move])
    )
    sampler.run(5, context_cache=cache.ContextCache())
    assert move.n_proposed == 10
    positions = np.asarray(sampler.sampler_state.positions.value_in_unit(unit.nanometer))
    assert np.isfinite(positions).all()
    assert np.abs(positions - np.asarray(alanine.positions)).max() > 0


@pytest.mark.parametrize("sampler_name", ["ParallelTemperingSampler", "ReplicaExchangeSampler"])
def test_multistate_samplers_run_the_move_and_their_storage_reopens(
    alanine_run, alanine, tmp_path, sampler_name
):
    from openmm_nice.molecule.systems import import_quietly

    multistate = import_quietly("openmmtools.multistate")
    storage = str(tmp_path / "storage.nc")
    moves = mcmc.SequenceMove(
        [
            mcmc.LangevinDynamicsMove(timestep=1 * unit.femtosecond, n_steps=10),
            BoltzmannGeneratorMove(alanine_run, n_proposals=2, seed=0),
        ]
    )
    sampler_class = getattr(multistate, sampler_name)
    sampler = sampler_class(mcmc_moves=moves, number_of_iterations=2)
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
    sampler_state = states.SamplerState(alanine.positions * unit.nanometer)
    if sampler_name == "ParallelTemperingSampler":
        reference = states.ThermodynamicState(alanine.system, 300 * unit.kelvin)
        sampler.create(reference, sampler_state, reporter, 300 * unit.kelvin, 400 * unit.kelvin, 2)
    else:
        temperatures = (300, 400)
        thermodynamic_states = [
            states.ThermodynamicState(alanine.system, t * unit.kelvin) for t in temperatures
        ]
        sampler.create(thermodynamic_states, [sampler_state] * 2, reporter)
    sampler.run()
    reporter.close()

    reopened = multistate.MultiStateReporter(storage, open_mode="r")
    stored = reopened.read_mcmc_moves()
    reopened.close()
    assert len(stored) == 2
    for sequence in stored:
        generator_move = sequence.move_list[1]
        assert isinstance(generator_move, BoltzmannGeneratorMove)
        assert generator_move.run == alanine_run.resolve()
        assert generator_move.n_proposed == 2 * 2  # two iterations of two proposals per state
    # the sampler continues from its storage file
    resumed = sampler_class.from_storage(multistate.MultiStateReporter(storage, open_mode="r+"))
    resumed.extend(1)
    assert resumed.iteration == 3


def test_run_chain_needs_steps_or_proposals_and_is_reproducible(alanine_run, alanine):
    with pytest.raises(ValueError, match="Langevin steps or proposals"):
        run_chain(alanine_run, 2, langevin_steps=0, n_proposals=0)
    result = run_chain(alanine_run, 3, langevin_steps=5, n_proposals=2, seed=4)
    again = run_chain(alanine_run, 3, langevin_steps=5, n_proposals=2, seed=4)
    np.testing.assert_array_equal(result.x, again.x)  # seeded: proposals and Langevin noise
    assert result.x.shape == (3, 3 * alanine.n_atoms) and result.u.shape == (3,)
    assert result.evaluations_per_iteration == 5 + 1 + 2
