"""Per-worker iteration over a Ray Train dataset shard, with resume by skipping consumed batches."""

from __future__ import annotations

from typing import Iterator


def iter_worker_batches(shard, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, list]]:
    """Yield `{column: python list}` batches from `ray.train.get_dataset_shard(...)` (or a `streaming_split` part).

    Columns are ragged (`input_ids`, `doc_starts`, ...), so batches are lists of lists; the caller pads and masks.
    On resume pass `skip_batches` = batches this worker already consumed this epoch: with `train_dataset`'s
    deterministic per-worker order those are exactly the rows trained on before, so the epoch continues
    where it stopped instead of starting over (ray#37633). Skipped batches are read but not converted, which
    costs parquet I/O only. The last batch may be short; every worker gets the same number of rows.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    for index, batch in enumerate(shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=1)):
        if index < skip_batches:
            continue
        yield {name: batch.column(name).to_pylist() for name in batch.column_names}


def build_train_data_config():
    """`ray.train.DataConfig` that keeps each worker's rows and order the same on every run.

    Ray Train re-applies its own execution options to every dataset (`DataConfig.default_ingest_options`,
    read from the DataContext of the process that configures the run), which can switch `preserve_order`
    off; then blocks reach the splitter in completion order and which worker gets which rows varies. Shard
    locality is also off, because the splitter's locality preference depends on where read tasks happened to
    run. Pass it as `TorchTrainer(..., dataset_config=build_train_data_config())`.
    """
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False)
