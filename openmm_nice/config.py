"""Validated YAML configs: every key is known and typed, and the resolved config is saved."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from openmm_nice.errors import ConfigError

__all__ = [
    "Config",
    "ModelConfig",
    "TrainingConfig",
    "MDConfig",
    "SamplingConfig",
    "ConfigError",
    "load_config",
    "config_from_dict",
]


@dataclass
class ModelConfig:
    latent_dim: int | None = None  # D; None means D = d (no redundant latents)
    layers: int = 8  # coupling layers in F
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    conditional_hidden: list[int] = field(default_factory=lambda: [64, 64])
    scale: float = 1.0  # initial diagonal of S
    torsion_floor: float = 0.001  # uniform share of each fitted torsion density (molecules)
    # width in degrees smoothing the fitted torsion densities, or "auto" (cross-validated)
    torsion_smoothing: float | str = 10.0


@dataclass
class TrainingConfig:
    steps: int = 4000
    batch_size: int = 512
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | constant
    kl_weight: float = 1.0  # weight of the reverse KL J_R
    ml_weight: float = 0.0  # weight of the maximum-likelihood term on `data`
    ml_weight_final: float | None = None  # if set, the ML weight moves linearly to it
    reweighted_fkl_weight: float = 1.0  # forward KL on the model's own reweighted samples
    beta_start: float = 0.1  # annealed inverse temperature, relative to the target
    anneal_start: int = 0  # steps held at beta_start before the anneal
    anneal_steps: int = 2000  # steps of the geometric anneal from beta_start to 1
    data: str | list[str] | None = None  # MD frames for the ML term (npz with `x` or
    # trajectories; a list of files is pooled)
    ml_batch_size: int = 256
    walkers: int = 0  # MCMC walkers whose likelihood is trained (0: none); <= batch_size
    walker_weight: float = 1.0  # weight of the walkers' negative log-likelihood
    walker_steps: int = 5  # MALA steps of the walkers per training step
    # buffer of the model's own samples with exact weights at any beta (forward KL), see
    # openmm_nice.buffer; buffer_weight 0: none
    buffer_size: int = 0
    buffer_weight: float = 0.0
    buffer_batch_size: int = 256
    buffer_interval: int = 100  # steps between additions of buffer_draws model samples
    buffer_draws: int = 4096
    # molecules: steps before which the coordinate map (torsion densities and cuts, shifts and
    # scales) is refitted to refit_samples of the model's own weighted samples, followed by
    # refit_steps maximum-likelihood steps on them
    map_refits: list[int] = field(default_factory=list)
    refit_samples: int = 100_000
    refit_steps: int = 500
    energy_cut: float = 1000.0  # the regularised training energy turns logarithmic here (kT)
    grad_clip: float = 100.0
    report_interval: int = 50
    checkpoint_interval: int = 500
    snapshot_interval: int = 0  # keep the model every this many steps in RUN/snapshots (0: no)


@dataclass
class SamplingConfig:
    # levels of annealed importance sampling in latent space after each model draw (one MALA
    # move each; 0: the model's own one-shot importance weights), see openmm_nice.ais
    ais_steps: int = 0
    ais_batch_size: int = 4096  # chains run together by `sample`


@dataclass
class MDConfig:
    steps: int = 1_000_000
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    report_interval: int = 1000  # steps between saved frames
    equilibration_steps: int = 10_000


@dataclass
class Config:
    system: Any = "double_well_1d"  # a built-in name, or a mapping (pdb + forcefield, xml + pdb)
    temperature: float = 300.0  # K
    platform: str = "Reference"
    platform_properties: dict = field(default_factory=dict)
    n_workers: int = 1
    device: str = "cpu"
    dtype: str = "float32"  # of the model; float64 for the strictest density arithmetic
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    md: MDConfig = field(default_factory=MDConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def set_steps(self, steps: int) -> None:
        """Change the number of training steps; fewer steps shrink the schedule (the anneal's
        start and length, the map refits) in proportion, so that training still ends at the
        target temperature after the same stages."""
        if steps < 0:
            raise ConfigError(f"the number of steps must be >= 0, got {steps}")
        t = self.training
        factor = min(1.0, steps / t.steps) if t.steps else 1.0
        t.steps = int(steps)
        t.anneal_start = int(t.anneal_start * factor)
        t.anneal_steps = int(t.anneal_steps * factor)
        t.map_refits = sorted({int(k * factor) for k in t.map_refits})

    def save(self, path: str | os.PathLike) -> None:
        from openmm_nice.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not of type {annotation}")
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' in ' + where if where else ''} are: {', '.join(names)}"
        )
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _validate_ranges(config: Config) -> None:
    m, t = config.model, config.training
    checks = [
        (
            config.temperature > 0,
            f"temperature must be positive (kelvin), got {config.temperature}",
        ),
        (
            config.dtype in ("float32", "float64"),
            f"dtype must be float32 or float64, got {config.dtype!r}",
        ),
        (config.n_workers >= 1, f"n_workers must be >= 1, got {config.n_workers}"),
        (
            m.latent_dim is None or m.latent_dim >= 1,
            f"model.latent_dim must be >= 1, got {m.latent_dim}",
        ),
        (m.layers >= 1, f"model.layers must be >= 1, got {m.layers}"),
        (m.scale > 0, f"model.scale must be positive, got {m.scale}"),
        (
            0 < m.torsion_floor <= 1,
            f"model.torsion_floor must be in (0, 1], got {m.torsion_floor}",
        ),
        (
            m.torsion_smoothing == "auto"
            or (not isinstance(m.torsion_smoothing, str) and m.torsion_smoothing > 0),
            "model.torsion_smoothing must be a positive width in degrees or 'auto', "
            f"got {m.torsion_smoothing!r}",
        ),
        (t.steps >= 0, f"training.steps must be >= 0, got {t.steps}"),
        (t.batch_size >= 2, f"training.batch_size must be >= 2, got {t.batch_size}"),
        (t.learning_rate > 0, f"training.learning_rate must be positive, got {t.learning_rate}"),
        (
            t.lr_schedule in ("cosine", "constant"),
            f"training.lr_schedule must be cosine or constant, got {t.lr_schedule!r}",
        ),
        (0 < t.beta_start <= 1, f"training.beta_start must be in (0, 1], got {t.beta_start}"),
        (t.anneal_steps >= 0, f"training.anneal_steps must be >= 0, got {t.anneal_steps}"),
        (t.anneal_start >= 0, f"training.anneal_start must be >= 0, got {t.anneal_start}"),
        (
            min(t.buffer_size, t.buffer_weight) >= 0
            and (t.buffer_weight == 0 or t.buffer_size > 0),
            "training.buffer_size and buffer_weight must be >= 0, and buffer_weight > 0 needs "
            f"buffer_size > 0 (got {t.buffer_size} and {t.buffer_weight})",
        ),
        (
            min(t.buffer_batch_size, t.buffer_interval, t.buffer_draws, t.refit_samples) >= 1,
            "training.buffer_batch_size, buffer_interval, buffer_draws and refit_samples "
            "must be >= 1",
        ),
        (t.refit_steps >= 0, f"training.refit_steps must be >= 0, got {t.refit_steps}"),
        (
            all(k >= 0 for k in t.map_refits),
            f"training.map_refits must list steps >= 0, got {t.map_refits}",
        ),
        (
            min(t.kl_weight, t.ml_weight, t.reweighted_fkl_weight, t.ml_weight_final or 0) >= 0,
            "training loss weights must be >= 0",
        ),
        (
            0 <= t.walkers <= t.batch_size,
            f"training.walkers must be between 0 and training.batch_size ({t.batch_size}), "
            f"got {t.walkers}",
        ),
        (t.walker_steps >= 0, f"training.walker_steps must be >= 0, got {t.walker_steps}"),
        (t.walker_weight >= 0, f"training.walker_weight must be >= 0, got {t.walker_weight}"),
        (
            max(t.ml_weight, t.ml_weight_final or 0) == 0 or t.data is not None,
            "training.ml_weight > 0 (or ml_weight_final > 0) needs training.data (MD frames)",
        ),
        (
            config.sampling.ais_steps >= 0,
            f"sampling.ais_steps must be >= 0, got {config.sampling.ais_steps}",
        ),
        (
            config.sampling.ais_batch_size >= 1,
            f"sampling.ais_batch_size must be >= 1, got {config.sampling.ais_batch_size}",
        ),
        (
            t.report_interval >= 1 and t.checkpoint_interval >= 1 and t.snapshot_interval >= 0,
            "report and checkpoint intervals must be >= 1 (snapshot_interval >= 0)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def config_from_dict(data: dict | None) -> Config:
    """Build and validate a :class:`Config`; unknown keys and wrong types raise ConfigError."""
    config = _build(Config, data, "")
    _validate_ranges(config)
    return config


def load_config(path: str | os.PathLike) -> Config:
    """Read a YAML config file; relative data paths are resolved against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as handle:
        data = yaml.safe_load(handle)
    config = config_from_dict(data)
    base = path.resolve().parent
    data = config.training.data
    if isinstance(data, list):
        config.training.data = [str((base / item).resolve()) for item in data]
    elif data is not None:
        config.training.data = str((base / data).resolve())
    if isinstance(config.system, dict):
        for key in ("pdb", "xml"):
            if key in config.system and not os.path.isabs(config.system[key]):
                config.system[key] = str((base / config.system[key]).resolve())
    return config
