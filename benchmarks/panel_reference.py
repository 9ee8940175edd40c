"""An independent reference for a panel molecule: parallel tempering (openmmtools) and MBAR.

openmmtools' ParallelTemperingSampler runs --replicas replicas of the panel molecule's System
(benchmarks/_panel.py: the same System the recipe trains on) at temperatures spaced
geometrically from 300 K to --t-max, with all-pairs exchange attempts between moves. The default
move is one Hamiltonian Monte Carlo trajectory per iteration (:func:`hmc_move`: fresh velocities,
--steps-per-iteration velocity Verlet steps of --timestep-fs, Metropolis on the total energy), so
each state's configurational ensemble is exact whatever the step; its acceptance is printed.
`--move langevin` takes `LangevinDynamicsMove` (OpenMM's LangevinMiddleIntegrator) instead,
faster per step, exact only as the step goes to zero. Hydrogen masses are raised to
--hydrogen-mass amu, taken from the heavy atom they are bonded to: masses do not enter the
configurational Boltzmann distribution, and the heavier hydrogens allow the longer step.

`--engine torch` runs every replica of every repeat as one batch of the System's energy written
as torch operations (float64), on --device (`openmm_nice.sampling.tempering.ParallelTempering`):
the same HMC move, neighbour exchanges (--exchange-sweeps alternating sweeps per iteration
instead of openmmtools' all-pairs attempts), the repeats as independent ladders. On the 2-core
CPU it is slower than OpenMM's Reference platform; it is for a GPU, where the batch is the repeats
times the replicas, and --minutes cuts the run to the time the device is lent for. Systems with
constraints are refused.

The ladder reaches 1,200 K because 600 K is not enough: valine dipeptide's phi changes sign only
some tens of times in 5 ns of a 300-600 K ladder, each replica carrying phi > 0 up and down for
nanoseconds, so repeats scattered from P(phi > 0) = 0.03 to 0.21 beyond their error bars; with
12 replicas to 1,200 K phi switched 650-670 times per repeat and two repeats agreed
(benchmarks/RESULTS.md). The table's "switch" column counts those entries into and exits from
each region along every replica's path: the number of visits an estimate rests on, which the
block bootstrap over iterations does not see. Frames with a cis peptide bond, or with a
stereocentre inverted (the hot states can, rarely), are counted and left out: the reference is
of the trans-amide ensemble of the given stereoisomer, the one the generator's coordinate map
describes.

Every replica's configuration at every iteration after --equilibration-fraction of them is a
sample; MBAR (pymbar) over all temperatures gives each its weight at 300 K (at 300 K a rare
basin has few visits of its own, while the hotter states visit it often), and from these
weights, for every residue's phi:
  * P(phi > 0) and dF = F(phi > 0) - F(phi < 0) = -ln(P / (1 - P)) in kT, with errors from a
    bootstrap of --blocks contiguous blocks of iterations (MBAR solved again on each);
  * the 36 x 36 Ramachandran probabilities of the first residue (phi on the first axis).
The 300 K state's own frames give a second, unweighted P(phi > 0), printed beside it as a check.

--repeats independent runs (seeds seed, seed + 1, ...) are analysed each on its own; the
reference is their mean, its error the standard error of that mean or the combined errors of
the repeats, whichever is larger, and the table shows whether the repeats agree within their
errors (z = |dF_1 - dF_2| / sqrt(e_1^2 + e_2^2)).

It prints a table and one JSON line, and writes --out (npz).

Usage:
    python benchmarks/panel_reference.py proline_dipeptide --ns 5 --repeats 2
    python benchmarks/panel_reference.py alanine_dipeptide_vacuum --ns 2 --replicas 8 --t-max 600
    python benchmarks/panel_reference.py alanine_tetrapeptide_implicit --engine torch \
        --device cuda --repeats 32 --ns 10 --minutes 8
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as unit
from _machine import machine_facts  # benchmarks/ is on the path of a script run from it
from _panel import (
    PANEL,
    ROOT,
    backbone_observables,
    reference_path,
)
from tqdm.auto import tqdm

from openmm_nice.analysis.free_energy import RAMACHANDRAN_BINS
from openmm_nice.analysis.observables import backbone_indices, cis_frames, dihedrals
from openmm_nice.analysis.reweighting import bootstrap_spread
from openmm_nice.molecule.systems import load_molecular_system


def repartition_hydrogen_mass(system: openmm.System, topology, mass: float) -> None:
    """Raise each hydrogen's mass to ``mass`` amu, taken from the atom it is bonded to."""
    for a, b in topology.bonds():
        for h, heavy in ((a, b), (b, a)):
            if h.element is not None and h.element.symbol == "H" and heavy.element.symbol != "H":
                old = system.getParticleMass(h.index).value_in_unit(unit.dalton)
                extra = mass - old
                if extra <= 0:
                    continue
                system.setParticleMass(h.index, mass)
                heavy_mass = system.getParticleMass(heavy.index).value_in_unit(unit.dalton)
                system.setParticleMass(heavy.index, heavy_mass - extra)


