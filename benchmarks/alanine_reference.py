"""The alanine-dipeptide reference: umbrella sampling on the backbone dihedrals, with MBAR.

Alanine dipeptide at 300 K, in vacuum (openmmtools' AlanineDipeptideVacuum without constraints,
`openmm_nice.molecule.systems.alanine_dipeptide_vacuum`) or with --system implicit in implicit solvent
(AlanineDipeptideImplicit: the same System plus OBC GBSA). Harmonic restraints with a periodic
distance, 0.5 k min(|theta - theta0|, 2 pi - |theta - theta0|)^2, hold phi (and psi, for a 2-D
grid) near the centre of each window. Two engines run the same Langevin MD (the
LangevinMiddleIntegrator's scheme, 1 fs, friction 1/ps):
  * --engine openmm (the default): OpenMM's Simulation on --platform, one thread, samples each
    window in turn, each starting from the end of the previous one after a short equilibration;
  * --engine torch: every window of every repeat at once, as one batch (larger batches
    evaluate faster per row), with the System's energy and forces
    evaluated by `openmm_nice.energy.torch_energy.TorchEvaluator` (agreeing with OpenMM to 1e-9
    relative; tests/test_torch_energy.py) and the restraints by autograd. Every window starts
    from the minimised structure with phi and psi turned to its centre (the atoms on one side
    of each bond rotated about it), minimised under its restraint, and equilibrates three
    times --equilibrate-ps. On this 2-core machine OpenMM evaluates the implicit-solvent
    System at about 1,000 configurations per second, one per call: the batch is what makes its
    reference affordable (the vacuum reference checks the engine against OpenMM's).
The reference is of the trans-amide ensemble: frames with a cis amide bond (which MD at 300 K
never reaches from trans, 20 kcal/mol of barrier away; pulled windows can be forced into it)
are counted and left out. MBAR (pymbar 4) over all windows gives each sample its weight in the
unbiased ensemble, and from these weights:
  * dF = F(phi > 0) - F(phi < 0) = -ln(P(phi > 0) / P(phi < 0)) in kT;
  * the 36 x 36 Ramachandran probabilities, binned by `openmm_nice.analysis.free_energy.free_energy_map`
    (phi on the first axis), as the benchmarks bin the flow's samples.
--repeats independent runs (seeds seed, seed + 1, ...) are analysed each on its own, for the
error (the standard error of their mean), and pooled, for the reference itself. With windows on
phi alone psi moves freely in each window; the script counts psi's transitions between its
basins in every window so that one can see that it did.

It prints a table and one JSON line, and writes --out (npz: `histogram36`, `df_kT`,
`df_error_kT`, and the run's settings and per-repeat results).

With --combine it runs nothing: it joins the repeats of earlier runs of one protocol (their npz
files, distinct seeds) into one reference whose dF is the mean of all the repeats' dF with the
standard error of that mean, and whose map is the mean of the repeats' maps.

Usage:
    python benchmarks/alanine_reference.py [--grid 12x12] [--k 50] [--ps 35] [--repeats 4]
    python benchmarks/alanine_reference.py --system implicit --engine torch --grid 18x18 --k 100 ...
    python benchmarks/alanine_reference.py --combine A.npz B.npz ... --out REF.npz
"""

from __future__ import annotations

import argparse
import io
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
from _machine import machine_facts  # benchmarks/ is on the path of a script run from it
from scipy.special import logsumexp
from tqdm.auto import tqdm

from openmm_nice.analysis.free_energy import RAMACHANDRAN_BINS, free_energy_map
from openmm_nice.analysis.observables import ramachandran
from openmm_nice.io import atomic_write
from openmm_nice.molecule.systems import (
    alanine_dipeptide_implicit,
    alanine_dipeptide_vacuum,
    import_quietly,
)
from openmm_nice.molecule.zmatrix import bond_graph  # element symbols and neighbour sets

