"""The panel of molecules that the one recipe is judged on, and what is measured on each.

Each molecule is a `system` spec as a config takes it (a built-in name, or a PDB made by
examples/make_dipeptide.py with the command in its .json, plus OpenMM's own force-field files)
and its D: d = 3N - 6 internal coordinates plus 6 redundant latents, as the examples have it.
The recipe is examples/alanine_dipeptide.yaml; a panel config is it with `system` and
`model.latent_dim` replaced and nothing else. The backbone observables are the signs of every
residue's phi (dF = F(phi > 0) - F(phi < 0)): defined for any peptide, they name no basin.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "alanine_dipeptide.yaml"
REFERENCES = Path(__file__).resolve().parent / "reference" / "panel"

VACUUM = ["amber14-all.xml"]
IMPLICIT = ["amber14-all.xml", "implicit/obc2.xml"]


def _pdb(name: str, forcefield: list[str]) -> dict:
    return {"pdb": str(ROOT / "data" / f"{name}.pdb"), "forcefield": forcefield}


PANEL = {
    # openmmtools' systems (Amber ff96; implicit: OBC GBSA), as the examples name them
    "alanine_dipeptide_vacuum": {"system": "alanine_dipeptide_vacuum", "atoms": 22},
    "alanine_dipeptide_implicit": {"system": "alanine_dipeptide_implicit", "atoms": 22},
    # amber14 in vacuum: a branched side chain, an aromatic one, proline's ring
    "valine_dipeptide": {"system": _pdb("valine_dipeptide", VACUUM), "atoms": 28},
    "phenylalanine_dipeptide": {"system": _pdb("phenylalanine_dipeptide", VACUUM), "atoms": 32},
    "proline_dipeptide": {"system": _pdb("proline_dipeptide", VACUUM), "atoms": 26},
    # amber14 with OBC2 implicit solvent: a charged side chain, and the field's tetrapeptide
    "lysine_dipeptide_implicit": {"system": _pdb("lysine_dipeptide", IMPLICIT), "atoms": 34},
    "alanine_tetrapeptide_implicit": {
        "system": _pdb("alanine_tetrapeptide", IMPLICIT),
        "atoms": 42,
    },
}
REDUNDANT_LATENTS = 6


def latent_dim(name: str) -> int:
    """D = 3N - 6 + 6 redundant latents."""
    return 3 * PANEL[name]["atoms"] - 6 + REDUNDANT_LATENTS


def panel_config(name: str, recipe: Path = RECIPE) -> dict:
    """The recipe with the molecule's system and D, and nothing else changed."""
    if name not in PANEL:
        raise SystemExit(f"unknown panel molecule {name!r}; the panel is {sorted(PANEL)}")
    config = copy.deepcopy(yaml.safe_load(recipe.read_text()))
    config["system"] = PANEL[name]["system"]
    config["model"]["latent_dim"] = latent_dim(name)
    return config


UMBRELLA = {  # alanine's own references, umbrella sampling on (phi, psi): more precise than PT
    "alanine_dipeptide_vacuum": REFERENCES.parent / "alanine_dipeptide_vacuum_300K.npz",
    "alanine_dipeptide_implicit": REFERENCES.parent / "alanine_dipeptide_implicit_300K.npz",
}


def reference_path(name: str) -> Path:
    """Where panel_reference.py writes the molecule's reference."""
    return REFERENCES / f"{name}_300K.npz"


def reference_file(name: str) -> Path | None:
    """The reference the panel compares with: the umbrella one for alanine, else the parallel
    tempering one where it exists."""
    for path in (UMBRELLA.get(name), reference_path(name)):
        if path is not None and path.exists():
            return path
    return None


ALPHA_PSI_DEGREES = (-120.0, 50.0)
"""psi in this range: the alpha side of a residue's backbone (psi's other side: beta, PPII)."""


def backbone_observables(phi: np.ndarray, psi: np.ndarray) -> dict[str, np.ndarray]:
    """Regions of every residue's backbone, as boolean arrays of the frames: ``phi{k}>0`` (the
    left-handed side, C7ax and alpha_L) and ``psi{k} alpha`` (psi in :data:`ALPHA_PSI_DEGREES`),
    k = 1, 2, ... along the sequence. ``phi`` and ``psi``: (..., R) radians. They name regions
    of any peptide's Ramachandran plane, not a molecule's basins."""
    lo, hi = np.radians(ALPHA_PSI_DEGREES)
    observables = {}
    for k in range(phi.shape[-1]):
        observables[f"phi{k + 1}>0"] = phi[..., k] > 0
        observables[f"psi{k + 1} alpha"] = (psi[..., k] > lo) & (psi[..., k] < hi)
    return observables
