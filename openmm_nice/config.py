"""Validated YAML configs: strict pydantic models, unknown keys refused, overrides, saved resolved."""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from openmm_nice.errors import ConfigError

# The torsion densities of a molecule's coordinate map: the uniform floor's share, and the width
# in degrees (bins of 1 degree) of the Gaussian that smooths the histograms. Narrower than the
# wells, so that the map's standardisation does not squeeze a torsion and the floor's share of an
# arc the samples missed (a cis amide bond) stays within the flow's reach (benchmarks/RESULTS.md).
# ModelConfig and MolecularTransform.from_data share them.
TORSION_FLOOR = 0.005
TORSION_SMOOTHING = 2.0

# The ranges a key may take, as pydantic constraints (checked on every assignment too)
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]

__all__ = [
    "Config",
    "ModelConfig",
    "TrainingConfig",
    "MDConfig",
    "SamplingConfig",
    "ToySystem",
    "PdbSystem",
    "XmlSystem",
    "ConfigError",
    "apply_overrides",
    "load_config",
    "config_from_dict",
]


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _resolve(path: str, info: ValidationInfo) -> str:
    """A relative path against the config file's folder (the validation context's ``base``)."""
    base = (info.context or {}).get("base")
    if base is None or os.path.isabs(path):
        return path
    return str((Path(base) / path).resolve())