SYSTEMS = {"vacuum": alanine_dipeptide_vacuum, "implicit": alanine_dipeptide_implicit}
REFERENCE_DIR = Path(__file__).parent / "reference"
TEMPERATURE = 300.0  # K
KT = (unit.MOLAR_GAS_CONSTANT_R * TEMPERATURE * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
RESTRAINT = "0.5*k*min(d, 2*pi - d)^2; d = abs(theta - theta0); pi = 3.141592653589793"
# psi's basins, with a gap between them so that a transition means a committed crossing:
# alpha_R / C7ax (psi about -1) against C7eq / C5 / alpha_L (psi from about 0.5 to pi).
PSI_LOW, PSI_HIGH = (-2.3, -0.3), (0.3, -2.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--grid",
        default="12x12",
        help="windows: N on phi alone, or NxM on (phi, psi); centres at -pi + i 2 pi / N",
    )
    p.add_argument("--k", type=float, default=50.0, help="restraint constant, kJ/mol/rad^2")
    p.add_argument("--ps", type=float, default=35.0, help="production ps per window")
    p.add_argument("--equilibrate-ps", type=float, default=5.0, help="equilibration ps per window")
    p.add_argument("--sample-ps", type=float, default=0.5, help="ps between kept frames")
    p.add_argument("--repeats", type=int, default=4, help="independent runs")
    p.add_argument("--seed", type=int, default=1, help="seed of the first run (must be > 0)")
    p.add_argument(
        "--out",
        type=Path,
        help="npz to write (default: benchmarks/reference/alanine_dipeptide_SYSTEM_300K.npz)",
    )
    p.add_argument(
        "--samples", type=Path, help="also write every run's phi, psi and window here (npz)"
    )
    p.add_argument(
        "--platform",
        choices=("Reference", "CPU"),
        default="Reference",
        help="OpenMM platform; Reference runs on one thread and is the faster for this small "
        "molecule (CPU with Threads=1 keeps a worker thread and a waiting main thread busy)",
    )
    p.add_argument(
        "--system", choices=tuple(SYSTEMS), default="vacuum", help="the molecule's environment"
    )
    p.add_argument(
        "--engine",
        choices=("openmm", "torch"),
        default="openmm",
        help="openmm: OpenMM's Simulation, one window after another; torch: every window of "
        "every repeat at once, as one batch, on the torch energy path",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="NPZ",
        help="join the repeats of earlier runs of one protocol into --out (runs nothing)",
    )
    args = p.parse_args(argv)
    try:
        args.shape = tuple(int(n) for n in args.grid.lower().split("x"))
    except ValueError:
        p.error(f"--grid {args.grid!r}: use N or NxM")
    if len(args.shape) not in (1, 2) or min(args.shape) < 2:
        p.error(f"--grid {args.grid!r}: use N or NxM with N, M >= 2")
    if args.seed < 1:
        p.error("--seed must be positive (OpenMM takes 0 as 'pick a random seed')")
    if args.sample_ps > args.ps or args.ps <= 0 or args.equilibrate_ps < 0:
        p.error("need 0 < --sample-ps <= --ps and --equilibrate-ps >= 0")
    if args.out is None:
        args.out = REFERENCE_DIR / f"alanine_dipeptide_{args.system}_300K.npz"
    return args


def window_centres(shape: tuple[int, ...]) -> np.ndarray:
    """(K, len(shape)) centres, in snake order so that consecutive windows are neighbours."""
    axes = [-math.pi + 2.0 * math.pi * np.arange(n) / n for n in shape]
    if len(shape) == 1:
        return axes[0][:, None]
    rows = [
        [(phi, psi) for psi in (axes[1] if i % 2 == 0 else axes[1][::-1])]
        for i, phi in enumerate(axes[0])
    ]
    return np.array([c for row in rows for c in row])


def periodic_distance(theta: np.ndarray, theta0: np.ndarray) -> np.ndarray:
    d = np.abs(theta - theta0)
    return np.minimum(d, 2.0 * math.pi - d)


def reduced_bias(angles: np.ndarray, centres: np.ndarray, k: float) -> np.ndarray:
    """(K, N) reduced restraint energies of N samples (N, dims) in each of the K windows."""
    d = periodic_distance(angles[None, :, :], centres[:, None, :])
    return 0.5 * k * np.sum(d**2, axis=2) / KT


def psi_transitions(psi: np.ndarray) -> int:
    """Committed crossings of psi between its low and high basins along a trajectory."""
    low = (psi > PSI_LOW[0]) & (psi < PSI_LOW[1])
    high = (psi > PSI_HIGH[0]) | (psi < PSI_HIGH[1])
    state, n = 0, 0
    for lo, hi in zip(low, high):
        new = -1 if lo else (1 if hi else state)
        n += state != 0 and new != state
        state = new
    return int(n)


def run_repeat(molecule, mdtop, centres, args, seed: int, bar) -> dict:
    """Umbrella sampling of every window once: phi, psi and window of each kept frame."""
    indices = [mdtraj_indices(mdtop, "phi"), mdtraj_indices(mdtop, "psi")]
    system, restraint = restrained_system(molecule, indices[: centres.shape[1]], args.k, centres[0])

    integrator = openmm.LangevinMiddleIntegrator(
        TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond, 1.0 * unit.femtosecond
    )
    integrator.setRandomNumberSeed(seed)
    platform = openmm.Platform.getPlatformByName(args.platform)
    properties = {"Threads": "1"} if args.platform == "CPU" else {}
    simulation = app.Simulation(molecule.topology, system, integrator, platform, properties)
    simulation.context.setPositions(molecule.positions * unit.nanometer)
    simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, seed)

    stride = int(round(args.sample_ps * 1000))
    n_frames = int(round(args.ps / args.sample_ps))
    n_equilibrate = int(round(args.equilibrate_ps * 1000))
    frames = []
    start = time.perf_counter()
    for w, centre in enumerate(centres):
        for axis in range(centres.shape[1]):
            restraint.setTorsionParameters(axis, *indices[axis], [args.k, centre[axis]])
        restraint.updateParametersInContext(simulation.context)
        # the first window starts from the minimised crystal structure: equilibrate it longer
        simulation.step(n_equilibrate * (3 if w == 0 else 1))
        window = np.empty((n_frames, molecule.n_atoms * 3))
        for i in range(n_frames):
            simulation.step(stride)
            state = simulation.context.getState(getPositions=True)
            window[i] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer).ravel()
        frames.append(window)
        bar.update(1)
    return window_samples(frames, mdtop, start)


