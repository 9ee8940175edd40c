"""Densities on the circle for the torsions of the molecular map: piecewise-constant densities
and their closed-form maps to and from a standard normal, densities conditional on a parent
torsion and the tree that picks the parents, their fit to weighted samples (smoothing, floor),
and where to cut each torsion's circle."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from openmm_nice.molecule.internal_coordinates import InternalCoordinates

__all__ = [
    "PARENT_BINS",
    "SMOOTHING_CANDIDATES",
    "SPARSE_BIN_FRAMES",
    "TREE_BINS",
    "TREE_PRIOR",
    "check_torsion_forest",
    "circular_cdf",
    "conditional_cdfs",
    "conditional_log_density",
    "conditional_normal_to_torsion",
    "conditional_torsion_to_normal",
    "cross_validated_smoothing",
    "cut_angle",
    "fit_torsion_tree",
    "normal_to_torsion",
    "parent_bin_frames",
    "torsion_scan",
    "torsion_to_normal",
]


def _bin_cdf(k: Tensor, cdf: Tensor) -> tuple[Tensor, Tensor]:
    """G at the lower edge of bins k (B, T), and the bins' masses, for cdf (T, K + 1)."""
    low = torch.gather(cdf, 1, k.T).T
    mass = torch.gather(cdf.diff(dim=1), 1, k.T).T
    return low, mass


def normal_to_torsion(y: Tensor, offset: Tensor, cdf: Tensor) -> tuple[Tensor, Tensor]:
    """phi = c + G^{-1}(Phi(y)) for y (B, T), and log g(phi); computed in float64."""
    dtype = y.dtype
    y = y.double()
    n_bins = cdf.shape[1] - 1
    v = torch.special.ndtr(y)
    k = torch.searchsorted(cdf.contiguous(), v.T.contiguous(), right=True).T - 1
    k = k.clamp(0, n_bins - 1)
    low, mass = _bin_cdf(k, cdf)
    torsion, log_g = _inside_bin(v, k, low, mass, offset, n_bins)
    return torsion.to(dtype), log_g.to(dtype)


def _inside_bin(
    v: Tensor, k: Tensor, low: Tensor, mass: Tensor, offset: Tensor, n_bins: int
) -> tuple[Tensor, Tensor]:
    """The torsion at which a piecewise-linear G, of value ``low`` at the lower edge of bin k
    and rising by ``mass`` across it, reaches v; and log g there (the bin's density)."""
    width = 2 * math.pi / n_bins
    torsion = offset - math.pi + (k + (v - low) / mass) * width
    return torsion, (mass / width).log()


