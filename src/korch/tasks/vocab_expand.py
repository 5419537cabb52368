"""The `vocab_expand` stage: add frequent Korean morphemes to an existing WordPiece vocabulary.

Kiwi splits the corpus into morphemes; each surface form is counted as a word start (`학생`) or a
continuation (`##들`) by where it sits in its eojeol. The most frequent ones that are not yet single pieces
are appended to the WordPiece vocabulary (greedy longest match then prefers them), the encoder's embedding
matrix grows to match, and each new row starts as the mean of the old pieces the form used to be split into,
so the model's view of old text barely moves. No training: the stage writes `final/` (HF encoder, tokenizer,
sentence-transformers pooling files) and is scored by `eval.embed` like the trained stages.

The model comes from the `needs` parent's `final/`, else `model.pretrained`, else fresh from config with a
tokenizer trained on `data.inputs` (the CPU demo's tiny start).
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

from pydantic import Field

from korch.spec import Section

if TYPE_CHECKING:
    import torch


class VocabExpandOptions(Section):
    max_new_tokens: int = Field(default=2000, ge=1)
    """Add at most this many pieces (word starts and `##` continuations together)."""
    min_count: int = Field(default=5, ge=1)
    """Only morphemes seen at least this often in the corpus."""
    min_chars: int = Field(default=2, ge=1)
    """Only morphemes at least this many characters long (single syllables are mostly in the vocabulary already)."""
    pooling: Literal["cls", "mean", "idf"] = "mean"
    """Pooling written into `final/` for sentence-transformers and `korch eval embed`; `idf` weighs tokens by their inverse document frequency over the corpus's sentences (expanded tokenizer)."""


def count_morphemes(texts: Iterable[str], kiwi) -> collections.Counter:
    """Surface forms counted as WordPiece would see them: `form` at a word start, `##form` inside a word."""
    counts: collections.Counter = collections.Counter()
    for text in texts:
        for token in kiwi.tokenize(text):
            surface = text[token.start: token.start + token.len]
            if not surface or token.tag.startswith("S") or any(c.isspace() for c in surface):
                continue  # symbols, numbers and foreign letters: the existing vocabulary covers them well enough
            initial = token.start == 0 or text[token.start - 1].isspace()
            counts[surface if initial else "##" + surface] += 1
    return counts


