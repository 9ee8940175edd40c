"""Alanine dipeptide at 300 K: a trained Boltzmann generator against long MD at MD's own job.

From a trained run folder and a long reference MD it measures, on this machine:
  * training wall time (RUN/summary.json) and ESS/N of --n fresh samples;
  * the Jensen-Shannon divergence (natural log) of the importance-sampled 36 x 36 Ramachandran
    histogram against the reference MD's;
  * dF = F(phi > 0) - F(phi < 0) in kT with its error, for the generator (bootstrap of
    independent samples) and for the MD (block bootstrap, as MD frames are correlated);
  * the wall time each method needs to reach dF to +-TARGET kT (0.1 by default): for MD the
    reference's error scaled as 1/sqrt(simulated time) at the MD speed measured here with a short
    run; for the generator the training time plus the sampling time of the n for which the
    importance-sampled error, scaled as 1/sqrt(n), reaches the target.
Then it prints a table and one JSON line with every number.

Usage:
    python benchmarks/alanine_dipeptide.py --run RUN \
        --reference data/reference/alanine_dipeptide_300K_50ns.npz [--n 50000] \
        [--metad data/reference/alanine_dipeptide_metad_20ns.npz]

The reference (about 20 minutes on 2 cores; not committed, the command is):
    openmm-nice md examples/alanine_dipeptide.yaml \
        --out data/reference/alanine_dipeptide_300K_50ns.npz --steps 50000000 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from openmm_nice.ais import sample_as_configured
from openmm_nice.analysis import (
    free_energy_map,
    jensen_shannon_divergence,
    ramachandran,
    region_free_energy,
)
from openmm_nice.cli import load_run
from openmm_nice.md import run_md
from openmm_nice.reweighting import effective_sample_size

REFERENCE_COMMAND = (
    "openmm-nice md examples/alanine_dipeptide.yaml "
    "--out data/reference/alanine_dipeptide_300K_50ns.npz --steps 50000000 --seed 1"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder of `openmm-nice train`")
    p.add_argument(
        "--reference", required=True, help="an npz of `openmm-nice md` (x in nm), with FILE.json"
    )
    p.add_argument(
        "--metad",
        help="optional npz of benchmarks/alanine_metadynamics.py (with FILE.json): a second, "
        "independent reference that samples C7ax / alpha_L, which plain 300 K MD rarely visits",
    )
    p.add_argument("--n", type=int, default=50_000, help="generator samples to draw")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator's samples")
    p.add_argument("--batch-size", type=int, default=65536, help="samples per generator batch")
    p.add_argument(
        "--ais-steps",
        type=int,
        help="latent-space AIS levels after each draw (default: the run's sampling.ais_steps)",
    )
    p.add_argument("--target-error", type=float, default=0.1, help="the dF error to reach (kT)")
    p.add_argument("--md-blocks", type=int, default=20, help="blocks of the MD block bootstrap")
    p.add_argument("--n-bootstrap", type=int, default=200, help="bootstrap resamples")
    p.add_argument(
        "--md-steps", type=int, default=200_000, help="steps of the short MD that times MD here"
    )
    p.add_argument(
        "--md-platform", help="OpenMM platform of the timed MD (default: the run config's)"
    )
    return p.parse_args(argv)


def reference_frames(path: Path) -> tuple[np.ndarray, float]:
    """Frames (F, 3N) of the reference MD and the simulated time in ns they span."""
    if not path.is_file():
        raise FileNotFoundError(
            f"reference MD {path} does not exist; make it with {REFERENCE_COMMAND}"
        )
    with np.load(path) as data:
        if "x" not in data:
            raise ValueError(f"{path} has no array 'x'; make it with {REFERENCE_COMMAND}")
        x = np.asarray(data["x"], dtype=np.float64)
        time_ps = np.asarray(data["time_ps"]) if "time_ps" in data else None
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"reference frames have shape {x.shape}; expected (F, 3N) with F >= 2")
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        simulated_ns = float(json.loads(sidecar.read_text())["simulated_ns"])
    elif time_ps is not None:
        simulated_ns = float(time_ps[-1]) / 1000.0
    else:
        raise ValueError(
            f"neither {sidecar} nor a time_ps array in {path} says how long the MD ran; "
            f"make the reference with {REFERENCE_COMMAND}"
        )
    return x, simulated_ns


def time_to_reach(error: float, target: float) -> float:
    """The factor by which the sample size must grow for an error ~ 1/sqrt(size) to hit target."""
    return (error / target) ** 2 if math.isfinite(error) else math.inf


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = Path(args.run)
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{summary_path} does not exist; train first with `openmm-nice train CONFIG --out {run}`"
        )
    training_s = float(json.loads(summary_path.read_text())["training_time_s"])
    x_md, md_ns = reference_frames(Path(args.reference))

    config, target, generator = load_run(run)
    try:
        if not target.is_molecule:
            raise ValueError(f"{run} is a run of the toy target {target.name!r}, not a molecule")
        topology = target.mdtraj_topology()
        if x_md.shape[1] != 3 * topology.n_atoms:
            raise ValueError(
                f"reference frames have shape {x_md.shape}, but {target.name} has "
                f"{topology.n_atoms} atoms; give the reference MD of the run's system"
            )
        # start the energy's worker processes outside the timing: a one-off cost, not per sample
        target.energy(torch.as_tensor(x_md[:1]))
        rng = torch.Generator(device=generator.device).manual_seed(args.seed)
        started = time.perf_counter()
        samples = sample_as_configured(
            generator, args.n, config.sampling, args.ais_steps, args.batch_size, rng
        )
        x, log_w, ais_steps = samples.x, samples.log_w, len(samples.step_sizes)
        sampling_s = time.perf_counter() - started
    finally:
        target.close()
    x = x.double().cpu().numpy()
    log_w = log_w.double().cpu().numpy()

    phi, psi = ramachandran(x, topology)
    phi_md, psi_md = ramachandran(x_md, topology)
    bg_map = free_energy_map(phi, psi, log_w)
    md_map = free_energy_map(phi_md, psi_md)
    js = jensen_shannon_divergence(bg_map.probability, md_map.probability)
    md_block = max(1, len(x_md) // args.md_blocks)
    bg_df = region_free_energy(phi > 0, log_w, args.n_bootstrap)
    md_df = region_free_energy(phi_md > 0, None, args.n_bootstrap, block_size=md_block)

    speed = run_md(config, args.md_steps, quiet=True, platform=args.md_platform)
    md_wall = md_ns * time_to_reach(md_df["df_error_kT"], args.target_error) * 86400.0
    md_wall /= speed.ns_per_day
    n_needed = args.n * time_to_reach(bg_df["df_error_kT"], args.target_error)
    bg_wall = training_s + sampling_s / args.n * n_needed

    result = {
        "run": str(run),
        "reference": str(args.reference),
        "training_time_s": training_s,
        "n": args.n,
        "ais_steps": ais_steps,
        "sampling_time_s": sampling_s,
        "ess": effective_sample_size(log_w) / args.n,
        "js_divergence": js,
        "bg_df_kT": bg_df["df_kT"],
        "bg_df_error_kT": bg_df["df_error_kT"],
        "bg_p_phi_positive": bg_df["p"],
        "md_df_kT": md_df["df_kT"],
        "md_df_error_kT": md_df["df_error_kT"],
        "md_p_phi_positive": md_df["p"],
        "md_frames": len(x_md),
        "md_simulated_ns": md_ns,
        "md_block_frames": md_block,
        "md_phi_sign_changes": int(np.count_nonzero(np.diff((phi_md > 0).astype(np.int8)))),
        "md_ns_per_day": speed.ns_per_day,
        "md_speed_platform": speed.platform,
        "target_error_kT": args.target_error,
        "bg_samples_needed": n_needed,
        "bg_wall_time_to_target_s": bg_wall,
        "md_ns_needed": md_ns * time_to_reach(md_df["df_error_kT"], args.target_error),
        "md_wall_time_to_target_s": md_wall,
    }
    if args.metad:
        metad_path = Path(args.metad)
        with np.load(metad_path) as data:
            metad_histogram = np.asarray(data["histogram36"])
        metad_info = json.loads(metad_path.with_name(metad_path.name + ".json").read_text())
        result.update(
            metad=str(metad_path),
            metad_ns=metad_info["ns"],
            metad_df_kT=metad_info["final_df_kT"],
            metad_df_three_quarters_kT=metad_info["three_quarters_df_kT"],
            js_divergence_vs_metad=jensen_shannon_divergence(bg_map.probability, metad_histogram),
            md_js_divergence_vs_metad=jensen_shannon_divergence(
                md_map.probability, metad_histogram
            ),
        )
    print_table(result)
    print(
        json.dumps(
            {
                k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in result.items()
            }
        )
    )
    return result


def print_table(r: dict) -> None:
    t = r["target_error_kT"]
    rows = [
        ("training wall time", f"{r['training_time_s']:.1f} s", ""),
        ("ESS / N", f"{r['ess']:.3f} (N = {r['n']}, {r['ais_steps']} AIS levels)", ""),
        ("JS divergence, 36x36 Ramachandran", f"{r['js_divergence']:.4f}", "vs reference MD"),
        (
            "dF(phi>0 - phi<0)",
            f"{r['bg_df_kT']:.3f} +- {r['bg_df_error_kT']:.3f} kT",
            f"{r['md_df_kT']:.3f} +- {r['md_df_error_kT']:.3f} kT",
        ),
        (
            "p(phi>0)",
            f"{r['bg_p_phi_positive']:.4f}",
            f"{r['md_p_phi_positive']:.4f}",
        ),
        (
            "data",
            f"{r['n']} samples in {r['sampling_time_s']:.1f} s",
            f"{r['md_simulated_ns']:.3g} ns, {r['md_phi_sign_changes']} phi sign changes",
        ),
        (
            "speed",
            f"{r['n'] / r['sampling_time_s']:.0f} samples/s",
            f"{r['md_ns_per_day']:.0f} ns/day ({r['md_speed_platform']})",
        ),
        (
            f"wall time to dF +-{t:g} kT",
            f"{r['bg_wall_time_to_target_s']:.1f} s ({r['bg_samples_needed']:.3g} samples, training included)",
            f"{r['md_wall_time_to_target_s']:.1f} s ({r['md_ns_needed']:.3g} ns)",
        ),
    ]
    if "metad" in r:
        rows += [
            (
                "metadynamics reference",
                f"{r['metad_ns']:g} ns well-tempered on (phi, psi)",
                "",
            ),
            (
                "  JS divergence vs metadynamics",
                f"{r['js_divergence_vs_metad']:.4f}",
                f"{r['md_js_divergence_vs_metad']:.4f}",
            ),
            (
                "  dF(phi>0 - phi<0), metadynamics",
                f"{r['metad_df_kT']:.3f} kT (at 3/4 of the run: "
                f"{r['metad_df_three_quarters_kT']:.3f})",
                "",
            ),
        ]
    print(f"{'':36} {'Boltzmann generator':46} {'MD':30}")
    for name, bg, md in rows:
        print(f"{name:36} {bg:46} {md:30}")


if __name__ == "__main__":
    main()