def restrained_system(molecule, quads, k: float, centre):
    """A copy of the molecule's System with the window restraint (RESTRAINT, per-torsion k and
    theta0) on each torsion of ``quads`` (4 atom indices each) at ``centre`` (one angle per
    torsion), and that CustomTorsionForce."""
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(molecule.system))
    restraint = openmm.CustomTorsionForce(RESTRAINT)
    restraint.addPerTorsionParameter("k")
    restraint.addPerTorsionParameter("theta0")
    for quad, theta0 in zip(quads, centre):
        restraint.addTorsion(*quad, [k, float(theta0)])
    system.addForce(restraint)
    return system, restraint


def window_samples(frames, mdtop, start: float) -> dict:
    """phi, psi and window of every kept frame (frames[w]: window w's frames, (F, 3 N) in nm),
    whether it has a cis amide bond, psi's transitions in each window, and the seconds since
    ``start``."""
    angles = [ramachandran(f, mdtop) for f in frames]
    amides = amide_torsions(mdtop)
    return {
        "phi": np.concatenate([phi for phi, _ in angles]),
        "psi": np.concatenate([psi for _, psi in angles]),
        "window": np.concatenate([np.full(len(f), w) for w, f in enumerate(frames)]),
        "psi_transitions": np.array([psi_transitions(psi) for _, psi in angles]),
        "cis": np.concatenate([cis_amide(f, amides, mdtop).any(axis=1) for f in frames]),
        "wall_s": time.perf_counter() - start,
    }


