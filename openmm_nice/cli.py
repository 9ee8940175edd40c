"""The `openmm-nice` command: train, sample, sweep, reweight, md, mcmc."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

from openmm_nice.analysis.reweighting import N_BOOTSTRAP
from openmm_nice.config import load_config
from openmm_nice.errors import UserInputError
from openmm_nice.runs import sample_run, sweep_latent_dims, train_run
from openmm_nice.training.trainer import TrainingInterrupted

__all__ = ["main", "build_parser"]


def _cmd_train(args) -> int:
    out = Path(args.out)
    if args.resume:
        if not (out / "checkpoint.pt").exists():
            raise UserInputError(
                f"--resume: no checkpoint in {out}; start the run without --resume"
            )
        # the run's own config unless another is given; train_run refuses any difference that
        # changes the result (--set, --steps, --seed, another CONFIG), never rewriting config.yaml
        if args.config is None:
            config = load_config(out / "config.yaml", args.set, saved_run=True)
        else:
            config = load_config(args.config, args.set)
    else:
        config = load_config(args.config, args.set)
    if args.steps is not None:
        config.set_steps(args.steps)
    if args.seed is not None:
        config.seed = args.seed
    if args.device is not None:
        config.device = args.device
    summary = train_run(config, out, resume=args.resume, quiet=args.quiet)
    if summary and not args.quiet:
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_sample(args) -> int:
    samples = sample_run(
        args.run,
        args.n,
        out=args.out,
        traj=args.traj,
        ais_steps=args.ais_steps,
        ais_preconditioner=args.ais_preconditioner,
        ais_schedule=args.ais_schedule,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    diagnostics = samples.diagnostics
    if not args.quiet:
        report = {"n": args.n, **diagnostics.as_dict(), "log_z": samples.log_z}
        if samples.ais_steps:
            report["ais_steps"] = samples.ais_steps
            report["ais_acceptance"] = float(samples.ais_acceptance.mean())
        print(json.dumps({**report, "out": args.out}))
    _warn_if_unreliable(diagnostics.reliable, diagnostics.verdict)
    return 0


def _warn_if_unreliable(reliable: bool, verdict: str) -> None:
    """The weights' verdict on stderr where it says they cannot be trusted (even with --quiet)."""
    if not reliable:
        print(f"openmm-nice: warning: importance weights {verdict}", file=sys.stderr)


def _latent_dims(text: str) -> list[int]:
    try:
        dims = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        dims = []
    if not dims:
        raise UserInputError(
            f"--latent-dims {text!r}: give a comma-separated list of integers such as 1,2,4"
        )
    return dims


def _cmd_sweep(args) -> int:
    def report(row: dict) -> None:
        if not args.quiet:
            print(
                f"D = {row['latent_dim']}: J_R = {row['j_r']:.4f} +- {row['j_r_error']:.4f}  "
                f"ESS/N = {row['ess']:.3f}, largest weight {row['max_weight_share']:.2g}, "
                f"Pareto k {row['pareto_k']:.2f}"
            )

    result = sweep_latent_dims(
        load_config(args.config, args.set),
        _latent_dims(args.latent_dims),
        args.out,
        steps=args.steps,
        n_eval=args.n_eval,
        quiet=args.quiet,
        on_result=report,
    )
    print(f"{'D':>4} {'J_R (nats)':>12} {'error':>8} {'ESS/N':>7} {'max w':>7} {'k':>5}")
    for r in result["results"]:
        print(
            f"{r['latent_dim']:>4} {r['j_r']:>12.4f} {r['j_r_error']:>8.4f} {r['ess']:>7.3f} "
            f"{r['max_weight_share']:>7.2g} {r['pareto_k']:>5.2f}"
        )
    print(f"chosen latent_dim: {result['chosen_latent_dim']} (smallest J_R)")
    return 0


