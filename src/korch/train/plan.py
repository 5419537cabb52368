"""Which stages of a job a run reuses, resumes or runs again, and why (`korch run` and `korch status`).

The decision for each stage is `korch.train.provenance.decide` on its recorded `korch.json` and its provenance
now. A stage that runs again takes every stage downstream of it along, in job order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from korch.config import JobConfig, StageConfig
from korch.train.provenance import (PROVENANCE, Decision, Provenance, decide, file_stats, flatten, inputs_fingerprint,
                                    output_hash, read_provenance)

SUMMARY = "summary.json"
AGAIN = ("run", "rerun", "restart")
"""The actions that produce new outputs, so every stage downstream runs again too."""


def upstream(stage: StageConfig) -> list[str]:
    """Every stage this one reads: `needs`, `retrain_of` and `train.epochs_from`."""
    names = [*stage.needed, *stage.retrained_from]
    if stage.train.epochs_from:
        names.append(stage.train.epochs_from)
    return list(dict.fromkeys(names))


def parent_output(stage_dir: Path) -> str | None:
    """A stage's output hash as it recorded it when it finished, else hashed now (runs from before provenance)."""
    recorded = read_provenance(stage_dir)
    if recorded and recorded.get("finished") and recorded.get("output"):
        return recorded["output"]
    return output_hash(stage_dir)


def current_provenance(job: JobConfig, name: str, job_dir: Path) -> Provenance:
    """What stage `name` would be made from now. The spec is the job's own (a retrain's resolved spec follows from
    its parents' outputs, which are recorded beside it)."""
    stage = job.stage(name)
    files = [*stage.data.inputs, *stage.data.validation_inputs, stage.model.pretrained or "", stage.tokenizer.path or ""]
    # `explicit`: a field a korch upgrade adds at its default must not re-run every finished stage.
    return Provenance(spec=flatten(stage.model_dump(mode="json")),
                      explicit=sorted(flatten(stage.model_dump(mode="json", exclude_defaults=True))),
                      parents={parent: parent_output(job_dir / parent) for parent in upstream(stage)},
                      inputs=inputs_fingerprint(file_stats(files)))


def stage_started(stage_dir: Path) -> bool:
    """Anything to resume from: a Ray run with checkpoints, or prepared data that an unfinished prepare left."""
    return (stage_dir / "ray").is_dir() or (stage_dir / PROVENANCE).is_file()


def stage_folder_hint(folder: Path, command: str) -> str | None:
    """The one-line fix when `folder` is one stage's folder (RUNS/<job>/<stage>) where a command wants the job's."""
    folder = Path(folder)
    if (folder / "events.jsonl").is_file() or (folder / PROVENANCE).is_file():
        return f"{folder} is one stage's folder; give its job's folder: korch {command} {folder.parent}"
    return None


def plan_job(job: JobConfig, job_dir: Path, from_stage: str | None = None) -> dict[str, Decision]:
    plan: dict[str, Decision] = {}
    rerun: set[str] = set()
    for stage in job.stages:
        stage_dir = job_dir / stage.name
        forced = None
        if from_stage == stage.name:
            forced = "--from-stage"
        else:
            moved = [parent for parent in upstream(stage) if parent in rerun]
            if moved:
                forced = f"{moved[0]} runs again"
        finished = (stage_dir / SUMMARY).is_file()
        decision = decide(read_provenance(stage_dir), current_provenance(job, stage.name, job_dir), finished,
                          started=stage_started(stage_dir), forced=forced)
        plan[stage.name] = decision
        if decision.action in AGAIN:
            rerun.add(stage.name)
    return plan


def describe_plan(job: JobConfig, plan: dict[str, Decision]) -> list[str]:
    """One line per change that makes stages run again, e.g. `mlm: train.lr changed 0.002 → 0.001; re-running
    mlm, classify`; one per unfinished stage that resumes or starts over. Nothing for plain runs and skips."""
    lines = []
    downstream = _downstream(job)
    for stage in job.stages:
        decision = plan.get(stage.name)
        if decision is None or not decision.reasons:
            continue
        why = "; ".join(_changed(reason) for reason in decision.reasons)
        if decision.action == "resume":
            lines.append(f"{stage.name}: {why} (resume-safe); resuming from its latest checkpoint")
        elif decision.action in ("rerun", "restart") and not decision.reasons[0].endswith(" runs again"):
            again = [stage.name, *[n for n in downstream[stage.name] if plan.get(n) and plan[n].action in AGAIN]]
            if decision.action == "restart":
                lines.append(f"{stage.name}: unfinished, and {why}; starting it over instead of resuming; "
                             f"re-running {', '.join(again)}")
            else:
                lines.append(f"{stage.name}: {why}; re-running {', '.join(again)}")
    return lines


