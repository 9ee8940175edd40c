"""Where a trained molecular model is off: each internal coordinate, the flow against its weights.

The flow's one-shot samples are taken to the coordinate map's own units (the flow coordinates
s of :class:`~openmm_nice.molecule.coordinates.MolecularTransform`: each bond, angle and torsion
normalised as the map was fitted). For every coordinate it compares the flow's mean and standard
deviation with the same moments under the importance weights (which estimate the target's), and
ranks the coordinates by the Kullback-Leibler divergence of the two Gaussians with those moments,

    KL_j = (r^2 + o^2 - 1) / 2 - log r,   o = (mean_q - mean_w) / sd_w,   r = sd_q / sd_w,

a per-coordinate reading of where the model's reverse KL goes (a Gaussian proxy: it sees shifts
and widths, not shape). The target's moments come from the flow samples' own weights, or, with
--target-samples, from a better-weighted sample file such as the panel's AIS samples. Beside
the marginals' sum it prints the KL of the two Gaussians with their full covariances (linear
correlations), with --by-backbone the marginals' KL within each backbone region (phi > 0,
psi alpha; regions the weights barely see left out) plus the regions' shares, with
--torsion-states the ESS/N the flow's own samples would have if their weights were constant
within each torsion's (or torsion pair's) 120-degree states (is the spread between rotamer
states, or within them?), and the model's
whole KL(q || p) = log Z - E_q[log w], with log Z from the flow's weights (an underestimate
when they are poor, so the KL is one too; a few clashes of U > 1e6 kT can dominate the mean,
so it is printed also without the lowest 1% of log w). A sum of marginal KLs is no budget of
the joint KL: correlated coordinates count a shared misfit more than once, so the sums are to
be compared with each other (how much worse the fit looks given the backbone region than
overall), not read as parts of the whole. It prints one table and one JSON line.

Usage:
    python benchmarks/coordinate_fit.py RUN [--n 200000] [--top 15] [--seed 0] \\
        [--target-samples RUN/ais_samples.npz] [--by-backbone] [--torsion-states]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from _machine import machine_facts  # benchmarks/ is on the path of a script run from it
from _panel import backbone_observables

from openmm_nice.analysis.observables import backbone_indices, dihedrals
from openmm_nice.analysis.reweighting import (
    effective_sample_size,
    log_partition_function,
    normalized_weights,
)
from openmm_nice.io import load_samples
from openmm_nice.runs import load_run, sample_run


def _finite_rows(s: np.ndarray) -> np.ndarray:
    """The rows of ``s`` (N, d) whose entries are all finite, in float64."""
    s = np.asarray(s, dtype=np.float64)
    return s[np.isfinite(s).all(axis=1)]


def _weighted(s: np.ndarray, log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``s`` (N, d) with finite entries and a positive weight, and their
    self-normalised weights."""
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or np.shape(log_w) != (len(s),):
        raise ValueError(f"s must be (N, d) and log_w (N,), got {s.shape} and {np.shape(log_w)}")
    w = normalized_weights(log_w)
    keep = (w > 0) & np.isfinite(s).all(axis=1)
    return s[keep], w[keep] / w[keep].sum()


def coordinate_moments(s_q: np.ndarray, s_p: np.ndarray, log_w_p: np.ndarray) -> dict:
    """Per column: the model's mean and standard deviation (its samples ``s_q``), the target's
    (self-normalised weighted moments of ``s_p``, ``log_w_p``: the model's own samples, or AIS
    samples), the offset o and width ratio r in units of the target's, and the Gaussian
    KL(q_j || p_j) of the module docstring."""
    s_q = _finite_rows(s_q)
    s_p, w = _weighted(s_p, log_w_p)
    mean_q, sd_q = s_q.mean(axis=0), s_q.std(axis=0)
    mean_p = w @ s_p
    sd_p = np.sqrt(np.maximum(w @ (s_p - mean_p) ** 2, 1e-300))
    offset, ratio = (mean_q - mean_p) / sd_p, sd_q / sd_p
    kl = 0.5 * (ratio**2 + offset**2 - 1) - np.log(ratio)
    return {
        "mean_q": mean_q,
        "sd_q": sd_q,
        "mean_p": mean_p,
        "sd_p": sd_p,
        "offset": offset,
        "ratio": ratio,
        "kl": kl,
    }


