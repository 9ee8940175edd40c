"""Training reporters in OpenMM's style: progress bar, CSV metrics, checkpoints."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from tqdm.auto import tqdm

from openmm_nice.io import atomic_write_text, save_checkpoint

__all__ = [
    "ProgressReporter",
    "MetricsReporter",
    "CheckpointReporter",
    "SnapshotReporter",
    "METRIC_COLUMNS",
]

# Column names carry their units: nats for KL terms, kT for energies, seconds for time.
METRIC_COLUMNS = (
    "step",
    "loss",
    "reverse_kl_nats",
    "nll_nats",
    "walker_nll_nats",
    "buffer_nll_nats",
    "buffer_ess",
    "walker_exchange",
    "walker_acceptance",
    "energy_kT",
    "log_det_S",
    "conditional_nats",
    "ess",
    "max_weight_share",
    "pareto_k",
    "beta",
    "learning_rate",
    "elapsed_s",
    "energy_evaluations",
    "non_finite_energies",
)
_STATE_KEYS = {
    "reverse_kl_nats": "reverse_kl",
    "nll_nats": "nll",
    "walker_nll_nats": "walker_nll",
    "buffer_nll_nats": "buffer_nll",
    "conditional_nats": "conditional",
}


def _steps_to_next_multiple(step: int, interval: int) -> int:
    """Like OpenMM's reporters: report at multiples of the interval, also after a resume."""
    return interval - step % interval


class ProgressReporter:
    """A tqdm progress bar over the training steps, showing the loss, and the batch's ESS/N,
    largest weight's share and Pareto k-hat (:mod:`~openmm_nice.analysis.weight_diagnostics`).

    Arguments:
        total: Total number of steps (the bar's length).
        interval: Steps between updates.
        initial: The step the bar starts from (for resumed runs).
        disable: Hide the bar (quiet scripts).
    """

    def __init__(self, total: int, interval: int = 10, initial: int = 0, disable: bool = False):
        self.interval = int(interval)
        self._options = {"total": total, "initial": initial, "disable": disable}
        # drawn at the first report: a run refused before its first step shows none
        self._bar = None
        self._last = initial

    def describeNextReport(self, trainer) -> int:  # noqa: N802 (OpenMM's reporter protocol)
        return _steps_to_next_multiple(trainer.step, self.interval)

    def report(self, trainer, state: dict) -> None:
        if self._bar is None:
            self._bar = tqdm(unit="step", dynamic_ncols=True, **self._options)
        self._bar.update(state["step"] - self._last)
        self._last = state["step"]
        self._bar.set_postfix(
            loss=f"{state['loss']:.4g}",
            ess=f"{state['ess']:.3f}",
            max_w=f"{state['max_weight_share']:.2g}",
            k=f"{state['pareto_k']:.2f}",
            beta=f"{state['beta']:.3g}",
        )
        if state["step"] >= self._bar.total:
            self._bar.close()


class MetricsReporter:
    """Appends a row of :data:`METRIC_COLUMNS` to a CSV file every ``interval`` steps.

    On resume, rows past the checkpoint's step are dropped (rewritten atomically) so the
    metrics stay one continuous record.
    """

    def __init__(self, path: str | os.PathLike, interval: int = 50, resume_step: int | None = None):
        self.path = Path(path)
        self.interval = int(interval)
        if resume_step is None or not self.path.exists():
            atomic_write_text(self.path, ",".join(METRIC_COLUMNS) + "\n")
        else:
            with open(self.path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            # rows past the checkpoint are dropped; a file of an older version, with other
            # columns, is rewritten in today's (a column it lacks stays empty)
            kept = [r for r in rows if r.get("step") and int(r["step"]) <= resume_step]
            lines = [",".join(METRIC_COLUMNS)]
            lines += [",".join(r.get(c) or "" for c in METRIC_COLUMNS) for r in kept]
            atomic_write_text(self.path, "".join(line + "\n" for line in lines))

    def describeNextReport(self, trainer) -> int:  # noqa: N802
        return _steps_to_next_multiple(trainer.step, self.interval)

    def report(self, trainer, state: dict) -> None:
        values = [state.get(_STATE_KEYS.get(c, c), "") for c in METRIC_COLUMNS]
        line = ",".join(f"{v:.8g}" if isinstance(v, float) else str(v) for v in values)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class CheckpointReporter:
    """Writes the trainer's full state atomically every ``interval`` steps (and at the end).

    Arguments:
        path: The checkpoint file.
        interval: Steps between checkpoints.
        extra: Plain data stored beside the state (e.g. the resolved config).
    """

    def __init__(self, path: str | os.PathLike, interval: int = 500, extra: dict | None = None):
        self.path = Path(path)
        self.interval = int(interval)
        self.extra = dict(extra or {})

    def describeNextReport(self, trainer) -> int:  # noqa: N802
        return _steps_to_next_multiple(trainer.step, self.interval)

    def report(self, trainer, state: dict) -> None:
        save_checkpoint(self.path, {**self.extra, **trainer.state_dict()})


class SnapshotReporter:
    """Keeps the model as it was every ``interval`` steps, one small file per snapshot, so that
    a run can be evaluated along its course (ESS against energy evaluations and wall time).

    Each ``folder/step_0001000.pt`` holds the model's state dict, the step, the training wall
    time and the energy evaluations spent so far, and ``extra`` (e.g. the resolved config); it
    loads with ``torch.load(..., weights_only=True)``.

    Arguments:
        folder: Where the snapshots go (created if needed).
        interval: Steps between snapshots.
        extra: Plain data stored in every snapshot.
    """

    def __init__(self, folder: str | os.PathLike, interval: int, extra: dict | None = None):
        if interval < 1:
            raise ValueError(f"the snapshot interval must be >= 1 step, got {interval}")
        self.folder = Path(folder)
        self.interval = int(interval)
        self.extra = dict(extra or {})

    def describeNextReport(self, trainer) -> int:  # noqa: N802
        return _steps_to_next_multiple(trainer.step, self.interval)

    def report(self, trainer, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        snapshot = {
            **self.extra,
            "model": trainer.generator.state_dict(),
            "step": trainer.step,
            "elapsed_s": trainer.elapsed,
            "energy_evaluations": trainer.generator.energy.evaluation_count,
        }
        save_checkpoint(self.folder / f"step_{trainer.step:07d}.pt", snapshot)
