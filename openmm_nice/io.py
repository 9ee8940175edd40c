"""Files: sample files, frames and trajectories, checkpoints; every write is atomic."""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from openmm_nice.errors import UserInputError

__all__ = [
    "load_samples",
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


def load_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, log_w, u) of a sample file (:func:`save_samples`), checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sample file {path} does not exist; make it with `openmm-nice sample`"
        )
    try:
        with np.load(path) as data:
            missing = [k for k in ("x", "log_w", "u") if k not in data]
            if missing:
                raise UserInputError(
                    f"{path} lacks {', '.join(missing)}; it is not a sample file of `openmm-nice "
                    "sample` (an MD trajectory is reweighted with --traj FILE --config CONFIG)"
                )
            x, log_w, u = data["x"], data["log_w"], data["u"]
    except (ValueError, OSError, zipfile.BadZipFile, AttributeError) as error:
        if isinstance(error, UserInputError):
            raise
        raise UserInputError(
            f"{path} is not an npz sample file ({type(error).__name__}); give a file written by "
            "`openmm-nice sample` (an MD trajectory is reweighted with --traj FILE --config CONFIG)"
        ) from error
    if x.ndim != 2 or log_w.shape != (len(x),) or u.shape != (len(x),):
        raise UserInputError(
            f"{path}: x {x.shape}, log_w {log_w.shape}, u {u.shape} do not have the shapes "
            "(N, d), (N,), (N,) of a sample file"
        )
    return x, log_w, u


def read_frames(
    path: str | os.PathLike, topology=None, what: str = "frames", stride: int = 1
) -> np.ndarray:
    """Frames (F, 3N) in nm, float64, of an npz with ``x`` (a sample or MD file of this
    package) or of any trajectory mdtraj reads (.dcd, .xtc, .trr, .nc, .h5, .pdb).

    Arguments:
        path: The file.
        topology: The mdtraj Topology of the system the frames are of: trajectories are read
            with it, and the frames of either kind must have its atoms. None for frames of a
            toy target (an npz only).
        what: The file's role, for error messages (e.g. "training data").
        stride: Keep every ``stride``-th frame.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if stride < 1:
        raise UserInputError(f"stride must be at least 1, got {stride}")
    n_atoms = None if topology is None else topology.n_atoms
    if path.suffix.lower() == ".npz":
        with np.load(path) as data:
            if "x" not in data:
                raise UserInputError(f"{what} {path} has no array 'x' of frames")
            x = np.asarray(data["x"][::stride], dtype=np.float64)
        if n_atoms is not None and (x.ndim != 2 or x.shape[1] != 3 * n_atoms):
            raise UserInputError(
                f"frames in {what} {path} have shape {x.shape}, but the system has {n_atoms} "
                f"atoms, so frames of shape (F, {3 * n_atoms}); give the system the frames are of"
            )
    elif topology is None:
        raise UserInputError(
            f"{what} {path} is a trajectory, which needs a molecular system; give an npz with x"
        )
    else:
        import mdtraj

        try:
            traj = mdtraj.load(str(path), top=topology, stride=stride)
        except OSError as error:
            raise UserInputError(f"mdtraj cannot read {what} {path}: {error}") from None
        except ValueError as error:
            raise UserInputError(
                f"{what} {path} does not match the system's {n_atoms} atoms ({error}); give the "
                "system the trajectory is of"
            ) from None
        if traj.n_atoms != n_atoms:
            raise UserInputError(
                f"{what} {path} has {traj.n_atoms} atoms but the system has {n_atoms}; give the "
                "system the trajectory is of"
            )
        x = traj.xyz.astype(np.float64).reshape(traj.n_frames, -1)
    if len(x) == 0:
        raise UserInputError(f"{what} {path} holds no frames")
    return x


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
