"""The study as the campaign's memory, on in-memory Optuna studies: closing trials a crash or the window's
end left RUNNING, counting what is done, and the leaderboard."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
from optuna.distributions import FloatDistribution

from korch.tune.study import (build_leaderboard, close_running, done_count, durations, format_table, ranked,
                              write_leaderboard)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_study():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    dist = {"lr": FloatDistribution(1e-5, 1e-3, log=True)}
    finished = []
    for value, epochs in ((0.70, 3), (0.80, 3), (0.60, 1)):  # the last was stopped early by ASHA
        trial = study.ask(dist)
        for epoch in range(1, epochs + 1):
            trial.report(value - 0.1 * (epochs - epoch), epoch)
        study.tell(trial, value)
        finished.append(trial.number)
    reported = study.ask(dist)  # running at the crash, one epoch reported
    reported.report(0.75, 1)
    silent = study.ask(dist)  # running at the crash, nothing reported yet
    return study, reported.number, silent.number


def test_running_trials_are_closed_keeping_their_last_result():
    study, reported, silent = make_study()
    assert close_running(study, "interrupted") == [reported, silent]
    trials = study.get_trials()
    assert trials[reported].state.name == "PRUNED" and trials[reported].value == 0.75
    assert trials[reported].user_attrs["stopped"] == "interrupted"
    assert trials[silent].state.name == "FAIL"
    assert close_running(study, "interrupted") == []  # nothing is left RUNNING
    assert done_count(trials) == 4  # the failed one is run again on resume
    assert len(durations(trials)) == 3


def test_leaderboard_ranks_best_first_and_keeps_stopped_results(tmp_path):
    study, _, _ = make_study()
    close_running(study, "deadline")
    rows = build_leaderboard(study.get_trials(), "max", max_epochs=3)
    assert [r["metric"] for r in rows] == [0.80, 0.75, 0.70, 0.60, None]
    assert [r["status"] for r in rows] == ["complete", "stopped_deadline", "complete", "stopped_early", "failed"]
    assert rows[0]["trial_id"] == 1 and set(json.loads(rows[0]["params"])) == {"lr"}
    assert rows[0]["started_at"] and rows[0]["finished_at"]
    assert len(ranked(rows)) == 4
    write_leaderboard(rows, tmp_path / "leaderboard.csv")
    with open(tmp_path / "leaderboard.csv") as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0])[:6] == ["trial_id", "status", "metric", "epochs", "params", "started_at"]
    assert "0.8" in format_table(rows) and "stopped_deadline" in format_table(rows)


def test_leaderboard_for_a_lower_is_better_metric():
    study = optuna.create_study(direction="minimize")
    for value in (0.5, 0.3, float("nan")):
        trial = study.ask({"x": FloatDistribution(0, 1)})
        study.tell(trial, value) if value == value else study.tell(trial, state=optuna.trial.TrialState.FAIL)
    rows = build_leaderboard(study.get_trials(), "min", max_epochs=1)
    assert [r["metric"] for r in rows][:2] == [0.3, 0.5]


def test_grid_points_go_into_one_study_in_order_and_a_resume_continues_them():
    """The bench's grid search records every point as the trial's params; Optuna refuses a categorical
    parameter whose choices differ between trials, so each parameter keeps all its grid values as choices."""
    from ray.tune.search import Searcher

    from korch.tune.trial import TRIAL_KEY, FixedPointsSearch

    points = [{"lr": lr, "gamma": g} for lr in (1e-4, 1e-3) for g in (0.5, 2.0)]
    study = optuna.create_study(direction="maximize")
    first = FixedPointsSearch(points, study, "accuracy", "max")
    given = [first.suggest(f"t{i}") for i in range(2)]
    assert [{k: v for k, v in g.items() if k != TRIAL_KEY} for g in given] == points[:2]
    resumed = FixedPointsSearch(points, study, "accuracy", "max", skip=2)  # a resumed campaign, 2 done
    given += [resumed.suggest(f"r{i}") for i in range(2)]
    assert resumed.suggest("r2") == Searcher.FINISHED
    assert [t.params for t in study.get_trials(deepcopy=False)] == points


def test_a_storage_url_that_cannot_open_fails_before_the_campaign_records_it(tmp_path, monkeypatch):
    # Before: campaign.json kept the bad URL, so neither a rerun (--resume wanted) nor --resume --storage GOOD
    # (another URL than the campaign's) could go on; and the labelled data was tokenised first.
    from pathlib import Path

    from korch.errors import UserError
    from korch.tune.campaign import TuneRequest, run_campaign

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the job's data paths are relative to the repo root
    request = TuneRequest(job="jobs/nsmc_tiny.yaml", space="tune_spaces/focal_smoothing_lr.yaml",
                          runs_dir=str(tmp_path), time_budget=3600, storage="bogus://nowhere")
    with pytest.raises(UserError, match=r"--storage bogus://nowhere: cannot open the study storage"):
        run_campaign(request)
    assert not (tmp_path / "nsmc-tiny").exists()
