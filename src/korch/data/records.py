"""Labelled files as records: TSV, CSV, JSONL or parquet rows as dicts, with their source row index.

TSV is split on tabs with quoting off (the shipped TSVs hold literal `"`); CSV uses standard quoting. Without
`columns` the first row is the header. A line with the wrong field count, or invalid JSON, becomes `None` and is
counted as `bad_line`. Used by `korch.data.labelled` (training data) and `korch predict` (inference input).
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from korch.errors import UserError

from .readers import ENCODING_SAMPLE, check_utf8, filesystem

LABELLED_EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                       ".parquet": "parquet", ".pq": "parquet", ".txt": None, "": None}


# --- reading ------------------------------------------------------------------------------------------------

@dataclass
class RecordFile:
    """The parsed rows of one labelled file. `records` are (row_id, {column: value}) in file order."""

    path: str
    fmt: str
    columns: list[str]
    records: list[tuple[int, dict]] = field(default_factory=list)


def detect_format(path: str, fmt: str = "auto") -> str:
    """`tsv`, `csv`, `jsonl` or `parquet`, from `fmt` or else the extension and (for .txt) the first bytes."""
    if fmt != "auto":
        if fmt not in ("tsv", "csv", "jsonl", "parquet"):
            raise UserError(f"{path}: data.format '{fmt}' is not a labelled format; use tsv, csv, jsonl, parquet or auto")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    known = LABELLED_EXTENSIONS.get(ext, None)
    if known:
        return known
    head = _read_head(path)
    if head.startswith(b"PAR1"):
        return "parquet"
    first_line = head.lstrip(b"\xef\xbb\xbf").split(b"\n", 1)[0]
    if first_line.lstrip().startswith(b"{"):
        return "jsonl"
    if b"\t" in first_line:
        return "tsv"
    raise UserError(f"{path}: cannot tell the file's format (no tab in the first line, not JSON or parquet); "
                    "set data.format to tsv, csv, jsonl or parquet")


def _read_head(path: str, n: int = 4096) -> bytes:
    fs, fs_path = filesystem(path)
    try:
        with fs.open_input_stream(fs_path) as f:
            return f.read(n)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the file ({exc}); check the path and permissions") from None


def _read_bytes(path: str) -> bytes:
    fs, fs_path = filesystem(path)
    try:
        with fs.open_input_stream(fs_path) as f:
            return f.read()
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the file ({exc}); check the path and permissions") from None


def read_records(path: str, fmt: str = "auto", columns: list[str] | None = None, max_rows: int | None = None,
                 skipped: collections.Counter | None = None) -> RecordFile:
    """Read one TSV/CSV/JSONL/parquet file into a `RecordFile`.

    `columns` names the columns of a header-less TSV/CSV (ignored for jsonl and parquet). Lines with the
    wrong number of fields, undecodable bytes or invalid JSON are counted as `bad_line` in `skipped` and
    still use up a `row_id`; blank lines are ignored. `max_rows` caps the rows read (bad ones included).
    An unreadable file raises `UserError`.
    """
    skipped = skipped if skipped is not None else collections.Counter()
    fmt = detect_format(path, fmt)
    if fmt == "parquet":
        return _read_parquet(path, max_rows)
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    check_utf8(path, data[:ENCODING_SAMPLE], whole=len(data) <= ENCODING_SAMPLE)
    if fmt == "jsonl":
        return _read_jsonl(path, data, max_rows, skipped)
    return _read_delimited(path, fmt, data, columns, max_rows, skipped)


def _split_rows(fmt: str, data: bytes, skipped: collections.Counter) -> Iterator[list[str] | None]:
    """Rows of fields; None for an undecodable line. Blank lines are dropped."""
    if fmt == "tsv":
        for raw in data.split(b"\n"):
            raw = raw.rstrip(b"\r")
            if not raw.strip():
                continue
            try:
                yield raw.decode("utf-8").split("\t")  # quoting off: a `"` is just a character
            except UnicodeDecodeError:
                yield None
        return
    # CSV: quoted fields may span lines, so decode once (bad bytes become U+FFFD) and let csv parse.
    text = data.decode("utf-8", errors="replace")
    for row in csv.reader(io.StringIO(text, newline="")):
        if row and any(cell.strip() for cell in row):
            yield row


def _read_delimited(path, fmt, data, columns, max_rows, skipped) -> RecordFile:
    rows = _split_rows(fmt, data, skipped)
    if columns is None:
        header = next(rows, None)
        if header is None:
            return RecordFile(path, fmt, [])
        columns = [c.strip() for c in header]
    out = RecordFile(path, fmt, list(columns))
    n = len(columns)
    for row_id, row in enumerate(rows):
        if max_rows is not None and row_id >= max_rows:
            break
        if row is None or len(row) != n:
            skipped["bad_line"] += 1
            out.records.append((row_id, None))
            continue
        out.records.append((row_id, dict(zip(columns, row))))
    return out


def _read_jsonl(path, data, max_rows, skipped) -> RecordFile:
    out = RecordFile(path, "jsonl", [])
    seen: dict[str, None] = {}
    row_id = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        if max_rows is not None and row_id >= max_rows:
            break
        try:
            record = json.loads(raw)
        except ValueError:  # also UnicodeDecodeError
            record = None
        if not isinstance(record, dict):
            skipped["bad_line"] += 1
            out.records.append((row_id, None))
        else:
            seen.update(dict.fromkeys(record))
            out.records.append((row_id, record))
        row_id += 1
    out.columns = list(seen)
    return out


def _read_parquet(path, max_rows) -> RecordFile:
    fs, fs_path = filesystem(path)
    try:
        with fs.open_input_file(fs_path) as f:
            table = pq.read_table(f)
    except Exception as exc:  # noqa: BLE001 - any footer/page error means the file cannot be used
        raise UserError(f"{path}: cannot read the parquet file ({exc}); check that it is complete") from None
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return RecordFile(path, "parquet", table.column_names, list(enumerate(table.to_pylist())))


def expand_labelled_inputs(inputs: Iterable[str]) -> list[str]:
    """Files, folders (sorted; hidden files, README.md and unknown extensions left out) and globs -> files."""
    import glob

    files: list[str] = []
    for item in inputs:
        if "://" in item:
            files.append(item)
        elif glob.has_magic(item):
            files.extend(sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p)))
        elif os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                for name in sorted(names):
                    ext = os.path.splitext(name)[1].lower()
                    if not name.startswith((".", "_")) and ext in LABELLED_EXTENSIONS:
                        files.append(os.path.join(root, name))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UserError(f"data input '{item}' does not exist; fix the path (relative paths resolve against "
                            "the current directory)")
    return files


def resolve_column(rf: RecordFile, wanted: str | None, fallbacks: Iterable[str], field_name: str,
                   required: bool = True) -> str | None:
    """The column to use: `wanted` if set (must exist), else the first of `fallbacks` present."""
    if wanted is not None:
        if wanted in rf.columns:
            return wanted
    else:
        found = next((c for c in fallbacks if c in rf.columns), None)
        if found is not None or not required:
            return found
    have = ", ".join(repr(c) for c in rf.columns) or "none"
    what = f"'{wanted}' is not a column" if wanted is not None else f"is unset and none of {', '.join(fallbacks)} is a column"
    hint = (" (the first row was read as the header; if the file has none, name its columns with data.columns)"
            if rf.fmt in ("tsv", "csv") else "")
    raise UserError(f"{rf.path}: {field_name} {what}; columns: {have}{hint}; set {field_name} to one of them")


# --- labels -------------------------------------------------------------------------------------------------
