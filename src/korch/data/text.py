"""Pure text functions: normalisation, document cleaning, stable hashing, skip-reason names.

Everything here is plain Python with no Ray or Kiwi, so the rules are tested as data and shared by the
Ray pipeline, the plain-Python reader (tokenizer training) and the benchmark's reference loops.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# Skip reasons, grouped by what one count stands for. The manifest's counts obey
#   docs_in == docs_out + sum(skipped[r] for r in DOC_REASONS)
# Line reasons count lines dropped from inside a txt/wiki document (the document itself is kept);
# file reasons count parquet files or row groups that could not be read (their document count is unknowable).
DOC_REASONS = ("empty", "too_short", "duplicate", "invalid_json", "no_text_field",
               "undecodable_record", "record_too_long", "preprocess_error")
LINE_REASONS = ("undecodable_line", "line_too_long")
FILE_REASONS = ("corrupt_parquet", "unreadable_chunk")

# C0/C1 control characters except tab and newline, lone surrogates (json.loads turns "\ud800" into one and it
# then cannot be encoded), and invisible format characters that break exact dedup (BOM, zero-width space).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff\ud800-\udfff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")


def normalize_text(text: str) -> str:
    """NFC-normalise, drop control characters (CR included, so CRLF becomes LF) and squeeze runs of spaces."""
    text = _CONTROL.sub("", text)
    text = unicodedata.normalize("NFC", text)
    return _SPACES.sub(" ", text)


def is_encodable(text: str) -> bool:
    """False for strings holding lone surrogates: they come from JSON escapes and crash Arrow/UTF-8 writers."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_document(text: str, normalize: bool, min_chars: int) -> tuple[str, str | None]:
    """Return (cleaned text, skip reason or None). Paragraphs are kept as lines; blank lines are dropped."""
    if normalize:
        text = normalize_text(text)
    elif not is_encodable(text):
        return "", "undecodable_record"
    lines = [line.strip() for line in text.split("\n")]
    text = "\n".join(line for line in lines if line)
    if not text:
        return "", "empty"
    if len(text) < min_chars:
        return "", "too_short"
    return text, None


def text_hash(text: str) -> int:
    """A stable 64-bit hash of the cleaned text (same on every machine and Python run, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_validation(hash64: int, fraction: float) -> bool:
    """Hold a document out when its hash falls in the first `fraction` of the 64-bit range: stable across runs."""
    return hash64 < int(fraction * 2**64)
