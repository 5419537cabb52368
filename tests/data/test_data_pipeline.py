"""prepare_corpus end to end: counts add up, bad input is counted not fatal, Ray == local, idempotent."""

import collections
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from korch.data.pipeline import check_counts, check_shards, is_prepared, load_manifest, prepare_corpus
from korch.data.shards import BLOCK_SCHEMA
from korch.errors import UserError


def _add_bad_inputs(folder):
    """One of each bad-input kind, next to good documents."""
    (folder / "bad.jsonl").write_bytes(b"\n".join([
        json.dumps({"text": "좋은 기록은 남는다. 나쁜 줄만 빠진다."}, ensure_ascii=False).encode(),
        b'{"text": "truncated',                                   # invalid JSON -> invalid_json
        b'{"text": "\xff\xfe\xfd"}',                               # undecodable -> undecodable_record
        json.dumps({"text": "  \u200b "}).encode(),               # only invisible characters -> empty
        json.dumps({"text": "중복 문서입니다. 두 번 나온다."}, ensure_ascii=False).encode(),
        json.dumps({"text": "중복 문서입니다. 두 번 나온다."}, ensure_ascii=False).encode(),  # duplicate
        json.dumps({"text": "가" * 300}, ensure_ascii=False).encode(),  # over max_line_chars -> record_too_long
    ]) + b"\n")
    (folder / "bad.txt").write_bytes("살아남는 문단이다.\n".encode() + b"\xc3\x28 broken line\n" + "이 줄은 남는다.\n".encode())
    good = folder / "good.parquet"
    pq.write_table(pa.table({"content": ["파케이 문서 하나.", "파케이 문서 둘."]}), good)
    (folder / "truncated.parquet").write_bytes(good.read_bytes()[:30])


def test_prepare_counts_bad_inputs_and_adds_up(corpus_copy, tokenizer_dir, make_cfg, ray_session, tmp_path):
    _add_bad_inputs(corpus_copy)
    cfg = make_cfg(inputs=[str(corpus_copy)], seq_len=32, max_line_chars=200, validation_fraction=0.2)
    manifest = prepare_corpus(cfg, tokenizer_dir, str(tmp_path / "out"), progress=False)
    assert check_counts(manifest) == []
    assert manifest["skipped"] == {"corrupt_parquet": 1, "duplicate": 1, "empty": 1, "invalid_json": 1,
                                   "record_too_long": 1, "undecodable_line": 1, "undecodable_record": 1}
    # fixture: 4 txt + 3 jsonl + 2 wiki; added: 3 good jsonl records (1 is a duplicate), 1 txt doc, 2 parquet rows
    assert manifest["docs_out"] == 4 + 3 + 2 + 2 + 1 + 2
    assert manifest["docs_in"] == manifest["docs_out"] + 5
    assert manifest["splits"]["validation"]["rows"] > 0 and manifest["splits"]["train"]["rows"] > 0
    shard = manifest["shards"][0]
    table = pq.read_table(tmp_path / "out" / shard["path"])
    assert table.schema.equals(BLOCK_SCHEMA)
    assert table.num_rows == shard["rows"]
    for row in table.to_pylist():
        assert len(row["input_ids"]) <= 32 and row["input_ids"][0] != row["input_ids"][-1]
        assert set(row["doc_starts"]) <= set(row["sentence_starts"]) <= set(row["word_starts"])
    assert is_prepared(str(tmp_path / "out")) and load_manifest(str(tmp_path / "out")) == manifest


def test_ray_and_local_engines_write_identical_shards(corpus_dir, tokenizer_dir, make_cfg, ray_session, tmp_path):
    cfg = make_cfg(inputs=[str(corpus_dir)], seq_len=24, validation_fraction=0.3)
    by_ray = prepare_corpus(cfg, tokenizer_dir, str(tmp_path / "ray"), progress=False)
    local = prepare_corpus(cfg, tokenizer_dir, str(tmp_path / "local"), progress=False, engine="local")
    assert by_ray["shards"] == local["shards"]  # same paths, rows and sha256: order is deterministic
    assert by_ray["fingerprint"] == local["fingerprint"]


