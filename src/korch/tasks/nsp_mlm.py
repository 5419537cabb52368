"""The `nsp_mlm` task: BERT's original pretraining, masked LM plus next-sentence prediction, on packed blocks.

    korch run jobs/bert_pretrain.yaml

Pairs are built per micro batch from the packed blocks (`korch.data.packing` records where each sentence and
each document starts): A is a run of sentences of one document, B the sentences that follow it in that
document (label 0), or, with probability `random_next`, sentences of a different document taken from another
block of the batch (label 1, Hugging Face's `next_sentence_label` convention). A pair is cut to `seq_len`
B first, then A from its front, so the A/B boundary the classifier judges always survives. The loss is
`BertForPreTraining`'s: MLM cross-entropy + NSP cross-entropy. BERT only (DeBERTa-v2 has no NSP head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from pydantic import Field

from korch.spec import Section
from korch.tasks.base import TrainTask

if TYPE_CHECKING:
    import torch


class NspMlmOptions(Section):
    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0)
    """Share of the pair's (non-special) tokens chosen for masked-LM prediction."""
    random_next: float = Field(default=0.5, ge=0.0, le=1.0)
    """Probability that B comes from another document (NSP label 1) instead of following A."""


Sentence = tuple[int, int, int]
"""(start, end, document id) of one sentence of a block, token offsets into its input_ids."""


def block_sentences(length: int, sentence_starts: Sequence[int], doc_starts: Sequence[int], doc_id: int) -> list[Sentence]:
    """The sentences of a packed block. A block that begins inside a sentence (a long one, cut by packing)
    starts with that fragment; document ids count up from the block's `doc_id` at each document start."""
    end = length - 1  # [SEP]
    starts = sorted({1, *(s for s in sentence_starts if 1 <= s < end), *(d for d in doc_starts if 1 <= d < end)})
    bounds = starts + [end]
    later_docs = sorted(d for d in doc_starts if d > 1)
    out = []
    for s, e in zip(bounds, bounds[1:]):
        if e > s:
            out.append((s, e, doc_id + sum(1 for d in later_docs if d <= s)))
    return out


