"""Labelled datasets: reading TSV/CSV/JSONL/parquet, label maps and bins, the stratified split, skip counts,
error messages, and one Ray Data tokenisation run (deterministic shards, manifest counts)."""

import collections
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from korch.config import DataConfig
from korch.data.labelled import (LABELLED_SCHEMA, LabelMap, build_splits, infer_labels, iter_labelled_texts,
                                 prepare_labelled, stratified_split)
from korch.data.records import read_records
from korch.errors import UserError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
NSMC = SHARED / "nsmc" / "ratings_train.head5000.txt"
HATE = SHARED / "korean_hate_speech" / "labeled"
SOYNLP = SHARED / "soynlp_movie_ratings" / "134963.txt"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not available")


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# --- reading ------------------------------------------------------------------------------------------------

def test_tsv_keeps_literal_quotes(tmp_path):
    # Quoting is off: an unbalanced `"` must neither swallow the tab nor the next line.
    path = _write(tmp_path / "q.tsv", ["text\tlabel", '"따옴표로 시작\t1', 'a "quoted" word\t0', '끝"\t1'])
    rf = read_records(path)
    assert rf.fmt == "tsv" and rf.columns == ["text", "label"]
    assert [r["text"] for _, r in rf.records] == ['"따옴표로 시작', 'a "quoted" word', '끝"']
    assert [i for i, _ in rf.records] == [0, 1, 2]


