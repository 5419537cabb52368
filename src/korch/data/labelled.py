"""Labelled datasets (classification, sentence pairs): TSV/CSV/JSONL/parquet rows -> tokenised parquet shards.

    prepare_labelled(stage.data, tokenizer_dir, "runs/x/cls/data", seed=42)

Data flow and why:
- Files are small next to a pretraining corpus (MBs), so the driver reads and parses every row itself
  (`read_records`), maps labels, drops bad rows with a counted reason, and makes the train/validation split.
  Only tokenisation is parallel: the kept rows go to Ray Data in chunks of `_CHUNK_ROWS`, through an actor
  pool whose actors each load the Hugging Face tokenizer once, with `preserve_order` so the shards are
  byte-identical for the same input, config, tokenizer and seed.
- The output has the corpus pipeline's layout (`train/`, `validation/`, `manifest.json` with `shards` and
  `row_groups`), so `epoch_units` and the workers' reader (`korch.data.stream`) read it unchanged.

Reading rules are `korch.data.records`'. Every data row (bad ones included) has a source index, `row_id`,
counted from 0 after the header, per file; `data.max_docs` caps the rows read.

Counts in the manifest: `rows_in == train rows + validation rows + sum(skipped.values())`.

Row schema: `input_ids` list<int32> ([CLS] text [SEP] (pair [SEP]), <= seq_len), `token_type_ids` list<int8>
(zeros without a pair), `label` int64 (index into `labels`), `row_id` int64 (the row's index in its source
file, see above).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa

from korch.errors import UserError

from .readers import filesystem
from .records import RecordFile, expand_labelled_inputs, read_records, resolve_column
from .shards import ShardWriter

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
SKIP_REASONS = ("bad_line", "no_label", "label_not_in_map", "label_not_numeric", "empty_text")
LABELLED_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("token_type_ids", pa.list_(pa.int8())),
    ("label", pa.int64()),
    ("row_id", pa.int64()),
])
# Config fields that change the output; resources (actors, CPUs) do not.
_OUTPUT_FIELDS = ("format", "text_fields", "seq_len", "max_docs", "validation_fraction", "train_on_validation",
                  "text_column", "text_pair_column", "label_column", "columns", "labels", "label_bins")
_CHUNK_ROWS = 1024  # rows per Ray Data block: ~10-50 ms of tokenising, so per-block overhead stays small


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def label_key(value: Any) -> str | None:
    """A label's canonical name: "1", 1 and 1.0 are all "1"; None or blank is None (no label)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    number = _as_number(value)
    if number is not None:
        return str(int(number)) if number.is_integer() else repr(number)
    return str(value)


def infer_labels(values: Iterable[Any]) -> list[str]:
    """Sorted distinct label names; numbers sort numerically and before names."""
    keys = {k for k in map(label_key, values) if k is not None}
    return sorted(keys, key=lambda k: (0, _as_number(k), "") if _as_number(k) is not None else (1, 0.0, k))


class LabelMap:
    """Raw label value -> (id, None) or (None, skip reason)."""

    def __init__(self, names: list[str], bins: list[float] | None = None):
        self.names, self.bins = list(names), bins
        self.index = {label_key(n): i for i, n in enumerate(self.names)}
        # A bare integer is taken as an id only when the names are not numbers themselves: with names
        # "1".."10", the value 0 is an unknown rating, not "the first class".
        self.ids_allowed = not any(_as_number(n) is not None for n in self.names)

    def __call__(self, value: Any) -> tuple[int | None, str | None]:
        key = label_key(value)
        if key is None:
            return None, "no_label"
        if self.bins is not None:
            number = _as_number(value)
            if number is None:
                return None, "label_not_numeric"
            return bisect.bisect_left(self.bins, number), None
        if key in self.index:
            return self.index[key], None
        number = _as_number(value)
        if self.ids_allowed and number is not None and number.is_integer() and 0 <= number < len(self.names):
            return int(number), None
        return None, "label_not_in_map"


def build_label_map(data, train_values: Iterable[Any]) -> LabelMap:
    if data.label_bins is not None:
        names = data.labels or [str(i) for i in range(len(data.label_bins) + 1)]
        return LabelMap(names, list(data.label_bins))
    if data.labels is not None:
        return LabelMap(list(data.labels))
    names = infer_labels(train_values)
    if not names:
        raise UserError(f"data.label_column '{data.label_column}': no training row has a label; "
                        "check the column or set data.labels")
    return LabelMap(names)


