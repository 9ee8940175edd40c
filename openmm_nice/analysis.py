"""The `reweight` command: observables and free-energy maps from weighted samples or reweighted MD."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openmm_nice.errors import UserInputError
from openmm_nice.io import atomic_write_text, save_samples
from openmm_nice.plots import plot_free_energy_map, plot_profiles
from openmm_nice.reweighting import (
    bootstrap,
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
    "load_trajectory",
    "reduced_energies",
    "reweight_trajectory",
    "ramachandran",
    "FreeEnergyMap",
    "free_energy_map",
    "region_free_energy",
    "observable_mean",
    "parse_observable",
    "compute_observable",
    "jensen_shannon_divergence",
]

RAMACHANDRAN_BINS = 36


def add_reweight_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `openmm-nice reweight`: a sample file, or an MD trajectory to reweight."""
    p.description = (
        "Weighted observables and free-energy maps, either of a sample file (direct and "
        "importance-sampled) or of an MD trajectory reweighted from the state it was run in "
        "(--config) to another temperature (--temperature) or System (--target-config)."
    )
    p.add_argument(
        "samples",
        nargs="?",
        help="an npz from `openmm-nice sample` (x, log_w, u); or give --traj instead",
    )
    p.add_argument(
        "--traj",
        help="an MD trajectory to reweight (.npz with x in nm, or any mdtraj format such as .dcd)",
    )
    p.add_argument(
        "--config",
        help="the config of the state the frames come from (system, temperature); needed with "
        "--traj; for a sample file it names the system instead of --run",
    )
    p.add_argument(
        "--temperature",
        type=float,
        help="with --traj: the target temperature in K (default: that of --target-config)",
    )
    p.add_argument(
        "--target-config",
        help="with --traj: a config whose system (at its temperature, unless --temperature) is "
        "the target state; it must have the same atoms in the same order",
    )
    p.add_argument("--out", required=True, help="folder for CSV, PNG and summary.json")
    p.add_argument("--run", help="the run folder of a sample file, for molecules and exact answers")
    p.add_argument(
        "--coordinates", default="all", help="toy targets: comma-separated indices to profile"
    )
    p.add_argument("--bins", type=int, default=60, help="toy targets: bins of each profile")
    p.add_argument(
        "--observable",
        action="append",
        default=[],
        help="molecules: dihedral:i,j,k,l or angle:i,j,k (radians) or distance:i,j (nm), "
        "0-based atom indices; its mean with an error; repeatable",
    )
    p.add_argument("--n-bootstrap", type=int, default=200, help="resamples for error bars")
    p.add_argument(
        "--block-size",
        type=int,
        help="frames per bootstrap block (correlated frames need blocks longer than their "
        "correlation time); default 1 for a sample file, a twentieth of the frames for --traj",
    )
    p.add_argument("--stride", type=int, default=1, help="with --traj: use every k-th frame")
    p.add_argument(
        "--batch-size", type=int, default=8192, help="with --traj: frames per energy evaluation"
    )


# --- files -------------------------------------------------------------------------------------


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
            raise UserInputError(
                f"{path} lacks {', '.join(missing)}; it is not a sample file of `openmm-nice "
                "sample` (an MD trajectory is reweighted with --traj FILE --config CONFIG)"
            )
        x, log_w, u = data["x"], data["log_w"], data["u"]
    if x.ndim != 2 or log_w.shape != (len(x),) or u.shape != (len(x),):
        raise UserInputError(
            f"{path}: x {x.shape}, log_w {log_w.shape}, u {u.shape} do not have the shapes "
            "(N, d), (N,), (N,) of a sample file"
        )
    return x, log_w, u


