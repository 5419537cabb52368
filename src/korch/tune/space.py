"""Search spaces (`tune_spaces/*.yaml`): typed ranges over any field of a stage, plus the metric to optimise.

    metric: macro_f1
    mode: max
    params:
      classify.gamma: {type: uniform, low: 0.0, high: 5.0}
      train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
      classify.pooling: {type: choice, values: [cls, mean]}
      classify.loss: {type: fixed, value: focal}
    asha: {grace_period: 1, reduction_factor: 2}

Param keys are stage-relative field paths, the same as `--set stages.<name>.<path>=...`. A space is checked
against the job it tunes: every end of every range (each choice, each fixed value) is applied to the job and
the job validated, so a typo'd path or an out-of-range bound fails before Ray starts, with the job's own
one-line messages. Everything here is pure: the driver samples with Optuna, these functions only translate.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, model_validator

from korch.config import SpecError, apply_overrides, format_validation_error, load_raw, read_yaml_mapping
from korch.spec import Section


class Uniform(Section):
    type: Literal["uniform"]
    low: float
    """Lower bound (inclusive)."""
    high: float
    """Upper bound (inclusive)."""

    @model_validator(mode="after")
    def _ordered(self) -> "Uniform":
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        return self


class LogUniform(Uniform):
    type: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self) -> "LogUniform":
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low}); use uniform for ranges that include 0")
        return self


class IntRange(Section):
    type: Literal["int"]
    low: int
    """Lower bound (inclusive)."""
    high: int
    """Upper bound (inclusive)."""
    step: int = Field(default=1, ge=1)
    """Spacing of the values tried."""

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        return self


class Choice(Section):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=2)
    """The values tried (strings, numbers, booleans or null)."""


class Fixed(Section):
    type: Literal["fixed"]
    value: Any
    """Applied to every trial, never searched (e.g. `loss: focal` so that gamma matters, or fewer epochs)."""


Param = Annotated[Union[Uniform, LogUniform, IntRange, Choice, Fixed], Field(discriminator="type")]


class AshaConfig(Section):
    grace_period: int = Field(default=1, ge=1)
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """At each rung only the best 1/reduction_factor of trials go on."""


class SpaceConfig(Section):
    metric: str
    """The validation metric each trial reports per epoch (e.g. `macro_f1`, `accuracy`, `loss`)."""
    mode: Literal["max", "min"]
    """Whether a higher (`max`) or lower (`min`) metric is better."""
    params: dict[str, Param] = Field(min_length=1)
    """Stage-relative field path -> its range (`uniform`, `loguniform`, `int`, `choice`) or `fixed` value."""
    asha: AshaConfig = AshaConfig()
    """ASHA early stopping over epochs; its max is the stage's `train.epochs`."""
    startup_trials: int = Field(default=4, ge=1)
    """Trials TPE samples at random before it models the results (Optuna's default of 10 is most of a short campaign)."""

    @model_validator(mode="after")
    def _something_to_search(self) -> "SpaceConfig":
        if all(isinstance(p, Fixed) for p in self.params.values()):
            raise ValueError("params are all `fixed`: give at least one range (uniform, loguniform, int or choice)")
        return self

    @property
    def searched(self) -> dict[str, Param]:
        return {k: v for k, v in self.params.items() if not isinstance(v, Fixed)}

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: v.value for k, v in self.params.items() if isinstance(v, Fixed)}


def load_space(path: str | os.PathLike) -> SpaceConfig:
    """Read and validate a space YAML; problems raise `SpecError`, one line each naming the field."""
    path = str(path)
    raw = read_yaml_mapping(path, "give a search space, e.g. tune_spaces/focal_smoothing_lr.yaml",
                            "`metric`, `mode` and `params`")
    try:
        return SpaceConfig.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(path, _space_errors(exc, raw)) from None