def hmc_move(timestep, trajectory_steps: int, random_seed: int = 0):
    """An openmmtools MCMC move that runs one Hamiltonian Monte Carlo trajectory: velocities
    drawn afresh at the state's temperature, ``trajectory_steps`` velocity Verlet steps of
    ``timestep``, the end accepted by the Metropolis rule on the total energy (openmmtools'
    HMCIntegrator), so the state's configurational ensemble is exact whatever the step. It keeps
    its acceptance counts. (openmmtools' own HMCMove calls ``integrator.step(n_steps)`` on an
    integrator whose every step is a whole trajectory of n_steps, n_steps squared in all.)
    ``random_seed``: the integrator's (velocities and Metropolis draws); 0 lets OpenMM choose
    one for each new Context. A nonzero seed gives every Context the same stream, so it is for
    one state (a test), not for the replicas of a multistate sampler."""
    from openmmtools import integrators, mcmc

    class HMCMove(mcmc.BaseIntegratorMove):
        def __init__(self, timestep, trajectory_steps, **kwargs):
            super().__init__(n_steps=1, **kwargs)
            self.timestep = timestep
            self.trajectory_steps = int(trajectory_steps)
            self.n_accepted = self.n_proposed = 0

        def __getstate__(self):
            state = super().__getstate__()
            state.update(
                timestep=self.timestep,
                trajectory_steps=self.trajectory_steps,
                n_accepted=self.n_accepted,
                n_proposed=self.n_proposed,
            )
            return state

        def __setstate__(self, state):
            super().__setstate__(state)
            self.timestep, self.trajectory_steps = state["timestep"], state["trajectory_steps"]
            self.n_accepted, self.n_proposed = state["n_accepted"], state["n_proposed"]

        def _get_integrator(self, thermodynamic_state):
            integrator = integrators.HMCIntegrator(
                temperature=thermodynamic_state.temperature,
                nsteps=self.trajectory_steps,
                timestep=self.timestep,
            )
            integrator.setRandomNumberSeed(random_seed)
            return integrator

        def _after_integration(self, context, thermodynamic_state):
            integrator = context.getIntegrator()  # a cached one counts on: read and reset
            self.n_accepted += int(integrator.getGlobalVariableByName("naccept"))
            self.n_proposed += int(integrator.getGlobalVariableByName("ntrials"))
            integrator.setGlobalVariableByName("naccept", 0)
            integrator.setGlobalVariableByName("ntrials", 0)

    return HMCMove(timestep, trajectory_steps)


def handed_rows(molecule) -> np.ndarray:
    """The (i, j, k, l) rows of the molecule's stereocentre torsions (the torsions whose sign
    the generator's coordinate map holds at the starting structure's)."""
    from openmm_nice.molecule.zmatrix import build_zmatrix, handed_torsions

    zmatrix = build_zmatrix(molecule.topology)
    signs = handed_torsions(molecule.topology, zmatrix, np.asarray(molecule.positions))
    return np.asarray(zmatrix)[3:][signs != 0]