def _bin_position(torsion: Tensor, offset: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """A torsion's position in bins on the circle cut at offset - pi (float64), and its bin
    k; an undefined torsion (NaN positions) stays NaN, through a valid bin index."""
    width = 2 * math.pi / n_bins
    position = torch.remainder(torsion.double() - (offset - math.pi), 2 * math.pi) / width
    k = torch.nan_to_num(position.floor(), nan=0.0).clamp(0, n_bins - 1).long()
    return position, k


def torsion_to_normal(
    torsion: Tensor, offset: Tensor, cdf: Tensor, with_log_density: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """The inverse of :func:`normal_to_torsion` on the circle cut at offset - pi: y (B, T),
    and with ``with_log_density`` also log g(phi)."""
    dtype = torsion.dtype
    n_bins = cdf.shape[1] - 1
    width = 2 * math.pi / n_bins
    position, k = _bin_position(torsion, offset, n_bins)
    low, mass = _bin_cdf(k, cdf)
    v = low + (position - k) * mass
    y = torch.special.ndtri(v).to(dtype)
    if not with_log_density:
        return y
    return y, (mass / width).log().to(dtype)


def check_torsion_forest(parent: list[int], sign: list[float]) -> None:
    """Raises ValueError unless ``parent`` is a forest over whole-circle torsions."""
    n = len(parent)
    for t, p in enumerate(parent):
        if not -1 <= p < n or p == t:
            raise ValueError(f"torsion_parent[{t}] = {p} is not -1 or another torsion's index")
        if p >= 0 and (sign[t] != 0 or sign[p] != 0):
            raise ValueError(
                f"torsion {t} and its parent {p} must both lie on the whole circle "
                "(torsion_sign 0): a handed torsion has no conditional density"
            )
    for t in range(n):
        p, steps = parent[t], 0
        while p >= 0:
            p, steps = parent[p], steps + 1
            if steps > n:
                raise ValueError(f"torsion_parent has a cycle through torsion {t}")


def _parent_bins(angle: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """The two parent bins j, j + 1 (mod P) whose centres enclose each angle, and the angle's
    linear position lambda in [0, 1) between them."""
    position = torch.remainder(angle + math.pi, 2 * math.pi) * n_bins / (2 * math.pi) - 0.5
    low = torch.nan_to_num(position.floor(), nan=0.0)
    lam = position - low
    j = torch.remainder(low, n_bins).long()
    return j, torch.remainder(j + 1, n_bins), lam


def _mixed_cdf(cdf: Tensor, j0: Tensor, j1: Tensor, lam: Tensor, k: Tensor) -> Tensor:
    """(1 - lam) G_j0(edge k) + lam G_j1(edge k) for cdf (C, P, K + 1) and indices (B, C)."""
    n_children, n_parent, n_edges = cdf.shape
    flat = cdf.reshape(-1)
    base = torch.arange(n_children, device=cdf.device) * (n_parent * n_edges)
    return (1 - lam) * flat[base + j0 * n_edges + k] + lam * flat[base + j1 * n_edges + k]


def conditional_normal_to_torsion(
    y: Tensor, offset: Tensor, cdf: Tensor, parent_angle: Tensor
) -> tuple[Tensor, Tensor]:
    """phi = c + G(. | a)^{-1}(Phi(y)) for y (B, C) with parent angles a (B, C), and
    log g(phi | a); computed in float64."""
    dtype = y.dtype
    y, parent_angle = y.double(), parent_angle.double()
    n_bins = cdf.shape[2] - 1
    j0, j1, lam = _parent_bins(parent_angle, cdf.shape[1])
    v = torch.special.ndtr(y)
    # bisection for the bin k: the largest k in [0, K - 1] with G(edge k | a) <= v
    low_k = torch.zeros_like(j0)
    high_k = torch.full_like(j0, n_bins - 1)
    for _ in range(max(1, math.ceil(math.log2(n_bins))) + 1):
        middle = (low_k + high_k + 1) // 2
        below = _mixed_cdf(cdf, j0, j1, lam, middle) <= v
        low_k = torch.where(below, middle, low_k)
        high_k = torch.where(below, high_k, middle - 1)
    k = low_k
    low = _mixed_cdf(cdf, j0, j1, lam, k)
    mass = _mixed_cdf(cdf, j0, j1, lam, k + 1) - low
    torsion, log_g = _inside_bin(v, k, low, mass, offset, n_bins)
    return torsion.to(dtype), log_g.to(dtype)


def conditional_torsion_to_normal(
    torsion: Tensor, offset: Tensor, cdf: Tensor, parent_angle: Tensor
) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`conditional_normal_to_torsion`: y (B, C) and log g(phi | a)."""
    dtype = torsion.dtype
    n_bins = cdf.shape[2] - 1
    width = 2 * math.pi / n_bins
    j0, j1, lam = _parent_bins(parent_angle.double(), cdf.shape[1])
    position, k = _bin_position(torsion, offset, n_bins)
    low = _mixed_cdf(cdf, j0, j1, lam, k)
    mass = _mixed_cdf(cdf, j0, j1, lam, k + 1) - low
    y = torch.special.ndtri(low + (position - k) * mass)
    return y.to(dtype), (mass / width).log().to(dtype)


PARENT_BINS = 36
"""Bins of a parent torsion's angle (10 degrees) on which a child's density is conditioned."""

TREE_BINS = 12
"""Bins (30 degrees) of each torsion in the histograms that estimate mutual information."""

TREE_PRIOR = 2.0
"""Pseudo-count with which a parent bin's density of its child leans to the child's marginal."""

SPARSE_BIN_FRAMES = 3000.0
"""With adaptive smoothing (:func:`conditional_cdfs`), a parent bin with fewer effective frames
than this smooths its child's histogram wider than the marginal's width."""


def fit_torsion_tree(torsions: np.ndarray, weights: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Parents (T,) of a maximum-mutual-information spanning forest (Chow-Liu) over the
    eligible torsions (F, T) of weighted frames, -1 for a root or an ineligible torsion. Edges
    whose histogram estimate of the mutual information (TREE_BINS x TREE_BINS bins) does not
    exceed its bias (TREE_BINS - 1)^2 / (2 ESS) are left out; each tree is rooted at its node of
    largest total mutual information, which keeps the trees shallow."""
    n_torsions = torsions.shape[1]
    p = TREE_BINS
    ess = 1.0 / float(np.sum(weights**2))
    bins = np.minimum(
        (np.remainder(torsions + math.pi, 2 * math.pi) * p / (2 * math.pi)).astype(np.int64),
        p - 1,
    )
    marginals = [np.bincount(bins[:, t], weights, minlength=p) for t in range(n_torsions)]
    # in logs: the product of two marginals' tiny masses (importance weights of 1e-200) would
    # underflow to 0 and make the information infinite
    with np.errstate(divide="ignore"):
        log_marginals = [np.log(m) for m in marginals]
    bias = (p - 1) ** 2 / (2 * ess)
    edges = []
    nodes = np.flatnonzero(eligible)
    for a_index, a in enumerate(nodes):
        for b in nodes[a_index + 1 :]:
            joint = np.bincount(bins[:, a] * p + bins[:, b], weights, minlength=p * p)
            joint = joint.reshape(p, p)
            log_outer = log_marginals[a][:, None] + log_marginals[b][None, :]
            kept = joint > 0
            information = float(np.sum(joint[kept] * (np.log(joint[kept]) - log_outer[kept])))
            if information > bias:
                edges.append((information - bias, int(a), int(b)))
    root = list(range(n_torsions))

    def find(t: int) -> int:
        while root[t] != t:
            root[t] = root[root[t]]
            t = root[t]
        return t

    neighbours: dict[int, list[tuple[int, float]]] = {t: [] for t in range(n_torsions)}
    for information, a, b in sorted(edges, reverse=True):  # Kruskal, strongest first
        if find(a) != find(b):
            root[find(a)] = find(b)
            neighbours[a].append((b, information))
            neighbours[b].append((a, information))
    parent = -np.ones(n_torsions, dtype=np.int64)
    seen = np.zeros(n_torsions, dtype=bool)
    strength = {t: sum(i for _, i in neighbours[t]) for t in range(n_torsions)}
    for start in sorted(range(n_torsions), key=lambda t: -strength[t]):
        if seen[start]:
            continue
        seen[start] = True
        queue = [start]
        while queue:
            node = queue.pop(0)
            for child, _ in neighbours[node]:
                if not seen[child]:
                    seen[child], parent[child] = True, node
                    queue.append(child)
    return parent


def conditional_cdfs(
    values: np.ndarray,
    parent_values: np.ndarray,
    bins: int,
    smoothing: float,
    floor: float,
    weights: np.ndarray,
    sparse_frames: float | None = None,
) -> np.ndarray:
    """G (PARENT_BINS, bins + 1) of a child torsion's density in each parent bin: its
    smoothed histogram (angles measured from its cut) with the frames weighted by their share
    of that bin (linear between bin centres), leaning to the child's marginal with TREE_PRIOR
    pseudo-frames where the bin holds few (effective) frames, and mixed with a uniform floor.

    With ``sparse_frames`` (e.g. :data:`SPARSE_BIN_FRAMES`), a bin whose shares have a Kish
    effective number n below it is smoothed by ``smoothing`` (sparse_frames / n)^(1/5), the
    n^(-1/5) of a kernel density's bandwidth: a rarely visited parent angle whose few frames
    carry unequal weights then gets a density that spreads over their basin, instead of a comb
    of spikes each as narrow as the well-sampled bins' (which costs the model's weights there:
    benchmarks/RESULTS.md). None: every bin is smoothed by ``smoothing``."""
    if sparse_frames is not None and not sparse_frames > 0:
        raise ValueError(f"sparse_frames must be a positive number of frames, got {sparse_frames}")
    ess = 1.0 / float(np.sum(weights**2))
    j0, j1, lam = (v.numpy() for v in _parent_bins(torch.as_tensor(parent_values), PARENT_BINS))
    if sparse_frames is not None:
        # each bin's own effective frames: a few heavy weights count as few
        kish = parent_bin_frames(parent_values, weights)
    marginal = _smoothed_histogram(values, bins, smoothing, weights)
    marginal /= marginal.sum()
    cdfs = np.empty((PARENT_BINS, bins + 1))
    for j in range(PARENT_BINS):
        share = weights * ((j0 == j) * (1 - lam) + (j1 == j) * lam)
        frames = float(share.sum()) * ess
        density = marginal
        if share.sum() > 0:
            width = smoothing
            if sparse_frames is not None:
                width = smoothing * max(1.0, sparse_frames / kish[j]) ** 0.2
            density = _smoothed_histogram(values, bins, width, share)
            density = (frames * density / density.sum() + TREE_PRIOR * marginal) / (
                frames + TREE_PRIOR
            )
        cdfs[j] = _floored_cdf(density, floor)
    return cdfs


def conditional_log_density(cdfs: np.ndarray, values: np.ndarray, parent_values: np.ndarray):
    """log g(value | parent) per radian of a child's :func:`conditional_cdfs` (P, K + 1) at
    angles ``values`` measured from its cut and parent angles ``parent_values`` (both (F,)),
    as the map itself evaluates it (:func:`conditional_torsion_to_normal`, the cut at 0): a
    held-out score of a fit."""
    _, log_g = conditional_torsion_to_normal(
        torch.as_tensor(values, dtype=torch.float64)[:, None],
        torch.tensor([math.pi], dtype=torch.float64),  # offset - pi = 0: values from the cut
        torch.as_tensor(cdfs, dtype=torch.float64)[None],
        torch.as_tensor(parent_values, dtype=torch.float64)[:, None],
    )
    return log_g[:, 0].numpy()


def parent_bin_frames(parent_values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The Kish effective number of frames (PARENT_BINS,) of each parent bin, each frame
    shared between its two enclosing bins as :func:`conditional_cdfs` shares it (0 for a bin
    no frame reaches). Each bin's shares are scaled by its largest first, so that the squares
    of tiny weights (1e-200) do not underflow to 0."""
    j0, j1, lam = (v.numpy() for v in _parent_bins(torch.as_tensor(parent_values), PARENT_BINS))
    bins = np.concatenate([j0, j1])
    shares = np.concatenate([weights * (1 - lam), weights * lam])
    largest = np.zeros(PARENT_BINS)
    np.maximum.at(largest, bins, shares)
    scaled = np.divide(shares, largest[bins], out=np.zeros_like(shares), where=largest[bins] > 0)
    total = np.bincount(bins, scaled, minlength=PARENT_BINS)
    squares = np.bincount(bins, scaled**2, minlength=PARENT_BINS)
    return np.divide(total**2, squares, out=np.zeros(PARENT_BINS), where=squares > 0)


def _smoothed_histogram(
    angles: np.ndarray, bins: int, smoothing: float, weights: np.ndarray | None = None
) -> np.ndarray:
    """(Weighted) counts of angles (taken mod 2 pi from 0) in ``bins`` bins, smoothed around
    the circle."""
    position = np.remainder(angles, 2 * math.pi) * bins / (2 * math.pi)
    index = np.minimum(position.astype(np.int64), bins - 1)
    return _smooth_counts(np.bincount(index, weights, minlength=bins), smoothing)


def _smooth_counts(counts: np.ndarray, smoothing: float) -> np.ndarray:
    """Bin counts around the circle convolved with a Gaussian of ``smoothing`` bins."""
    bins = len(counts)
    reach = int(math.ceil(3 * smoothing))
    smooth = np.zeros(bins)
    for shift in range(-reach, reach + 1):
        weight = math.exp(-0.5 * (shift / max(smoothing, 1e-12)) ** 2)
        smooth += weight * np.roll(counts.astype(np.float64), shift)
    return smooth


SMOOTHING_CANDIDATES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 14.0, 20.0, 30.0)
"""Widths in bins among which ``density_smoothing="auto"`` chooses."""


def cross_validated_smoothing(
    copies: np.ndarray,
    bins: int,
    floor: float,
    weights: np.ndarray | None = None,
    folds: int = 5,
) -> float:
    """The width of :data:`SMOOTHING_CANDIDATES` whose floored, smoothed histogram gives the
    highest (weighted) log-likelihood to held-out contiguous blocks of frames; ``copies``
    (n, F) holds each frame's n symmetry-equivalent angles (kept in the same block), and
    ``weights`` (F,) optional frame weights."""
    n_copies, n_frames = copies.shape
    if n_frames < 2 * folds:
        return 10.0
    w = np.ones(n_frames) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.broadcast_to(w, (n_copies, n_frames))
    edges = np.linspace(0, n_frames, folds + 1).round().astype(np.int64)
    position = np.remainder(copies, 2 * math.pi) * bins / (2 * math.pi)
    index = np.minimum(position.astype(np.int64), bins - 1)
    scores = []
    for width in SMOOTHING_CANDIDATES:
        score = 0.0
        for k in range(folds):
            held = np.zeros(n_frames, dtype=bool)
            held[edges[k] : edges[k + 1]] = True
            counts = np.bincount(index[:, ~held].ravel(), w[:, ~held].ravel(), minlength=bins)
            smooth = _smooth_counts(counts, width)
            density = (1 - floor) * smooth / smooth.sum() + floor / bins
            score += (w[:, held] * np.log(density[index[:, held]])).sum()
        scores.append(score)
    return SMOOTHING_CANDIDATES[int(np.argmax(scores))]


def circular_cdf(
    angles: np.ndarray,
    bins: int,
    smoothing: float,
    floor: float,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """G at the bin edges of the (weighted) smoothed histogram of angles measured from the
    cut, mixed with a uniform floor: shape (bins + 1,), from exactly 0 to exactly 1."""
    return _floored_cdf(_smoothed_histogram(angles, bins, smoothing, weights), floor)


def _floored_cdf(density: np.ndarray, floor: float) -> np.ndarray:
    """G at the bin edges of a binned density (any positive scale) mixed with a uniform
    density of weight ``floor``: shape (bins + 1,), from exactly 0 to exactly 1."""
    mass = (1 - floor) * density / density.sum() + floor / len(density)
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def torsion_scan(
    internal: InternalCoordinates,
    q: Tensor,
    energy: Callable[[Tensor], Tensor],
    n_frames: int,
    n_angles: int,
) -> np.ndarray:
    """-log <exp(-U)> over evenly spaced frames with each torsion set to each of n_angles
    values from -pi: shape (T, n_angles), in kT."""
    n = internal.n_atoms
    pick = np.unique(np.linspace(0, len(q) - 1, min(n_frames, len(q))).round().astype(np.int64))
    frames = q[torch.as_tensor(pick)]
    values = -math.pi + 2 * math.pi * torch.arange(n_angles, dtype=torch.float64) / n_angles
    scan = np.empty((n - 3, n_angles))
    with torch.no_grad():
        for t in range(n - 3):
            trial = frames.repeat(n_angles, 1)
            trial[:, 2 * n - 3 + t] = values.repeat_interleave(len(frames))
            u = torch.as_tensor(energy(internal.to_cartesian(trial)[0])).double()
            u = torch.nan_to_num(u.reshape(n_angles, len(frames)), nan=math.inf)
            scan[t] = (math.log(len(frames)) - torch.logsumexp(-u, dim=1)).numpy()
    return scan


def cut_angle(
    angles: np.ndarray,
    bins: int,
    smoothing: float,
    scan: np.ndarray | None,
    weights: np.ndarray | None = None,
    keep: float | None = None,
) -> float:
    """Where to cut a torsion's circle: in the least-populated region of the (weighted)
    smoothed histogram; at ``keep`` (the current cut) if it lies in that region; otherwise
    with a scan at its highest scanned free energy there, else in the middle of the widest
    such region."""
    smooth = _smoothed_histogram(angles + math.pi, bins, smoothing, weights)  # bins from -pi
    lowest = smooth <= smooth.min() * (1 + 1e-9)
    if keep is not None:
        kept = math.remainder(keep, 2 * math.pi)
        if lowest[min(int((kept + math.pi) * bins / (2 * math.pi)), bins - 1)]:
            return kept
    centres = -math.pi + (np.arange(bins) + 0.5) * 2 * math.pi / bins
    if scan is not None:
        # The scanned value nearest each bin centre (scan values start at -pi, evenly spaced).
        nearest = np.round((centres + math.pi) * len(scan) / (2 * math.pi)).astype(np.int64)
        score = np.where(lowest, scan[nearest % len(scan)], -math.inf)
        if np.isfinite(score).any() and np.ptp(score[lowest]) != 0:
            return float(centres[np.argmax(score)])
    # Walk the circle from a bin above the minimum so that no low run is split at the seam.
    start = int(np.argmin(lowest))
    best_start, best_length, run = 0, 0, 0
    for step in range(1, bins + 1):
        index = (start + step) % bins
        run = run + 1 if lowest[index] else 0
        if run > best_length:
            best_start, best_length = index - run + 1, run
    middle = best_start + (best_length - 1) / 2
    return (middle + 0.5) * 2 * math.pi / bins % (2 * math.pi) - math.pi
