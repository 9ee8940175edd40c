"""What `openmm-nice reweight` writes: estimates of weighted samples, or of MD frames reweighted
to another state, as CSV, PNG and summary.json."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from openmm_nice.analysis.free_energy import RAMACHANDRAN_BINS, free_energy_map, free_energy_profile
from openmm_nice.analysis.observables import (
    OBSERVABLE_UNITS,
    compute_observable,
    parse_observable,
    ramachandran,
)
from openmm_nice.analysis.reweighting import (
    N_BOOTSTRAP,
    bootstrap,
    bootstrap_spread,
    expectation,
    log_partition_function,
    region_free_energy,
)
from openmm_nice.analysis.state_reweighting import reweight_frames
from openmm_nice.analysis.weight_diagnostics import (
    WeightDiagnostics,
    diagnose_region,
    diagnose_weights,
)
from openmm_nice.config import Config
from openmm_nice.errors import ConfigError, UserInputError
from openmm_nice.io import atomic_write_text, load_samples, read_frames, save_samples
from openmm_nice.runs import Run, load_run, load_target

__all__ = ["reweight_samples", "reweight_trajectories"]

PathLike = str | os.PathLike


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


def _write_summary(out: Path, summary: dict) -> dict:
    summary["null_means"] = "not finite, e.g. the free energy of a region no resample reaches"
    text = json.dumps(_json_safe(summary), indent=2, allow_nan=False)
    atomic_write_text(out / "summary.json", text + "\n")
    return summary


def _check_statistics(n_bootstrap: int, block_size: int | None) -> None:
    if n_bootstrap < 2:
        raise UserInputError(f"n_bootstrap must be at least 2, got {n_bootstrap}")
    if block_size is not None and block_size < 1:
        raise UserInputError(f"block_size must be at least 1, got {block_size}")


def _weights_summary(diagnostics: WeightDiagnostics) -> dict:
    """The weights' figures at the top of summary.json (``ess``, ``max_weight_share``,
    ``pareto_k``: a contract), and a warning where they cannot be trusted."""
    summary = diagnostics.as_dict()
    if not diagnostics.reliable:
        summary["warning"] = (
            "the importance-sampled estimates below rest on weights that fail the tail "
            f"diagnostic: {diagnostics.verdict}"
        )
    return summary


def _region_tail(log_w: np.ndarray, inside: np.ndarray, diagnostics: WeightDiagnostics) -> dict:
    """A region's estimate's own tail diagnostic (``weight_diagnostics.diagnose_region``): its
    ``reliable`` and ``verdict``, the effective sample sizes and the Pareto k inside and
    outside the region."""
    region = diagnose_region(log_w, inside, diagnostics)
    return {
        "reliable": region.reliable,
        "verdict": region.verdict,
        "ess_inside": region.ess_inside,
        "ess_outside": region.ess_outside,
        "pareto_k_inside": region.pareto_k_inside,
        "pareto_k_outside": region.pareto_k_outside,
    }


def _warn_of_regions(summary: dict, report: dict, diagnostics: WeightDiagnostics) -> None:
    """Where the weights pass as a whole but a region's estimate fails its own diagnostic, a
    ``warning`` in the summary naming the regions and why."""
    regions = [
        name
        for name, entry in report.items()
        if isinstance(entry, dict)
        and isinstance(entry.get("reweighted"), dict)
        and entry["reweighted"].get("reliable") is False
        and "verdict" in entry["reweighted"]
    ]
    if diagnostics.reliable and regions:
        summary["warning"] = (
            f"the weights pass as a whole, but the importance-sampled estimates of "
            f"{', '.join(regions)} fail their own tail diagnostic: "
            + "; ".join(f"{r}: {report[r]['reweighted']['verdict']}" for r in regions)
        )


def _log_z_summary(
    log_w: np.ndarray, diagnostics: WeightDiagnostics, n_bootstrap: int, block_size: int
) -> dict:
    def log_z(i: np.ndarray) -> float:
        return log_partition_function(log_w[i]) if np.isfinite(log_w[i]).any() else math.nan

    return {
        **_weights_summary(diagnostics),
        "log_z": log_partition_function(log_w),
        "log_z_error": bootstrap_spread(bootstrap(log_z, len(log_w), n_bootstrap, block_size)),
    }


def _toy_report(
    x: np.ndarray,
    log_w: np.ndarray,
    out: Path,
    target,
    coordinates: Sequence[int] | None,
    bins: int,
    n_bootstrap: int,
    block_size: int,
    diagnostics: WeightDiagnostics,
) -> dict:
    """Free-energy profiles of each coordinate, and the populations of the target's wells."""
    from openmm_nice.analysis.plots import plot_profiles

    report = {}
    for i in range(x.shape[1]) if coordinates is None else coordinates:
        if not 0 <= i < x.shape[1]:
            raise UserInputError(
                f"coordinate {i} is out of range for samples of dimension {x.shape[1]}"
            )
        s = x[:, i]
        lo, hi = np.quantile(s, [0.0005, 0.9995])
        stats = {"bins": bins, "range": (lo, hi), "n_bootstrap": n_bootstrap}
        direct = free_energy_profile(s, None, block_size=block_size, **stats)
        weighted = free_energy_profile(s, log_w, block_size=block_size, **stats)
        direct.to_csv(out / f"profile_x{i}_direct.csv", header=f"x{i}")
        weighted.to_csv(out / f"profile_x{i}_reweighted.csv", header=f"x{i}")
        plot_profiles(
            {"direct": direct, "importance-sampled": weighted},
            out / f"profile_x{i}.png",
            f"x{i}",
            caption=f"importance weights: {diagnostics.caption()}",
        )
    for index, barrier in getattr(target.energy, "wells", ()) if target else ():
        inside = x[:, index] < barrier
        stats = {"n_bootstrap": n_bootstrap, "block_size": block_size}
        report[f"p(x{index}<{barrier:g})"] = {
            "direct": region_free_energy(inside, **stats),
            "reweighted": {
                **region_free_energy(inside, log_w, **stats),
                **_region_tail(log_w, inside, diagnostics),
            },
            "exact": target.energy.probability_below(index, barrier),
        }
    return report