def run_parallel_tempering(molecule, args, seed: int, storage: Path) -> dict:
    """One repeat. Returns, per iteration (after the first) and replica: ``phi`` (I, K, R)
    radians and ``psi`` (I, K, R) of every residue, ``cis`` (I, K), ``states`` (I, K) each
    replica's state, ``u`` (I, K, S) its reduced potential in every state; and timings."""
    from openmmtools import cache, mcmc, states
    from openmmtools.multistate import MultiStateReporter, ParallelTemperingSampler

    system = openmm.XmlSerializer.clone(molecule.system)
    repartition_hydrogen_mass(system, molecule.topology, args.hydrogen_mass)
    platform = openmm.Platform.getPlatformByName(args.platform)
    properties = {"Threads": "1"} if args.platform == "CPU" else {}
    thermodynamic_state = states.ThermodynamicState(system, temperature=300.0 * unit.kelvin)
    sampler_state = states.SamplerState(molecule.positions * unit.nanometer)
    if args.move == "hmc":
        move = hmc_move(args.timestep_fs * unit.femtosecond, args.steps_per_iteration)
    else:
        move = mcmc.LangevinDynamicsMove(
            timestep=args.timestep_fs * unit.femtosecond,
            collision_rate=1.0 / unit.picosecond,
            n_steps=args.steps_per_iteration,
            reassign_velocities=False,
        )
    iterations = int(round(args.ns * 1e6 / (args.timestep_fs * args.steps_per_iteration)))
    sampler = ParallelTemperingSampler(mcmc_moves=move, number_of_iterations=iterations)
    sampler._global_citation_silence = True  # noqa: SLF001 (its only switch)
    np.random.seed(seed)  # openmmtools' exchanges and velocities draw from numpy's global RNG
    reporter = MultiStateReporter(
        str(storage),
        checkpoint_interval=iterations,
        analysis_particle_indices=list(range(molecule.n_atoms)),
    )
    sampler.create(
        thermodynamic_state,
        sampler_state,
        reporter,
        min_temperature=300.0 * unit.kelvin,
        max_temperature=args.t_max * unit.kelvin,
        n_temperatures=args.replicas,
    )
    contexts = cache.ContextCache(platform=platform, platform_properties=properties or None)
    sampler.energy_context_cache = sampler.sampler_context_cache = contexts  # not the global one
    sampler.minimize()
    started = time.perf_counter()
    sampler.run()
    seconds = time.perf_counter() - started
    acceptance = None
    if args.move == "hmc":  # the moves' counts (openmmtools keeps a copy per state), summed
        moves = sampler.mcmc_moves
        acceptance = sum(m.n_accepted for m in moves) / max(sum(m.n_proposed for m in moves), 1)
    temperatures = [s.temperature.value_in_unit(unit.kelvin) for s in sampler._thermodynamic_states]  # noqa: SLF001
    replica_states = reporter.read_replica_thermodynamic_states()[1:]  # (I, K)
    u = reporter.read_energies()[0][1:]  # (I, K, S)
    phi_rows, psi_rows = backbone_indices(molecule.topology)
    handed = handed_rows(molecule)
    start_signs = np.sign(dihedrals(np.asarray(molecule.positions)[None], handed))
    phi, psi, cis, inverted = [], [], [], []
    for it in range(1, len(replica_states) + 1):
        x = np.array(
            [
                s.positions.value_in_unit(unit.nanometer)
                for s in reporter.read_sampler_states(it, analysis_particles_only=True)
            ]
        )
        phi.append(dihedrals(x, phi_rows))
        psi.append(dihedrals(x, psi_rows))
        cis.append(cis_frames(x, molecule.topology))
        inverted.append((np.sign(dihedrals(x, handed)) != start_signs).any(axis=-1))
    reporter.close()
    return {
        "phi": np.array(phi),
        "psi": np.array(psi),
        "cis": np.array(cis),
        "inverted": np.array(inverted),
        "states": np.asarray(replica_states),
        "u": np.asarray(u),
        "temperatures": temperatures,
        "seconds": seconds,
        "iterations": iterations,
        "acceptance": acceptance,
    }


