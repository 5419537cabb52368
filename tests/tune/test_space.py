"""Search spaces as data: loading, one-line errors, the check against a job, and translation for Optuna."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from korch.config import SpecError
from korch.tune.space import (SpaceConfig, apply_params, build_search_space, check_space, grid_points, load_space,
                              stage_overrides)

REPO = Path(__file__).resolve().parents[2]
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_spaces_load(path):
    space = load_space(path)
    assert space.searched and space.metric


def test_focal_space_fits_the_tiny_job(monkeypatch):
    monkeypatch.chdir(REPO)  # the job's data paths are relative to the repo root
    space = load_space("tune_spaces/focal_smoothing_lr.yaml")
    assert check_space(space, "jobs/nsmc_tiny.yaml", "classify", "focal.yaml") == []
    assert set(space.searched) == {"classify.gamma", "classify.label_smoothing", "train.lr"}


@pytest.mark.parametrize("text, message", [
    ("metric: f1\nmode: best\nparams: {train.lr: {type: uniform, low: 0.1, high: 1}}", r"mode: Input should be 'max' or 'min'"),
    ("metric: f1\nmode: max\nparams: {train.lr: {type: uniform, low: 1, high: 0.1}}", r"params\.train\.lr: low 1\.0 must be below high 0\.1"),
    ("metric: f1\nmode: max\nparams: {train.lr: {type: loguniform, low: 0, high: 1}}", r"loguniform needs low > 0"),
    ("metric: f1\nmode: max\nparams: {train.lr: {type: normal, low: 0, high: 1}}", r"`type` must be one of uniform"),
    # The allowed keys are the range's own (they were a job's: name, stages, tracking).
    ("metric: f1\nmode: max\nparams: {train.lr: {type: uniform, lo: 0, high: 1}}",
     r"params\.train\.lr\.lo: unknown key 'lo'; did you mean 'low'\? allowed: high, low, type"),
    ("metric: f1\nmode: max\nashaa: {}\nparams: {train.lr: {type: uniform, low: 0, high: 1}}",
     r"ashaa: unknown key 'ashaa'; did you mean 'asha'\? allowed: asha, metric, mode, params, startup_trials"),
    ("metric: f1\nmode: max\nparams: {train.lr: {type: fixed, value: 0.1}}", r"params are all `fixed`"),
    ("metric: f1\nmode: max\nparams: {train.lr: {type: choice, values: [1]}}", r"params\.train\.lr\.values: List should have at least 2"),
    ("metric: f1\nparams: {train.lr: {type: choice, values: [1, 2]}}", r"mode: Field required"),
])
def test_space_errors_are_one_line_each(tmp_path, text, message):
    with pytest.raises(SpecError, match=message) as info:
        load_space(write(tmp_path, text))
    assert all(line.startswith(str(tmp_path)) for line in str(info.value).splitlines())


def test_missing_space_file_names_the_fix(tmp_path):
    with pytest.raises(SpecError, match="file does not exist; give a search space"):
        load_space(tmp_path / "nope.yaml")


def test_check_space_names_the_param_and_the_job_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    space = load_space(write(tmp_path, "metric: macro_f1\nmode: max\nparams:\n"
                                       "  train.lrr: {type: uniform, low: 0.1, high: 1}\n"
                                       "  classify.label_smoothing: {type: uniform, low: 0.0, high: 1.5}\n"))
    problems = check_space(space, "jobs/nsmc_tiny.yaml", "classify", "s.yaml")
    assert any("params.train.lrr = 0.1: train.lrr: unknown key 'lrr'; did you mean 'lr'?" in p for p in problems)
    assert any("params.classify.label_smoothing = 1.5: classify.label_smoothing: Input should be less than 1" in p
               for p in problems)
    assert check_space(space, "jobs/nsmc_tiny.yaml", "nope", "s.yaml")[0].endswith("pick one with --stage")


def test_translation_to_optuna_distributions():
    space = SpaceConfig.model_validate({"metric": "m", "mode": "max", "params": {
        "a": {"type": "uniform", "low": 0.0, "high": 5.0}, "b": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        "c": {"type": "int", "low": 1, "high": 9, "step": 2}, "d": {"type": "choice", "values": ["cls", "mean"]},
        "e": {"type": "fixed", "value": "focal"}}})
    dists = build_search_space(space)
    assert set(dists) == {"a", "b", "c", "d"}  # fixed values are applied, not searched
    assert (dists["a"].low, dists["a"].high, dists["a"].log) == (0.0, 5.0, False)
    assert dists["b"].log and dists["c"].step == 2 and dists["d"].choices == ("cls", "mean")
    assert space.fixed == {"e": "focal"}


def test_params_go_into_the_named_stage_only():
    raw = {"name": "j", "stages": [{"name": "a", "train": {"lr": 1}}, {"name": "b", "train": {"lr": 1}}]}
    out = apply_params(raw, "b", {"train.lr": 0.5, "classify.pooling": "mean", "train.swa_epochs": None})
    assert out["stages"][0]["train"] == {"lr": 1} and raw["stages"][1]["train"] == {"lr": 1}
    assert out["stages"][1]["train"] == {"lr": 0.5, "swa_epochs": None}
    assert out["stages"][1]["classify"] == {"pooling": "mean"}
    assert stage_overrides("b", {"x.y": "s"}) == ['stages.b.x.y="s"']


def test_grid_points_cover_each_range_evenly():
    space = SpaceConfig.model_validate({"metric": "m", "mode": "max", "params": {
        "a": {"type": "uniform", "low": 0.0, "high": 4.0}, "b": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "d": {"type": "choice", "values": [1, 2]}}})
    points = grid_points(space, 3)
    assert len(points) == 3 * 3 * 2
    assert sorted({p["a"] for p in points}) == [0.0, 2.0, 4.0]
    assert [round(math.log10(v), 6) for v in sorted({p["b"] for p in points})] == [-4, -3, -2]
