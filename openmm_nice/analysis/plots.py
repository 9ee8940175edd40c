"""Figures people look at: loss curves, the note's Figure 1, free-energy profiles and maps."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from openmm_nice.analysis.free_energy import FreeEnergyProfile, free_energy_profile
from openmm_nice.io import atomic_write

__all__ = [
    "save_figure",
    "plot_metrics",
    "plot_note_figure",
    "plot_profiles",
    "plot_free_energy_map",
    "plot_ramachandran",
]


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure drawn by Agg on a canvas of its own: pyplot's global backend stays the user's."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, lambda h: h.write(buffer.getvalue()))


def plot_metrics(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> None:
    """Loss and ESS/N against the training step, from a run's metrics.csv."""
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    step = np.array([float(r["step"]) for r in rows])
    fig = _figure((10, 3.5))
    ax_loss, ax_ess = fig.subplots(1, 2)
    for key, label in (
        ("loss", "loss"),
        ("reverse_kl_nats", "J_R (nats)"),
        ("nll_nats", "NLL (nats)"),
    ):
        values = np.array([float(r[key]) if r[key] not in ("", None) else np.nan for r in rows])
        if np.isfinite(values).any():
            ax_loss.plot(step, values, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("nats")
    ax_loss.legend()
    ax_ess.plot(step, [float(r["ess"]) for r in rows], color="C3")
    ax_ess.set_xlabel("step")
    ax_ess.set_ylabel("ESS / N (training batch)")
    ax_ess.set_ylim(0, 1.02)
    save_figure(fig, path)


def plot_note_figure(
    potential: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    log_w: np.ndarray,
    log_z: float,
    path: str | os.PathLike,
    range: tuple[float, float] = (-2.5, 2.5),
    bins: int = 80,
) -> None:
    """The method note's Figure 1: true U (black) against the estimate (red).

    The estimate is :math:`-\\log p(x) - \\log Z` from the histogram of samples, (a) direct,
    (b) importance-sampled.
    """
    grid = np.linspace(*range, 400)
    fig = _figure((10, 3.8))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, weights, title in (
        (axes[0], None, "(a) direct sampling"),
        (axes[1], log_w, "(b) importance sampling"),
    ):
        profile = free_energy_profile(x, weights, bins=bins, range=range, n_bootstrap=50)
        shift = _profile_offset(profile, potential, log_z)
        ax.plot(grid, potential(grid), color="black", label="U (exact)")
        ax.errorbar(
            profile.centers,
            profile.free_energy + shift,
            yerr=_bars(profile.error),
            color="red",
            fmt=".",
            ms=3,
            label="estimate",
        )
        ax.set_title(title)
        ax.set_xlabel("x")
    axes[0].set_ylabel("U(x)")
    axes[0].legend()
    save_figure(fig, path)


def _bars(error: np.ndarray) -> np.ndarray:
    """Error bars to draw: none (NaN) where the error is not finite."""
    return np.where(np.isfinite(error), error, np.nan)


def _profile_offset(profile: FreeEnergyProfile, potential, log_z: float) -> float:
    """The constant that turns a min-0 profile into -log p(x) - log Z (the energy scale)."""
    finite = np.isfinite(profile.free_energy)
    if not finite.any():
        return 0.0
    # -log p = F + c with the profile's own normalisation; p integrates to 1 on its bins
    widths = np.diff(profile.centers).mean() if len(profile.centers) > 1 else 1.0
    log_mass = np.log(np.sum(np.exp(-profile.free_energy[finite])) * widths)
    return float(log_mass - log_z)


def _caption(fig: Figure, caption: str | None) -> None:
    """A line of small text under the axes (e.g. how far the weights behind the figure hold)."""
    if caption:
        fig.text(0.5, -0.02, caption, ha="center", va="top", fontsize=8, wrap=True)


def plot_profiles(
    profiles: dict[str, FreeEnergyProfile],
    path: str | os.PathLike,
    xlabel: str = "s",
    exact=None,
    caption: str | None = None,
) -> None:
    """Free-energy profiles F(s) (kT) with error bars; ``exact`` is an optional (s, F) pair,
    ``caption`` a line under the plot."""
    fig = _figure((6, 4))
    ax = fig.subplots()
    for i, (label, p) in enumerate(profiles.items()):
        ax.errorbar(
            p.centers,
            p.free_energy,
            yerr=_bars(p.error),
            fmt=".-",
            ms=3,
            color=f"C{i}",
            label=label,
        )
    if exact is not None:
        ax.plot(*exact, color="black", label="exact")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("free energy (kT)")
    ax.legend()
    _caption(fig, caption)
    save_figure(fig, path)


def plot_free_energy_map(
    maps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    xlabel: str = "phi (rad)",
    ylabel: str = "psi (rad)",
    vmax: float = 10.0,
    caption: str | None = None,
    ticks: float | None = None,
) -> None:
    """Two-dimensional free-energy maps side by side, each (x edges, y edges, F (nx, ny) in kT),
    with ``caption`` as a line under them. The colour scale clips at ``vmax`` (kT) and says so;
    bins no sample reached are blank. ``ticks``: the axes' tick spacing (default: matplotlib's)."""
    fig = _figure((5.6 * len(maps), 4.2))
    axes = fig.subplots(1, len(maps), squeeze=False)
    fig.subplots_adjust(wspace=0.45)
    for ax, (title, (xe, ye, f)) in zip(axes[0], maps.items()):
        mesh = ax.pcolormesh(
            xe, ye, np.where(np.isfinite(f), f, np.nan).T, cmap="viridis", vmin=0, vmax=vmax
        )
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ticks:
            ax.set_xticks(np.arange(xe[0], xe[-1] + 1e-9, ticks))
            ax.set_yticks(np.arange(ye[0], ye[-1] + 1e-9, ticks))
        fig.colorbar(mesh, ax=ax, extend="max", label=f"free energy (kT), clipped at {vmax:g}")
    blank = "blank bins: no sample"
    _caption(fig, f"{caption}; {blank}" if caption else blank)
    save_figure(fig, path)


def plot_ramachandran(
    maps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    vmax: float = 10.0,
    caption: str | None = None,
) -> None:
    """Ramachandran free-energy maps as chemists read them: maps binned in radians (as
    :func:`~openmm_nice.analysis.free_energy.free_energy_map` gives them) drawn in degrees."""
    in_degrees = {title: (np.degrees(xe), np.degrees(ye), f) for title, (xe, ye, f) in maps.items()}
    plot_free_energy_map(
        in_degrees, path, "phi (degrees)", "psi (degrees)", vmax=vmax, caption=caption, ticks=90
    )