def _check_reweight_mode(args) -> None:
    """Exactly one of a sample file or --traj, and only the options that mode uses."""
    if (args.samples is None) == (not args.traj):
        raise UserInputError(
            "give either a sample file (`reweight SAMPLES.npz --run RUN`) or an MD trajectory "
            "(`reweight --traj MD.dcd --config CONFIG --temperature T`), not "
            + ("both" if args.samples else "neither")
        )
    if args.traj:
        if not args.config:
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
        if len(args.config) > 1:
            raise UserInputError("a sample file takes one --config (or its --run)")


def _coordinates(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise UserInputError(
            f"--coordinates {text!r}: give 'all' or comma-separated indices such as 0,2"
        ) from None


def _cmd_reweight(args) -> int:
    from openmm_nice.reweight import reweight_samples, reweight_trajectories

    _check_reweight_mode(args)
    configs = [load_config(path, args.set) for path in args.config]
    statistics = {"n_bootstrap": args.n_bootstrap, "observables": args.observable}
    if args.traj:
        summary = reweight_trajectories(
            args.traj,
            configs,
            args.out,
            temperature=args.temperature,
            target_config=load_config(args.target_config, args.set) if args.target_config else None,
            block_size=args.block_size,
            stride=args.stride,
            batch_size=args.batch_size,
            **statistics,
        )
    else:
        summary = reweight_samples(
            args.samples,
            args.out,
            run=args.run,
            config=configs[0] if configs else None,
            coordinates=_coordinates(args.coordinates),
            bins=args.bins,
            block_size=args.block_size or 1,
            **statistics,
        )
    print((Path(args.out) / "summary.json").read_text(), end="")
    _warn_if_unreliable(summary["reliable"], summary["verdict"])
    if summary["reliable"] and "warning" in summary:  # a region's estimate fails its own check
        print(f"openmm-nice: warning: {summary['warning']}", file=sys.stderr)
    return 0


def _cmd_md(args) -> int:
    from openmm_nice.sampling.md import run_md_to_file

    config = load_config(args.config, args.set)
    if args.seed is not None:
        config.seed = args.seed
    if args.temperature is not None:
        if not args.temperature > 0:
            raise UserInputError(f"--temperature must be positive (kelvin), got {args.temperature}")
        config.temperature = float(args.temperature)
    command = ["openmm-nice", "md", str(args.config), "--out", str(args.out)]
    for override in args.set:
        command += ["--set", override]
    if args.steps is not None:
        command += ["--steps", str(args.steps)]
    if args.seed is not None:
        command += ["--seed", str(args.seed)]
    if args.temperature is not None:
        command += ["--temperature", f"{args.temperature:g}"]
    if args.start is not None:
        command += ["--start", str(args.start), "--start-frame", str(args.start_frame)]
    info = run_md_to_file(
        config,
        args.out,
        steps=args.steps,
        start=args.start,
        start_frame=args.start_frame,
        quiet=args.quiet,
        command=shlex.join(command),
    )
    if not args.quiet:
        print(json.dumps({k: v for k, v in info.items() if k != "config"}))
    return 0


def _cmd_mcmc(args) -> int:
    from openmm_nice.sampling.moves import run_chain, write_chain

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


def _add_set(p: argparse.ArgumentParser, configs: str = "the config") -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override a key of {configs} before it is validated, e.g. training.steps=10 or "
        "model.hidden=[32,32] (the value is read as YAML; relative paths against the config "
        "file's folder); repeatable",
    )


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        help="torch's threads in this process (the OpenMM worker processes are separate); "
        "default: OMP_NUM_THREADS where it is set, else 1: the models' operations are small, "
        "and on 2 CPU cores one thread trained the examples 2x faster than two "
        "(benchmarks/threads.py)",
    )


