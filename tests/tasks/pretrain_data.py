"""Real Korean blocks for the pretraining-task tests, built in this process (no Ray): a WordPiece tokenizer
trained on kowiki text, then the corpus pipeline's own preprocessing and packing, with and without Kiwi
morpheme boundaries. Cached per process, so every module reuses one build (a few seconds)."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KOWIKI = REPO.parent / "shared" / "data" / "kowiki_sample"
DOCS = 6


@functools.lru_cache(maxsize=None)
def texts() -> tuple[str, ...]:
    from korch.config import DataConfig
    from korch.data.readers import iter_documents

    cfg = DataConfig(inputs=[str(KOWIKI)])
    return tuple(itertools.islice(iter_documents(cfg.inputs, cfg), DOCS))


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> str:
    import tempfile

    from korch.data.tokenizer import train_wordpiece

    return train_wordpiece(texts(), tempfile.mkdtemp(prefix="korch-pretrain-tok-"), vocab_size=3000, min_frequency=2)


@functools.lru_cache(maxsize=None)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


@functools.lru_cache(maxsize=None)
def blocks(morphemes: bool, seq_len: int = 64) -> tuple[dict, ...]:
    """Packed blocks (`korch.data.packing` rows) of the kowiki documents. With `morphemes` Kiwi also splits
    sentences (what NSP pairs need); without, no Kiwi runs at all (eojeol word starts need none), which saves
    the suite a Kiwi pass."""
    import collections

    from korch.config import DataConfig
    from korch.data.packing import pack_documents
    from korch.data.preprocess import DocumentProcessor, special_ids

    cfg = DataConfig(inputs=[str(KOWIKI)], morphemes=morphemes, split_sentences=morphemes, seq_len=seq_len)
    out = DocumentProcessor(cfg, tokenizer_dir()).process(texts(), collections.Counter())
    docs = [(i, ids, ss, ws) for i, (ids, ss, ws) in enumerate(zip(out["ids"], out["sent_starts"], out["word_starts"]))]
    return tuple(pack_documents(docs, seq_len, *special_ids(tokenizer_dir())))


def rows(items, columns) -> dict[str, list]:
    return {c: [item[c] for item in items] for c in columns}


def train_losses(task, data: list[dict], steps: int, batch: int = 8, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Plain single-process training of `task` for `steps` steps on `data` (cycled): the loop's calls, no Ray."""
    import torch

    from korch.tasks.base import batch_generator

    torch.set_num_threads(1)  # a tiny model: more threads only contend with the rest of the suite
    torch.manual_seed(seed)
    model = task.build_model(None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        start = (step * batch) % max(1, len(data) - batch)
        batch_rows = rows(data[start:start + batch], task.columns)
        loss = task.loss(model, task.collate(batch_rows, batch_generator(seed, 0, step, 0)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


CLI_COREF_ARGS = ["--max-docs", str(DOCS), "--seq-len", "64", "--validation-fraction", "0.5", "--quiet"]


@functools.lru_cache(maxsize=None)
def coref_dir() -> str:
    """`korch data coref` over the same documents (one Kiwi pass, shared by the task and CLI tests)."""
    import tempfile

    from korch.cli import main

    out = str(Path(tempfile.mkdtemp(prefix="korch-coref-")) / "c")
    assert main(["data", "coref", str(KOWIKI), "--output", out, "--tokenizer", tokenizer_dir(), *CLI_COREF_ARGS]) == 0
    return out


@functools.lru_cache(maxsize=None)
def coref_blocks() -> tuple[dict, ...]:
    """The coref dataset's blocks (both splits) that hold a masked mention."""
    import pyarrow.parquet as pq

    folder = Path(coref_dir())
    found = [row for path in sorted(folder.glob("*/part-*.parquet")) for row in pq.read_table(path).to_pylist()]
    return tuple(row for row in found if any(row["mention_later"]))