def select_new_pieces(counts: collections.Counter, vocab: dict[str, int], max_new: int, min_count: int,
                      min_chars: int) -> list[str]:
    """The most frequent pieces not in `vocab`, ties broken by the piece itself so the choice is deterministic."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    chosen = [piece for piece, n in ranked
              if n >= min_count and piece not in vocab and len(piece.removeprefix("##")) >= min_chars]
    return chosen[:max_new]


def old_pieces(piece: str, vocab: dict[str, int], wordpiece) -> list[int]:
    """Ids the old vocabulary split `piece` into (a continuation's first piece as `##`, when that exists)."""
    body = piece.removeprefix("##")
    ids = [token.id for token in wordpiece.tokenize(body)]
    if piece.startswith("##") and ids:
        first = wordpiece.id_to_token(ids[0])
        ids[0] = vocab.get("##" + first, ids[0]) if not first.startswith("##") else ids[0]
    return ids


def mean_init_rows(weight: "torch.Tensor", groups: list[list[int]], unk_id: int | None = None) -> "torch.Tensor":
    """One new row per group: the mean of the group's old rows (all rows' mean for an empty or unknown-only group)."""
    import torch

    fallback = weight.mean(0)
    rows = []
    for ids in groups:
        ids = [i for i in ids if i != unk_id]
        rows.append(weight[ids].mean(0) if ids else fallback)
    return torch.stack(rows) if rows else weight.new_zeros((0, weight.shape[1]))


def expand_tokenizer_json(tokenizer_json: dict, pieces: list[str]) -> dict:
    """A copy of a WordPiece tokenizer.json with `pieces` appended at ids len(vocab)..."""
    data = json.loads(json.dumps(tokenizer_json))
    vocab = data["model"]["vocab"]
    if data["model"].get("type") != "WordPiece":
        from korch.errors import UserError

        raise UserError(f"vocab_expand extends WordPiece vocabularies, but the starting tokenizer is "
                        f"{data['model'].get('type')}; start from a model with a WordPiece (BERT-style) tokenizer")
    next_id = max(vocab.values()) + 1
    for offset, piece in enumerate(pieces):
        vocab[piece] = next_id + offset
    return data


def run_vocab_expand_stage(stage, ctx) -> dict:
    import tempfile

    import torch
    from kiwipiepy import Kiwi
    from transformers import AutoTokenizer

    from korch.data.readers import iter_documents
    from korch.eval.embed import idf_weights, write_sentence_transformers_files
    from korch.eval.guard import evaluate_and_guard, promoted_final
    from korch.models.encoder import build_encoder
    from korch.tasks.base import TrainTask
    from korch.tasks.simcse import split_sentences
    from korch.train.runner import resolve_tokenizer

    options: VocabExpandOptions = stage.options
    source = promoted_final(ctx.needs[stage.needed[0]]) if stage.needed else stage.model.pretrained
    ctx.start_from = source
    tokenizer_dir = source or resolve_tokenizer(stage, ctx, TrainTask)  # its texts: the stage's corpus
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(stage.train.seed)
    model = build_encoder(stage.model, len(tokenizer), stage.data.seq_len, tokenizer.pad_token_id, source)

    def corpus():
        docs = iter_documents(list(stage.data.inputs), stage.data)
        return itertools.islice(docs, stage.data.max_docs) if stage.data.max_docs else docs

    counts = count_morphemes(corpus(), Kiwi(num_workers=1))
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    pieces = select_new_pieces(counts, vocab, options.max_new_tokens, options.min_count, options.min_chars)
    groups = [old_pieces(p, vocab, tokenizer.backend_tokenizer.model) for p in pieces]

    final = Path(ctx.stage_dir) / "final"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(expand_tokenizer_json(backend, pieces), ensure_ascii=False))
        (Path(tmp) / "vocab.txt").unlink(missing_ok=True)  # the slow-tokenizer copy would disagree with tokenizer.json
        expanded = AutoTokenizer.from_pretrained(tmp)
    old_size = model.get_input_embeddings().weight.shape[0]
    new_rows = mean_init_rows(model.get_input_embeddings().weight.detach(), groups, tokenizer.unk_token_id)
    model.resize_token_embeddings(old_size + len(pieces), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old_size:] = new_rows
    model.save_pretrained(final, safe_serialization=True)
    expanded.model_max_length = stage.data.seq_len
    expanded.save_pretrained(final)
    weights = None
    if options.pooling == "idf":
        # A second streaming pass (the corpus need not fit in memory); each sentence is one document.
        sentences = (s for doc in corpus() for s in split_sentences(doc))
        batches = iter(lambda: list(itertools.islice(sentences, 1024)), [])
        weights = idf_weights((ids for batch in batches
                               for ids in expanded(batch, truncation=True, max_length=stage.data.seq_len)["input_ids"]),
                              len(expanded))
    write_sentence_transformers_files(str(final), options.pooling, model.config.hidden_size, stage.data.seq_len,
                                      weights, expanded)
    summary = {"added_pieces": len(pieces), "vocab_size": old_size + len(pieces), "old_vocab_size": old_size,
               "examples": pieces[:20], "morphemes_counted": sum(counts.values())}
    print(f"[korch] {stage.name}: added {len(pieces)} morpheme pieces ({old_size} -> {old_size + len(pieces)}): "
          f"{' '.join(pieces[:10])} ...", flush=True)
    return evaluate_and_guard(stage, ctx, summary)

