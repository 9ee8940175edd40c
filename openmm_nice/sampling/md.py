"""Plain OpenMM Langevin MD of a config's system: training data and references."""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from openmm_nice.config import Config
from openmm_nice.errors import ConfigError, UserInputError
from openmm_nice.io import atomic_write_text, read_frames, save_samples, write_trajectory

__all__ = [
    "FrameRecorder",
    "MDResult",
    "molecular_system",
    "run_md",
    "write_md",
    "load_start_frame",
    "run_md_to_file",
    "TRAJECTORY_SUFFIXES",
]

TRAJECTORY_SUFFIXES = (".npz", ".dcd", ".xtc", ".trr", ".nc", ".h5", ".pdb")
"""Output files `openmm-nice md` writes: the contract npz, or an mdtraj trajectory."""


@dataclass
class MDResult:
    """Frames of one MD run and how long it took.

    Attributes:
        frames: (F, 3N) positions in nm, flattened in OpenMM atom order, float64.
        u: (F,) reduced potential energies E/kT of the frames (kT of ``temperature``).
        time_ps: (F,) simulated time of each frame after equilibration, in ps.
        temperature: The thermostat's temperature in K.
        timestep_fs: The integration time step in fs.
        platform: The OpenMM platform that ran it.
        wall_time_s: Wall-clock seconds of the production steps (not minimisation or
            equilibration).
    """

    frames: np.ndarray
    u: np.ndarray
    time_ps: np.ndarray
    temperature: float
    timestep_fs: float
    platform: str
    wall_time_s: float

    @property
    def simulated_ns(self) -> float:
        """Production time simulated, in ns."""
        return float(self.time_ps[-1]) / 1000.0 if len(self.time_ps) else 0.0

    @property
    def ns_per_day(self) -> float:
        """Simulation speed of the production steps, in ns per day of wall time."""
        return self.simulated_ns * 86400.0 / self.wall_time_s if self.wall_time_s > 0 else np.inf


def molecular_system(config: Config):
    """The :class:`~openmm_nice.molecule.systems.MolecularSystem` of a config; a toy target is an error."""
    from openmm_nice.molecule.systems import load_molecular_system
    from openmm_nice.targets import TOY_SYSTEMS

    name = config.system if isinstance(config.system, str) else config.system.get("name")
    if name in TOY_SYSTEMS:
        raise UserInputError(
            f"this needs a molecular system, but {name!r} is a toy target; use a config whose "
            "`system` is e.g. alanine_dipeptide_vacuum or {pdb: ..., forcefield: [...]}"
        )
    try:
        return load_molecular_system(config.system)
    except ValueError as error:  # a PDB or force field that cannot make the System
        raise ConfigError(f"system: {error}") from error