# --- rows ---------------------------------------------------------------------------------------------------

@dataclass
class LabelledRow:
    text: str
    pair: str | None
    label: int
    row_id: int


@dataclass
class _Source:
    """One file's rows with the columns resolved, before label mapping."""

    rf: RecordFile
    text_column: str
    pair_column: str | None
    label_column: str


def _load_sources(data, inputs: list[str], skipped: collections.Counter) -> list[_Source]:
    sources, budget = [], data.max_docs
    for path in expand_labelled_inputs(inputs):
        if budget is not None and budget <= 0:
            break
        rf = read_records(path, data.format, data.columns, budget, skipped)
        budget = None if budget is None else budget - len(rf.records)
        text = resolve_column(rf, data.text_column, data.text_fields, "data.text_column")
        pair = resolve_column(rf, data.text_pair_column, (), "data.text_pair_column") if data.text_pair_column else None
        label = resolve_column(rf, data.label_column, (), "data.label_column")
        sources.append(_Source(rf, text, pair, label))
    return sources


def _map_rows(sources: list[_Source], labels: LabelMap, skipped: collections.Counter) -> list[LabelledRow]:
    rows = []
    for src in sources:
        for row_id, record in src.rf.records:
            if record is None:
                continue  # a bad line, already counted
            label, reason = labels(record.get(src.label_column))
            if reason is None:
                text = _text(record.get(src.text_column))
                pair = _text(record.get(src.pair_column)) if src.pair_column else None
                if not text.strip() or (src.pair_column and not pair.strip()):
                    reason = "empty_text"
            if reason is not None:
                skipped[reason] += 1
                continue
            rows.append(LabelledRow(text, pair, label, row_id))
    return rows


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _class_counts(rows: list[LabelledRow], names: list[str]) -> dict[str, int]:
    counts = collections.Counter(r.label for r in rows)
    return {name: counts.get(i, 0) for i, name in enumerate(names)}


def stratified_split(labels: list[int], fraction: float, seed: int) -> list[bool]:
    """`is_validation` per row: round(fraction * n_c) rows of each class c, drawn with a (seed, class) rng.

    A class keeps at least one training row. Deterministic for a seed; rows keep their input order.
    """
    import numpy as np

    by_class: dict[int, list[int]] = collections.defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    is_val = [False] * len(labels)
    for cls in sorted(by_class):
        members = by_class[cls]
        take = min(int(round(fraction * len(members))), len(members) - 1)
        if take <= 0:
            continue
        rng = np.random.default_rng([seed % (2**63), cls])
        for j in rng.choice(len(members), size=take, replace=False):
            is_val[members[j]] = True
    return is_val


@dataclass
class LabelledSplits:
    """Parsed, labelled and split rows (before tokenising), with what was skipped and why."""

    labels: LabelMap
    train: list[LabelledRow]
    validation: list[LabelledRow]
    skipped: collections.Counter
    rows_in: int
    """Rows read (bad lines included): `rows_in == len(train) + len(validation) + sum(skipped.values())`."""
    text_column: str
    text_pair_column: str | None
    label_column: str


def build_splits(data, seed: int) -> LabelledSplits:
    """Read `data.inputs` (and `data.validation_inputs`), map labels, drop bad rows, split train/validation."""
    skipped: collections.Counter = collections.Counter()
    train_sources = _load_sources(data, list(data.inputs), skipped)
    if not train_sources:
        raise UserError(f"no labelled files found in {', '.join(data.inputs) or 'data.inputs'}; "
                        "name tsv, csv, jsonl or parquet files")
    val_sources = _load_sources(data, list(data.validation_inputs), skipped) if data.validation_inputs else []
    train_values = [r.get(s.label_column) for s in train_sources for _, r in s.rf.records if r is not None]
    labels = build_label_map(data, train_values)
    rows_in = sum(len(s.rf.records) for s in train_sources + val_sources)
    train = _map_rows(train_sources, labels, skipped)
    if val_sources:
        validation = _map_rows(val_sources, labels, skipped)
    else:
        is_val = stratified_split([r.label for r in train], data.validation_fraction, seed)
        validation = [r for r, v in zip(train, is_val) if v]
        train = [r for r, v in zip(train, is_val) if not v]
    if data.train_on_validation:  # a full-data retrain: the same split, with its held-out rows trained on too
        train, validation = train + validation, []
    first = train_sources[0]
    return LabelledSplits(labels, train, validation, skipped, rows_in, first.text_column, first.pair_column,
                          first.label_column)


