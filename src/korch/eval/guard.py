"""Embedding stages' evaluation and the regression guard: a stage that scores below its parent is never
silently promoted.

After a stage writes `final/`, `eval.embed` scores it (`korch eval embed`) and `eval.guard` compares one
metric with the parent's (the `needs` stage, or what that stage promoted). A stage below parent + min_delta is
`regressed` in eval.json and events.jsonl, and its `final/` is not what later stages get: `promoted.json` names
the model they start from (the stage's own `final/`, or with `on_regression: keep_parent` the parent's), and
with `on_regression: fail` the job stops with one line and exit 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from korch.errors import StageFailed

PROMOTED = "promoted.json"


def guard_verdict(value: float, parent: float | None, min_delta: float) -> str:
    """`passed`, `regressed` (below parent + min_delta, or NaN) or `no_parent` (nothing to compare with)."""
    if parent is None or (isinstance(parent, float) and math.isnan(parent)):
        return "no_parent"
    if math.isnan(value) or value < parent + min_delta:
        return "regressed"
    return "passed"


def promoted_final(stage_dir: Path) -> str:
    """The model a stage hands to the stages after it: its promoted.json's choice, else its own final/."""
    marker = Path(stage_dir) / PROMOTED
    if marker.exists():
        return json.loads(marker.read_text())["final"]
    return str(Path(stage_dir) / "final")


def _promoted_scores(stage_dir: Path) -> dict | None:
    marker = Path(stage_dir) / PROMOTED
    if marker.exists():
        return json.loads(marker.read_text()).get("scores")
    path = Path(stage_dir) / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def evaluate_and_guard(stage, ctx, summary: dict) -> dict:
    from korch.eval.embed import evaluate_folder
    from korch.train.runlog import RunLog

    stage_dir = Path(ctx.stage_dir)
    final = stage_dir / "final"
    embed = stage.eval.embed
    if embed is None:
        (stage_dir / PROMOTED).write_text(json.dumps({"final": str(final), "scores": None}))
        return summary
    scores = evaluate_folder(str(final), embed.pairs, embed.sim_min, embed.diff_max, embed.limit)
    guard = stage.eval.guard
    verdict, parent_value, parent_name = "unguarded", None, stage.needed[0] if stage.needed else None
    if guard is not None:
        parent_scores = _promoted_scores(ctx.needs[parent_name]) if parent_name else None
        parent_value = (parent_scores or {}).get(guard.metric)
        if guard.metric not in scores:
            from korch.errors import UserError

            raise UserError(f"stage {stage.name}: eval.guard.metric '{guard.metric}' is not an eval.embed metric; "
                            f"use one of {', '.join(k for k, v in scores.items() if isinstance(v, float))}")
        verdict = guard_verdict(float(scores[guard.metric]), parent_value, guard.min_delta)
    scores.update(verdict=verdict, regressed=verdict == "regressed", parent=parent_name,
                  **({"guard": guard.model_dump(), "parent_value": parent_value} if guard else {}))
    (stage_dir / "eval.json").write_text(json.dumps(scores, indent=1, ensure_ascii=False))
    events = RunLog(str(stage_dir))
    if verdict == "regressed":
        value = scores[guard.metric]
        events.event("regressed", metric=guard.metric, value=value, parent=parent_name, parent_value=parent_value,
                     min_delta=guard.min_delta, on_regression=guard.on_regression)
        if guard.on_regression == "fail":
            (stage_dir / PROMOTED).unlink(missing_ok=True)
            raise StageFailed(
                f"stage {stage.name} regressed: {guard.metric} {value:.4f} < {parent_name}'s {parent_value:.4f} "
                f"+ min_delta {guard.min_delta}; its final/ is not promoted (eval.json: {stage_dir / 'eval.json'}); "
                f"set eval.guard.on_regression: keep_parent to continue from {parent_name} instead")
        parent_dir = ctx.needs[parent_name]
        promoted = {"final": promoted_final(parent_dir), "scores": _promoted_scores(parent_dir), "from": parent_name}
    else:
        promoted = {"final": str(final), "scores": scores, "from": stage.name}
    (stage_dir / PROMOTED).write_text(json.dumps(promoted, indent=1, ensure_ascii=False))
    summary = dict(summary, embed={k: scores[k] for k in ("sim_mean", "diff_mean", "gap", "spearman", "verdict")
                                   if k in scores}, promoted=promoted["final"])
    return summary


def run_embedding_training_stage(stage, ctx) -> dict:
    """simcse/adapter stages: the shared training loop, then `eval.embed` and the guard on `final/`."""
    from korch.train.runner import run_training_stage

    return evaluate_and_guard(stage, ctx, run_training_stage(stage, ctx))


def stage_table(job_dir: Path, names: list[str]) -> str | None:
    """The per-stage comparison table from each stage's eval.json (regressed stages included)."""
    from korch.eval.embed import format_stage_table

    rows = {}
    for name in names:
        path = Path(job_dir) / name / "eval.json"
        try:
            rows[name] = json.loads(path.read_text())
        except (OSError, ValueError):  # printed in a `finally`: never let a missing or torn file hide the real error
            continue
    return format_stage_table(rows)
