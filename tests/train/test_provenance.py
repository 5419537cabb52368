"""Provenance and re-running only what changed, in-process: the decisions as data, then `run_job` on a two-stage
job whose stages are a stand-in task that writes its spec into `final/` (no Ray)."""

from __future__ import annotations

import json

import pytest

from korch.config import JobConfig
from korch.tasks import TASKS, TaskInfo
from korch.train import job as job_module
from korch.train.plan import describe_plan, job_status, plan_job, plan_table
from korch.train.provenance import Provenance, changed_fields, decide, flatten, spec_hash

RUNS: list[str] = []


def _write_final(stage, ctx) -> dict:
    """The stand-in task: its output is its spec (so a changed field changes the output hash) plus its parent's."""
    RUNS.append(stage.name)
    final = ctx.stage_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    parents = {name: (path / "final" / "config.json").read_text() for name, path in ctx.needs.items()}
    (final / "config.json").write_text(json.dumps({"lr": stage.train.lr, "parents": parents}))
    with open(ctx.stage_dir / "metrics.jsonl", "w") as handle:
        for step in (1, 2, 3):
            handle.write(json.dumps({"step": step, "epoch": step / 3, "loss": 2.0 / step, "lr": stage.train.lr}) + "\n")
    (ctx.stage_dir / "eval.json").write_text(json.dumps({"accuracy": 0.75}))
    return {"final_step": 3, "final_loss": stage.train.lr}


class _StandIn(TaskInfo):
    def load_runner(self):
        return _write_final


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setitem(TASKS, "stand_in", _StandIn("stand_in", "test stand-in", "unused:unused", needs_data=False))
    monkeypatch.setattr(job_module, "start_ray", lambda job, address: None)
    monkeypatch.setattr(job_module, "_check_resources", lambda stage, korch_started_ray: None)
    RUNS.clear()
    return RUNS


def _job(first_lr=1e-3, second_lr=1e-3, log_every=10) -> JobConfig:
    return JobConfig.model_validate({"name": "two", "stages": [
        {"name": "first", "task": "stand_in", "train": {"lr": first_lr, "log_every_steps": log_every}},
        {"name": "second", "task": "stand_in", "needs": "first", "train": {"lr": second_lr}},
    ]})


def test_changed_fields_ignore_log_intervals_and_name_the_change():
    old = flatten({"train": {"lr": 0.002, "log_every_steps": 10}, "data": {"inputs": ["a"]}})
    new = flatten({"train": {"lr": 0.001, "log_every_steps": 1}, "data": {"inputs": ["a"]}})
    assert changed_fields(old, new) == ["train.lr 0.002 → 0.001"]
    assert spec_hash(old) != spec_hash(new)
    assert spec_hash(old) == spec_hash({**old, "train.log_every_steps": 1})


def test_decide_covers_skip_resume_restart_and_forced():
    spec = flatten({"train": {"lr": 0.001}, "distributed": {"num_workers": 2}})
    recorded = {**Provenance(spec, {"p": "abc"}, "in").to_json()}
    same = Provenance(dict(spec), {"p": "abc"}, "in")
    assert decide(recorded, same, finished=True, started=True).action == "skip"
    assert decide(None, same, finished=True, started=True).action == "skip"  # a run from before korch.json
    assert decide(None, same, finished=False, started=False).action == "run"
    moved = Provenance(dict(spec), {"p": "xyz"}, "in")
    assert decide(recorded, moved, True, True).reasons == ("p's output changed",)
    assert decide(recorded, Provenance(dict(spec), {"p": "abc"}, "other"), True, True).reasons == ("input files changed",)
    fewer = Provenance({**spec, "distributed.num_workers": 1}, {"p": "abc"}, "in")
    assert decide(recorded, fewer, True, True).action == "rerun"  # a finished run would differ
    assert decide(recorded, fewer, False, True).action == "resume"  # an unfinished one resumes on 1 worker
    lr = Provenance({**spec, "train.lr": 0.01}, {"p": "abc"}, "in")
    assert decide(recorded, lr, False, True).action == "restart"
    assert decide(recorded, same, True, True, forced="--from-stage") == decide(recorded, same, True, True, "--from-stage")
    assert decide(recorded, same, True, True, forced="--from-stage").action == "rerun"


