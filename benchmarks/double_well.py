"""Toy-target benchmark: KL bound, ESS/N, log Z error, well populations and training time.

Runs the note's 1D double well for D = 1, 2, 3, 4, the 2D double well, and the 16-dimensional
many-well, each with the project's default training, and (with --remedies) compares the
mode-collapse remedies on the note's example. Prints a table, then one JSON line.

"model ESS/N" is that of the model's own one-shot weights (and the KL bound is the model's);
"ESS/N", log Z and the populations come from the samples as `openmm-nice sample` would draw
them, i.e. after `sampling.ais_steps` levels of latent-space AIS when that is set (the "AIS"
column; 0 means the model's weights again). "max w" is the largest normalised weight of those
samples: where one sample carries a share of the total far above 1/ESS's typical value, that
sample alone sets the ESS/N (a heavy tail; a rerun with another seed may read very differently).

    python benchmarks/double_well.py                # the standard table
    python benchmarks/double_well.py --remedies     # plain vs annealed vs annealed + reweighted FKL
    python benchmarks/double_well.py --cases "many_well_16 D=24" --save models  # keep the models
    python benchmarks/double_well.py --cases "many_well_16 D=24" --load models --set sampling.ais_steps=50
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from openmm_nice.analysis.reweighting import (
    effective_sample_size,
    log_partition_function,
    normalized_weights,
    probability,
)
from openmm_nice.config import config_from_dict
from openmm_nice.sampling.ais import sample_as_configured
from openmm_nice.targets import build_target, build_trainer

NOTE = {
    "system": "double_well_1d",
    "model": {"layers": 8, "hidden": [64, 64], "conditional_hidden": [32, 32]},
    "training": {"steps": 4000, "batch_size": 512, "anneal_steps": 2500},
}
MANY_WELL = yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "examples" / "many_well_16.yaml").read_text()
)
CASES = {
    **{
        f"double_well_1d D={d}": {**NOTE, "model": {**NOTE["model"], "latent_dim": d}}
        for d in (1, 2, 3, 4)
    },
    **{
        f"double_well_2d D={d}": {
            "system": "double_well_2d",
            "model": {"latent_dim": d, "layers": 8, "hidden": [64, 64]},
            "training": {"steps": 4000, "batch_size": 512, "anneal_steps": 2500},
        }
        for d in (2, 3, 4)
    },
    **{
        # examples/many_well_16.yaml (the walker-led recipe for many modes, see its comments and
        # benchmarks/RESULTS.md) at each D
        f"many_well_16 D={d}": {**MANY_WELL, "model": {**MANY_WELL["model"], "latent_dim": d}}
        for d in (16, 24, 32)
    },
}
REMEDIES = {
    "plain reverse KL": {"beta_start": 1.0, "anneal_steps": 0, "reweighted_fkl_weight": 0.0},
    "annealed beta 0.1->1": {"beta_start": 0.1, "anneal_steps": 2500, "reweighted_fkl_weight": 0.0},
    "annealed + reweighted FKL (default)": {
        "beta_start": 0.1,
        "anneal_steps": 2500,
        "reweighted_fkl_weight": 1.0,
    },
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def run_case(
    name: str,
    spec: dict,
    n_samples: int,
    seed: int,
    save: Path | None = None,
    load: Path | None = None,
) -> dict:
    config = config_from_dict({**spec, "seed": seed})
    target = build_target(config)
    torch.manual_seed(seed)
    trainer = build_trainer(config, target)
    model = trainer.generator
    start = time.perf_counter()
    if load is not None:
        model.load_state_dict(torch.load(load / f"{_slug(name)}.pt", weights_only=True))
    else:
        trainer.run()
    wall = time.perf_counter() - start
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), save / f"{_slug(name)}.pt")
    rng = torch.Generator().manual_seed(seed + 100)
    _, model_log_w = model.sample(n_samples, rng=rng)
    model_log_w = model_log_w.double().numpy()
    ais_steps = config.sampling.ais_steps
    start = time.perf_counter()
    samples = sample_as_configured(model, n_samples, config.sampling, rng=rng)
    sampling_s = time.perf_counter() - start
    x, log_w = samples.x.numpy(), samples.log_w.numpy()
    log_z = target.energy.log_partition_function()
    row = {
        "case": name,
        "kl_bound": float(np.mean(-model_log_w) + log_z),
        "model_ess": effective_sample_size(model_log_w) / n_samples,
        "ais_steps": ais_steps,
        "ess": effective_sample_size(log_w) / n_samples,
        "max_weight": float(normalized_weights(log_w).max()),  # the heaviest sample's share
        "log_z_abs_error": abs(log_partition_function(log_w) - log_z),
        "train_s": wall if load is None else None,  # None: loaded, not trained
        "sampling_s": sampling_s,
        "wells": [],
    }
    for index, barrier in target.energy.wells:
        below = x[:, index] < barrier
        row["wells"].append(
            {
                "coordinate": index,
                "exact": target.energy.probability_below(index, barrier),
                "direct": probability(below, n_bootstrap=0).value,
                "reweighted": probability(below, log_w, n_bootstrap=0).value,
            }
        )
    return row


def _print(rows: list[dict]) -> None:
    header = (
        f"{'case':<38}{'KL bound':>10}{'model ESS/N':>12}{'AIS':>5}{'ESS/N':>8}{'max w':>8}"
        f"{'|dlogZ|':>9}"
        f"{'train s':>9}{'sample s':>9}   P(x_i < barrier): exact / direct / reweighted"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        worst = max(r["wells"], key=lambda w: abs(w["reweighted"] - w["exact"]))
        wells = " ".join(
            f"{w['exact']:.4f}/{w['direct']:.4f}/{w['reweighted']:.4f}" for w in r["wells"][:2]
        )
        more = (
            f" ... worst |dP| {abs(worst['reweighted'] - worst['exact']):.4f}"
            if len(r["wells"]) > 2
            else ""
        )
        print(
            f"{r['case']:<38}{r['kl_bound']:>10.4f}{r['model_ess']:>12.3f}{r['ais_steps']:>5d}"
            f"{r['ess']:>8.3f}{r['max_weight']:>8.4f}{r['log_z_abs_error']:>9.4f}"
            f"{'-' if r['train_s'] is None else format(r['train_s'], '.1f'):>9}"
            f"{r['sampling_s']:>9.1f}   {wells}{more}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--remedies", action="store_true", help="compare mode-collapse remedies")
    parser.add_argument(
        "--cases", default="all", help="comma-separated case names (substring match)"
    )
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value of every case, e.g. training.reweighted_fkl_weight=5",
    )
    parser.add_argument("--save", type=Path, help="write each trained model to SAVE/CASE.pt")
    parser.add_argument(
        "--load", type=Path, help="skip training: read each model from LOAD/CASE.pt (--save)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.remedies:
        cases = {
            f"note D=2, {label}": {
                **CASES["double_well_1d D=2"],
                "training": {**NOTE["training"], **options},
            }
            for label, options in REMEDIES.items()
        }
    else:
        keys = [
            k for k in CASES if args.cases == "all" or any(s in k for s in args.cases.split(","))
        ]
        cases = {k: CASES[k] for k in keys}
    for override in args.set:
        key, _, value = override.partition("=")
        section, _, name = key.partition(".")
        for spec in cases.values():
            spec[section] = {**spec.get(section, {}), name: yaml.safe_load(value)}
    rows = [
        run_case(name, spec, args.samples, args.seed, args.save, args.load)
        for name, spec in cases.items()
    ]
    _print(rows)
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
    }
    print(
        json.dumps(
            {"benchmark": "double_well", **info, "rows": rows},
            default=lambda v: None if math.isnan(v) else v,
        )
    )


if __name__ == "__main__":
    main()