def test_csv_and_jsonl_and_parquet_read_the_same_rows(tmp_path):
    rows = [{"text": "좋다, 정말", "label": "pos"}, {"text": "별로", "label": "neg"}]
    csv_path = _write(tmp_path / "a.csv", ["text,label", '"좋다, 정말",pos', "별로,neg"])
    jsonl_path = _write(tmp_path / "a.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for path in (csv_path, jsonl_path, str(tmp_path / "a.parquet")):
        rf = read_records(path)
        assert [r for _, r in rf.records] == rows, path


@needs_shared
def test_real_nsmc_has_a_header():
    rf = read_records(str(NSMC))
    assert rf.columns == ["id", "document", "label"] and len(rf.records) == 5000
    assert rf.records[0] == (0, {"id": "9976970", "document": "아 더빙.. 진짜 짜증나네요 목소리", "label": "0"})
    assert infer_labels(r["label"] for _, r in rf.records) == ["0", "1"]


@needs_shared
def test_real_hate_speech_train_and_dev_files():
    data = DataConfig(inputs=[str(HATE / "train.tsv")], validation_inputs=[str(HATE / "dev.tsv")],
                      text_column="comments", label_column="hate")
    splits = build_splits(data, seed=0)
    assert splits.labels.names == ["hate", "none", "offensive"]
    assert (len(splits.train), len(splits.validation), dict(splits.skipped)) == (7896, 471, {})
    assert any('"' in row.text for row in splits.train)  # literal quotes survive


@needs_shared
def test_real_soynlp_without_header_bins_ratings_into_4_classes():
    data = DataConfig(inputs=[str(SOYNLP)], columns=["text", "rating"], label_column="rating",
                      label_bins=[4, 6, 8], validation_fraction=0.0)
    splits = build_splits(data, seed=0)
    # From the dataset README's rating counts: 1-4 = 816+138+139+154, 5-6 = 319+419, 7-8 = 801+1890, 9-10 = 2746+8181.
    counts = collections.Counter(r.label for r in splits.train)
    assert splits.labels.names == ["0", "1", "2", "3"]
    assert [counts[i] for i in range(4)] == [1247, 738, 2691, 10927]
    assert splits.text_column == "text" and splits.rows_in == 15603


@needs_shared
def test_header_less_file_without_columns_names_the_fix():
    data = DataConfig(inputs=[str(SOYNLP)], label_column="rating")
    with pytest.raises(UserError, match=r"134963\.txt: data\.text_column is unset .*columns: .*data\.columns"):
        build_splits(data, seed=0)


# --- labels -------------------------------------------------------------------------------------------------

def test_label_bins_hand_checked():
    labels = LabelMap(["0", "1", "2", "3"], [4, 6, 8])
    got = [labels(v)[0] for v in [1, "4", 4.5, 6, "7", 8, 8.01, "10"]]
    assert got == [0, 0, 1, 1, 2, 2, 3, 3]
    assert labels("열") == (None, "label_not_numeric") and labels("  ") == (None, "no_label")


def test_label_inference_and_given_names():
    assert infer_labels(["10", 2, "1", 1.0, "2.5"]) == ["1", "2", "2.5", "10"]  # numerically, 1 == "1" == 1.0
    assert infer_labels(["pos", "neg", None, ""]) == ["neg", "pos"]
    numeric = LabelMap(["0", "1"])
    assert [numeric(v)[0] for v in ["1", 1, 1.0, "0"]] == [1, 1, 1, 0]
    assert numeric("7") == (None, "label_not_in_map")
    named = LabelMap(["neg", "pos"])
    assert [named(v)[0] for v in ["pos", "neg", "1", 0]] == [1, 0, 1, 0]  # integers are ids for named labels
    assert named(2) == (None, "label_not_in_map") and named("meh") == (None, "label_not_in_map")
    ratings = LabelMap([str(i) for i in range(1, 11)])
    assert ratings(0) == (None, "label_not_in_map")  # numeric names: 0 is an unknown rating, not id 0


def test_given_label_names_fix_the_ids(tmp_path):
    path = _write(tmp_path / "t.tsv", ["text\tlabel", "a\tpos", "b\tneg", "c\tpos"])
    data = DataConfig(inputs=[path], labels=["pos", "neg"], validation_fraction=0.0)
    splits = build_splits(data, seed=0)
    assert splits.labels.names == ["pos", "neg"] and [r.label for r in splits.train] == [0, 1, 0]


# --- split --------------------------------------------------------------------------------------------------

def test_stratified_split_keeps_proportions_and_is_seeded():
    labels = [0] * 100 + [1] * 50 + [2] * 20
    a = stratified_split(labels, 0.2, seed=1)
    per_class = collections.Counter(lab for lab, v in zip(labels, a) if v)
    assert per_class == {0: 20, 1: 10, 2: 4}
    assert stratified_split(labels, 0.2, seed=1) == a
    assert stratified_split(labels, 0.2, seed=2) != a
    assert stratified_split([0, 1], 0.5, seed=1) == [False, False]  # a class keeps at least one training row


def test_split_rows_are_disjoint_and_cover_the_input(tmp_path):
    lines = ["text\tlabel"] + [f"문장 {i}\t{i % 3}" for i in range(90)]
    data = DataConfig(inputs=[_write(tmp_path / "t.tsv", lines)], validation_fraction=0.3)
    s1, s2 = build_splits(data, seed=7), build_splits(data, seed=8)
    train, val = {r.row_id for r in s1.train}, {r.row_id for r in s1.validation}
    assert not train & val and train | val == set(range(90))
    assert collections.Counter(r.label for r in s1.validation) == {0: 9, 1: 9, 2: 9}
    assert [r.row_id for r in build_splits(data, seed=7).validation] == sorted(val)
    assert {r.row_id for r in s2.validation} != val


# --- bad rows and errors ------------------------------------------------------------------------------------

def test_each_bad_row_reason_is_counted(tmp_path):
    tsv = _write(tmp_path / "t.tsv", [
        "text\tlabel",
        "좋다\tpos",
        "필드가\t너무\t많다",      # bad_line
        "라벨 없음\t",             # no_label
        "모르는 라벨\tmeh",        # label_not_in_map
        "\tneg",                   # empty_text
        "",                        # blank lines are not rows
        "싫다\tneg",
    ])
    splits = build_splits(DataConfig(inputs=[tsv], labels=["neg", "pos"], validation_fraction=0.0), seed=0)
    assert dict(splits.skipped) == {"bad_line": 1, "no_label": 1, "label_not_in_map": 1, "empty_text": 1}
    assert [(r.row_id, r.label) for r in splits.train] == [(0, 1), (5, 0)]
    assert splits.rows_in == len(splits.train) + sum(splits.skipped.values())

    jsonl = _write(tmp_path / "r.jsonl", ['{"text": "좋음", "score": 9}', '{"text": "broken', '{"text": "x", "score": "ten"}',
                                          '{"text": "y"}'])
    data = DataConfig(inputs=[jsonl], label_column="score", label_bins=[5], validation_fraction=0.0)
    splits = build_splits(data, seed=0)
    assert dict(splits.skipped) == {"bad_line": 1, "label_not_numeric": 1, "no_label": 1}
    assert [r.label for r in splits.train] == [1]


def test_max_docs_caps_rows_read(tmp_path):
    path = _write(tmp_path / "t.tsv", ["text\tlabel"] + [f"t{i}\t{i % 2}" for i in range(50)])
    splits = build_splits(DataConfig(inputs=[path], max_docs=10, validation_fraction=0.0), seed=0)
    assert splits.rows_in == 10 and [r.row_id for r in splits.train] == list(range(10))


def test_missing_column_is_one_line_naming_the_field(tmp_path):
    path = _write(tmp_path / "t.tsv", ["document\tsentiment", "좋다\t1"])
    with pytest.raises(UserError) as info:
        build_splits(DataConfig(inputs=[path]), seed=0)
    message = str(info.value)
    assert "\n" not in message and "t.tsv" in message
    assert "data.label_column 'label' is not a column" in message and "'document', 'sentiment'" in message
    with pytest.raises(UserError, match="data.text_pair_column 'second' is not a column"):
        build_splits(DataConfig(inputs=[path], label_column="sentiment", text_pair_column="second"), seed=0)


def test_unreadable_file_is_a_user_error(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["a"], "label": [1]}), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[:30])
    with pytest.raises(UserError, match=r"bad\.parquet: cannot read the parquet file"):
        read_records(str(bad))
    odd = _write(tmp_path / "notes.txt", ["no tabs here"])
    with pytest.raises(UserError, match="set data.format"):
        read_records(odd)