def gaussian_kl(s_q: np.ndarray, s_p: np.ndarray, log_w_p: np.ndarray) -> float:
    """KL(N(m_q, C_q) || N(m_p, C_p)) of the two sets' means and full covariances (weighted for
    p): the part of the model's KL that linear correlations carry, beyond the marginals."""
    s_q = _finite_rows(s_q)
    s_p, w = _weighted(s_p, log_w_p)
    mean_q, mean_p = s_q.mean(axis=0), w @ s_p
    cov_q = np.cov(s_q, rowvar=False, bias=True)
    centred = s_p - mean_p
    cov_p = (centred * w[:, None]).T @ centred
    chol = np.linalg.cholesky(cov_p)
    solve = np.linalg.solve
    a = solve(chol, solve(chol, cov_q).T)  # C_p^-1/2 C_q C_p^-T/2, symmetric
    b = solve(chol, mean_q - mean_p)
    logdet_p = 2 * np.log(np.diag(chol)).sum()
    logdet_q = np.linalg.slogdet(cov_q)[1]
    return float(0.5 * (np.trace(a) + b @ b - len(b) + logdet_p - logdet_q))


def conditional_marginal_kl(
    s_q: np.ndarray,
    label_q: np.ndarray,
    s_p: np.ndarray,
    label_p: np.ndarray,
    log_w_p: np.ndarray,
    min_ess: float = 100.0,
) -> tuple[float, float, float]:
    """The marginals' Gaussian KL given a discrete state (an integer label per sample):
    KL(q(label) || p(label)) over the states kept, sum_r q(r) sum_j KL_j(r) (the marginals'
    KL within each state, weighted by the model's share of it), and the model's share of the
    states left out: those whose weighted samples have a Kish ESS below ``min_ess``, where the
    target's moments are noise."""
    s_p, label_p, log_w_p = (np.asarray(a) for a in (s_p, label_p, log_w_p))
    w = normalized_weights(log_w_p)
    shares_kl = within = left_out = 0.0
    for r in np.unique(label_q):
        inside = label_p == r
        q_r, p_r = float(np.mean(label_q == r)), float(w[inside].sum())
        if p_r <= 0 or (label_q == r).sum() < 2 or effective_sample_size(log_w_p[inside]) < min_ess:
            left_out += q_r
            continue
        shares_kl += q_r * np.log(q_r / p_r)
        kl = coordinate_moments(s_q[label_q == r], s_p[inside], log_w_p[inside])["kl"]
        within += q_r * float(kl.sum())
    return shares_kl, within, left_out


def state_ess_bound(labels: np.ndarray, log_w: np.ndarray) -> float:
    """The ESS/N that a model's own samples would have if their weights were constant within
    each discrete state (``labels``: (N,) or (N, k), one state per distinct row): 1 / sum_s
    P_w(s)^2 / P_q(s), with P_q a state's share of the samples and P_w its share of the
    weights. Only the states' shares being off lowers it; the gap between it and the samples'
    ESS/N is the weights' spread within the states."""
    labels = np.asarray(labels)
    _, state = np.unique(labels.reshape(len(labels), -1), axis=0, return_inverse=True)
    state = state.reshape(-1)
    w = normalized_weights(log_w)
    p_q = np.bincount(state) / len(state)
    p_w = np.bincount(state, weights=w, minlength=len(p_q))
    return float(1.0 / np.sum(p_w**2 / p_q))


def torsion_states(x: np.ndarray, zmatrix: np.ndarray) -> np.ndarray:
    """Each Z-matrix torsion of frames ``x`` (N, 3 n_atoms) in one of three 120-degree arcs,
    [0, 120), [120, 240), [240, 360) degrees: (N, T) integers. The arcs' edges fall between
    the staggered wells (60, 180, 300) of a rotor, so that each well is one state."""
    rows = np.asarray(zmatrix)[3:]
    xyz = np.asarray(x, dtype=np.float64).reshape(len(x), -1, 3)
    angle = np.mod(dihedrals(xyz, rows), 2 * np.pi)
    return np.minimum((angle / (2 * np.pi / 3)).astype(np.int64), 2)