def amide_torsions(mdtop) -> np.ndarray:
    """(A, 4) atoms of each peptide bond's torsion X-C-N-Y (C bonded to an O, N in another
    residue, X and Y the other heavy atoms bonded to C and N): omega."""
    element, neighbours = bond_graph(mdtop)
    residue = [a.residue.index for a in mdtop.atoms]
    quads = []
    for c, bonded in enumerate(neighbours):
        if element[c] != "C" or not any(element[o] == "O" for o in bonded):
            continue
        for n in sorted(bonded):
            if element[n] != "N" or residue[n] == residue[c]:
                continue
            x = sorted(a for a in bonded if element[a] not in ("O", "N", "H"))
            y = sorted(a for a in neighbours[n] if element[a] != "H" and a != c)
            if x and y:
                quads.append([x[0], c, n, y[0]])
    return np.array(quads, dtype=np.int64).reshape(-1, 4)


def cis_amide(frames: np.ndarray, amides: np.ndarray, mdtop) -> np.ndarray:
    """(F, A) whether each peptide bond of frames (F, 3 N) in nm is cis (|omega| < 90 deg)."""
    import mdtraj

    traj = mdtraj.Trajectory(frames.reshape(len(frames), -1, 3), mdtop)
    return np.abs(mdtraj.compute_dihedrals(traj, amides)) < 0.5 * math.pi


def dihedral_restraint(positions, atoms: np.ndarray, centres: np.ndarray, k: float):
    """Restraint energies (B,) in kJ/mol and forces (B, N, 3) of positions (B, N, 3) in nm:
    the sum over axes of 0.5 k min(d, 2 pi - d)^2 on the dihedral of atoms[axis] (4 indices),
    centred at centres[:, axis] (B rows), by autograd in float64."""
    import torch

    from openmm_nice.energy.torch_energy import _dihedral  # the torsion terms' angle, OpenMM's sign

    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    energy = x.new_zeros(len(positions))
    for axis, quad in enumerate(atoms):
        theta = _dihedral(*(x[:, i] for i in quad))
        delta = torch.abs(theta - torch.as_tensor(centres[:, axis]))
        delta = torch.minimum(delta, 2.0 * math.pi - delta)
        energy = energy + 0.5 * k * delta**2
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach().numpy(), -grad.numpy()


def run_repeats_batched(molecule, mdtop, centres, args, seeds: list[int], bar) -> list[dict]:
    """Umbrella sampling of every window of every repeat at once, one batch row per window and
    repeat (a larger batch evaluates faster per row), on the torch energy path: the
    LangevinMiddleIntegrator's scheme (kick, half drift, Ornstein-Uhlenbeck velocities, half
    drift) in numpy, with the System's forces from a TorchEvaluator. Each repeat draws its
    velocities and noise from its own generator, seeded by its seed."""
    from openmm_nice.energy.torch_energy import TorchEvaluator

    rngs = [np.random.default_rng(seed) for seed in seeds]
    atoms = np.array([mdtraj_indices(mdtop, "phi"), mdtraj_indices(mdtop, "psi")])
    atoms = atoms[: centres.shape[1]]
    evaluate = TorchEvaluator(molecule.system, threads=1)
    starts = window_starts(molecule, mdtop, centres, args.k)

    n_windows, n, n_repeats = len(centres), molecule.n_atoms, len(seeds)
    rows = n_windows * n_repeats
    row_centres = np.tile(centres, (n_repeats, 1))  # repeat r holds rows r W ... (r + 1) W - 1
    mass = np.array(
        [molecule.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(n)]
    )[None, :, None]
    dt, gamma = 0.001, 1.0  # ps, 1/ps
    decay = math.exp(-gamma * dt)
    thermal = np.sqrt(KT / mass)  # nm/ps
    noise = math.sqrt(1.0 - decay**2) * thermal

    def normal() -> np.ndarray:
        return np.concatenate([rng.standard_normal((n_windows, n, 3)) for rng in rngs])

    x = np.tile(starts, (n_repeats, 1, 1))
    v = normal() * thermal
    energies, forces = np.empty(rows), np.empty_like(x)

    def total_forces(x: np.ndarray) -> np.ndarray:
        evaluate(x, energies, forces)
        if not np.all(np.isfinite(energies)):
            bad = np.flatnonzero(~np.isfinite(energies))
            raise RuntimeError(f"batch rows {bad.tolist()} reached a non-finite energy")
        _, restraint = dihedral_restraint(x, atoms, row_centres, args.k)
        return forces + restraint

    def step(x: np.ndarray, v: np.ndarray, f: np.ndarray):
        v = v + dt * f / mass
        x = x + 0.5 * dt * v
        v = decay * v + noise * normal()
        x = x + 0.5 * dt * v
        return x, v, total_forces(x)

    stride = int(round(args.sample_ps * 1000))
    n_frames = int(round(args.ps / args.sample_ps))
    n_equilibrate = 3 * int(round(args.equilibrate_ps * 1000))
    frames = np.empty((n_frames, rows, n * 3))
    start = time.perf_counter()
    f = total_forces(x)
    for _ in range(n_equilibrate):
        x, v, f = step(x, v, f)
    for i in range(n_frames):
        for _ in range(stride):
            x, v, f = step(x, v, f)
        frames[i] = x.reshape(rows, -1)
        bar.update(rows / n_frames)
    by_row = frames.transpose(1, 0, 2)
    return [
        window_samples(by_row[r * n_windows : (r + 1) * n_windows], mdtop, start)
        for r in range(n_repeats)
    ]


