"""The `classify` task: sequence classification on labelled records, on any encoder.

Rows are labelled records tokenised by `korch.data.labelled` (text, optional text pair, label id). The model
is built from config (bert or deberta-v2), from the `needs:` parent's `final/` (e.g. a TAPT `mlm` stage) or
from a pretrained folder, with `cls`, `mean` or `max` pooling (`korch.models.classifier`); or, with
`model.arch: ngram`, it is a fastText-style bag of hashed token n-grams (no encoder: a parent gives only its
tokenizer). The loss is
cross-entropy or focal loss with label smoothing, per-class alpha and class weights (`korch.losses`).
Evaluation reports loss, accuracy, macro-F1 and per-class F1, summed over ranks as a confusion matrix.
The export loads with `AutoModelForSequenceClassification` and `pipeline("text-classification")`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from korch.spec import Section
from korch.tasks.base import TrainTask


class ClassifyOptions(Section):
    pooling: Literal["cls", "mean", "max"] = "cls"
    """How the encoder's tokens become one vector: `cls` (the first token, HF's own head), or `mean`/`max` over real tokens (padding never counts). `model.arch: ngram` ignores it (its n-grams are always averaged)."""
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    """`focal` down-weights easy examples by (1 - p)^gamma; with gamma 0 and no alpha it is cross-entropy."""
    gamma: float = Field(default=2.0, ge=0.0)
    """Focal loss focusing parameter."""
    alpha: list[float] | None = None
    """Focal loss per-class weights, one per label in id order (e.g. `[0.25, 0.25, 0.25, 0.25]`)."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Share of each target spread evenly over all classes (works with both losses)."""
    class_weights: list[float] | Literal["balanced"] | None = None
    """Per-class loss weights, one per label, or `balanced` (n / (classes x count) from the training split)."""
    classifier_dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Dropout before the classification head. Unset: the encoder's hidden dropout (none for `model.arch: ngram`)."""

    @model_validator(mode="after")
    def _alpha_is_focal(self) -> "ClassifyOptions":
        if self.alpha is not None and self.loss != "focal":
            raise ValueError("alpha weights the focal loss: set loss: focal, or use class_weights with cross_entropy")
        return self


class ClassifyTask(TrainTask):
    name = "classify"
    Options = ClassifyOptions
    columns = ("input_ids", "token_type_ids", "label")
    greater_is_better = {"accuracy": True, "macro_f1": True, "loss": False}

    @classmethod
    def training_texts(cls, stage):
        from korch.data.labelled import iter_labelled_texts

        return iter_labelled_texts(stage.data)

    @classmethod
    def prepare_data(cls, stage, ctx, tokenizer_dir: str) -> str:
        from korch.data.labelled import prepare_labelled

        output = ctx.stage_dir / "data"
        prepare_labelled(stage.data, tokenizer_dir, str(output), seed=stage.train.seed, progress=True)
        return str(output)

    @classmethod
    def data_info(cls, manifest, options) -> dict:
        from korch.errors import UserError
        from korch.losses import balanced_class_weights

        labels = list(manifest["labels"])
        counts = [int(manifest.get("class_counts", {}).get("train", {}).get(name, 0)) for name in labels]
        for field in ("alpha", "class_weights"):
            value = getattr(options, field)
            if isinstance(value, list) and len(value) != len(labels):
                raise UserError(f"classify.{field} has {len(value)} values but the data has {len(labels)} labels "
                                f"({', '.join(labels)}); give one per label in that order")
        weights = options.class_weights
        if weights == "balanced":
            weights = balanced_class_weights(counts)
        return {"labels": labels, "class_weights": weights, "class_counts": counts}

    def __init__(self, options, model, tokenizer, seq_len, info):
        super().__init__(options, model, tokenizer, seq_len, info)
        self.labels = list(info["labels"])

    def build_model(self, start_from):
        from korch.models.classifier import build_classifier

        return build_classifier(
            self.model_config, num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
            pooling=self.options.pooling, vocab_size=len(self.tokenizer), seq_len=self.seq_len,
            pad_token_id=self.tokenizer.pad_token_id, start_from=start_from,
            classifier_dropout=self.options.classifier_dropout)

    def collate(self, rows, generator):
        import torch

        # Pad to the batch's longest row, not seq_len: short reviews then cost short compute.
        width = max(1, min(self.seq_len, max(len(ids) for ids in rows["input_ids"])))
        count = len(rows["input_ids"])
        input_ids = torch.full((count, width), self.tokenizer.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((count, width), dtype=torch.long)
        attention_mask = torch.zeros((count, width), dtype=torch.long)
        for row, (ids, types) in enumerate(zip(rows["input_ids"], rows["token_type_ids"])):
            ids = list(ids)[:width]
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            token_type_ids[row, : len(ids)] = torch.as_tensor(list(types)[: len(ids)], dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                "labels": torch.as_tensor(rows["label"], dtype=torch.long)}

    def _logits(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits

    def loss(self, model, batch):
        from korch.losses import classification_loss

        options = self.options
        return classification_loss(self._logits(model, batch).float(), batch["labels"], loss=options.loss,
                                   gamma=options.gamma, alpha=options.alpha, label_smoothing=options.label_smoothing,
                                   class_weights=self.info.get("class_weights"))

    def eval_sums(self, model, batch, weight):
        import torch

        logits = self._logits(model, batch).float()
        labels = batch["labels"]
        per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        classes = len(self.labels)
        confusion = torch.zeros(classes * classes, dtype=torch.float64, device=logits.device)
        confusion.index_add_(0, labels * classes + logits.argmax(-1), weight.double())
        return {"loss_sum": (per_row * weight).sum().double().cpu(), "rows": weight.sum().double().cpu(),
                "confusion": confusion.cpu()}

    def eval_metrics(self, sums):
        classes = len(self.labels)
        rows = max(float(sums["rows"]), 1.0)
        return {"loss": float(sums["loss_sum"]) / rows,
                **confusion_metrics(sums["confusion"].view(classes, classes), self.labels, rows),
                "rows": int(sums["rows"])}

    def empty_model(self, config):
        from korch.models.classifier import classifier_from_config

        return classifier_from_config(config)

    def save(self, model, folder):
        from korch.models.classifier import save_classifier

        save_classifier(model, folder)
        # Inference truncates where training did: `pipeline(..., truncation=True)` and `korch predict` read this.
        self.tokenizer.model_max_length = self.seq_len
        self.tokenizer.save_pretrained(folder)


def confusion_metrics(confusion, names, rows: float) -> dict:
    """accuracy, macro_f1 and per_class_f1 from a (true label x prediction) float64 torch confusion matrix;
    shared with the ensemble task so both report the same arithmetic."""
    true_positive = confusion.diag()
    precision = true_positive / confusion.sum(0).clamp(min=1e-12)
    recall = true_positive / confusion.sum(1).clamp(min=1e-12)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"accuracy": float(true_positive.sum()) / rows, "macro_f1": float(f1.mean()),
            "per_class_f1": {name: float(v) for name, v in zip(names, f1)}}
