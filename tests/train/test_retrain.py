"""Full-data retrains resolved as data: the winner by validation score, its best epoch count, nothing held out."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from korch.config import load_job
from korch.errors import UserError
from korch.train.retrain import best_epoch_count, resolve_retrain

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nsmc" / "ratings_train.head5000.txt"

JOB = f"""\
name: comp
stages:
  - name: a
    task: classify
    classify: {{pooling: max}}
    data: {{inputs: [{DATA}], text_column: document}}
    train: {{epochs: 5, lr: 1e-3}}
    eval: {{every: epoch, select_best: accuracy}}
  - name: b
    task: classify
    classify: {{pooling: mean}}
    data: {{inputs: [{DATA}], text_column: document}}
    train: {{epochs: 4, lr: 2e-3}}
    eval: {{every: epoch, select_best: accuracy}}
  - name: retrain
    task: classify
    retrain_of: [a, b]
    distributed: {{num_workers: 3}}
  - name: by_epochs
    task: classify
    data: {{inputs: [{DATA}], text_column: document, train_on_validation: true}}
    train: {{epochs_from: b}}
"""


def _job(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(JOB))
    return load_job(path)


def _finish(job_dir: Path, name: str, accuracy: float, best_epoch: int) -> None:
    (job_dir / name).mkdir(parents=True, exist_ok=True)
    (job_dir / name / "summary.json").write_text(json.dumps(
        {"epochs": 5.0, "eval": {"accuracy": accuracy - 0.01,
                                 "best": {"metric": "accuracy", "value": accuracy, "best_epoch": best_epoch}}}))


def test_the_best_configuration_is_retrained_on_everything_for_its_best_epochs(tmp_path):
    job = _job(tmp_path)
    _finish(tmp_path, "a", 0.80, 3)
    _finish(tmp_path, "b", 0.82, 2)
    stage = resolve_retrain(job, job.stage("retrain"), tmp_path)
    assert stage.name == "retrain" and stage.retrain_of is None
    assert stage.options.pooling == "mean" and stage.train.lr == 2e-3  # b's spec
    assert stage.train.epochs == 2 and stage.train.max_steps is None
    assert stage.data.train_on_validation and stage.eval.every == "never" and stage.eval.select_best is None
    assert stage.distributed.num_workers == 3  # its own resources

    by_epochs = resolve_retrain(job, job.stage("by_epochs"), tmp_path)
    assert by_epochs.train.epochs == 2 and by_epochs.train.epochs_from is None


def test_a_retrain_before_its_sources_finished_is_a_one_line_error(tmp_path):
    job = _job(tmp_path)
    _finish(tmp_path, "a", 0.80, 3)
    with pytest.raises(UserError, match="retrain_of 'b' has not finished"):
        resolve_retrain(job, job.stage("retrain"), tmp_path)


def test_best_epoch_count_falls_back_to_epochs_run():
    assert best_epoch_count({"eval": {"best": {"best_epoch": 2}}, "epochs": 4.0}) == 2
    assert best_epoch_count({"eval": {"accuracy": 0.8}, "epochs": 3.0}) == 3
    assert best_epoch_count({}) is None