def window_starts(molecule, mdtop, centres: np.ndarray, k: float) -> np.ndarray:
    """(W, N, 3) start structures in nm, one per window: the minimised structure with phi (and
    psi) turned to the window's centre by rotating the atoms on one side of the bond about it,
    then minimised under the window's restraint with every amide bond held trans. Pulling
    every window from one structure to its centre by the restraint alone forces the backbone
    across its barriers and flipped about one window in ten into a cis amide bond, which MD
    does not undo."""
    quads = [mdtraj_indices(mdtop, "phi"), mdtraj_indices(mdtop, "psi")][: centres.shape[1]]
    system, restraint = restrained_system(molecule, quads, 0.0, centres[0])
    # holds every amide bond trans while minimising
    trans = openmm.CustomTorsionForce(RESTRAINT.replace("k", "k_trans").replace("theta0", "pi"))
    trans.addGlobalParameter("k_trans", 1000.0)
    for quad in amide_torsions(mdtop):
        trans.addTorsion(*(int(i) for i in quad), [])
    system.addForce(trans)
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(molecule.positions * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context)
    x0 = (
        context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    )

    _, neighbours = bond_graph(mdtop)
    moving = []  # the atoms on the far side of each restrained torsion's central bond
    for _, j, kk, _ in quads:
        seen, stack = {kk}, [kk]
        while stack:
            for b in neighbours[stack.pop()] - seen - {j}:
                seen.add(b)
                stack.append(b)
        moving.append(np.array(sorted(seen - {kk})))

    starts = np.empty((len(centres), *x0.shape))
    for w, centre in enumerate(centres):
        x = x0.copy()
        for axis, quad in enumerate(quads):
            angle = dihedral_angle(x, quad)
            x = rotate_about_bond(x, quad[1], quad[2], moving[axis], centre[axis] - angle)
            restraint.setTorsionParameters(axis, *quad, [k, centre[axis]])
        restraint.updateParametersInContext(context)
        context.setPositions(x * unit.nanometer)
        openmm.LocalEnergyMinimizer.minimize(context)
        starts[w] = (
            context.getState(getPositions=True)
            .getPositions(asNumpy=True)
            .value_in_unit(unit.nanometer)
        )
    return starts


def dihedral_angle(x: np.ndarray, quad) -> float:
    """The dihedral (rad, OpenMM's sign) of four atoms of x (N, 3)."""
    import torch

    from openmm_nice.energy.torch_energy import _dihedral

    t = torch.as_tensor(x[None], dtype=torch.float64)
    return float(_dihedral(*(t[:, i] for i in quad))[0])