def _molecule_report(
    x: np.ndarray,
    log_w: np.ndarray,
    topology: Any,
    out: Path,
    observables: Sequence[str],
    n_bootstrap: int,
    block_size: int,
    labels: dict[str, str],
    diagnostics: WeightDiagnostics,
) -> dict:
    """Ramachandran maps, phi > 0 population and free energy, and observables, both ways."""
    from openmm_nice.analysis.plots import plot_ramachandran

    specs = [(spec, parse_observable(spec, topology.n_atoms)[0]) for spec in observables]
    weightings = {"direct": None, "reweighted": log_w}
    stats = {"n_bootstrap": n_bootstrap, "block_size": block_size}
    report: dict[str, Any] = {"labels": labels}
    try:
        phi, psi = ramachandran(x, topology)
    except UserInputError as error:
        report["ramachandran"] = f"skipped: {error}"
    else:
        maps, populations = {}, {}
        for label, lw in weightings.items():
            fmap = free_energy_map(phi, psi, lw, RAMACHANDRAN_BINS, **stats)
            fmap.to_csv(out / f"ramachandran_{label}.csv")
            maps[labels[label]] = (fmap.edges, fmap.edges, fmap.free_energy)
            populations[label] = region_free_energy(phi > 0, lw, **stats)
        populations["reweighted"].update(_region_tail(log_w, phi > 0, diagnostics))
        plot_ramachandran(
            maps, out / "ramachandran.png", caption=f"importance weights: {diagnostics.caption()}"
        )
        report["ramachandran"] = {
            "bins": RAMACHANDRAN_BINS,
            "files": ["ramachandran_direct.csv", "ramachandran_reweighted.csv", "ramachandran.png"],
        }
        report["phi>0"] = populations
    report["observables"] = {}
    for spec, kind in specs:
        values = compute_observable(spec, x, topology)
        report["observables"][spec] = {"unit": OBSERVABLE_UNITS[kind]}
        for label, lw in weightings.items():
            mean, error = expectation(values, lw, circular=kind == "dihedral", **stats)
            report["observables"][spec][label] = {"mean": mean, "error": error}
        report["observables"][spec]["reweighted"]["reliable"] = diagnostics.reliable
    return report