def test_unchanged_job_skips_and_a_log_interval_alone_still_skips(stand_in, tmp_path):
    job_module.run_job(_job(), str(tmp_path))
    assert stand_in == ["first", "second"]
    record = json.loads((tmp_path / "two" / "first" / "korch.json").read_text())
    assert record["finished"] and record["output"] and record["spec"]["train.lr"] == 1e-3 and record["korch_version"]
    second = json.loads((tmp_path / "two" / "second" / "korch.json").read_text())
    assert second["parents"] == {"first": record["output"]}
    job_module.run_job(_job(), str(tmp_path))
    job_module.run_job(_job(log_every=1), str(tmp_path))
    assert stand_in == ["first", "second"]
    events = [json.loads(line) for line in (tmp_path / "two" / "second" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][-2:] == ["skip", "skip"]


def test_changing_the_first_stage_reruns_both_and_says_why(stand_in, tmp_path, capsys):
    job_module.run_job(_job(), str(tmp_path))
    capsys.readouterr()
    job_module.run_job(_job(first_lr=2e-3), str(tmp_path))
    assert stand_in == ["first", "second", "first", "second"]
    assert "first: train.lr changed 0.001 → 0.002; re-running first, second" in capsys.readouterr().out
    previous = json.loads((tmp_path / "two" / "previous" / "first" / "final" / "config.json").read_text())
    assert previous["lr"] == 1e-3  # the old results are kept, not lost


def test_changing_only_the_second_reruns_only_the_second(stand_in, tmp_path, capsys):
    job_module.run_job(_job(), str(tmp_path))
    job_module.run_job(_job(second_lr=5e-4), str(tmp_path))
    assert stand_in == ["first", "second", "second"]
    assert "second: train.lr changed 0.001 → 0.0005; re-running second" in capsys.readouterr().out


def test_from_stage_reruns_it_and_downstream(stand_in, tmp_path):
    job_module.run_job(_job(), str(tmp_path))
    job_module.run_job(_job(), str(tmp_path), from_stage="first")
    assert stand_in == ["first", "second", "first", "second"]
    with pytest.raises(Exception, match="no such stage"):
        job_module.run_job(_job(), str(tmp_path), from_stage="third")


def test_status_and_dry_run_show_stale_stages(stand_in, tmp_path):
    job_dir = tmp_path / "two"
    assert [r.state for r in job_status(_job(), job_dir)] == ["not run", "not run"]
    job_module.run_job(_job(), str(tmp_path))
    rows = job_status(_job(), job_dir)
    assert [(r.state, r.step, r.metric) for r in rows] == [("done", 3, "accuracy 0.75"), ("done", 3, "accuracy 0.75")]
    # the first stage re-ran by hand (e.g. --stage first with another lr): the second is now stale
    job_module.run_job(_job(first_lr=2e-3), str(tmp_path), only=["first"])
    assert [r.state for r in job_status(_job(first_lr=2e-3), job_dir)] == ["done", "stale"]
    plan = plan_job(_job(first_lr=2e-3), job_dir)
    assert plan_table(_job(first_lr=2e-3), plan) == "first: skip (unchanged)\nsecond: re-run (first's output changed)"
    assert describe_plan(_job(first_lr=2e-3), plan) == ["second: first's output changed; re-running second"]
    # --dry-run with --stage and --fresh / --from-checkpoint says what such a run does (it ignored them before)
    assert plan_table(_job(first_lr=2e-3), plan, only=["second"], start_over="--fresh") == \
        "first: not run (not a --stage)\nsecond: run (--fresh)"


def test_korch_status_cli_prints_the_table(stand_in, tmp_path, capsys):
    from korch.cli import main

    job_module.run_job(_job(), str(tmp_path))
    (tmp_path / "two" / "job.yaml").write_text((tmp_path / "two" / "job.yaml").read_text())
    capsys.readouterr()
    assert main(["status", str(tmp_path / "two")]) == 0
    out = capsys.readouterr().out
    assert "first   done" in out and "second  done" in out
    assert main(["status", str(tmp_path)]) == 2  # no job.yaml: one line, exit 2
    assert "not a korch job folder" in capsys.readouterr().err
    # A stage's folder holds a job.yaml of its own (its one stage), which would read as "not run".
    assert main(["status", str(tmp_path / "two" / "first")]) == 2
    assert "is one stage's folder; give its job's folder: korch status" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "nope" / "x")]) == 2  # a path, not a submitted job's ID
    assert "no such runs folder" in capsys.readouterr().err


def test_an_unfinished_stage_whose_lr_changed_starts_over_and_says_so(stand_in, tmp_path, capsys):
    job_module.run_job(_job(), str(tmp_path))
    (tmp_path / "two" / "second" / "summary.json").unlink()  # as if it had been killed mid-run
    capsys.readouterr()
    job_module.run_job(_job(second_lr=5e-4), str(tmp_path))
    assert "second: unfinished, and train.lr changed 0.001 → 0.0005; starting it over" in capsys.readouterr().out
    assert stand_in == ["first", "second", "second"]


def test_a_field_at_its_default_is_no_change(stand_in, tmp_path):
    """What a korch upgrade looks like: the recorded spec lacks a field the new korch has, at its default."""
    job_module.run_job(_job(), str(tmp_path))
    record_path = tmp_path / "two" / "first" / "korch.json"
    record = json.loads(record_path.read_text())
    assert "train.seed" not in record["explicit"] and "train.lr" in record["explicit"]
    record["spec"].pop("train.seed")  # as if train.seed were new in this korch: absent from the record, default now
    record_path.write_text(json.dumps(record))
    job_module.run_job(_job(), str(tmp_path))
    assert stand_in == ["first", "second"]  # skipped: a new field at its default is no change
    assert changed_fields({"a": 1}, {"a": 1, "b": 2}, old_explicit=["a"], new_explicit=["a"]) == []
    assert changed_fields({"a": 1}, {"a": 1, "b": 2}, old_explicit=["a"], new_explicit=["a", "b"]) == ["b unset → 2"]
