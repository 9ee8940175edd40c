"""Langevin dynamics alone against Langevin dynamics plus the generator's Metropolis-Hastings
move (openmm_nice.BoltzmannGeneratorMove), on alanine dipeptide at equal energy evaluations.

Both chains are openmmtools MCMCSamplers on the run's System and temperature (`openmm-nice
mcmc`'s chain, openmm_nice.sampling.moves.run_chain), started from the molecule's own structure (phi < 0)
and given the same number of energy evaluations: a Langevin step costs one (forces), the move
one for the current state plus one per proposal. Langevin alone makes --langevin-steps steps per
frame; the mixed chain makes --langevin-steps steps and --proposals proposals per frame. For
each chain the script prints, from its frames' phi:

- entries into C7ax / alpha_L (0 < phi < 2.2) from phi < 0 (a frame in the region whose
  previous frame had phi < 0);
- the integrated autocorrelation time of sign(phi) (pymbar's statistical inefficiency g of the
  frames, in energy evaluations; none if phi never changed sign), and of the indicator of
  C7ax / alpha_L: sign(phi) also flips where the beta basin's tail crosses phi = +-pi, quickly,
  so a chain that never enters C7ax can still show a short autocorrelation time of sign(phi);
- dF(phi>0 - phi<0) = -log(p / (1 - p)) in kT with its standard error from that
  autocorrelation time, and its distance from a reference (--reference-df; by default the dF
  of benchmarks/reference/alanine_dipeptide_vacuum_300K.npz, the umbrella-sampling reference of
  benchmarks/alanine_reference.py);
- the move's acceptance.

Usage:
    python benchmarks/mcmc.py --run RUN --evaluations 2000000 --langevin-steps 500 --proposals 10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from _machine import machine_facts  # benchmarks/ is on the path of a script run from it

from openmm_nice.analysis.observables import ramachandran
from openmm_nice.molecule.systems import import_quietly
from openmm_nice.sampling.moves import run_chain

statistical_inefficiency = import_quietly("pymbar.timeseries").statistical_inefficiency

C7AX = (0.0, 2.2)  # phi range of the C7ax / alpha_L basins, radians


REFERENCE = Path(__file__).parent / "reference" / "alanine_dipeptide_vacuum_300K.npz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder of alanine dipeptide")
    p.add_argument(
        "--evaluations", type=int, default=200_000, help="energy evaluations of each chain"
    )
    p.add_argument("--langevin-steps", type=int, default=500, help="Langevin steps per frame")
    p.add_argument("--proposals", type=int, default=10, help="generator proposals per frame")
    p.add_argument("--timestep", type=float, help="fs (default: the run's md.timestep_fs)")
    p.add_argument("--collision-rate", type=float, help="1/ps (default: md.friction_per_ps)")
    p.add_argument("--temperature", type=float, help="K (default: the run's)")
    p.add_argument(
        "--reference-df",
        type=float,
        help="reference dF in kT (default: that of benchmarks/reference/"
        "alanine_dipeptide_vacuum_300K.npz)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.reference_df is None:
        with np.load(REFERENCE) as reference:
            args.reference_df = float(reference["df_kT"])
    return args


def phi_statistics(phi: np.ndarray, evaluations_per_frame: int, reference_df: float) -> dict:
    """Entries into C7ax / alpha_L, the autocorrelation of sign(phi), and dF with its error."""
    inside = (phi > C7AX[0]) & (phi < C7AX[1])
    entries = int(np.sum(inside[1:] & (phi[:-1] < 0)))
    p, n = float(np.mean(phi > 0)), len(phi)
    statistics = {
        "frames": n,
        "entries_c7ax": entries,
        "p_c7ax": float(inside.mean()),
        "g_c7ax_evaluations": _inefficiency(inside, evaluations_per_frame),
        "p_phi_positive": p,
        "g_sign_phi_evaluations": _inefficiency(phi > 0, evaluations_per_frame),
    }
    if not 0 < p < 1:  # one sign only: no estimate (null in the JSON)
        return {**statistics, "df_kT": None, "df_error_kT": None, "df_minus_reference_kT": None}
    df = -math.log(p / (1 - p))
    g = statistics["g_sign_phi_evaluations"] / evaluations_per_frame
    return {
        **statistics,
        "df_kT": df,
        "df_error_kT": math.sqrt(g * p * (1 - p) / n) / (p * (1 - p)),
        "df_minus_reference_kT": df - reference_df,
    }


def _inefficiency(indicator: np.ndarray, evaluations_per_frame: int) -> float | None:
    """The statistical inefficiency g = 1 + 2 tau of a 0/1 series, in energy evaluations;
    None if it never changes."""
    if indicator.all() or not indicator.any():
        return None
    return float(statistical_inefficiency(indicator.astype(np.float64))) * evaluations_per_frame


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chains = {
        "langevin": {"langevin_steps": args.langevin_steps, "n_proposals": 0},
        "langevin + move": {"langevin_steps": args.langevin_steps, "n_proposals": args.proposals},
    }
    rows = {}
    for name, setting in chains.items():
        per_frame = setting["langevin_steps"] + (
            1 + setting["n_proposals"] if setting["n_proposals"] else 0
        )
        result = run_chain(
            args.run,
            args.evaluations // per_frame,
            timestep_fs=args.timestep,
            collision_rate_per_ps=args.collision_rate,
            temperature=args.temperature,
            seed=args.seed,
            progress=not args.quiet,
            **setting,
        )
        phi, _ = ramachandran(result.x, _mdtraj_topology(result.topology))
        rows[name] = {
            **setting,
            "evaluations": per_frame * len(phi),
            **phi_statistics(phi, per_frame, args.reference_df),
            "acceptance": result.acceptance if setting["n_proposals"] else None,
            "wall_time_s": result.wall_time_s,
        }
    print(
        f"{'chain':<16} {'evaluations':>11} {'frames':>7} {'entries':>7} {'g(sign phi)':>12} "
        f"{'g(C7ax)':>9} {'dF (kT)':>16} {'dF - ref':>8} {'acceptance':>10} {'wall s':>7}"
    )
    for name, r in rows.items():
        df = f"{_number(r['df_kT'], '.3f')} +- {_number(r['df_error_kT'], '.3f')}"
        print(
            f"{name:<16} {r['evaluations']:>11} {r['frames']:>7} {r['entries_c7ax']:>7} "
            f"{_number(r['g_sign_phi_evaluations'], '.4g'):>12} "
            f"{_number(r['g_c7ax_evaluations'], '.4g'):>9} {df:>16} "
            f"{_number(r['df_minus_reference_kT'], '.3f'):>8} "
            f"{_number(r['acceptance'], '.4f'):>10} {r['wall_time_s']:>7.1f}"
        )
    print("g: statistical inefficiency (1 + 2 tau) in energy evaluations; ref: --reference-df")
    line = {
        "benchmark": "mcmc",
        "system": "alanine_dipeptide_vacuum",
        "run": args.run,
        "evaluations": args.evaluations,
        "reference_df_kT": args.reference_df,
        "seed": args.seed,
        **machine_facts(),
        "chains": rows,
    }
    print(json.dumps(line))
    return 0


def _mdtraj_topology(topology):
    import mdtraj

    return mdtraj.Topology.from_openmm(topology)


if __name__ == "__main__":
    sys.exit(main())
