"""Plain OpenMM Langevin MD of a config's system: training data and references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from openmm_nice.config import Config, load_config
from openmm_nice.io import atomic_write_text, save_samples

__all__ = ["run_md", "md_command"]


def run_md(
    config: Config, n_steps: int | None = None, quiet: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Langevin MD (LangevinMiddleIntegrator) of ``config.system`` at ``config.temperature``.

    Returns:
        frames: (F, 3N) positions in nm, one every ``md.report_interval`` steps.
        u: (F,) reduced potential energies E/kT of the frames.
    """
    import openmm
    from openmm import unit

    from openmm_nice.openmm_energy import OpenMMEnergy
    from openmm_nice.systems import load_molecular_system

    if not isinstance(config.system, dict) and not isinstance(config.system, str):
        raise ValueError(f"md needs a molecular system, got {config.system!r}")
    molecule = load_molecular_system(config.system)
    md = config.md
    n_steps = md.steps if n_steps is None else int(n_steps)
    if n_steps < md.report_interval:
        raise ValueError(
            f"md.steps ({n_steps}) must be at least md.report_interval ({md.report_interval})"
        )
    # validates the System (constraints, virtual sites, periodicity) with the same messages as training
    OpenMMEnergy(molecule.system, config.temperature, platform=config.platform).close()
    integrator = openmm.LangevinMiddleIntegrator(
        config.temperature * unit.kelvin,
        md.friction_per_ps / unit.picosecond,
        md.timestep_fs * unit.femtosecond,
    )
    integrator.setRandomNumberSeed(config.seed + 1)
    platform = openmm.Platform.getPlatformByName(config.platform)
    context = openmm.Context(molecule.system, integrator, platform, config.platform_properties)
    context.setPositions(molecule.positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(config.temperature * unit.kelvin, config.seed + 1)
    integrator.step(md.equilibration_steps)
    kt = (unit.MOLAR_GAS_CONSTANT_R * config.temperature * unit.kelvin).value_in_unit(
        unit.kilojoule_per_mole
    )
    n_frames = n_steps // md.report_interval
    frames = np.empty((n_frames, 3 * molecule.n_atoms))
    energies = np.empty(n_frames)
    for i in tqdm(range(n_frames), disable=quiet, unit="frame", desc="md"):
        integrator.step(md.report_interval)
        state = context.getState(getPositions=True, getEnergy=True)
        frames[i] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer).reshape(-1)
        energies[i] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / kt
    return frames, energies


def md_command(args) -> int:
    config = load_config(args.config)
    if args.seed is not None:
        config.seed = args.seed
    frames, u = run_md(config, args.steps, args.quiet)
    out = Path(args.out)
    n_steps = args.steps if args.steps is not None else config.md.steps
    if out.suffix == ".npz":
        save_samples(out, frames, np.zeros(len(frames)), u)
    else:
        import mdtraj

        from openmm_nice.systems import load_molecular_system

        top = mdtraj.Topology.from_openmm(load_molecular_system(config.system).topology)
        traj = mdtraj.Trajectory(frames.reshape(len(frames), -1, 3).astype(np.float32), top)
        traj.time = (
            np.arange(1, len(frames) + 1)
            * config.md.report_interval
            * config.md.timestep_fs
            / 1000.0
        )
        tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
        traj.save(str(tmp))
        tmp.replace(out)
    info = {
        "command": f"openmm-nice md {args.config} --out {args.out}"
        + (f" --steps {args.steps}" if args.steps else ""),
        "steps": n_steps,
        "timestep_fs": config.md.timestep_fs,
        "simulated_ns": n_steps * config.md.timestep_fs * 1e-6,
        "frames": len(frames),
        "temperature_K": config.temperature,
        "seed": config.seed,
    }
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(info, indent=2) + "\n")
    if not args.quiet:
        print(json.dumps(info))
    return 0
