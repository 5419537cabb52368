"""The classify family end to end, as a user runs it: `korch run jobs/nsmc_tiny.yaml` on a local 2-worker Ray
with DeepSpeed ZeRO-2, `korch predict` on its model against transformers' own pipeline, and a worker failure
that resumes to exactly the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))  # the unpickling guard's helpers live beside the train tests
from korch_runs import guard_env, guard_report  # noqa: E402

NSMC = REPO.parent / "shared" / "data" / "nsmc" / "ratings_train.head5000.txt"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not NSMC.is_file(), reason="../shared/data is not available")]


def korch(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "korch.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def nsmc_tiny(tmp_path_factory) -> tuple[Path, float]:
    runs = tmp_path_factory.mktemp("runs")
    began = time.time()
    done = korch("run", "jobs/nsmc_tiny.yaml", "--runs-dir", str(runs))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return runs / "nsmc-tiny" / "classify", time.time() - began


def test_nsmc_tiny_trains_evaluates_each_epoch_and_keeps_the_best(nsmc_tiny):
    import torch
    from safetensors.torch import load_file

    stage, seconds = nsmc_tiny
    metrics = read_jsonl(stage / "metrics.jsonl")
    evaluations = [m for m in metrics if "val_macro_f1" in m]
    assert len(evaluations) == 3  # one per epoch
    assert all({"val_loss", "val_accuracy", "val_per_class_f1"} <= set(m) for m in evaluations)
    assert set(evaluations[-1]["val_per_class_f1"]) == {"negative", "positive"}
    evaluation = json.loads((stage / "eval.json").read_text())
    assert evaluation["rows"] == 500  # the 10% stratified split, each row counted once across 2 ranks
    assert evaluation["best"]["value"] == max(m["val_macro_f1"] for m in evaluations)
    assert evaluation["accuracy"] > 0.6, evaluation  # well above chance on balanced NSMC, even for a tiny model
    events = [e["event"] for e in read_jsonl(stage / "events.jsonl")]
    assert "best" in events and events[-1] == "finish"
    manifest = json.loads((stage / "data" / "manifest.json").read_text())
    assert manifest["labels"] == ["negative", "positive"] and manifest["splits"]["validation"]["rows"] == 500
    for folder in ("final", "best", "swa"):
        config = json.loads((stage / folder / "config.json").read_text())
        assert config["id2label"] == {"0": "negative", "1": "positive"}
    # swa/ is the equal mean of the last two epoch ends' weights, which checkpoint-<step>/ folders also hold.
    assert evaluation["swa"]["epochs"] == [2, 3] and evaluation["swa"]["rows"] == 500
    steps = sorted(int(p.name.split("-")[1]) for p in stage.glob("checkpoint-*"))
    assert len(steps) == 3, steps
    swa, second, third = (load_file(str(stage / folder / "model.safetensors"))
                          for folder in ("swa", f"checkpoint-{steps[1]}", f"checkpoint-{steps[2]}"))
    assert swa.keys() == second.keys()
    for name, value in swa.items():
        torch.testing.assert_close(value, (second[name] + third[name]) / 2, atol=1e-6, rtol=0)
    print(f"nsmc_tiny: {seconds:.0f} s, eval {evaluation}")


def test_predict_agrees_with_the_transformers_pipeline(nsmc_tiny, tmp_path):
    import korch as _registers_auto_classes  # noqa: F401  (mean pooling: the Auto classes learn korch's class)
    from transformers import pipeline

    stage, _ = nsmc_tiny
    rows = [line.split("\t") for line in NSMC.read_text(encoding="utf-8").splitlines()[:101]]
    rows[5][1] = ""  # an empty review still gets a prediction
    rows[9][1] = " ".join([rows[9][1]] * 40)  # longer than the model's positions: truncated, not an error
    source = tmp_path / "reviews.tsv"
    source.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    done = korch("predict", "--model", str(stage / "final"), "--input", str(source), "--output", str(out),
                 "--workers", "2", "--batch-size", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = read_jsonl(out)
    assert [p["id"] for p in predictions] == [r[0] for r in rows[1:]]  # one per row, in input order

    reference = pipeline("text-classification", model=str(stage / "final"), top_k=None, device="cpu")
    expected = reference([r[1] for r in rows[1:]], truncation=True)  # the folder's tokenizer caps at seq_len
    for prediction, ref in zip(predictions, expected):
        probabilities = {item["label"]: item["score"] for item in ref}
        assert prediction["label"] == max(probabilities, key=probabilities.get)
        for name, score in probabilities.items():
            assert prediction["probabilities"][name] == pytest.approx(score, abs=1e-5)


def test_a_worker_failure_resumes_to_the_uninterrupted_run(nsmc_tiny, tmp_path):
    """The same job, but rank 1 dies at step 165 (in epoch 3): it resumes from the step-160 checkpoint, and every
    logged loss, every epoch's evaluation, the best epoch and the final, best and SWA weights (whose window of
    epochs 1-2 came back from the checkpoint) equal the uninterrupted run's."""
    import torch
    from safetensors.torch import load_file

    clean_stage, _ = nsmc_tiny
    faulty = korch("run", "jobs/nsmc_tiny.yaml", "--runs-dir", str(tmp_path),
                   env={"KORCH_FAIL_AT_STEP": "165", **guard_env(tmp_path, tmp_path / "guard.jsonl")})
    faulty_stage = tmp_path / "nsmc-tiny" / "classify"
    assert faulty.returncode == 0, faulty.stderr[-3000:] + _what_happened(faulty_stage)
    # The Ray-restart resume read its checkpoint from the run folder, and nothing there was ever unpickled: the
    # guard ran in the driver and in both workers of both attempts.
    refused, patched = guard_report(tmp_path / "guard.jsonl")
    assert refused == [] and patched >= 5, (refused, patched)
    events = read_jsonl(faulty_stage / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "failure"] == [165]
    resumes = [e for e in events if e["event"] == "resume"]
    assert [(e["from_step"], e["attempt"]) for e in resumes] == [(160, 2)]

    def by_step(stage_dir):
        rows = {}
        for row in read_jsonl(stage_dir / "metrics.jsonl"):
            rows[(row["step"], "val_loss" in row)] = row  # the resumed run logs steps 21-25 again: the last wins
        return rows

    clean_rows, faulty_rows = by_step(clean_stage), by_step(faulty_stage)
    assert clean_rows.keys() == faulty_rows.keys()
    for key, row in clean_rows.items():
        for name in ("loss", "lr", "val_loss", "val_accuracy", "val_macro_f1"):
            if name in row:
                assert faulty_rows[key][name] == pytest.approx(row[name], abs=1e-6), (key, name)
    clean_eval, faulty_eval = (json.loads((d / "eval.json").read_text()) for d in (clean_stage, faulty_stage))
    assert faulty_eval["best"]["best_step"] == clean_eval["best"]["best_step"]
    assert faulty_eval["best"]["value"] == pytest.approx(clean_eval["best"]["value"], abs=1e-6)
    assert faulty_eval["swa"]["accuracy"] == pytest.approx(clean_eval["swa"]["accuracy"], abs=1e-6)
    for folder in ("final", "best", "swa"):
        clean_weights = load_file(str(clean_stage / folder / "model.safetensors"))
        faulty_weights = load_file(str(faulty_stage / folder / "model.safetensors"))
        assert clean_weights.keys() == faulty_weights.keys()
        for name, tensor in clean_weights.items():
            torch.testing.assert_close(faulty_weights[name], tensor, atol=1e-6, rtol=0)


def _what_happened(stage: Path) -> str:
    """For a failed fault test: the run's events other than checkpoints, and every rank's error of the last
    failure (the one line on stderr names only the first)."""
    events = [e for e in read_jsonl(stage / "events.jsonl") if e["event"] != "checkpoint"] \
        if (stage / "events.jsonl").exists() else []
    failure = (stage / "failure.txt").read_text()[-6000:] if (stage / "failure.txt").exists() else "(no failure.txt)"
    return "\n--- events ---\n" + "\n".join(map(json.dumps, events)) + "\n--- failure.txt ---\n" + failure
