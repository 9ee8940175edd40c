"""The `openmm-nice` command: train, sample, sweep, reweight, md, mcmc."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from openmm_nice.ais import sample_as_configured
from openmm_nice.config import Config, ConfigError, config_from_dict, load_config
from openmm_nice.distributed import Ranks, init_distributed, shutdown_distributed
from openmm_nice.io import atomic_write_text, load_checkpoint, save_samples, write_trajectory
from openmm_nice.reporters import (
    CheckpointReporter,
    MetricsReporter,
    ProgressReporter,
    SnapshotReporter,
)
from openmm_nice.reweighting import bootstrap_error, effective_sample_size, log_partition_function
from openmm_nice.targets import Target, build_generator, build_target, build_trainer, load_frames

__all__ = ["main", "train_run", "load_run", "evaluate"]

CHECKPOINT_FORMAT = 1


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for but torch sees no CUDA GPU; use --device cpu"
        )
    return device


def evaluate(generator, n: int, seed: int = 12345) -> dict:
    """ESS/N, log Z^ with its bootstrap error, and J_R with its standard error on n fresh latents."""
    rng = torch.Generator(device=generator.device).manual_seed(seed)
    _, log_w = generator.sample(n, generator=rng)
    log_w = log_w.double().cpu().numpy()
    neg = -log_w
    finite = np.isfinite(neg)
    j_r = float(neg.mean()) if finite.all() else math.inf
    return {
        "n": n,
        "ess": effective_sample_size(log_w) / n,
        "log_z": log_partition_function(log_w),
        "log_z_error": bootstrap_error(log_partition_function, log_w, n_bootstrap=100),
        "j_r": j_r,
        "j_r_error": float(neg.std(ddof=1) / math.sqrt(n)) if finite.all() else math.nan,
    }


def train_run(
    config: Config, out: Path, resume: bool = False, quiet: bool = False, n_eval: int = 20000
) -> dict:
    """Train ``config`` into the run folder ``out``; return its summary.

    Under torchrun every rank trains on ``batch_size / world_size`` latents of its own seed,
    DistributedDataParallel averages the gradients, and rank 0 alone writes files.
    """
    ranks = init_distributed(config.device)
    try:
        summary = _train_ranked(config, Path(out), resume, quiet, n_eval, ranks)
        if ranks.distributed:
            # rank 0 evaluates and writes while the others wait: tearing the process group down
            # under a rank that still holds it aborts that rank
            torch.distributed.barrier()
        return summary
    finally:
        shutdown_distributed()


def _train_ranked(
    config: Config, out: Path, resume: bool, quiet: bool, n_eval: int, ranks: Ranks
) -> dict:
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not resume:
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    if resume and not checkpoint.exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out}; start the run without --resume")
    if config.training.batch_size % ranks.world_size:
        raise ValueError(
            f"training.batch_size ({config.training.batch_size}) must be divisible by the number "
            f"of processes ({ranks.world_size})"
        )
    local = config_from_dict(config.to_dict())
    local.training.batch_size = config.training.batch_size // ranks.world_size
    if ranks.distributed and torch.device(config.device).type == "cuda":
        local.device = f"cuda:{ranks.local_rank}"
    torch.manual_seed(config.seed)  # the same initial model on every rank
    target = build_target(local)
    try:
        frames = load_frames(config.training.data, target) if config.training.data else None
        state = load_checkpoint(checkpoint) if resume else None
        start = int(state["step"]) if state else 0
        reporters = []
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
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
            "system": target.name,
            "processes": ranks.world_size,
        }
        summary.update(evaluate(trainer.generator, n_eval))
        _exact_answers(target, summary)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        _run_plots(out, target, trainer.generator)
        return summary
    finally:
        target.close()


def _checkpoint_extra(config: Config) -> dict:
    return {"format": CHECKPOINT_FORMAT, "config": config.to_dict()}


def _exact_answers(target: Target, summary: dict) -> None:
    try:
        log_z = target.energy.log_partition_function()
    except NotImplementedError:
        return
    summary["log_z_exact"] = log_z
    summary["kl_bound"] = summary["j_r"] + log_z


def _run_plots(out: Path, target: Target, generator) -> None:
    """The run's pictures: loss curves; Figure 1 of the note for 1D toys; Ramachandran maps."""
    from openmm_nice.plots import plot_free_energy_map, plot_metrics, plot_note_figure

    plot_metrics(out / "metrics.csv", out / "loss.png")
    if target.energy.dim != 1 and not target.is_molecule:
        return
    rng = torch.Generator(device=generator.device).manual_seed(1)
    x, log_w = generator.sample(100_000 if not target.is_molecule else 20_000, generator=rng)
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
    from openmm_nice.analysis import free_energy_map, ramachandran

    try:
        phi, psi = ramachandran(x, target.mdtraj_topology())
    except ValueError:
        return  # no backbone: nothing to map
    maps = {}
    for label, weights in (("direct", None), ("importance-sampled", log_w)):
        fmap = free_energy_map(phi, psi, weights)
        maps[label] = (fmap.edges, fmap.edges, fmap.free_energy)
    plot_free_energy_map(maps, out / "ramachandran.png")


