"""Full-data retrains: `train.epochs_from` and `retrain_of`, resolved when the stage is about to run.

A competition's last step trains the chosen configuration once more on every labelled row (train +
validation) for as many epochs as its best validation epoch had, and submits that model. Which configuration
won and how many epochs it needed are known only after the earlier stages ran, so a retrain stage names
them and korch turns the names into a plain stage spec here, just before the stage starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from korch.config import JobConfig, StageConfig
from korch.errors import UserError

SUMMARY = "summary.json"


def best_epoch_count(summary: dict) -> int | None:
    """The epochs a finished stage's best model had trained: its `select_best` pick, else all it ran."""
    best = (summary.get("eval") or {}).get("best") or {}
    if best.get("best_epoch"):
        return int(best["best_epoch"])
    epochs = summary.get("epochs")
    return max(1, round(float(epochs))) if epochs else None


def _finished_summary(stage: StageConfig, field: str, source: str, job_dir: Path) -> dict:
    summary_file = job_dir / source / SUMMARY
    if not summary_file.is_file():
        raise UserError(f"stage {stage.name}: {field} '{source}' has not finished ({summary_file} is missing); "
                        f"run stage {source} first")
    return json.loads(summary_file.read_text())


def resolve_epochs_from(stage: StageConfig, job_dir: Path) -> StageConfig:
    """`train.epochs_from: <stage>` becomes a plain `train.epochs` once that stage has finished."""
    source = stage.train.epochs_from
    if not source:
        return stage
    epochs = best_epoch_count(_finished_summary(stage, "train.epochs_from", source, job_dir))
    if epochs is None:
        raise UserError(f"stage {stage.name}: train.epochs_from '{source}': its summary records no epoch count; "
                        "set train.epochs instead")
    print(f"[korch] {stage.name}: {epochs} epoch(s), the best epoch count of stage {source}", flush=True)
    return stage.model_copy(update={"train": stage.train.model_copy(update={"epochs": epochs, "epochs_from": None})})


def selection_score(stage: StageConfig, summary: dict) -> float:
    """A finished stage's validation score for ranking configurations, oriented so that higher is better."""
    from korch.tasks import TASKS
    from korch.tasks.base import metric_greater_is_better

    evaluation = summary.get("eval") or {}
    metric = stage.eval.select_best
    if metric and (evaluation.get("best") or {}).get("value") is not None:
        value = float(evaluation["best"]["value"])
    else:
        metric = metric or "accuracy"
        if metric not in evaluation:
            return -math.inf
        value = float(evaluation[metric])
    greater = metric_greater_is_better(TASKS[stage.task].load_trainer(), metric, stage.eval.greater_is_better)
    return value if greater else -value


def resolve_retrain(job: JobConfig, stage: StageConfig, job_dir: Path) -> StageConfig:
    """`retrain_of: [stages]` becomes the best of those stages' specs, trained on train + validation for its best
    epoch count with nothing held out; `train.epochs_from` becomes `train.epochs`."""
    if not stage.retrain_of:
        return resolve_epochs_from(stage, job_dir)
    names = stage.retrained_from
    scores = {name: selection_score(job.stage(name), _finished_summary(stage, "retrain_of", name, job_dir))
              for name in names}
    winner = max(names, key=lambda name: scores[name])  # ties: the first named
    source = job.stage(winner)
    epochs = best_epoch_count(_finished_summary(stage, "retrain_of", winner, job_dir))
    raw = source.model_dump(mode="json")
    raw.update(name=stage.name, retrain_of=None)
    raw["data"]["train_on_validation"] = True
    raw["train"].update(epochs=epochs, epochs_from=None, max_steps=None)
    raw["eval"] = {"every": "never"}
    if stage.distributed != StageConfig.model_fields["distributed"].default:
        raw["distributed"] = stage.distributed.model_dump(mode="json")  # the retrain's own resources, if it set them
    print(f"[korch] {stage.name}: retraining {winner} (best of {', '.join(f'{n} {abs(v):.4f}' for n, v in scores.items())}) "
          f"on train + validation for {epochs} epoch(s)", flush=True)
    return StageConfig.model_validate(raw)