def torsion_state_bounds(states: np.ndarray, log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`state_ess_bound` of each torsion's states alone (T,) and of each pair's joint
    states (T, T), the model's own samples and weights."""
    t = states.shape[1]
    single = np.array([state_ess_bound(states[:, j], log_w) for j in range(t)])
    pairs = np.ones((t, t))
    for i in range(t):
        for j in range(i + 1, t):
            pairs[i, j] = pairs[j, i] = state_ess_bound(states[:, [i, j]], log_w)
    return single, pairs


def backbone_state(x: np.ndarray, topology) -> np.ndarray:
    """An integer per frame of Cartesian positions (N, 3 n_atoms) in nm: which of the panel's
    backbone regions (phi > 0, psi alpha, per residue) it lies in, as bits."""
    phi_rows, psi_rows = backbone_indices(topology)
    xyz = np.asarray(x).reshape(len(x), -1, 3)
    regions = backbone_observables(dihedrals(xyz, phi_rows), dihedrals(xyz, psi_rows))
    return sum(inside.astype(np.int64) << bit for bit, inside in enumerate(regions.values()))


def coordinate_names(topology, zmatrix: np.ndarray) -> list[str]:
    """A name for each internal coordinate, in the order of
    :class:`~openmm_nice.molecule.internal_coordinates.InternalCoordinates`: bonds, angles,
    torsions, each named by its atoms (residue name and number, atom name)."""
    atoms = list(topology.atoms())
    label = [f"{a.residue.name}{a.residue.index + 1}:{a.name}" for a in atoms]
    z = np.asarray(zmatrix)
    names = []
    for kind, size, first in (("bond", 2, 1), ("angle", 3, 2), ("torsion", 4, 3)):
        names += [f"{kind} " + "-".join(label[i] for i in row[:size]) for row in z[first:]]
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a trained run folder (openmm-nice train)")
    parser.add_argument("--n", type=int, default=200_000, help="flow samples (default 200,000)")
    parser.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    parser.add_argument(
        "--target-samples",
        type=Path,
        help="a sample file (x, log_w) whose weighted moments stand for the target's, e.g. the "
        "panel's ais_samples.npz (default: the flow samples' own weights)",
    )
    parser.add_argument(
        "--by-backbone",
        action="store_true",
        help="also the marginals' KL given the backbone region (phi > 0, psi alpha per residue)",
    )
    parser.add_argument(
        "--torsion-states",
        action="store_true",
        help="also the flow's ESS/N bound from each torsion's (and pair's) 120-degree states: "
        "how much of its weights' spread lies between rotamer states",
    )
    args = parser.parse_args(argv)

    with load_run(args.run) as run:
        if not run.target.is_molecule:
            parser.error(f"{args.run} is not a molecular run: it has no internal coordinates")
        flow = sample_run(run, args.n, ais_steps=0, seed=args.seed)
        coordinates = run.generator.coordinates

        def flow_coordinates(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                x = torch.as_tensor(x, dtype=coordinates.shift.dtype)
                parts = [coordinates.inverse_and_ladj(c)[0] for c in x.split(20_000)]
            return torch.cat(parts).numpy()

        s = flow_coordinates(flow.x)
        names = coordinate_names(run.target.molecule.topology, coordinates.internal.zmatrix)
        if args.target_samples is None:
            x_p, log_w_p, source = flow.x, flow.log_w, "the flow samples' own weights"
            s_p = s
        else:
            x_p, log_w_p, _ = load_samples(args.target_samples)
            s_p, source = flow_coordinates(x_p), str(args.target_samples)
        if args.by_backbone:
            topology = run.target.mdtraj_topology()
            label_q, label_p = backbone_state(flow.x, topology), backbone_state(x_p, topology)
        if args.torsion_states:
            states = torsion_states(flow.x, coordinates.internal.zmatrix)
    if len(names) != s.shape[1]:
        raise RuntimeError(f"{len(names)} coordinate names for {s.shape[1]} flow coordinates")
    moments = coordinate_moments(s, s_p, log_w_p)
    kl_linear = gaussian_kl(s, s_p, log_w_p)
    ess = effective_sample_size(log_w_p)
    order = np.argsort(-moments["kl"])
    print(
        f"{args.run}: {args.n} flow samples; the target's moments from {source} "
        f"(ESS {ess:.0f}, {ess / len(log_w_p):.4f} of N)"
    )
    print(f"{'coordinate':<52} {'offset':>7} {'sd ratio':>8} {'KL, nats':>8}")
    for j in order[: args.top]:
        print(
            f"{names[j]:<52} {moments['offset'][j]:>+7.2f} {moments['ratio'][j]:>8.2f} "
            f"{moments['kl'][j]:>8.3f}"
        )
    kinds = {
        kind: [j for j, n in enumerate(names) if n.startswith(kind)]
        for kind in ("bond", "angle", "torsion")
    }
    sums = {kind: float(moments["kl"][rows].sum()) for kind, rows in kinds.items()}
    log_w = flow.log_w[np.isfinite(flow.log_w)]
    log_z = log_partition_function(log_w)
    kl_model = log_z - float(log_w.mean())
    # the same without the 1% of draws with the lowest log w (clashes: U of 1e6 kT and more)
    kl_bulk = log_z - float(log_w[log_w >= np.quantile(log_w, 0.01)].mean())
    print(
        "sum of the per-coordinate KL, nats: " + ", ".join(f"{k}s {v:.2f}" for k, v in sums.items())
    )
    print(f"the two Gaussians' KL with the correlations, nats: {kl_linear:.2f}")
    by_backbone = None
    if args.by_backbone:
        shares_kl, within, left_out = conditional_marginal_kl(s, label_q, s_p, label_p, log_w_p)
        by_backbone = {
            "shares": shares_kl,
            "within": within,
            "total": shares_kl + within,
            "left_out": left_out,
        }
        print(
            f"given the backbone region: the regions' shares {shares_kl:.2f} nats, the marginals "
            f"within them {within:.2f}, together {shares_kl + within:.2f} (regions with a weighted "
            f"ESS below 100 left out: {left_out:.3f} of the flow's samples)"
        )
    by_state = None
    if args.torsion_states:
        finite = np.isfinite(flow.log_w)
        single, pairs = torsion_state_bounds(states[finite], flow.log_w[finite])
        torsion_names = names[len(names) - len(single) :]
        i, j = np.triu_indices(len(single), 1)
        worst = np.argsort(pairs[i, j])[:3]
        by_state = {
            "flow_ess": float(effective_sample_size(flow.log_w[finite]) / finite.sum()),
            "single": {torsion_names[k]: float(single[k]) for k in np.argsort(single)[:3]},
            "pairs": [
                [torsion_names[i[k]], torsion_names[j[k]], float(pairs[i[k], j[k]])] for k in worst
            ],
        }
        print(
            f"the flow's ESS/N {by_state['flow_ess']:.4f}; with its weights constant within each "
            "torsion's 120-degree states, at most:"
        )
        for name, bound in by_state["single"].items():
            print(f"  {name:<60} {bound:.3f}")
        for a, b, bound in by_state["pairs"]:
            print(f"  {a} x {b.split()[1]:<30} {bound:.3f}")
    print(
        f"the model's KL(q || p), nats: {kl_model:.4g} (log Z - mean log w); without the lowest "
        f"1% of log w: {kl_bulk:.2f}"
    )
    record = {
        "benchmark": "coordinate_fit",
        "run": str(args.run),
        "n": args.n,
        "ess_target": ess,
        "kl_sum": sums,
        "kl_model": kl_model,
        "kl_bulk": kl_bulk,
        "kl_gaussian": kl_linear,
        "kl_by_backbone": by_backbone,
        "torsion_states": by_state,
        "target_samples": source,
        "top": [
            {
                "coordinate": names[j],
                "offset": float(moments["offset"][j]),
                "sd_ratio": float(moments["ratio"][j]),
                "kl": float(moments["kl"][j]),
            }
            for j in order[: args.top]
        ],
        "machine": machine_facts(),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