def reweight_samples(
    samples: PathLike,
    out: PathLike,
    *,
    run: PathLike | Run | None = None,
    config: Config | None = None,
    coordinates: Sequence[int] | None = None,
    bins: int = 60,
    observables: Sequence[str] = (),
    n_bootstrap: int = N_BOOTSTRAP,
    block_size: int = 1,
) -> dict:
    """Direct and importance-sampled estimates of a sample file, written to the folder ``out``.

    For a molecule: Ramachandran free-energy maps (``ramachandran_{direct,reweighted}.csv``,
    ``ramachandran.png``), the population of phi > 0 and its free energy, and the means of
    ``observables``. For a toy target: a free-energy profile per coordinate
    (``profile_x{i}_{direct,reweighted}.csv``, ``profile_x{i}.png``) and, where the target
    knows them, its wells' populations beside the exact ones. Always ESS/N and log Z.

    Arguments:
        samples: A sample file (``openmm-nice sample``: x, log_w, u).
        out: The folder to write.
        run: The run the samples were drawn from (a folder or a loaded :class:`Run`), which
            names the system; or give ``config`` instead, or neither for a toy without exact
            answers.
        config: The config of the system the samples are of.
        coordinates: Toy targets: the coordinates to profile (all by default).
        bins: Toy targets: bins of each profile.
        observables: Molecules: ``dihedral:i,j,k,l``, ``angle:i,j,k`` (radians) or
            ``distance:i,j`` (nm), 0-based atom indices.
        n_bootstrap: Resamples for the error bars.
        block_size: Consecutive samples per bootstrap block.

    Returns:
        The summary, as written to ``out/summary.json`` (non-finite numbers as null there).
    """
    _check_statistics(n_bootstrap, block_size)
    if run is not None and config is not None:
        raise UserInputError("give the sample file's system by its run or by a config, not both")
    x, log_w, _ = load_samples(samples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(run, Run):
        target, owned = run.target, False
    elif run is not None:
        target, owned = load_run(run).target, True
    else:
        target, owned = (load_target(config), True) if config is not None else (None, False)
    try:
        diagnostics = diagnose_weights(log_w)
        summary = {"mode": "samples", "samples": str(samples)}
        summary.update(_log_z_summary(log_w, diagnostics, n_bootstrap, block_size))
        if target is not None and target.is_molecule:
            topology = target.mdtraj_topology()
            if x.shape[1] != 3 * topology.n_atoms:
                raise UserInputError(
                    f"samples in {samples} have dimension {x.shape[1]}, but {target.name} has "
                    f"{topology.n_atoms} atoms ({3 * topology.n_atoms} coordinates); give the "
                    "run or config the samples were drawn from"
                )
            labels = {"direct": "direct", "reweighted": "importance-sampled"}
            report = _molecule_report(
                x, log_w, topology, out, observables, n_bootstrap, block_size, labels, diagnostics
            )
        else:
            if observables:
                raise UserInputError(
                    "observables need a molecular system; give the sample file's run or config"
                )
            report = _toy_report(
                x, log_w, out, target, coordinates, bins, n_bootstrap, block_size, diagnostics
            )
        summary.update(report)
        _warn_of_regions(summary, report, diagnostics)
    finally:
        if owned:
            target.close()
    return _write_summary(out, summary)


def _elements(topology: Any) -> list[str]:
    return [atom.element.symbol if atom.element else "?" for atom in topology.atoms()]


def _check_stored_energies(path: PathLike, stride: int, u_source: np.ndarray, t_source: float):
    """An npz of `openmm-nice md` stores u = E/kT of its own state: it must be its config's."""
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
            f"the reduced energies u stored in {path} differ from E/kT of its config's state "
            f"({t_source:g} K) by {difference:.3g} kT (median); give the config (system and "
            "temperature) the trajectory was run with"
        )


def _openmm_energy(config: Config, system, temperature: float):
    from openmm_nice.targets import openmm_energy_for

    try:
        return openmm_energy_for(config, system, temperature)
    except ValueError as error:  # the System or the platform the config names
        raise ConfigError(str(error)) from error


