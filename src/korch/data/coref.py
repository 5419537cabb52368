"""The entity-coreference dataset: packed blocks plus the entity mentions that repeat inside each block.

    korch data coref ../shared/data/kowiki_sample --output scratch/c      # prints "N mentions"

Mentions (`find_mentions`): Kiwi proper nouns (NNP) and their compounds: a run that starts at an NNP and goes
on over directly attached NNP/NNG morphemes (서울/NNP 특별시/NNG) or a further NNP after one space (버락 오바마).
A mention covers the WordPiece tokens that overlap its characters, and two mentions are the same entity when
they cover the same token ids: the target is then written out, token for token, earlier in the block.

Blocks are `[CLS] ... [SEP]` cuts of the documents' concatenated token stream (input order, as
`korch.data.packing` packs), written in a seeded shuffled order (`SHUFFLE_BUFFER`); a mention cut by a block
edge is dropped. In each block only entities mentioned
more than once are kept: the first mention is context, every later one (`mention_later`) is what `coref_mlm`
masks whole and scores (Real@k). Documents are split into train/validation by text hash, as the corpus
pipeline splits them. The folder is a prepared corpus (shards + manifest.json) that training reads as usual.

One process and one Kiwi: Kiwi tokenisation is the cost (about a minute for kowiki_sample's 3 MB).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
from typing import Iterable, Iterator, Sequence

import pyarrow as pa

from .shards import ShardWriter

COREF_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("doc_id", pa.int64()),
    ("doc_starts", pa.list_(pa.int32())),
    ("sentence_starts", pa.list_(pa.int32())),
    ("word_starts", pa.list_(pa.int32())),
    ("mention_starts", pa.list_(pa.int32())),
    ("mention_ends", pa.list_(pa.int32())),
    ("mention_later", pa.list_(pa.bool_())),
])
KIND = "coref"
# Blocks leave the packer in document order, and training reads a row group (1,024 rows, ~80 documents) at a
# time: dozens of steps in a row would see the same few entities, which the model then memorises instead of
# learning to copy them from context (a CPU run in that order stayed at the frequency baseline for 1,800 steps).
# A seeded shuffle buffer spreads each document's blocks over the split while still streaming.
SHUFFLE_BUFFER = 8192


def find_mentions(tokens: Iterable) -> list[tuple[int, int]]:
    """Character spans [start, end) of proper-noun mentions in one text, from Kiwi tokens (form, tag, start, len)."""
    spans: list[tuple[int, int]] = []
    start = end = None
    for token in tokens:
        tag, t_start, t_end = str(token.tag), token.start, token.start + token.len
        if start is not None and (
                (tag in ("NNP", "NNG") and t_start == end) or (tag == "NNP" and t_start == end + 1)):
            end = t_end
            continue
        if start is not None:
            spans.append((start, end))
            start = end = None
        if tag == "NNP":
            start, end = t_start, t_end
    if start is not None:
        spans.append((start, end))
    return spans


def token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """[first, last) indices of the tokens overlapping characters [start, end); None when none does."""
    covered = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    return (covered[0], covered[-1] + 1) if covered else None


def repeated_mentions(ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int], list[bool]]:
    """(starts, ends, later) of the mentions in a block whose token ids occur more than once; the first of each
    entity is context (later False), the rest are targets. Overlapping spans keep the earlier one."""
    kept, last_end = [], -1
    for s, e in sorted(spans):
        if s >= last_end:
            kept.append((s, e))
            last_end = e
    groups: dict[tuple, list[tuple[int, int]]] = collections.defaultdict(list)
    for s, e in kept:
        groups[tuple(ids[s:e])].append((s, e))
    out = sorted((s, e, i > 0) for group in groups.values() if len(group) > 1 for i, (s, e) in enumerate(group))
    return [s for s, _, _ in out], [e for _, e, _ in out], [later for _, _, later in out]


class CorefPacker:
    """Cuts a stream of documents into blocks of at most `seq_len` tokens and keeps each block's repeated mentions."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int):
        self.capacity, self.cls_id, self.sep_id = seq_len - 2, cls_id, sep_id
        self._reset()

    def _reset(self) -> None:
        self.ids: list[int] = []
        self.words: list[int] = []
        self.spans: list[tuple[int, int]] = []
        self.doc_starts: list[int] = []
        self.doc_id: int | None = None

    def add(self, doc_id: int, ids: list[int], word_starts: list[int], spans: list[tuple[int, int]]) -> Iterator[dict]:
        pos = 0
        while pos < len(ids):
            if len(self.ids) == self.capacity:
                yield self._emit()
            if self.doc_id is None:
                self.doc_id = doc_id
            take = min(len(ids) - pos, self.capacity - len(self.ids))
            shift = len(self.ids) + 1 - pos  # block offset of document token i is i + shift ([CLS] at 0)
            if pos == 0:
                self.doc_starts.append(shift)
            self.words.extend(w + shift for w in word_starts if pos <= w < pos + take)
            self.spans.extend((s + shift, e + shift) for s, e in spans if pos <= s and e <= pos + take)
            self.ids.extend(ids[pos:pos + take])
            pos += take

    def flush(self) -> Iterator[dict]:
        if self.ids:
            yield self._emit()

    def _emit(self) -> dict:
        ids = [self.cls_id] + self.ids + [self.sep_id]
        starts, ends, later = repeated_mentions(ids, self.spans)
        block = {"input_ids": ids, "doc_id": self.doc_id, "doc_starts": self.doc_starts, "sentence_starts": [],
                 "word_starts": self.words, "mention_starts": starts, "mention_ends": ends, "mention_later": later}
        self._reset()
        return block