class _Section(BaseModel):
    """A part of a config: every key known and strictly typed (no conversion of strings)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    def to_dict(self) -> dict:
        return self.model_dump()

    def __setattr__(self, name: str, value: Any) -> None:
        """Assignments are validated as the YAML is: a bad value raises ConfigError and leaves
        the config as it was (pydantic has already stored a value that fails a check across
        keys)."""
        before = dict(self.__dict__)
        try:
            super().__setattr__(name, value)
        except ValidationError as error:
            self.__dict__.update(before)
            section = next((k for k, v in _SECTIONS.items() if v is type(self)), "")
            raise ConfigError(_message(error, section, type(self))) from None


class ModelConfig(_Section):
    """``model:``, the flow and the conditional Gaussian."""

    latent_dim: PosInt | None = None  # D; None means D = d (no redundant latents)
    layers: PosInt = 8  # coupling layers in F
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    conditional_hidden: list[int] = Field(default_factory=lambda: [64, 64])
    scale: PosFloat = 1.0  # initial diagonal of S
    # uniform share of each fitted torsion density
    torsion_floor: Annotated[float, Field(gt=0, le=1)] = TORSION_FLOOR
    # width in degrees smoothing the fitted torsion densities, or "auto" (cross-validated)
    torsion_smoothing: PosFloat | Literal["auto"] = TORSION_SMOOTHING
    # condition torsion densities on parent torsions (a Chow-Liu forest fitted with the map),
    # so that e.g. psi's density follows phi's basin; see MolecularTransform
    torsion_tree: bool = True
    # how the torsion tree's child densities are smoothed in each parent bin: "fixed", by the
    # child's own width; "adaptive" (the default), wider in a bin with fewer than 3,000
    # effective frames, by (3000 / frames)^(1/5), so that a rarely visited parent angle's few
    # heavy-weighted frames spread over their basin rather than make a comb of narrow spikes
    torsion_tree_smoothing: Literal["fixed", "adaptive"] = "adaptive"
    # let the bonds' and angles' normalisation (shift and scale) follow the torsions, so that
    # the geometry around an atom can change with the rotamers around it: true: fitted by
    # regression with each map refit; "learned" (the default): trained with the flow by the loss
    # (from zero, kept across refits); false: not at all (see MolecularTransform)
    stiff_conditioning: bool | Literal["learned"] = "learned"
    # with stiff_conditioning "learned": the width of a hidden tanh layer between the torsions'
    # features and the learned shift and log-scale, so that they may follow combinations of
    # torsions (phi and psi together); 0 (the default): linear in each torsion's harmonics
    stiff_hidden: NonNegInt = 0
    # the data-free map's torsions before the first refit: "scan" (the default): each one's
    # Boltzmann density at training.beta_start along an energy scan from the reference
    # structure, so that rings and planar groups start closed (see
    # MolecularTransform.from_data); or "uniform" (phenylalanine's ring then never closes)
    initial_torsions: Literal["uniform", "scan"] = "scan"

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        _check(
            [
                (
                    self.stiff_hidden == 0 or self.stiff_conditioning == "learned",
                    f"model.stiff_hidden = {self.stiff_hidden} is a layer of the learned "
                    "conditioning: set model.stiff_conditioning to learned, or stiff_hidden "
                    f"to 0 (got stiff_conditioning {self.stiff_conditioning!r})",
                )
            ]
        )
        return self


# the loss weights that may follow the step ([[step, weight], ...]); forward_alpha may too
LOSS_WEIGHTS = ("kl_weight", "reweighted_fkl_weight", "walker_weight", "buffer_weight")


def _weight_ok(weight: float | list[list[float]]) -> bool:
    """A loss weight is a number >= 0, or (step, weight >= 0) points with steps in order."""
    if isinstance(weight, (int, float)):
        return weight >= 0
    if not weight or any(len(point) != 2 for point in weight):
        return False
    steps = [step for step, _ in weight]
    return all(v >= 0 for _, v in weight) and steps == sorted(steps)


def _weight_message(name: str, weight: float | list[list[float]]) -> str:
    return (
        f"training.{name} must be a weight >= 0 or a list of [step, weight >= 0] points with "
        f"steps in increasing order (piecewise linear in between), got {weight!r}"
    )


def _weight_minimum(weight: float | list[list[float]]) -> float:
    if isinstance(weight, (int, float)):
        return weight
    return min((point[-1] for point in weight if point), default=0)


def _weight_maximum(weight: float | list[list[float]]) -> float:
    if isinstance(weight, (int, float)):
        return weight
    return max((point[-1] for point in weight if point), default=0)


class TrainingConfig(_Section):
    """``training:``, the losses, their schedule and the optimiser."""

    steps: NonNegInt = 4000
    batch_size: Annotated[int, Field(ge=2)] = 512
    learning_rate: PosFloat = 1e-3
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    # Loss weights (kl_weight, reweighted_fkl_weight, walker_weight, buffer_weight): a number,
    # or [[step, weight], ...] points, piecewise linear in between and constant beyond
    kl_weight: float | list[list[float]] = 1.0  # weight of the reverse KL J_R
    ml_weight: NonNegFloat = 0.0  # weight of the maximum-likelihood term on `data`
    ml_weight_final: NonNegFloat | None = None  # if set, the ML weight moves linearly to it
    # forward KL on the model's own samples, self-normalised weights of the step's batch
    reweighted_fkl_weight: float | list[list[float]] = 1.0
    # the mass-covering terms (reweighted forward KL, buffer, walkers) follow the gradient of
    # the alpha-divergence D_alpha(p || q): 1 the forward KL, 2 the chi-square divergence whose
    # minimum maximises the ESS (FAB's); a number or [[step, alpha], ...] points, each >= 1
    forward_alpha: float | list[list[float]] = 1.0
    beta_start: Annotated[float, Field(gt=0, le=1)] = (
        0.1  # annealed inverse temperature, relative to the target
    )
    anneal_start: NonNegInt = 0  # steps held at beta_start before the anneal
    anneal_steps: NonNegInt = 2000  # steps of the geometric anneal from beta_start to 1
    # MD frames for the ML term (npz with `x` or trajectories; a list of files is pooled);
    # relative paths are resolved against the config file's folder
    data: str | list[str] | None = None
    ml_batch_size: PosInt = 256
    walkers: NonNegInt = 0  # MCMC walkers whose likelihood is trained (0: none); <= batch_size
    # weight of the walkers' negative log-likelihood (0 at a step: the walkers rest)
    walker_weight: float | list[list[float]] = 1.0
    walker_steps: NonNegInt = 5  # MALA steps of the walkers per training step
    # where the walkers' MALA steps move: "cartesian" (the stiffest bond sets the step) or
    # "internal", the coordinate map's standardised bonds, angles and torsions (molecules)
    walker_coordinates: Literal["cartesian", "internal"] = "cartesian"
    # population annealing: walkers reweighted by exp(-dbeta U) as beta changes and resampled
    walker_resampling: bool = False
    # buffer of the model's own samples with exact weights at any beta (forward KL), see
    # openmm_nice.training.buffer; buffer_weight 0: none
    buffer_size: NonNegInt = 0
    buffer_weight: float | list[list[float]] = 0.0
    buffer_batch_size: PosInt = 256
    buffer_interval: PosInt = 100  # steps between additions of buffer_draws model samples
    buffer_draws: PosInt = 4096
    buffer_ais_steps: NonNegInt = (
        0  # latent-space AIS levels of each buffer and refit draw (0: none)
    )
    # molecules: steps before which the coordinate map (torsion densities and cuts, shifts and
    # scales) is refitted to refit_samples of the model's own weighted samples, followed by
    # refit_steps maximum-likelihood steps on them
    map_refits: list[NonNegInt] = Field(default_factory=list)
    refit_samples: PosInt = 100_000
    refit_steps: NonNegInt = 500
    energy_cut: float = 1000.0  # the regularised training energy turns logarithmic here (kT)
    grad_clip: float = 100.0
    report_interval: PosInt = 50
    checkpoint_interval: PosInt = 500
    snapshot_interval: NonNegInt = (
        0  # keep the model every this many steps in RUN/snapshots (0: no)
    )

    @field_validator("data")
    @classmethod
    def _resolve_data(cls, data: str | list[str] | None, info: ValidationInfo):
        if isinstance(data, list):
            return [_resolve(item, info) for item in data]
        return None if data is None else _resolve(data, info)

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        """What no one key's range can say: the keys that depend on one another."""
        t = self
        _check(
            [
                (
                    _weight_maximum(t.buffer_weight) == 0 or t.buffer_size > 0,
                    "training.buffer_weight > 0 needs training.buffer_size > 0 "
                    f"(got {t.buffer_size} and {t.buffer_weight})",
                ),
                *(
                    (_weight_ok(getattr(t, name)), _weight_message(name, getattr(t, name)))
                    for name in LOSS_WEIGHTS
                ),
                (
                    t.walkers <= t.batch_size,
                    "training.walkers must be between 0 and training.batch_size "
                    f"({t.batch_size}), got {t.walkers}",
                ),
                (
                    _weight_ok(t.forward_alpha) and _weight_minimum(t.forward_alpha) >= 1,
                    "training.forward_alpha must be a number >= 1 or [[step, alpha >= 1], ...] "
                    f"points with steps that do not decrease, got {t.forward_alpha}",
                ),
                (
                    max(t.ml_weight, t.ml_weight_final or 0) == 0 or t.data is not None,
                    "training.ml_weight > 0 (or ml_weight_final > 0) needs training.data "
                    "(MD frames)",
                ),
            ]
        )
        return self