def test_prepare_is_idempotent_and_notices_changes(corpus_copy, tokenizer_dir, make_cfg, ray_session, tmp_path):
    out = str(tmp_path / "out")
    cfg = make_cfg(inputs=[str(corpus_copy)], seq_len=32)
    first = prepare_corpus(cfg, tokenizer_dir, out, progress=False, engine="local")
    stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
    assert prepare_corpus(cfg, tokenizer_dir, out, progress=False, engine="local") == first
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == stamp  # nothing redone
    changed = prepare_corpus(cfg.model_copy(update={"seq_len": 48}), tokenizer_dir, out, progress=False, engine="local")
    assert changed["fingerprint"] != first["fingerprint"] and changed["seq_len"] == 48
    (corpus_copy / "extra.txt").write_text("새 파일이 생겼다.\n")
    again = prepare_corpus(cfg, tokenizer_dir, out, progress=False, engine="local")
    assert again["docs_out"] == first["docs_out"] + 1
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_morphemes_and_max_docs(corpus_dir, tokenizer_dir, make_cfg, tmp_path):
    cfg = make_cfg(inputs=[str(corpus_dir)], seq_len=64, morphemes=True, max_docs=3)
    manifest = prepare_corpus(cfg, tokenizer_dir, str(tmp_path / "m"), progress=False, engine="local")
    assert manifest["docs_out"] == 3 and check_counts(manifest) == []
    plain = prepare_corpus(cfg.model_copy(update={"morphemes": False}), tokenizer_dir, str(tmp_path / "p"),
                           progress=False, engine="local")
    rows_m = pq.read_table(tmp_path / "m" / manifest["shards"][0]["path"]).to_pylist()
    rows_p = pq.read_table(tmp_path / "p" / plain["shards"][0]["path"]).to_pylist()
    assert [r["input_ids"] for r in rows_m] == [r["input_ids"] for r in rows_p]
    assert [r["word_starts"] for r in rows_m] != [r["word_starts"] for r in rows_p]  # morpheme groups differ


def test_bad_tokenizer_is_a_user_error(corpus_dir, make_cfg, tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        prepare_corpus(make_cfg(inputs=[str(corpus_dir)]), str(tmp_path), str(tmp_path / "o"), engine="local")


class _ChokingKiwi:
    """A Kiwi that raises on any call whose paragraphs mention 김치 (a batch holding that document fails whole)."""

    def __init__(self, kiwi):
        self.kiwi = kiwi

    def split_into_sents(self, paragraphs, **kwargs):
        paragraphs = list(paragraphs)
        if any("김치" in p for p in paragraphs):
            raise RuntimeError("kiwi")
        return self.kiwi.split_into_sents(paragraphs, **kwargs)


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "per-document"])
def test_a_document_kiwi_fails_on_and_a_vanished_file_are_counted(corpus_copy, tokenizer_dir, make_cfg, tmp_path, batch):
    import collections

    from korch.data.preprocess import DocumentProcessor
    from korch.data.readers import Chunk

    cfg = make_cfg(inputs=[str(corpus_copy)], seq_len=32)
    processor = DocumentProcessor(cfg, tokenizer_dir, batch=batch)
    processor.kiwi = _ChokingKiwi(processor.kiwi)
    chunks = [Chunk(str(corpus_copy / "wiki_00"), "wiki", 0, 607), Chunk(str(tmp_path / "gone.txt"), "txt", 0, 10)]
    table = processor.process_chunks(chunks)
    skips = {r: c for r, c in zip(table.column("skip").to_pylist(), table.column("count").to_pylist()) if r}
    assert skips == {"preprocess_error": 1, "unreadable_chunk": 1}
    assert collections.Counter(table.column("skip").to_pylist())[""] == 1  # the other wiki document survives


