"""The corpus pipeline: plan chunks -> Kiwi actor pool (Ray Data) -> pack on the driver -> parquet + manifest.

    korch data prepare ../shared/data/kowiki_sample ../shared/data/korean_petitions --output scratch/p --seq-len 256

Data flow and why:
- The driver plans *chunks* (byte ranges on document boundaries, or parquet row slices) of about
  total/(actors*32) bytes, so every actor always has work and no single block holds a whole file.
- `from_items(chunks)` -> `map_batches(KoreanPreprocessor, batch_size=1, ActorPoolStrategy)`: each actor
  reads its chunk itself (no separate read tasks competing for 2 cores), cleans, runs Kiwi and WordPiece,
  and returns one Arrow table per chunk. The pool is sized to the cluster's free CPUs (`korch.data.pool`):
  on a 2-core machine 2 actors at 0.5 CPU, which fit next to the driver without the `num_cpus=1` deadlock.
- With `preserve_order`, the driver receives tables in input order, so dedup, doc ids, packing and the
  train/validation split are deterministic. Packing is cheap list work; the driver holds one block per split,
  one row group of output and the dedup hash set.

Counts in the manifest. `docs_in` is every document candidate the readers produced (a jsonl line, a parquet
row, a `<doc>`, a blank-line separated txt paragraph block), and
`docs_in == docs_out + sum(skipped[r] for r in doc_skip_reasons)`. `skipped` also holds line reasons (lines
dropped from inside a document that is kept) and file reasons (unreadable parquet files or row groups, chunks
whose file vanished), whose counts are lines and files, not documents. `tokens` and `rows` are the sums
over `splits`, and each split's rows are the sum over its `shards`. `check_counts` tests all of this.

Row schema (one row = one packed block, see `packing`): `input_ids` list<int32> ([CLS] ... [SEP], unpadded,
<= seq_len), `doc_id` int64 (first document in the block), `doc_starts`, `sentence_starts`, `word_starts`
list<int32> (offsets into input_ids; see `preprocess` for what a word start is).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Iterable, Iterator

import pyarrow as pa

from korch.errors import UserError

from .packing import Packer
from .pool import PoolShape, cluster_pool_shape, local_pool_shape, pipeline_kiwi_threads
from .readers import (Chunk, check_output_apart, chunk_to_dict, corpus_files, describe_skips, filesystem,
                      plan_chunks)
from .shards import ShardWriter
from .text import DOC_REASONS, FILE_REASONS, LINE_REASONS

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
# Config fields that change the output; resources (actors, CPUs) and masking do not.
_OUTPUT_FIELDS = ("format", "text_fields", "seq_len", "normalize", "split_sentences", "morphemes", "dedup",
                  "min_doc_chars", "max_line_chars", "max_docs", "validation_fraction")


def chunk_bytes_for(total_bytes: int, actors: int) -> int:
    """~32 chunks per actor, so the last chunks are short and no actor idles long at the tail; but no chunk
    under 32 KiB (per-chunk overhead, ~10 ms) or over 4 MiB: an actor holds a chunk and its output, and the
    driver one chunk's output, so this cap is what keeps memory flat as the corpus grows."""
    return int(min(4 << 20, max(32 << 10, total_bytes // max(1, actors * 32))))


def build_fingerprint(cfg, files, tokenizer_dir: str) -> str:
    tok = os.path.join(tokenizer_dir, "tokenizer.json")
    tok_hash = hashlib.sha256(open(tok, "rb").read()).hexdigest() if os.path.isfile(tok) else tokenizer_dir
    payload = {
        "version": FORMAT_VERSION,
        "config": {k: getattr(cfg, k) for k in _OUTPUT_FIELDS},
        "files": [[f.path, f.fmt, f.size, _mtime(f.path)] for f in files],
        "tokenizer": tok_hash,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _mtime(path: str) -> int:
    fs, fs_path = filesystem(path)
    info = fs.get_file_info(fs_path)
    return int(info.mtime_ns or 0) if info.mtime_ns is not None else 0


def local_ray_options(num_cpus: int) -> dict:
    """`ray.init` options for a private local Ray that korch starts itself.

    address="local": never join a cluster someone else started with `ray start` on this machine.
    worker_niceness 0: Ray runs workers at nice 15 by default, so on a shared machine the Kiwi actors lose
    the CPU to every normal-priority process, while a plain single-process loop would not.
    """
    return {"address": "local", "num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": False,
            "configure_logging": False, "_system_config": {"worker_niceness": 0}}


def is_prepared(path: str) -> bool:
    """True for a folder written by `korch data prepare` (it has manifest.json)."""
    return os.path.isfile(os.path.join(str(path), "manifest.json"))


def load_manifest(path: str) -> dict:
    manifest = os.path.join(str(path), "manifest.json")
    try:
        with open(manifest, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"'{path}' is not a prepared corpus (no manifest.json); run `korch data prepare` on it") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {manifest}: {exc}; delete the folder and prepare again") from None


def check_shards(manifest: dict, prepared_dir: str) -> None:
    """Every shard the manifest lists is there and holds its rows. Without this, a deleted or truncated shard
    fails every training worker, is retried as worker failures, and ends with advice to resume. Local folders
    only: one parquet footer read per shard; a remote store is read as it is."""
    prepared_dir = str(prepared_dir)
    if "://" in prepared_dir:
        return
    import pyarrow.parquet as pq

    fix = (f"prepare {prepared_dir} again (`korch data prepare`, or delete the folder and rerun the stage that "
           "made it)")
    for shard in manifest.get("shards", []):
        path = os.path.join(prepared_dir, shard["path"])
        if not os.path.isfile(path):
            raise UserError(f"{path}: a shard that {prepared_dir}/manifest.json lists is missing; {fix}")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a truncated or foreign file
            raise UserError(f"{path}: not a readable parquet shard ({str(exc).splitlines()[0][:120]}); {fix}") from None
        if rows != shard["rows"]:
            raise UserError(f"{path}: holds {rows} rows where manifest.json says {shard['rows']}; {fix}")


class Progress:
    """A rows/s line on stderr every few seconds while the pipeline runs; also times start-up vs steady state."""

    def __init__(self, enabled: bool, every_s: float = 2.0):
        self.enabled, self.every_s = enabled, every_s
        self.start = self.last = time.perf_counter()
        self.first: float | None = None
        self.first_docs = self.docs = 0
        self.elapsed = 0.0

    def steady_rate(self) -> float | None:
        if self.first is None or self.elapsed - self.first < 1e-3 or self.docs <= self.first_docs:
            return None
        return round((self.docs - self.first_docs) / (self.elapsed - self.first), 1)

    def update(self, docs_in: int, docs_out: int, rows: int, force: bool = False) -> None:
        now = time.perf_counter()
        if self.first is None and docs_in:  # start-up ends when the first chunk's documents arrive
            self.first, self.first_docs = now - self.start, docs_in
        self.elapsed, self.docs = now - self.start, docs_in
        if not self.enabled or (now - self.last < self.every_s and not force):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        line = (f"korch data: {docs_in} docs read, {docs_out} kept, {rows} blocks, "
                f"{docs_in / elapsed:.0f} docs/s, {rows / elapsed:.0f} rows/s, {elapsed:.0f}s")
        if sys.stderr.isatty():  # a terminal gets one line redrawn in place, ended by the last (forced) update
            sys.stderr.write("\r\x1b[2K" + line + ("\n" if force else ""))
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)


def consume(tables: Iterable[pa.Table | dict], cfg, cls_id: int, sep_id: int, out_dir: str,
            skipped: collections.Counter, progress: Progress) -> dict:
    """Dedup, split, pack and write preprocessed document tables, or their columns as dicts (in order).
    Returns counts for the manifest."""
    writers = {s: ShardWriter(os.path.join(out_dir, s), s) for s in SPLITS}
    packers = {s: Packer(cfg.seq_len, cls_id, sep_id) for s in SPLITS}
    seen: set[int] = set()
    docs_in = docs_out = 0
    doc_reasons = set(DOC_REASONS)
    done = False
    for table in tables:
        cols = table if isinstance(table, dict) else {name: table.column(name).to_pylist() for name in table.column_names}
        for i, reason in enumerate(cols["skip"]):
            if reason:
                skipped[reason] += cols["count"][i]
                docs_in += cols["count"][i] if reason in doc_reasons else 0
                continue
            docs_in += 1
            if cfg.dedup:
                h = cols["hash"][i]
                if h in seen:
                    skipped["duplicate"] += 1
                    continue
                seen.add(h)
            split = "validation" if cols["is_val"][i] else "train"
            for block in packers[split].add(docs_out, cols["ids"][i], cols["sent_starts"][i], cols["word_starts"][i]):
                writers[split].write(block)
            docs_out += 1
            if cfg.max_docs is not None and docs_out >= cfg.max_docs:
                done = True
                break
        progress.update(docs_in, docs_out, writers["train"].rows + writers["validation"].rows)
        if done:
            break
    splits, shards = {}, []
    for s in SPLITS:
        for block in packers[s].flush():
            writers[s].write(block)
        shards.extend(writers[s].close())
        splits[s] = {"rows": writers[s].rows, "tokens": writers[s].tokens}
    progress.update(docs_in, docs_out, splits["train"]["rows"] + splits["validation"]["rows"], force=True)
    return {"docs_in": docs_in, "docs_out": docs_out, "splits": splits, "shards": shards}


def _ray_tables(chunks: list[Chunk], cfg, tokenizer_dir: str, pool: PoolShape) -> Iterator[pa.Table]:
    import ray

    from .preprocess import KoreanPreprocessor

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # dedup, doc ids and packing depend on the order
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # korch prints its own rows/s line; restored below for the caller
    items = [chunk_to_dict(c) for c in chunks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    actor_cfg = cfg.model_copy(update={"inputs": []})  # actors need settings, not the input list
    ds = ds.map_batches(
        KoreanPreprocessor,
        fn_constructor_args=(actor_cfg, os.path.abspath(tokenizer_dir), pool.kiwi_threads),
        batch_size=1,
        batch_format="numpy",
        # 2 chunks in flight per actor: one running, one queued, so no actor idles between chunks and the
        # tail is not stuck behind a deep queue on one actor.
        compute=ray.data.ActorPoolStrategy(size=pool.actors, max_tasks_in_flight_per_actor=2),
        num_cpus=pool.actor_cpus,
    )
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    finally:
        ctx.enable_progress_bars = bars


def _inline_tables(chunks: list[Chunk], cfg, tokenizer_dir: str, kiwi_threads: int, chunk_bytes: int) -> Iterator[dict]:
    """The driver's own Kiwi, one thread per free CPU, fed one stream over all chunks (small machines, see `pool`).

    WordPiece starts in a helper process before Kiwi is built (`preencode`), where the tokenizer allows it and
    sentences are split; the shards are the same either way.
    """
    from .preencode import WordPieceAhead, sliceable
    from .preprocess import DocumentProcessor

    ahead = None
    if chunks and cfg.split_sentences and not cfg.morphemes and sliceable(_tokenizer_json(tokenizer_dir)):
        ahead = WordPieceAhead(chunks, tokenizer_dir, cfg, chunk_bytes)
    try:
        processor = DocumentProcessor(cfg, tokenizer_dir, kiwi_threads=kiwi_threads)
        yield from processor.stream_columns(chunks, ahead)
    finally:
        if ahead is not None:
            ahead.close()


def _tokenizer_json(tokenizer_dir: str) -> dict:
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        return json.load(f)


def _local_tables(chunks: list[Chunk], cfg, tokenizer_dir: str) -> Iterator[pa.Table]:
    from .preprocess import DocumentProcessor

    processor = DocumentProcessor(cfg, tokenizer_dir)
    for chunk in chunks:
        yield processor.process_chunks([chunk])


def prepare_corpus(cfg, tokenizer_dir: str, output_dir: str, seed: int = 42, progress: bool = True,
                   engine: str = "ray") -> dict:
    """Prepare `cfg.inputs` into `output_dir/{train,validation}/*.parquet` + `manifest.json`; return the manifest.

    Idempotent: when `output_dir/manifest.json` has the same fingerprint (output-relevant config, input
    files with size and mtime, tokenizer.json hash) it is returned as is. `seed` does not change the output
    (order is input order and the split is by text hash); it is accepted so callers can pass the stage seed.
    `engine="local"` runs the same steps in this process without Ray (benchmark reference, small tests).
    With `engine="ray"`: under 4 free CPUs on one local machine (and no pool settings) the driver runs Kiwi
    itself and Ray is not needed (`korch.data.pool`); otherwise starts a local Ray (2-4 CPUs) if none is
    running, and shuts it down again.
    """
    from .preprocess import special_ids

    if not cfg.inputs:
        raise UserError("data.inputs is empty; give corpus files or folders")
    tokenizer_dir = str(tokenizer_dir)
    output_dir = os.path.abspath(str(output_dir))
    ignored: list[str] = []
    files = corpus_files(list(cfg.inputs), cfg.format, ignored)
    check_output_apart(list(cfg.inputs), output_dir, "the prepared data folder")
    fingerprint = build_fingerprint(cfg, files, tokenizer_dir)
    if is_prepared(output_dir):
        old = load_manifest(output_dir)
        if old.get("fingerprint") == fingerprint:
            return old
    cls_id, sep_id = special_ids(tokenizer_dir)

    started = time.perf_counter()
    skipped: collections.Counter = collections.Counter()
    total = sum(f.size for f in files)
    tmp = os.path.join(output_dir, f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ray_started = False
    inline_threads = pipeline_kiwi_threads(cfg) if engine == "ray" else None
    try:
        if inline_threads is not None:
            pool = PoolShape(1, float(inline_threads), inline_threads)
        elif engine == "ray":
            ray_started = ensure_ray_for_pool(cfg)
            pool = cluster_pool_shape(cfg)
        else:
            pool = local_pool_shape(cfg)
        chunk_bytes = chunk_bytes_for(total, pool.actors)
        chunks = plan_chunks(files, chunk_bytes, skipped)
        if inline_threads is not None:
            tables = _inline_tables(chunks, cfg, tokenizer_dir, inline_threads, chunk_bytes)
        elif engine == "ray" and chunks:
            tables = _ray_tables(chunks, cfg, tokenizer_dir, pool._replace(actors=min(pool.actors, len(chunks))))
        else:
            tables = _local_tables(chunks, cfg, tokenizer_dir) if chunks else (t for t in ())
        meter = Progress(progress)
        try:
            counts = consume(tables, cfg, cls_id, sep_id, tmp, skipped, meter)
        finally:
            tables.close()  # stops the Ray execution when max_docs ended the stream early
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    elapsed = time.perf_counter() - started

    # Swap the new shards in, then write the manifest last: a folder with a manifest is always complete.
    if os.path.exists(os.path.join(output_dir, "manifest.json")):
        os.remove(os.path.join(output_dir, "manifest.json"))
    for s in SPLITS:
        shutil.rmtree(os.path.join(output_dir, s), ignore_errors=True)
        os.replace(os.path.join(tmp, s), os.path.join(output_dir, s))
    shutil.rmtree(tmp, ignore_errors=True)
    splits = counts["splits"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "inputs": [f.path for f in files],
        "ignored_files": ignored,
        "tokenizer": os.path.abspath(tokenizer_dir),
        "seq_len": cfg.seq_len,
        "docs_in": counts["docs_in"],
        "docs_out": counts["docs_out"],
        "tokens": splits["train"]["tokens"] + splits["validation"]["tokens"],
        "rows": splits["train"]["rows"] + splits["validation"]["rows"],
        "skipped": dict(sorted(skipped.items())),
        "doc_skip_reasons": list(DOC_REASONS),
        "line_skip_reasons": list(LINE_REASONS),
        "file_skip_reasons": list(FILE_REASONS),
        "counts_rule": "docs_in == docs_out + sum(skipped[r] for r in doc_skip_reasons)",
        "splits": splits,
        "shards": counts["shards"],
        "config": {k: getattr(cfg, k) for k in _OUTPUT_FIELDS},
        "seconds": round(elapsed, 2),
        "seconds_to_first_docs": round(meter.first, 2) if meter.first is not None else None,
        # Throughput once the actors are up (Kiwi loaded): what a long corpus converges to.
        "steady_docs_per_s": meter.steady_rate(),
        "docs_per_s": round(counts["docs_in"] / elapsed, 1) if elapsed > 0 else None,
    }
    with open(os.path.join(output_dir, "manifest.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=2)
    os.replace(os.path.join(output_dir, "manifest.json.tmp"), os.path.join(output_dir, "manifest.json"))
    return manifest


def ensure_ray_for_pool(cfg) -> bool:
    """Start a private local Ray if none is running (returns True when this call started it), and refuse a
    preprocessing pool the cluster could never schedule: it would wait forever for its actors."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(**local_ray_options(max(2, min(4, os.cpu_count() or 2))))
        started = True
    if cfg.preprocess_actors is None:
        return started  # sized to what is free (korch.data.pool), so it always fits
    pool = cluster_pool_shape(cfg)
    need, have = pool.actors * pool.actor_cpus, ray.cluster_resources().get("CPU", 0)
    if need > have:
        if started:
            ray.shutdown()
        raise UserError(f"data.preprocess_actors x data.actor_cpus = {need:g} CPUs, but the Ray cluster has "
                        f"{have:g}; lower preprocess_actors or actor_cpus (e.g. 0.5)")
    return started


def check_counts(manifest: dict) -> list[str]:
    """The manifest's arithmetic, as a list of violations (empty when it adds up)."""
    problems = []
    doc_skips = sum(manifest["skipped"].get(r, 0) for r in manifest["doc_skip_reasons"])
    if manifest["docs_in"] != manifest["docs_out"] + doc_skips:
        problems.append(f"docs_in {manifest['docs_in']} != docs_out {manifest['docs_out']} + doc skips {doc_skips}")
    splits = manifest["splits"]
    if manifest["tokens"] != sum(s["tokens"] for s in splits.values()):
        problems.append("tokens != sum of split tokens")
    for s in SPLITS:
        rows = sum(sh["rows"] for sh in manifest["shards"] if sh["path"].startswith(s + "/"))
        if rows != splits[s]["rows"]:
            problems.append(f"{s}: shard rows {rows} != split rows {splits[s]['rows']}")
    return problems


# --- reading prepared data for training ---------------------------------------------------------------------

def rows_per_worker(manifest: dict, split: str, world_size: int) -> int:
    """Rows each of `world_size` workers reads per epoch (`korch.data.stream`; the total is padded up to a multiple)."""
    return math.ceil(manifest["splits"][split]["rows"] / world_size)


def epoch_units(manifest: dict, prepared_dir: str, split: str, seed: int, epoch: int, world_size: int) -> list[dict]:
    """The epoch's read plan: row groups in a (seed, epoch)-shuffled order, then padding units.

    Each unit is one parquet row group whose rows are shuffled again inside the read (by a generator seeded
    with seed, epoch and the unit's own index): a two-level shuffle that needs one row group in memory, not
    the dataset. Padding: every rank must take the same number of rows (ZeRO steps are collective), so the epoch
    is extended with the first `pad` rows of the epoch order, making the total a
    multiple of n; those few rows are seen twice per epoch (flagged `padding`), none is dropped.
    """
    import numpy as np

    units, base = [], 0
    for shard in manifest["shards"]:
        if not shard["path"].startswith(split + "/"):
            continue
        for g, rows in enumerate(shard.get("row_groups") or [shard["rows"]]):
            units.append({"path": _join(prepared_dir, shard["path"]), "row_group": g, "rows": rows,
                          "base": base, "unit": len(units), "take": rows})
            base += rows
    order = np.random.default_rng([seed, epoch]).permutation(len(units)).tolist()
    plan = [units[i] for i in order]
    pad = (-base) % world_size
    k = 0
    while pad > 0 and plan:
        unit = dict(plan[k % len(plan)])
        unit["take"] = min(pad, unit["rows"])
        unit["padding"] = True
        plan.append(unit)
        pad -= unit["take"]
        k += 1
    for item in plan:
        item.update(seed=seed, epoch=epoch)
    return plan


def _join(prepared_dir: str, rel: str) -> str:
    return prepared_dir.rstrip("/") + "/" + rel