def load_trajectory(path: str | Path, topology: Any, stride: int = 1) -> np.ndarray:
    """Frames (F, 3N) in nm (float64) of an MD trajectory, checked against ``topology``.

    Arguments:
        path: An npz with ``x`` of shape (F, 3N) in nm (as `openmm-nice md` writes), or any
            trajectory mdtraj reads (.dcd, .xtc, .trr, .nc, .h5, .pdb).
        topology: The mdtraj Topology of the system the frames are of.
        stride: Keep every ``stride``-th frame.
    """
    import mdtraj

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"trajectory {path} does not exist; make one with `openmm-nice md CONFIG --out FILE`"
        )
    if stride < 1:
        raise UserInputError(f"--stride must be at least 1, got {stride}")
    n_atoms = topology.n_atoms
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "x" not in data:
                raise UserInputError(f"{path} has no array 'x' of frames (F, {3 * n_atoms}) in nm")
            x = np.asarray(data["x"][::stride], dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != 3 * n_atoms:
            raise UserInputError(
                f"frames in {path} have shape {x.shape}, but the system has {n_atoms} atoms, "
                f"so frames of shape (F, {3 * n_atoms}); pass the --config the frames were made with"
            )
    else:
        try:
            traj = mdtraj.load(str(path), top=topology, stride=stride)
        except OSError as error:
            raise UserInputError(f"mdtraj cannot read {path}: {error}") from None
        except ValueError as error:
            raise UserInputError(
                f"{path} does not match the system's {n_atoms} atoms ({error}); pass the "
                "--config the trajectory was made with"
            ) from None
        if traj.n_atoms != n_atoms:
            raise UserInputError(
                f"{path} has {traj.n_atoms} atoms but the system has {n_atoms}; pass the "
                "--config the trajectory was made with"
            )
        x = traj.xyz.astype(np.float64).reshape(traj.n_frames, -1)
    if len(x) == 0:
        raise UserInputError(f"{path} holds no frames")
    return x


# --- statistics ---------------------------------------------------------------------------------


def _spread(values) -> float:
    """Standard deviation of bootstrap replicates, inf if over a tenth are not finite.

    A region that many resamples miss entirely has no finite free energy in them.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) < 0.9 * len(values) or len(finite) < 2:
        return math.inf
    return float(np.std(finite, ddof=1))


def _weights(log_w: np.ndarray | None, n: int) -> np.ndarray:
    """Self-normalised weights, or uniform ones for direct estimates."""
    return np.full(n, 1.0 / n) if log_w is None else normalized_weights(log_w)


def region_free_energy(
    inside,
    log_w=None,
    n_bootstrap: int = 200,
    block_size: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    r"""Population p of a region and its free energy relative to the rest, with errors.

    :math:`\Delta F = F_{in} - F_{out} = -\log \frac{p}{1 - p}` in kT. Both errors are the
    spread of the same (block) bootstrap replicates, so the error of :math:`\Delta F` holds
    where p is small and its linearisation does not.

    Arguments:
        inside: Boolean mask (N,) of the samples in the region.
        log_w: Importance log-weights (N,), or None for direct (unweighted) samples.
        n_bootstrap: Bootstrap resamples.
        block_size: Consecutive samples per bootstrap block (see :func:`bootstrap`).

    Returns:
        ``{"p", "p_error", "df_kT", "df_error_kT"}``; ``df_kT`` is inf when no sample is in the
        region (and -inf when all are).

    Example:
        >>> r = region_free_energy(np.arange(100) < 20, n_bootstrap=50)
        >>> round(r["p"], 12), round(r["df_kT"], 6) == round(-math.log(0.2 / 0.8), 6)
        (0.2, True)
    """
    inside = np.asarray(inside, dtype=bool)
    w = _weights(log_w, len(inside))
    if w.shape != inside.shape:
        raise UserInputError(
            f"mask {inside.shape} and log-weights {w.shape} must have the same shape"
        )
    p = float(np.sum(w[inside]))

    def population(i: np.ndarray) -> float:
        total = w[i].sum()
        return float(np.sum(w[i] * inside[i]) / total) if total > 0 else math.nan

    replicates = np.array(bootstrap(population, len(inside), n_bootstrap, block_size, seed))
    with np.errstate(divide="ignore", invalid="ignore"):
        df = -np.log(replicates / (1.0 - replicates))
        value = -math.log(p / (1.0 - p)) if 0.0 < p < 1.0 else (math.inf if p == 0 else -math.inf)
    return {
        "p": p,
        "p_error": _spread(replicates),
        "df_kT": value,
        "df_error_kT": _spread(df) if math.isfinite(value) else math.inf,
    }


def _wrap(angle):
    """Angles wrapped onto [-pi, pi)."""
    return (np.asarray(angle) + math.pi) % (2.0 * math.pi) - math.pi


def observable_mean(
    values,
    log_w=None,
    circular: bool = False,
    n_bootstrap: int = 200,
    block_size: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    r"""The (weighted) mean of an observable with a (block) bootstrap error.

    For a periodic quantity (``circular=True``, radians) the mean is the circular one,
    :math:`\operatorname{atan2}(\langle\sin\rangle, \langle\cos\rangle)`, and its error the spread
    of the replicates' wrapped differences from it: an arithmetic mean of dihedrals near
    :math:`\pm\pi` would land near 0, where no sample is.

    Example:
        >>> m = observable_mean(np.array([3.1, -3.1]), circular=True, n_bootstrap=10)
        >>> round(abs(m["mean"]), 3)
        3.142
    """
    f = np.asarray(values, dtype=np.float64)
    w = _weights(log_w, len(f))
    if w.shape != f.shape:
        raise UserInputError(f"values {f.shape} and log-weights {w.shape} must have the same shape")
    if circular:
        s, c = np.sin(f), np.cos(f)

        def mean(i: np.ndarray) -> float:
            return float(np.arctan2(np.sum(w[i] * s[i]), np.sum(w[i] * c[i])))

        value = mean(np.arange(len(f)))
        replicates = _wrap(np.array(bootstrap(mean, len(f), n_bootstrap, block_size, seed)) - value)
    else:

        def mean(i: np.ndarray) -> float:
            total = w[i].sum()
            return float(np.sum(w[i] * f[i]) / total) if total > 0 else math.nan

        value = mean(np.arange(len(f)))
        replicates = np.array(bootstrap(mean, len(f), n_bootstrap, block_size, seed))
    return {"mean": value, "error": _spread(replicates)}


def jensen_shannon_divergence(p, q) -> float:
    r"""Jensen-Shannon divergence (natural log) of two histograms of the same bins.

    :math:`JS = \tfrac12 KL(p \| m) + \tfrac12 KL(q \| m)`, :math:`m = (p + q)/2`, each histogram
    normalised to sum 1 first; it lies in :math:`[0, \log 2]`.

    Example:
        >>> jensen_shannon_divergence([1, 1, 0], [1, 1, 0])
        0.0
        >>> round(jensen_shannon_divergence([1, 0], [0, 1]) / math.log(2), 12)
        1.0
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise UserInputError(f"histograms of {p.shape} and {q.shape} bins cannot be compared")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise UserInputError("histograms must be non-negative with a positive total")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        keep = a > 0
        return float(np.sum(a[keep] * np.log(a[keep] / m[keep])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


# --- free-energy maps -----------------------------------------------------------------------------


@dataclass
class FreeEnergyMap:
    """A 2-D free-energy map on [-pi, pi]^2 in kT, shifted to minimum 0.

    Attributes:
        edges: (bins + 1,) bin edges in radians, the same along both axes.
        probability: (bins, bins) probability of each bin, [i, j] for a in bin i, b in bin j.
        free_energy: (bins, bins) -log probability, minimum 0; +inf where a bin is empty.
        error: (bins, bins) bootstrap error of ``free_energy``; NaN where too few resamples
            reach the bin (or no bootstrap was asked for).
    """

    edges: np.ndarray
    probability: np.ndarray
    free_energy: np.ndarray
    error: np.ndarray

    @property
    def centers(self) -> np.ndarray:
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    def to_csv(self, path: str | Path, names: tuple[str, str] = ("phi_rad", "psi_rad")) -> None:
        """One row per bin: centre along a, centre along b, probability, F (kT), error (kT)."""
        c = self.centers
        rows = [f"{names[0]},{names[1]},probability,free_energy_kT,error_kT"]
        rows += [
            f"{c[i]:.6f},{c[j]:.6f},{self.probability[i, j]:.8g},"
            f"{self.free_energy[i, j]:.6g},{self.error[i, j]:.4g}"
            for i in range(len(c))
            for j in range(len(c))
        ]
        atomic_write_text(path, "\n".join(rows) + "\n")


def _histogram2d(a: np.ndarray, b: np.ndarray, w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    hist, _, _ = np.histogram2d(a, b, bins=[edges, edges], weights=w)
    return hist / hist.sum()


def free_energy_map(
    a,
    b,
    log_w=None,
    bins: int = RAMACHANDRAN_BINS,
    n_bootstrap: int = 0,
    block_size: int = 1,
    seed: int = 0,
) -> FreeEnergyMap:
    r"""The free-energy map :math:`F(a, b) = -\log p(a, b)` of two angles, direct or weighted.

    Arguments:
        a, b: Angles in radians in [-pi, pi], shape (N,) (e.g. phi and psi).
        log_w: Importance log-weights (N,), or None for the direct histogram.
        bins: Bins per axis on [-pi, pi].
        n_bootstrap: Resamples for the error of each bin (0: no errors).
        block_size: Consecutive samples per bootstrap block (see :func:`bootstrap`).

    Example:
        >>> m = free_energy_map(np.array([-3.0, -3.0, 0.1]), np.array([0.1, 0.1, 0.1]), bins=2)
        >>> m.probability.tolist()
        [[0.0, 0.6666666666666666], [0.0, 0.3333333333333333]]
        >>> round(float(m.free_energy[1, 1]), 6) == round(math.log(2), 6)
        True
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise UserInputError(
            f"angles must be two arrays of the same shape (N,), got {a.shape}, {b.shape}"
        )
    if bins < 1:
        raise UserInputError(f"bins must be at least 1, got {bins}")
    for name, angle in (("a", a), ("b", b)):
        if not np.all(np.abs(angle) <= math.pi + 1e-9):
            raise UserInputError(
                f"angle {name} has values outside [-pi, pi]; pass radians (np.deg2rad for degrees)"
            )
    w = _weights(log_w, len(a))
    if w.shape != a.shape:
        raise UserInputError(f"angles {a.shape} and log-weights {w.shape} must have the same shape")
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    p = _histogram2d(a, b, w, edges)
    with np.errstate(divide="ignore"):
        f = -np.log(p)
    shift = np.min(f[np.isfinite(f)])
    error = np.full_like(p, np.nan)
    if n_bootstrap:

        def free_energy(i: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore", invalid="ignore"):
                return -np.log(_histogram2d(a[i], b[i], w[i], edges)) - shift

        boots = np.array(bootstrap(free_energy, len(a), n_bootstrap, block_size, seed))
        finite = np.isfinite(boots)
        count = finite.sum(axis=0)
        safe = np.where(finite, boots, 0.0)
        mean = safe.sum(axis=0) / np.maximum(count, 1)
        var = (np.where(finite, boots - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count - 1, 1)
        error = np.where(count > 1, np.sqrt(var), np.nan)
    return FreeEnergyMap(edges, p, f - shift, error)


# --- molecular observables ----------------------------------------------------------------------


def _trajectory(x: np.ndarray, topology: Any):
    import mdtraj

    return mdtraj.Trajectory(x.reshape(len(x), topology.n_atoms, 3), topology)


def ramachandran(x: np.ndarray, topology: Any) -> tuple[np.ndarray, np.ndarray]:
    """Backbone dihedrals (phi, psi) in radians of frames x (N, 3 n_atoms) of a dipeptide.

    For a longer peptide these are the first residue's phi and psi.
    """
    import mdtraj

    traj = _trajectory(x, topology)
    _, phi = mdtraj.compute_phi(traj)
    _, psi = mdtraj.compute_psi(traj)
    if phi.shape[1] == 0 or psi.shape[1] == 0:
        raise UserInputError("the molecule has no backbone phi/psi dihedral")
    return phi[:, 0].astype(np.float64), psi[:, 0].astype(np.float64)


_OBSERVABLE_ATOMS = {"distance": 2, "angle": 3, "dihedral": 4}
_OBSERVABLE_UNITS = {"distance": "nm", "angle": "rad", "dihedral": "rad"}


def parse_observable(spec: str, n_atoms: int) -> tuple[str, list[int]]:
    """``"dihedral:4,6,8,14"`` -> ("dihedral", [4, 6, 8, 14]), checked against n_atoms."""
    usage = "use dihedral:i,j,k,l, angle:i,j,k or distance:i,j with 0-based atom indices"
    kind, _, atoms = spec.partition(":")
    if kind not in _OBSERVABLE_ATOMS:
        raise UserInputError(f"unknown observable {spec!r}; {usage}")
    try:
        indices = [int(a) for a in atoms.split(",")]
    except ValueError:
        raise UserInputError(f"bad atom indices in observable {spec!r}; {usage}") from None
    if len(indices) != _OBSERVABLE_ATOMS[kind]:
        raise UserInputError(
            f"observable {spec!r}: a {kind} needs {_OBSERVABLE_ATOMS[kind]} atoms, got "
            f"{len(indices)}; {usage}"
        )
    bad = [i for i in indices if not 0 <= i < n_atoms]
    if bad:
        raise UserInputError(
            f"observable {spec!r}: atom indices {bad} are out of range for {n_atoms} atoms "
            f"(0 to {n_atoms - 1})"
        )
    if len(set(indices)) != len(indices):
        raise UserInputError(f"observable {spec!r} repeats an atom; {usage}")
    return kind, indices


def compute_observable(spec: str, x: np.ndarray, topology: Any) -> np.ndarray:
    """Values (N,) of an observable spec (see :func:`parse_observable`) on frames x (N, 3n)."""
    import mdtraj

    kind, indices = parse_observable(spec, topology.n_atoms)
    compute = {
        "distance": mdtraj.compute_distances,
        "angle": mdtraj.compute_angles,
        "dihedral": mdtraj.compute_dihedrals,
    }[kind]
    return compute(_trajectory(x, topology), [indices])[:, 0].astype(np.float64)


# --- trajectory reweighting ---------------------------------------------------------------------


def reduced_energies(energy: Any, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """U = E/kT (N,) of frames x (N, 3n) in nm through an :class:`OpenMMEnergy`, in batches."""
    import torch

    if batch_size < 1:
        raise UserInputError(f"batch size must be at least 1, got {batch_size}")
    out = np.empty(len(x))
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            out[start : start + len(chunk)] = energy(chunk).double().numpy()
    return out


def reweight_trajectory(
    x: np.ndarray,
    source_energy: Any,
    target_energy: Any = None,
    target_temperature: float | None = None,
    batch_size: int = 8192,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Log-weights of frames of the source state for the target state.

    :math:`\log w_i = -U_{target}(x_i) + U_{source}(x_i)`, U = E/kT of each state. For the same
    System at another temperature (``target_energy`` None) the energy is evaluated once and
    :math:`U_{target} = U_{source} T_{source} / T_{target}` exactly, so the same temperature gives
    :math:`\log w = 0` exactly.

    Arguments:
        x: Frames (N, 3n) in nm, sampled from the source state.
        source_energy: The :class:`OpenMMEnergy` of the source state (System, temperature).
        target_energy: The :class:`OpenMMEnergy` of a target System at its temperature, or
            None for the source System at ``target_temperature``.
        target_temperature: The target temperature in K when ``target_energy`` is None.
        batch_size: Frames per energy evaluation.

    Returns:
        (log_w, u_source, u_target), each of shape (N,); a frame the target cannot evaluate
        (infinite or NaN energy) gets log w = -inf.
    """
    u_source = reduced_energies(source_energy, x, batch_size)
    bad = ~np.isfinite(u_source)
    if bad.any():
        raise UserInputError(
            f"{int(bad.sum())} of {len(x)} frames have an infinite or NaN energy in the source "
            "state, so they cannot have been sampled from it; check that --config is the state "
            "the trajectory was run in"
        )
    if target_energy is None:
        if target_temperature is None:
            raise UserInputError("give a target energy or a target temperature")
        from openmm import unit

        t_source = source_energy.temperature.value_in_unit(unit.kelvin)
        ratio = t_source / float(target_temperature)
        u_target = u_source * ratio
        log_w = u_source * (1.0 - ratio)
    else:
        u_target = reduced_energies(target_energy, x, batch_size)
        with np.errstate(invalid="ignore"):
            log_w = u_source - u_target
    log_w = np.where(np.isnan(log_w) | np.isposinf(log_w), -np.inf, log_w)
    return log_w, u_source, u_target


# --- the command --------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Non-finite floats as null (JSON has no inf or NaN); numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _log_z_summary(log_w: np.ndarray, n_bootstrap: int, block_size: int) -> dict:
    def log_z(i: np.ndarray) -> float:
        return log_partition_function(log_w[i]) if np.isfinite(log_w[i]).any() else math.nan

    return {
        "n": int(len(log_w)),
        "ess": effective_sample_size(log_w) / len(log_w),
        "log_z": log_partition_function(log_w),
        "log_z_error": _spread(bootstrap(log_z, len(log_w), n_bootstrap, block_size)),
    }


def _toy_report(x: np.ndarray, log_w: np.ndarray, args: argparse.Namespace, out: Path, target):
    report = {}
    indices = (
        range(x.shape[1])
        if args.coordinates == "all"
        else [int(i) for i in args.coordinates.split(",")]
    )
    for i in indices:
        if not 0 <= i < x.shape[1]:
            raise UserInputError(
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
        inside = x[:, index] < barrier
        (p_direct, e_direct), (p_weighted, e_weighted) = (
            probability(inside),
            probability(inside, log_w),
        )
        report[f"p(x{index}<{barrier:g})"] = {
            "direct": {"value": p_direct, "error": e_direct},
            "reweighted": {"value": p_weighted, "error": e_weighted},
            "exact": target.energy.probability_below(index, barrier),
        }
    return report


def _molecule_report(
    x: np.ndarray,
    log_w: np.ndarray,
    topology: Any,
    args: argparse.Namespace,
    out: Path,
    block_size: int,
    labels: dict[str, str],
) -> dict:
    """Ramachandran maps, phi > 0 population and free energy, and observables, both ways."""
    specs = [(spec, parse_observable(spec, topology.n_atoms)[0]) for spec in args.observable]
    weightings = {"direct": None, "reweighted": log_w}
    stats = {"n_bootstrap": args.n_bootstrap, "block_size": block_size}
    report: dict[str, Any] = {"labels": labels}
    try:
        phi, psi = ramachandran(x, topology)
    except ValueError as error:
        report["ramachandran"] = f"skipped: {error}"
    else:
        maps, populations = {}, {}
        for label, lw in weightings.items():
            fmap = free_energy_map(phi, psi, lw, RAMACHANDRAN_BINS, **stats)
            fmap.to_csv(out / f"ramachandran_{label}.csv")
            maps[labels[label]] = (fmap.edges, fmap.edges, fmap.free_energy)
            populations[label] = region_free_energy(phi > 0, lw, **stats)
        plot_free_energy_map(maps, out / "ramachandran.png")
        report["ramachandran"] = {
            "bins": RAMACHANDRAN_BINS,
            "files": ["ramachandran_direct.csv", "ramachandran_reweighted.csv", "ramachandran.png"],
        }
        report["phi>0"] = populations
    report["observables"] = {}
    for spec, kind in specs:
        values = compute_observable(spec, x, topology)
        report["observables"][spec] = {
            "unit": _OBSERVABLE_UNITS[kind],
            **{
                label: observable_mean(values, lw, circular=kind == "dihedral", **stats)
                for label, lw in weightings.items()
            },
        }
    return report


def _check_mode(args: argparse.Namespace) -> None:
    """Exactly one of a sample file or --traj, and only the options that mode uses."""
    if (args.samples is None) == (args.traj is None):
        raise UserInputError(
            "give either a sample file (`reweight SAMPLES.npz --run RUN`) or an MD trajectory "
            "(`reweight --traj MD.dcd --config CONFIG --temperature T`), not "
            + ("both" if args.samples else "neither")
        )
    if args.traj is not None:
        if args.config is None:
            raise UserInputError(
                "--traj needs --config, the config of the state the trajectory was run in"
            )
        if args.temperature is None and args.target_config is None:
            raise UserInputError(
                "--traj needs a target state: --temperature T_NEW (same System) and/or "
                "--target-config OTHER.yaml"
            )
        if args.run is not None:
            raise UserInputError("--run is for sample files; with --traj give --config instead")
    else:
        if args.temperature is not None or args.target_config is not None:
            raise UserInputError(
                "--temperature and --target-config reweight an MD trajectory: give it with "
                "--traj FILE --config CONFIG instead of a sample file"
            )
        if args.run is not None and args.config is not None:
            raise UserInputError("give the sample file's system by --run or by --config, not both")
    if args.temperature is not None and not (
        math.isfinite(args.temperature) and args.temperature > 0
    ):
        raise UserInputError(f"--temperature must be positive (kelvin), got {args.temperature}")
    if args.block_size is not None and args.block_size < 1:
        raise UserInputError(f"--block-size must be at least 1, got {args.block_size}")
    if args.n_bootstrap < 2:
        raise UserInputError(f"--n-bootstrap must be at least 2, got {args.n_bootstrap}")


def _samples_command(args: argparse.Namespace, out: Path) -> dict:
    x, log_w, _ = load_samples(args.samples)
    target = None
    if args.run:
        from openmm_nice.runs import load_run

        _, target, _ = load_run(Path(args.run))
    elif args.config:
        from openmm_nice.config import load_config
        from openmm_nice.targets import build_target

        target = build_target(load_config(args.config))
    block_size = args.block_size or 1
    try:
        summary = {"mode": "samples", "samples": str(args.samples)}
        summary.update(_log_z_summary(log_w, args.n_bootstrap, block_size))
        if target is not None and target.is_molecule:
            topology = target.mdtraj_topology()
            if x.shape[1] != 3 * topology.n_atoms:
                raise UserInputError(
                    f"samples in {args.samples} have dimension {x.shape[1]}, but {target.name} "
                    f"has {topology.n_atoms} atoms ({3 * topology.n_atoms} coordinates); give the "
                    "run or config the samples were drawn from"
                )
            labels = {"direct": "direct", "reweighted": "importance-sampled"}
            summary.update(_molecule_report(x, log_w, topology, args, out, block_size, labels))
        else:
            if args.observable:
                raise UserInputError(
                    "--observable needs a molecular system; give the sample file's --run or "
                    "--config"
                )
            summary.update(_toy_report(x, log_w, args, out, target))
    finally:
        if target is not None:
            target.close()
    return summary


def _elements(topology: Any) -> list[str]:
    return [atom.element.symbol if atom.element else "?" for atom in topology.atoms()]


def _check_stored_energies(path: str | Path, stride: int, u_source: np.ndarray, t_source: float):
    """An npz of `openmm-nice md` stores u = E/kT of its own state: it must be --config's."""
    if Path(path).suffix != ".npz":
        return
    with np.load(path) as data:
        if "u" not in data:
            return
        stored = np.asarray(data["u"][::stride], dtype=np.float64)
    if stored.shape != u_source.shape:
        return
    difference = float(np.median(np.abs(stored - u_source)))
    if difference > 1e-3 + 1e-4 * float(np.median(np.abs(u_source))):
        raise UserInputError(
            f"the reduced energies u stored in {path} differ from E/kT of --config's state "
            f"({t_source:g} K) by {difference:.3g} kT (median); give the --config (system and "
            "temperature) the trajectory was run with"
        )


def _trajectory_command(args: argparse.Namespace, out: Path) -> dict:
    import mdtraj

    from openmm_nice.config import load_config
    from openmm_nice.md import molecular_system
    from openmm_nice.targets import openmm_energy_for

    source_config = load_config(args.config)
    source = molecular_system(source_config)
    target_config = load_config(args.target_config) if args.target_config else None
    target = molecular_system(target_config) if target_config else None
    if target is not None and _elements(target.topology) != _elements(source.topology):
        raise UserInputError(
            f"--target-config's system {target.name} ({target.n_atoms} atoms) does not have the "
            f"same atoms in the same order as --config's {source.name} ({source.n_atoms} "
            "atoms); reweighting needs both Systems to describe the same particles"
        )
    t_source = source_config.temperature
    t_target = args.temperature if args.temperature is not None else target_config.temperature
    topology = mdtraj.Topology.from_openmm(source.topology)
    for spec in args.observable:  # fail before the energies, not after
        parse_observable(spec, topology.n_atoms)
    x = load_trajectory(args.traj, topology, args.stride)
    block_size = args.block_size or max(1, len(x) // 20)
    source_energy = openmm_energy_for(source_config, source.system, t_source)
    target_energy = None
    if target is not None:
        target_energy = openmm_energy_for(target_config, target.system, t_target)
    try:
        log_w, u_source, u_target = reweight_trajectory(
            x, source_energy, target_energy, t_target, args.batch_size
        )
    finally:
        source_energy.close()
        if target_energy is not None:
            target_energy.close()
    _check_stored_energies(args.traj, args.stride, u_source, t_source)
    save_samples(out / "reweighted.npz", x, log_w, u_target, u_source=u_source)
    target_name = target.name if target is not None else source.name
    summary = {
        "mode": "trajectory",
        "trajectory": str(args.traj),
        "source": {"system": source.name, "temperature_K": t_source, "config": args.config},
        "target": {
            "system": target_name,
            "temperature_K": t_target,
            "config": args.target_config,
        },
    }
    stats = _log_z_summary(log_w, args.n_bootstrap, block_size)
    summary.update(
        {
            "n": stats["n"],
            "ess": stats["ess"],
            "log_z_ratio": stats["log_z"],
            "log_z_ratio_error": stats["log_z_error"],
            "delta_f_kT": 0.0 - stats["log_z"],
            "delta_f_error_kT": stats["log_z_error"],
            "block_size": block_size,
            "weights_file": "reweighted.npz",
        }
    )
    labels = {
        "direct": f"source: {source.name} at {t_source:g} K",
        "reweighted": f"reweighted: {target_name} at {t_target:g} K",
    }
    summary.update(_molecule_report(x, log_w, topology, args, out, block_size, labels))
    return summary


def reweight_command(args: argparse.Namespace) -> int:
    """`openmm-nice reweight`: writes CSV, PNG and summary.json to --out and prints the summary.

    In trajectory mode ``log_z_ratio`` is :math:`\\log (Z_{target} / Z_{source})`, the log-mean of
    the weights, and ``delta_f_kT`` = -``log_z_ratio`` the reduced free-energy difference
    :math:`f_{target} - f_{source}`; ``ess`` is ESS/N.
    """
    _check_mode(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = _trajectory_command(args, out) if args.traj else _samples_command(args, out)
    summary["null_means"] = "not finite, e.g. the free energy of a region no resample reaches"
    text = json.dumps(_json_safe(summary), indent=2, allow_nan=False)
    atomic_write_text(out / "summary.json", text + "\n")
    print(text)
    return 0
