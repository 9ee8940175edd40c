"""Run folders: train a config into one, load it back, sample it as configured, sweep D."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from openmm_nice.analysis.reweighting import (
    bootstrap_error,
    effective_sample_size,
    log_partition_function,
)
from openmm_nice.analysis.weight_diagnostics import WeightDiagnostics, diagnose_weights
from openmm_nice.config import Config, config_from_dict, saved_run_config
from openmm_nice.errors import ConfigError, UserInputError
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.io import atomic_write_text, load_checkpoint, save_samples, write_trajectory
from openmm_nice.sampling.ais import sample_as_configured
from openmm_nice.targets import Target, build_generator, build_target, build_trainer, load_frames
from openmm_nice.training.distributed import Ranks, process_group
from openmm_nice.training.reporters import (
    CheckpointReporter,
    MetricsReporter,
    ProgressReporter,
    SnapshotReporter,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "Run",
    "Samples",
    "check_device",
    "config_differences",
    "evaluate",
    "load_run",
    "load_target",
    "sample_run",
    "sweep_latent_dims",
    "train_run",
]

CHECKPOINT_FORMAT = 1
"""The layout of ``RUN/checkpoint.pt`` that :func:`load_run` reads."""

PathLike = str | os.PathLike


def check_device(name: str) -> torch.device:
    """The torch device ``name``, refused with a clear error when it is a GPU torch cannot see.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            f"device {name!r} was asked for but torch sees no CUDA GPU; use --device cpu"
        )
    return device


def load_target(config: Config) -> Target:
    """The target ``config.system`` names: its energy (an OpenMMEnergy with the config's
    platform and workers for molecules), and its molecule; ``close()`` it when done.

    Building it raises ``ValueError`` only for what the config names (an unknown system, options
    its energy refuses, a force field that cannot parameterise the PDB, a System or platform
    OpenMM refuses), so those reach the user as :class:`~openmm_nice.errors.ConfigError`.
    """
    try:
        return build_target(config)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _frames(config: Config, target: Target) -> torch.Tensor | None:
    """The MD frames of ``training.data``, or None; files that do not fit are the user's."""
    if not config.training.data:
        return None
    try:
        return load_frames(config.training.data, target)
    except ValueError as error:
        raise ConfigError(f"training.data: {error}") from error


def evaluate(model: BoltzmannGenerator, n: int, seed: int = 12345) -> dict:
    r"""ESS/N, log Z^ with its bootstrap error, and J_R with its standard error on n fresh
    latents: the figures of a run's summary.json.

    Arguments:
        model: The Boltzmann generator.
        n: Number of fresh samples.
        seed: Seed of the latents.

    Returns:
        ``{"n", "ess", "max_weight_share", "pareto_k", "pareto_k_threshold", "block_ess",
        "reliable", "verdict", "n_zero_weight", "log_z", "log_z_error", "j_r", "j_r_error"}``
        (the weights' figures as :func:`~openmm_nice.analysis.weight_diagnostics.diagnose_weights`
        gives them); ``j_r`` is :math:`E[-\log w]` in nats, inf when a sample has zero weight.
    """
    rng = torch.Generator(device=model.device).manual_seed(seed)
    _, log_w = model.sample(n, rng=rng)
    log_w = log_w.double().cpu().numpy()
    neg = -log_w
    finite = bool(np.isfinite(neg).all())
    weights = diagnose_weights(log_w).as_dict()
    return {
        "n": n,
        **{key: value for key, value in weights.items() if key != "n"},
        "log_z": log_partition_function(log_w),
        "log_z_error": bootstrap_error(log_partition_function, log_w),
        "j_r": float(neg.mean()) if finite else math.inf,
        "j_r_error": float(neg.std(ddof=1) / math.sqrt(n)) if finite else math.nan,
    }


def train_run(
    config: Config, out: PathLike, resume: bool = False, quiet: bool = False, n_eval: int = 20000
) -> dict:
    """Train ``config`` into the run folder ``out``; return its summary.

    The folder gets ``checkpoint.pt``, ``config.yaml`` (the resolved config), ``metrics.csv``,
    ``summary.json`` (see :func:`evaluate`, plus the exact log Z and the KL bound where the
    target knows them) and plots. Under torchrun every rank trains on
    ``batch_size / world_size`` latents of its own seed, DistributedDataParallel averages the
    gradients, and rank 0 alone writes files; the process group is joined if it exists, else
    created, and destroyed at the end only if this call created it.

    Arguments:
        config: The validated config.
        out: The run folder; it must not hold a run unless ``resume``.
        resume: Continue the run in ``out`` from its checkpoint.
        quiet: No progress bar.
        n_eval: Fresh samples for the summary's estimates (and a molecule's Ramachandran plot).

    Returns:
        The summary (an empty dict on ranks other than 0).
    """
    check_device(config.device)
    with process_group(config.device) as ranks:
        summary = _train_ranked(config, Path(out), resume, quiet, n_eval, ranks)
        if ranks.distributed:
            # rank 0 evaluates and writes while the others wait: tearing the process group down
            # under a rank that still holds it aborts that rank
            torch.distributed.barrier()
        return summary


