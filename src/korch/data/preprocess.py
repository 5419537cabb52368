"""Korean preprocessing of documents: clean, split sentences (Kiwi), mark word starts, tokenize (WordPiece).

`DocumentProcessor` holds one `Kiwi` and one tokenizer and turns chunks into per-document token rows. The
Ray pipeline wraps it in `KoreanPreprocessor`, a callable class, so each Ray Data actor builds its `Kiwi`
exactly once in `__init__` (a `Kiwi` cannot be pickled, and building one takes ~1 s and ~260 MB). The
benchmark's single-process loops use the same `DocumentProcessor`, so every variant makes the same Kiwi calls.

Kiwi sees paragraphs (lines), so paragraph breaks are always sentence breaks. `DocumentProcessor` hands Kiwi a
whole batch of documents' paragraphs in one `split_into_sents` call (`batch=True`, what the actors do): Kiwi's
batch API keeps its analyser busy instead of paying a call per document. Kiwi analyses each paragraph on its
own, so the sentences, and so the output, are the same as one call per document (`batch=False`, the
benchmark's plain-loop reference). A batch Kiwi fails on is redone one document at a time, so exactly the
documents that fail are skipped as `preprocess_error`, as before.

Word starts (for whole-word masking): with `morphemes: true`, a token starts a word when it begins at a
Kiwi morpheme's first character outside earlier morphemes (so 먹었다 -> 먹 | 었 | 다 groups; see
`morpheme_starts` for contractions); otherwise a token starts a word unless it
is a WordPiece `##` continuation. Either way the field is filled.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from .preencode import slice_document
from .readers import Chunk, read_chunk
from .stream import read_ahead
from .text import clean_document, is_validation, text_hash

OUTPUT_SCHEMA = pa.schema([
    ("ids", pa.list_(pa.int32())),
    ("sent_starts", pa.list_(pa.int32())),
    ("word_starts", pa.list_(pa.int32())),
    ("hash", pa.uint64()),
    ("is_val", pa.bool_()),
    ("skip", pa.string()),
    ("count", pa.int64()),
])
"""One row per kept document (`skip` empty, `count` 1), plus one row per skip reason per chunk (`count` n)."""


def special_ids(tokenizer_dir: str) -> tuple[int, int]:
    """[CLS] and [SEP] ids of a Hugging Face fast tokenizer folder; a one-line UserError if it is unusable.

    Read with `tokenizers` and the folder's tokenizer_config.json rather than transformers, whose import
    pulls in torch (seconds and ~250 MB in every process that only needs two ids).
    """
    import json

    from korch.errors import UserError

    from .tokenizer import load_tokenizer_json

    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer folder '{tokenizer_dir}' has no tokenizer.json; give a fast (Rust) Hugging Face "
                        "tokenizer folder, or leave --tokenizer out to train one")
    names = {"cls_token": "[CLS]", "sep_token": "[SEP]"}
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        for key in names:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    try:
        tokenizer = load_tokenizer_json(tokenizer_dir)
    except UserError as exc:
        raise UserError(f"{exc}; give a fast (Rust) Hugging Face tokenizer folder") from None
    ids = [tokenizer.token_to_id(names[k]) for k in ("cls_token", "sep_token")]
    if None in ids:
        raise UserError(f"tokenizer '{tokenizer_dir}' has no {names['cls_token']}/{names['sep_token']} token; "
                        "korch packs BERT-style [CLS] ... [SEP] blocks")
    return ids[0], ids[1]


def morpheme_starts(tokens, base: int = 0) -> list[int]:
    """Char offsets (from `base`) where a morpheme begins outside every earlier one. Kiwi gives contractions
    overlapping spans (태어났다: 태어나 covers 61-64, 었 starts at 63); a start inside an earlier morpheme is
    no word start, or whole-morpheme masking could take 었's token and leave half of 태어나."""
    starts, reach = [], -1
    for token in sorted(tokens, key=lambda t: t.start):
        if token.start >= reach:
            starts.append(token.start - base)
        reach = max(reach, token.start + token.len)
    return starts


