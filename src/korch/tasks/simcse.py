"""The `simcse` task: contrastive sentence embeddings (Gao et al., SimCSE) on any HF encoder.

Unsupervised: each sentence is encoded twice; the two dropout noises make the positive pair, every other
sentence of the global batch is a negative. Supervised: KorNLI entailment hypotheses are the positives and
contradiction hypotheses of the same premise the hard negatives (the seed README's own proposed fix); KorSTS
files add their pairs scored >= `sts_positive_min` as positives without a hard negative.

Negatives span all workers: positives and hard negatives are all-gathered *with gradients*, and rank k's
anchors look for their own positives at columns k*B..k*B+B-1 of the gathered matrix (`in_batch_labels`).
Labelling them 0..B-1 on every rank, the bug sentence-transformers PR #3453 fixed, makes rank k>0 treat its
own positives as negatives; the tests pin the offset and the parity with one process holding the whole batch.

The stage's evaluation is `eval.embed` (run by `korch.eval.guard` on `final/`): training holds nothing out.
`final/` is a plain HF encoder (`AutoModel`) plus sentence-transformers files with the stage's pooling.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

from pydantic import Field, model_validator

from korch.spec import Section
from korch.tasks.base import TrainTask

if TYPE_CHECKING:
    import torch


class SimcseOptions(Section):
    mode: Literal["unsupervised", "supervised"] = "unsupervised"
    """`unsupervised`: positives from dropout noise on the same sentence. `supervised`: KorNLI entailment positives and contradiction hard negatives (and KorSTS pairs scored >= `sts_positive_min`)."""
    pooling: Literal["cls", "mean", "idf"] = "cls"
    """Sentence vector: the first token (`cls`), the mean over real tokens (`mean`), or their mean weighted by each token's inverse document frequency over this stage's training sentences (`idf`: shared particles and endings count less than content words). Training and the export pool the same way; `idf` exports its weights as sentence-transformers' WordWeights module."""
    temperature: float = Field(default=0.05, gt=0.0)
    """Softmax temperature on cosine similarities (SimCSE uses 0.05)."""
    sts_positive_min: float = Field(default=4.0, ge=0.0, le=5.0)
    """Supervised mode: KorSTS-format training pairs with a score at or above this are positive pairs."""
    max_rows: int | None = Field(default=None, ge=1)
    """Train on at most this many rows (after a seeded shuffle)."""
    loss: Literal["infonce", "cosent"] = "infonce"
    """`infonce`: SimCSE's contrastive loss. `cosent`: CoSENT, a ranking loss that orders every pair's cosine by its gold score (all KorSTS pairs with their 0-5 scores; KorNLI entailment/neutral/contradiction as 5/2.5/0), one of the seed README's "other losses". Needs `mode: supervised`."""
    cosent_scale: float = Field(default=20.0, gt=0.0)
    """CoSENT's scale on cosine differences (its paper's 20)."""

    @model_validator(mode="after")
    def _cosent_is_supervised(self) -> "SimcseOptions":
        if self.loss == "cosent" and self.mode != "supervised":
            raise ValueError("loss cosent learns from scored pairs: set mode: supervised")
        return self


# --- rows ----------------------------------------------------------------------------------------------------

def nli_triples(first: Sequence[str], second: Sequence[str], labels: Sequence[str]) -> list[tuple[str, str, str]]:
    """(premise, entailment, contradiction) for every entailment hypothesis; a premise without a contradiction
    gives (premise, entailment, "") and is trained with in-batch negatives only."""
    by_premise: dict[str, dict[str, list[str]]] = {}
    for premise, hypothesis, label in zip(first, second, labels):
        by_premise.setdefault(premise, {}).setdefault(label, []).append(hypothesis)
    triples = []
    for premise, groups in by_premise.items():
        contradictions = groups.get("contradiction", [])
        for i, positive in enumerate(groups.get("entailment", [])):
            triples.append((premise, positive, contradictions[i % len(contradictions)] if contradictions else ""))
    return triples