def _space_errors(exc: ValidationError, raw: dict) -> list[str]:
    lines = []
    for line in format_validation_error(exc, raw, SpaceConfig):
        # A discriminated union adds the tag to the location (params.x.uniform.low): drop it.
        for tag in ("uniform", "loguniform", "int", "choice", "fixed"):
            line = line.replace(f".{tag}.", ".").replace(f".{tag}:", ":")
        if "Unable to extract tag" in line or "does not match any of the expected tags" in line:
            line = line.split(":")[0] + ": `type` must be one of uniform, loguniform, int, choice, fixed"
        lines.append(line)
    return lines


def bound_values(param: Param) -> list[Any]:
    """The values that stand for the whole range when checking it against a job: both ends, each choice."""
    if isinstance(param, (Uniform, IntRange)):
        return [param.low, param.high]
    if isinstance(param, Choice):
        return list(param.values)
    return [param.value]


def stage_overrides(stage_name: str, params: dict[str, Any]) -> list[str]:
    """`--set` strings that put `params` (stage-relative paths) into the named stage."""
    import json

    return [f"stages.{stage_name}.{path}={json.dumps(value)}" for path, value in params.items()]


def apply_params(raw_job: dict, stage_name: str, params: dict[str, Any]) -> dict:
    """A copy of the raw job with `params` set in the stage (JSON values are valid YAML, so types survive)."""
    return apply_overrides(copy.deepcopy(raw_job), stage_overrides(stage_name, params), "search space")


def check_space(space: SpaceConfig, job_path: str, stage_name: str, space_path: str,
                overrides: list[str] | None = None) -> list[str]:
    """Problems of the space against the job, one line each (empty: fine). Validates the job at every range end."""
    from korch.config import JobConfig

    raw = load_raw(job_path, overrides)
    names = [s.get("name") for s in raw.get("stages", []) if isinstance(s, dict)]
    if stage_name not in names:
        return [f"{job_path}: no stage named '{stage_name}'; stages: {', '.join(map(str, names))}; pick one with --stage"]
    problems: list[str] = []
    prefix = f"stages.{stage_name}."
    for path, param in space.params.items():
        for value in bound_values(param):
            trial = apply_params(raw, stage_name, {**space.fixed, path: value})
            try:
                JobConfig.model_validate(trial)
            except ValidationError as exc:
                for line in format_validation_error(exc, trial):
                    where = line[len(prefix):] if line.startswith(prefix) else line
                    problems.append(f"{space_path}: params.{path} = {value!r}: {where}")
                break
    return list(dict.fromkeys(problems))


def build_search_space(space: SpaceConfig) -> dict[str, Any]:
    """Optuna distributions for the searched params (what OptunaSearch samples from)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists: dict[str, Any] = {}
    for path, param in space.searched.items():
        if isinstance(param, LogUniform):
            dists[path] = FloatDistribution(param.low, param.high, log=True)
        elif isinstance(param, Uniform):
            dists[path] = FloatDistribution(param.low, param.high)
        elif isinstance(param, IntRange):
            dists[path] = IntDistribution(param.low, param.high, step=param.step)
        elif isinstance(param, Choice):
            dists[path] = CategoricalDistribution(param.values)
    return dists


def grid_points(space: SpaceConfig, per_range: int) -> list[dict[str, Any]]:
    """Every combination of `per_range` evenly spaced values per range (log-spaced for loguniform), for grid search."""
    import itertools

    axes: dict[str, list[Any]] = {}
    for path, param in space.searched.items():
        if isinstance(param, Choice):
            axes[path] = list(param.values)
            continue
        if per_range == 1:
            fractions = [0.5]
        else:
            fractions = [i / (per_range - 1) for i in range(per_range)]
        if isinstance(param, LogUniform):
            lo, hi = math.log(param.low), math.log(param.high)
            axes[path] = [math.exp(lo + f * (hi - lo)) for f in fractions]
        elif isinstance(param, IntRange):
            axes[path] = sorted({int(round(param.low + f * (param.high - param.low))) for f in fractions})
        else:
            axes[path] = [param.low + f * (param.high - param.low) for f in fractions]
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]