class DocumentProcessor:
    """Clean -> Kiwi sentences (and morphemes) -> WordPiece ids, for one process. Not picklable (holds Kiwi)."""

    def __init__(self, cfg, tokenizer_dir: str, batch: bool = True, kiwi_threads: int = 1):
        self.cfg = cfg
        self.batch = batch
        self.kiwi = None
        if cfg.split_sentences or cfg.morphemes:
            from kiwipiepy import Kiwi

            # One analyser thread by default (Kiwi's default is a thread per core): actors are the parallelism.
            self.kiwi = Kiwi(num_workers=kiwi_threads)
            self.kiwi.tokenize("")  # Kiwi loads its model lazily, on the first call: pay it here, not mid-chunk
        # The raw `tokenizers` object, not transformers: it is what a fast tokenizer runs anyway, and it keeps
        # torch out of the actors (hundreds of MB each).
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        self.backend.no_truncation()  # a saved model tokenizer may truncate/pad to 512; packing does the cutting
        self.backend.no_padding()
        vocab = self.backend.get_vocab()
        self.continuation = np.zeros(max(vocab.values()) + 1, dtype=bool)
        for token, idx in vocab.items():
            self.continuation[idx] = token.startswith("##")

    def sentences(self, text: str) -> tuple[list[str], list[list[int]]]:
        """Sentences of a cleaned document, and per sentence the char offsets where morphemes start."""
        paragraphs = text.split("\n")
        if self.kiwi is None:
            return paragraphs, [[] for _ in paragraphs]
        return self._collect(paragraphs, self._split(paragraphs))

    def _split(self, paragraphs):
        """Kiwi's sentences of each paragraph, without sub-sentences (quotes inside a sentence), which korch never
        reads: kiwipiepy finds them in Python, token by token, on the calling thread, which also feeds Kiwi and
        runs packing (about 15% of that thread's time in this call, ~0.1 CPU-s on the bench corpus). The
        sentences, their offsets and tokens are the same either way."""
        return self.kiwi.split_into_sents(paragraphs, return_tokens=self.cfg.morphemes, return_sub_sents=False)

    def sentences_of(self, texts: list[str]) -> list[tuple[list[str], list[list[int]]] | None]:
        """`sentences` for many documents; None for a document Kiwi (or its result) fails on."""
        if self.kiwi is None or not self.batch:
            return [self._sentences_or_none(text) for text in texts]
        paragraphs = [text.split("\n") for text in texts]
        try:
            results = iter(self._split([p for paras in paragraphs for p in paras]))
            return [self._collect(paras, [next(results) for _ in paras]) for paras in paragraphs]
        except Exception:  # noqa: BLE001 - find the document(s) at fault one by one, as the per-document path does
            return [self._sentences_or_none(text) for text in texts]

    def _sentences_or_none(self, text: str) -> tuple[list[str], list[list[int]]] | None:
        try:
            return self.sentences(text)
        except Exception:  # noqa: BLE001 - one document Kiwi chokes on must not end the run
            return None

    def _collect(self, paragraphs: list[str], results) -> tuple[list[str], list[list[int]], list | None]:
        """A document's kept sentences, their morpheme starts, and their char spans in the document's text
        (paragraphs joined by newlines; None if a sentence is not the text at its offsets), which
        `preencode.slice_document` cuts the helper's paragraph ids by."""
        sents, morph, spans = [], [], []
        base = 0
        for para, result in zip(paragraphs, results):
            if not self.cfg.split_sentences:
                result_sents = [(para, 0, len(para), [t for s in result for t in (s.tokens or [])])]
            else:
                result_sents = [(s.text, s.start, s.end, s.tokens or []) for s in result]
            for sent_text, start, end, tokens in result_sents:
                if sent_text.strip():
                    sents.append(sent_text)
                    morph.append(morpheme_starts(tokens, start) if tokens else [])
                    if spans is not None and para[start:end] == sent_text:
                        spans.append((base + start, base + end))
                    else:
                        spans = None
            base += len(para) + 1
        return sents, morph, spans

    def process(self, docs: Iterable[str], bad: collections.Counter) -> dict[str, list]:
        """Columns of OUTPUT_SCHEMA (without the skip rows) for the documents that survive cleaning."""
        texts = self._clean(docs, bad)
        return self._encode(texts, self.sentences_of(texts), bad)

    def _clean(self, docs: Iterable[str], bad: collections.Counter) -> list[str]:
        texts = []
        for raw in docs:
            text, reason = clean_document(raw, self.cfg.normalize, self.cfg.min_doc_chars)
            if reason is not None:
                bad[reason] += 1
                continue
            texts.append(text)
        return texts

    def _read_clean(self, chunk: Chunk, bad: collections.Counter) -> list[str]:
        try:
            docs = list(read_chunk(chunk, self.cfg.max_line_chars, self.cfg.text_fields, bad))
        except OSError:  # the file vanished or the store failed mid-run: lose this chunk, say so
            bad["unreadable_chunk"] += 1
            return []
        return self._clean(docs, bad)

    def _encode(self, texts: list[str], found: list, bad: collections.Counter, ahead=None) -> dict[str, list]:
        """WordPiece ids, sentence and word starts of the cleaned `texts`, given their Kiwi sentences (`found`).

        `ahead` (`preencode.ChunkTokens`, for these texts) holds their paragraphs' ids: a document whose
        sentence edges all fall between words takes its sentences' ids from there, the rest are encoded here.
        """
        cfg = self.cfg
        kept: list[tuple] = []  # (hash, sentences, morpheme starts, ids cut from `ahead` or None)
        for d, (text, sentences) in enumerate(zip(texts, found)):
            if sentences is None:
                bad["preprocess_error"] += 1
                continue
            cut = None
            if ahead is not None and sentences[2] is not None:
                cut = slice_document(*ahead.document(d), sentences[2], self.continuation)
            kept.append((text_hash(text), sentences[0], sentences[1], cut))
        flat = [s for _, sents, _, cut in kept if cut is None for s in sents]
        # `encode_batch_fast` skips the char offsets, which only morpheme word starts read.
        encode = self.backend.encode_batch if cfg.morphemes else self.backend.encode_batch_fast
        encodings = encode(flat, add_special_tokens=False) if flat else []
        out = {"ids": [], "sent_starts": [], "word_starts": [], "hash": [], "is_val": []}
        pos = 0
        for h, sents, morph, cut in kept:
            ids: list[int] = []
            sent_starts: list[int] = []
            word_starts: list[int] = []
            if cut is not None:
                doc_ids, sent_starts = cut
                ids = doc_ids.tolist()
            else:
                for k in range(len(sents)):
                    enc = encodings[pos + k]
                    sent_ids = enc.ids  # a new list on every access
                    if not sent_ids:
                        continue
                    sent_starts.append(len(ids))
                    if cfg.morphemes:
                        starts = set(morph[k])
                        word_starts.extend(len(ids) + i for i, (a, _) in enumerate(enc.offsets) if i == 0 or a in starts)
                    ids.extend(sent_ids)
                pos += len(sents)
                doc_ids = None
            if not ids:
                bad["empty"] += 1
                continue
            if not cfg.morphemes:  # every token that is no ## continuation, over the whole document at once
                doc_ids = np.asarray(ids) if doc_ids is None else doc_ids
                word_starts = np.flatnonzero(~self.continuation[doc_ids]).tolist()
            out["ids"].append(ids)
            out["sent_starts"].append(sent_starts)
            out["word_starts"].append(word_starts)
            out["hash"].append(h)
            out["is_val"].append(is_validation(h, cfg.validation_fraction))
        return out

    def process_chunks(self, chunks: Iterable[Chunk]) -> pa.Table:
        """Read, clean and tokenize chunks; skip counts ride along as rows so the driver can add them up."""
        bad: collections.Counter = collections.Counter()
        cols = {"ids": [], "sent_starts": [], "word_starts": [], "hash": [], "is_val": []}
        for chunk in chunks:
            texts = self._read_clean(chunk, bad)
            part = self._encode(texts, self.sentences_of(texts), bad)
            for key in cols:
                cols[key].extend(part[key])
        return build_table(cols, bad)

    def stream_columns(self, chunks: Iterable[Chunk], helper=None) -> Iterator[dict[str, list]]:
        """`process_chunks([chunk])` for each chunk in turn, as columns (`build_columns`: the driver packs them
        in this process, so no Arrow table is built to be taken apart again), but Kiwi sees one continuous
        stream of paragraphs.

        With several analyser threads, one call per chunk leaves them idle while this thread does WordPiece and
        packing, and at each chunk's tail. One call over the whole stream keeps them busy, and it is pulled on a
        thread of its own (`korch-kiwi`): Kiwi takes only ~16 paragraphs per analyser thread ahead of the
        results taken from it, ~0.05 s of work, which WordPiece, packing or a parquet row group on the caller's
        thread would outlast and so starve Kiwi. That thread hands over whole chunks' sentences, at most two
        ahead, so memory stays a few chunks deep; results come back in input order, so the columns are those of
        the tables `process_chunks` gives. If Kiwi fails in the stream, the chunks it had read and all later ones
        are redone chunk by chunk here, where a failing batch is redone one document at a time.

        `helper` (`preencode.WordPieceAhead`, started on the same chunks) gives chunks' paragraph ids it has
        ready, so WordPiece mostly ran while Kiwi was loading; a chunk it has not done is encoded here.
        """
        chunks = iter(chunks)
        if self.kiwi is None:
            yield from map(self._chunk_columns, chunks)
            return
        read: collections.deque = collections.deque()  # (skip counts, texts, paragraphs) of chunks Kiwi has taken
        closing = threading.Event()

        def paragraphs():
            for chunk in chunks:
                if closing.is_set():  # the caller stopped early: read no further
                    return
                bad: collections.Counter = collections.Counter()
                texts = self._read_clean(chunk, bad)
                paras = [text.split("\n") for text in texts]
                read.append((bad, texts, paras))  # before its first paragraph, so a result's chunk is always known
                for doc in paras:
                    yield from doc

        def sentences_by_chunk():  # on the Kiwi thread
            results = iter(self._split(paragraphs()))
            ahead: collections.deque = collections.deque()  # a result pulled only to bring in the next chunk
            while True:
                if not read:  # Kiwi has not reached the next chunk yet: one result pulls it in, or the end
                    try:
                        ahead.append(next(results))
                    except StopIteration:
                        if not read:
                            return
                bad, texts, paras = read[0]
                found = []
                for doc in paras:
                    if closing.is_set():  # a stopped caller (Ctrl-C, max_docs) waits for a document, not a chunk
                        return
                    found.append(self._collect(doc, [ahead.popleft() if ahead else next(results) for _ in doc]))
                read.popleft()  # only now: a chunk Kiwi failed in stays in `read`, to be redone
                yield bad, texts, found

        stream = read_ahead(sentences_by_chunk, depth=2, name="korch-kiwi")
        try:
            for k in itertools.count():
                try:
                    bad, texts, found = next(stream)
                except StopIteration:
                    return
                except Exception:  # noqa: BLE001 - Kiwi choked on some document, on its thread, which has ended
                    break
                tokens = helper.take(k, texts) if helper is not None else None
                yield build_columns(self._encode(texts, found, bad, tokens), bad)  # its errors are the caller's to see
            # `read` and `chunks` are this thread's again: find the document Kiwi chokes on one chunk (then one
            # document) at a time.
            while read:
                bad, texts, _ = read.popleft()
                yield build_columns(self._encode(texts, self.sentences_of(texts), bad), bad)
            yield from map(self._chunk_columns, chunks)
        finally:
            closing.set()
            stream.close()

    def _chunk_columns(self, chunk: Chunk) -> dict[str, list]:
        bad: collections.Counter = collections.Counter()
        texts = self._read_clean(chunk, bad)
        return build_columns(self._encode(texts, self.sentences_of(texts), bad), bad)


