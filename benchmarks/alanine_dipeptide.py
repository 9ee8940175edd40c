"""Alanine dipeptide: a trained run against the reference, and its efficiency along the run.

From a run folder of `openmm-nice train` it measures, on this machine:
  * along the run (the snapshots that `training.snapshot_interval` keeps in RUN/snapshots):
    the energy evaluations and training wall time spent so far, and the ESS/N of the flow alone
    and after the run's latent-space AIS, so that the curve can be set beside the published
    figures, which spend about 1e8 target evaluations;
  * for the final model: ESS/N of --n one-shot samples and of --n-ais AIS samples; the
    importance-sampled dF = F(phi > 0) - F(phi < 0) in kT with its bootstrap error; the
    Jensen-Shannon divergence (natural log) of the 36 x 36 Ramachandran histogram against the
    reference map; the population of C7ax / alpha_L (0 < phi < 2.2); and the distance of dF
    from the reference's.
It prints the tables and one JSON line with every number.

The reference is the umbrella-sampling + MBAR result of benchmarks/alanine_reference.py,
committed in benchmarks/reference/ (an npz with `histogram36`, `df_kT`, `df_error_kT`).

With --samples it draws nothing and measures the same figures on sample files that
`openmm-nice sample RUN` wrote (e.g. 200,000 AIS samples with the example's levels).

Usage:
    python benchmarks/alanine_dipeptide.py --run RUN [--n 200000] [--n-ais 50000]
    python benchmarks/alanine_dipeptide.py --run RUN --samples RUN/flow.npz RUN/ais.npz
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from openmm_nice.analysis.free_energy import free_energy_map, jensen_shannon_divergence
from openmm_nice.analysis.observables import ramachandran
from openmm_nice.analysis.reweighting import effective_sample_size, region_free_energy
from openmm_nice.analysis.weight_diagnostics import diagnose_region
from openmm_nice.io import load_checkpoint, load_samples
from openmm_nice.runs import load_run
from openmm_nice.sampling.ais import annealed_importance_sampling

REFERENCE_DIR = Path(__file__).parent / "reference"
C7AX = (0.0, 2.2)  # the C7ax / alpha_L region of phi, radians

# Reverse ESS on alanine dipeptide in implicit solvent (openmmtools AlanineDipeptideImplicit),
# every method re-run with spline-coupling flows and about 1e8 target evaluations: CMT (ICLR
# 2026), table 1. Context only: our system here is the vacuum one.
PUBLISHED = (
    ("CMT", 0.977, "no MD data"),
    ("temperature-annealed BG (TA-BG)", 0.958, "no MD data"),
    ("FAB", 0.948, "no MD data"),
    ("reverse KL", 0.941, "no MD data"),
    ("forward KL on MD data", 0.821, "MD data"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a run folder of `openmm-nice train`")
    p.add_argument(
        "--reference",
        type=Path,
        help="the reference map (npz); default: benchmarks/reference/SYSTEM_300K.npz for the "
        "run's system (alanine_dipeptide_vacuum or alanine_dipeptide_implicit)",
    )
    p.add_argument("--n", type=int, default=200_000, help="one-shot samples of the final model")
    p.add_argument("--n-ais", type=int, default=50_000, help="AIS samples of the final model")
    p.add_argument(
        "--ais-steps", type=int, help="AIS levels (default: the run's sampling.ais_steps)"
    )
    p.add_argument("--snapshot-n", type=int, default=20_000, help="one-shot samples a snapshot")
    p.add_argument("--snapshot-n-ais", type=int, default=4_000, help="AIS samples a snapshot")
    p.add_argument("--no-snapshots", action="store_true", help="evaluate the final model only")
    p.add_argument("--n-bootstrap", type=int, default=200, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--samples",
        nargs="+",
        type=Path,
        metavar="NPZ",
        help="measure these sample files of `openmm-nice sample RUN` instead of drawing",
    )
    return p.parse_args(argv)


def load_reference(path: Path) -> dict:
    """The reference's 36 x 36 Ramachandran probabilities and dF with its error."""
    if not path.is_file():
        raise FileNotFoundError(
            f"reference {path} does not exist; make it with benchmarks/alanine_reference.py"
        )
    with np.load(path) as data:
        missing = {"histogram36", "df_kT", "df_error_kT"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; use benchmarks/alanine_reference.py")
        return {
            "histogram36": np.asarray(data["histogram36"], dtype=np.float64),
            "df_kT": float(data["df_kT"]),
            "df_error_kT": float(data["df_error_kT"]),
        }


def draw(generator, config, n: int, ais_steps: int, seed: int) -> dict:
    """n samples with their weights (one-shot or AIS), timed, with the evaluations spent."""
    rng = torch.Generator(device=generator.device).manual_seed(seed)
    energy = generator.energy
    before, started = energy.evaluation_count, time.perf_counter()
    result = annealed_importance_sampling(
        generator,
        n,
        ais_steps,
        batch_size=config.sampling.ais_batch_size if ais_steps else 65536,
        rng=rng,
    )
    return {
        "x": result.x.double().cpu().numpy(),
        "log_w": result.log_w.double().cpu().numpy(),
        "seconds": time.perf_counter() - started,
        "evaluations": energy.evaluation_count - before,
        "acceptance": float(result.acceptance.mean()) if ais_steps else math.nan,
    }


def estimates(samples: dict, topology, reference: dict, n_bootstrap: int) -> dict:
    """ESS/N, dF with its error, JS against the reference, p(C7ax) of weighted samples."""
    x, log_w = samples["x"], samples["log_w"]
    phi, psi = ramachandran(x, topology)
    df = region_free_energy(phi > 0, log_w, n_bootstrap)
    tail = diagnose_region(log_w, phi > 0)  # how many effective samples phi > 0 rests on
    c7ax = region_free_energy((phi > C7AX[0]) & (phi < C7AX[1]), log_w, n_bootstrap)
    histogram = free_energy_map(phi, psi, log_w, n_bootstrap=0).probability
    return {
        "ess": effective_sample_size(log_w) / len(log_w),
        "df_kT": df["df_kT"],
        "df_error_kT": df["df_error_kT"],
        "df_minus_reference_kT": df["df_kT"] - reference["df_kT"],
        "n_phi_positive": tail.n_inside,
        "ess_phi_positive": tail.ess_inside,
        "pareto_k_phi_positive": tail.pareto_k_inside,
        "js_divergence": jensen_shannon_divergence(histogram, reference["histogram36"]),
        "p_c7ax": c7ax["p"],
        "p_c7ax_direct": float(np.mean((phi > C7AX[0]) & (phi < C7AX[1]))),
        "seconds": samples["seconds"],
        "evaluations": samples["evaluations"],
        "acceptance": samples["acceptance"],
    }


def along_the_run(run: Path, generator, config, ais_steps: int, args) -> list[dict]:
    """ESS/N of the flow alone and after AIS at every snapshot of the run."""
    rows = []
    for path in sorted((run / "snapshots").glob("step_*.pt")):
        snapshot = load_checkpoint(path)
        generator.load_state_dict(snapshot["model"])
        generator.eval()
        row = {
            "step": int(snapshot["step"]),
            "energy_evaluations": int(snapshot["energy_evaluations"]),
            "training_s": float(snapshot["elapsed_s"]),
        }
        one_shot = draw(generator, config, args.snapshot_n, 0, args.seed)
        row["ess_flow"] = effective_sample_size(one_shot["log_w"]) / args.snapshot_n
        if ais_steps:
            with_ais = draw(generator, config, args.snapshot_n_ais, ais_steps, args.seed)
            row["ess_ais"] = effective_sample_size(with_ais["log_w"]) / args.snapshot_n_ais
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary_path = args.run / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{summary_path} does not exist; train first with `openmm-nice train CONFIG --out "
            f"{args.run}`"
        )
    summary = json.loads(summary_path.read_text())
    config, target, generator = load_run(args.run)
    if args.reference is None:
        args.reference = REFERENCE_DIR / f"{target.name}_300K.npz"
    try:
        reference = load_reference(args.reference)
        if not target.is_molecule:
            raise ValueError(f"{args.run} is a run of the toy {target.name!r}, not a molecule")
        topology = target.mdtraj_topology()
        if args.samples:
            return _measure_files(args, summary, target.name, topology, reference)
        ais_steps = config.sampling.ais_steps if args.ais_steps is None else args.ais_steps
        final_state = {k: v.clone() for k, v in generator.state_dict().items()}
        rows = (
            [] if args.no_snapshots else along_the_run(args.run, generator, config, ais_steps, args)
        )
        generator.load_state_dict(final_state)
        generator.eval()
        flow = estimates(
            draw(generator, config, args.n, 0, args.seed), topology, reference, args.n_bootstrap
        )
        ais = None
        if ais_steps:
            ais = estimates(
                draw(generator, config, args.n_ais, ais_steps, args.seed + 1),
                topology,
                reference,
                args.n_bootstrap,
            )
    finally:
        target.close()
    result = {
        "benchmark": "alanine_dipeptide",
        "run": str(args.run),
        "system": target.name,
        "reference": str(args.reference),
        "reference_df_kT": reference["df_kT"],
        "reference_df_error_kT": reference["df_error_kT"],
        "training_s": summary["training_time_s"],
        "training_steps": summary["steps"],
        "training_energy_evaluations": summary.get("energy_evaluations"),
        "ais_steps": ais_steps,
        "n": args.n,
        "n_ais": args.n_ais,
        "flow": flow,
        "ais": ais,
        "along_the_run": rows,
    }
    print_tables(result)
    print(json.dumps(_finite(result)))
    return result