def plan_table(job: JobConfig, plan: dict[str, Decision], only: list[str] | None = None,
               start_over: str | None = None) -> str:
    """`korch run --dry-run`: one line per stage, what it would do and why. `only`: the `--stage` names;
    `start_over`: why every stage that runs starts from scratch whatever it left (`--fresh`, `--from-checkpoint`)."""
    words = {"skip": "skip (unchanged)", "resume": "resume", "run": "run", "rerun": "re-run",
             "restart": "start over (unfinished)"}
    lines = []
    for stage in job.stages:
        if only and stage.name not in only:
            lines.append(f"{stage.name}: not run (not a --stage)")
            continue
        if start_over:
            lines.append(f"{stage.name}: run ({start_over})")
            continue
        decision = plan[stage.name]
        why = "; ".join(_changed(reason) for reason in decision.reasons)
        lines.append(f"{stage.name}: {words[decision.action]}" + (f" ({why})" if why else ""))
    return "\n".join(lines)


def _changed(reason: str) -> str:
    # "train.lr 0.002 → 0.001" reads as "train.lr changed 0.002 → 0.001"
    if " → " in reason and reason.split(" ", 1)[0].count(".") >= 1:
        field, rest = reason.split(" ", 1)
        return f"{field} changed {rest}"
    return reason


def _downstream(job: JobConfig) -> dict[str, list[str]]:
    """Every stage that reads each stage, directly or through others, in job order."""
    below: dict[str, list[str]] = {s.name: [] for s in job.stages}
    for stage in job.stages:
        for parent in upstream(stage):
            for name in [parent, *[n for n, kids in below.items() if parent in kids]]:
                if name in below and stage.name not in below[name]:
                    below[name].append(stage.name)
    order = [s.name for s in job.stages]
    return {name: sorted(kids, key=order.index) for name, kids in below.items()}


@dataclass(frozen=True)
class StageStatus:
    name: str
    state: str
    """`done`, `stale` (done, but made from something that changed since), `partial` or `not run`."""
    step: int | None
    metric: str | None


def job_status(job: JobConfig, job_dir: Path) -> list[StageStatus]:
    plan = plan_job(job, job_dir)
    rows = []
    for stage in job.stages:
        stage_dir = job_dir / stage.name
        finished = (stage_dir / SUMMARY).is_file()
        decision = plan[stage.name]
        if finished:
            state = "done" if decision.action == "skip" else "stale"
        elif stage_started(stage_dir):
            state = "partial"
        else:
            state = "not run"
        rows.append(StageStatus(stage.name, state, _step(stage_dir, finished), _key_metric(stage, stage_dir)))
    return rows


def _step(stage_dir: Path, finished: bool) -> int | None:
    if finished:
        step = json.loads((stage_dir / SUMMARY).read_text()).get("final_step")
        if step is not None:
            return int(step)
    from korch.train.checkpoint import checkpoint_step
    from korch.train.runner import RUN_STATE, latest_checkpoint

    if not (stage_dir / RUN_STATE).is_file():
        return None
    run_name = json.loads((stage_dir / RUN_STATE).read_text()).get("ray_run_name", "")
    checkpoint = latest_checkpoint(stage_dir / "ray" / run_name)
    return None if checkpoint is None else checkpoint_step(checkpoint)


def _key_metric(stage: StageConfig, stage_dir: Path) -> str | None:
    """The stage's `eval.select_best` metric if it has one, else its first numeric evaluation, else its loss."""
    try:
        evaluation = json.loads((stage_dir / "eval.json").read_text())
    except (OSError, ValueError):
        evaluation = {}
    names = [stage.eval.select_best] if stage.eval.select_best else []
    names += [k for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and k not in ("step", "epoch", "seconds")]
    for name in names:
        if isinstance(evaluation.get(name), (int, float)):
            return f"{name} {evaluation[name]:.4g}"
    try:
        loss = json.loads((stage_dir / SUMMARY).read_text()).get("final_loss")
    except (OSError, ValueError):
        loss = None
    return f"loss {loss:.4g}" if isinstance(loss, (int, float)) else None


def format_status(rows: list[StageStatus]) -> str:
    table = [("stage", "state", "step", "metric")] + [
        (r.name, r.state, "" if r.step is None else str(r.step), r.metric or "") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