def _minimized_positions(molecule, system: openmm.System) -> np.ndarray:
    """The molecule's positions (n_atoms, 3) in nm after OpenMM's local energy minimizer."""
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(np.asarray(molecule.positions) * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context)
    state = context.getState(getPositions=True)
    return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))


PILOT_ITERATIONS = 20  # --minutes: the iterations timed before the run's length is chosen


def run_torch_tempering(molecule, args) -> list[dict]:
    """All --repeats at once: the repeats are independent ladders of one batched
    :class:`~openmm_nice.sampling.tempering.ParallelTempering`, the System's energy as torch
    operations (:class:`~openmm_nice.energy.torch_energy.TorchSystemEnergy`, float64) on
    --device. Each iteration is one HMC trajectory per replica and --exchange-sweeps alternating
    sweeps of neighbour exchanges. With --minutes, the run is cut to the iterations that fit
    in that time (timed over the first :data:`PILOT_ITERATIONS`), for a device lent for
    minutes. Returns one run per repeat, as :func:`run_parallel_tempering` does (the seconds are
    the batch's, shared; ``iterations`` the number run)."""
    import torch

    from openmm_nice.energy.torch_energy import TorchSystemEnergy
    from openmm_nice.sampling.tempering import ParallelTempering, geometric_temperatures

    system = openmm.XmlSerializer.clone(molecule.system)
    if system.getNumConstraints():
        raise SystemExit(
            f"{args.molecule}: the System has {system.getNumConstraints()} constraints, which "
            "the torch engine's HMC does not hold; use --engine openmm"
        )
    repartition_hydrogen_mass(system, molecule.topology, args.hydrogen_mass)
    device = torch.device(args.device)
    masses = torch.tensor(
        [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(molecule.n_atoms)],
        dtype=torch.float64,
    )
    energy = TorchSystemEnergy(system).to(device)
    start = torch.as_tensor(_minimized_positions(molecule, system).reshape(-1), device=device)
    temperatures = geometric_temperatures(300.0, args.t_max, args.replicas)
    sweeps = args.replicas if args.exchange_sweeps is None else args.exchange_sweeps
    sampler = ParallelTempering(
        energy,
        masses.to(device),
        temperatures,
        start.to(torch.float64),
        n_ladders=args.repeats,
        timestep=args.timestep_fs * 1e-3,
        trajectory_steps=args.steps_per_iteration,
        exchange_sweeps=sweeps,
        seed=args.seed,
    )
    iterations = int(round(args.ns * 1e6 / (args.timestep_fs * args.steps_per_iteration)))
    phi_rows, psi_rows = backbone_indices(molecule.topology)
    handed = handed_rows(molecule)
    start_signs = np.sign(dihedrals(np.asarray(molecule.positions)[None], handed))
    shape = (args.repeats, args.replicas)
    series = {k: [] for k in ("phi", "psi", "cis", "inverted", "states", "u")}
    chunk: list[np.ndarray] = []

    def observe(frames: list[np.ndarray]) -> None:
        """The observables of a chunk of iterations' positions, (C, L, K, n) -> series."""
        x = np.stack(frames).reshape(-1, 3 * molecule.n_atoms)
        lead = (len(frames), *shape)
        series["phi"].append(dihedrals(x, phi_rows).reshape(*lead, -1))
        series["psi"].append(dihedrals(x, psi_rows).reshape(*lead, -1))
        series["cis"].append(cis_frames(x, molecule.topology).reshape(lead))
        inverted = (np.sign(dihedrals(x, handed)) != start_signs).any(axis=-1)
        series["inverted"].append(inverted.reshape(lead))

    started = time.perf_counter()
    with tqdm(total=iterations, desc=f"PT {args.molecule}", disable=args.quiet) as bar:
        i = 0
        while i < iterations:
            record = sampler.step()
            i += 1
            if args.minutes and i == PILOT_ITERATIONS:  # as many as fit in the time given
                per_iteration = (time.perf_counter() - started) / i
                fit = int(args.minutes * 60.0 / per_iteration)
                if fit < iterations:
                    iterations = max(fit, i)
                    bar.reset(total=iterations)
                    bar.update(i - 1)
            chunk.append(record.positions.cpu().numpy())
            series["states"].append(record.state.cpu().numpy())
            series["u"].append(sampler.reduced_potentials(record.energy).cpu().numpy())
            if len(chunk) == 200:
                observe(chunk)
                chunk = []
            bar.update()
        if chunk:
            observe(chunk)
    seconds = time.perf_counter() - started
    joined = {
        k: np.concatenate(v) if k in ("phi", "psi", "cis", "inverted") else np.stack(v)
        for k, v in series.items()
    }
    acceptance = sampler.mean_acceptance
    runs = []
    for r in range(args.repeats):  # ladder r's series: (I, K, ...)
        run = {k: v[:, r] for k, v in joined.items()}
        run.update(
            temperatures=temperatures,
            seconds=seconds,
            iterations=iterations,
            acceptance=acceptance,
            exchange_acceptance=sampler.exchange_acceptance,
        )
        runs.append(run)
    return runs


