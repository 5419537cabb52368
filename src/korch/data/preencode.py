"""WordPiece ahead of Kiwi, in a helper process, while the driver's Kiwi loads.

On a small machine the driver runs Kiwi itself (`pool`). Building Kiwi and loading its model take ~2 s, all
on one thread that holds the GIL, so the other cores idle and no thread of the driver can use them. A helper
process (`python -m korch.data.preencode`) starts before Kiwi does and spends that time on the work that does
not need Kiwi: it reads and cleans the same chunks and WordPiece-encodes every paragraph, with each token's
char span. Once Kiwi has found a document's sentences, the driver cuts each sentence's ids out of its
paragraph's (`slice_document`) instead of encoding the sentence again.

That cut gives exactly the ids of encoding the sentence on its own when the tokenizer encodes each word on its
own (`sliceable`: a WordPiece model after a whitespace/punctuation pre-tokenizer and per-character
normalizers) and no word crosses the sentence's edges. Both are checked: a tokenizer that is not sliceable
never starts the helper, and a document with a sentence edge inside a word (Kiwi may split 했다그리고), or
whose text the helper saw differently, is encoded sentence by sentence as before. A chunk the helper has not
finished yet, or any failure of the helper, also just means the driver encodes that chunk itself, so the
shards never depend on the helper's timing.

The helper works only until the driver takes its first chunk (Kiwi is then ready, and encoding in the driver
costs less than the helper's reading, offsets and files); the chunks it finished by then are used, the rest are
encoded in the driver. So on a large corpus it does not sit beside the driver's peak memory, and it never
encodes more than `LEAD_BYTES` of input ahead (a slow Kiwi load does not pile up files); each file is deleted
once read.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

import numpy as np

from .readers import Chunk, chunk_to_dict, read_chunk

LEAD_BYTES = 16 << 20
"""Input the helper may encode ahead of the driver: ~2 s of one thread's WordPiece, the length of Kiwi's load."""

_PARAGRAPHS_PER_CALL = 512

_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "BertNormalizer"}
_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}


def sliceable(tokenizer_json: dict) -> bool:
    """Whether a sentence's ids are its paragraph's ids between the sentence's edges, for edges between words.

    True for WordPiece (`##` continuations) after a pre-tokenizer that splits at whitespace and punctuation
    only, with normalizers that rewrite characters one at a time (a composition across an edge, as NFC may
    make, joins the two sides into one token, which `slice_document` sees as a word across the edge), and no
    added token that strips or matches whole words. Anything else (a Metaspace or byte-level pre-tokenizer, a
    regex Replace, Strip) might encode a sentence differently on its own, so it is not sliced.
    """
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix", "##") != "##":
        return False
    normalizer = tokenizer_json.get("normalizer")
    steps = [] if normalizer is None else (
        normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer])
    if any(step.get("type") not in _NORMALIZERS for step in steps):
        return False
    pre = tokenizer_json.get("pre_tokenizer")
    if pre is None or pre.get("type") not in _PRE_TOKENIZERS:
        return False
    return all(t.get("special") and not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
               for t in tokenizer_json.get("added_tokens") or [])


# Unicode White_Space: what every sliceable pre-tokenizer splits on and drops.
_WHITESPACE = np.array([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
                        0x205F, 0x3000], dtype=np.uint32)


class ChunkTokens(NamedTuple):
    """One chunk's documents, WordPiece-encoded paragraph by paragraph, flattened.

    Token t of document d is at `doc_bounds[d] <= t < doc_bounds[d + 1]`; `starts`/`ends` are its char span
    in the document's text (paragraphs joined by their newlines). `clean[t + d]` says whether the text between
    the token before (or the document's start) and token t is whitespace only; `clean[doc_bounds[d + 1] + d]`
    the same for the document's tail. A char a normalizer merged into its neighbour (NFC makes 가 of ᄀ+ᅡ)
    is in no token's span, so such a gap is not clean. `lengths` are the texts' lengths, which the driver
    checks against its own texts before it trusts the rest.
    """

    lengths: np.ndarray
    doc_bounds: np.ndarray
    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    clean: np.ndarray

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.doc_bounds[d], self.doc_bounds[d + 1]
        return self.ids[a:b], self.starts[a:b], self.ends[a:b], self.clean[a + d:b + d + 1]


def encode_documents(backend, texts: list[str]) -> ChunkTokens:
    """`ChunkTokens` of cleaned texts: one `encode_batch` over all their paragraphs (char offsets on)."""
    paragraphs, bases, counts = [], [], []
    for text in texts:
        paras = text.split("\n")
        base = 0
        for para in paras:
            paragraphs.append(para)
            bases.append(base)
            base += len(para) + 1
        counts.append(len(paras))
    sizes = np.zeros(len(paragraphs), dtype=np.int64)
    id_parts, span_parts = [], []
    for lo in range(0, len(paragraphs), _PARAGRAPHS_PER_CALL):  # a 4 MiB chunk's Encodings at once take ~100s of MB
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        batch = paragraphs[lo:lo + _PARAGRAPHS_PER_CALL]
        for k, enc in enumerate(backend.encode_batch(batch, add_special_tokens=False), start=lo):
            para_ids = enc.ids
            sizes[k] = len(para_ids)
            ids.extend(para_ids)
            offsets.extend(enc.offsets)
        id_parts.append(np.asarray(ids, dtype=np.int32))
        span_parts.append(np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int32, count=2 * len(offsets)))
    flat = np.concatenate(span_parts) if span_parts else np.zeros(0, dtype=np.int32)
    span = flat.reshape(-1, 2) + np.repeat(np.asarray(bases, dtype=np.int32), sizes)[:, None]
    para_bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # int even when empty
    doc_bounds = para_bounds[np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)]
    lengths = np.asarray([len(t) for t in texts], dtype=np.int64)
    all_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int32)
    return ChunkTokens(lengths, doc_bounds, all_ids, span[:, 0].copy(), span[:, 1].copy(),
                       _clean_gaps("\n".join(texts), lengths, doc_bounds, span))


def _clean_gaps(joined: str, lengths: np.ndarray, doc_bounds: np.ndarray, span: np.ndarray) -> np.ndarray:
    """`ChunkTokens.clean`: per document, one flag per gap before a token, then one for the tail."""
    chars = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    solid = np.concatenate([[0], np.cumsum(~np.isin(chars, _WHITESPACE))])  # non-whitespace chars before each position
    docs = len(lengths)
    doc_base = np.cumsum(lengths + 1) - (lengths + 1)  # where each document starts in `joined`
    per_doc = np.diff(doc_bounds)
    base = np.repeat(doc_base, per_doc)
    first = np.zeros(len(span), dtype=bool)
    first[doc_bounds[:-1][per_doc > 0]] = True
    prev_end = np.where(first, 0, np.concatenate([[0], span[:-1, 1]]))
    before = solid[base + span[:, 0]] == solid[base + prev_end]
    last_end = np.zeros(docs, dtype=np.int64)
    last_end[per_doc > 0] = span[doc_bounds[1:][per_doc > 0] - 1, 1]
    tail = solid[doc_base + lengths] == solid[doc_base + last_end]
    clean = np.empty(len(span) + docs, dtype=bool)
    clean[doc_bounds[1:] + np.arange(docs)] = tail
    clean[np.arange(len(span)) + np.repeat(np.arange(docs), per_doc)] = before
    return clean


def slice_document(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, clean: np.ndarray,
                   spans: list[tuple[int, int]], continuation: np.ndarray) -> tuple[np.ndarray, list[int]] | None:
    """A document's ids and sentence starts from its paragraphs' tokens and its sentences' char spans, the same
    as encoding each sentence on its own and joining the non-empty ones; None when an edge may lie in a word.

    An edge is between words when it lies in a whitespace-only gap between tokens (after the token before
    ends, at or before the next one starts) and the next token begins a word (no `##`).
    """
    k = len(spans)
    n = len(ids)
    if k == 0 or n == 0:  # no sentence, or no token: nothing, unless text that made no token might make one alone
        return (np.zeros(0, dtype=np.int32), []) if k == 0 or clean.all() else None
    edges = np.asarray(spans, dtype=np.int64).T.reshape(-1)  # all starts, then all ends
    first = np.searchsorted(starts, edges)
    before_ok = (first == 0) | (ends[np.maximum(first - 1, 0)] <= edges)
    word_ok = (first == n) | ~continuation[ids[np.minimum(first, n - 1)]]
    if not (before_ok & word_ok & clean[first]).all():
        return None
    lo, hi = first[:k], first[k:]
    sizes = np.maximum(hi - lo, 0)
    total = int(sizes.sum())
    out_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    take = np.arange(total) + np.repeat(lo - out_starts, sizes)
    return ids[take], out_starts[sizes > 0].tolist()


class WordPieceAhead:
    """The driver's end of the helper: start it, take a chunk's `ChunkTokens` if ready, say which chunk it took."""

    def __init__(self, chunks: list, tokenizer_dir: str, cfg, chunk_bytes: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="korch-wordpiece-")
        job = {"chunks": [chunk_to_dict(c) for c in chunks], "tokenizer": tokenizer_dir,
               "lead": max(2, LEAD_BYTES // max(1, chunk_bytes)),
               "max_line_chars": cfg.max_line_chars, "text_fields": list(cfg.text_fields),
               "normalize": cfg.normalize, "min_doc_chars": cfg.min_doc_chars}
        job_path = os.path.join(self.dir, "job.json")
        with open(job_path, "w", encoding="utf-8") as f:
            json.dump(job, f)
        # One WordPiece thread: the helper is there for the core Kiwi's load leaves idle, not to crowd Kiwi later.
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
        with open(os.path.join(self.dir, "stderr.log"), "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "korch.data.preencode", job_path],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, env=env)

    def take(self, k: int, texts: list[str]) -> ChunkTokens | None:
        """Chunk k's tokens if the helper has written them and saw the same texts; None means encode it here."""
        path = os.path.join(self.dir, f"{k}.npz")
        try:
            with np.load(path, allow_pickle=False) as arrays:  # plain arrays only: nothing here runs code
                tokens = ChunkTokens(**{name: arrays[name] for name in ChunkTokens._fields})
            os.remove(path)
        except (OSError, ValueError, KeyError):
            tokens = None
        self._tell(k)
        if tokens is None or len(tokens.lengths) != len(texts) or \
                not np.array_equal(tokens.lengths, [len(t) for t in texts]):
            return None
        return tokens

    def _tell(self, k: int) -> None:
        try:
            os.write(self.proc.stdin.fileno(), b"%d\n" % k)
        except (OSError, ValueError):  # the helper has finished or died: nothing more to tell it
            pass

    def close(self) -> None:
        """Stop the helper and remove its files. A helper that failed cost only speed: say why in one line."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        self.proc.stdin.close()
        if code not in (0, -9, 130):
            with open(os.path.join(self.dir, "stderr.log"), encoding="utf-8", errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
            print(f"korch: the WordPiece helper process exited with code {code} "
                  f"({lines[-1] if lines else 'no message'}); the driver encoded the rest itself", file=sys.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)


def _driver_began(fd: int, wait: bool) -> bool:
    """Whether the driver has taken a chunk (it writes a line per chunk) or is gone (end of file)."""
    return bool(select.select([fd], [], [], None if wait else 0)[0])


def _helper(job_path: str) -> None:
    from .text import clean_document
    from .tokenizer import load_tokenizer_json

    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    out_dir = os.path.dirname(job_path)
    backend = load_tokenizer_json(job["tokenizer"])
    backend.no_truncation()
    backend.no_padding()
    stdin = sys.stdin.fileno()
    for k, chunk in enumerate(Chunk(**c) for c in job["chunks"]):
        # `lead` chunks made and none taken yet: wait. Once the driver has begun (Kiwi is ready), it encodes
        # faster than we would, so stop.
        if _driver_began(stdin, wait=k >= job["lead"]):
            return
        bad: collections.Counter = collections.Counter()
        try:
            texts = []
            for raw in read_chunk(chunk, job["max_line_chars"], job["text_fields"], bad):
                text, reason = clean_document(raw, job["normalize"], job["min_doc_chars"])
                if reason is None:
                    texts.append(text)
            tokens = encode_documents(backend, texts)
        except Exception:  # noqa: BLE001 - the driver encodes this chunk itself (and meets and counts any bad input)
            continue
        tmp = os.path.join(out_dir, f"{k}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **tokens._asdict())
        os.replace(tmp, os.path.join(out_dir, f"{k}.npz"))


if __name__ == "__main__":
    try:
        _helper(sys.argv[1])
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the driver reports it
        sys.exit(130)
