"""How well the coordinate map's torsion tree fits each child torsion given its parent, held out.

A trained run's map conditions each child torsion's density on a parent torsion, one density for
each of PARENT_BINS parent bins, fitted at every map refit to the model's weighted samples. A
parent angle the samples rarely reach (a minor backbone basin) holds few effective frames, and
with the marginal's narrow smoothing their density becomes a comb of spikes. This benchmark
fits the run's child densities to one weighted sample file, once with the fixed smoothing and
once with the adaptive one (``model.torsion_tree_smoothing``), and scores the other file: the
weighted mean held-out log-density of each child given its parent, over all samples, and over
those whose parent angle falls in bins where the fit had 0-100, 100-1,000 and 1,000-3,000
(SPARSE_BIN_FRAMES) effective frames. Both directions are scored (A fitted, B scored; then B
fitted, A scored). A higher score is a better density; the sample files are two independent
draws of the same model or of two models of the same molecule (their weights standing for the
target). It prints one table and one JSON line.

Usage:
    python benchmarks/tree_densities.py RUN A.npz B.npz
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from _machine import machine_facts  # benchmarks/ is on the path of a script run from it

from openmm_nice.analysis.reweighting import normalized_weights
from openmm_nice.io import load_samples
from openmm_nice.molecule.torsion_densities import (
    PARENT_BINS,
    SPARSE_BIN_FRAMES,
    conditional_cdfs,
    conditional_log_density,
    parent_bin_frames,
)
from openmm_nice.runs import load_run

BINS = 360  # the map's torsion bins (MolecularTransform.from_data's default)


def torsions_and_weights(coordinates, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The torsions (F, T) of a sample file's frames of positive weight, and their weights."""
    x, log_w, _ = load_samples(path)
    keep = np.isfinite(log_w) & np.isfinite(x).all(axis=1)
    n = coordinates.internal.n_atoms
    with torch.no_grad():
        q = coordinates.internal.to_internal(torch.as_tensor(x[keep], dtype=torch.float64))[0]
    return q[:, 2 * n - 3 :].numpy(), normalized_weights(log_w[keep])


STRATA = (0.0, 100.0, 1000.0, SPARSE_BIN_FRAMES)  # effective frames of the fit's parent bins


def score(run, fit: Path, scored: Path) -> list[dict]:
    """Each child's held-out scores, fitted to ``fit`` and scored on ``scored``."""
    coordinates = run.generator.coordinates
    model = run.config.model
    if model.torsion_smoothing == "auto":
        raise SystemExit("the run's torsion_smoothing is 'auto'; this benchmark needs a width")
    smoothing = float(model.torsion_smoothing) * BINS / 360  # degrees to bins
    parent = coordinates.torsion_parent.cpu().numpy()
    cut = coordinates.torsion_offset.detach().cpu().numpy() - math.pi
    fit_t, fit_w = torsions_and_weights(coordinates, fit)
    test_t, test_w = torsions_and_weights(coordinates, scored)
    rows = []
    for child in np.flatnonzero(parent >= 0):
        p = int(parent[child])
        frames = parent_bin_frames(fit_t[:, p], fit_w)
        bin_of = np.floor(
            np.remainder(test_t[:, p] + math.pi, 2 * math.pi) * PARENT_BINS / (2 * math.pi)
        ).astype(np.int64)
        frames_of = frames[np.minimum(bin_of, PARENT_BINS - 1)]
        log_g = {}
        for how, sparse in (("fixed", None), ("adaptive", SPARSE_BIN_FRAMES)):
            cdfs = conditional_cdfs(
                fit_t[:, child] - cut[child],
                fit_t[:, p],
                BINS,
                smoothing,
                model.torsion_floor,
                fit_w,
                sparse,
            )
            log_g[how] = conditional_log_density(cdfs, test_t[:, child] - cut[child], test_t[:, p])
        row = {
            "child": int(child),
            "parent": p,
            "all": {h: float(test_w @ g) for h, g in log_g.items()},
        }
        for low, high in zip(STRATA[:-1], STRATA[1:], strict=True):
            inside = (frames_of >= low) & (frames_of < high)
            share = float(test_w[inside].sum())
            row[f"frames {low:g}-{high:g}"] = {
                "share": share,
                **{
                    h: float(test_w[inside] @ g[inside]) / share if share > 0 else math.nan
                    for h, g in log_g.items()
                },
            }
        rows.append(row)
    return rows


def _name(path: str) -> str:
    """A sample file's folder and name (the panel's files are all ais_samples.npz)."""
    return "/".join(Path(path).parts[-2:])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a trained run folder with a torsion tree")
    p.add_argument("a", type=Path, help="a sample file (x, log_w) of the run's molecule")
    p.add_argument("b", type=Path, help="another, independent sample file")
    args = p.parse_args(argv)
    run = load_run(args.run)
    try:
        if not (run.generator.coordinates.torsion_parent >= 0).any():
            raise SystemExit(f"{args.run}'s map has no torsion tree (model.torsion_tree)")
        directions = [
            {"fit": str(fit), "scored": str(scored), "children": score(run, fit, scored)}
            for fit, scored in ((args.a, args.b), (args.b, args.a))
        ]
    finally:
        run.target.close()
    strata = [f"frames {low:g}-{high:g}" for low, high in zip(STRATA[:-1], STRATA[1:])]
    print(
        f"{'fitted -> scored':<44} {'child|parent':>12} {'all: fixed':>10} {'adaptive':>9}"
        + "".join(f" {name + ': weight, fixed, adaptive':>44}" for name in strata)
    )
    for d in directions:
        label = f"{_name(d['fit'])} -> {_name(d['scored'])}"
        for r in d["children"]:
            cells = "".join(
                f" {r[name]['share']:>16.4f} {r[name]['fixed']:>13.4f} {r[name]['adaptive']:>13.4f}"
                for name in strata
            )
            print(
                f"{label:<44} {r['child']:>5}|{r['parent']:<6} {r['all']['fixed']:>10.4f} "
                f"{r['all']['adaptive']:>9.4f}{cells}"
            )
            label = ""
        gain = sum(r["all"]["adaptive"] - r["all"]["fixed"] for r in d["children"])
        print(f"{'':<44} sum over children of adaptive - fixed, all samples: {gain:+.4f} nats")
    result = {
        "benchmark": "tree_densities",
        "run": str(args.run),
        "sparse_bin_frames": SPARSE_BIN_FRAMES,
        "directions": directions,
        "machine": machine_facts(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
