"""Each training worker reads its own share of a prepared split: a new order every epoch, exact resume.

The epoch's order is `pipeline.epoch_units(seed, epoch)`: row groups in a (seed, epoch)-shuffled order, rows
shuffled inside each, the total padded with the epoch's first rows to a multiple of the world size. Rank r
takes the r-th contiguous slice of that stream, so the ranks' rows are disjoint, their union is every row,
all ranks get the same count, and each rank reads only about 1/world_size of the row groups. Everything is a
pure function of (seed, epoch, rank, world size), so a resumed worker that skips the rows it already trained
on lands exactly where the interrupted one stopped, on any node.

Workers read parquet row groups directly (pyarrow, local paths or URIs), one group at a time, with a small
read-ahead thread; the corpus is never held in memory.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import pyarrow as pa

T = TypeVar("T")


def rank_slices(plan: list[dict], rank: int, world_size: int) -> list[tuple[dict, int, int]]:
    """(unit, start, stop) pieces of the epoch stream that belong to `rank` (positions inside each unit's rows)."""
    total = sum(unit["take"] for unit in plan)
    if total % world_size:
        raise ValueError(f"the epoch plan holds {total} rows, not a multiple of {world_size} workers")
    share = total // world_size
    low, high = rank * share, (rank + 1) * share
    pieces, position = [], 0
    for unit in plan:
        begin, end = position, position + unit["take"]
        position = end
        if end <= low or begin >= high:
            continue
        pieces.append((unit, max(low, begin) - begin, min(high, end) - begin))
    return pieces


def read_piece(unit: dict, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
    """Rows [start, stop) of one unit's shuffled row group, plus `row_id` and `is_padding` columns."""
    import numpy as np
    import pyarrow.parquet as pq

    from korch.data.readers import filesystem

    fs, fs_path = filesystem(str(unit["path"]))
    with fs.open_input_file(fs_path) as handle:
        wanted = None if columns is None else [c for c in columns if c != "row_id"]
        table = pq.ParquetFile(handle).read_row_group(int(unit["row_group"]), columns=wanted)
    rng = np.random.default_rng([int(unit["seed"]), int(unit["epoch"]), int(unit["unit"])])
    order = rng.permutation(table.num_rows)[: int(unit["take"])][start:stop]
    table = table.take(pa.array(order))
    row_ids = order.astype(np.int64) + int(unit["base"])
    # Padding units sit after the real rows in the plan; their rows are repeats, flagged so evaluation skips them.
    padding = np.full(len(order), bool(unit.get("padding", False)))
    if "row_id" in table.column_names:  # labelled shards store their source row; the split index is what counts here
        table = table.drop_columns(["row_id"])
    return table.append_column("row_id", pa.array(row_ids)).append_column("is_padding", pa.array(padding))


def iter_rank_batches(plan: list[dict], rank: int, world_size: int, batch_size: int, skip_rows: int = 0,
                      columns: Sequence[str] | None = None) -> Iterator[dict[str, list]]:
    """Yield `{column: python list}` batches of this rank's share of the epoch, after skipping `skip_rows`.

    The last batch may be short. `columns` limits what is read and converted (plus `row_id`, `is_padding`).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    pieces = []
    for unit, start, stop in rank_slices(plan, rank, world_size):
        if skip_rows >= stop - start:
            skip_rows -= stop - start
            continue
        pieces.append((unit, start + skip_rows, stop))
        skip_rows = 0
    pending: list[pa.Table] = []
    held = 0
    for table in _read_ahead(pieces, columns):
        pending.append(table)
        held += table.num_rows
        while held >= batch_size:
            merged = pa.concat_tables(pending)
            yield _to_lists(merged.slice(0, batch_size))
            rest = merged.slice(batch_size)
            pending, held = [rest], rest.num_rows
    if held:
        yield _to_lists(pa.concat_tables(pending))


def _to_lists(table: pa.Table) -> dict[str, list]:
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _read_ahead(pieces: list, columns, depth: int = 2) -> Iterator[pa.Table]:
    """Read the next row groups on a thread while the caller trains on the current one."""
    if pieces:
        yield from read_ahead(lambda: (read_piece(unit, start, end, columns) for unit, start, end in pieces), depth)


def read_ahead(items: Callable[[], Iterable[T]], depth: int = 2, name: str = "korch-read-ahead") -> Iterator[T]:
    """The items of `items()`, made on a thread up to `depth` ahead of the caller. An error there is raised
    here, after the items made before it. Closing this generator stops the thread after its current item."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items():
                if stop.is_set():
                    return
                slots.put(("item", item))
        except BaseException as exc:  # handed to the consumer, which re-raises it in its own thread
            slots.put(("error", exc))
            return
        slots.put(("done", None))

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
