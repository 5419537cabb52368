"""`korch predict`: one row per input row in order, probabilities that match transformers' own pipeline,
and one-line exit-2 errors for a missing column or model folder."""

import contextlib
import csv
import json
from pathlib import Path

import pytest

from korch.predict import main_args

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NSMC = SHARED / "nsmc" / "ratings_train.head5000.txt"
pytestmark = pytest.mark.skipif(not NSMC.is_file(), reason="../shared/data is not available")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny BERT classifier (hidden 32, 2 layers, 2 named labels) with a WordPiece tokenizer trained on NSMC."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from korch.data.tokenizer import train_wordpiece

    lines = NSMC.read_text(encoding="utf-8").splitlines()[1:401]
    tok_dir = train_wordpiece([line.split("\t")[1] for line in lines], str(tmp_path_factory.mktemp("tok")),
                              vocab_size=600, min_frequency=1)
    out = tmp_path_factory.mktemp("model")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(out))  # safetensors (the only format in v5)
    tokenizer.save_pretrained(str(out))
    assert (out / "model.safetensors").is_file()
    return str(out)


@pytest.fixture(scope="module")
def input_tsv(tmp_path_factory) -> Path:
    """100 NSMC rows (header id/document/label); one document emptied, one made longer than the model's 64 positions."""
    lines = NSMC.read_text(encoding="utf-8").splitlines()[:101]
    rows = [line.split("\t") for line in lines]
    rows[5][1] = ""
    rows[9][1] = " ".join([rows[9][1]] * 40)
    path = tmp_path_factory.mktemp("input") / "reviews.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_predict_matches_the_transformers_pipeline(model_dir, input_tsv, tmp_path):
    from transformers import pipeline

    out = tmp_path / "pred.jsonl"
    assert main_args(["--model", model_dir, "--input", str(input_tsv), "--output", str(out),
                      "--workers", "2", "--batch-size", "16"]) == 0
    preds = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    rows = [line.split("\t") for line in input_tsv.read_text(encoding="utf-8").splitlines()[1:]]
    assert [p["id"] for p in preds] == [r[0] for r in rows]  # one per row, in input order
    for p in preds:
        assert set(p["probabilities"]) == {"negative", "positive"}
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)

    reference = pipeline("text-classification", model=model_dir, top_k=None, device="cpu")
    expected = reference([r[1] for r in rows], truncation=True, max_length=64)
    for p, ref in zip(preds, expected):
        ref_probs = {item["label"]: item["score"] for item in ref}
        assert p["label"] == max(ref_probs, key=ref_probs.get)
        for name, score in ref_probs.items():
            assert p["probabilities"][name] == pytest.approx(score, abs=1e-5)


def test_tsv_output_has_a_column_per_label(model_dir, tmp_path, monkeypatch):
    # The Ray part is stubbed here (the slow test runs it); this checks columns, ids and the atomic write.
    import numpy as np

    import korch.predict as predict_module

    def fake_run(model_dir, max_length, texts, pairs, workers, batch_size, probs, progress):
        probs[:] = np.array([[0.25, 0.75]] * len(texts))

    monkeypatch.setattr(predict_module, "_run", fake_run)
    monkeypatch.setattr(predict_module, "_local_ray", lambda workers: contextlib.nullcontext())
    src = tmp_path / "in.jsonl"
    src.write_text('{"sentence": "좋다"}\n{"sentence": ""}\n', encoding="utf-8")
    out = tmp_path / "sub" / "pred.tsv"
    assert main_args(["--model", model_dir, "--input", str(src), "--output", str(out)]) == 0
    table = list(csv.reader(out.open(encoding="utf-8"), delimiter="\t"))
    assert table == [["id", "label", "prob_negative", "prob_positive"], ["0", "positive", "0.25", "0.75"],
                     ["1", "positive", "0.25", "0.75"]]
    assert [p.name for p in out.parent.iterdir()] == ["pred.tsv"]


def test_missing_column_is_exit_2_with_one_line(model_dir, input_tsv, tmp_path, capsys):
    code = main_args(["--model", model_dir, "--input", str(input_tsv), "--output", str(tmp_path / "p.jsonl"),
                      "--text-column", "review"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--text-column 'review' is not a column" in err[0] and "'document'" in err[0]
    assert not (tmp_path / "p.jsonl").exists()


def test_missing_model_folder_is_exit_2(input_tsv, tmp_path, capsys):
    code = main_args(["--model", str(tmp_path / "nope"), "--input", str(input_tsv), "--output", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope: no such folder" in err[0]
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    assert main_args(["--model", str(tmp_path / "pickled"), "--input", str(input_tsv), "--output", "x.jsonl"]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


def test_output_that_is_the_input_file_is_exit_2_and_the_input_stays(tmp_path, capsys):
    # Before: the predictions replaced the input file (its text column gone) and exit 0.
    reviews = tmp_path / "in.tsv"
    reviews.write_text("id\tdocument\n1\t좋은 영화\n", encoding="utf-8")
    before = reviews.read_bytes()
    code = main_args(["--model", str(tmp_path / "any"), "--input", str(reviews), "--output", str(tmp_path / "." / "in.tsv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is the --input file" in err[0]
    assert reviews.read_bytes() == before