def rotate_about_bond(x: np.ndarray, j: int, k: int, atoms: np.ndarray, angle: float):
    """x (N, 3) with ``atoms`` rotated by ``angle`` (rad) about the axis from atom j to k, which
    turns the dihedral i-j-k-l of any l among them by ``angle``."""
    axis = (x[k] - x[j]) / np.linalg.norm(x[k] - x[j])
    c, s = math.cos(angle), math.sin(angle)
    v = x[atoms] - x[k]
    rotated = v * c + np.cross(axis, v) * s + np.outer(v @ axis, axis) * (1 - c)
    out = x.copy()
    out[atoms] = rotated + x[k]
    return out


def mdtraj_indices(mdtop, name: str) -> list[int]:
    """The four atoms of the first phi or psi, as mdtraj (and so `ramachandran`) finds them."""
    import mdtraj

    traj = mdtraj.Trajectory(np.zeros((1, mdtop.n_atoms, 3)), mdtop)
    atoms, _ = getattr(mdtraj, f"compute_{name}")(traj)
    return [int(i) for i in atoms[0]]


def mbar_estimate(phi, psi, window, centres, k: float) -> dict:
    """MBAR over the windows: unbiased log-weights, dF with MBAR's error, the 36 x 36 map."""
    pymbar = import_quietly("pymbar")
    angles = np.stack([phi, psi], axis=1)[:, : centres.shape[1]]
    u_kn = reduced_bias(angles, centres, k)
    n_k = np.bincount(window, minlength=len(centres))
    mbar = pymbar.MBAR(u_kn, n_k)
    # the unbiased state's reduced energy differs from every window's by the bias alone
    log_w = -logsumexp(mbar.f_k[:, None] - u_kn, b=n_k[:, None], axis=0)
    positive = (phi > 0).astype(np.float64)
    with np.errstate(divide="ignore"):  # pymbar takes log of the indicator's zeros
        p = mbar.compute_expectations(positive, u_kn=np.zeros((1, len(phi))))
    p_mu, p_sigma = float(np.ravel(p["mu"])[0]), float(np.ravel(p["sigma"])[0])
    w = np.exp(log_w - logsumexp(log_w))
    p_pos = float(np.sum(w[phi > 0]))
    histogram = free_energy_map(phi, psi, log_w, bins=RAMACHANDRAN_BINS, n_bootstrap=0).probability
    return {
        "df_kT": -math.log(p_pos / (1.0 - p_pos)),
        "df_mbar_error_kT": p_sigma / (p_mu * (1.0 - p_mu)),
        "p_phi_positive": p_pos,
        "ess_fraction": float(1.0 / np.sum(w**2) / len(w)),
        "histogram": histogram,
    }


def save(path: Path, record: dict, histogram: np.ndarray, extra: dict) -> None:
    def write(handle) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            histogram36=histogram.astype(np.float64),
            df_kT=np.float64(record["df_kT"]),
            df_error_kT=np.float64(record["df_error_kT"]),
            record_json=np.array(json.dumps(record)),
            **extra,
        )
        handle.write(buffer.getvalue())

    atomic_write(path, write)


def record_header(system: str = "vacuum") -> dict:
    """The first fields of the JSON record: what ran, on which system, by which command."""
    return {
        "benchmark": "alanine_reference",
        "system": f"alanine_dipeptide_{system}",
        "command": shlex.join(["python", *sys.argv]),
        "temperature_K": TEMPERATURE,
    }


PROTOCOL = ("grid", "k_kJ_mol_rad2", "ps_per_window", "equilibrate_ps", "sample_ps")
# what the runs must share besides the protocol, with the value of a record written before the
# field existed
SAME = {"system": "alanine_dipeptide_vacuum", "engine": "openmm"}


def protocol_of(record: dict) -> dict:
    return {key: record[key] for key in PROTOCOL} | {
        key: record.get(key, default) for key, default in SAME.items()
    }