class SamplingConfig(_Section):
    """``sampling:``, what `openmm-nice sample` draws."""

    # levels of annealed importance sampling in latent space after each model draw (one MALA
    # move each; 0: the model's own one-shot importance weights), see openmm_nice.sampling.ais
    ais_steps: NonNegInt = 0
    ais_batch_size: PosInt = 4096  # chains run together by `sample`
    # the AIS moves: plain MALA in latent space, or MALA whitened by the Fisher matrix of the
    # target in latent space that a pilot run measures (exact either way; benchmarks/RESULTS.md)
    ais_preconditioner: Literal["identity", "fisher"] = "identity"
    # where the levels sit: evenly in beta, or placed by a pilot run's conditional ESS where
    # the model's weights change fastest (exact either way; openmm_nice.sampling.ais)
    ais_schedule: Literal["linear", "adaptive"] = "linear"


class MDConfig(_Section):
    """``md:``, plain Langevin MD of the system (`openmm-nice md`, `mcmc`)."""

    steps: NonNegInt = 1_000_000
    timestep_fs: PosFloat = 1.0
    friction_per_ps: PosFloat = 1.0
    report_interval: PosInt = 1000  # steps between saved frames
    equilibration_steps: NonNegInt = 10_000


class ToySystem(_Section):
    """``system: {name: TOY, OPTION: VALUE, ...}``: a toy energy with the options it takes."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str


class PdbSystem(_Section):
    """``system: {pdb: FILE, forcefield: [FILES]}``: a PDB parameterised by OpenMM force fields."""

    pdb: str
    forcefield: str | list[str] = Field(default_factory=lambda: ["amber14-all.xml"])
    name: str | None = None


class XmlSystem(_Section):
    """``system: {xml: FILE, pdb: FILE}``: a serialized OpenMM System with its PDB."""

    xml: str
    pdb: str
    name: str | None = None


_SYSTEM_FORMS = (
    "a built-in name ({names}), {{name: TOY, OPTION: VALUE, ...}}, "
    "{{pdb: FILE, forcefield: [FILES]}} or {{xml: FILE, pdb: FILE}}"
)


def _built_in_systems() -> tuple[dict, dict]:
    """The toy energies and the built-in molecules a config may name."""
    from openmm_nice.energy.energies import TOY_SYSTEMS
    from openmm_nice.molecule.systems import BUILT_IN_SYSTEMS

    return TOY_SYSTEMS, BUILT_IN_SYSTEMS


def _system(spec: str | dict, info: ValidationInfo) -> str | dict:
    """A system spec checked and normalised, its paths resolved against the config's folder."""
    toys, molecules = _built_in_systems()
    forms = _SYSTEM_FORMS.format(names=", ".join([*toys, *molecules]))
    if isinstance(spec, str):
        if spec not in toys and spec not in molecules:
            raise ConfigError(f"system: unknown system {spec!r}; give {forms}")
        return spec
    model = XmlSystem if "xml" in spec else PdbSystem if "pdb" in spec else ToySystem
    if model is ToySystem and spec.get("name") not in toys:
        raise ConfigError(f"system: {spec!r} is not a system; give {forms}")
    try:
        checked = model.model_validate(spec, context=info.context)
    except ValidationError as error:
        raise ConfigError(_message(error, "system", model)) from None
    data = checked.model_dump(exclude_none=True)
    if model is ToySystem:
        options = set(data) - {"name"}
        accepted = set(inspect.signature(toys[checked.name]).parameters)
        if options - accepted:
            raise ConfigError(
                f"system: {checked.name} has no option(s) {', '.join(sorted(options - accepted))}; "
                f"its options are: {', '.join(sorted(accepted)) or 'none'}"
            )
        return data
    for key in ("pdb", "xml"):
        if key in data:
            data[key] = _resolve(data[key], info)
    return data


