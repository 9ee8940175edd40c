"""The `reweight` command: weighted observables and free-energy profiles from samples."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from openmm_nice.io import atomic_write_text
from openmm_nice.plots import plot_free_energy_map, plot_profiles
from openmm_nice.reweighting import (
    bootstrap_error,
    effective_sample_size,
    free_energy_profile,
    log_partition_function,
    normalized_weights,
    probability,
)

__all__ = [
    "add_reweight_arguments",
    "reweight_command",
    "load_samples",
    "ramachandran",
    "free_energy_map",
]


def add_reweight_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="an npz from `openmm-nice sample` (x, log_w, u)")
    p.add_argument("--out", required=True, help="folder for CSV, PNG and summary.json")
    p.add_argument("--run", help="the run folder, for molecular observables and exact answers")
    p.add_argument(
        "--coordinates", default="all", help="toy targets: comma-separated indices to profile"
    )
    p.add_argument("--bins", type=int, default=60)
    p.add_argument(
        "--observable",
        action="append",
        default=[],
        help=(
            "molecules: an mdtraj observable, e.g. dihedral:4,6,8,14 (radians) or distance:0,10 (nm); repeatable"
        ),
    )
    p.add_argument("--n-bootstrap", type=int, default=200)


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, log_w, u) of a sample file, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sample file {path} does not exist; make it with `openmm-nice sample`"
        )
    with np.load(path) as data:
        missing = [k for k in ("x", "log_w", "u") if k not in data]
        if missing:
            raise ValueError(
                f"{path} lacks {', '.join(missing)}; it is not a sample file of `openmm-nice sample`"
            )
        return data["x"], data["log_w"], data["u"]


def _summary(log_w: np.ndarray, n_bootstrap: int) -> dict:
    return {
        "n": int(len(log_w)),
        "ess": effective_sample_size(log_w) / len(log_w),
        "log_z": log_partition_function(log_w),
        "log_z_error": bootstrap_error(log_partition_function, log_w, n_bootstrap=n_bootstrap),
    }


def _toy_report(x, log_w, args, out: Path, target) -> dict:
    report = {}
    indices = (
        range(x.shape[1])
        if args.coordinates == "all"
        else [int(i) for i in args.coordinates.split(",")]
    )
    for i in indices:
        if not 0 <= i < x.shape[1]:
            raise ValueError(
                f"coordinate {i} is out of range for samples of dimension {x.shape[1]}"
            )
        s = x[:, i]
        lo, hi = np.quantile(s, [0.0005, 0.9995])
        direct = free_energy_profile(s, None, args.bins, (lo, hi), args.n_bootstrap)
        weighted = free_energy_profile(s, log_w, args.bins, (lo, hi), args.n_bootstrap)
        direct.to_csv(out / f"profile_x{i}_direct.csv", header=f"x{i}")
        weighted.to_csv(out / f"profile_x{i}_reweighted.csv", header=f"x{i}")
        plot_profiles(
            {"direct": direct, "importance-sampled": weighted}, out / f"profile_x{i}.png", f"x{i}"
        )
    for index, barrier in getattr(target.energy, "wells", ()) if target else ():
        key = f"p(x{index}<{barrier:g})"
        report[key] = {
            "direct": probability(x[:, index] < barrier),
            "reweighted": probability(x[:, index] < barrier, log_w),
            "exact": target.energy.probability_below(index, barrier),
        }
    return report


def ramachandran(x: np.ndarray, topology) -> tuple[np.ndarray, np.ndarray]:
    """Backbone dihedrals (phi, psi) in radians of frames x (N, 3 n_atoms) of a dipeptide."""
    import mdtraj

    traj = mdtraj.Trajectory(x.reshape(len(x), topology.n_atoms, 3), topology)
    _, phi = mdtraj.compute_phi(traj)
    _, psi = mdtraj.compute_psi(traj)
    if phi.shape[1] == 0 or psi.shape[1] == 0:
        raise ValueError("the molecule has no backbone phi/psi dihedral")
    return phi[:, 0], psi[:, 0]


def free_energy_map(
    a, b, weights=None, bins: int = 36
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A periodic 2D histogram on [-pi, pi)^2: (edges_a, edges_b, probability, F in kT, min 0)."""
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    hist, _, _ = np.histogram2d(a, b, bins=[edges, edges], weights=weights)
    p = hist / hist.sum()
    with np.errstate(divide="ignore"):
        f = -np.log(p)
    return edges, edges, p, f - np.min(f[np.isfinite(f)])