def split_sentences(text: str) -> Iterator[str]:
    """Cheap sentence split for unsupervised rows (no Kiwi: a whole corpus in seconds)."""
    for line in text.splitlines():
        for piece in re.split(r"(?<=[.!?])\s+", line.strip()):
            if len(piece) >= 8:
                yield piece


NLI_SCORES = {"entailment": 5.0, "neutral": 2.5, "contradiction": 0.0}


def training_rows(inputs: Sequence[str], options: SimcseOptions, data, seed: int) -> list[tuple]:
    """(anchor, positive, hard negative, score) rows; unsupervised rows are (sentence, sentence, "", 0)."""
    from korch.data.readers import expand_inputs, iter_documents
    from korch.eval.embed import read_pairs

    rows: list[tuple[str, str, str]] = []
    corpus: list[str] = []
    for source in expand_inputs(inputs, "auto"):
        path = str(source.path)
        if path.endswith(".tsv") and _pair_header(path):
            pairs = read_pairs(path)
            scores = pairs.scores or [NLI_SCORES.get(label, -1.0) for label in pairs.labels or []]
            if options.mode == "unsupervised":
                corpus.extend(pairs.first + pairs.second)
            elif options.loss == "cosent":
                rows.extend((a, b, "", s) for a, b, s in zip(pairs.first, pairs.second, scores) if s >= 0)
            elif pairs.labels is not None:
                rows.extend((*triple, 5.0) for triple in nli_triples(pairs.first, pairs.second, pairs.labels))
            else:
                rows.extend((a, b, "", s) for a, b, s in zip(pairs.first, pairs.second, scores)
                            if s >= options.sts_positive_min)
        elif options.mode == "unsupervised":
            corpus.extend(sentence for doc in iter_documents([path], data) for sentence in split_sentences(doc))
        else:
            from korch.errors import UserError

            raise UserError(f"simcse.mode supervised reads sentence-pair TSVs (KorNLI gold_label or KorSTS score), "
                            f"but {path} is not one; give e.g. ../shared/data/kornli")
    rows.extend((text, text, "", 0.0) for text in dict.fromkeys(corpus))
    random.Random(seed).shuffle(rows)
    return rows[: options.max_rows] if options.max_rows else rows


def _pair_header(path: str) -> bool:
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
    return "sentence1" in header and "sentence2" in header


def prepare_pairs(stage, tokenizer_dir: str, output_dir: str, options: SimcseOptions) -> dict:
    """Tokenised rows as parquet shards + manifest.json in the corpus pipeline's layout (train split only)."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from korch.data.shards import ShardWriter
    from korch.eval.embed import idf_weights

    fingerprint = hashlib.sha256(json.dumps([
        [(p, os.path.getsize(p), int(os.path.getmtime(p))) for p in stage.data.inputs if os.path.isfile(p)],
        stage.data.inputs, os.path.abspath(tokenizer_dir), stage.data.seq_len, options.model_dump(mode="json"),
        stage.train.seed]).encode()).hexdigest()
    manifest_path = os.path.join(output_dir, "manifest.json")
    if os.path.isfile(manifest_path):  # a resumed stage must read the very rows it started on
        manifest = json.loads(open(manifest_path, encoding="utf-8").read())
        if manifest.get("fingerprint") == fingerprint:
            return manifest
    rows = training_rows(stage.data.inputs, options, stage.data, stage.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=stage.data.seq_len)["input_ids"] if texts else []

    schema = pa.schema([*((c, pa.list_(pa.int32())) for c in ("input_ids", "positive_ids", "negative_ids")),
                        ("score", pa.float32())])
    writer = ShardWriter(os.path.join(output_dir, "train"), "train", schema=schema)
    anchors, positives = ids([r[0] for r in rows]), ids([r[1] for r in rows])
    negatives = [[] if not r[2] else x for r, x in zip(rows, ids([r[2] or "." for r in rows]))]
    for a, p, n, row in zip(anchors, positives, negatives, rows):
        writer.write({"input_ids": a, "positive_ids": p, "negative_ids": n, "score": float(row[3])})
    shards = writer.close()
    weights_file = None
    if options.pooling == "idf":
        # Each distinct training sentence is one document, so a sentence repeated across pairs counts once.
        sentences: dict[str, list[int]] = {}
        for row, a, p, n in zip(rows, anchors, positives, negatives):
            sentences[row[0]], sentences[row[1]] = a, p
            if row[2]:
                sentences[row[2]] = n
        weights_file = os.path.join(output_dir, "token_weights.json")
        with open(weights_file, "w", encoding="utf-8") as f:
            json.dump([round(w, 6) for w in idf_weights(sentences.values(), len(tokenizer))], f)
    manifest = {"kind": "pairs", "fingerprint": fingerprint, "seq_len": stage.data.seq_len, "mode": options.mode,
                "rows": writer.rows, "hard_negatives": sum(1 for n in negatives if n), "tokens": writer.tokens,
                "tokenizer": os.path.abspath(tokenizer_dir),
                "token_weights": weights_file and os.path.abspath(weights_file),
                "splits": {"train": {"rows": writer.rows, "tokens": writer.tokens},
                           "validation": {"rows": 0, "tokens": 0}},
                "shards": shards}
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    return manifest


# --- the loss ------------------------------------------------------------------------------------------------

def in_batch_labels(local_batch: int, rank: int) -> "torch.Tensor":
    """Column of each local anchor's own positive among the gathered candidates (rank-major order)."""
    import torch

    return torch.arange(local_batch) + rank * local_batch