def run_md(
    config: Config,
    n_steps: int | None = None,
    quiet: bool = False,
    platform: str | None = None,
    start: np.ndarray | None = None,
) -> MDResult:
    """Langevin MD (LangevinMiddleIntegrator) of ``config.system`` at ``config.temperature``.

    The structure (the system's own, or ``start``) is energy-minimised, given
    Maxwell-Boltzmann velocities (seeded by ``config.seed``), equilibrated for
    ``md.equilibration_steps``, then run for ``n_steps`` with a frame every
    ``md.report_interval`` steps.

    Arguments:
        config: The config; its ``system``, ``temperature``, ``seed``, ``platform`` and ``md``.
        n_steps: Production steps; ``md.steps`` by default.
        quiet: No progress bar.
        platform: An OpenMM platform name overriding ``config.platform`` (e.g. to time MD on
            CPU); the config's ``platform_properties`` apply only to the config's own platform.
        start: Starting positions in nm, shape (3N,) or (N, 3), instead of the system's own
            structure (e.g. a frame in a basin that plain MD rarely enters, to sample it
            locally; see :func:`load_start_frame`).

    Returns:
        An :class:`MDResult`.
    """
    import openmm
    import openmm.app as app
    from openmm import unit

    from openmm_nice.energy.openmm_energy import OpenMMEnergy

    molecule = molecular_system(config)
    md = config.md
    n_steps = md.steps if n_steps is None else int(n_steps)
    if n_steps < md.report_interval:
        raise UserInputError(
            f"md needs at least one frame: steps ({n_steps}) must be at least "
            f"md.report_interval ({md.report_interval}); raise --steps or lower md.report_interval"
        )
    properties = config.platform_properties if platform in (None, config.platform) else {}
    platform = platform or config.platform
    # validates the System (constraints, virtual sites, periodicity) and the platform with the
    # same messages as training
    try:
        OpenMMEnergy(molecule.system, config.temperature, platform=platform).close()
    except ValueError as error:
        raise ConfigError(str(error)) from error
    integrator = openmm.LangevinMiddleIntegrator(
        config.temperature * unit.kelvin,
        md.friction_per_ps / unit.picosecond,
        md.timestep_fs * unit.femtosecond,
    )
    integrator.setRandomNumberSeed(config.seed + 1)
    simulation = app.Simulation(
        molecule.topology,
        molecule.system,
        integrator,
        openmm.Platform.getPlatformByName(platform),
        {k: str(v) for k, v in properties.items()},
    )
    positions = molecule.positions
    if start is not None:
        start = np.asarray(start, dtype=np.float64)
        if start.size != 3 * molecule.n_atoms:
            raise UserInputError(
                f"the start structure has {start.size // 3} atoms' positions, the system has "
                f"{molecule.n_atoms}; give a frame of this system"
            )
        if not np.all(np.isfinite(start)):
            raise UserInputError("the start structure has NaN or infinite coordinates")
        positions = start.reshape(-1, 3)
    simulation.context.setPositions(positions * unit.nanometer)
    simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(config.temperature * unit.kelvin, config.seed + 1)
    simulation.step(md.equilibration_steps)
    kt = (unit.MOLAR_GAS_CONSTANT_R * config.temperature * unit.kelvin).value_in_unit(
        unit.kilojoule_per_mole
    )
    n_frames = n_steps // md.report_interval
    recorder = FrameRecorder(md.report_interval, n_frames, molecule.n_atoms, kt)
    simulation.reporters.append(recorder)
    started = time.perf_counter()
    with tqdm(total=n_frames, disable=quiet, unit="frame", desc="md") as bar:
        recorder.progress = bar
        simulation.step(n_frames * md.report_interval)
    wall = time.perf_counter() - started
    frames, energies = recorder.frames, recorder.u
    time_ps = np.arange(1, n_frames + 1) * md.report_interval * md.timestep_fs / 1000.0
    return MDResult(frames, energies, time_ps, config.temperature, md.timestep_fs, platform, wall)


class FrameRecorder:
    """An OpenMM reporter that keeps positions (nm, flattened) and reduced energies in memory.

    Arguments:
        interval: Steps between frames.
        n_frames: Frames to keep (the arrays' length).
        n_atoms: Atoms of the system.
        kt: kT in kJ/mol, to store U = E / kT.
    """

    def __init__(self, interval: int, n_frames: int, n_atoms: int, kt: float):
        self.interval = int(interval)
        self.frames = np.empty((n_frames, 3 * n_atoms))
        self.u = np.empty(n_frames)
        self.kt = float(kt)
        self.count = 0
        self.progress = None  # an optional tqdm bar advanced at each frame

    def describeNextReport(self, simulation) -> dict:  # noqa: N802 (OpenMM's protocol)
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": None, "include": ["positions", "energy"]}

    def report(self, simulation, state) -> None:
        from openmm import unit

        if self.count >= len(self.u):
            return
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        self.frames[self.count] = positions.reshape(-1)
        self.u[self.count] = (
            state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / self.kt
        )
        self.count += 1
        if self.progress is not None:
            self.progress.update(1)


