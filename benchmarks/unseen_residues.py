"""The recipe, end to end and cut short, on capped amino acids the panel does not hold.

Outside checks run the recipe on molecules nobody here has seen. This script makes each residue's
capped dipeptide (ACE-X-NME; ACE-X-Y-...-NME for X-Y-...) with examples/make_dipeptide.py
(pdbfixer, amber14, in vacuum or with --implicit OBC2 solvent), builds the panel's config for
it (the recipe with only `system` and D = 3N - 6 + 6 changed), trains it for --steps steps with
the small settings below (a shrunken schedule: every stage of the recipe runs, briefly), and
draws --samples samples with a few AIS levels. It checks that every stage runs on the new
molecule (PDB, force field, internal coordinates, scans, refits, walkers, AIS) and that the
weights are finite; the figures of so short a training say nothing of the recipe's quality.
A residue that fails is a bug: the table gives the stage and the error.

It prints one table and one JSON line.

Usage:
    python benchmarks/unseen_residues.py --out /tmp/unseen GLY SER HIS TRP GLY-PRO
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from _machine import machine_facts  # benchmarks/ is on the path of a script run from it
from _panel import IMPLICIT, REDUNDANT_LATENTS, ROOT, VACUUM, panel_config

from openmm_nice.analysis.weight_diagnostics import diagnose_weights
from openmm_nice.config import apply_overrides, config_from_dict
from openmm_nice.runs import load_run, sample_run, train_run

# Every stage of the recipe, small: a few minutes per residue on one core.
QUICK = [
    "training.batch_size=64",
    "training.walkers=64",
    "training.buffer_size=2000",
    "training.refit_samples=2000",
    "training.refit_steps=20",
    "n_workers=1",
]
# The amino acids with a side chain the panel's molecules (ALA, VAL, PHE, PRO, LYS) do not have.
UNSEEN = ["GLY", "SER", "THR", "CYS", "MET", "LEU", "ILE", "ASN", "GLN", "ASP", "GLU", "HIS",
          "TRP", "TYR", "ARG"]  # fmt: skip


def _atoms(pdb: Path) -> int:
    return sum(line.startswith(("ATOM", "HETATM")) for line in pdb.read_text().splitlines())


def run_residue(residue: str, out: Path, args) -> dict:
    """Make, train and sample one residue; the stage reached, its error, the figures."""
    row = {"residue": residue, "stage": "make", "error": None}
    forcefield = IMPLICIT if args.implicit else VACUUM
    folder = out / residue
    pdb = out / f"{residue.lower().replace('-', '_')}_peptide.pdb"
    started = time.perf_counter()
    try:
        if not pdb.exists():
            made = subprocess.run(
                [sys.executable, str(ROOT / "examples" / "make_dipeptide.py")]
                + [*residue.split("-"), "--out", str(pdb), "--forcefield", *forcefield],
                capture_output=True,
                text=True,
            )
            if made.returncode:
                raise RuntimeError(made.stderr.strip().splitlines()[-1])
        n_atoms = _atoms(pdb)
        row["atoms"] = n_atoms
        row["stage"] = "train"
        data = panel_config("alanine_dipeptide_vacuum")
        data["system"] = {"pdb": str(pdb), "forcefield": forcefield}
        data["model"]["latent_dim"] = 3 * n_atoms - 6 + REDUNDANT_LATENTS
        data["seed"] = args.seed
        config = config_from_dict(apply_overrides(data, [*QUICK, *args.set]))
        config.set_steps(args.steps)
        summary = train_run(
            config, folder, resume=(folder / "checkpoint.pt").exists(), quiet=args.quiet
        )
        row["energy_evaluations"] = summary["energy_evaluations"]
        row["stage"] = "sample"
        with load_run(folder) as run:
            samples = sample_run(run, args.samples, ais_steps=args.ais_steps, seed=0)
        if not np.isfinite(samples.log_w).all():
            bad = int((~np.isfinite(samples.log_w)).sum())
            raise RuntimeError(f"{bad} of {len(samples.log_w)} log-weights are not finite")
        d = diagnose_weights(samples.log_w)
        row.update(ess=d.ess, max_weight_share=d.max_weight_share, pareto_k=d.pareto_k)
        row["stage"] = "done"
    except Exception as error:  # noqa: BLE001 (every failure is reported, then the next residue)
        row["error"] = f"{type(error).__name__}: {error}"
        if not args.quiet:
            traceback.print_exc()
    row["seconds"] = time.perf_counter() - started
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "residues",
        nargs="*",
        default=UNSEEN,
        help="three-letter codes; joined by '-', the residues of one longer peptide (GLY-SER)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder of PDBs and runs")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--ais-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="section.key=value, after QUICK")
    p.add_argument("--implicit", action="store_true", help="amber14 with OBC2 implicit solvent")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_residue(r.upper(), args.out, args) for r in args.residues]
    print(f"{'residue':>7} {'atoms':>5} {'stage':>6} {'ESS/N':>7} {'k':>5} {'time (s)':>8}  error")
    for r in rows:
        ess = f"{r['ess']:.4f}" if "ess" in r else "-"
        k = f"{r['pareto_k']:.2f}" if "pareto_k" in r else "-"
        print(
            f"{r['residue']:>7} {r.get('atoms', '-'):>5} {r['stage']:>6} {ess:>7} {k:>5} "
            f"{r['seconds']:>8.0f}  {r['error'] or ''}"
        )
    failed = [r["residue"] for r in rows if r["error"]]
    record = {
        "benchmark": "unseen_residues",
        "steps": args.steps,
        "forcefield": IMPLICIT if args.implicit else VACUUM,
        "settings": [*QUICK, *args.set],
        "rows": rows,
        "failed": failed,
        **machine_facts(),
    }
    print(json.dumps(record))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