class ShuffleBuffer:
    """Seeded streaming shuffle: holds up to `size` items and emits a random one whenever it is full."""

    def __init__(self, size: int, seed: int):
        import random

        self.size, self.items, self.rng = size, [], random.Random(seed)

    def add(self, item) -> Iterator:
        self.items.append(item)
        if len(self.items) > self.size:
            yield self._pop()

    def drain(self) -> Iterator:
        while self.items:
            yield self._pop()

    def _pop(self):
        i = self.rng.randrange(len(self.items))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        return self.items.pop()


class DocumentMentions:
    """Kiwi + tokenizer for one process: a document's token ids, word starts and mention token spans."""

    def __init__(self, tokenizer_dir: str):
        from kiwipiepy import Kiwi
        from tokenizers import Tokenizer

        self.kiwi = Kiwi(num_workers=1)
        self.backend = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        self.backend.no_truncation()
        self.backend.no_padding()

    def encode(self, text: str) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        paragraphs = [p for p in text.split("\n") if p.strip()]
        ids: list[int] = []
        words: list[int] = []
        spans: list[tuple[int, int]] = []
        encodings = self.backend.encode_batch(paragraphs, add_special_tokens=False) if paragraphs else []
        for paragraph, tokens, enc in zip(paragraphs, self.kiwi.tokenize(paragraphs), encodings):
            base = len(ids)
            words.extend(base + i for i, token in enumerate(enc.tokens) if not token.startswith("##"))
            for start, end in find_mentions(tokens):
                span = token_span(enc.offsets, start, end)
                if span is not None:
                    spans.append((base + span[0], base + span[1]))
            ids.extend(enc.ids)
        return ids, words, spans


