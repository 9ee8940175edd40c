"""Plots draw on their own canvas: importing the package leaves matplotlib's backend alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openmm_nice.analysis.free_energy import free_energy_map, free_energy_profile
from openmm_nice.analysis.plots import plot_free_energy_map, plot_profiles, plot_ramachandran

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_package_keeps_the_users_matplotlib_backend():
    script = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "before = matplotlib.get_backend()\n"
        "import openmm_nice, openmm_nice.analysis.plots, openmm_nice.runs, openmm_nice.reweight\n"
        "assert matplotlib.get_backend() == before == 'svg', matplotlib.get_backend()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)


def test_plots_are_written_as_png(tmp_path):
    rng = np.random.default_rng(0)
    s = rng.normal(size=2000)
    profile = free_energy_profile(s, n_bootstrap=10)
    plot_profiles({"direct": profile}, tmp_path / "profile.png")
    fmap = free_energy_map(np.tanh(s), np.tanh(s[::-1]))
    plot_free_energy_map({"direct": (fmap.edges, fmap.edges, fmap.free_energy)}, tmp_path / "m.png")
    plot_ramachandran(
        {"direct": (fmap.edges, fmap.edges, fmap.free_energy)}, tmp_path / "r.png", caption="k"
    )
    for name in ("profile.png", "m.png", "r.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ramachandran_is_drawn_in_degrees_with_its_clip_and_caption(tmp_path, monkeypatch):
    import openmm_nice.analysis.plots as plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    edges = np.linspace(-np.pi, np.pi, 37)
    f = np.random.default_rng(0).uniform(0, 12, size=(36, 36))
    plots.plot_ramachandran({"flow": (edges, edges, f)}, tmp_path / "r.png", caption="ESS/N 0.3")
    (fig,) = figures
    ax, colorbar = fig.axes
    assert ax.get_xlabel() == "phi (degrees)" and ax.get_ylabel() == "psi (degrees)"
    assert ax.get_xlim() == pytest.approx((-180.0, 180.0))
    assert "clipped at 10" in colorbar.get_ylabel()
    assert any(t.get_text().startswith("ESS/N 0.3; blank bins") for t in fig.texts)
