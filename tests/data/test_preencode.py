"""WordPiece ahead of Kiwi: sentence ids cut from paragraph ids equal encoding each sentence, and the helper."""

import collections
import json
import os
import random

import numpy as np
import pyarrow as pa
import pytest

from korch.data.preencode import WordPieceAhead, encode_documents, slice_document, sliceable


def _backend(tokenizer_dir):
    from korch.data.tokenizer import load_tokenizer_json

    backend = load_tokenizer_json(tokenizer_dir)
    backend.no_truncation()
    backend.no_padding()
    return backend


def _continuation(backend):
    vocab = backend.get_vocab()
    flags = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for token, idx in vocab.items():
        flags[idx] = token.startswith("##")
    return flags


def _direct(backend, text, spans):
    ids, starts = [], []
    for a, b in spans:
        piece = backend.encode(text[a:b], add_special_tokens=False).ids
        if piece:
            starts.append(len(ids))
            ids.extend(piece)
    return ids, starts


def test_korchs_wordpiece_is_sliceable_and_other_pipelines_are_not(tokenizer_dir):
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    assert sliceable(spec)
    bert = dict(spec, normalizer={"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                                  "strip_accents": None, "lowercase": True})
    assert sliceable(bert)
    assert sliceable(dict(spec, normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}))
    assert not sliceable(dict(spec, normalizer={"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": " "}, "content": "_"}]}))
    assert not sliceable(dict(spec, pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}))
    assert not sliceable(dict(spec, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True}))
    assert not sliceable(dict(spec, pre_tokenizer=None))
    assert not sliceable(dict(spec, model=dict(spec["model"], type="BPE")))
    assert not sliceable(dict(spec, model=dict(spec["model"], continuing_subword_prefix="@@")))
    added = [dict(spec["added_tokens"][0], lstrip=True)] + spec["added_tokens"][1:]
    assert not sliceable(dict(spec, added_tokens=added))


@pytest.mark.parametrize("seed", range(4))
def test_cut_ids_equal_encoding_each_sentence_for_any_edges(tokenizer_dir, seed):
    """Random texts (Korean, Latin, digits, punctuation, emoji, decomposed jamo, odd spaces) cut at random
    places, many inside words: a cut is either exactly the per-sentence encoding or refused (None)."""
    backend = _backend(tokenizer_dir)
    continuation = _continuation(backend)
    rng = random.Random(seed)
    alphabet = list("가나다라마바사아자차카타파하한국어문장입니다했다그리고") + list("abcXYZ019") + \
        list(".,!?\"'()[]-~…·") + [" ", " ", " ", "\t", "\u3000", "\u00a0", "😀", "\u1100\u1161", "\u1100\u1161\u11a8",
                                   "\u0301", "e\u0301", "<\u0338", "\ufb01", "\u200b", "\x85"]
    texts = []
    for _ in range(60):
        paras = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(rng.randint(1, 4))]
        texts.append("\n".join(paras))
    tokens = encode_documents(backend, texts)
    cut_count = refused = 0
    for d, text in enumerate(texts):
        # mostly where Kiwi splits (after a space or punctuation), some anywhere (inside words)
        likely = [i for i in range(1, len(text)) if text[i - 1] in " .!?\n" or text[i] == " "] or [0]
        anywhere = range(len(text) + 1)
        edges = sorted({rng.choice(likely if rng.random() < 0.8 else anywhere) for _ in range(rng.randint(1, 8))})
        spans = [(a, b) for a, b in zip(edges, edges[1:]) if text[a:b].strip()]
        cut = slice_document(*tokens.document(d), spans, continuation)
        if cut is None:
            refused += 1
            continue
        cut_count += 1
        ids, starts = cut
        assert (ids.tolist(), starts) == _direct(backend, text, spans), (text, spans)
    assert cut_count > 15 and refused > 5


def test_sentence_edges_between_words_are_always_cut(tokenizer_dir):
    backend = _backend(tokenizer_dir)
    text = "첫 문장입니다. 둘째 문장, 그리고 셋째!\n새 문단의 문장.   끝"
    tokens = encode_documents(backend, [text])
    sentences = ["첫 문장입니다.", "둘째 문장, 그리고 셋째!", "새 문단의 문장.", "끝"]
    spans = [(text.index(s), text.index(s) + len(s)) for s in sentences]
    ids, starts = slice_document(*tokens.document(0), spans, _continuation(backend))
    assert (ids.tolist(), starts) == _direct(backend, text, spans)
    # an edge inside a word (Kiwi may split 했다그리고) is refused, so that document is encoded sentence by sentence
    word = "했다그리고"
    inside = encode_documents(backend, [word])
    assert slice_document(*inside.document(0), [(0, 2), (2, 5)], _continuation(backend)) is None


