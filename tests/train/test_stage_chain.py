"""A data_prepare stage hands its shards and tokenizer to mlm stages, end to end; and what ZeRO saves.

One `korch run` of prepare -> two 2-worker mlm stages (ZeRO 2 and 3; 2 steps each). The README's
"ZeRO-1/2/3 hold 0.50x of ZeRO-0's Adam state per worker" is read from their summary.json against the full
state, which is what ZeRO-0 holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from korch_runs import REPO, korch, write_job

pytestmark = pytest.mark.slow
DATA = (REPO / ".." / "shared" / "data" / "kowiki_sample").resolve()
# ZeRO-1 partitions the optimizer state as ZeRO-2 does (its bytes were 0.49-0.51x ZeRO-0's like the others). ZeRO-0
# holds the full state, 2 fp32 moments per parameter: a ZeRO-0 stage here measured exactly 8 bytes x parameters
# (2,567,160), so the reference is computed instead of run. Both are left out to keep the suite short; their
# restores are still checked tensor by tensor in test_resume_tensors.py.
ZERO_STAGES = (2, 3)


@pytest.fixture(scope="module")
def chain(quickstart, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chain")
    # No Kiwi (split_sentences off) and 150 documents keep the prepare stage to seconds.
    prepare = {"name": "prepare", "task": "data_prepare", "tokenizer": {"path": None, "vocab_size": 2000},
               "data": {"inputs": [str(DATA)], "max_docs": 150, "split_sentences": False, "validation_fraction": 0.0}}
    mlm = [{"name": f"zero{z}", "needs": "prepare", "tokenizer": {"path": None}, "data": {"inputs": []},
            "train": {"max_steps": 2, "log_every_steps": 1}, "eval": {"every": "never"},
            "distributed": {"deepspeed": {"zero_stage": z}}} for z in ZERO_STAGES]
    job = write_job(root / "chain.yaml", quickstart, [prepare, *mlm], name="chain")
    done = korch("run", str(job), "--runs-dir", str(root), timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "chain"


def test_data_prepare_hands_its_data_and_tokenizer_to_the_mlm_stages(chain):
    prepare = chain / "prepare"
    manifest = json.loads((prepare / "data" / "manifest.json").read_text())
    assert manifest["docs_out"] > 0 and json.loads((prepare / "summary.json").read_text())["docs_out"] == manifest["docs_out"]
    tokenizer = (prepare / "tokenizer" / "tokenizer.json").read_text()
    for z in ZERO_STAGES:
        stage = chain / f"zero{z}"
        assert json.loads((stage / "summary.json").read_text())["final_step"] == 2
        # It trained on prepare's shards with prepare's tokenizer instead of making its own.
        assert not (stage / "data").exists() and not (stage / "tokenizer").exists()
        assert (stage / "final" / "tokenizer.json").read_text() == tokenizer
        vocab = json.loads((stage / "final" / "config.json").read_text())["vocab_size"]
        assert vocab == len(json.loads(tokenizer)["model"]["vocab"])


def test_zero_2_and_3_hold_half_of_zero_0s_adam_state_per_worker(chain):
    from transformers import AutoModelForMaskedLM

    held = {z: json.loads((chain / f"zero{z}" / "summary.json").read_text())["optimizer_state_bytes"] for z in ZERO_STAGES}
    model = AutoModelForMaskedLM.from_pretrained(chain / "zero2" / "final")
    full = 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # ZeRO-0: both fp32 moments, all
    # 2 workers: each holds half of every moment (padding makes it a few bytes more than exactly half).
    for z in ZERO_STAGES:
        assert 0.49 <= held[z] / full <= 0.51, (held, full)


def test_zero3_export_matches_in_memory_logits(chain):
    # final/ of the ZeRO-3 stage must give the logits the partitioned model gave in memory.
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    stage = chain / "zero3"
    in_memory = torch.tensor(json.loads((stage / "summary.json").read_text())["probe_logits"])
    model = AutoModelForMaskedLM.from_pretrained(stage / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(stage / "final")
    encoded = tokenizer("한국어 문장으로 모델을 확인합니다.", return_tensors="pt")
    with torch.no_grad():
        exported = model(**encoded).logits[0, :, :8].flatten()
    torch.testing.assert_close(exported, in_memory, rtol=1e-4, atol=1e-4)
