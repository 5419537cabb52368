"""Experiment tracking beside korch's own JSON lines: TensorBoard event files and MLflow runs.

TensorBoard: the stage's RunLog actor writes every logged metric to `RUNS/<job>/<stage>/tb/` as it arrives
(tensorboardX ships with Ray), so `tensorboard --logdir RUNS/<job>` shows live curves for every stage.

MLflow (when `MLFLOW_TRACKING_URI` is set or the job has `tracking.mlflow_uri`): when a stage finishes, the driver
logs one run per stage with the resolved spec as params, every metrics.jsonl row as step metrics, eval.json as
final metrics, and `final/` as an artifact. Logging from files after the stage keeps the workers free of a
tracking client, and a stage that is skipped logs nothing again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

TB_FOLDER = "tb"


class TensorBoardSink:
    """Scalars of metrics.jsonl rows, keyed by step; opened lazily so a run without metrics writes no file."""

    def __init__(self, stage_dir: Path):
        self.folder = stage_dir / TB_FOLDER
        self._writer = None

    def write(self, row: Mapping[str, Any], prefix: str = "") -> None:
        step = row.get("step")
        if step is None:
            return
        if self._writer is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # tracking is optional; metrics.jsonl has everything
                self.folder = None
                return
            self._writer = SummaryWriter(str(self.folder), flush_secs=10)
        if self.folder is None:
            return
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}{key}", float(value), int(step))

    def flush(self) -> None:
        # tensorboardX's flush() does not drain its writer thread's queue; close() does. Rows after this (a
        # resumed attempt) open a new event file, which TensorBoard reads as the same run.
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def mlflow_uri(configured: str | None) -> str | None:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None


def log_stage_to_mlflow(uri: str, experiment: str, stage_dir: Path, spec: Mapping[str, Any]) -> str:
    """One MLflow run for a finished stage; returns its run id."""
    import mlflow

    from korch.train.provenance import flatten

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=stage_dir.name) as run:
        params = {k: json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v for k, v in flatten(spec).items()}
        items = list(params.items())
        for start in range(0, len(items), 100):  # the REST API takes at most 100 params per call
            mlflow.log_params(dict(items[start:start + 100]))
        for row in _jsonl(stage_dir / "metrics.jsonl"):
            step = int(row.get("step", 0))
            numbers = {k: float(v) for k, v in row.items()
                       if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numbers:
                mlflow.log_metrics(numbers, step=step)
        evaluation = _json(stage_dir / "eval.json")
        final = {f"eval_{k}": float(v) for k, v in evaluation.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if final:
            mlflow.log_metrics(final)
        mlflow.set_tags({"korch.stage": stage_dir.name, "korch.spec_hash": _json(stage_dir / "korch.json").get("spec_hash", "")})
        for folder in ("final", "ensemble"):
            if (stage_dir / folder).is_dir():
                mlflow.log_artifacts(str(stage_dir / folder), artifact_path=folder)
        return run.info.run_id


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a kill: the rest still logs
            continue
    return rows


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