def test_one_kiwi_stream_gives_the_tables_of_chunk_by_chunk_calls(corpus_copy, tokenizer_dir, make_cfg, tmp_path):
    import pyarrow as pa

    from korch.data.preprocess import OUTPUT_SCHEMA, DocumentProcessor
    from korch.data.readers import Chunk, expand_inputs, plan_chunks

    _add_bad_inputs(corpus_copy)
    for morphemes in (False, True):
        cfg = make_cfg(inputs=[str(corpus_copy)], seq_len=32, max_line_chars=200, morphemes=morphemes)
        chunks = plan_chunks(expand_inputs(cfg.inputs, cfg.format), 64, collections.Counter())
        chunks.append(Chunk(str(tmp_path / "gone.txt"), "txt", 0, 10))  # vanished mid-run: counted in its own table
        assert len(chunks) > 5
        processor = DocumentProcessor(cfg, tokenizer_dir, kiwi_threads=2)
        streamed = [pa.table(cols, schema=OUTPUT_SCHEMA) for cols in processor.stream_columns(chunks)]
        assert streamed == [processor.process_chunks([chunk]) for chunk in chunks]


def test_a_failing_kiwi_stream_falls_back_to_chunks_then_documents(corpus_copy, tokenizer_dir, make_cfg):
    import pyarrow as pa

    from korch.data.preprocess import OUTPUT_SCHEMA, DocumentProcessor
    from korch.data.readers import expand_inputs, plan_chunks

    cfg = make_cfg(inputs=[str(corpus_copy)], seq_len=32)
    chunks = plan_chunks(expand_inputs(cfg.inputs, cfg.format), 64, collections.Counter())
    processor = DocumentProcessor(cfg, tokenizer_dir)
    expected = [processor.process_chunks([chunk]) for chunk in chunks]
    processor.kiwi = _ChokingKiwi(processor.kiwi)
    streamed = [pa.table(cols, schema=OUTPUT_SCHEMA) for cols in processor.stream_columns(chunks)]
    skips = collections.Counter()
    for table in streamed:
        for reason, count in zip(table.column("skip").to_pylist(), table.column("count").to_pylist()):
            skips[reason] += count if reason else 0
    assert dict(+skips) == {"preprocess_error": 1}  # only the 김치 document is lost
    kept = [row for t in streamed for row in t.to_pylist() if not row["skip"]]
    assert len(kept) == sum(1 for t in expected for row in t.to_pylist() if not row["skip"]) - 1


def test_a_small_machine_prepares_in_the_driver_without_ray(corpus_dir, tokenizer_dir, make_cfg, monkeypatch,
                                                            tmp_path):
    from korch.data import pipeline

    def no_ray(cfg):
        raise AssertionError("the driver-only path must not start or use Ray")

    monkeypatch.setattr(pipeline, "pipeline_kiwi_threads", lambda cfg: 2)
    monkeypatch.setattr(pipeline, "ensure_ray_for_pool", no_ray)
    monkeypatch.setattr(pipeline, "_ray_tables", no_ray)
    cfg = make_cfg(inputs=[str(corpus_dir)], seq_len=24, validation_fraction=0.3)
    inline = prepare_corpus(cfg, tokenizer_dir, str(tmp_path / "inline"), progress=False)
    local = prepare_corpus(cfg, tokenizer_dir, str(tmp_path / "local"), progress=False, engine="local")
    assert inline["shards"] == local["shards"] and check_counts(inline) == []


def test_progress_separates_startup_from_steady_rate():
    from korch.data.pipeline import Progress

    meter = Progress(False)
    assert meter.steady_rate() is None
    meter.start -= 10.0  # pretend 10 s passed before the first documents arrived
    meter.update(5, 5, 1)
    assert 9.9 < meter.first < 11 and meter.first_docs == 5
    meter.update(5, 5, 1)
    assert meter.steady_rate() is None  # no documents since start-up


