"""Korean corpus pipeline: raw text in any of several formats -> packed parquet blocks -> Ray Train workers.

Modules, in data-flow order:
- `readers`: find files (folders, globs, pyarrow URIs), sniff formats, cut chunks, parse documents,
  count bad input; `iter_documents` is the plain-Python stream used to train tokenizers.
- `text`: normalisation, cleaning, stable hashing, skip-reason names (pure).
- `preprocess`: Kiwi sentence splitting / morphemes and WordPiece ids; `KoreanPreprocessor` is the Ray
  Data callable class (one `Kiwi` per actor).
- `preencode`: when the driver runs Kiwi itself, a helper process WordPiece-encodes paragraphs while Kiwi
  loads; sentences' ids are cut from them.
- `packing`: document-aware packing into `seq_len` blocks (pure).
- `shards`: parquet shard writer.
- `pipeline`: `prepare_corpus` (Ray Data driver loop, manifest, idempotency) and `epoch_units`, the epoch's read plan.
- `labelled`: labelled records (TSV/CSV/JSONL/parquet) -> tokenised shards for labelled tasks.
- `stream`: each training worker's share of an epoch (`iter_rank_batches`; resume by skipping rows).
- `tokenizer`: `train_wordpiece`.
- `stage`, `commands`, `bench`: the `data_prepare` task, `korch data prepare`, `korch bench data`.

Heavy imports (Ray, Kiwi, transformers) happen inside functions so `korch validate` stays fast.
"""