def test_token_spans_are_in_document_coordinates(tokenizer_dir):
    backend = _backend(tokenizer_dir)
    texts = ["하나 둘\n셋 넷", "", "다섯"]
    tokens = encode_documents(backend, texts)
    assert tokens.lengths.tolist() == [8, 0, 2]
    for d, text in enumerate(texts):
        ids, starts, ends, clean = tokens.document(d)
        assert clean.all() and len(clean) == len(ids) + 1  # only whitespace between these tokens
        pieces = [backend.id_to_token(int(i)).removeprefix("##") for i in ids]
        assert [text[a:b] for a, b in zip(starts, ends)] == \
            [p if p != "[UNK]" else text[a:b] for p, a, b in zip(pieces, starts, ends)]
    assert len(tokens.document(1)[0]) == 0


def _chunks(cfg, size):
    from korch.data.readers import expand_inputs, plan_chunks

    return plan_chunks(expand_inputs(cfg.inputs, cfg.format), size, collections.Counter())


def test_the_helper_stays_a_bounded_lead_ahead_and_stops_once_the_driver_begins(corpus_dir, tokenizer_dir, make_cfg):
    import time

    from korch.data.preprocess import DocumentProcessor

    cfg = make_cfg(inputs=[str(corpus_dir)], seq_len=32)
    chunks = _chunks(cfg, 64)
    assert len(chunks) > 6
    processor = DocumentProcessor(cfg.model_copy(update={"split_sentences": False}), tokenizer_dir)
    helper = WordPieceAhead(chunks, tokenizer_dir, cfg, chunk_bytes=1 << 40)  # a lead of 2 chunks

    def made():
        return sorted(n for n in os.listdir(helper.dir) if n[0].isdigit())

    try:
        deadline = time.monotonic() + 60
        while len(made()) < 2:
            assert helper.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # two chunks ahead of the last one taken (none yet): it must now wait for the driver
        assert made() == ["0.npz", "1.npz"] and helper.proc.poll() is None
        texts = [processor._read_clean(chunk, collections.Counter()) for chunk in chunks[:3]]
        got = helper.take(0, texts[0])
        assert all(np.array_equal(a, b) for a, b in zip(got, encode_documents(processor.backend, texts[0])))
        assert helper.proc.wait(timeout=30) == 0  # the driver has begun: the helper is done
        assert helper.take(0, texts[0]) is None  # taken once; a second ask is encoded in the driver
        assert helper.take(1, ["other"]) is None  # not the driver's texts
        assert helper.take(2, texts[2]) is None  # never made
    finally:
        helper.close()
    assert not os.path.exists(helper.dir)


def test_prepare_with_and_without_the_helper_writes_the_same_shards(corpus_copy, tokenizer_dir, make_cfg, tmp_path):
    from korch.data.preprocess import OUTPUT_SCHEMA, DocumentProcessor
    from korch.data.readers import Chunk

    from test_data_pipeline import _add_bad_inputs

    _add_bad_inputs(corpus_copy)
    cfg = make_cfg(inputs=[str(corpus_copy)], seq_len=32, max_line_chars=200)
    chunks = _chunks(cfg, 64) + [Chunk(str(tmp_path / "gone.txt"), "txt", 0, 10)]
    processor = DocumentProcessor(cfg, tokenizer_dir, kiwi_threads=2)
    helper = WordPieceAhead(chunks, tokenizer_dir, cfg, chunk_bytes=1)
    used = []
    take = helper.take

    def counted_take(k, texts):
        got = take(k, texts)
        used.append(got is not None)
        return got

    helper.take = counted_take
    try:
        assert helper.proc.wait(timeout=60) == 0  # all chunks made before the driver begins, as while Kiwi loads
        streamed = [pa.table(cols, schema=OUTPUT_SCHEMA) for cols in processor.stream_columns(chunks, helper)]
    finally:
        helper.close()
    assert streamed == [processor.process_chunks([chunk]) for chunk in chunks]
    assert sum(used) >= len(chunks) - 3  # all but unreadable or empty chunks came from the helper
