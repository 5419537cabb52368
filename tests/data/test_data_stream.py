"""Each worker's share of an epoch: 2 workers get disjoint rows whose union is every row, none is lost at the
tail, the same (seed, epoch) gives the same per-worker order, a new epoch a new order, and resume skips
consumed rows exactly. All pure reads, no Ray."""

import json

import pytest

from korch.data.pipeline import epoch_units, rows_per_worker
from korch.data.shards import ShardWriter
from korch.data.stream import iter_rank_batches, rank_slices

ROWS = 101  # odd on purpose: without padding 2 workers could not take equal shares


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared folder written by ShardWriter with tiny row groups (7 rows) and shards (30 rows)."""
    root = tmp_path_factory.mktemp("prepared")
    writer = ShardWriter(str(root / "train"), "train", group_rows=7, shard_rows=30)
    for i in range(ROWS):
        writer.write({"input_ids": [2, 100 + i, 3], "doc_id": i, "doc_starts": [1], "sentence_starts": [1], "word_starts": [1]})
    shards = writer.close()
    manifest = {"splits": {"train": {"rows": ROWS, "tokens": 3 * ROWS}, "validation": {"rows": 0, "tokens": 0}},
                "shards": shards, "seq_len": 8}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root), manifest


def _read(root, manifest, seed, epoch, world_size, batch_size=4, skip_rows=0, rank=None):
    plan = epoch_units(manifest, root, "train", seed, epoch, world_size)
    ranks = range(world_size) if rank is None else [rank]
    return [[rid for batch in iter_rank_batches(plan, r, world_size, batch_size, skip_rows=skip_rows)
             for rid in batch["row_id"]] for r in ranks]


def test_epoch_plan_is_padded_and_seeded(prepared):
    root, manifest = prepared
    plan = epoch_units(manifest, root, "train", seed=1, epoch=0, world_size=2)
    assert sum(u["take"] for u in plan) == 102
    assert plan == epoch_units(manifest, root, "train", seed=1, epoch=0, world_size=2)
    assert plan != epoch_units(manifest, root, "train", seed=1, epoch=1, world_size=2)
    assert sum(u["take"] for u in epoch_units(manifest, root, "train", 1, 0, world_size=4)) == 104
    assert rows_per_worker(manifest, "train", 2) == 51


def test_two_workers_disjoint_union_is_every_row(prepared):
    root, manifest = prepared
    first = _read(root, manifest, seed=7, epoch=0, world_size=2)
    assert [len(p) for p in first] == [51, 51]  # nothing truncated at the tail
    assert set(first[0]) | set(first[1]) == set(range(ROWS))
    # Exactly one row is read twice: the padding that makes 102 = 2 x 51. Every other row is read once.
    assert len(first[0]) + len(first[1]) - len(set(first[0]) | set(first[1])) == 1
    assert _read(root, manifest, seed=7, epoch=0, world_size=2) == first  # same seed and epoch: same order
    assert _read(root, manifest, seed=8, epoch=0, world_size=2) != first


def test_every_epoch_has_its_own_order(prepared):
    root, manifest = prepared
    epochs = [_read(root, manifest, seed=7, epoch=e, world_size=2) for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    for parts in epochs:
        assert set(parts[0]) | set(parts[1]) == set(range(ROWS))


def test_resume_skips_consumed_rows(prepared):
    root, manifest = prepared
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            full = _read(root, manifest, 3, 2, world_size, batch_size=10, rank=rank)[0]
            for skip in (0, 7, 10, 30):
                assert _read(root, manifest, 3, 2, world_size, batch_size=10, skip_rows=skip, rank=rank)[0] == full[skip:]


def test_rank_slices_cover_the_plan_once(prepared):
    root, manifest = prepared
    plan = epoch_units(manifest, root, "train", 1, 0, 3)
    pieces = [piece for rank in range(3) for piece in rank_slices(plan, rank, 3)]
    assert sum(stop - start for _, start, stop in pieces) == sum(u["take"] for u in plan) == 102


def test_batches_hold_ragged_python_lists_and_flag_padding(prepared):
    root, manifest = prepared
    plan = epoch_units(manifest, root, "train", 0, 0, 2)
    batch = next(iter_rank_batches(plan, 0, 2, 5))
    assert set(batch) >= {"input_ids", "doc_id", "doc_starts", "sentence_starts", "word_starts", "row_id", "is_padding"}
    assert len(batch["input_ids"]) == 5 and all(isinstance(x, list) for x in batch["input_ids"])
    flags = [f for rank in range(2) for b in iter_rank_batches(plan, rank, 2, 8) for f in b["is_padding"]]
    assert sum(flags) == 1  # the one repeated row


def test_columns_limit_what_is_read(prepared):
    root, manifest = prepared
    plan = epoch_units(manifest, root, "train", 0, 0, 1)
    batch = next(iter_rank_batches(plan, 0, 1, 4, columns=("input_ids",)))
    assert set(batch) == {"input_ids", "row_id", "is_padding"}


def _alive(name):
    import threading

    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def test_read_ahead_hands_over_items_then_the_error_made_after_them():
    from korch.data.stream import read_ahead

    def items():
        yield from (1, 2, 3)
        raise ValueError("broken after three")

    got = []
    with pytest.raises(ValueError, match="broken after three"):
        for item in read_ahead(items, depth=1, name="korch-test-ahead"):
            got.append(item)
    assert got == [1, 2, 3] and not _alive("korch-test-ahead")


def test_closing_read_ahead_early_stops_its_thread():
    import itertools

    from korch.data.stream import read_ahead

    made = []

    def items():
        for i in itertools.count():
            made.append(i)
            yield i

    stream = read_ahead(items, depth=2, name="korch-test-ahead")
    assert next(stream) == 0
    stream.close()
    assert not _alive("korch-test-ahead") and len(made) <= 5  # depth 2 ahead, not the endless rest
