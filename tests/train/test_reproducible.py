"""The same job with the same seed gives the same run: two fresh runs of a small 2-worker ZeRO-2 job write a
byte-identical tokenizer.json, the same shards, the same losses and the same weights (CPU).

Both runs share one Ray session (start-up is most of a tiny job's cost); each trains its own tokenizer and
prepares its own data from the raw corpus, as `korch run` does in an empty runs dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _losses(stage_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row["loss"]) for row in rows]


def test_two_fresh_runs_are_identical(tmp_path, monkeypatch):
    import ray
    from safetensors.torch import load_file

    from korch.config import load_job
    from korch.train.job import init_local_ray, local_cpus_needed, run_job

    monkeypatch.chdir(REPO)  # the job's inputs are relative to the repo
    job = load_job("jobs/quickstart.yaml", [
        "stages.mlm.tokenizer.vocab_size=2000", "stages.mlm.tokenizer.max_docs=200", "stages.mlm.data.max_docs=100",
        "stages.mlm.data.preprocess_actors=1", "stages.mlm.train.max_steps=4", "stages.mlm.train.micro_batch_size=8",
        "stages.mlm.train.warmup_steps=2", "stages.mlm.train.log_every_steps=1",
        "stages.mlm.train.checkpoint_every_steps=100", "stages.mlm.eval.max_batches=1"])
    started = not ray.is_initialized()  # the suite may already hold a session (run_job then reuses it)
    if started:
        init_local_ray(local_cpus_needed(job))
    try:
        for run in ("a", "b"):
            run_job(job, str(tmp_path / run))
    finally:
        if started:
            ray.shutdown()

    stages = a, b = [tmp_path / run / "quickstart" / "mlm" for run in ("a", "b")]
    assert (a / "tokenizer" / "tokenizer.json").read_bytes() == (b / "tokenizer" / "tokenizer.json").read_bytes()
    manifests = [json.loads((d / "data" / "manifest.json").read_text()) for d in stages]
    shards = [[(s["path"], s["rows"], s["sha256"]) for s in m["shards"]] for m in manifests]
    assert shards[0] == shards[1] and shards[0]
    assert _losses(a) == _losses(b) and len(_losses(a)) == 4
    weights = [load_file(str(d / "final" / "model.safetensors")) for d in stages]
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])