def load_start_frame(path: str | Path, frame: int, topology) -> np.ndarray:
    """Positions (3N,) in nm of frame ``frame`` (negative counts from the end) of an npz with
    ``x`` (a sample or MD file of this package) or of any mdtraj-readable file (PDB, DCD with
    the system's ``topology``)."""
    x = read_frames(path, topology, what="--start")
    if not -len(x) <= frame < len(x):
        raise UserInputError(f"--start-frame {frame} is out of range: {path} has {len(x)} frames")
    return x[frame]


def _check_output(path: Path) -> None:
    """Refuse an output format before hours of MD, not after."""
    suffix = path.suffix.lower()
    if suffix not in TRAJECTORY_SUFFIXES:
        raise UserInputError(
            f"--out {str(path)!r}: unknown format {suffix!r}; use one of "
            f"{', '.join(TRAJECTORY_SUFFIXES)} (.npz is the sample-file format with x, log_w, u)"
        )
    if suffix == ".h5" and importlib.util.find_spec("tables") is None:
        raise UserInputError(
            f"--out {str(path)!r}: mdtraj writes .h5 through PyTables, which is not installed; "
            "`pip install tables`, or write .dcd or .npz"
        )


def write_md(path: str | Path, result: MDResult, topology) -> None:
    """Write MD frames: an npz with ``x``, ``log_w`` (zeros), ``u`` and ``time_ps``, or a
    trajectory in any format of :data:`TRAJECTORY_SUFFIXES` with the mdtraj ``topology``."""
    path = Path(path)
    _check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npz":
        save_samples(
            path, result.frames, np.zeros(len(result.frames)), result.u, time_ps=result.time_ps
        )
        return
    write_trajectory(path, result.frames, topology, time=result.time_ps)


def run_md_to_file(
    config: Config,
    out: str | Path,
    steps: int | None = None,
    start: str | Path | None = None,
    start_frame: int = -1,
    quiet: bool = False,
    command: str | None = None,
) -> dict:
    """Run MD of a config's system (:func:`run_md`) and write its frames and a record of it.

    ``out`` gets the frames (:func:`write_md`), and ``out`` + ``.json`` the record: the
    ``command`` that made it, steps, time step, frames, temperature, seed, start, platform, wall
    time, speed and the whole config.

    Arguments:
        config: The config; its ``temperature`` is the thermostat's, and the file's ``u`` is E/kT
            at it (hot MD that crosses barriers, as extra training data, is a config at a
            higher temperature).
        out: The file to write, of a format in :data:`TRAJECTORY_SUFFIXES`; refused before
            the MD runs if it is not.
        steps: Production steps instead of ``md.steps``.
        start: Begin from a frame of this file instead of the system's own structure (MD
            seeded in a basin that plain MD rarely enters); see :func:`load_start_frame`.
        start_frame: Which frame of ``start`` (negative counts from the end).
        quiet: No progress bar.
        command: The command line that asked for this run, recorded in the record.

    Returns:
        The record, as written.
    """
    import mdtraj

    out = Path(out)
    _check_output(out)
    topology = mdtraj.Topology.from_openmm(molecular_system(config).topology)
    frame = None if start is None else load_start_frame(start, start_frame, topology)
    result = run_md(config, steps, quiet, start=frame)
    write_md(out, result, topology)
    info = {
        "command": command,
        "steps": config.md.steps if steps is None else int(steps),
        "timestep_fs": config.md.timestep_fs,
        "report_interval": config.md.report_interval,
        "equilibration_steps": config.md.equilibration_steps,
        "friction_per_ps": config.md.friction_per_ps,
        "simulated_ns": result.simulated_ns,
        "frames": len(result.frames),
        "temperature_K": config.temperature,
        "seed": config.seed,
        "start": None if start is None else f"{start}[{start_frame}]",
        "platform": result.platform,
        "wall_time_s": result.wall_time_s,
        "ns_per_day": result.ns_per_day,
        "config": config.to_dict(),
    }
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(info, indent=2) + "\n")
    return info
