"""The `data_prepare` task: a stage that turns its raw corpus into packed parquet shards plus manifest.json."""

from __future__ import annotations

import itertools
import os
from pathlib import Path


def resolve_tokenizer_dir(stage, ctx, out_dir: Path, texts=None) -> str:
    """The context's tokenizer, else `tokenizer.path`, else the starting or pretrained model's, else one trained on the corpus.

    A trained one is cached in `<stage_dir>/tokenizer/` and reused when the stage runs again. `texts`, a
    callable returning an iterable of strings, replaces the corpus reader (labelled tasks train on their texts).
    """
    from korch.errors import NoTextError, UserError

    from .readers import vocabulary_texts
    from .tokenizer import tokenizer_problem, train_wordpiece

    candidates = (("the parent stage's tokenizer", getattr(ctx, "tokenizer_dir", None)),
                  ("tokenizer.path", stage.tokenizer.path), ("the start checkpoint", getattr(ctx, "start_from", None)),
                  ("model.pretrained", stage.model.pretrained))
    for what, candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "tokenizer.json")):
            problem = tokenizer_problem(str(candidate))
            if problem:
                raise UserError(f"stage {stage.name}: {what}: {problem}; give a fast (Rust) Hugging Face tokenizer "
                                "folder")
            return str(candidate)
    if os.path.isfile(out_dir / "tokenizer.json"):
        problem = tokenizer_problem(str(out_dir))
        if problem is None:
            return str(out_dir)
        # korch's own cache, cut short (a crash or a full disk mid-save): learn it again rather than fail on it
        print(f"[korch] {stage.name}: {problem}; training it again", flush=True)

    settings = stage.tokenizer
    print(f"[korch] {stage.name}: training a WordPiece tokenizer (vocab {settings.vocab_size}, "
          f"{settings.pre_tokenize}) on {len(stage.data.inputs)} input(s)", flush=True)
    if texts is None:
        docs = vocabulary_texts(list(stage.data.inputs), stage.data, settings.max_docs)
    else:
        docs = texts() if settings.max_docs is None else itertools.islice(texts(), settings.max_docs)
    try:
        return train_wordpiece(docs, str(out_dir), settings.vocab_size, settings.min_frequency, settings.pre_tokenize)
    except NoTextError:
        raise NoTextError(f"stage {stage.name}: data.inputs ({', '.join(stage.data.inputs)}) gave no text to learn a "
                          "tokenizer from; check data.inputs and the text field settings") from None


def prepares_in_driver(stage) -> bool:
    """True when this machine alone would prepare the stage's data with the driver's own Kiwi, without Ray."""
    from .pool import inline_here

    return inline_here(stage.data)


def run_prepare_stage(stage, ctx) -> dict:
    """Prepare `stage.data` into `ctx.stage_dir / "data"`; returns a summary (the manifest's counts)."""
    from .pipeline import prepare_corpus

    stage_dir = Path(ctx.stage_dir)
    tokenizer_dir = resolve_tokenizer_dir(stage, ctx, stage_dir / "tokenizer")
    manifest = prepare_corpus(stage.data, tokenizer_dir, str(stage_dir / "data"), seed=stage.train.seed)
    keys = ("docs_in", "docs_out", "tokens", "rows", "skipped", "splits", "seq_len", "tokenizer")
    return {"data_dir": str(stage_dir / "data"), **{k: manifest[k] for k in keys}}