def iter_labelled_texts(data) -> Iterator[str]:
    """Texts (and text pairs) of the training inputs, for training a tokenizer on them; labels are not checked."""
    skipped: collections.Counter = collections.Counter()
    for src in _load_sources(data, list(data.inputs), skipped):
        for _, record in src.rf.records:
            if record is None:
                continue
            for column in (src.text_column, src.pair_column):
                if column is not None:
                    text = _text(record.get(column))
                    if text.strip():
                        yield text


# --- tokenising ---------------------------------------------------------------------------------------------

class LabelledTokenizer:
    """Ray Data callable class: loads the tokenizer once per actor, tokenises a batch of rows."""

    def __init__(self, tokenizer_dir: str, seq_len: int, has_pair: bool):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.seq_len, self.has_pair = seq_len, has_pair

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        pairs = batch.column("pair").to_pylist() if self.has_pair else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.seq_len, return_token_type_ids=True,
                             return_attention_mask=False)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids") if self.has_pair else None
        return pa.table({
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "token_type_ids": pa.array(types or [[0] * len(x) for x in ids], pa.list_(pa.int8())),
            "label": batch.column("label"),
            "row_id": batch.column("row_id"),
            "split": batch.column("split"),
        })


def _row_tables(rows_by_split: dict[str, list[LabelledRow]]) -> list[pa.Table]:
    tables = []
    for s_index, split in enumerate(SPLITS):
        rows = rows_by_split[split]
        for a in range(0, len(rows), _CHUNK_ROWS):
            part = rows[a:a + _CHUNK_ROWS]
            tables.append(pa.table({
                "text": pa.array([r.text for r in part], pa.string()),
                "pair": pa.array([r.pair or "" for r in part], pa.string()),
                "label": pa.array([r.label for r in part], pa.int64()),
                "row_id": pa.array([r.row_id for r in part], pa.int64()),
                "split": pa.array([s_index] * len(part), pa.int8()),
            }))
    return tables