class Config(_Section):
    """A whole config: the system and its temperature, where to compute, and the sections.

    Build it with :func:`load_config` (a YAML file) or :func:`config_from_dict`; every key is
    known and strictly typed, and a bad one raises :class:`~openmm_nice.errors.ConfigError`
    naming it.
    """

    # a built-in name, or a mapping: {name: toy, options...}, {pdb, forcefield}, {xml, pdb}
    system: str | dict[str, Any] = "double_well_1d"
    temperature: PosFloat = 300.0  # K
    # how U is computed (contract): "openmm", OpenMM Contexts (platform, n_workers); "torch",
    # the System's forces as torch operations in the training process, on `device`; "auto",
    # torch where it evaluates every force of the System, else openmm
    engine: Literal["openmm", "torch", "auto"] = "openmm"
    platform: str = "Reference"
    platform_properties: dict[str, Any] = Field(default_factory=dict)
    n_workers: PosInt = 1
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = (
        "float32"  # of the model; float64 for the strictest density arithmetic
    )
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    md: MDConfig = Field(default_factory=MDConfig)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """An empty YAML section (``training:`` with nothing under it) is its defaults."""
        if isinstance(data, dict):
            return {k: {} if v is None and k in _SECTIONS else v for k, v in data.items()}
        return data

    @field_validator("system")
    @classmethod
    def _check_system(cls, spec: str | dict, info: ValidationInfo) -> str | dict:
        return _system(spec, info)

    def set_steps(self, steps: int) -> None:
        """Change the number of training steps; fewer steps shrink the schedule in proportion
        (the anneal's start and length, the map refits and the maximum-likelihood steps after
        each, the steps of every loss-weight schedule), so that training still ends at the
        target temperature after the same stages."""
        if steps < 0:
            raise ConfigError(f"the number of steps must be >= 0, got {steps}")
        t = self.training
        factor = min(1.0, steps / t.steps) if t.steps else 1.0
        t.steps = int(steps)
        t.anneal_start = int(t.anneal_start * factor)
        t.anneal_steps = int(t.anneal_steps * factor)
        t.map_refits = sorted({int(k * factor) for k in t.map_refits})
        if t.refit_steps:
            t.refit_steps = max(1, int(t.refit_steps * factor))
        for name in (*LOSS_WEIGHTS, "forward_alpha"):
            value = getattr(t, name)
            if isinstance(value, list):
                setattr(t, name, [[int(step * factor), weight] for step, weight in value])

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config (every key, paths absolute) as YAML, atomically."""
        from openmm_nice.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "sampling": SamplingConfig,
    "md": MDConfig,
}

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "none_required": "null",
    "greater_than": lambda ctx: f"a number > {ctx['gt']:g}",
    "greater_than_equal": lambda ctx: f"a number >= {ctx['ge']:g}",
    "less_than_equal": lambda ctx: f"a number <= {ctx['le']:g}",
    "literal_error": lambda ctx: ctx["expected"],
}


def _where(loc: tuple, model: type[BaseModel] | None) -> str:
    """``("model", "hidden", 1)`` -> ``"model.hidden[1]"``; union branches pydantic appends to
    a location (``"float"``, ``"list[str]"``) are dropped."""
    where = ""
    for item in loc:
        if isinstance(item, int):
            where += f"[{item}]"
        elif model is not None and item in model.model_fields:
            where += f".{item}" if where else item
            model = _SECTIONS.get(item) if model is Config else None
    return where


def _message(error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """A ConfigError's message for pydantic's errors: each names the key and what it expected."""
    model = model or Config

    def join(*parts: str) -> str:
        return ".".join(p for p in parts if p)

    texts, expected = [], {}
    for e in error.errors():
        where = join(prefix, _where(e["loc"], model))
        if e["type"] == "value_error":
            texts.append(str(e["ctx"]["error"]))
        elif e["type"] == "extra_forbidden":
            section = join(prefix, _where(e["loc"][:-1], model))
            owner = _SECTIONS.get(e["loc"][0], model) if len(e["loc"]) > 1 else model
            texts.append(
                f"unknown config key(s) {join(section, str(e['loc'][-1]))}; valid keys"
                f"{' in ' + section if section else ''} are: {', '.join(owner.model_fields)}"
            )
        else:
            kinds, _ = expected.setdefault(where, ([], e["input"]))
            kind = _EXPECTED.get(e["type"], e["msg"])
            kinds.append(kind(e.get("ctx", {})) if callable(kind) else kind)
    for where, (kinds, got) in expected.items():
        texts.append(f"{where}: expected {' or '.join(kinds)}, got {got!r}")
    return "; ".join(texts)


def config_from_dict(data: dict | None, base: str | os.PathLike | None = None) -> Config:
    """Build and validate a :class:`Config`; unknown keys and wrong types raise ConfigError.

    Arguments:
        data: The config's keys (as YAML gives them); None for every default.
        base: The folder relative paths (``training.data``, ``system.pdb``, ``system.xml``)
            are resolved against; None leaves them as they are (relative to the working
            directory).

    Example:
        >>> config_from_dict({"system": "double_well_1d", "model": {"latent_dim": 2}}).model.layers
        8
    """
    try:
        return Config.model_validate(
            data or {}, context={"base": None if base is None else str(base)}
        )
    except ValidationError as error:
        raise ConfigError(_message(error)) from None


def apply_overrides(data: dict | None, overrides: Sequence[str]) -> dict:
    """A config's keys with ``section.key=value`` overrides applied (before validation).

    Each value is read as YAML (``10``, ``1e-3``, ``null``, ``[64, 64]``, ``{pdb: mol.pdb}``).
    A key a config does not have is a ConfigError naming the valid ones; a key of ``system``
    or ``platform_properties`` sets that key of the mapping.

    Example:
        >>> apply_overrides({"training": {"steps": 4000}}, ["training.steps=10", "seed=3"])
        {'training': {'steps': 10}, 'seed': 3}
    """
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    for override in overrides:
        key, sep, text = override.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ConfigError(
                f"--set {override!r}: write section.key=value, e.g. training.steps=10"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {override!r}: the value is not YAML ({error})") from None
        head, rest = path[0], path[1:]
        if head not in Config.model_fields:
            raise ConfigError(
                f"--set {override!r}: unknown config key {head!r}; valid keys are: "
                f"{', '.join(Config.model_fields)}"
            )
        if not rest:
            data[head] = value
            continue
        if len(rest) > 1:
            raise ConfigError(f"--set {override!r}: {key} is too deep; keys are section.key")
        if head in _SECTIONS:
            if rest[0] not in _SECTIONS[head].model_fields:
                raise ConfigError(
                    f"--set {override!r}: unknown config key {key}; valid keys in {head} are: "
                    f"{', '.join(_SECTIONS[head].model_fields)}"
                )
        elif head in ("system", "platform_properties"):
            if not isinstance(data.get(head, {}), dict):
                raise ConfigError(
                    f"--set {override!r}: {head} is {data[head]!r}, not a mapping; set the whole "
                    f"of it, e.g. --set '{head}={{pdb: mol.pdb, forcefield: [amber14-all.xml]}}'"
                )
        else:
            raise ConfigError(f"--set {override!r}: {head} is a value, not a section")
        section = data.get(head)
        data[head] = {**(section or {}), rest[0]: value}
    return data


# Keys that came later or whose default changed, with the value a run written before then was
# trained with. A run's saved config (config.yaml, the checkpoint's) is a full dump, so a key it
# lacks is one its version did not have.
EARLIER_DEFAULTS = {
    ("model", "stiff_conditioning"): False,
    ("model", "initial_torsions"): "uniform",
    ("model", "torsion_tree_smoothing"): "fixed",
}


def saved_run_config(data: dict) -> dict:
    """A run's saved config with the values its version used for keys it lacks
    (:data:`EARLIER_DEFAULTS`), so that an older run loads as it was trained.

    Example:
        >>> saved_run_config({"model": {"layers": 4}})["model"]["stiff_conditioning"]
        False
    """
    data = copy.deepcopy(data)
    for (section, key), value in EARLIER_DEFAULTS.items():
        data.setdefault(section, {}).setdefault(key, value)
    return data


def load_config(
    path: str | os.PathLike, overrides: Sequence[str] = (), saved_run: bool = False
) -> Config:
    """Read a YAML config file, apply ``overrides`` (see :func:`apply_overrides`), validate.

    Relative paths (``training.data``, ``system.pdb``, ``system.xml``), in the file or in an
    override, are resolved against the file's folder. ``saved_run``: the file is a run's
    ``config.yaml`` (see :func:`saved_run_config`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys, got {type(data).__name__}")
    if saved_run:
        data = saved_run_config(data or {})
    return config_from_dict(apply_overrides(data, overrides), base=path.resolve().parent)