def _torch_threads(args) -> int | None:
    """The number of torch threads a command runs with: --threads, else 1 unless the user set
    OMP_NUM_THREADS (then torch's own choice, None)."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise UserInputError(f"--threads must be at least 1, got {threads}")
    if threads is None and "OMP_NUM_THREADS" not in os.environ and hasattr(args, "threads"):
        threads = 1
    return threads


@contextlib.contextmanager
def _torch_thread_count(threads: int | None):
    """torch's intra-op threads set to ``threads`` inside the block (unchanged for None), and
    restored after it, so that a caller of :func:`main` in Python keeps its own setting."""
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _version() -> str:
    from openmm_nice import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openmm-nice", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a Boltzmann generator from a YAML config")
    p.add_argument("config", nargs="?", help="the YAML config (not needed with --resume)")
    p.add_argument("--out", required=True, help="the run folder (checkpoint.pt, metrics.csv, ...)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out with its own config; a CONFIG, --set, "
        "--steps or --seed that changes it is refused (--device may differ)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=(
            "override training.steps; fewer steps shrink the schedule in proportion (the "
            "anneal, the map refits and their steps, the loss weights' steps), so that training "
            "ends at the target temperature after the same stages"
        ),
    )
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--device", help="override device (cpu, cuda, cuda:1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    _add_set(p, "CONFIG")
    _add_threads(p)
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
    p.add_argument(
        "--ais-preconditioner",
        choices=["identity", "fisher"],
        help="the AIS moves: plain latent MALA, or MALA whitened by a pilot's Fisher matrix "
        "(exact either way); default: the run's sampling.ais_preconditioner",
    )
    p.add_argument(
        "--ais-schedule",
        choices=["linear", "adaptive"],
        help="the AIS levels: evenly spaced in beta, or placed by a pilot run's conditional "
        "ESS (exact either way); default: the run's sampling.ais_schedule",
    )
    p.add_argument("--device", help="override the run's device")
    p.add_argument("--quiet", action="store_true")
    _add_threads(p)
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
    _add_set(p)
    _add_threads(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "reweight",
        help="weighted observables and free-energy profiles from samples",
        description="Weighted observables and free-energy maps, either of a sample file (direct "
        "and importance-sampled) or of MD trajectories reweighted from the states they were run "
        "in (--config) to another temperature (--temperature) or System (--target-config): by "
        "EXP from one state, by MBAR from several pooled ones.",
    )
    p.add_argument(
        "samples",
        nargs="?",
        help="an npz from `openmm-nice sample` (x, log_w, u); or give --traj instead",
    )
    p.add_argument(
        "--traj",
        action="append",
        default=[],
        help="an MD trajectory to reweight (.npz with x in nm, or any mdtraj format such as "
        ".dcd); repeatable, each with its own --config (several states, pooled by MBAR) or all "
        "with one (one state)",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="the config of the state the frames come from (system, temperature); needed with "
        "--traj, once per --traj or once for all; for a sample file it names the system "
        "instead of --run",
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
    p.add_argument("--n-bootstrap", type=int, default=N_BOOTSTRAP, help="resamples for error bars")
    p.add_argument(
        "--block-size",
        type=int,
        help="frames per bootstrap block (correlated frames need blocks longer than their "
        "correlation time); default 1 for a sample file, a twentieth of the shortest "
        "trajectory for --traj",
    )
    p.add_argument("--stride", type=int, default=1, help="with --traj: use every k-th frame")
    p.add_argument(
        "--batch-size", type=int, default=8192, help="with --traj: frames per energy evaluation"
    )
    _add_set(p, "every --config and --target-config")
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
    _add_set(p)
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
    _add_threads(p)
    p.set_defaults(func=_cmd_mcmc)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and not args.resume and args.config is None:
        parser.error("train needs a CONFIG (or --resume with --out RUN)")
    started = time.time()
    try:
        threads = _torch_threads(args)
        with _torch_thread_count(threads):
            code = args.func(args)
    except (UserInputError, FileNotFoundError, FileExistsError) as error:
        print(f"openmm-nice {args.command}: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        hint = f"; continue with `openmm-nice train --resume --out {args.out}`"
        print(
            f"openmm-nice {args.command}: stopped by {stop}{hint if args.command == 'train' else ''}",
            file=sys.stderr,
        )
        return 128 + stop.signum
    if not getattr(args, "quiet", False):
        print(f"done in {time.time() - started:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