def load_run(run: Path, device: str | None = None):
    """Rebuild (config, target, generator) of a trained run folder from its checkpoint."""
    state = load_checkpoint(Path(run) / "checkpoint.pt")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{run}/checkpoint.pt has format {state.get('format')}, expected {CHECKPOINT_FORMAT}"
        )
    config = config_from_dict(state["config"])
    if device is not None:
        config.device = device
    _device(config.device)
    target = build_target(config)
    generator = build_generator(config, target)
    generator.load_state_dict(state["model"])
    generator.eval()
    return config, target, generator


def _cmd_train(args) -> int:
    out = Path(args.out)
    if args.resume:
        config = load_config(out / "config.yaml")
    else:
        config = load_config(args.config)
    if args.steps is not None and args.resume:
        config.training.steps = args.steps  # the schedule already under way stays as it is
    elif args.steps is not None:
        config.set_steps(args.steps)
    if args.seed is not None:
        config.seed = args.seed
    if args.device is not None:
        config.device = args.device
    _device(config.device)
    summary = train_run(config, out, resume=args.resume, quiet=args.quiet)
    if summary and not args.quiet:
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_sample(args) -> int:
    config, target, generator = load_run(Path(args.run), args.device)
    try:
        rng = torch.Generator(device=generator.device).manual_seed(args.seed)
        result = sample_as_configured(
            generator, args.n, config.sampling, args.ais_steps, args.batch_size, rng, not args.quiet
        )
        x, log_w, u = result.x, result.log_w, result.u
        extra, report = {}, {}
        ais_steps = len(result.step_sizes)
        if ais_steps:
            extra = {"ais_steps": np.int64(ais_steps)}
            report = {"ais_steps": ais_steps, "ais_acceptance": float(result.acceptance.mean())}
        x = x.double().cpu().numpy()
        log_w = log_w.double().cpu().numpy()
        u = u.double().cpu().numpy()
        save_samples(args.out, x, log_w, u, **extra)
        if args.traj:
            if not target.is_molecule:
                raise ValueError(
                    f"--traj needs a molecular system; {target.name!r} is a toy target"
                )
            write_trajectory(args.traj, x, target.mdtraj_topology())
        ess = effective_sample_size(log_w) / len(log_w)
        if not args.quiet:
            print(
                json.dumps(
                    {
                        "n": args.n,
                        "ess": ess,
                        "log_z": log_partition_function(log_w),
                        **report,
                        "out": args.out,
                    }
                )
            )
    finally:
        target.close()
    return 0


def _cmd_sweep(args) -> int:
    base = load_config(args.config)
    dims = [int(v) for v in args.latent_dims.split(",") if v.strip()]
    if not dims:
        raise ValueError("--latent-dims needs a comma-separated list such as 1,2,4")
    out = Path(args.out)
    rows = []
    for dim in dims:
        config = config_from_dict(base.to_dict())
        config.model.latent_dim = dim
        if args.steps is not None:
            config.set_steps(args.steps)
        run = out / f"latent_dim_{dim}"
        summary = train_run(
            config,
            run,
            resume=(run / "checkpoint.pt").exists(),
            quiet=args.quiet,
            n_eval=args.n_eval,
        )
        rows.append({"latent_dim": dim, **summary})
        if not args.quiet:
            print(
                f"D = {dim}: J_R = {summary['j_r']:.4f} +- {summary['j_r_error']:.4f}  ESS/N = {summary['ess']:.3f}"
            )
    finite = [r for r in rows if math.isfinite(r["j_r"])]
    if not finite:
        raise RuntimeError(
            "every latent dimension gave an infinite J_R; train longer or check the energy"
        )
    best = min(finite, key=lambda r: r["j_r"])
    keys = [
        "latent_dim",
        "j_r",
        "j_r_error",
        "ess",
        "log_z",
        "log_z_error",
        "kl_bound",
        "training_time_s",
    ]
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    atomic_write_text(out / "sweep.csv", "\n".join(lines) + "\n")
    result = {"chosen_latent_dim": best["latent_dim"], "results": rows}
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2) + "\n")
    print(f"{'D':>4} {'J_R (nats)':>12} {'error':>8} {'ESS/N':>7}")
    for r in rows:
        print(f"{r['latent_dim']:>4} {r['j_r']:>12.4f} {r['j_r_error']:>8.4f} {r['ess']:>7.3f}")
    print(f"chosen latent_dim: {best['latent_dim']} (smallest J_R)")
    return 0


def _cmd_reweight(args) -> int:
    from openmm_nice.analysis import reweight_command

    return reweight_command(args)


