"""End to end, as a user runs it: `korch run jobs/quickstart.yaml` on a local 2-worker Ray with DeepSpeed ZeRO-2.

One full quickstart run is shared by the module; the fault, interrupt, ZeRO-3 and worker-count tests reuse its
prepared data and tokenizer with fewer steps, so each costs well under a minute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def korch(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "korch.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    done = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(runs), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return runs / "quickstart" / "mlm"


def small(stage_dir: Path, steps: int, *extra: str) -> list[str]:
    """Overrides that reuse the quickstart's prepared data and tokenizer for a short run."""
    return ["--set", f"stages.mlm.train.max_steps={steps}", "--set", f"stages.mlm.data.inputs=[{stage_dir / 'data'}]",
            "--set", f"stages.mlm.tokenizer.path={stage_dir / 'tokenizer'}", *extra]


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

    events = [e["event"] for e in read_jsonl(quickstart / "events.jsonl")]
    assert events[0] == "start" and events[-1] == "finish" and "checkpoint" in events
    assert all({"event", "step", "attempt", "time"} <= set(e) for e in read_jsonl(quickstart / "events.jsonl"))
    evaluation = json.loads((quickstart / "eval.json").read_text())
    assert evaluation["masked_tokens"] > 0 and 0 <= evaluation["mlm_accuracy"] <= 1
    assert (quickstart / "job.yaml").exists()


def test_rerun_skips_a_finished_stage(quickstart):
    again = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(quickstart.parent.parent))
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_jsonl(quickstart / "events.jsonl")[-1]["event"] == "skip"


def test_worker_failure_recovers_to_the_same_loss(quickstart, tmp_path):
    clean = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(tmp_path / "clean"), *small(quickstart, 30))
    assert clean.returncode == 0, clean.stderr[-3000:]
    faulty = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(tmp_path / "faulty"), *small(quickstart, 30),
                   env={"KORCH_FAIL_AT_STEP": "15"})
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    stage = tmp_path / "faulty" / "quickstart" / "mlm"
    events = read_jsonl(stage / "events.jsonl")
    failure = next(e for e in events if e["event"] == "failure")
    resume = next(e for e in events if e["event"] == "resume")
    assert failure["rank"] == 1 and failure["step"] == 15
    assert resume["from_step"] <= 15 and resume["attempt"] == 2
    clean_metrics = read_jsonl(tmp_path / "clean" / "quickstart" / "mlm" / "metrics.jsonl")
    faulty_metrics = read_jsonl(stage / "metrics.jsonl")
    assert faulty_metrics[-1]["step"] == clean_metrics[-1]["step"] == 30
    assert abs(faulty_metrics[-1]["loss"] - clean_metrics[-1]["loss"]) < 1e-3


def test_sigterm_then_rerun_continues_the_global_step(quickstart, tmp_path):
    runs = tmp_path / "runs"
    stage = runs / "quickstart" / "mlm"
    process = subprocess.Popen([sys.executable, "-m", "korch.cli", "run", "jobs/quickstart.yaml", "--runs-dir", str(runs),
                                *small(quickstart, 60)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        events = read_jsonl(stage / "events.jsonl") if (stage / "events.jsonl").exists() else []
        if any(e["event"] == "checkpoint" and e["step"] >= 20 for e in events):
            break
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    checkpointed = max(e["step"] for e in read_jsonl(stage / "events.jsonl") if e["event"] == "checkpoint")
    assert 20 <= checkpointed < 60
    again = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(runs), *small(quickstart, 60))
    assert again.returncode == 0, again.stderr[-3000:]
    events = read_jsonl(stage / "events.jsonl")
    resume = [e for e in events if e["event"] == "resume"][-1]
    assert resume["from_step"] >= checkpointed
    metrics = read_jsonl(stage / "metrics.jsonl")
    assert metrics[-1]["step"] == 60


def test_zero3_export_matches_in_memory_logits(quickstart, tmp_path):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    done = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(tmp_path),
                 *small(quickstart, 10, "--set", "stages.mlm.distributed.deepspeed.zero_stage=3"))
    assert done.returncode == 0, done.stderr[-3000:]
    stage = tmp_path / "quickstart" / "mlm"
    in_memory = torch.tensor(json.loads((stage / "summary.json").read_text())["probe_logits"])
    model = AutoModelForMaskedLM.from_pretrained(stage / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(stage / "final")
    encoded = tokenizer("한국어 문장으로 모델을 확인합니다.", return_tensors="pt")
    with torch.no_grad():
        exported = model(**encoded).logits[0, :, :8].flatten()
    torch.testing.assert_close(exported, in_memory, rtol=1e-4, atol=1e-4)


def test_resume_on_a_different_worker_count(quickstart, tmp_path):
    """2 workers -> 1 (from the quickstart's stage folder: its newest checkpoint) -> 2 again."""
    one = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(tmp_path / "one"), "--from-checkpoint", str(quickstart),
                *small(quickstart, 205, "--set", "stages.mlm.distributed.num_workers=1"))
    assert one.returncode == 0, one.stderr[-3000:]
    one_stage = tmp_path / "one" / "quickstart" / "mlm"
    assert next(e for e in read_jsonl(one_stage / "events.jsonl") if e["event"] == "resume")["from_step"] == 200
    assert read_jsonl(one_stage / "metrics.jsonl")[-1]["step"] == 205

    two = korch("run", "jobs/quickstart.yaml", "--runs-dir", str(tmp_path / "two"), "--from-checkpoint", str(one_stage),
                *small(quickstart, 210))
    assert two.returncode == 0, two.stderr[-3000:]
    two_stage = tmp_path / "two" / "quickstart" / "mlm"
    assert next(e for e in read_jsonl(two_stage / "events.jsonl") if e["event"] == "resume")["from_step"] == 205
    assert read_jsonl(two_stage / "metrics.jsonl")[-1]["step"] == 210