@pytest.mark.parametrize("morphemes", [False, True], ids=["sentences", "morphemes"])
def test_batched_kiwi_calls_give_the_per_document_output(corpus_dir, tokenizer_dir, make_cfg, morphemes):
    """One split_into_sents call per chunk (the actors' path) and one per document (the plain loop) agree row for
    row: Kiwi analyses every paragraph on its own either way."""
    import collections

    from korch.data.preprocess import DocumentProcessor
    from korch.data.readers import expand_inputs, plan_chunks

    cfg = make_cfg(inputs=[str(corpus_dir)], seq_len=24, morphemes=morphemes)
    chunks = plan_chunks(expand_inputs(cfg.inputs, cfg.format), 4096, collections.Counter())
    batched = DocumentProcessor(cfg, tokenizer_dir, batch=True).process_chunks(chunks)
    per_document = DocumentProcessor(cfg, tokenizer_dir, batch=False).process_chunks(chunks)
    assert batched.num_rows > 5 and batched.equals(per_document)


def test_a_missing_truncated_or_short_shard_is_one_line_before_training(corpus_dir, tokenizer_dir, make_cfg, tmp_path):
    # A deleted shard used to fail every training worker, be retried as worker failures, then advise a resume.
    out = tmp_path / "out"
    manifest = prepare_corpus(make_cfg(inputs=[str(corpus_dir)], seq_len=32, split_sentences=False), tokenizer_dir,
                              str(out), progress=False, engine="local")
    check_shards(manifest, str(out))  # as written: fine
    shard = out / manifest["shards"][0]["path"]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"not a readable parquet shard .*; prepare .* again"):
        check_shards(manifest, str(out))
    shard.unlink()
    with pytest.raises(UserError, match=r"a shard that .*manifest.json lists is missing"):
        check_shards(manifest, str(out))
    shard.write_bytes(whole)
    short = {**manifest, "shards": [{**manifest["shards"][0], "rows": manifest["shards"][0]["rows"] + 1}]}
    with pytest.raises(UserError, match=r"holds \d+ rows where manifest.json says"):
        check_shards(short, str(out))


def test_stopping_a_kiwi_stream_early_ends_its_thread_and_its_reading(corpus_copy, tokenizer_dir, make_cfg):
    import threading

    from korch.data.preprocess import DocumentProcessor
    from korch.data.readers import expand_inputs, plan_chunks

    cfg = make_cfg(inputs=[str(corpus_copy)], seq_len=32)
    chunks = plan_chunks(expand_inputs(cfg.inputs, cfg.format), 64, collections.Counter()) * 30
    pulled = []

    def counted():
        for chunk in chunks:
            pulled.append(chunk)
            yield chunk

    stream = DocumentProcessor(cfg, tokenizer_dir, kiwi_threads=2).stream_columns(counted())
    next(stream)  # what `max_docs` does: take what is needed, then close
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "korch-kiwi"]
    # Kiwi reads ~16 paragraphs per thread ahead and the thread hands over 2 chunks ahead: a few chunks, not all
    assert len(pulled) < len(chunks) / 2


def test_an_error_after_kiwi_reaches_the_caller_instead_of_a_silent_redo(corpus_copy, tokenizer_dir, make_cfg):
    import threading

    from korch.data.preprocess import DocumentProcessor
    from korch.data.readers import expand_inputs, plan_chunks

    cfg = make_cfg(inputs=[str(corpus_copy)], seq_len=32)
    chunks = plan_chunks(expand_inputs(cfg.inputs, cfg.format), 64, collections.Counter())
    processor = DocumentProcessor(cfg, tokenizer_dir, kiwi_threads=2)
    encode, calls = processor._encode, []

    def failing_second_encode(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("wordpiece broke")
        return encode(*args)

    processor._encode = failing_second_encode
    stream = processor.stream_columns(chunks)
    next(stream)
    # The Kiwi thread had already handed over later chunks: redoing from `read` would have skipped them unseen.
    with pytest.raises(RuntimeError, match="wordpiece broke"):
        next(stream)
    assert not [t for t in threading.enumerate() if t.name == "korch-kiwi"]
