"""Atomic file writing: checkpoints, sample files and text outputs are never left half-written."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from openmm_nice.errors import UserInputError

__all__ = [
    "read_frames",
    "atomic_write",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "save_samples",
    "write_trajectory",
]


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file through ``write(handle)`` into a temporary file, then rename it into place.

    The rename is atomic on POSIX, so a reader (or a resumed run after SIGKILL) sees either the
    old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda h: h.write(text.encode()))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save ``state`` atomically; it must hold only tensors, numbers, strings, lists, dicts."""
    atomic_write(path, lambda h: torch.save(state, h))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first with `openmm-nice train`")
    return torch.load(path, map_location=map_location, weights_only=True)


def save_samples(path: str | os.PathLike, x, log_w, u, **extra) -> None:
    """Write the contract npz: ``x`` (N, d) float64, ``log_w`` (N,), ``u`` (N,), plus extras."""
    arrays = {
        "x": np.asarray(x, dtype=np.float64),
        "log_w": np.asarray(log_w, dtype=np.float64),
        "u": np.asarray(u, dtype=np.float64),
    }
    n = arrays["x"].shape[0]
    if arrays["x"].ndim != 2 or arrays["log_w"].shape != (n,) or arrays["u"].shape != (n,):
        raise UserInputError(
            f"samples need x (N, d), log_w (N,), u (N,); got {arrays['x'].shape}, "
            f"{arrays['log_w'].shape}, {arrays['u'].shape}"
        )
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    atomic_write(path, lambda h: np.savez(h, **arrays))


def read_frames(path: str | os.PathLike, topology=None, what: str = "frames") -> np.ndarray:
    """Frames (F, 3N) float64 from an npz with ``x`` (a sample or MD file of this package) or
    from any mdtraj-readable trajectory (read with the mdtraj ``topology``; a PDB or HDF5 file
    brings its own). ``what`` names the file's role in error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.suffix.lower() == ".npz":
        with np.load(path) as data:
            if "x" not in data:
                raise UserInputError(f"{what} {path} has no array 'x' of frames")
            return np.asarray(data["x"], dtype=np.float64)
    if topology is None:
        raise UserInputError(
            f"{what} {path} is a trajectory, which needs a molecular system; give an npz with x"
        )
    import mdtraj

    traj = mdtraj.load(str(path), top=topology)
    return traj.xyz.astype(np.float64).reshape(traj.n_frames, -1)


def write_trajectory(path: str | os.PathLike, x, topology, time=None) -> None:
    """Write frames x (F, 3N) in nm as a trajectory in the format of ``path``'s suffix (any
    that mdtraj writes: .dcd, .xtc, .h5, .pdb, ...), with the mdtraj ``topology`` and optional
    ``time`` (F,) in ps; written to a temporary name, then renamed into place."""
    import mdtraj

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    xyz = np.asarray(x).reshape(len(x), topology.n_atoms, 3).astype(np.float32)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    mdtraj.Trajectory(xyz, topology, time=time).save(str(tmp))
    tmp.replace(path)
