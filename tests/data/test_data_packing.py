"""Packing as data: block limits, kept boundaries, doc ids and word starts."""

import pytest

from korch.data.packing import pack_documents

CLS, SEP = 2, 3


def _doc(doc_id, sentence_lengths, start=100):
    ids, starts, pos = [], [], start
    for n in sentence_lengths:
        starts.append(len(ids))
        ids.extend(range(pos, pos + n))
        pos += n
    return doc_id, ids, starts, list(range(0, len(ids), 2))


def _content(block):
    return block["input_ids"][1:-1]


def test_blocks_are_bounded_and_lose_no_token():
    docs = [_doc(0, [3, 4, 5]), _doc(1, [6]), _doc(2, [2, 2, 9, 1])]
    blocks = pack_documents(docs, seq_len=10, cls_id=CLS, sep_id=SEP)
    for b in blocks:
        assert b["input_ids"][0] == CLS and b["input_ids"][-1] == SEP
        assert 3 <= len(b["input_ids"]) <= 10
    assert [t for b in blocks for t in _content(b)] == [t for d in docs for t in d[1]]


def test_sentences_are_not_split_unless_longer_than_a_block():
    # capacity 8: [3,4] fit, 5 does not fit after 7 tokens -> new block; 12 > 8 is split across blocks.
    blocks = pack_documents([_doc(0, [3, 4, 5, 12])], seq_len=10, cls_id=CLS, sep_id=SEP)
    assert [len(_content(b)) for b in blocks] == [7, 8, 8, 1]
    assert blocks[0]["sentence_starts"] == [1, 4]
    assert blocks[1]["sentence_starts"] == [1, 6]  # the 5-token sentence, then the long one starts
    assert blocks[2]["sentence_starts"] == []  # continuation of the long sentence
    assert blocks[0]["doc_starts"] == [1] and blocks[1]["doc_starts"] == []


def test_doc_ids_and_doc_starts():
    blocks = pack_documents([_doc(7, [3]), _doc(8, [3]), _doc(9, [10])], seq_len=10, cls_id=CLS, sep_id=SEP)
    # doc 9 (10 tokens) is longer than a block (capacity 8), so it fills the 2 free slots, then continues.
    assert blocks[0]["doc_id"] == 7 and blocks[0]["doc_starts"] == [1, 4, 7]
    assert blocks[1]["doc_id"] == 9 and blocks[1]["doc_starts"] == []  # a continued document keeps its id
    assert len(blocks) == 2


def test_word_starts_follow_tokens():
    doc = (0, [10, 11, 12, 13, 14], [0], [0, 2, 4])
    (block,) = pack_documents([doc], seq_len=16, cls_id=CLS, sep_id=SEP)
    assert block["word_starts"] == [1, 3, 5]
    blocks = pack_documents([doc], seq_len=5, cls_id=CLS, sep_id=SEP)  # capacity 3
    assert [b["word_starts"] for b in blocks] == [[1, 3], [2]]


def test_seq_len_too_small():
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents([], seq_len=2, cls_id=CLS, sep_id=SEP)


def _pack_one_sentence_at_a_time(docs, seq_len):
    """The packer before sentences that fit were placed together: the reference for the test below."""
    import bisect

    capacity, blocks = seq_len - 2, []
    block = {"ids": [], "doc_starts": [], "sent_starts": [], "word_starts": [], "doc_id": None}

    def emit():
        nonlocal block
        blocks.append({"input_ids": [CLS] + block["ids"] + [SEP], "doc_id": block["doc_id"],
                       "doc_starts": block["doc_starts"], "sentence_starts": block["sent_starts"],
                       "word_starts": block["word_starts"]})
        block = {"ids": [], "doc_starts": [], "sent_starts": [], "word_starts": [], "doc_id": None}

    for doc_id, ids, sent_starts, word_starts in docs:
        bounds, words, w, first = list(sent_starts) + [len(ids)], sorted(word_starts), 0, True
        for s, e in zip(bounds, bounds[1:]):
            if e <= s:
                continue
            if block["ids"] and e - s > capacity - len(block["ids"]) and e - s <= capacity:
                emit()
            pos = s
            while pos < e:
                if len(block["ids"]) == capacity:
                    emit()
                if block["doc_id"] is None:
                    block["doc_id"] = doc_id
                offset = len(block["ids"]) + 1
                if first:
                    block["doc_starts"].append(offset)
                    first = False
                if pos == s:
                    block["sent_starts"].append(offset)
                take = min(e - pos, capacity - len(block["ids"]))
                lo = bisect.bisect_left(words, pos, w)
                w = bisect.bisect_left(words, pos + take, lo)
                block["word_starts"].extend(x + offset - pos for x in words[lo:w])
                block["ids"].extend(ids[pos:pos + take])
                pos += take
    if block["ids"]:
        emit()
    return blocks


def test_placing_sentences_that_fit_together_gives_the_blocks_of_one_at_a_time():
    import random

    rng = random.Random(7)
    for _ in range(300):
        docs = []
        for doc_id in range(rng.randint(1, 6)):
            lengths = [rng.choice([0, 1, 2, 5, 9, 14, 30]) for _ in range(rng.randint(0, 12))]
            doc_id, ids, starts, _ = _doc(doc_id, lengths)
            if rng.random() < 0.2:
                starts = sorted(starts, reverse=True)  # out of order: placed one at a time, as before
            words = sorted(rng.sample(range(len(ids) + 1), min(len(ids) + 1, rng.randint(0, 20))))
            docs.append((doc_id, ids, starts, words))
        seq_len = rng.choice([3, 4, 8, 16, 40])
        assert pack_documents(docs, seq_len, CLS, SEP) == _pack_one_sentence_at_a_time(docs, seq_len)
