"""Masking statistics and pair building of the pretraining tasks, on real kowiki blocks, in-process (no Ray)."""

from __future__ import annotations

import itertools

import pytest
import torch

import pretrain_data as data
from korch.tasks.masking import mask_spans, mask_whole_words, sample_span_lengths, span_positions, word_spans
from korch.tasks.mlm import pad_blocks

SEQUENCES = 10_000


def _masked_share(masker, blocks, seq_len=64, batch=500) -> tuple[float, list]:
    """Share of content tokens labelled over SEQUENCES sequences (the real blocks, cycled, new draws each time)."""
    generator = torch.Generator().manual_seed(7)
    masked = content = 0
    outputs = []
    cycle = itertools.islice(itertools.cycle(blocks), SEQUENCES)
    while chunk := list(itertools.islice(cycle, batch)):
        ids, _ = pad_blocks([b["input_ids"] for b in chunk], seq_len, 0)
        lengths = [len(b["input_ids"]) for b in chunk]
        out = masker(ids, lengths, [b["word_starts"] for b in chunk], 4, 3000, 0.15, generator)
        masked += int((out[1] != -100).sum())
        content += sum(n - 2 for n in lengths)
        outputs.append((chunk, out))
    return masked / content, outputs


@pytest.mark.parametrize("morphemes", [False, True], ids=["eojeol", "morpheme"])
def test_whole_word_mask_rate_is_15_percent_over_10k_sequences(morphemes):
    share, _ = _masked_share(mask_whole_words, data.blocks(morphemes))
    assert abs(share - 0.15) <= 0.01, share


def test_span_mask_rate_is_15_percent_and_span_lengths_average_3_8():
    share, outputs = _masked_share(lambda *a: mask_spans(*a)[:2], data.blocks(False))
    assert abs(share - 0.15) <= 0.01, share
    lengths = sample_span_lengths(SEQUENCES, torch.Generator().manual_seed(3))
    assert min(lengths) == 1 and max(lengths) == 10
    assert abs(sum(lengths) / len(lengths) - 3.8) < 0.1, sum(lengths) / len(lengths)


def test_spans_are_whole_words_and_do_not_overlap():
    generator = torch.Generator().manual_seed(5)
    for block in data.blocks(False)[:300]:
        words = word_spans(block["word_starts"], len(block["input_ids"]))
        starts, ends = {s for s, _ in words}, {e for _, e in words}
        chosen = span_positions(words, 0.15, generator)
        assert all(s in starts and e in ends for s, e in chosen)
        assert all(a[1] <= b[0] for a, b in zip(chosen, chosen[1:]))


def test_morpheme_masking_never_masks_part_of_a_morpheme():
    """Every Kiwi morpheme's tokens are all masked or none is, over many draws on real sentences."""
    import collections

    from korch.config import DataConfig
    from korch.data.preprocess import DocumentProcessor

    cfg = DataConfig(inputs=[str(data.KOWIKI)], morphemes=True, split_sentences=False)
    processor = DocumentProcessor(cfg, data.tokenizer_dir())
    sentences = [line for text in data.texts()[:3] for line in text.split("\n") if 20 < len(line) < 200][:40]
    generator = torch.Generator().manual_seed(11)
    checked = 0
    for sentence in sentences:
        out = processor.process([sentence], collections.Counter())
        if not out["ids"]:
            continue
        offsets = processor.backend.encode(sentence, add_special_tokens=False).offsets
        ids = [2, *out["ids"][0], 3]
        starts = [w + 1 for w in out["word_starts"][0]]
        morphemes = [(t.start, t.start + t.len) for t in processor.kiwi.tokenize(sentence)]
        tensor = torch.as_tensor([ids])
        for _ in range(20):
            _, labels = mask_whole_words(tensor, [len(ids)], [starts], 4, 3000, 0.3, generator)
            masked = {i - 1 for i in (labels[0] != -100).nonzero().flatten().tolist()}
            for a, b in morphemes:
                tokens = {i for i, (x, y) in enumerate(offsets) if x < b and y > a}
                assert not tokens or tokens <= masked or not (tokens & masked), (sentence, a, b)
                checked += 1
    assert checked > 1000


def test_nsp_pairs_are_document_aware_and_half_random():
    from korch.tasks.nsp_mlm import block_sentences, build_pair

    # Micro batches as the loop reads them: rows in a shuffled order, so a batch mixes documents.
    blocks = [data.blocks(True)[i] for i in torch.randperm(len(data.blocks(True)), generator=torch.Generator().manual_seed(0))]
    generator = torch.Generator().manual_seed(1)
    labels = []
    for start in range(0, 1600, 8):
        chunk = [blocks[(start + i) % len(blocks)] for i in range(8)]
        ids = [b["input_ids"] for b in chunk]
        sentences = [block_sentences(len(b["input_ids"]), b["sentence_starts"], b["doc_starts"], b["doc_id"])
                     for b in chunk]
        for row in range(len(chunk)):
            a, b, label, a_doc, b_doc = build_pair(row, ids, sentences, 0.5, generator)
            labels.append(label)
            assert a and b
            if label == 0:  # B is what follows A in the same document
                assert a_doc == b_doc and any(ids[row][i:i + len(a) + len(b)] == a + b for i in range(len(ids[row])))
            else:
                assert a_doc != b_doc
    assert abs(sum(labels) / len(labels) - 0.5) < 0.05


def test_pairs_are_truncated_b_first_and_segmented():
    from korch.tasks.nsp_mlm import encode_pairs, truncate_pair

    assert truncate_pair(list(range(10)), list(range(10, 20)), 12) == (list(range(10)), [10, 11])
    assert truncate_pair(list(range(20)), [50, 51, 52], 10) == (list(range(11, 20)), [50])
    assert truncate_pair([1, 2], [3], 5) == ([1, 2], [3])
    batch = encode_pairs([([7, 8], [9])], 8, 2, 3, 0)
    assert batch["input_ids"][0].tolist() == [2, 7, 8, 3, 9, 3, 0, 0]
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
