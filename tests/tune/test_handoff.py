"""`--then` as data: parsing, and the retrain / ensemble jobs built from a campaign's results validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from korch.config import JobConfig, load_raw
from korch.errors import UserError
from korch.tune.handoff import build_ensemble_job, build_retrain_job, parse_then

REPO = Path(__file__).resolve().parents[2]


def test_parse_then():
    assert parse_then(["ensemble:top3", "retrain:best"]) == [("ensemble", 3), ("retrain", 1)]
    for bad in ("ensemble:top1", "retrain:worst", "ensemble"):
        with pytest.raises(UserError, match=f"--then {bad}: expected retrain:best or ensemble:topK"):
            parse_then([bad])


def test_retrain_and_ensemble_jobs_validate(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    raw = load_raw("jobs/nsmc_tiny.yaml")
    retrain = JobConfig.model_validate(build_retrain_job(raw, "classify", 2, "nsmc-tiny"))
    stage = retrain.stages[0]
    assert stage.data.train_on_validation and stage.train.epochs == 2 and stage.eval.every == "never"
    assert raw["stages"][0]["train"]["epochs"] == 3  # the campaign's job is left alone
    members = [str(tmp_path / "trials" / f"trial-00{i}" / "best") for i in range(3)]
    ensemble = JobConfig.model_validate(build_ensemble_job(raw, "classify", members, "nsmc-tiny"))
    assert ensemble.stages[0].task == "ensemble" and ensemble.stages[0].ensemble.members == members
    assert ensemble.stages[0].train.seed == 42  # the trials' validation split