def round_trips(replica_states: np.ndarray) -> int:
    """Replicas' trips from the coldest state to the hottest and back, summed."""
    n_states = replica_states.max() + 1
    trips = 0
    for r in range(replica_states.shape[1]):
        going_up = None
        for s in replica_states[:, r]:
            if s == 0:
                if going_up is False:
                    trips += 1
                going_up = True
            elif s == n_states - 1 and going_up:
                going_up = False
    return trips


def _populations(u: np.ndarray, inside: np.ndarray, trans: np.ndarray, f_k=None):
    """MBAR over every (iteration, replica) sample: the weights at state 0 (trans frames only),
    the probability of each region (``inside``: (I, K, M) booleans), and the solved f_k."""
    from pymbar import MBAR

    n_iter, n_replicas, n_states = u.shape
    u_kn = u.reshape(-1, n_states).T
    n_k = np.full(n_states, n_iter)  # each state holds one replica at every iteration
    mbar = MBAR(u_kn, n_k, initial_f_k=f_k, verbose=False)
    w = mbar.weights()[:, 0] * trans.reshape(-1)
    w = w / w.sum()
    p = (w[:, None] * inside.reshape(-1, inside.shape[-1])).sum(axis=0)
    return w, p, mbar.f_k


def analyse(run: dict, equilibration_fraction: float, n_bootstrap: int, n_blocks: int) -> dict:
    """The probability and free energy (kT, region against the rest) of every backbone region
    (:func:`_panel.backbone_observables`) at 300 K by MBAR, with block-bootstrap errors; the
    300 K state's own probabilities; the first residue's map; the counts."""
    start = int(len(run["u"]) * equilibration_fraction)
    u, phi, psi = run["u"][start:], run["phi"][start:], run["psi"][start:]
    cis, states = run["cis"][start:], run["states"][start:]
    inverted = run["inverted"][start:] if "inverted" in run else np.zeros_like(cis)
    trans = ~cis & ~inverted  # the trans-amide ensemble of the given stereoisomer
    regions = backbone_observables(phi, psi)
    inside = np.stack(list(regions.values()), axis=-1)
    w, p, f_k = _populations(u, inside, trans)
    rng = np.random.default_rng(0)
    size = len(u) // n_blocks
    replicates = []
    for _ in range(n_bootstrap):
        blocks = rng.integers(0, n_blocks, n_blocks)
        i = np.concatenate([np.arange(b * size, (b + 1) * size) for b in blocks])
        replicates.append(_populations(u[i], inside[i], trans[i], f_k)[1])
    replicates = np.array(replicates)
    own = (states == 0) & trans
    observables = []
    for m, name in enumerate(regions):
        with np.errstate(divide="ignore", invalid="ignore"):
            df_reps = -np.log(replicates[:, m] / (1.0 - replicates[:, m]))
        pm = float(p[m])
        df = -math.log(pm / (1 - pm)) if 0 < pm < 1 else math.copysign(math.inf, 0.5 - pm)
        observables.append(
            {
                "name": name,
                "p": pm,
                "p_error": float(bootstrap_spread(replicates[:, m])),
                "df_kT": df,
                "df_error_kT": float(bootstrap_spread(df_reps)) if math.isfinite(df) else math.inf,
                "p_300K_frames": float(inside[..., m][own].mean()),
                # entries into and exits from the region along every replica's own path
                # (through all temperatures): the number of independent visits that the
                # estimate rests on, whatever the block bootstrap says
                "switches": int(np.count_nonzero(np.diff(inside[..., m], axis=0))),
            }
        )
    edges = np.linspace(-math.pi, math.pi, RAMACHANDRAN_BINS + 1)
    histogram, _, _ = np.histogram2d(
        phi[..., 0].reshape(-1), psi[..., 0].reshape(-1), bins=[edges, edges], weights=w
    )
    return {
        "frames": int(trans.size),
        "cis_frames": int(cis.sum()),
        "inverted_frames": int(inverted.sum()),
        "frames_300K": int(own.sum()),
        "ess_300K": float(1.0 / np.sum(w**2)),
        "observables": observables,
        "histogram36": histogram / histogram.sum(),
    }