def _measure_files(args, summary: dict, system: str, topology, reference: dict) -> dict:
    """The final model's figures measured on sample files rather than on new draws."""
    files = []
    for path in args.samples:
        x, log_w, _ = load_samples(path)
        # not drawn here: no sampling time, evaluations or acceptance to report
        read = {"x": x, "log_w": log_w}
        read.update(seconds=math.nan, evaluations=math.nan, acceptance=math.nan)
        e = estimates(read, topology, reference, args.n_bootstrap)
        files.append({"file": str(path), "n": len(x), **e})
    result = {
        "benchmark": "alanine_dipeptide_samples",
        "run": str(args.run),
        "system": system,
        "reference": str(args.reference),
        "reference_df_kT": reference["df_kT"],
        "reference_df_error_kT": reference["df_error_kT"],
        "training_s": summary["training_time_s"],
        "training_steps": summary["steps"],
        "samples": files,
    }
    print(
        f"Reference dF = {reference['df_kT']:.3f} +- {reference['df_error_kT']:.3f} kT "
        f"({args.reference})"
    )
    _print_columns([(Path(f["file"]).name, f, f["n"]) for f in files], timed=False)
    print(json.dumps(_finite(result)))
    return result


def _finite(value):
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def print_tables(r: dict) -> None:
    if r["along_the_run"]:
        print("Along the run (snapshots):")
        print(
            f"{'step':>7} {'evaluations':>12} {'train s':>8} {'ESS/N flow':>11} {'ESS/N AIS':>10}"
        )
        for row in r["along_the_run"]:
            ais = f"{row['ess_ais']:.3f}" if "ess_ais" in row else "-"
            print(
                f"{row['step']:>7} {row['energy_evaluations']:>12.3g} {row['training_s']:>8.0f} "
                f"{row['ess_flow']:>11.3f} {ais:>10}"
            )
        print()
    evaluations = r["training_energy_evaluations"]
    print(
        f"Final model ({r['training_steps']} steps, {r['training_s']:.0f} s of training"
        + (f", {evaluations:.3g} energy evaluations" if evaluations else "")
        + f"); reference dF = {r['reference_df_kT']:.3f} +- {r['reference_df_error_kT']:.3f} kT"
    )
    columns = [("flow alone", r["flow"], r["n"])]
    if r["ais"] is not None:
        columns.append((f"AIS, {r['ais_steps']} levels", r["ais"], r["n_ais"]))
    _print_columns(columns)
    print()
    print("Published reverse ESS, implicit solvent, about 1e8 evaluations (CMT, ICLR 2026):")
    for name, ess, data in PUBLISHED:
        print(f"  {name:34} {ess:.3f} ({data})")