def _ray_tokenise(tables: list[pa.Table], data, tokenizer_dir: str) -> Iterator[pa.Table]:
    import ray

    ctx = ray.data.DataContext.get_current()
    order, bars = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # shard bytes depend on the order
    ctx.enable_progress_bars = False  # korch prints its own progress line
    try:
        from .pool import cluster_pool_shape

        pool = cluster_pool_shape(data, chunks=len(tables))
        ds = ray.data.from_arrow(tables)
        ds = ds.map_batches(
            LabelledTokenizer,
            fn_constructor_args=(os.path.abspath(tokenizer_dir), data.seq_len, data.text_pair_column is not None),
            batch_size=_CHUNK_ROWS,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.actor_cpus,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = order, bars


def _local_tokenise(tables: list[pa.Table], data, tokenizer_dir: str) -> Iterator[pa.Table]:
    tokenize = LabelledTokenizer(os.path.abspath(tokenizer_dir), data.seq_len, data.text_pair_column is not None)
    for table in tables:
        yield tokenize(table)


# --- the pipeline -------------------------------------------------------------------------------------------

def build_fingerprint(data, train_files: list[str], val_files: list[str], tokenizer_dir: str, seed: int) -> str:
    tok = os.path.join(tokenizer_dir, "tokenizer.json")
    tok_hash = hashlib.sha256(open(tok, "rb").read()).hexdigest() if os.path.isfile(tok) else os.path.abspath(tokenizer_dir)

    def stat(path: str) -> list:
        fs, fs_path = filesystem(path)
        info = fs.get_file_info(fs_path)
        return [path, info.size, int(info.mtime_ns or 0)]

    payload = {
        "version": FORMAT_VERSION,
        "kind": "labelled",
        "config": {k: getattr(data, k) for k in _OUTPUT_FIELDS},
        "train": [stat(p) for p in train_files],
        "validation": [stat(p) for p in val_files],
        "tokenizer": tok_hash,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepare_labelled(data, tokenizer_dir: str, output_dir: str, seed: int, progress: bool = False,
                     engine: str = "ray") -> dict:
    """Read, label, split and tokenise `data.inputs` into `output_dir/{train,validation}/*.parquet` +
    `manifest.json`; return the manifest.

    Idempotent: when `output_dir/manifest.json` has the same fingerprint (inputs' path/size/mtime, the
    output-relevant `data` fields, tokenizer.json, seed) it is returned as is. `engine="local"` tokenises in
    this process without Ray (small tests, reference output). Starts a private local Ray when none runs.
    """
    if not data.inputs:
        raise UserError("data.inputs is empty; give the labelled training files (tsv, csv, jsonl or parquet)")
    tokenizer_dir, output_dir = str(tokenizer_dir), os.path.abspath(str(output_dir))
    train_files = expand_labelled_inputs(data.inputs)
    val_files = expand_labelled_inputs(data.validation_inputs)
    if not train_files:
        raise UserError(f"no labelled files found in {', '.join(data.inputs)}; name the files (tsv, csv, jsonl, parquet)")
    fingerprint = build_fingerprint(data, train_files, val_files, tokenizer_dir, seed)
    manifest_path = os.path.join(output_dir, "manifest.json")
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == fingerprint:
            print(f"[korch] labelled data: {output_dir} is up to date (same inputs, config, tokenizer and seed); reusing it",
                  file=sys.stderr, flush=True)
            return old

    started = time.perf_counter()
    splits_in = build_splits(data, seed)
    rows_by_split = {"train": splits_in.train, "validation": splits_in.validation}
    tables = _row_tables(rows_by_split)

    tmp = os.path.join(output_dir, f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ray_started = False
    try:
        if engine == "ray" and tables:
            from .pipeline import ensure_ray_for_pool

            ray_started = ensure_ray_for_pool(data)
            batches = _ray_tokenise(tables, data, tokenizer_dir)
        else:
            batches = _local_tokenise(tables, data, tokenizer_dir)
        writers = {s: ShardWriter(os.path.join(tmp, s), s, schema=LABELLED_SCHEMA) for s in SPLITS}
        total, done, last = len(splits_in.train) + len(splits_in.validation), 0, time.perf_counter()
        try:
            for table in batches:
                split_col = table.column("split").to_pylist()
                for row, s_index in zip(table.drop_columns(["split"]).to_pylist(), split_col):
                    writers[SPLITS[s_index]].write(row)
                done += table.num_rows
                if progress and (time.perf_counter() - last > 2.0 or done == total):
                    last = time.perf_counter()
                    print(f"[korch] labelled data: {done}/{total} rows tokenised", file=sys.stderr, flush=True)
        finally:
            if hasattr(batches, "close"):
                batches.close()
        shards = []
        splits = {}
        for s in SPLITS:
            shards.extend(writers[s].close())
            splits[s] = {"rows": writers[s].rows, "tokens": writers[s].tokens}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if ray_started:
            import ray

            ray.shutdown()

    # Swap the new shards in, then write the manifest last: a folder with a manifest is always complete.
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    for s in SPLITS:
        shutil.rmtree(os.path.join(output_dir, s), ignore_errors=True)
        os.replace(os.path.join(tmp, s), os.path.join(output_dir, s))
    shutil.rmtree(tmp, ignore_errors=True)
    names = splits_in.labels.names
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "labelled",
        "fingerprint": fingerprint,
        "inputs": train_files,
        "validation_inputs": val_files,
        "tokenizer": os.path.abspath(tokenizer_dir),
        "seed": seed,
        "seq_len": data.seq_len,
        "labels": names,
        "label_bins": data.label_bins,
        "text_column": splits_in.text_column,
        "text_pair_column": splits_in.text_pair_column,
        "label_column": splits_in.label_column,
        "rows_in": splits_in.rows_in,
        "rows": splits["train"]["rows"] + splits["validation"]["rows"],
        "tokens": splits["train"]["tokens"] + splits["validation"]["tokens"],
        "skipped": dict(sorted(splits_in.skipped.items())),
        "skip_reasons": list(SKIP_REASONS),
        "counts_rule": "rows_in == rows + sum(skipped.values())",
        "class_counts": {s: _class_counts(rows, names) for s, rows in rows_by_split.items()},
        "splits": splits,
        "shards": shards,
        "config": {k: getattr(data, k) for k in _OUTPUT_FIELDS},
        "seconds": round(time.perf_counter() - started, 2),
    }
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest
