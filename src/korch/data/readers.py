"""Find corpus files, cut them into chunks, and parse chunks into raw documents, counting what is skipped.

A *chunk* is the unit of read parallelism: a byte range of a txt/jsonl/wiki file that starts and ends on a
document boundary, or a row range of one parquet row group. Chunks are planned on the driver by peeking at
small windows near each cut point (never reading whole files), so any pyarrow filesystem works and a 1 GB
file becomes many small Ray Data blocks instead of one block that a single actor would get all of.

Formats and what one *document* is:
- `txt`: paragraphs separated by blank lines; a document's lines are joined with newlines.
- `jsonl`: one JSON object per line; the text is the first of `text_fields` present.
- `wiki`: WikiExtractor `<doc id=.. title=..>` blocks; the title line is dropped (it repeats the header).
- `parquet`: one row per document; the text column is the first of `text_fields` in the schema.
- `lines`: one document per line (comment and review dumps).
- `tsv`: one record per line under a header row (quoting off); the text is the first of `text_fields` in the
  header. This is how labelled sets (NSMC, comment sets) feed a TAPT `mlm` stage with their text only.
`auto` decides by extension (.txt .jsonl .json .ndjson .parquet .pq .tsv), else by sniffing the first bytes; a
.txt whose first line is a tab-separated header naming a text column (`id<TAB>document<TAB>label`) is tsv, and
one with many lines but no blank line in its first 64 KiB is `lines` (a paragraph corpus has blank lines).
"""

from __future__ import annotations

import collections
import fnmatch
import glob
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import pyarrow.fs as pafs

from korch.config import is_uri
from korch.errors import UserError

from .text import DOC_REASONS, clean_document, text_hash

EXTENSIONS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet", ".pq": "parquet", ".tsv": "tsv"}
# Header names that mark a .txt file as a table of records rather than running text.
HEADER_TEXT_FIELDS = ("text", "content", "document", "sentence", "comments", "comment", "review")
_PEEK = 1 << 20  # how far past a planned cut we look for a document boundary before giving the cut up
_WIKI_HEADER = re.compile(r'^<doc\b[^>]*?title="([^"]*)"')


@dataclass(frozen=True)
class SourceFile:
    path: str
    """A local absolute path or a URI that `pyarrow.fs.FileSystem.from_uri` understands."""
    fmt: str
    size: int


@dataclass(frozen=True)
class Chunk:
    path: str
    fmt: str
    start: int
    """Byte offset (text formats) or first row within the row group (parquet)."""
    end: int
    row_group: int = -1


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _rejoin(original: str, fs_path: str) -> str:
    """Turn a path listed by a URI's filesystem back into a URI the actors can open."""
    if not is_uri(original):
        return fs_path
    scheme = original.split("://", 1)[0]
    return f"{scheme}://{fs_path.lstrip('/')}" if scheme != "file" else f"file://{fs_path}"


def sniff_format(head: bytes) -> str:
    """Guess a format from a file's first bytes (files without a known extension, e.g. `wiki_00`)."""
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<doc"):
        return "wiki"
    if text.startswith(b"{"):
        return "jsonl"
    return "txt"


def _format_of(fs: pafs.FileSystem, fs_path: str, fmt: str, head: bytes | None = None) -> str:
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(fs_path)[1].lower()
    if ext in EXTENSIONS and EXTENSIONS[ext] != "txt":
        return EXTENSIONS[ext]
    if head is None:
        with fs.open_input_stream(fs_path) as f:
            head = f.read(1 << 16)
    if _tsv_header(head) is not None:
        return "tsv"
    guess = EXTENSIONS.get(ext) or sniff_format(head[:64])
    if guess == "txt" and _one_document_per_line(head):
        return "lines"
    return guess


def _one_document_per_line(head: bytes) -> bool:
    lines = head.split(b"\n")[:-1]  # the last piece may be cut mid-line
    return len(lines) >= 20 and not any(not line.strip(b"\r \t") for line in lines)


def _tsv_header(head: bytes) -> list[str] | None:
    """The header fields if the first line is a tab-separated header naming a text column, else None."""
    first = head.split(b"\n", 1)[0].rstrip(b"\r").lstrip(b"\xef\xbb\xbf")
    if b"\t" not in first:
        return None
    fields = first.decode("utf-8", "replace").split("\t")
    return fields if any(f.strip() in HEADER_TEXT_FIELDS for f in fields) else None


ENCODING_SAMPLE = 1 << 16


def check_utf8(path: str, head: bytes, whole: bool = False) -> None:
    """Raise one line naming `path` when its first bytes are mostly not UTF-8.

    Korean text from Windows tools is often CP949 (EUC-KR). Read as UTF-8, nearly every line of it is
    undecodable, so it would be skipped line by line into an empty corpus that still exits 0. A few broken
    lines pass this check; they are counted and skipped as before. `head` is the file's first bytes, or all of
    it with `whole`; a line cut off at the sample's end is left out.
    """
    lines = head.split(b"\n")
    if not whole and len(head) >= ENCODING_SAMPLE:
        lines = lines[:-1]
    lines = [line for line in lines if line.strip()]
    bad = 0
    for line in lines:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    if not lines or bad * 2 <= len(lines):
        return
    try:
        b"\n".join(lines).decode("cp949")
        guess, source = "; it reads as CP949 (EUC-KR), the usual Korean Windows encoding", "cp949"
    except UnicodeDecodeError:
        guess, source = "", "ITS-ENCODING"
    stem, ext = os.path.splitext(path)
    raise UserError(f"{path}: not UTF-8 text ({bad} of its first {len(lines)} lines do not decode){guess}; "
                    f"convert it first, e.g. iconv -f {source} -t utf-8 {path} > {stem}.utf8{ext}")


