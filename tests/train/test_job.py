"""Driver-side decisions that need no Ray: CPU sizing, --from-checkpoint checks, data_prepare hand-over."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from korch.cli import main
from korch.config import load_job
from korch.train.job import local_cpus_needed
from korch.train.runner import StageContext, apply_from_checkpoint

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
JOB = """\
name: chain
stages:
  - {{name: prepare, task: data_prepare, data: {{inputs: [{data}], seq_len: 64}}}}
  - {{name: mlm, task: mlm, needs: prepare, train: {{max_steps: 5}}, distributed: {{num_workers: 2}}}}
"""


def test_local_ray_leaves_room_for_data_actors(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(data=DATA / "nsmc"))
    job = load_job(path)
    assert local_cpus_needed(job) >= 2 * 1.0 + 2 * 0.5 + 1


def test_a_stage_may_take_its_data_from_a_data_prepare_stage(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(data=DATA / "nsmc"))
    job = load_job(path)
    assert job.stage("mlm").data.inputs == []
    path.write_text(JOB.format(data=DATA / "nsmc").replace("needs: prepare, ", ""))
    assert main(["validate", str(path)]) == 2


def test_from_checkpoint_must_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    code = main(["run", "jobs/quickstart.yaml", "--runs-dir", str(tmp_path), "--from-checkpoint", str(tmp_path / "nope")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--from-checkpoint" in err[0] and "no such folder" in err[0]


@pytest.mark.parametrize("flags", [["--stage", "nope"], ["--stage", "mlm", "--stage", "nope"], ["--from-stage", "nope"],
                                   ["--stage", "nope", "--dry-run"]])
def test_an_unknown_stage_name_is_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch, flags):
    # An unknown --stage used to run no stage at all and exit 0.
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main(["run", "jobs/quickstart.yaml", "--runs-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope: the job has no such stage; its stages are mlm" in err[0]
    assert not any(tmp_path.iterdir())


def test_from_checkpoint_kinds(tmp_path):
    from korch.train.checkpoint import write_checkpoint

    write_checkpoint(tmp_path / "korch", {}, {}, {"step": 3})
    ctx = StageContext(stage_dir=tmp_path / "s")
    apply_from_checkpoint(ctx, str(tmp_path / "korch"))
    assert ctx.resume_from == str(tmp_path / "korch") and ctx.start_from is None
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({}))
    ctx = StageContext(stage_dir=tmp_path / "s")
    apply_from_checkpoint(ctx, str(tmp_path / "hf"))
    assert ctx.start_from == str(tmp_path / "hf") and ctx.resume_from is None
    (tmp_path / "junk").mkdir()
    with pytest.raises(Exception, match="neither a korch checkpoint"):
        apply_from_checkpoint(StageContext(stage_dir=tmp_path / "s"), str(tmp_path / "junk"))


def test_start_event_names_the_step_a_rerun_continues_from(tmp_path):
    from korch.train.checkpoint import write_checkpoint
    from korch.train.job import _resume_step

    ctx = StageContext(stage_dir=tmp_path)
    assert _resume_step(ctx) == 0
    (tmp_path / "run.json").write_text(json.dumps({"ray_run_name": "train"}))
    write_checkpoint(tmp_path / "ray" / "train" / "checkpoint_a", {}, {}, {"step": 20})
    write_checkpoint(tmp_path / "ray" / "train" / "checkpoint_b", {}, {}, {"step": 30})
    write_checkpoint(tmp_path / "ray" / "older-run" / "checkpoint_c", {}, {}, {"step": 90})
    assert _resume_step(ctx) == 30
    assert _resume_step(StageContext(stage_dir=tmp_path, fresh_run=True)) == 0


def test_a_cluster_address_nothing_answers_is_one_line_in_seconds():
    # Ray retries such an address for minutes (2.5 min and counting for 127.0.0.1:1), printing warnings.
    import socket

    from korch.errors import UserError
    from korch.train.job import check_cluster_address

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(UserError, match=rf"--address 127.0.0.1:{free}: nothing answers there .*leave --address out"):
        check_cluster_address(f"127.0.0.1:{free}")
    with pytest.raises(UserError, match=r"RAY_ADDRESS http://127.0.0.1:8265: that is the Ray job API .*HOST:6379"):
        check_cluster_address("http://127.0.0.1:8265", "RAY_ADDRESS")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_cluster_address(f"127.0.0.1:{server.getsockname()[1]}")  # something answers: Ray takes it from here
    check_cluster_address("auto")


def test_joining_no_cluster_is_one_line(monkeypatch):
    import ray

    from korch.errors import UserError
    from korch.train import job as job_module

    def refuse(**_):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(UserError, match=r"^RAY_ADDRESS auto: Could not find any running Ray instance\..*to\. Start "
                                        r"the cluster first .*or unset RAY_ADDRESS to run on a local Ray"):
        job_module.start_ray(load_job(Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml"), None)


def test_a_local_ray_turns_off_ray_trains_preemption_watcher_and_metrics_unless_the_user_set_them(monkeypatch):
    """init_local_ray sets Ray Train's own variables (a renamed one would silently do nothing) to 0 before
    ray.init, and leaves a value the user set. ray.init is recorded, not run."""
    import ray
    from ray.train.v2._internal import constants

    from korch.train import job

    watcher, metrics = constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR, constants.METRICS_ENABLED_ENV_VAR
    assert set(job.LOCAL_RAY_TRAIN_OFF) == {watcher, metrics}
    seen = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.append({k: os.environ.get(k) for k in (watcher, metrics)}))
    monkeypatch.setattr(job, "quiet_before_local_init", lambda: None)
    monkeypatch.setattr(job, "quiet_driver_console", lambda: None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.delenv(watcher, raising=False)
    monkeypatch.setenv(metrics, "1")  # the user's choice
    job.init_local_ray(2)
    assert seen == [{watcher: "0", metrics: "1"}]


def test_only_stages_that_use_ray_start_it(tmp_path, monkeypatch):
    from korch.train.job import needs_ray

    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(data=DATA / "nsmc"))
    job = load_job(path)
    prepare, mlm = job.stage("prepare"), job.stage("mlm")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert not needs_ray(prepare, None)  # the driver's own Kiwi on a laptop
    assert needs_ray(mlm, None)
    assert needs_ray(prepare, "10.0.0.1:6379")  # a cluster's data stage runs its pool there
    assert needs_ray(prepare.model_copy(update={"data": prepare.data.model_copy(update={"preprocess_actors": 2})}), None)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert needs_ray(prepare, None)  # from 4 CPUs an actor pool prepares the data
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # under `ray job submit`
    assert needs_ray(prepare, None)


def test_the_embedding_jobs_vocab_expansion_runs_before_ray_starts(monkeypatch):
    from korch.train.job import needs_ray

    job = load_job(Path(__file__).resolve().parents[2] / "jobs" / "embedding_expansion.yaml")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert [needs_ray(stage, None) for stage in job.stages] == [False, True, True, True]


def test_a_data_only_job_on_a_laptop_never_starts_ray(tmp_path, monkeypatch):
    import ray

    from korch.train.job import run_job

    corpus = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "corpus"
    path = tmp_path / "job.yaml"
    path.write_text(f"name: prep\nstages:\n  - {{name: prepare, task: data_prepare, tokenizer: {{vocab_size: 300}}, "
                    f"data: {{inputs: [{corpus}], seq_len: 32, min_doc_chars: 0}}}}\n")

    def refuse(**_):
        raise AssertionError("ray.init was called")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever Ray other tests left up
    monkeypatch.setattr(ray, "init", refuse)
    summaries = run_job(load_job(path), str(tmp_path / "runs"))
    assert summaries["prepare"]["docs_out"] > 0
    assert (tmp_path / "runs" / "prep" / "prepare" / "data" / "manifest.json").exists()
