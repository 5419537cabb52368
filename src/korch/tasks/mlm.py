"""The `mlm` task: BERT-style masked-LM on packed corpus blocks (80% [MASK], 10% random token, 10% kept).

Rows are the corpus pipeline's packed blocks (`korch.data.pipeline`). Masking draws from the loop's
(seed, epoch, micro batch, rank) generator, never from global RNG, so a resumed run masks exactly as the
uninterrupted one would have. Evaluation masks with its own fixed seed, so every evaluation scores the same
positions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Sequence

from pydantic import Field

from korch.spec import Section
from korch.tasks.base import TrainTask, batch_generator as masking_generator  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch


class MlmOptions(Section):
    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0)
    """Share of (non-special, non-padding) tokens chosen for prediction."""
    whole_word: Literal["morpheme", "eojeol"] | None = None
    """Mask whole words instead of WordPiece pieces: `morpheme` (Kiwi morphemes; prepare the data with `data.morphemes: true`) or `eojeol` (whitespace words, punctuation split off; `data.morphemes: false`). Unset: pieces, each drawn on its own."""


def pad_blocks(blocks: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    input_ids = torch.full((len(blocks), seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(blocks), seq_len), dtype=torch.long)
    for row, block in enumerate(blocks):
        block = list(block)[:seq_len]
        input_ids[row, : len(block)] = torch.as_tensor(block, dtype=torch.long)
        attention_mask[row, : len(block)] = 1
    return input_ids, attention_mask


def mask_tokens(input_ids: "torch.Tensor", attention_mask: "torch.Tensor", special_ids: Sequence[int], mask_id: int,
                vocab_size: int, probability: float, generator: "torch.Generator") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Returns (masked inputs, labels); labels are -100 except at the chosen positions."""
    import torch

    labels = input_ids.clone()
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=torch.long))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    labels[~chosen] = -100
    masked = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    masked[chosen & (roll < 0.8)] = mask_id
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_tokens[swap]
    return masked, labels


def check_word_boundaries(manifest, whole_word: str | None, task: str) -> None:
    """Whole words are what the prepared data's `word_starts` hold: morphemes only if it was prepared so."""
    from korch.errors import UserError

    if whole_word is None:
        return
    morphemes = bool(manifest.get("config", {}).get("morphemes", False))
    if morphemes != (whole_word == "morpheme"):
        have = "Kiwi morpheme" if morphemes else "eojeol (whitespace word)"
        raise UserError(f"{task}.whole_word is {whole_word}, but the prepared data records {have} boundaries; set "
                        f"data.morphemes: {str(whole_word == 'morpheme').lower()} (and prepare again) or "
                        f"{task}.whole_word: {'morpheme' if morphemes else 'eojeol'}")


class MlmTask(TrainTask):
    name = "mlm"
    Options = MlmOptions
    columns = ("input_ids", "word_starts")

    @classmethod
    def prepare_data(cls, stage, ctx, tokenizer_dir: str) -> str:
        from korch.data.pipeline import is_prepared, prepare_corpus

        if ctx.extra.get("prepared_data"):
            return ctx.extra["prepared_data"]
        inputs = stage.data.inputs
        if len(inputs) == 1 and is_prepared(inputs[0]):
            return inputs[0]
        output = ctx.stage_dir / "data"
        prepare_corpus(stage.data, tokenizer_dir, str(output), seed=stage.train.seed, progress=True)
        return str(output)

    @classmethod
    def data_info(cls, manifest, options):
        check_word_boundaries(manifest, options.whole_word, cls.name)
        return {}

    def __init__(self, options, model, tokenizer, seq_len, info):
        super().__init__(options, model, tokenizer, seq_len, info)
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        self._eval_index = 0

    def build_model(self, start_from):
        from korch.models import build_mlm_model

        return build_mlm_model(self.model_config, len(self.tokenizer), self.seq_len, self.tokenizer.pad_token_id, start_from)

    def collate(self, rows, generator):
        input_ids, attention_mask = pad_blocks(rows["input_ids"], self.seq_len, self.tokenizer.pad_token_id)
        if self.options.whole_word is not None:
            from korch.tasks.masking import mask_whole_words

            lengths = [min(len(ids), self.seq_len) for ids in rows["input_ids"]]
            inputs, labels = mask_whole_words(input_ids, lengths, rows["word_starts"], self.tokenizer.mask_token_id,
                                              len(self.tokenizer), self.options.mlm_probability, generator)
            return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels}
        inputs, labels = mask_tokens(input_ids, attention_mask, self.special_ids, self.tokenizer.mask_token_id,
                                     len(self.tokenizer), self.options.mlm_probability, generator)
        return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels}

    def loss(self, model, batch):
        return model(**batch).loss

    def eval_sums(self, model, batch, weight):
        import torch

        labels = batch["labels"].clone()
        labels[weight == 0] = -100  # padding rows repeat real ones: they must not count twice
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        chosen = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[chosen], labels[chosen], reduction="sum") if chosen.any() \
            else logits.sum() * 0
        return {"loss_sum": loss.detach().double().cpu(),
                "correct": (logits[chosen].argmax(-1) == labels[chosen]).sum().double().cpu(),
                "masked": chosen.sum().double().cpu()}

    def eval_metrics(self, sums):
        count = max(float(sums["masked"]), 1.0)
        loss = float(sums["loss_sum"]) / count
        return {"mlm_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "mlm_accuracy": float(sums["correct"]) / count,
                "masked_tokens": int(sums["masked"])}

    def empty_model(self, config):
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM.from_config(config)

    def save(self, model, folder):
        model.tie_weights()
        super().save(model, folder)

    def probe(self, model, device) -> list[float]:
        """Logits of the in-memory model on a fixed sentence: the export-parity test compares against them."""
        import torch

        encoded = self.tokenizer("한국어 문장으로 모델을 확인합니다.", return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)).logits
        return logits[0, :, :8].float().cpu().flatten().tolist()

