"""The embedding pipeline as a user runs it, tiny: `korch run` of vocab_expand -> a 2-worker hierarchical adapter
on ../shared/data (one Ray run: the adapter task is the simcse task on a frozen base, so this one stage trains
with KorNLI hard negatives gathered across both workers), guarded so that it must regress: the job stops with
one line and exit 1, the stage is `regressed` in eval.json and events.jsonl, nothing is promoted, and the
comparison table lists both stages. The adapter's merged final/ loads in sentence-transformers with the
embeddings `korch eval embed` computes, IDF-weighted pooling included. (The simcse and bottleneck stages ran in
the README's CPU run; their parts are tested in-process in tests/embed.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from korch_runs import REPO, korch, read_jsonl

DATA = (REPO / ".." / "shared" / "data").resolve()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (DATA / "kornli").is_dir(), reason="../shared/data is absent")]


def _job(path: Path) -> Path:
    sts = {"pairs": str(DATA / "korsts" / "sts-dev.tsv"), "limit": 200}
    nli = [str(DATA / "kornli" / "xnli.dev.ko.tsv")]
    workers = {"num_workers": 2, "cpus_per_worker": 0.5}
    train = {"max_steps": 4, "micro_batch_size": 16, "lr": 1.0e-3, "log_every_steps": 2}
    stages = [
        {"name": "expand", "task": "vocab_expand", "tokenizer": {"vocab_size": 1500, "max_docs": 60},
         "model": {"overrides": {"hidden_size": 32, "intermediate_size": 64}},
         "data": {"inputs": [str(DATA / "kowiki_sample")], "max_docs": 30, "seq_len": 32, "split_sentences": False},
         "vocab_expand": {"max_new_tokens": 100, "min_count": 2, "pooling": "idf"}, "eval": {"embed": sts}},
        {"name": "hier", "task": "adapter", "needs": "expand", "data": {"inputs": nli, "seq_len": 32},
         "adapter": {"kind": "hierarchical", "r": 8, "language_r": 4, "mode": "supervised", "pooling": "idf",
                     "max_rows": 96}, "train": train,
         # A gain of 5 in cosine gap is impossible: the guard has to stop this stage.
         "eval": {"embed": sts, "guard": {"metric": "gap", "min_delta": 5.0, "on_regression": "fail"}},
         "distributed": workers},
    ]
    path.write_text(yaml.safe_dump({"name": "embed", "stages": stages}, allow_unicode=True, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    done = korch("run", str(_job(root / "embed.yaml")), "--runs-dir", str(root),
                 env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}, timeout=900)
    return root / "embed", done


def test_the_guard_stops_a_regressing_stage_with_one_line(pipeline):
    job_dir, done = pipeline
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    # One line from korch (Ray's own actors may log more on their way down).
    lines = [line for line in done.stderr.splitlines() if line.startswith("korch:")]
    assert len(lines) == 1 and lines[0].startswith("korch: stage hier regressed: gap ") and "keep_parent" in lines[0]
    hier = job_dir / "hier"
    assert json.loads((hier / "eval.json").read_text())["regressed"] is True
    assert [e for e in read_jsonl(hier / "events.jsonl") if e["event"] == "regressed"][0]["parent"] == "expand"
    assert not (hier / "promoted.json").exists() and not (hier / "summary.json").exists()
    table = done.stdout[done.stdout.index("embedding stages:"):].splitlines()
    assert [row.split()[0] for row in table[2:4]] == ["expand", "hier"] and table[3].endswith("regressed")


def test_stages_chain_and_the_merged_export_matches_sentence_transformers(pipeline):
    import torch
    from sentence_transformers import SentenceTransformer

    from korch.eval.embed import encode, load_encoder, load_token_weights

    job_dir, _ = pipeline
    expand = json.loads((job_dir / "expand" / "summary.json").read_text())
    assert expand["added_pieces"] > 0 and expand["embed"]["verdict"] == "unguarded"
    final = job_dir / "hier" / "final"
    assert (final / "adapter.safetensors").exists()
    config = json.loads((final / "config.json").read_text())
    assert config["vocab_size"] == expand["vocab_size"] and config["architectures"] == ["BertModel"]
    texts = ["비행기가 이륙하고 있다.", "한 남자가 큰 플루트를 연주하고 있다."]
    model, tokenizer, pooling, max_length = load_encoder(str(final))
    assert pooling == "idf"  # IDF weights of the stage's own training sentences, as a WordWeights module
    weights = load_token_weights(str(final))
    assert len(weights) == expand["vocab_size"] and weights.min() >= 1.0 and weights.max() > 2.0
    theirs = torch.as_tensor(SentenceTransformer(str(final), device="cpu").encode(texts))
    ours = encode(model, tokenizer, texts, pooling, max_length, token_weights=weights)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
