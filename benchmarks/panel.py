"""The panel benchmark: the one data-free recipe on every panel molecule, against references.

For each molecule of benchmarks/_panel.py the recipe (examples/alanine_dipeptide.yaml with only
`system` and `model.latent_dim` changed) is trained into RUNS/<molecule>_seed<S> (or an existing
run there is resumed or reused), then:
  * --flow-samples one-shot samples of the flow (`openmm-nice sample RUN --ais-steps 0`):
    ESS/N over all and in 4 blocks, the largest weight's share, the Pareto k-hat;
  * --ais-samples samples with the recipe's AIS (`openmm-nice sample RUN`): the same figures,
    and every residue's backbone free energies (kT, region against the rest, with bootstrap
    errors: phi > 0, and psi on the alpha side), against the molecule's reference (alanine's
    umbrella references, else benchmarks/reference/panel/ made by benchmarks/panel_reference.py)
    where there is one.
Each molecule's figures are written to RUNS/<molecule>_seed<S>/panel.json (atomically), so that a
later call prints the table without sampling again (--resample to redo it).

Each region's estimate carries its own tail diagnostic (`diagnose_region`: the Pareto k of the
weights inside and outside the region; "!" in the table where it fails). The AIS samples are kept
as RUNS/<molecule>_seed<S>/ais_samples.npz. It prints one table and one JSON line.

Usage:
    python benchmarks/panel.py --runs runs/panel [--molecules proline_dipeptide,...] [--seed 0]
    python benchmarks/panel.py --runs /tmp/p --molecules proline_dipeptide --steps 40 \\
        --set training.refit_samples=2000 --set training.refit_steps=20 \\
        --set training.buffer_size=2000 --set sampling.ais_steps=5 \\
        --flow-samples 2000 --ais-samples 500   # a quick end-to-end check
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from _machine import machine_facts  # benchmarks/ is on the path of a script run from it
from _panel import (
    PANEL,
    ROOT,
    backbone_observables,
    panel_config,
    reference_file,
)

from openmm_nice.analysis.observables import backbone_indices, dihedrals
from openmm_nice.analysis.reweighting import region_free_energy
from openmm_nice.analysis.weight_diagnostics import diagnose_region, diagnose_weights
from openmm_nice.config import apply_overrides, config_from_dict, load_config
from openmm_nice.io import atomic_write_text, save_samples
from openmm_nice.runs import load_run, sample_run, train_run

# The published figures on alanine tetrapeptide in implicit solvent (no MD data, reverse ESS)
PUBLISHED_TETRAPEPTIDE = {"CMT": 0.686, "TA-BG": 0.658, "FAB": 0.636}


def train(name: str, folder: Path, args) -> dict:
    """Train (or resume, or reuse) the recipe on one molecule; return its summary."""
    summary_file = folder / "summary.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    data = panel_config(name)
    data["seed"] = args.seed
    config = config_from_dict(apply_overrides(data, args.set))
    steps, quiet = args.steps, args.quiet
    if steps is not None:
        config.set_steps(steps)
    resume = (folder / "checkpoint.pt").exists()
    return train_run(config, folder, resume=resume, quiet=quiet)


def weights_row(log_w: np.ndarray) -> dict:
    d = diagnose_weights(log_w)
    return {
        "ess": d.ess,
        "block_ess": list(d.block_ess),
        "max_weight_share": d.max_weight_share,
        "pareto_k": d.pareto_k,
        "reliable": d.reliable,
    }


def evaluate(name: str, folder: Path, args) -> dict:
    """Flow and AIS samples of a trained run: the weights' figures, and the free energy of every
    backbone region (:func:`_panel.backbone_observables`) from the AIS samples."""
    with load_run(folder) as run:
        phi_rows, psi_rows = backbone_indices(run.target.mdtraj_topology())
        started = time.perf_counter()
        flow = sample_run(run, args.flow_samples, ais_steps=0, seed=args.sample_seed)
        flow_seconds = time.perf_counter() - started
        started = time.perf_counter()
        ais = sample_run(run, args.ais_samples, seed=args.sample_seed, progress=not args.quiet)
        ais_seconds = time.perf_counter() - started
    # the AIS samples kept beside the run, for a later look at where their weights fall
    save_samples(folder / "ais_samples.npz", ais.x, ais.log_w, ais.u)
    x = ais.x.reshape(len(ais.x), -1, 3)
    regions = backbone_observables(dihedrals(x, phi_rows), dihedrals(x, psi_rows))
    estimates = {
        region: region_free_energy(inside, ais.log_w, n_bootstrap=args.n_bootstrap, seed=m)
        for m, (region, inside) in enumerate(regions.items())
    }
    tails = {region: diagnose_region(ais.log_w, inside) for region, inside in regions.items()}
    return {
        "flow": {**weights_row(flow.log_w), "n": len(flow.log_w), "seconds": flow_seconds},
        "ais": {
            **weights_row(ais.log_w),
            "n": len(ais.log_w),
            "ais_steps": ais.ais_steps,
            "seconds": ais_seconds,
        },
        "observables": {
            region: {
                "p": e["p"],
                "df_kT": e["df_kT"],
                "df_error_kT": e["df_error_kT"],
                "ess_inside": tails[region].ess_inside,
                "pareto_k_inside": tails[region].pareto_k_inside,
                "pareto_k_outside": tails[region].pareto_k_outside,
                "reliable": tails[region].reliable,
            }
            for region, e in estimates.items()
        },
    }


def reference(name: str) -> dict | None:
    """The reference's dF and error of each backbone region it has, or None where there is no
    reference yet (alanine's umbrella files hold phi1>0 alone). A region whose reference error
    exceeds 1 kT is left out: it is one the reference barely reached (proline's phi > 0,
    about 30 +- 6 kT), nothing to judge a generator against."""
    path = reference_file(name)
    if path is None:
        return None
    with np.load(path) as data:
        names = list(data["observables"]) if "observables" in data else ["phi1>0"]
        df, error = np.atleast_1d(data["df_kT"]), np.atleast_1d(data["df_error_kT"])
        return {
            "observables": {
                str(n): {"df_kT": float(d), "df_error_kT": float(e)}
                for n, d, e in zip(names, df, error)
                if e <= 1.0
            },
            "file": str(path.relative_to(ROOT)),
        }


def print_table(results: list[dict]) -> None:
    print(
        f"{'molecule':<30} {'D':>4} {'flow ESS/N':>10} {'min blk':>7} {'k':>5} "
        f"{'AIS ESS/N':>9} {'min blk':>7} {'max w':>7} {'k':>5} {'region':>11} "
        f"{'dF (kT)':>15} {'ESS in':>7} {'k in/out':>9} {'reference':>15} {'diff':>6} {'evals':>8} "
        f"{'train s':>7}"
    )
    for r in results:
        f, a = r["flow"], r["ais"]
        ref = (r.get("reference") or {}).get("observables", {})
        for k, (region, e) in enumerate(r["observables"].items()):
            head = (
                f"{r['molecule']:<30} {r['latent_dim']:>4} {f['ess']:>10.4f} "
                f"{min(f['block_ess']):>7.3f} {f['pareto_k']:>5.2f} {a['ess']:>9.4f} "
                f"{min(a['block_ess']):>7.3f} {a['max_weight_share']:>7.4f} "
                f"{a['pareto_k']:>5.2f}"
                if k == 0
                else " " * 89
            )
            if region in ref and math.isfinite(ref[region]["df_kT"]):
                rdf, rerr = ref[region]["df_kT"], ref[region]["df_error_kT"]
                tail = f"{rdf:>7.3f} +- {rerr:<5.3f} {e['df_kT'] - rdf:>6.2f}"
            else:
                tail = f"{'none':>15} {'':>6}"
            evals = (
                f"{r['energy_evaluations']:>8.2e} {r['training_time_s']:>7.0f}" if k == 0 else ""
            )
            ks = (
                f"{e['pareto_k_inside']:>4.2f}/{e['pareto_k_outside']:<4.2f}"
                + ("" if e["reliable"] else "!")
                if "reliable" in e
                else ""
            )
            # the region's effective samples (panel.json files written before it: -)
            ess_in = f"{e['ess_inside']:>7.1f}" if "ess_inside" in e else f"{'-':>7}"
            print(
                f"{head} {region:>11} {e['df_kT']:>7.3f} +- {e['df_error_kT']:<5.3f} {ess_in} {ks:>9} "
                f"{tail} {evals}"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, type=Path, help="folder of the panel's runs")
    p.add_argument("--molecules", default=",".join(PANEL), help="comma-separated panel names")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="training steps (the schedule shrinks with them)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="section.key=value: a variant of the recipe, recorded in the row's `overrides` "
        "(quick checks of the script, or experiments; a panel figure is of the recipe unchanged)",
    )
    p.add_argument("--flow-samples", type=int, default=200_000)
    p.add_argument("--ais-samples", type=int, default=50_000)
    p.add_argument("--n-bootstrap", type=int, default=200)
    p.add_argument("--resample", action="store_true", help="sample again even if panel.json exists")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.molecules.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PANEL))
    if unknown:
        p.error(f"unknown molecules {unknown}; the panel is {sorted(PANEL)}")

    results = []
    for name in names:
        folder = args.runs / f"{name}_seed{args.seed}"
        record_file = folder / "panel.json"
        if record_file.exists() and not args.resample:
            results.append(json.loads(record_file.read_text()))
            continue
        summary = train(name, folder, args)
        record = {
            "molecule": name,
            "seed": args.seed,
            # the run's own D: a --set model.latent_dim replaces the panel's
            "latent_dim": load_config(folder / "config.yaml", saved_run=True).model.latent_dim,
            "overrides": list(args.set),
            "steps": summary["steps"],
            "energy_evaluations": summary["energy_evaluations"],
            "training_time_s": summary["training_time_s"],
            **evaluate(name, folder, args),
            "reference": reference(name),
        }
        atomic_write_text(record_file, json.dumps(record, indent=2) + "\n")
        results.append(record)
        if not args.quiet:
            print(json.dumps(record), file=sys.stderr)

    print_table(results)
    for r in results:
        if r["molecule"] == "alanine_tetrapeptide_implicit":
            published = ", ".join(f"{k} {v:.3f}" for k, v in PUBLISHED_TETRAPEPTIDE.items())
            print(
                f"alanine tetrapeptide, published flow ESS/N (no MD data, ~1e8 evaluations): "
                f"{published}"
            )
    worst = [
        abs(e["df_kT"] - r["reference"]["observables"][region]["df_kT"])
        for r in results
        if r["reference"]
        for region, e in r["observables"].items()
        if region in r["reference"]["observables"]
        and math.isfinite(e["df_kT"])
        and math.isfinite(r["reference"]["observables"][region]["df_kT"])
    ]
    print(
        json.dumps(
            {
                "benchmark": "panel",
                "seed": args.seed,
                "results": results,
                "worst_abs_df_error_kT": max(worst) if worst else None,
                **machine_facts(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
