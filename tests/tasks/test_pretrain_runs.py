"""The coref objective end to end, as shipped but tiny: `korch run jobs/coref_mlm_1536.yaml` with CPU `--set`
lines (DeBERTa-v2 with gradient checkpointing, 2 workers, ZeRO-2) on the `korch data coref` folder the fast
tests build (built here when run alone): the loss falls, every epoch is scored by real1 and the best epoch's checkpoint is selected and exported.
The family's one real Ray + DeepSpeed run; the other objectives train in-process (test_pretrain_tasks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain_data as data

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not data.KOWIKI.is_dir(), reason="../shared/data is not available")]


def test_coref_mlm_job_trains_on_2_workers_and_selects_the_best_epoch_by_real1(tmp_path):
    stage = "stages.mlm."
    overrides = {
        "model.size": "tiny", "model.max_position_embeddings": 128, "data.seq_len": 64,
        "data.inputs": f"[{data.coref_dir()}]", "tokenizer.path": data.tokenizer_dir(),
        "distributed.num_workers": 2, "distributed.use_gpu": "false", "distributed.cpus_per_worker": 0.5,
        "distributed.deepspeed.precision": "auto", "train.epochs": 2, "train.micro_batch_size": 8,
        "train.grad_accum": 1, "train.lr": 3.0e-3, "train.warmup_steps": 5, "train.log_every_steps": 1,
        "train.checkpoint_every_steps": 1000,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{stage}{key}={value}")]
    done = subprocess.run([sys.executable, "-m", "korch.cli", "run", "jobs/coref_mlm_1536.yaml", "--runs-dir",
                           str(tmp_path), *sets], cwd=data.REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "coref-mlm-1536" / "mlm"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert min(losses[-3:]) < losses[0] - 0.3, losses
    assert all(m["memory_mb_per_token"] > 0 for m in metrics if "loss" in m)
    evaluation = json.loads((out / "eval.json").read_text())
    epochs = evaluation["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(0 <= e["real1"] <= e["real5"] <= 1 for e in epochs)
    best = max(epochs, key=lambda e: e["real1"])  # ties keep the earlier epoch, as selection does
    assert evaluation["best_checkpoint"] == best["checkpoint"] == f"checkpoint-{best['step']}"
    assert all((out / e["checkpoint"] / "config.json").exists() for e in epochs)
    assert (out / "best" / "model.safetensors").exists()