def combine(paths: list[Path], out: Path) -> dict:
    """One reference from the repeats of several runs of one protocol: dF the mean of every
    repeat's dF (error: the standard error of that mean), the map the mean of their maps."""
    records, dfs, maps = [], [], []
    for path in paths:
        with np.load(path) as data:
            records.append(json.loads(str(data["record_json"])))
            dfs.append(np.asarray(data["per_repeat_df_kT"], dtype=np.float64))
            maps.append(np.asarray(data["per_repeat_histogram36"], dtype=np.float64))
    protocol = protocol_of(records[0])
    for path, record in zip(paths, records):
        other = protocol_of(record)
        if other != protocol:
            raise SystemExit(f"{path}: protocol {other} differs from {paths[0]}'s {protocol}")
    seeds = [seed for record in records for seed in record["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(
            f"the runs share seeds ({sorted(seeds)}): their repeats are not independent"
        )
    dfs, maps = np.concatenate(dfs), np.concatenate(maps)
    mean, sem = float(dfs.mean()), float(dfs.std(ddof=1) / math.sqrt(len(dfs)))
    histogram = maps.mean(axis=0)
    print(
        f"{len(paths)} runs, {len(dfs)} repeats of one protocol "
        + ", ".join(f"{key} {value}" for key, value in protocol.items())
    )
    print(f"{'seed':>5} {'dF (kT)':>9}")
    for seed, df in zip(seeds, dfs):
        print(f"{seed:>5} {df:>9.3f}")
    print(
        f"dF = {mean:.3f} +- {sem:.3f} kT (mean of {len(dfs)} repeats and its standard error; "
        f"repeats' std {dfs.std(ddof=1):.3f}); map: the mean of the repeats' 36 x 36 maps"
    )
    record = {
        **record_header(protocol["system"].removeprefix("alanine_dipeptide_")),
        **protocol,
        "combined_from": [str(path) for path in paths],
        "repeats": len(dfs),
        "seeds": seeds,
        "df_kT": mean,
        "df_error_kT": sem,
        "per_repeat_df_kT": dfs.tolist(),
        "md_ns": sum(record["md_ns"] for record in records),
        **machine_facts(),
    }
    save(out, record, histogram, {"per_repeat_df_kT": dfs, "per_repeat_histogram36": maps})
    print(json.dumps(record))
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.combine:
        combine(args.combine, args.out)
        return 0
    import torch

    torch.set_num_threads(1)
    import mdtraj

    molecule = SYSTEMS[args.system]()
    mdtop = mdtraj.Topology.from_openmm(molecule.topology)
    centres = window_centres(args.shape)
    seeds = [args.seed + r for r in range(args.repeats)]

    start = time.perf_counter()
    runs = []
    with tqdm(
        total=len(centres) * args.repeats, unit="window", disable=args.quiet, desc="umbrella"
    ) as bar:
        if args.engine == "torch":
            runs = run_repeats_batched(molecule, mdtop, centres, args, seeds, bar)
        else:
            runs = [run_repeat(molecule, mdtop, centres, args, seed, bar) for seed in seeds]
    md_wall = time.perf_counter() - start
    if args.samples is not None:
        raw = {f"{key}_{r}": run[key] for r, run in enumerate(runs) for key in ("phi", "psi")}
        atomic_write(args.samples, lambda handle: np.savez(handle, centres=centres, **raw))

    # the reference is of the trans-amide ensemble (a cis amide bond, 20 kcal/mol of barrier
    # away, is never reached by MD at 300 K): frames with one are counted and left out
    cis_windows = np.stack(
        [np.bincount(r["window"][r["cis"]], minlength=len(centres)) for r in runs]
    )
    runs = [{**r, **{key: r[key][~r["cis"]] for key in ("phi", "psi", "window")}} for r in runs]
    per_repeat = [mbar_estimate(r["phi"], r["psi"], r["window"], centres, args.k) for r in runs]
    pooled_samples = {key: np.concatenate([r[key] for r in runs]) for key in ("phi", "psi")}
    pooled = mbar_estimate(
        pooled_samples["phi"],
        pooled_samples["psi"],
        np.concatenate([r["window"] for r in runs]),
        centres,
        args.k,
    )
    wall = time.perf_counter() - start
    dfs = np.array([e["df_kT"] for e in per_repeat])
    sem = float(np.std(dfs, ddof=1) / math.sqrt(len(dfs))) if len(dfs) > 1 else math.nan
    transitions = np.stack([r["psi_transitions"] for r in runs])  # (repeats, windows)

    # the first window (openmm) or every window (torch) equilibrates three times as long
    equilibrate_ps = args.equilibrate_ps * (
        len(centres) + 2 if args.engine == "openmm" else 3 * len(centres)
    )
    total_ns = args.repeats * (len(centres) * args.ps + equilibrate_ps) / 1000.0
    print(
        f"umbrella sampling + MBAR, alanine dipeptide ({args.system}), {TEMPERATURE:g} K, "
        f"{args.engine} engine: grid "
        f"{args.grid} ({len(centres)} windows), k = {args.k:g} kJ/mol/rad^2, "
        f"{args.ps:g} ps per window (+{args.equilibrate_ps:g} ps equilibration), frames every "
        f"{args.sample_ps:g} ps; {total_ns:.2f} ns of MD in {md_wall:.0f} s"
    )
    print(
        f"{'run':>8} {'seed':>5} {'frames':>8} {'dF (kT)':>9} {'MBAR err':>9} "
        f"{'P(phi>0)':>10} {'ESS/N':>7} {'MD s':>7}"
    )
    for seed, run, e in zip(seeds, runs, per_repeat):
        print(
            f"{'repeat':>8} {seed:>5} {len(run['phi']):>8} {e['df_kT']:>9.3f} "
            f"{e['df_mbar_error_kT']:>9.3f} {e['p_phi_positive']:>10.5f} "
            f"{e['ess_fraction']:>7.3f} {run['wall_s']:>7.0f}"
        )
    print(
        f"{'pooled':>8} {'':>5} {len(pooled_samples['phi']):>8} {pooled['df_kT']:>9.3f} "
        f"{pooled['df_mbar_error_kT']:>9.3f} {pooled['p_phi_positive']:>10.5f} "
        f"{pooled['ess_fraction']:>7.3f} {md_wall:>7.0f}"
    )
    print(
        f"dF = {pooled['df_kT']:.3f} +- {sem:.3f} kT (standard error of the mean of "
        f"{len(dfs)} repeats; repeats' mean {dfs.mean():.3f}, std {np.std(dfs, ddof=1) if len(dfs) > 1 else math.nan:.3f})"
    )
    print(
        f"psi transitions per window and repeat: min {transitions.min()}, median "
        f"{np.median(transitions):g}; windows with none in some repeat: "
        f"{int(np.sum(transitions.min(axis=0) == 0))} of {len(centres)}"
    )
    print(
        f"frames with a cis amide bond (left out): {int(cis_windows.sum())}, in "
        f"{int(np.sum(cis_windows.sum(axis=0) > 0))} of {len(centres)} windows"
    )

    record = {
        **record_header(args.system),
        "grid": args.grid,
        "windows": len(centres),
        "k_kJ_mol_rad2": args.k,
        "ps_per_window": args.ps,
        "equilibrate_ps": args.equilibrate_ps,
        "sample_ps": args.sample_ps,
        "platform": args.platform if args.engine == "openmm" else None,
        "engine": args.engine,
        "repeats": args.repeats,
        "seeds": seeds,
        "df_kT": pooled["df_kT"],
        "df_error_kT": sem,
        "df_mbar_error_kT": pooled["df_mbar_error_kT"],
        "p_phi_positive": pooled["p_phi_positive"],
        "per_repeat_df_kT": dfs.tolist(),
        "per_repeat_mbar_error_kT": [e["df_mbar_error_kT"] for e in per_repeat],
        "psi_transitions_min": int(transitions.min()),
        "psi_transitions_median": float(np.median(transitions)),
        "cis_frames": int(cis_windows.sum()),
        "md_ns": total_ns,
        "md_wall_s": md_wall,
        "wall_s": wall,
        **machine_facts(),
    }
    save(
        args.out,
        record,
        pooled["histogram"],
        {
            "window_centres": centres,
            "per_repeat_df_kT": dfs,
            "per_repeat_histogram36": np.stack([e["histogram"] for e in per_repeat]),
            "psi_transitions": transitions,
        },
    )
    print(f"wrote {args.out}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
