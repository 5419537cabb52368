"""End to end, as a user runs it: `korch run jobs/quickstart.yaml` on a local 2-worker Ray with DeepSpeed ZeRO-2.

One full quickstart run is shared by the module; the fault, interrupt, ZeRO-3 and worker-count tests reuse its
prepared data and tokenizer with fewer steps, so each costs well under a minute.
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from korch_runs import PAYLOAD_MARKER, REPO, guard_env, guard_report, korch, plant_pickles, read_jsonl, small

pytestmark = pytest.mark.slow


def test_quickstart_outputs_load_and_loss_falls(quickstart):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    final = quickstart / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    model = AutoModelForMaskedLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    predictions = fill(f"대한민국의 수도는 {tokenizer.mask_token}이다.")
    assert len(predictions) == 5 and all("token_str" in p for p in predictions)

    metrics = read_jsonl(quickstart / "metrics.jsonl")
    assert {"step", "epoch", "loss", "lr", "samples_per_s"} <= set(metrics[0])
    assert metrics[-1]["step"] == 200
    assert min(m["loss"] for m in metrics[-5:]) < metrics[0]["loss"] - 1.0, [m["loss"] for m in metrics]
    from test_tracking import read_scalars  # TensorBoard's own reader gives back metrics.jsonl's losses

    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    assert [(step, pytest.approx(loss, rel=1e-6)) for step, loss in losses] == read_scalars(quickstart / "tb")["loss"]

    report = korch("report", str(quickstart.parent), "--output", str(quickstart.parent.parent / "report"))
    assert report.returncode == 0, report.stderr[-2000:]
    from korch.report import train_series

    assert train_series(metrics)["loss"] == losses  # the curve report draws is the logged one
    assert {p.name for p in (quickstart.parent.parent / "report").iterdir()} >= {"index.html", "mlm-train.png", "timeline.png"}

    events = [e["event"] for e in read_jsonl(quickstart / "events.jsonl")]
    assert events[0] == "start" and events[-1] == "finish" and "checkpoint" in events
    assert all({"event", "step", "attempt", "time"} <= set(e) for e in read_jsonl(quickstart / "events.jsonl"))
    evaluation = json.loads((quickstart / "eval.json").read_text())
    assert evaluation["masked_tokens"] > 0 and 0 <= evaluation["mlm_accuracy"] <= 1
    assert (quickstart / "job.yaml").exists()


def test_rerun_skips_a_finished_stage_unless_a_result_field_changed(quickstart):
    runs = str(quickstart.parent.parent)
    record = json.loads((quickstart / "korch.json").read_text())
    assert record["finished"] and record["output"] and record["spec"]["train.lr"] and record["git_commit"]
    again = korch("run", "jobs/quickstart.yaml", "--runs-dir", runs)
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_jsonl(quickstart / "events.jsonl")[-1]["event"] == "skip"
    logged = korch("run", "jobs/quickstart.yaml", "--runs-dir", runs, "--set", "stages.mlm.train.log_every_steps=1")
    assert logged.returncode == 0 and read_jsonl(quickstart / "events.jsonl")[-1]["event"] == "skip"
    # A changed lr re-runs the stage (tests/train/test_provenance.py runs that through run_job); --dry-run says so.
    changed = korch("run", "jobs/quickstart.yaml", "--runs-dir", runs, "--set", "stages.mlm.train.lr=1e-3", "--dry-run")
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert f"mlm: re-run (train.lr changed {record['spec']['train.lr']} → 0.001)" in changed.stdout
    status = korch("status", str(quickstart.parent))
    assert status.returncode == 0 and re.search(r"mlm\s+done\s+200\s+\w+ [0-9.]+", status.stdout), status.stdout


# Worker failure and exact resume through the loop: the classify task's fault test (tests/tasks/
# test_classify_runs.py: 2 workers, ZeRO-2, losses, every evaluation, final/best/swa weights, under the unpickling
# guard). The tensors of ZeRO 0-3 restores on 2 -> 1 -> 2 and 2 -> 6 workers: test_resume_tensors.py. The ZeRO-3
# export: test_stage_chain.py.


def test_sigterm_then_rerun_continues_the_global_step(quickstart, tmp_path):
    runs = tmp_path / "runs"
    stage = runs / "quickstart" / "mlm"
    process = subprocess.Popen([sys.executable, "-m", "korch.cli", "run", "jobs/quickstart.yaml", "--runs-dir", str(runs),
                                *small(quickstart, 40)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        events = read_jsonl(stage / "events.jsonl") if (stage / "events.jsonl").exists() else []
        if any(e["event"] == "checkpoint" and e["step"] >= 10 for e in events):
            break
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    checkpointed = max(e["step"] for e in read_jsonl(stage / "events.jsonl") if e["event"] == "checkpoint")
    assert 10 <= checkpointed < 40
    again = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(runs), *small(quickstart, 40))
    assert again.returncode == 0, again.stderr[-3000:]
    events = read_jsonl(stage / "events.jsonl")
    resume = [e for e in events if e["event"] == "resume"][-1]
    assert resume["from_step"] >= checkpointed
    metrics = read_jsonl(stage / "metrics.jsonl")
    assert metrics[-1]["step"] == 40


def _quickstart_lr(step: int, total: int) -> float:
    """jobs/quickstart.yaml's schedule: lr 2e-3, 20 warm-up steps, then linear decay to 0 at `total`."""
    if step < 20:
        return 2e-3 * (step + 1) / 20
    return 2e-3 * (1.0 - min(1.0, (step - 20) / (total - 20)))


