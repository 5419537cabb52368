"""Streaming prepared rows into workers: 2 workers get disjoint rows whose union is every row, no tail row is
lost to `equal=True`, the same seed gives the same per-worker order, and resume skips consumed batches."""

import json
import sys
import threading

import pytest
import ray

from korch.data.pipeline import epoch_units, rows_per_worker, train_dataset
from korch.data.shards import ShardWriter
from korch.data.stream import iter_worker_batches

ROWS = 101  # odd on purpose: equal=True would drop the tail row without padding


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


def _read_split(ds, world_size):
    """Consume streaming_split(world_size, equal=True) like Ray Train does: one thread per worker."""
    parts = ds.streaming_split(world_size, equal=True)
    out = [None] * world_size

    def consume(rank):
        out[rank] = [b for b in iter_worker_batches(parts[rank], batch_size=4)]

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return [[rid for batch in batches for rid in batch["row_id"]] for batches in out]


def test_epoch_plan_is_padded_and_seeded(prepared):
    root, manifest = prepared
    plan = epoch_units(manifest, root, "train", seed=1, epoch=0, world_size=2)
    assert sum(u["take"] for u in plan) == 102
    assert plan == epoch_units(manifest, root, "train", seed=1, epoch=0, world_size=2)
    assert plan != epoch_units(manifest, root, "train", seed=1, epoch=1, world_size=2)
    assert sum(u["take"] for u in epoch_units(manifest, root, "train", 1, 0, world_size=4)) == 104
    assert rows_per_worker(manifest, "train", 2) == 51


def test_two_workers_disjoint_union_is_every_row(prepared, ray_session):
    root, _ = prepared
    first = _read_split(train_dataset(root, "train", seed=7, epoch=0, world_size=2), 2)
    assert [len(p) for p in first] == [51, 51]  # nothing truncated at the tail
    assert set(first[0]) | set(first[1]) == set(range(ROWS))
    # Exactly one row is read twice: the padding that makes 102 = 2 x 51. Every other row is read once.
    assert len(first[0]) + len(first[1]) - len(set(first[0]) | set(first[1])) == 1

    again = _read_split(train_dataset(root, "train", seed=7, epoch=0, world_size=2), 2)
    assert again == first  # same seed and epoch: same rows in the same order on each worker
    other = _read_split(train_dataset(root, "train", seed=8, epoch=0, world_size=2), 2)
    assert other != first


def test_resume_skips_consumed_batches(prepared, ray_session):
    root, _ = prepared
    ds = train_dataset(root, "train", seed=3, epoch=2, world_size=1)
    full = [b["row_id"] for b in iter_worker_batches(ds.streaming_split(1, equal=True)[0], batch_size=10)]
    ds = train_dataset(root, "train", seed=3, epoch=2, world_size=1)
    resumed = [b["row_id"] for b in iter_worker_batches(ds.streaming_split(1, equal=True)[0], batch_size=10, skip_batches=4)]
    assert resumed == full[4:]
    assert sorted(r for b in full for r in b) == list(range(ROWS))


def test_batches_hold_ragged_python_lists(prepared, ray_session):
    root, _ = prepared
    batch = next(iter_worker_batches(train_dataset(root, "train", 0, 0, 1).streaming_split(1, equal=True)[0], 5))
    assert set(batch) >= {"input_ids", "doc_id", "doc_starts", "sentence_starts", "word_starts", "row_id"}
    assert len(batch["input_ids"]) == 5 and all(isinstance(x, list) for x in batch["input_ids"])


def _train_loop(config):
    import json as _json

    import ray.train

    ctx = ray.train.get_context()
    shard = ray.train.get_dataset_shard("train")
    rows = [r for b in iter_worker_batches(shard, batch_size=8) for r in b["row_id"]]
    with open(f"{config['out']}/rank{ctx.get_world_rank()}.json", "w") as f:
        _json.dump(rows, f)


def _fit(root, out, seed):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from korch.data.stream import build_train_data_config

    # Workers cannot import this test module, so ship the loop by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out.mkdir()
    trainer = TorchTrainer(
        _train_loop, train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": train_dataset(root, "train", seed=seed, epoch=0, world_size=2)},
        dataset_config=build_train_data_config(),
        run_config=RunConfig(storage_path=str(out / "ray"), name="ingest"),
    )
    trainer.fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_real_two_worker_torch_trainer_reads_every_row_deterministically(prepared, ray_session, tmp_path):
    root, _ = prepared
    first = _fit(root, tmp_path / "a", seed=5)
    assert [len(p) for p in first] == [51, 51]
    assert set(first[0]) | set(first[1]) == set(range(ROWS))
    assert _fit(root, tmp_path / "b", seed=5) == first