def test_iter_labelled_texts_gives_texts_and_pairs(tmp_path):
    path = _write(tmp_path / "p.tsv", ["s1\ts2\tlabel", "전제\t가설\t0", "하나\t\t1"])
    data = DataConfig(inputs=[path], text_column="s1", text_pair_column="s2")
    assert list(iter_labelled_texts(data)) == ["전제", "가설", "하나"]


# --- tokenising ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_labelled_ray_is_deterministic(tmp_path, tokenizer_dir, ray_session, capfd):
    lines = ["premise\thypothesis\tlabel"]
    for i in range(120):
        lines.append(f"한국어 문장 {i} 은 여기에 있습니다\t가설 문장 {i % 7} 입니다\t{['entail', 'neutral', 'contra'][i % 3]}")
    lines.append("\t빈 전제\tentail")  # empty_text
    path = _write(tmp_path / "pairs.tsv", lines)
    data = DataConfig(inputs=[path], text_column="premise", text_pair_column="hypothesis", seq_len=12,
                      validation_fraction=0.25, preprocess_actors=1, actor_cpus=0.5)
    # One actor: each one imports transformers (~10 s on a busy 2-core machine); the order logic is the same.
    a = prepare_labelled(data, tokenizer_dir, str(tmp_path / "a"), seed=3)
    b = prepare_labelled(data, tokenizer_dir, str(tmp_path / "b"), seed=3, engine="local")
    local = prepare_labelled(data, tokenizer_dir, str(tmp_path / "c"), seed=3, engine="local")
    assert a["shards"] == b["shards"] == local["shards"]  # same paths, row groups and sha256
    assert a["kind"] == "labelled" and a["labels"] == ["contra", "entail", "neutral"]
    assert a["rows_in"] == 121 and a["skipped"] == {"empty_text": 1}
    assert a["splits"]["train"]["rows"] == 90 and a["splits"]["validation"]["rows"] == 30
    assert a["class_counts"]["validation"] == {"contra": 10, "entail": 10, "neutral": 10}
    assert a["text_column"] == "premise" and a["text_pair_column"] == "hypothesis"

    table = pq.read_table(tmp_path / "a" / a["shards"][0]["path"])
    assert table.schema.equals(LABELLED_SCHEMA)
    rows = table.to_pylist()
    assert all(len(r["input_ids"]) <= 12 and len(r["token_type_ids"]) == len(r["input_ids"]) for r in rows)
    assert all(1 in r["token_type_ids"] for r in rows)  # the pair is there, in segment 1
    assert sum(len(r["input_ids"]) for r in rows) == a["splits"]["train"]["tokens"]

    capfd.readouterr()
    again = prepare_labelled(data, tokenizer_dir, str(tmp_path / "a"), seed=3)
    assert again == a and "up to date" in capfd.readouterr().err
    other_seed = prepare_labelled(data, tokenizer_dir, str(tmp_path / "a"), seed=4, engine="local")
    assert other_seed["fingerprint"] != a["fingerprint"]
    assert sorted(os.listdir(tmp_path / "a")) == ["manifest.json", "train", "validation"]