def _checkpoint_state(stage: Path) -> dict:
    from korch.train.checkpoint import read_checkpoint
    from korch.train.runner import latest_checkpoint

    return read_checkpoint(latest_checkpoint(stage))[2]


@pytest.fixture(scope="module")
def worker_count_runs(quickstart, tmp_path_factory) -> Path:
    """2 workers -> 1 -> 2 through the CLI. The first resume reads a copy of the quickstart's newest checkpoint
    with malicious pickles planted beside it, under the unpickling guard."""
    import shutil

    from korch.train.runner import latest_checkpoint

    root = tmp_path_factory.mktemp("workers")
    planted = root / "planted" / latest_checkpoint(quickstart).name
    shutil.copytree(latest_checkpoint(quickstart), planted)
    plant_pickles(planted, root / f"{PAYLOAD_MARKER}-PWNED")
    per_step = ["--set", "stages.mlm.train.log_every_steps=1"]
    # Checkpoints at 202, 204 and 205 (2 kept): the second run must pick 205 from the stage folder.
    one = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(root / "one"), "--from-checkpoint", str(planted),
                *small(quickstart, 205, "--set", "stages.mlm.distributed.num_workers=1", *per_step,
                      "--set", "stages.mlm.train.checkpoint_every_steps=2"),
                env=guard_env(root, root / "guard.jsonl"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(root / "two"), "--from-checkpoint",
                str(root / "one" / "quickstart" / "mlm"), *small(quickstart, 210, *per_step))
    assert two.returncode == 0, two.stderr[-3000:]
    return root


def test_from_checkpoint_never_unpickles_what_is_planted_beside_it(worker_count_runs):
    refused, patched = guard_report(worker_count_runs / "guard.jsonl")
    assert refused == [] and not (worker_count_runs / f"{PAYLOAD_MARKER}-PWNED").exists()
    assert patched >= 2, patched  # the driver and the training worker ran under the guard


def test_resume_on_a_different_worker_count(worker_count_runs):
    """The tensors themselves are compared in test_resume_tensors.py; here the loop must continue the global step,
    the LR schedule and Adam's step count (its bias correction) instead of restarting any of them."""
    tmp_path = worker_count_runs
    one_stage = tmp_path / "one" / "quickstart" / "mlm"
    assert next(e for e in read_jsonl(one_stage / "events.jsonl") if e["event"] == "resume")["from_step"] == 200
    metrics = read_jsonl(one_stage / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [201, 202, 203, 204, 205]
    for row in metrics:
        assert row["lr"] == pytest.approx(_quickstart_lr(row["step"], 205), abs=1e-12), row
    state = _checkpoint_state(one_stage)
    assert (state["step"], state["adam_step"], state["world_size"]) == (205, 205, 1)

    two_stage = tmp_path / "two" / "quickstart" / "mlm"
    assert next(e for e in read_jsonl(two_stage / "events.jsonl") if e["event"] == "resume")["from_step"] == 205
    metrics = read_jsonl(two_stage / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [206, 207, 208, 209, 210]
    for row in metrics:
        assert row["lr"] == pytest.approx(_quickstart_lr(row["step"], 210), abs=1e-12), row
    state = _checkpoint_state(two_stage)
    assert (state["step"], state["adam_step"], state["world_size"]) == (210, 210, 2)