def combine(repeats: list[dict]) -> list[dict]:
    """Per observable: the repeats' mean dF, its error, and whether the repeats agree (z; NaN
    where a repeat has no frame on one side, so that its dF is infinite)."""
    combined = []
    for k, first in enumerate(repeats[0]["observables"]):
        values = np.array([r["observables"][k]["df_kT"] for r in repeats])
        errors = np.array([r["observables"][k]["df_error_kT"] for r in repeats])
        p = np.array([r["observables"][k]["p"] for r in repeats])
        finite = bool(np.isfinite(values).all() and np.isfinite(errors).all())
        if finite:
            mean = float(values.mean())
            own = float(np.sqrt(np.sum(errors**2)) / len(values))
            spread = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
            error = max(own, spread)
            z = (
                float(abs(values[0] - values[1]) / math.hypot(errors[0], errors[1]))
                if len(values) > 1
                else math.nan
            )
        else:
            mean, error, z = math.nan, math.inf, math.nan
        combined.append(
            {
                "name": first["name"],
                "df_kT": mean,
                "df_error_kT": error,
                "p": float(p.mean()),
                "repeats_df_kT": values.tolist(),
                "repeats_df_error_kT": errors.tolist(),
                "agreement_z": z,
            }
        )
    return combined


def _json_safe(value):
    """JSON of the results: Paths as strings, non-finite floats as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _raw_runs(paths: list[Path]) -> list[dict]:
    """The repeats' time series in --raw files, in order (files of before every residue's psi
    was kept hold the first residue's as ``psi1``)."""
    runs = []
    for path in paths:
        with np.load(path) as data:
            r = 0
            while f"u{r}" in data:
                run = {k: data[f"{k}{r}"] for k in ("phi", "cis", "states", "u")}
                if f"inverted{r}" in data:
                    run["inverted"] = data[f"inverted{r}"]
                run["psi"] = data[f"psi{r}"] if f"psi{r}" in data else data[f"psi1{r}"][..., None]
                if f"seconds{r}" in data:
                    run["seconds"] = float(data[f"seconds{r}"])
                runs.append(run)
                r += 1
    return runs


