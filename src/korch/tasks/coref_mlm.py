"""The `coref_mlm` task: entity-coreference masked LM on blocks whose repeated mentions are known.

    korch data coref ../shared/data/kowiki_sample --output scratch/c
    korch run jobs/coref_mlm_1536.yaml

Every later mention of an entity in a block (`korch.data.coref`) has all its tokens replaced by [MASK]; the
model must write the entity out again from its earlier mention. Ordinary BERT noise (`noise_probability`,
80/10/10) covers the other tokens. Evaluation masks the later mentions only (no noise) and reports Real@1 and
Real@5: the share of masked mentions whose every gold token ranks first, or within the top 5, the metric
`eval.select_best: real1` picks epochs by and `korch eval coref` also reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from pydantic import Field

from korch.spec import Section
from korch.tasks.mlm import MlmTask

if TYPE_CHECKING:
    import torch


class CorefMlmOptions(Section):
    noise_probability: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Share of the tokens outside masked mentions that get ordinary MLM noise (80/10/10) and are predicted too."""


def mask_mentions(input_ids: "torch.Tensor", starts: Sequence[Sequence[int]], ends: Sequence[Sequence[int]],
                  later: Sequence[Sequence[bool]], mask_id: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(inputs with every later mention all [MASK], labels there and -100 elsewhere, mention index per token:
    the later mention's number within its row, -1 outside)."""
    import torch

    inputs, labels = input_ids.clone(), torch.full_like(input_ids, -100)
    index = torch.full_like(input_ids, -1)
    width = input_ids.shape[1]
    for row in range(len(starts)):
        number = 0
        for s, e, is_later in zip(starts[row], ends[row], later[row]):
            if not is_later or e > width:
                continue
            inputs[row, s:e] = mask_id
            labels[row, s:e] = input_ids[row, s:e]
            index[row, s:e] = number
            number += 1
    return inputs, labels, index


def per_mention(logits: "torch.Tensor", labels: "torch.Tensor", mention_index: "torch.Tensor", k: int = 5
                ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Per masked mention, in (row, mention number) order: (all tokens' gold ranked first, all within the top k,
    the mention's row). A multi-token mention counts only if every one of its tokens does."""
    import torch

    positions = mention_index >= 0
    if not positions.any():
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    top = logits[positions].topk(min(k, logits.shape[-1]), dim=-1).indices
    gold = labels[positions]
    first = (top[:, 0] == gold).long().cpu()
    within = (top == gold[:, None]).any(-1).long().cpu()
    rows = positions.nonzero(as_tuple=True)[0].cpu()
    key = rows * (int(mention_index.max()) + 1) + mention_index[positions].cpu()
    mentions, group = torch.unique(key, return_inverse=True)
    all1 = torch.ones(len(mentions), dtype=torch.long).scatter_reduce(0, group, first, "amin")
    allk = torch.ones(len(mentions), dtype=torch.long).scatter_reduce(0, group, within, "amin")
    row_of = torch.zeros(len(mentions), dtype=torch.long).scatter_reduce(0, group, rows, "amax")
    return all1, allk, row_of


def mention_hits(logits: "torch.Tensor", labels: "torch.Tensor", mention_index: "torch.Tensor",
                 weight: "torch.Tensor | None" = None, k: int = 5) -> dict[str, "torch.Tensor"]:
    """Sums over mentions of `per_mention`: `mentions`, `hit1`, `hitk`; a row's weight (0 for padding rows)
    weighs its mentions."""
    import torch

    all1, allk, row_of = per_mention(logits, labels, mention_index, k)
    w = torch.ones(len(all1), dtype=torch.double) if weight is None else weight.double().cpu()[row_of]
    return {"mentions": w.sum(), "hit1": (all1.double() * w).sum(), "hitk": (allk.double() * w).sum()}


class CorefMlmTask(MlmTask):
    name = "coref_mlm"
    Options = CorefMlmOptions
    columns = ("input_ids", "mention_starts", "mention_ends", "mention_later")
    greater_is_better = {"real1": True, "real5": True}

    @classmethod
    def prepare_data(cls, stage, ctx, tokenizer_dir: str) -> str:
        from korch.data.coref import KIND, build_coref_dataset
        from korch.data.pipeline import is_prepared, load_manifest
        from korch.errors import UserError

        inputs = stage.data.inputs
        given = ctx.extra.get("prepared_data") or (inputs[0] if len(inputs) == 1 and is_prepared(inputs[0]) else None)
        if given:
            if load_manifest(given).get("kind") != KIND:
                raise UserError(f"stage {stage.name}: {given} is a plain prepared corpus without entity mentions; "
                                "give raw text in data.inputs or a folder from `korch data coref`")
            return given
        output = ctx.stage_dir / "data"
        manifest = build_coref_dataset(stage.data, tokenizer_dir, str(output))
        print(f"[korch] {stage.name}: {manifest['mentions']} mentions", flush=True)
        return str(output)

    @classmethod
    def data_info(cls, manifest, options):
        return {}

    def collate(self, rows: Mapping[str, list], generator):
        from korch.tasks.mlm import mask_tokens, pad_blocks

        tok = self.tokenizer
        input_ids, attention_mask = pad_blocks(rows["input_ids"], self.seq_len, tok.pad_token_id)
        inputs, labels, index = mask_mentions(input_ids, rows["mention_starts"], rows["mention_ends"],
                                              rows["mention_later"], tok.mask_token_id)
        if self.options.noise_probability > 0:
            outside = attention_mask * (index < 0)
            noisy, noise_labels = mask_tokens(input_ids, outside, self.special_ids, tok.mask_token_id, len(tok),
                                              self.options.noise_probability, generator)
            chosen = noise_labels != -100
            inputs[chosen], labels[chosen] = noisy[chosen], noise_labels[chosen]
        return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels,
                "clean_ids": input_ids, "mention_index": index}

    def loss(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        # Without noise a micro batch can hold no repeated mention: its mean over no labels would be NaN.
        return out.loss if bool((batch["labels"] != -100).any()) else out.logits.sum() * 0

    def eval_sums(self, model, batch, weight):
        import torch

        index = batch["mention_index"]
        gold = torch.where(index >= 0, batch["clean_ids"], torch.full_like(index, -100))
        inputs = torch.where(index >= 0, torch.full_like(index, self.tokenizer.mask_token_id), batch["clean_ids"])
        logits = model(input_ids=inputs, attention_mask=batch["attention_mask"]).logits.float()
        chosen = (index >= 0) & (weight[:, None] > 0)
        loss = torch.nn.functional.cross_entropy(logits[chosen], gold[chosen], reduction="sum") if chosen.any() \
            else logits.sum() * 0
        hits = mention_hits(logits, gold, index, weight)
        return {**hits, "loss_sum": loss.detach().double().cpu(), "masked": chosen.sum().double().cpu()}

    def eval_metrics(self, sums):
        n = max(float(sums["mentions"]), 1.0)
        return {"real1": float(sums["hit1"]) / n, "real5": float(sums["hitk"]) / n, "mentions": int(sums["mentions"]),
                "mention_loss": float(sums["loss_sum"]) / max(float(sums["masked"]), 1.0)}