def check_utf8_file(path: str) -> None:
    """`check_utf8` on a local file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(ENCODING_SAMPLE + 1)
    check_utf8(path, head[:ENCODING_SAMPLE], whole=len(head) <= ENCODING_SAMPLE)


def _source(fs: pafs.FileSystem, fs_path: str, shown: str, fmt: str, size: int) -> SourceFile:
    """A listed file with its format, its encoding checked. A local file's head is read once, for both; on an
    object store the encoding is not checked (one more request per file, on every listing)."""
    head = None
    if isinstance(fs, pafs.LocalFileSystem):
        with fs.open_input_stream(fs_path) as f:
            head = f.read(ENCODING_SAMPLE)
    source = SourceFile(shown, _format_of(fs, fs_path, fmt, head), size)
    if head is not None and source.fmt != "parquet":
        check_utf8(shown, head)
    return source


def expand_inputs(inputs: Iterable[str], fmt: str = "auto", ignored: list[str] | None = None) -> list[SourceFile]:
    """Files, folders (recursive, sorted) and globs -> files in a deterministic order.

    Inside folders only corpus-looking files are taken: known extensions and files with no extension
    (sniffed); hidden files and others (README.md, .tsv, ...) are appended to `ignored`. A file named
    directly or matched by a glob is always taken. A missing path raises `UserError` naming it.
    """
    files: list[SourceFile] = []
    for item in inputs:
        fs, fs_path = filesystem(item)
        if glob.has_magic(fs_path):
            matches = _glob(fs, fs_path)
            if not matches:
                raise UserError(f"data input '{item}' matches no file; check the pattern")
            for info in matches:
                files.append(_source(fs, info.path, _rejoin(item, info.path), fmt, info.size))
            continue
        info = fs.get_file_info(fs_path)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"data input '{item}' does not exist; fix the path (relative paths resolve "
                            "against the current directory)")
        if info.type == pafs.FileType.File:
            files.append(_source(fs, fs_path, _rejoin(item, fs_path), fmt, info.size))
            continue
        if isinstance(fs, pafs.LocalFileSystem) and os.path.isfile(os.path.join(fs_path, "manifest.json")):
            raise UserError(f"data input '{item}' is a folder written by `korch data prepare` (it has manifest.json); "
                            "give it to training directly instead of preparing it again")
        listing = fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))
        for entry in sorted((e for e in listing if e.type == pafs.FileType.File), key=lambda e: e.path):
            rel = os.path.relpath(entry.path, fs_path)
            ext = os.path.splitext(entry.path)[1].lower()
            if any(part.startswith((".", "_")) for part in rel.split(os.sep)) or (ext and ext not in EXTENSIONS):
                if ignored is not None:
                    ignored.append(_rejoin(item, entry.path))
                continue
            files.append(_source(fs, entry.path, _rejoin(item, entry.path), fmt, entry.size))
    return files


def corpus_files(inputs: list[str], fmt: str = "auto", ignored: list[str] | None = None) -> list[SourceFile]:
    """`expand_inputs`, but a `UserError` naming the inputs (and what was ignored) when they hold no corpus file."""
    ignored = ignored if ignored is not None else []
    files = expand_inputs(inputs, fmt, ignored)
    if not files:
        raise UserError(f"no corpus files found in {', '.join(inputs)} (ignored: {', '.join(ignored) or 'none'}); "
                        + _name_them(ignored))
    return files


def _name_them(ignored: list[str]) -> str:
    """The fix when a folder held only files korch passed over: a glob for their most common extension."""
    taken = ", ".join(sorted(EXTENSIONS))
    exts = collections.Counter(os.path.splitext(path)[1] for path in ignored if os.path.splitext(path)[1] != ".md")
    if not exts:
        return f"put corpus files there (in a folder korch reads {taken} and extension-less files)"
    ext = exts.most_common(1)[0][0]
    example = next(path for path in ignored if path.endswith(ext))
    pattern = os.path.join(os.path.dirname(example), "*" + ext)
    return (f"in a folder korch reads only {taken} and extension-less files; name the others, e.g. with the "
            f"glob '{pattern}'")


def check_output_apart(inputs: list[str], output: str, flag: str = "--output") -> None:
    """A `UserError` when `output` is one of the (local) inputs, or one holds the other: the run would overwrite
    its own input, or later read its own output back as input."""
    out = os.path.realpath(output)
    for item in inputs:
        if is_uri(item) or glob.has_magic(item):
            continue
        src = os.path.realpath(item)
        if out == src or out.startswith(src.rstrip(os.sep) + os.sep) or src.startswith(out.rstrip(os.sep) + os.sep):
            where = "is" if out == src else ("is inside" if len(out) > len(src) else "holds")
            raise UserError(f"{flag} {output} {where} the input {item}; keep outputs apart from the inputs, so that "
                            "no input is overwritten or read back as input")


def describe_skips(skipped: dict) -> str:
    """`too_short 3, duplicate 1` (reasons with a count), or `none`."""
    return ", ".join(f"{reason} {n}" for reason, n in sorted((skipped or {}).items()) if n) or "none"


def _glob(fs: pafs.FileSystem, pattern: str) -> list[pafs.FileInfo]:
    if isinstance(fs, pafs.LocalFileSystem):
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        return [fs.get_file_info(p) for p in paths]
    base = pattern[:min(pattern.find(c) for c in "*?[" if c in pattern)].rsplit("/", 1)[0]
    listing = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted((e for e in listing if e.type == pafs.FileType.File and fnmatch.fnmatch(e.path, pattern)),
                  key=lambda e: e.path)


# --- planning -----------------------------------------------------------------------------------------------

def _boundaries(fmt: str) -> list[tuple[bytes, int]]:
    """Byte patterns a document starts after, each with where in the pattern the next document begins."""
    if fmt == "wiki":
        return [(b"\n<doc", 1)]
    if fmt == "txt":
        return [(b"\n\n", 2), (b"\n\r\n", 3)]  # a blank line, LF or CRLF
    return [(b"\n", 1)]


def _next_boundary(window: bytes, fmt: str) -> int:
    """Offset in `window` where the first document after its start begins, or -1."""
    hits = [window.find(p) + shift for p, shift in _boundaries(fmt) if window.find(p) >= 0]
    return min(hits) if hits else -1


def plan_chunks(files: list[SourceFile], target_bytes: int, skipped: collections.Counter | None = None) -> list[Chunk]:
    """Cut every file into chunks of about `target_bytes` that begin on document boundaries."""
    chunks: list[Chunk] = []
    for src in files:
        fs, fs_path = filesystem(src.path)
        if src.fmt == "parquet":
            chunks.extend(_plan_parquet(src, fs, fs_path, target_bytes, skipped))
            continue
        cuts = [0]
        if src.size > target_bytes:
            with fs.open_input_file(fs_path) as f:
                for planned in range(target_bytes, src.size, target_bytes):
                    if planned <= cuts[-1]:
                        continue
                    f.seek(planned - 1)  # from the byte before, so a boundary right at `planned` is found
                    hit = _next_boundary(f.read(_PEEK), src.fmt)
                    if hit >= 0 and planned - 1 + hit < src.size:
                        cuts.append(planned - 1 + hit)
        cuts.append(src.size)
        chunks.extend(Chunk(src.path, src.fmt, a, b) for a, b in zip(cuts, cuts[1:]) if b > a)
    return chunks


def _plan_parquet(src, fs, fs_path, target_bytes, skipped) -> list[Chunk]:
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(fs_path) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception:  # noqa: BLE001 - any unreadable footer means a truncated or corrupt file
        if skipped is not None:
            skipped["corrupt_parquet"] += 1
        return []
    chunks = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        # A big row group is cut into row slices so several actors share it (one block per row group was
        # what made a single actor get all the work).
        pieces = max(1, min(64, rg.total_byte_size // max(1, target_bytes)))
        step = -(-rg.num_rows // pieces) if rg.num_rows else 0
        for a in range(0, rg.num_rows, max(1, step)):
            chunks.append(Chunk(src.path, "parquet", a, min(rg.num_rows, a + step), g))
    return chunks


# --- parsing ------------------------------------------------------------------------------------------------

def _decode_lines(lines: Iterable[bytes | str], max_chars: int, bad: collections.Counter, doc_level: bool):
    """Yield decoded lines without their newline; count and drop undecodable or overlong ones.

    Yields None in place of a dropped line so parsers can still see where documents start and end.
    """
    undecodable, too_long = ("undecodable_record", "record_too_long") if doc_level else ("undecodable_line", "line_too_long")
    for raw in lines:
        if isinstance(raw, bytes):
            if len(raw) > 4 * max_chars:  # cheap pre-check: a UTF-8 character is at most 4 bytes
                bad[too_long] += 1
                yield None
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad[undecodable] += 1
                yield None
                continue
        else:
            line = raw
        line = line.rstrip("\r\n").lstrip("\ufeff")  # a BOM would make the first JSON line invalid
        if len(line) > max_chars:
            bad[too_long] += 1
            yield None
            continue
        yield line


def parse_txt(lines, max_chars: int, bad: collections.Counter) -> Iterator[str]:
    doc: list[str] = []
    for line in _decode_lines(lines, max_chars, bad, doc_level=False):
        if line is None:
            continue
        if line.strip():
            doc.append(line)
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def parse_jsonl(lines, max_chars: int, text_fields: list[str], bad: collections.Counter) -> Iterator[str]:
    for line in _decode_lines(lines, max_chars, bad, doc_level=True):
        if line is None or not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad["invalid_json"] += 1
            continue
        text = _pick_text(record, text_fields)
        if text is None:
            bad["no_text_field"] += 1
            continue
        yield text


def _pick_text(record, text_fields: list[str]) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    for field in text_fields:
        if field in record:
            value = record[field]
            if value is None:
                return ""
            return value if isinstance(value, str) else None
    return None


def parse_wiki(lines, max_chars: int, bad: collections.Counter) -> Iterator[str]:
    doc: list[str] | None = None
    title = None
    for line in _decode_lines(lines, max_chars, bad, doc_level=False):
        if line is None:
            continue
        if line.startswith("<doc"):
            if doc is not None:  # an unterminated doc (truncated file) still counts
                yield "\n".join(doc)
            match = _WIKI_HEADER.match(line)
            doc, title = [], (match.group(1) if match else None)
        elif line.startswith("</doc>"):
            if doc is not None:
                yield "\n".join(doc)
            doc = None
        elif doc is not None and line.strip():
            if not doc and title is not None and line.strip() == title.strip():
                title = None  # the first line repeats the title
                continue
            doc.append(line)
    if doc is not None:
        yield "\n".join(doc)


def parse_line_documents(lines, max_chars: int, bad: collections.Counter) -> Iterator[str]:
    for line in _decode_lines(lines, max_chars, bad, doc_level=True):
        if line is not None and line.strip():
            yield line


def parse_tsv(lines, max_chars: int, text_fields: list[str], bad: collections.Counter,
              header: list[str] | None = None) -> Iterator[str]:
    """Records of a headed TSV; `header` is given when these lines are a chunk from inside the file."""
    column = None if header is None else _text_column(header, text_fields)
    for line in _decode_lines(lines, max_chars, bad, doc_level=True):
        if line is None:
            continue
        fields = line.split("\t")
        if header is None or fields == header:  # the header row itself (first line of the file)
            header, column = fields, _text_column(fields, text_fields)
            continue
        if not line.strip():
            continue
        if column is None or column >= len(fields):
            bad["no_text_field"] += 1
            continue
        yield fields[column]


def _text_column(header: list[str], text_fields: list[str]) -> int | None:
    names = [h.strip() for h in header]
    for field in [*text_fields, *HEADER_TEXT_FIELDS]:
        if field in names:
            return names.index(field)
    return None


def parse_lines(fmt: str, lines, max_chars: int, text_fields: list[str], bad: collections.Counter,
                header: list[str] | None = None) -> Iterator[str]:
    if fmt == "tsv":
        return parse_tsv(lines, max_chars, text_fields, bad, header)
    if fmt == "lines":
        return parse_line_documents(lines, max_chars, bad)
    if fmt == "txt":
        return parse_txt(lines, max_chars, bad)
    if fmt == "jsonl":
        return parse_jsonl(lines, max_chars, text_fields, bad)
    if fmt == "wiki":
        return parse_wiki(lines, max_chars, bad)
    raise ValueError(f"not a line format: {fmt}")


def read_chunk(chunk: Chunk, max_chars: int, text_fields: list[str], bad: collections.Counter) -> Iterator[str]:
    """Raw document texts of one chunk, in file order. Bad records/lines are counted in `bad`, never raised."""
    fs, fs_path = filesystem(chunk.path)
    if chunk.fmt == "parquet":
        yield from _read_parquet(fs, fs_path, chunk, text_fields, bad)
        return
    with fs.open_input_file(fs_path) as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    header = None
    if chunk.fmt == "tsv" and chunk.start > 0:  # a later chunk: the header sits at the top of the file
        with fs.open_input_stream(fs_path) as f:
            header = _tsv_header(f.read(1 << 16))
    yield from parse_lines(chunk.fmt, lines, max_chars, text_fields, bad, header)


def _read_parquet(fs, fs_path, chunk: Chunk, text_fields: list[str], bad: collections.Counter) -> Iterator[str]:
    import pyarrow.parquet as pq

    n = chunk.end - chunk.start
    try:
        with fs.open_input_file(fs_path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            field = next((t for t in text_fields if t in names), None)
            if field is None:
                bad["no_text_field"] += n
                return
            table = pf.read_row_group(chunk.row_group, columns=[field])
        values = table.column(0).slice(chunk.start, n).to_pylist()
    except Exception:  # noqa: BLE001 - a corrupt page costs this row group slice, not the run
        bad["corrupt_parquet"] += 1
        return
    for value in values:
        if value is None:
            yield ""
        elif isinstance(value, str):
            yield value
        else:
            bad["no_text_field"] += 1


def read_file_lines(path: str) -> Iterator[bytes]:
    """Stream a text file line by line (bytes, newline kept) from any pyarrow filesystem."""
    fs, fs_path = filesystem(path)
    with fs.open_input_stream(fs_path) as raw:
        yield from io.BufferedReader(raw, 1 << 20)


def iter_documents(inputs: list[str], cfg, skipped: collections.Counter | None = None) -> Iterator[str]:
    """Plain-Python stream of cleaned document texts in input order (used to train the tokenizer).

    Applies the same reading, normalisation, length filters, dedup and `max_docs` as the pipeline, minus
    Kiwi. Memory stays flat except the dedup set (8 bytes of hash per distinct document, ~70 B in a set).
    """
    skipped = skipped if skipped is not None else collections.Counter()
    seen: set[int] = set()
    produced = 0
    for src in expand_inputs(inputs, cfg.format):
        if src.fmt == "parquet":
            docs = (d for c in plan_chunks([src], 1 << 62, skipped)
                    for d in read_chunk(c, cfg.max_line_chars, cfg.text_fields, skipped))
        else:
            docs = parse_lines(src.fmt, read_file_lines(src.path), cfg.max_line_chars, cfg.text_fields, skipped)
        for raw in docs:
            text, reason = clean_document(raw, cfg.normalize, cfg.min_doc_chars)
            if reason is None and cfg.dedup:
                h = text_hash(text)
                reason = "duplicate" if h in seen else None
                seen.add(h)
            if reason is not None:
                skipped[reason] += 1
                continue
            yield text
            produced += 1
            if cfg.max_docs is not None and produced >= cfg.max_docs:
                return


def chunk_to_dict(chunk: Chunk) -> dict:
    return asdict(chunk)


def vocabulary_texts(inputs: list[str], cfg, limit: int | None = None) -> Iterator[str]:
    """`iter_documents` (at most `limit`) for learning a tokenizer's vocabulary, with a `UserError` naming the
    inputs and the skip counts when no document survives. It is raised mid-training, so nothing is saved: a
    tokenizer of special tokens alone would be kept and reused, and turn a later, fixed run's text into [UNK]."""
    corpus_files(inputs, cfg.format)
    skipped: collections.Counter = collections.Counter()
    produced = 0
    for text in iter_documents(inputs, cfg, skipped):
        yield text
        produced += 1
        if limit is not None and produced >= limit:
            return
    if not produced:
        read = sum(skipped[r] for r in DOC_REASONS)
        raise UserError(f"{', '.join(inputs)}: no document survived ({read} read; skipped: {describe_skips(skipped)}); "
                        "check the inputs, format, text_fields, min_doc_chars and max_line_chars")