def contrastive_loss(anchors: "torch.Tensor", positives: "torch.Tensor", negatives: "torch.Tensor | None",
                     negative_valid: "torch.Tensor | None", temperature: float, rank: int) -> "torch.Tensor":
    """InfoNCE of local anchors against all gathered positives (+ hard negatives, masked where a row has none)."""
    import torch
    import torch.nn.functional as F

    candidates = positives if negatives is None else torch.cat([positives, negatives])
    logits = F.normalize(anchors.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T / temperature
    if negatives is not None and negative_valid is not None:
        keep = torch.cat([torch.ones(len(positives), dtype=torch.bool, device=logits.device),
                          negative_valid.bool().to(logits.device)])
        logits = logits.masked_fill(~keep, float("-inf"))
    return F.cross_entropy(logits, in_batch_labels(len(anchors), rank).to(logits.device))


def cosent_loss(cosines: "torch.Tensor", scores: "torch.Tensor", scale: float) -> "torch.Tensor":
    """log(1 + sum over pairs (i, j) with score_i > score_j of exp(scale * (cos_j - cos_i)))."""
    import torch

    differences = scale * (cosines[None, :] - cosines[:, None])  # [i, j] = scale * (cos_j - cos_i)
    ordered = scores[:, None] > scores[None, :]
    return torch.logsumexp(torch.cat([differences.new_zeros(1), differences[ordered]]), dim=0)


def _gather_class():
    import torch
    import torch.distributed as dist

    class GatherWithGrad(torch.autograd.Function):
        """all_gather whose backward hands each rank the summed gradient of its own rows (all_reduce works on
        every backend, unlike reduce_scatter on gloo)."""

        @staticmethod
        def forward(ctx, x):
            ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad)
            return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]

    return GatherWithGrad


def gather_with_grad(x: "torch.Tensor") -> "torch.Tensor":
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _gather_class().apply(x)


