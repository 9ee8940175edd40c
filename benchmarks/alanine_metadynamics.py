"""An independent reference for alanine dipeptide's Ramachandran free energy: well-tempered
metadynamics on (phi, psi) with OpenMM's own ``openmm.app.Metadynamics``.

Plain MD at 300 K crosses between phi < 0 and phi > 0 rarely (the C7ax / alpha_L basins lie
behind a barrier of many kT), so a 50 ns MD reference can miss them altogether. Metadynamics
fills the (phi, psi) landscape with a bias and returns the free-energy surface F(phi, psi)
itself. This script runs it for --ns nanoseconds and prints, from the final bias and from the
bias at 3/4 of the run (a convergence check): p(phi > 0), dF = F(phi > 0) - F(phi < 0) in kT,
and the population of each (phi, psi) basin. It writes the surface (36 x 36 bin centres and
probabilities) to --out as npz, with a .json sidecar giving the command.

Usage:
    python benchmarks/alanine_metadynamics.py --ns 20 --out data/reference/alanine_dipeptide_metad.npz
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
from tqdm.auto import tqdm

from openmm_nice.io import atomic_write_text
from openmm_nice.molecule.systems import alanine_dipeptide_vacuum

PHI, PSI = (4, 6, 8, 14), (6, 8, 14, 16)  # C-N-CA-C and N-CA-C-N in OpenMM atom order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=float, default=20.0, help="simulated nanoseconds")
    p.add_argument("--temperature", type=float, default=300.0, help="kelvin")
    p.add_argument("--bias-factor", type=float, default=6.0, help="well-tempered bias factor")
    p.add_argument("--height", type=float, default=1.0, help="initial Gaussian height, kJ/mol")
    p.add_argument("--width", type=float, default=0.35, help="Gaussian width, radians")
    p.add_argument("--frequency", type=int, default=500, help="steps between Gaussians")
    p.add_argument("--grid", type=int, default=72, help="bias grid points per variable")
    p.add_argument("--platform", default="Reference")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help="npz for the final surface (optional)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def torsion_variable(atoms: tuple[int, ...], width: float, grid: int) -> app.BiasVariable:
    force = openmm.CustomTorsionForce("theta")
    force.addTorsion(*atoms)
    return app.BiasVariable(force, -math.pi, math.pi, width, True, gridWidth=grid)


def summarise(free_energy_kt: np.ndarray) -> dict[str, float]:
    """p(phi > 0), dF and basin populations of a surface F[psi, phi] on the bias grid."""
    grid = free_energy_kt.shape[0]
    centres = -math.pi + 2 * math.pi * np.arange(grid) / grid  # OpenMM's periodic grid points
    p = np.exp(-(free_energy_kt - free_energy_kt.min()))
    p /= p.sum()
    phi = np.broadcast_to(centres[None, :], p.shape)
    psi = np.broadcast_to(centres[:, None], p.shape)
    positive = float(p[phi > 0].sum())
    alpha_r = (phi < 0) & (psi > -2.2) & (psi < 0.8)
    return {
        "p_phi_positive": positive,
        "df_kT": -math.log(positive / (1 - positive)),
        "p_alpha_r": float(p[alpha_r].sum()),
        "p_beta_c7eq": float(p[(phi < 0) & ~alpha_r].sum()),
        "p_c7ax_alpha_l": float(p[(phi > 0) & (phi < 2.2)].sum()),
    }


def histogram36(free_energy_kt: np.ndarray) -> np.ndarray:
    """Probabilities of the 36 x 36 Ramachandran bins [phi, psi] from the bias-grid surface."""
    grid = free_energy_kt.shape[0]
    if grid % 36:
        raise ValueError(f"--grid must be a multiple of 36, got {grid}")
    p = np.exp(-(free_energy_kt - free_energy_kt.min())).T  # [phi, psi]
    # Grid points sit at bin edges from -pi; shift half a grid cell so that each point is
    # counted in the bin that contains it.
    k = grid // 36
    return p.reshape(36, k, 36, k).sum(axis=(1, 3)) / p.sum()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    molecule = alanine_dipeptide_vacuum()
    system = molecule.system
    temperature = args.temperature * unit.kelvin
    variables = [
        torsion_variable(PHI, args.width, args.grid),
        torsion_variable(PSI, args.width, args.grid),
    ]
    metad = app.Metadynamics(
        system,
        variables,
        temperature,
        args.bias_factor,
        args.height * unit.kilojoule_per_mole,
        args.frequency,
    )
    integrator = openmm.LangevinMiddleIntegrator(
        temperature, 1.0 / unit.picosecond, 1.0 * unit.femtosecond
    )
    integrator.setRandomNumberSeed(args.seed)
    simulation = app.Simulation(
        molecule.topology, system, integrator, openmm.Platform.getPlatformByName(args.platform)
    )
    simulation.context.setPositions(molecule.positions.reshape(-1, 3) * unit.nanometer)
    simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(temperature, args.seed)
    kt = (unit.MOLAR_GAS_CONSTANT_R * temperature).value_in_unit(unit.kilojoule_per_mole)

    total = int(round(args.ns * 1e6))  # 1 fs steps
    chunk = args.frequency * 20
    checkpoints = {int(total * 0.75): "three_quarters"}
    surfaces = {}
    start = time.perf_counter()
    done = 0
    with tqdm(total=total, unit="step", disable=args.quiet, desc="metadynamics") as bar:
        while done < total:
            n = min(chunk, total - done)
            metad.step(simulation, n)
            done += n
            bar.update(n)
            for at, name in checkpoints.items():
                if name not in surfaces and done >= at:
                    surfaces[name] = metad.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole)
    wall = time.perf_counter() - start
    surfaces["final"] = metad.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole)

    results = {name: summarise(np.asarray(f) / kt) for name, f in surfaces.items()}
    print(
        f"well-tempered metadynamics on (phi, psi), {args.ns:g} ns at {args.temperature:g} K, "
        f"{wall:.0f} s on {args.platform}"
    )
    print(f"{'':24}{'3/4 of the run':>18}{'final':>14}")
    for key in results["final"]:
        print(f"{key:24}{results['three_quarters'][key]:>18.4g}{results['final'][key]:>14.4g}")
    record = {
        "benchmark": "alanine_metadynamics",
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "ns": args.ns,
        "temperature_K": args.temperature,
        "bias_factor": args.bias_factor,
        "height_kJ_mol": args.height,
        "width_rad": args.width,
        "frequency": args.frequency,
        "platform": args.platform,
        "seed": args.seed,
        "wall_time_s": wall,
        **{f"{name}_{k}": v for name, r in results.items() for k, v in r.items()},
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        final = np.asarray(surfaces["final"]) / kt
        tmp = args.out.with_name(args.out.name + ".tmp.npz")
        np.savez(tmp, free_energy_kT=final, histogram36=histogram36(final))
        tmp.replace(args.out)
        atomic_write_text(args.out.with_name(args.out.name + ".json"), json.dumps(record, indent=2))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