def _print_columns(columns: list[tuple[str, dict, int]], timed: bool = True) -> None:
    """One column of estimates per (name, estimates, samples)."""
    print(f"{'':28}" + "".join(f"{name:>30}" for name, _, _ in columns))
    lines = [
        ("samples", lambda e, n: f"{n}"),
        ("ESS / N", lambda e, n: f"{e['ess']:.3f}"),
        ("dF(phi>0 - phi<0), kT", lambda e, n: f"{e['df_kT']:.3f} +- {e['df_error_kT']:.3f}"),
        ("dF - reference, kT", lambda e, n: f"{e['df_minus_reference_kT']:+.3f}"),
        (
            "phi>0: samples, ESS, k",
            lambda e, n: (
                f"{e['n_phi_positive']}, {e['ess_phi_positive']:.1f}, "
                f"{e['pareto_k_phi_positive']:.2f}"
            ),
        ),
        ("JS vs reference (36 x 36)", lambda e, n: f"{e['js_divergence']:.4f}"),
        (
            "p(C7ax), weighted / direct",
            lambda e, n: f"{e['p_c7ax']:.4f} / {e['p_c7ax_direct']:.4f}",
        ),
    ]
    if timed:
        lines += [
            ("sampling s", lambda e, n: f"{e['seconds']:.1f}"),
            ("energy evaluations", lambda e, n: f"{e['evaluations']:.3g}"),
        ]
    for name, cell in lines:
        print(f"{name:28}" + "".join(f"{cell(e, n):>30}" for _, e, n in columns))


if __name__ == "__main__":
    main()