def distributed_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int, fill: Sequence[int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ids, attention mask) padded to the longest row; an empty row becomes `fill` (a masked-out negative)."""
    import torch

    rows = [list(r) or list(fill) for r in rows]
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


# --- the task ------------------------------------------------------------------------------------------------

class SimcseTask(TrainTask):
    name = "simcse"
    Options = SimcseOptions
    columns = ("input_ids", "positive_ids", "negative_ids", "score")

    @classmethod
    def training_texts(cls, stage):
        """Both sentences of pair files, the documents of anything else (a stage with no parent trains its own)."""
        from korch.data.readers import expand_inputs, iter_documents
        from korch.eval.embed import read_pairs

        for source in expand_inputs(stage.data.inputs, "auto"):
            path = str(source.path)
            if path.endswith(".tsv") and _pair_header(path):
                pairs = read_pairs(path)
                yield from pairs.first + pairs.second
            else:
                yield from iter_documents([path], stage.data)

    @classmethod
    def prepare_data(cls, stage, ctx, tokenizer_dir: str) -> str:
        output = ctx.stage_dir / "data"
        prepare_pairs(stage, tokenizer_dir, str(output), stage.options)
        return str(output)

    def build_model(self, start_from):
        from korch.models.encoder import build_encoder

        return build_encoder(self.model_config, len(self.tokenizer), self.seq_len, self.tokenizer.pad_token_id,
                             start_from)

    def collate(self, rows, generator):
        import torch

        pad, fill = self.tokenizer.pad_token_id, [self.tokenizer.cls_token_id or 0]
        batch = {}
        for column, key in (("input_ids", "anchor"), ("positive_ids", "positive"), ("negative_ids", "negative")):
            batch[f"{key}_ids"], batch[f"{key}_mask"] = pad_ids(rows[column], pad, fill)
        batch["negative_valid"] = torch.as_tensor([len(r) > 0 for r in rows["negative_ids"]], dtype=torch.long)
        batch["score"] = torch.as_tensor(list(rows["score"]), dtype=torch.float)
        return batch

    def embed(self, model, ids, mask):
        from korch.eval.embed import pool

        weights = None
        if self.options.pooling == "idf":
            import torch

            # Built once and kept on the model's device: this runs on every forward pass.
            if getattr(self, "_weights", None) is None or self._weights.device != ids.device:
                self._weights = torch.tensor(self.info["token_weights"], dtype=torch.float32, device=ids.device)
            weights = self._weights[ids]
        return pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, self.options.pooling, weights)

    def loss(self, model, batch):
        import torch

        if self.options.loss == "cosent":
            anchors = self.embed(model, batch["anchor_ids"], batch["anchor_mask"])
            positives = self.embed(model, batch["positive_ids"], batch["positive_mask"])
            cosines = torch.nn.functional.cosine_similarity(anchors.float(), positives.float(), dim=-1)
            # Each rank scores the whole global batch's pairs: every rank's loss is the same number.
            return cosent_loss(gather_with_grad(cosines), gather_with_grad(batch["score"]), self.options.cosent_scale)
        if self.options.mode == "unsupervised":
            # One forward over [x; x]: each copy draws its own dropout mask, which is the whole augmentation.
            both = self.embed(model, torch.cat([batch["anchor_ids"]] * 2), torch.cat([batch["anchor_mask"]] * 2))
            anchors, positives = both.chunk(2)
        else:
            anchors = self.embed(model, batch["anchor_ids"], batch["anchor_mask"])
            positives = self.embed(model, batch["positive_ids"], batch["positive_mask"])
        # Every rank takes part in the same gathers whatever its rows hold: collectives must match across ranks.
        negatives = valid = None
        if self.options.mode == "supervised" and self.info.get("hard_negatives", 0) > 0:
            negatives = gather_with_grad(self.embed(model, batch["negative_ids"], batch["negative_mask"]))
            valid = gather_with_grad(batch["negative_valid"].float()).bool()
        return contrastive_loss(anchors, gather_with_grad(positives), negatives, valid, self.options.temperature,
                                distributed_rank())

    @classmethod
    def data_info(cls, manifest, options) -> dict:
        info = {"hard_negatives": int(manifest.get("hard_negatives", 0))}
        if manifest.get("token_weights"):
            with open(manifest["token_weights"], encoding="utf-8") as f:
                info["token_weights"] = json.load(f)
        return info

    def empty_model(self, config):
        from korch.models.encoder import encoder_from_config

        return encoder_from_config(config)

    def save(self, model, folder):
        from korch.eval.embed import write_sentence_transformers_files

        model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.model_max_length = self.seq_len
        self.tokenizer.save_pretrained(folder)
        write_sentence_transformers_files(folder, self.options.pooling, model.config.hidden_size, self.seq_len,
                                          self.info.get("token_weights"), self.tokenizer)