def build_coref_dataset(cfg, tokenizer_dir: str, output_dir: str, progress: bool = True) -> dict:
    """Write `output_dir/{train,validation}` shards and manifest.json (with mention counts); returns the manifest.
    `cfg` is a `DataConfig` (inputs, seq_len, validation_fraction, max_docs, reading and cleaning options)."""
    import sys

    from korch.errors import UserError

    from .pipeline import FORMAT_VERSION, SPLITS, is_prepared, load_manifest
    from .preprocess import special_ids
    from .readers import check_output_apart, corpus_files, describe_skips, iter_documents
    from .text import DOC_REASONS, is_validation, text_hash

    output_dir = os.path.abspath(output_dir)
    settings = {"inputs": list(cfg.inputs), "seq_len": cfg.seq_len, "validation_fraction": cfg.validation_fraction,
                "max_docs": cfg.max_docs, "tokenizer": os.path.abspath(tokenizer_dir), "shuffle_buffer": SHUFFLE_BUFFER}
    if is_prepared(output_dir):
        old = load_manifest(output_dir)
        if old.get("kind") == KIND and old.get("settings") == settings:
            return old
    corpus_files(list(cfg.inputs), cfg.format)
    check_output_apart(list(cfg.inputs), output_dir, "the coref data folder")
    started = time.perf_counter()
    cls_id, sep_id = special_ids(tokenizer_dir)
    encoder = DocumentMentions(tokenizer_dir)
    tmp = os.path.join(output_dir, f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {s: ShardWriter(os.path.join(tmp, s), s, schema=COREF_SCHEMA) for s in SPLITS}
    packers = {s: CorefPacker(cfg.seq_len, cls_id, sep_id) for s in SPLITS}
    buffers = {s: ShuffleBuffer(SHUFFLE_BUFFER, seed=i) for i, s in enumerate(SPLITS)}
    mentions: collections.Counter = collections.Counter()
    entities: collections.Counter = collections.Counter()
    docs = 0

    def write(split: str, blocks: Iterable[dict]) -> None:
        for block in blocks:
            later = [(s, e) for s, e, flag in zip(block["mention_starts"], block["mention_ends"], block["mention_later"])
                     if flag]
            mentions[split] += len(later)
            if split == "train":
                entities.update(tuple(block["input_ids"][s:e]) for s, e in later)
            for row in buffers[split].add(block):
                writers[split].write(row)

    skipped: collections.Counter = collections.Counter()
    for docs, text in enumerate(iter_documents(list(cfg.inputs), cfg, skipped), start=1):
        split = "validation" if is_validation(text_hash(text), cfg.validation_fraction) else "train"
        write(split, packers[split].add(docs - 1, *encoder.encode(text)))
        if progress and docs % 100 == 0:
            print(f"korch data coref: {docs} docs, {sum(mentions.values())} mentions", file=sys.stderr, flush=True)
    if not docs:  # the inputs or the filters are wrong; an earlier dataset in the folder stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.listdir(output_dir):  # the folder was made for this run only
            os.rmdir(output_dir)
        raise UserError(f"{', '.join(cfg.inputs)}: no document survived ({sum(skipped[r] for r in DOC_REASONS)} read; "
                        f"skipped: {describe_skips(skipped)}); check the inputs, format, text_fields and min_doc_chars")
    splits, shards = {}, []
    for s in SPLITS:
        write(s, packers[s].flush())
        for row in buffers[s].drain():
            writers[s].write(row)
        shards.extend(writers[s].close())
        splits[s] = {"rows": writers[s].rows, "tokens": writers[s].tokens, "mentions": mentions[s]}
    most_common = entities.most_common(1)
    manifest = {
        "format_version": FORMAT_VERSION, "kind": KIND, "settings": settings, "inputs": list(cfg.inputs),
        "tokenizer": os.path.abspath(tokenizer_dir), "seq_len": cfg.seq_len, "docs_out": docs,
        "rows": sum(v["rows"] for v in splits.values()), "tokens": sum(v["tokens"] for v in splits.values()),
        "mentions": sum(mentions.values()), "splits": splits, "shards": shards,
        # The frequency baseline of `korch eval coref`: always answer the training split's most common target.
        "most_common_mention": list(most_common[0][0]) if most_common else [],
        "config": {"morphemes": False, "seq_len": cfg.seq_len},
        "seconds": round(time.perf_counter() - started, 2),
    }
    if os.path.exists(os.path.join(output_dir, "manifest.json")):  # a folder with a manifest is always complete
        os.remove(os.path.join(output_dir, "manifest.json"))
    for s in SPLITS:
        shutil.rmtree(os.path.join(output_dir, s), ignore_errors=True)
        os.replace(os.path.join(tmp, s), os.path.join(output_dir, s))
    shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(output_dir, "manifest.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    os.replace(os.path.join(output_dir, "manifest.json.tmp"), os.path.join(output_dir, "manifest.json"))
    return manifest