def _train_ranked(
    config: Config, out: Path, resume: bool, quiet: bool, n_eval: int, ranks: Ranks
) -> dict:
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not resume:
        raise FileExistsError(
            f"{out} already holds a run; continue it (--resume, resume=True), or choose another "
            "run folder"
        )
    if resume and not checkpoint.exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out}; start the run without --resume")
    if config.training.batch_size % ranks.world_size:
        raise ConfigError(
            f"training.batch_size ({config.training.batch_size}) must be divisible by the number "
            f"of processes ({ranks.world_size})"
        )
    local = config_from_dict(config.to_dict())
    local.training.batch_size = config.training.batch_size // ranks.world_size
    if ranks.distributed and torch.device(config.device).type == "cuda":
        local.device = f"cuda:{ranks.local_rank}"
    torch.manual_seed(config.seed)  # the same initial model on every rank
    target = load_target(local)
    try:
        frames = _frames(config, target)
        state = load_checkpoint(checkpoint) if resume else None
        if state is not None:
            _check_resumed_config(config, state, checkpoint)
        start = int(state["step"]) if state else 0
        reporters = []
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if not resume:  # a resumed run keeps the config.yaml that produced it
                config.save(out / "config.yaml")
            reporters = [
                MetricsReporter(
                    out / "metrics.csv",
                    config.training.report_interval,
                    resume_step=start if resume else None,
                ),
                CheckpointReporter(
                    checkpoint, config.training.checkpoint_interval, extra=_checkpoint_extra(config)
                ),
                ProgressReporter(config.training.steps, 10, initial=start, disable=quiet),
            ]
            if config.training.snapshot_interval:
                reporters.append(
                    SnapshotReporter(
                        out / "snapshots",
                        config.training.snapshot_interval,
                        extra=_checkpoint_extra(config),
                    )
                )
        trainer = build_trainer(
            local, target, frames, reporters, seed=config.seed + 1000 * ranks.rank
        )
        if state is not None:
            trainer.load_state_dict(state)
            if ranks.rank > 0:  # the checkpoint holds rank 0's random state; others reseed
                trainer.rng.manual_seed(config.seed + 1000 * ranks.rank + trainer.step)
        trainer.run()
        if not ranks.is_main:
            return {}
        if trainer.step == 0 or not checkpoint.exists():
            reporters[1].report(trainer, {})
        summary = {
            "steps": trainer.step,
            "training_time_s": trainer.elapsed,
            "energy_evaluations": trainer.generator.energy.evaluation_count,
            "non_finite_energies": trainer.non_finite_energies,
            "system": target.name,
            "processes": ranks.world_size,
        }
        summary.update(evaluate(trainer.generator, n_eval))
        _exact_answers(target, summary)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        _run_plots(out, target, trainer.generator, n_eval)
        return summary
    finally:
        target.close()


