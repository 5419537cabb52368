"""The regression guard on stage folders (no Ray: a stage's final/ is scored as `korch run` would), and the
vocabulary expansion's pure parts."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from toy_tokenizer import toy_tokenizer
from transformers import BertConfig

from korch.config import JobConfig
from korch.errors import StageFailed
from korch.eval.guard import evaluate_and_guard, promoted_final
from korch.models.encoder import encoder_from_config
from korch.tasks.simcse import SimcseOptions, SimcseTask
from korch.config import ModelConfig
from korch.tasks.vocab_expand import expand_tokenizer_json, mean_init_rows, old_pieces, select_new_pieces
from korch.train.runner import StageContext

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "비", "##가", "온다", "고양이", "잔다", "남자", "노래", "한다"]
PAIRS = [(5.0, "비가 온다", "비가 온다"), (4.5, "고양이 잔다", "고양이 잔다"), (0.0, "남자 노래 한다", "비가 온다"),
         (0.5, "고양이 잔다", "남자 노래 한다")]


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer(VOCAB)


def _stage_with_final(job_dir: Path, name: str, tokenizer, seed: int) -> Path:
    torch.manual_seed(seed)
    net = encoder_from_config(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    final = job_dir / name / "final"
    final.mkdir(parents=True)
    SimcseTask(SimcseOptions(pooling="mean"), ModelConfig(), tokenizer, 16, {}).save(net, str(final))
    return job_dir / name


def _job(pairs: Path, guard: dict) -> JobConfig:
    stage = {"task": "simcse", "data": {"inputs": [str(pairs)]}, "train": {"max_steps": 1},
             "eval": {"embed": {"pairs": str(pairs)}, "guard": guard}}
    return JobConfig.model_validate({"name": "g", "stages": [{**stage, "name": "parent", "eval": {"embed": {"pairs": str(pairs)}}},
                                                            {**stage, "name": "child", "needs": "parent"}]})


@pytest.mark.parametrize("on_regression", ["fail", "keep_parent"])
def test_guard_stops_a_stage_whose_gap_falls_below_its_parents(tmp_path, tokenizer, on_regression):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("score\tsentence1\tsentence2\n" + "".join(f"{s}\t{a}\t{b}\n" for s, a, b in PAIRS))
    job = _job(pairs, {"metric": "gap", "min_delta": 0.0, "on_regression": on_regression})
    parent_dir = _stage_with_final(tmp_path, "parent", tokenizer, seed=0)
    evaluate_and_guard(job.stage("parent"), StageContext(stage_dir=parent_dir), {})
    parent = json.loads((parent_dir / "eval.json").read_text())
    assert parent["verdict"] == "unguarded" and promoted_final(parent_dir) == str(parent_dir / "final")
    child_dir = _stage_with_final(tmp_path, "child", tokenizer, seed=1)
    # A child that must beat its parent's gap by 10 (impossible: cosine gaps are at most 2) regresses.
    child = job.stage("child").model_copy(update={"eval": job.stage("child").eval.model_copy(
        update={"guard": job.stage("child").eval.guard.model_copy(update={"min_delta": 10.0})})})
    ctx = StageContext(stage_dir=child_dir, needs={"parent": parent_dir})
    if on_regression == "fail":
        with pytest.raises(StageFailed, match=r"stage child regressed: gap .* < parent's .* not promoted"):
            evaluate_and_guard(child, ctx, {})
        assert not (child_dir / "promoted.json").exists()
    else:
        summary = evaluate_and_guard(child, ctx, {})
        assert summary["embed"]["verdict"] == "regressed"
        assert promoted_final(child_dir) == str(parent_dir / "final")  # the next stage starts from the parent
    evaluation = json.loads((child_dir / "eval.json").read_text())
    assert evaluation["regressed"] is True and evaluation["parent_value"] == parent["gap"]
    events = [json.loads(line) for line in (child_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["regressed"] and events[0]["parent"] == "parent"


def test_guard_needs_an_embedding_evaluation():
    with pytest.raises(ValueError, match="eval.guard compares eval.embed scores"):
        JobConfig.model_validate({"name": "g", "stages": [{"name": "s", "task": "simcse", "train": {"max_steps": 1},
                                  "data": {"inputs": ["."]}, "eval": {"guard": {"metric": "gap"}}}]})


def test_new_pieces_are_frequent_unknown_and_long_enough():
    counts = collections.Counter({"학생": 9, "##들": 9, "##에서": 7, "한국": 3, "비": 20, "고양이": 8})
    vocab = {"고양이": 5}
    assert select_new_pieces(counts, vocab, max_new=10, min_count=5, min_chars=2) == ["학생", "##에서"]
    assert select_new_pieces(counts, vocab, max_new=1, min_count=1, min_chars=1) == ["비"]


def test_new_rows_are_the_mean_of_the_old_pieces(tokenizer):
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    wordpiece = tokenizer.backend_tokenizer.model
    assert old_pieces("비가", vocab, wordpiece) == [vocab["비"], vocab["##가"]]
    weight = torch.arange(len(VOCAB) * 2, dtype=torch.float).view(-1, 2)
    rows = mean_init_rows(weight, [[5, 6], [1]], unk_id=1)
    torch.testing.assert_close(rows[0], (weight[5] + weight[6]) / 2)
    torch.testing.assert_close(rows[1], weight.mean(0))  # unknown-only: the mean of all rows
    expanded = expand_tokenizer_json(backend, ["비가", "##온다"])
    assert expanded["model"]["vocab"]["비가"] == len(VOCAB) and expanded["model"]["vocab"]["##온다"] == len(VOCAB) + 1
    assert "비가" not in vocab  # the input is not changed