def _cmd_md(args) -> int:
    from openmm_nice.md import md_command

    return md_command(args)


def _cmd_mcmc(args) -> int:
    from openmm_nice.moves import run_chain, write_chain

    result = run_chain(
        args.run,
        args.n_iterations,
        args.langevin_steps,
        n_proposals=args.proposals,
        timestep_fs=args.timestep,
        collision_rate_per_ps=args.collision_rate,
        temperature=args.temperature,
        seed=args.seed,
        progress=not args.quiet,
    )
    data = write_chain(args.out, result)
    if not args.quiet:
        report = {
            "iterations": len(result.u),
            "langevin_steps": result.langevin_steps,
            "proposals": result.n_proposals,
            "acceptance": result.acceptance,
            "temperature_K": result.temperature,
            "wall_time_s": result.wall_time_s,
            "out": args.out,
            "data": str(data),
        }
        print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openmm-nice", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a Boltzmann generator from a YAML config")
    p.add_argument("config", nargs="?", help="the YAML config (not needed with --resume)")
    p.add_argument("--out", required=True, help="the run folder (checkpoint.pt, metrics.csv, ...)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument(
        "--steps",
        type=int,
        help=(
            "override training.steps; a new run's anneal longer than 5/8 of them is shortened "
            "to that, so that training ends at the target temperature"
        ),
    )
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--device", help="override device (cpu, cuda, cuda:1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="draw samples with importance weights from a trained run")
    p.add_argument("run", help="the run folder written by `train`")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="the npz file (x, log_w, u)")
    p.add_argument("--traj", help="also write a trajectory (.dcd, .h5, .xtc, .pdb) for molecules")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument(
        "--ais-steps",
        type=int,
        help="levels of annealed importance sampling in latent space after each draw (one "
        "MALA move each, exact weights); default: the run's sampling.ais_steps; 0: the model's "
        "one-shot weights",
    )
    p.add_argument("--device", help="override the run's device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "sweep", help="train one model per latent dimension D and pick the smallest J_R"
    )
    p.add_argument("config")
    p.add_argument("--latent-dims", required=True, help="comma-separated D values, e.g. 1,2,4")
    p.add_argument(
        "--out", required=True, help="folder for one run per D, sweep.csv and sweep.json"
    )
    p.add_argument("--steps", type=int, help="override training.steps")
    p.add_argument("--n-eval", type=int, default=20000, help="fresh latents for J_R and its error")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "reweight", help="weighted observables and free-energy profiles from samples"
    )
    from openmm_nice.analysis import add_reweight_arguments

    add_reweight_arguments(p)
    p.set_defaults(func=_cmd_reweight)

    p = sub.add_parser("md", help="plain OpenMM Langevin MD of a config's system")
    p.add_argument("config")
    p.add_argument("--out", required=True, help="trajectory file (.dcd, .h5, .xtc) or .npz")
    p.add_argument("--steps", type=int, help="override md.steps")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument(
        "--temperature", type=float, help="thermostat temperature in K (default: the config's)"
    )
    p.add_argument(
        "--start", help="start from a frame of this file (.npz with x, or a trajectory / PDB)"
    )
    p.add_argument(
        "--start-frame", type=int, default=-1, help="which frame of --start (default: the last)"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_md)

    p = sub.add_parser(
        "mcmc",
        help="an openmmtools Markov chain of Langevin dynamics and the generator's exact "
        "Metropolis-Hastings move",
    )
    p.add_argument("run", help="the run folder written by `train` (a molecule)")
    p.add_argument("--n-iterations", type=int, required=True, help="iterations, a frame each")
    p.add_argument(
        "--langevin-steps",
        type=int,
        required=True,
        help="Langevin steps per iteration (0: the generator's move alone)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the trajectory (.dcd, .xtc, .h5, ...); beside it an .npz of the same name with "
        "x, u (E/kT), phi, psi, accepted proposals per iteration and the acceptance",
    )
    p.add_argument(
        "--proposals",
        type=int,
        default=1,
        help="generator proposals per iteration (0: Langevin dynamics alone)",
    )
    p.add_argument(
        "--timestep", type=float, help="Langevin time step in fs (default: md.timestep_fs)"
    )
    p.add_argument(
        "--collision-rate",
        type=float,
        help="Langevin collision rate in 1/ps (default: md.friction_per_ps)",
    )
    p.add_argument(
        "--temperature", type=float, help="the chain's temperature in K (default: the run's)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the proposals and the Langevin noise")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_mcmc)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and not args.resume and args.config is None:
        parser.error("train needs a CONFIG (or --resume with --out RUN)")
    started = time.time()
    try:
        code = args.func(args)
    except (ConfigError, ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"openmm-nice {args.command}: error: {error}", file=sys.stderr)
        return 2
    if not getattr(args, "quiet", False):
        print(f"done in {time.time() - started:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