def build_pair(row: int, blocks: Sequence[Sequence[int]], sentences: Sequence[list[Sentence]], random_next: float,
               generator: "torch.Generator") -> tuple[list[int], list[int], int, int, int]:
    """(A tokens, B tokens, label, A's document, B's document) for block `row`: label 0 when B follows A in A's
    document, 1 when B is taken from another document in another block (if the batch holds none, B is the true
    next and the label 0)."""
    import torch

    def randint(n: int) -> int:
        return int(torch.randint(n, (1,), generator=generator))

    own = sentences[row]
    by_doc: dict[int, list[Sentence]] = {}
    for sent in own:
        by_doc.setdefault(sent[2], []).append(sent)
    eligible = [doc for doc, sents in by_doc.items() if len(sents) >= 2]
    ids = blocks[row]
    if not eligible:  # one sentence per document (a long one): its halves stand in for two sentences
        s, e, doc = max(own, key=lambda sent: sent[1] - sent[0])
        middle = (s + e + 1) // 2
        a_sents, b_true = [(s, middle, doc)], [(middle, e, doc)]
    else:
        doc = eligible[randint(len(eligible))]
        sents = by_doc[doc]
        k = 1 + randint(len(sents) - 1)
        a_sents, b_true = sents[:k], sents[k:]
    a = [t for s, e, _ in a_sents for t in ids[s:e]]
    draw_random = float(torch.rand((), generator=generator)) < random_next
    if draw_random:
        others = [(j, sent) for j in range(len(blocks)) if j != row for sent in sentences[j] if sent[2] != doc]
        if others:
            j, (s, _, other_doc) = others[randint(len(others))]
            b = [t for s2, e2, d in sentences[j] if d == other_doc and s2 >= s for t in blocks[j][s2:e2]]
            return a, b, 1, doc, other_doc
    b = [t for s, e, _ in b_true for t in ids[s:e]]
    return a, b, 0, doc, doc


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut a pair to `budget` tokens: B loses its tail first (keeping at least one token), then A its front."""
    if len(a) + len(b) <= budget:
        return a, b
    b = b[: max(1, budget - len(a))]
    keep_a = budget - len(b)
    return (a[len(a) - keep_a:] if keep_a > 0 else []), b


def encode_pairs(pairs: Sequence[tuple[list[int], list[int]]], seq_len: int, cls_id: int, sep_id: int, pad_id: int
                 ) -> dict[str, "torch.Tensor"]:
    """[CLS] A [SEP] B [SEP] rows padded to seq_len, with segment ids 0 for A and 1 for B."""
    import torch

    n = len(pairs)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((n, seq_len), dtype=torch.long)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    for row, (a, b) in enumerate(pairs):
        a, b = truncate_pair(a, b, seq_len - 3)
        ids = [cls_id, *a, sep_id, *b, sep_id]
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        token_type_ids[row, len(a) + 2: len(ids)] = 1
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


class NspMlmTask(TrainTask):
    name = "nsp_mlm"
    Options = NspMlmOptions
    columns = ("input_ids", "sentence_starts", "doc_starts", "doc_id")
    greater_is_better = {"nsp_accuracy": True}

    @classmethod
    def prepare_data(cls, stage, ctx, tokenizer_dir: str) -> str:
        from korch.errors import UserError
        from korch.tasks.mlm import MlmTask

        if stage.model.arch != "bert":
            raise UserError(f"stage {stage.name}: task nsp_mlm needs model.arch: bert (a next-sentence head); "
                            f"{stage.model.arch} has none, use task mlm or span_mlm for it")
        return MlmTask.prepare_data(stage, ctx, tokenizer_dir)

    def __init__(self, options, model, tokenizer, seq_len, info):
        super().__init__(options, model, tokenizer, seq_len, info)
        self.special_ids = sorted(set(tokenizer.all_special_ids))

    def build_model(self, start_from):
        from transformers import AutoModelForPreTraining

        from korch.models import build_model_config, enable_checkpointing, load_pretrained

        source = start_from or self.model_config.pretrained
        if source:
            net = load_pretrained(source, AutoModelForPreTraining)
        else:
            config = build_model_config(self.model_config, len(self.tokenizer), self.seq_len, self.tokenizer.pad_token_id)
            net = AutoModelForPreTraining.from_config(config)
        return enable_checkpointing(net, self.model_config)

    def collate(self, rows: Mapping[str, list], generator):
        import torch

        from korch.tasks.mlm import mask_tokens

        blocks = [list(ids) for ids in rows["input_ids"]]
        sentences = [block_sentences(len(ids), ss, ds, did) for ids, ss, ds, did in
                     zip(blocks, rows["sentence_starts"], rows["doc_starts"], rows["doc_id"])]
        built = [build_pair(i, blocks, sentences, self.options.random_next, generator) for i in range(len(blocks))]
        tok = self.tokenizer
        batch = encode_pairs([(a, b) for a, b, *_ in built], self.seq_len, tok.cls_token_id, tok.sep_token_id,
                             tok.pad_token_id)
        batch["input_ids"], batch["labels"] = mask_tokens(batch["input_ids"], batch["attention_mask"], self.special_ids,
                                                          tok.mask_token_id, len(tok), self.options.mlm_probability,
                                                          generator)
        batch["next_sentence_label"] = torch.as_tensor([label for _, _, label, *_ in built], dtype=torch.long)
        return batch

    def loss(self, model, batch):
        return model(**batch).loss

    def eval_sums(self, model, batch, weight):
        import torch

        labels = batch["labels"].clone()
        labels[weight == 0] = -100
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
        logits = out.prediction_logits.float()
        chosen = labels != -100
        mlm = torch.nn.functional.cross_entropy(logits[chosen], labels[chosen], reduction="sum") if chosen.any() \
            else logits.sum() * 0
        nsp_right = (out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).double() * weight
        return {"loss_sum": mlm.detach().double().cpu(), "masked": chosen.sum().double().cpu(),
                "correct": (logits[chosen].argmax(-1) == labels[chosen]).sum().double().cpu(),
                "nsp_correct": nsp_right.sum().cpu(), "pairs": weight.sum().double().cpu()}

    def eval_metrics(self, sums):
        import math

        count = max(float(sums["masked"]), 1.0)
        loss = float(sums["loss_sum"]) / count
        return {"mlm_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "mlm_accuracy": float(sums["correct"]) / count,
                "nsp_accuracy": float(sums["nsp_correct"]) / max(float(sums["pairs"]), 1.0),
                "masked_tokens": int(sums["masked"]), "pairs": int(sums["pairs"])}

    def empty_model(self, config):
        from transformers import AutoModelForPreTraining

        return AutoModelForPreTraining.from_config(config)

    def save(self, model, folder):
        model.tie_weights()
        super().save(model, folder)