def _observable(spec: str, traj) -> np.ndarray:
    import mdtraj

    kind, _, atoms = spec.partition(":")
    try:
        idx = [int(a) for a in atoms.split(",")]
    except ValueError:
        raise ValueError(
            f"bad observable {spec!r}; use e.g. dihedral:4,6,8,14 or distance:0,10"
        ) from None
    if kind == "dihedral" and len(idx) == 4:
        return mdtraj.compute_dihedrals(traj, [idx])[:, 0]
    if kind == "distance" and len(idx) == 2:
        return mdtraj.compute_distances(traj, [idx])[:, 0]
    if kind == "angle" and len(idx) == 3:
        return mdtraj.compute_angles(traj, [idx])[:, 0]
    raise ValueError(
        f"unknown observable {spec!r}; kinds are dihedral:i,j,k,l angle:i,j,k distance:i,j"
    )


def _molecule_report(x, log_w, args, out: Path, target) -> dict:
    import mdtraj

    top = target.mdtraj_topology()
    phi, psi = ramachandran(x, top)
    w = normalized_weights(log_w)
    maps, report = {}, {}
    for label, weights in (("direct", None), ("reweighted", w)):
        ea, eb, p, f = free_energy_map(phi, psi, weights, 36)
        maps[label] = (ea, eb, f)
        centers = 0.5 * (ea[1:] + ea[:-1])
        rows = ["phi_rad,psi_rad,probability,free_energy_kT"]
        rows += [
            f"{centers[i]:.6f},{centers[j]:.6f},{p[i, j]:.8g},{f[i, j]:.6g}"
            for i in range(36)
            for j in range(36)
        ]
        atomic_write_text(out / f"ramachandran_{label}.csv", "\n".join(rows) + "\n")
    plot_free_energy_map(maps, out / "ramachandran.png")
    positive = phi > 0
    for label, lw in (("direct", None), ("reweighted", log_w)):
        p, _ = probability(positive, lw)
        err = bootstrap_error(
            _region_probability(lw is not None),
            positive,
            log_w,
            n_bootstrap=args.n_bootstrap,
        )
        report[f"p(phi>0) {label}"] = {"value": p, "error": err}
        if 0 < p < 1:
            df = -math.log(p / (1 - p))
            report[f"dF(phi>0 - phi<0) {label} (kT)"] = {"value": df, "error": err / (p * (1 - p))}
    traj = mdtraj.Trajectory(x.reshape(len(x), top.n_atoms, 3), top)
    for spec in args.observable:
        values = _observable(spec, traj)
        report[spec] = {
            "direct": probability_free(values, None),
            "reweighted": probability_free(values, log_w),
        }
    return report


def _region_probability(weighted: bool):
    """A statistic p(mask, log_w) for bootstrap_error, weighted or direct."""
    return lambda mask, log_w: probability(mask, log_w if weighted else None)[0]


def _region_probability(weighted: bool):
    """A statistic p(mask, log_w) for bootstrap_error, weighted or direct."""
    return lambda mask, log_w: probability(mask, log_w if weighted else None)[0]


def probability_free(values, log_w) -> dict:
    from openmm_nice.reweighting import expectation

    mean, err = expectation(values, log_w)
    return {"mean": mean, "error": err}


def reweight_command(args) -> int:
    x, log_w, u = load_samples(args.samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = None
    if args.run:
        from openmm_nice.cli import load_run

        _, target, _ = load_run(Path(args.run))
    try:
        summary = _summary(log_w, args.n_bootstrap)
        if target is not None and target.is_molecule:
            summary.update(_molecule_report(x, log_w, args, out, target))
        else:
            summary.update(_toy_report(x, log_w, args, out, target))
    finally:
        if target is not None:
            target.close()
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0