def build_columns(cols: dict[str, list], bad: collections.Counter) -> dict[str, list]:
    """The columns of OUTPUT_SCHEMA: the kept documents' rows, then one row per skip reason with its count."""
    n = len(cols["ids"])
    reasons = sorted(r for r, c in bad.items() if c)
    empty: list[list[int]] = [[] for _ in reasons]
    return {
        "ids": cols["ids"] + empty,
        "sent_starts": cols["sent_starts"] + empty,
        "word_starts": cols["word_starts"] + empty,
        "hash": cols["hash"] + [0] * len(reasons),
        "is_val": cols["is_val"] + [False] * len(reasons),
        "skip": [""] * n + reasons,
        "count": [1] * n + [bad[r] for r in reasons],
    }


def build_table(cols: dict[str, list], bad: collections.Counter) -> pa.Table:
    return pa.table(build_columns(cols, bad), schema=OUTPUT_SCHEMA)


class KoreanPreprocessor:
    """Ray Data callable class: builds `DocumentProcessor` (and so `Kiwi`) once per actor."""

    def __init__(self, cfg, tokenizer_dir: str, kiwi_threads: int = 1):
        # WordPiece on one thread: Kiwi's threads and the actors are the parallelism. `tokenizers` would otherwise
        # start a Rayon pool with a thread per core in every actor and oversubscribe the machine.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
        self.processor = DocumentProcessor(cfg, tokenizer_dir, kiwi_threads=kiwi_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        chunks = [Chunk(str(p), str(f), int(a), int(b), int(g)) for p, f, a, b, g in
                  zip(batch["path"], batch["fmt"], batch["start"], batch["end"], batch["row_group"])]
        return self.processor.process_chunks(chunks)