def reweight_trajectories(
    trajectories: Sequence[PathLike],
    configs: Sequence[Config],
    out: PathLike,
    *,
    temperature: float | None = None,
    target_config: Config | None = None,
    observables: Sequence[str] = (),
    n_bootstrap: int = N_BOOTSTRAP,
    block_size: int | None = None,
    stride: int = 1,
    batch_size: int = 8192,
) -> dict:
    r"""MD frames of one or several states reweighted to a target state, written to ``out``.

    The frames of every trajectory are pooled and weighted for the target by EXP (one source
    state) or MBAR (several), see :mod:`openmm_nice.analysis.state_reweighting`; ``out`` gets
    ``reweighted.npz`` (``x``, ``log_w``, ``u`` in the target state, ``u_source`` in each frame's
    own state, ``source``), the Ramachandran maps, populations and observables of
    :func:`reweight_samples` (source frames direct, and reweighted), and summary.json with
    ESS/N and ``log_z_ratio`` :math:`= \log (Z_t / Z_1)`, ``delta_f_kT`` :math:`= f_t - f_1`
    (state 1: the first trajectory's).

    Arguments:
        trajectories: MD trajectories (npz with x in nm, or any mdtraj format).
        configs: The config of each trajectory's state (system and temperature); one config
            for all of them means they share one state.
        out: The folder to write.
        temperature: The target temperature in K (default: ``target_config``'s).
        target_config: A config whose system (at its temperature, unless ``temperature``) is
            the target state; it must have the same atoms in the same order. Without it the
            target is the first config's System at ``temperature``.
        observables: As in :func:`reweight_samples`.
        n_bootstrap: Resamples for the error bars.
        block_size: Frames per bootstrap block (correlated frames need blocks longer than their
            correlation time); default a twentieth of the shortest trajectory.
        stride: Use every ``stride``-th frame.
        batch_size: Frames per energy evaluation.

    Returns:
        The summary, as written to ``out/summary.json`` (non-finite numbers as null there).
    """
    import mdtraj

    from openmm_nice.sampling.md import molecular_system

    _check_statistics(n_bootstrap, block_size)
    if not trajectories:
        raise UserInputError("give at least one trajectory to reweight")
    if len(configs) not in (1, len(trajectories)):
        raise UserInputError(
            f"{len(trajectories)} trajectories need one config each, or one for all; got "
            f"{len(configs)}"
        )
    if temperature is None and target_config is None:
        raise UserInputError("give a target state: a temperature and/or a target config")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise UserInputError(f"the target temperature must be positive (kelvin), got {temperature}")
    states = [molecular_system(config) for config in configs]
    target = molecular_system(target_config) if target_config is not None else None
    for other in [*states[1:], *([target] if target is not None else [])]:
        if _elements(other.topology) != _elements(states[0].topology):
            raise UserInputError(
                f"the system {other.name} ({other.n_atoms} atoms) does not have the same atoms "
                f"in the same order as {states[0].name} ({states[0].n_atoms} atoms); "
                "reweighting needs every System to describe the same particles"
            )
    t_target = temperature if temperature is not None else target_config.temperature
    topology = mdtraj.Topology.from_openmm(states[0].topology)
    for spec in observables:  # fail before the energies, not after
        parse_observable(spec, topology.n_atoms)
    per_file = [read_frames(path, topology, "trajectory", stride) for path in trajectories]
    frames = per_file if len(configs) > 1 else [np.concatenate(per_file)]
    block_size = block_size or max(1, min(len(f) for f in frames) // 20)
    energies = [_openmm_energy(c, s.system, c.temperature) for c, s in zip(configs, states)]
    try:
        if target is not None:
            energies.append(_openmm_energy(target_config, target.system, t_target))
        weights = reweight_frames(
            frames,
            energies[: len(states)],
            energies[len(states)] if target is not None else None,
            t_target,
            batch_size,
        )
    finally:
        for energy in energies:
            energy.close()
    offsets = np.cumsum([0] + [len(f) for f in per_file])
    for k, path in enumerate(trajectories):
        state = k if len(configs) > 1 else 0
        u_own = weights.u_kn[state, offsets[k] : offsets[k + 1]]
        _check_stored_energies(path, stride, u_own, configs[state].temperature)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x = np.concatenate(frames)
    save_samples(
        out / "reweighted.npz",
        x,
        weights.log_w,
        weights.u_target,
        u_source=weights.u_source,
        source=weights.source,
    )
    target_name = target.name if target is not None else states[0].name
    log_z_ratio, log_z_ratio_error = weights.log_z_ratio(n_bootstrap, block_size)
    diagnostics = diagnose_weights(weights.log_w)
    summary = {
        "mode": "trajectory",
        "estimator": weights.estimator,
        "sources": [
            {
                "trajectories": [str(p) for p in trajectories]
                if len(configs) == 1
                else [str(trajectories[k])],
                "system": state.name,
                "temperature_K": config.temperature,
                "frames": len(frames[k]),
                "f_kT": float(weights.f_k[k]),
            }
            for k, (state, config) in enumerate(zip(states, configs))
        ],
        "target": {"system": target_name, "temperature_K": t_target},
        **_weights_summary(diagnostics),
        "log_z_ratio": log_z_ratio,
        "log_z_ratio_error": log_z_ratio_error,
        "delta_f_kT": 0.0 - log_z_ratio,
        "delta_f_error_kT": log_z_ratio_error,
        "block_size": block_size,
        "weights_file": "reweighted.npz",
    }
    sources = ", ".join(f"{s.name} at {c.temperature:g} K" for s, c in zip(states, configs))
    labels = {
        "direct": f"source: {sources}",
        "reweighted": f"reweighted: {target_name} at {t_target:g} K",
    }
    report = _molecule_report(
        x, weights.log_w, topology, out, observables, n_bootstrap, block_size, labels, diagnostics
    )
    summary.update(report)
    _warn_of_regions(summary, report, diagnostics)
    return _write_summary(out, summary)