RESUME_MAY_DIFFER = frozenset({"device", "n_workers"})
"""Config keys a resumed run may change: where it runs, not what it computes."""


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("system", "platform_properties"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(a: Config | dict, b: Config | dict) -> list[str]:
    """The dotted keys whose values differ between two configs (sections compared key by key).

    Example:
        >>> config_differences(Config(seed=1), Config(seed=2, device="cpu"))
        ['seed']
    """
    flat_a = _flat(a.to_dict() if isinstance(a, Config) else a)
    flat_b = _flat(b.to_dict() if isinstance(b, Config) else b)
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def _check_resumed_config(config: Config, state: dict, checkpoint: Path) -> None:
    """A resumed run is exact or refused: its config may differ from the checkpoint's only in
    where it runs (:data:`RESUME_MAY_DIFFER`)."""
    saved = state.get("config")
    if saved is None:
        return  # a checkpoint of an older version stored no config
    saved = saved_run_config(saved)
    differ = [k for k in config_differences(config, saved) if k not in RESUME_MAY_DIFFER]
    if differ:
        raise ConfigError(
            f"--resume: the config differs from the one {checkpoint} was trained with in "
            f"{', '.join(differ)}; a resumed run continues with its own config "
            "(`openmm-nice train --resume --out RUN`), or train the new config into a new run "
            "folder"
        )


def _checkpoint_extra(config: Config) -> dict:
    return {"format": CHECKPOINT_FORMAT, "config": config.to_dict()}


def _exact_answers(target: Target, summary: dict) -> None:
    try:
        log_z = target.energy.log_partition_function()
    except NotImplementedError:
        return
    summary["log_z_exact"] = log_z
    summary["kl_bound"] = summary["j_r"] + log_z


def _run_plots(out: Path, target: Target, model: BoltzmannGenerator, n: int) -> None:
    """The run's pictures: loss curves; Figure 1 of the note for 1D toys; Ramachandran maps of
    n samples for molecules."""
    from openmm_nice.analysis.plots import plot_metrics, plot_note_figure, plot_ramachandran

    plot_metrics(out / "metrics.csv", out / "loss.png")
    if target.energy.dim != 1 and not target.is_molecule:
        return
    rng = torch.Generator(device=model.device).manual_seed(1)
    x, log_w = model.sample(n if target.is_molecule else 100_000, rng=rng)
    x, log_w = x.double().cpu().numpy(), log_w.double().cpu().numpy()
    if not target.is_molecule:
        plot_note_figure(
            target.energy.potential,
            x[:, 0],
            log_w,
            target.energy.log_partition_function(),
            out / "figure1.png",
        )
        return
    from openmm_nice.analysis.free_energy import free_energy_map
    from openmm_nice.analysis.observables import ramachandran

    try:
        phi, psi = ramachandran(x, target.mdtraj_topology())
    except UserInputError:
        return  # no backbone: nothing to map
    maps = {}
    for label, weights in (("direct", None), ("importance-sampled", log_w)):
        fmap = free_energy_map(phi, psi, weights, n_bootstrap=0)  # the picture needs no errors
        maps[label] = (fmap.edges, fmap.edges, fmap.free_energy)
    caption = f"the final model's own weights: {diagnose_weights(log_w).caption()}"
    plot_ramachandran(maps, out / "ramachandran.png", caption=caption)


class Run(NamedTuple):
    """A trained run loaded from its folder: unpacks as ``config, target, generator``.

    Attributes:
        config: The config it was trained with (its device possibly overridden).
        target: The :class:`~openmm_nice.targets.Target` (energy, and molecule if any).
        generator: The trained :class:`~openmm_nice.flows.generator.BoltzmannGenerator`, in eval mode.

    ``close()``, or leaving a ``with`` block, stops the target's OpenMM worker processes.
    """

    config: Config
    target: Target
    generator: BoltzmannGenerator

    def close(self) -> None:
        self.target.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_run(run: PathLike, device: str | None = None) -> Run:
    """Rebuild the config, target and model of a run folder from its checkpoint.

    Arguments:
        run: A folder written by :func:`train_run` (``openmm-nice train``).
        device: Put the model on this device instead of the run's.

    Returns:
        A :class:`Run`.
    """
    state = load_checkpoint(Path(run) / "checkpoint.pt")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(
            f"{run}/checkpoint.pt has format {state.get('format')}, expected {CHECKPOINT_FORMAT}; "
            "it was written by another version of openmm-nice"
        )
    config = config_from_dict(saved_run_config(state["config"]))
    if device is not None:
        config.device = device
    check_device(config.device)
    target = load_target(config)
    model = build_generator(config, target)
    model.load_state_dict(state["model"])
    model.eval()
    return Run(config, target, model)


@dataclass
class Samples:
    """Samples of a run with exact importance weights.

    Attributes:
        x: (N, d) float64 in the target's coordinates (Cartesian nm, flattened in OpenMM atom
            order, for molecules).
        log_w: (N,) importance log-weights.
        u: (N,) reduced energies U = E/kT.
        ais_steps: Levels of latent-space AIS each sample went through (0: the model's own
            one-shot weights).
        ais_acceptance: (ais_steps,) mean Metropolis acceptance at each level.
    """

    x: np.ndarray
    log_w: np.ndarray
    u: np.ndarray
    ais_steps: int = 0
    ais_acceptance: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def ess(self) -> float:
        """The effective sample size over N (Kish)."""
        return effective_sample_size(self.log_w) / len(self.log_w)

    @property
    def diagnostics(self) -> WeightDiagnostics:
        """ESS/N in blocks, the largest weight's share, the Pareto k-hat, and their verdict."""
        return diagnose_weights(self.log_w)

    @property
    def log_z(self) -> float:
        """The importance estimate of the target's log Z."""
        return log_partition_function(self.log_w)

    def save(self, path: PathLike) -> None:
        """Write the sample file: ``x``, ``log_w``, ``u``, and ``ais_steps`` after AIS."""
        extra = {"ais_steps": np.int64(self.ais_steps)} if self.ais_steps else {}
        save_samples(path, self.x, self.log_w, self.u, **extra)


def sample_run(
    run: PathLike | Run,
    n: int,
    *,
    out: PathLike | None = None,
    traj: PathLike | None = None,
    ais_steps: int | None = None,
    ais_preconditioner: str | None = None,
    ais_schedule: str | None = None,
    batch_size: int = 65536,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
) -> Samples:
    """Draw n samples of a run as its config says (``sampling.ais_steps`` levels of AIS).

    Arguments:
        run: A run folder, or a :class:`Run` already loaded (left open).
        n: Number of samples.
        out: Also write the sample file (npz with ``x``, ``log_w``, ``u``) here.
        traj: Also write the samples as a trajectory (.dcd, .h5, .xtc, .pdb) of a molecule.
        ais_steps: Levels of latent-space AIS instead of the run's ``sampling.ais_steps``
            (0: the model's one-shot samples and weights).
        ais_preconditioner: ``"identity"`` or ``"fisher"`` instead of the run's
            ``sampling.ais_preconditioner``.
        ais_schedule: ``"linear"`` or ``"adaptive"`` instead of the run's
            ``sampling.ais_schedule``.
        batch_size: Samples per batch of one-shot draws.
        seed: Seed of the latents and of the AIS moves.
        device: With a run folder, load the model on this device instead of the run's.
        progress: Show a progress bar over the AIS batches.

    Returns:
        The :class:`Samples`.
    """
    loaded = run if isinstance(run, Run) else load_run(run, device)
    try:
        config, target, model = loaded
        if traj is not None and not target.is_molecule:
            raise UserInputError(
                f"a trajectory needs a molecular system; {target.name!r} is a toy target"
            )
        rng = torch.Generator(device=model.device).manual_seed(seed)
        result = sample_as_configured(
            model,
            n,
            config.sampling,
            ais_steps,
            batch_size,
            rng,
            progress,
            ais_preconditioner,
            ais_schedule,
        )
        samples = Samples(
            result.x.double().cpu().numpy(),
            result.log_w.double().cpu().numpy(),
            result.u.double().cpu().numpy(),
            len(result.step_sizes),
            result.acceptance.double().cpu().numpy(),
        )
        if out is not None:
            samples.save(out)
        if traj is not None:
            write_trajectory(traj, samples.x, target.mdtraj_topology())
        return samples
    finally:
        if loaded is not run:
            loaded.close()


SWEEP_COLUMNS = (
    "latent_dim",
    "j_r",
    "j_r_error",
    "ess",
    "max_weight_share",
    "pareto_k",
    "log_z",
    "log_z_error",
    "kl_bound",
    "training_time_s",
)


def sweep_latent_dims(
    config: Config,
    latent_dims: Sequence[int],
    out: PathLike,
    steps: int | None = None,
    n_eval: int = 20000,
    quiet: bool = False,
    on_result: Callable[[dict], None] | None = None,
) -> dict:
    """Train one run per latent dimension D and choose the smallest J_R (the note's Remark 2).

    Each D trains into ``out/latent_dim_D`` (an existing run there is resumed); ``out`` gets
    ``sweep.csv`` (one row per D, columns :data:`SWEEP_COLUMNS`) and ``sweep.json``.

    Arguments:
        config: The base config; ``model.latent_dim`` is replaced by each D.
        latent_dims: The candidate D values.
        out: The sweep's folder.
        steps: Training steps of each run instead of the config's (schedule shortened as by
            :meth:`~openmm_nice.config.Config.set_steps`).
        n_eval: Fresh latents for J_R and its error.
        quiet: No progress bars.
        on_result: Called with each D's row once its run is done.

    Returns:
        ``{"chosen_latent_dim": D, "results": [row per D]}``.
    """
    if not latent_dims:
        raise UserInputError("the sweep needs latent dimensions, e.g. 1,2,4")
    out = Path(out)
    rows = []
    for dim in latent_dims:
        run_config = config_from_dict(config.to_dict())
        run_config.model.latent_dim = int(dim)
        if steps is not None:
            run_config.set_steps(steps)
        run = out / f"latent_dim_{dim}"
        resume = (run / "checkpoint.pt").exists()
        summary = train_run(run_config, run, resume=resume, quiet=quiet, n_eval=n_eval)
        row = {"latent_dim": int(dim), **summary}
        rows.append(row)
        if on_result is not None:
            on_result(row)
    finite = [r for r in rows if math.isfinite(r["j_r"])]
    if not finite:
        raise RuntimeError(
            "every latent dimension gave an infinite J_R; train longer or check the energy"
        )
    best = min(finite, key=lambda r: r["j_r"])
    lines = [",".join(SWEEP_COLUMNS)]
    lines += [",".join(str(r.get(k, "")) for k in SWEEP_COLUMNS) for r in rows]
    atomic_write_text(out / "sweep.csv", "\n".join(lines) + "\n")
    result = {"chosen_latent_dim": best["latent_dim"], "results": rows}
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2) + "\n")
    return result
