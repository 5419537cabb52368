"""`korch data coref` and `korch eval coref` as a user runs them (in-process `main`), on a few kowiki documents."""

from __future__ import annotations

import json

import pytest

import pretrain_data as data
from korch.cli import main


def test_data_coref_prints_its_mentions_and_writes_a_prepared_folder(capsys):
    from pathlib import Path

    out = data.coref_dir()  # built once per session; this call reuses it (same settings) and prints again
    assert main(["data", "coref", str(data.KOWIKI), "--output", out, "--tokenizer", data.tokenizer_dir(),
                 *data.CLI_COREF_ARGS]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert line.startswith(f"{manifest['mentions']} mentions") and manifest["mentions"] > 0
    assert manifest["kind"] == "coref" and "most_common_mention" in manifest


def test_eval_coref_writes_real_k_lambada_and_the_baseline(tmp_path):
    from transformers import AutoModelForMaskedLM

    from korch.config import ModelConfig
    from korch.models import build_model_config

    out = data.coref_dir()
    tokenizer = data.tokenizer()
    model = AutoModelForMaskedLM.from_config(build_model_config(ModelConfig(size="tiny"), len(tokenizer), 64))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert main(["eval", "coref", "--model", str(tmp_path / "m"), "--data", out, "--limit", "20",
                 "--output", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert set(result["n"]) == {"real1", "real5", "lambada1"} and 0 < result["n"]["real1"] <= 20
    assert 0 <= result["real1"] <= result["real5"] <= 1 and result["lambada1"] is not None
    assert result["baseline_real1"] is not None


@pytest.mark.parametrize("argv,needle", [
    (["eval", "coref", "--model", "nowhere", "--data", "."], "--model nowhere: no such folder"),
    (["eval", "coref", "--model", ".", "--data", "nowhere"], "--data nowhere: no such folder"),
    (["eval", "coref", "--model", ".", "--data", ".", "--limit", "0"], "--limit 0"),
])
def test_eval_coref_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_shuffle_buffer_is_a_seeded_permutation_that_streams():
    from korch.data.coref import ShuffleBuffer

    def run(seed):
        buffer = ShuffleBuffer(4, seed)
        out, early = [], 0
        for i in range(20):
            emitted = list(buffer.add(i))
            early += len(emitted)
            out += emitted
        return out + list(buffer.drain()), early

    order, early = run(0)
    assert sorted(order) == list(range(20)) and order != list(range(20))
    assert early == 16  # at most `size` + 1 items are ever held
    assert run(0)[0] == order and run(1)[0] != order


def test_coref_blocks_are_written_in_a_mixed_document_order():
    """Training reads a row group at a time: blocks in document order would feed it the same entities for many
    steps in a row (see SHUFFLE_BUFFER)."""
    import pyarrow.parquet as pq
    from pathlib import Path

    doc_ids = []
    for shard in sorted((Path(data.coref_dir()) / "train").glob("*.parquet")):
        doc_ids += pq.read_table(shard, columns=["doc_id"]).column("doc_id").to_pylist()
    assert len(set(doc_ids)) > 2 and doc_ids != sorted(doc_ids)
