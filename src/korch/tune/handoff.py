"""`--then`: what a campaign hands its results to, inside the time `--reserve` kept for it.

- `retrain:best`: the best trial's config trained once more on train + validation
  (`data.train_on_validation`) for its best epoch count, as `korch.train.retrain` does for `retrain_of`;
- `ensemble:topK`: an `ensemble` stage over the K best trials' models (each trial's `best/`, else `final/`),
  scored on the same seeded validation split the trials were scored on.

Both run as ordinary one-stage jobs under RUNS/<job>/tune/handoff/.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

from korch.errors import UserError

_THEN = re.compile(r"^(retrain:best|ensemble:top([0-9]+))$")


def parse_then(items: list[str]) -> list[tuple[str, int]]:
    """`["ensemble:top3", "retrain:best"]` -> `[("ensemble", 3), ("retrain", 1)]`; bad items are a user error."""
    parsed = []
    for item in items:
        match = _THEN.match(item)
        if not match or (match.group(2) is not None and int(match.group(2)) < 2):
            raise UserError(f"--then {item}: expected retrain:best or ensemble:topK with K >= 2 (e.g. ensemble:top3)")
        parsed.append(("retrain", 1) if item == "retrain:best" else ("ensemble", int(match.group(2))))
    return parsed


def _stage_raw(raw_job: dict, stage_name: str) -> dict:
    return copy.deepcopy(next(s for s in raw_job["stages"] if s.get("name") == stage_name))


def build_retrain_job(best_raw: dict, stage_name: str, best_epoch: int, job_name: str) -> dict:
    """The best trial's stage on every labelled row for its best epoch count, evaluating nothing (pure)."""
    stage = _stage_raw(best_raw, stage_name)
    stage.setdefault("data", {})["train_on_validation"] = True
    stage.setdefault("train", {})["epochs"] = int(best_epoch)
    stage["train"].pop("max_steps", None)
    stage["eval"] = {"every": "never"}
    return {"name": f"{job_name}-retrain", "stages": [stage]}


def build_ensemble_job(raw_job: dict, stage_name: str, members: list[str], job_name: str) -> dict:
    """An ensemble stage over model folders, on the tuned stage's data and seed (so the same validation split)."""
    stage = _stage_raw(raw_job, stage_name)
    ensemble = {"name": "ensemble", "task": "ensemble", "data": stage.get("data", {}),
                "train": {"seed": stage.get("train", {}).get("seed", 42)}, "ensemble": {"members": members}}
    return {"name": f"{job_name}-ensemble", "stages": [ensemble]}


def _model_folder(trial_dir: Path) -> str | None:
    for name in ("best", "final"):
        if (trial_dir / name / "config.json").exists():
            return str(trial_dir / name)
    return None


def run_handoffs(items: list[str], campaign_dir: Path, rows: list[dict], raw_job: dict, stage_name: str, space,
                 runs_dir: str, deadline: float) -> dict[str, Any]:
    from korch.config import JobConfig
    from korch.train.job import run_job
    from korch.train.retrain import best_epoch_count
    from korch.tune.space import apply_params
    from korch.tune.study import ranked

    good = [r for r in ranked(rows) if r["folder"] and _model_folder(campaign_dir / r["folder"])]
    outcome: dict[str, Any] = {}
    for kind, k in parse_then(items):
        if time.time() >= deadline:
            outcome[kind] = "skipped: the deadline has passed"
            continue
        if not good:
            outcome[kind] = "skipped: no trial finished with a model"
            continue
        job_name = raw_job["name"]
        if kind == "retrain":
            best = good[0]
            best_raw = apply_params(raw_job, stage_name, {**space.fixed, **json.loads(best["params"])})
            summary_file = campaign_dir / best["folder"] / "summary.json"
            summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
            epochs = best_epoch_count(summary) or max(1, int(best["epochs"]))
            raw = build_retrain_job(best_raw, stage_name, epochs, job_name)
        else:
            members = [_model_folder(campaign_dir / r["folder"]) for r in good[:k]]
            raw = build_ensemble_job(raw_job, stage_name, members, job_name)
        job = JobConfig.model_validate(raw)
        summaries = run_job(job, str(campaign_dir / "handoff"))
        outcome[kind] = {"folder": str(campaign_dir / "handoff" / job.name), **{
            n: {key: s.get(key) for key in ("eval", "seconds") if key in s} for n, s in summaries.items()}}
        print(f"[korch] tune --then {kind}: {json.dumps(outcome[kind], ensure_ascii=False, default=str)[:400]}", flush=True)
    return outcome