def _load_repeats(paths: list[Path]) -> tuple[list[dict], dict]:
    """The repeats stored in earlier outputs of this script (--combine), and their settings."""
    repeats, settings = [], None
    for path in paths:
        with np.load(path) as data:
            stored = json.loads(str(data["repeats_json"]))
            for r, histogram in zip(stored, data["repeats_histogram36"]):
                r["histogram36"] = histogram
                for res in r["observables"]:  # JSON null: an infinite dF or error
                    res["df_kT"] = math.inf if res["df_kT"] is None else res["df_kT"]
                    res["df_error_kT"] = (
                        math.inf if res["df_error_kT"] is None else res["df_error_kT"]
                    )
            repeats.extend(stored)
            settings = settings or json.loads(str(data["settings"]))
    seeds = [r["seed"] for r in repeats]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--combine: the files repeat seeds {seeds}; give independent repeats")
    return repeats, settings


def _acceptance(repeat: dict) -> str:
    """The HMC acceptance of a repeat as printed ("-" for Langevin moves or older files)."""
    a = repeat.get("acceptance")
    return "-" if a is None else f"{a:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("molecule", choices=sorted(PANEL))
    p.add_argument("--ns", type=float, default=10.0, help="ns per replica per repeat")
    p.add_argument("--replicas", type=int, default=12)
    p.add_argument("--t-max", type=float, default=1200.0, help="hottest replica, K")
    p.add_argument(
        "--move",
        choices=("hmc", "langevin"),
        default="hmc",
        help="hmc: one Hamiltonian Monte Carlo trajectory of --steps-per-iteration steps per "
        "iteration (exact at any step); langevin: LangevinMiddleIntegrator, whose step biases "
        "the ensemble",
    )
    p.add_argument("--timestep-fs", type=float, default=1.5)
    p.add_argument("--hydrogen-mass", type=float, default=3.0, help="amu")
    p.add_argument("--steps-per-iteration", type=int, default=333)
    p.add_argument("--equilibration-fraction", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--platform", default="Reference", help="OpenMM platform (--engine openmm)")
    p.add_argument(
        "--engine",
        choices=("openmm", "torch"),
        default="openmm",
        help="openmm: openmmtools' sampler, one OpenMM Context per replica in turn; torch: every "
        "replica of every repeat in one batch of the System's torch energy on --device "
        "(neighbour exchanges, HMC moves; no constraints)",
    )
    p.add_argument("--device", default="cpu", help="torch device (--engine torch)")
    p.add_argument(
        "--exchange-sweeps",
        type=int,
        help="--engine torch: alternating sweeps of neighbour exchanges per iteration "
        "(default: --replicas)",
    )
    p.add_argument(
        "--minutes",
        type=float,
        help="--engine torch: stop after this long (fewer iterations than --ns asks)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (--engine torch)")
    p.add_argument("--n-bootstrap", type=int, default=50, help="bootstrap resamples (MBARs)")
    p.add_argument("--blocks", type=int, default=20, help="blocks of iterations a resample draws")
    p.add_argument("--out", type=Path, help="npz to write (default: benchmarks/reference/panel/)")
    p.add_argument(
        "--raw",
        type=Path,
        help="also write every repeat's time series here (npz), to analyse again",
    )
    p.add_argument(
        "--from-raw",
        type=Path,
        nargs="+",
        help="run nothing: analyse again the time series of earlier --raw files (their repeats "
        "take seeds --seed, --seed + 1, ... in order; the other options must be the run's)",
    )
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        help="run nothing: join the repeats of earlier outputs (distinct seeds, one protocol)",
    )
    args = p.parse_args(argv)
    if args.engine == "torch" and args.move != "hmc":
        p.error("--engine torch moves by HMC only; drop --move langevin or use --engine openmm")

    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("out", "raw", "combine", "from_raw", "quiet")
    }
    if args.from_raw:
        repeats = []
        for run in _raw_runs(args.from_raw):
            result = analyse(run, args.equilibration_fraction, args.n_bootstrap, args.blocks)
            result.update(
                seed=args.seed + len(repeats),
                seconds=run.get("seconds", math.nan),
                iterations=len(run["u"]),
                round_trips=round_trips(run["states"]),
            )
            repeats.append(result)
        settings["analysed_from"] = [str(path) for path in args.from_raw]
    elif args.combine:
        repeats, settings = _load_repeats(args.combine)
        settings["combined_from"] = [str(path) for path in args.combine]
    else:
        molecule = load_molecular_system(PANEL[args.molecule]["system"], ROOT)
        repeats, runs = [], []
        with tempfile.TemporaryDirectory() as folder:
            ladders = run_torch_tempering(molecule, args) if args.engine == "torch" else None
            for r in range(args.repeats):
                seed = args.seed + r
                if ladders is None:
                    run = run_parallel_tempering(molecule, args, seed, Path(folder) / f"pt{r}.nc")
                else:
                    run = ladders[r]
                result = analyse(run, args.equilibration_fraction, args.n_bootstrap, args.blocks)
                result.update(
                    seed=seed,
                    seconds=run["seconds"],
                    iterations=run["iterations"],
                    round_trips=round_trips(run["states"]),
                    temperatures=run["temperatures"],
                    acceptance=run["acceptance"],
                )
                repeats.append(result)
                runs.append(run)
        if args.raw:
            args.raw.parent.mkdir(parents=True, exist_ok=True)
            keys = ("phi", "psi", "cis", "inverted", "states", "u", "seconds")
            np.savez(args.raw, **{f"{k}{r}": run[k] for r, run in enumerate(runs) for k in keys})
    combined = combine(repeats)
    ns_run = repeats[0]["iterations"] * settings["steps_per_iteration"] * settings["timestep_fs"]
    ns_run = round(ns_run * 1e-6, 4)

    print(
        f"{args.molecule}: parallel tempering ({settings.get('engine', 'openmm')}), "
        f"{settings['replicas']} replicas "
        f"300-{settings['t_max']:g} K, {ns_run:g} ns each per repeat"
    )
    print(
        f"{'seed':>6} {'region':>11} {'P':>7} {'dF (kT)':>15} {'P 300K':>7} "
        f"{'frames':>7} {'cis':>5} {'ESS 300K':>8} {'trips':>5} {'switch':>6} {'accept':>6} "
        f"{'time (s)':>8}"
    )
    for r in repeats:
        for res in r["observables"]:
            print(
                f"{r['seed']:>6} {res['name']:>11} {res['p']:>7.4f} "
                f"{res['df_kT']:>7.3f} +- {res['df_error_kT']:<5.3f} {res['p_300K_frames']:>7.4f} "
                f"{r['frames']:>7} {r['cis_frames']:>5} {r['ess_300K']:>8.0f} "
                f"{r['round_trips']:>5} {res.get('switches', -1):>6} {_acceptance(r):>6} "
                f"{r['seconds']:>8.0f}"
            )
    for c in combined:
        print(
            f"{c['name']}: dF = {c['df_kT']:.3f} +- {c['df_error_kT']:.3f} kT "
            f"(repeats agree at z = {c['agreement_z']:.2f})"
        )

    out = args.out or reference_path(args.molecule)
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = [{k: v for k, v in r.items() if k != "histogram36"} for r in repeats]
    np.savez(
        out,
        df_kT=np.array([c["df_kT"] for c in combined]),
        df_error_kT=np.array([c["df_error_kT"] for c in combined]),
        p=np.array([c["p"] for c in combined]),
        histogram36=np.mean([r["histogram36"] for r in repeats], axis=0),
        observables=np.array([c["name"] for c in combined]),
        repeats_df_kT=np.array([[res["df_kT"] for res in r["observables"]] for r in repeats]),
        repeats_df_error_kT=np.array(
            [[res["df_error_kT"] for res in r["observables"]] for r in repeats]
        ),
        repeats_histogram36=np.array([r["histogram36"] for r in repeats]),
        repeats_json=json.dumps(_json_safe(stored)),
        settings=json.dumps(_json_safe(settings)),
        command="python "
        + shlex.join(["benchmarks/panel_reference.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    record = {
        "benchmark": "panel_reference",
        "molecule": args.molecule,
        **settings,
        "observables": combined,
        "repeats": stored,
        "out": str(out),
        **machine_facts(),
    }
    print(json.dumps(_json_safe(record)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
