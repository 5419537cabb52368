"""Sequence classifiers on bert / deberta-v2 encoders, with `cls`, `mean` or `max` pooling.

`cls` is Hugging Face's own `XForSequenceClassification`, so its folder loads anywhere without korch. `mean` and
`max` use `KorchPoolingForSequenceClassification` (`model_type: korch-pooling`); its folder carries the two
korch-free source files it needs, so it loads with `import korch` (Auto registration) or, without korch, with
`trust_remote_code=True`.
"""

from __future__ import annotations

import copy
from typing import Any

from korch.config import ModelConfig
from korch.models import build_model_config, load_pretrained
from korch.models.configuration_korch_pooling import POOLINGS as _POOLED
from korch.models.configuration_korch_pooling import KorchPoolingConfig
from korch.models.modeling_korch_pooling import KorchPoolingForSequenceClassification, masked_max, masked_mean

POOLINGS = ("cls",) + _POOLED

__all__ = [
    "POOLINGS", "KorchPoolingConfig", "KorchPoolingForSequenceClassification", "build_classifier",
    "classifier_from_config", "masked_max", "masked_mean", "register_auto_classes", "save_classifier",
]

# Encoder config keys that describe a previous head, not the encoder; dropped when a new classifier is built.
_HEAD_KEYS = ("architectures", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task")


def register_auto_classes() -> None:
    """AutoConfig and AutoModelForSequenceClassification learn `korch-pooling`. Idempotent.

    `import korch` already arranges this lazily (korch._hf_auto); calling it again is harmless.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    AutoConfig.register(KorchPoolingConfig.model_type, KorchPoolingConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(KorchPoolingConfig, KorchPoolingForSequenceClassification,
                                                exist_ok=True)


def build_classifier(model: ModelConfig, *, num_labels: int, id2label: dict[int, str], pooling: str,
                     vocab_size: int, seq_len: int, pad_token_id: int, start_from: str | None = None,
                     classifier_dropout: float | None = None):
    """A classifier with a fresh head of `num_labels` classes named by `id2label`.

    The encoder comes from `start_from` (an earlier stage's final/: MLM, classifier or any HF encoder folder),
    else `model.pretrained`, else a fresh init from `build_model_config`. From a folder only the encoder's weights
    are kept (safetensors only); a previous classification head is never reused.
    """
    _check_labels(num_labels, id2label)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    source = start_from or model.pretrained
    encoder = _load_encoder(source) if source else None
    encoder_config = encoder.config if encoder is not None else build_model_config(model, vocab_size, seq_len,
                                                                                  pad_token_id)
    net = classifier_from_config(_classifier_config(encoder_config, num_labels=num_labels, id2label=id2label,
                                                    pooling=pooling, classifier_dropout=classifier_dropout))
    if encoder is not None:
        _copy_encoder(encoder, net.base_model, source)
    if model.gradient_checkpointing:
        # transformers 5 renamed it to activation checkpointing; the old name still works there, with a warning.
        enable = getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable
        enable()
    return net


def classifier_from_config(config: Any):
    """A freshly initialised classifier of the class `config` describes (pooled or Hugging Face's own)."""
    if isinstance(config, KorchPoolingConfig):
        return KorchPoolingForSequenceClassification(config)
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(config)


def save_classifier(model: Any, folder: str) -> None:
    """`save_pretrained` as safetensors. A pooled model's folder also gets its two source files and `auto_map`
    (the classes carry `_auto_class`, so transformers copies them), for loading with `trust_remote_code=True`."""
    model.save_pretrained(folder, safe_serialization=True)


def _check_labels(num_labels: int, id2label: dict[int, str]) -> None:
    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2 for single-label classification, got {num_labels}")
    if sorted(id2label) != list(range(num_labels)):
        raise ValueError(f"id2label must name every id 0..{num_labels - 1} once, got ids {sorted(id2label)}")
    if len(set(id2label.values())) != num_labels:
        raise ValueError(f"id2label names must be distinct, got {list(id2label.values())}")


def _classifier_config(encoder_config: Any, *, num_labels: int, id2label: dict[int, str], pooling: str,
                       classifier_dropout: float | None) -> Any:
    labels = {"id2label": dict(id2label), "label2id": {name: i for i, name in id2label.items()}}
    if isinstance(encoder_config, KorchPoolingConfig):  # a pooled classifier's config: start from its encoder
        encoder_config = encoder_config.encoder
    encoder_dict = encoder_config.to_dict()
    for key in _HEAD_KEYS:
        encoder_dict.pop(key, None)
    encoder_dict.pop("transformers_version", None)
    if pooling != "cls":
        return KorchPoolingConfig(encoder=encoder_dict, pooling=pooling, classifier_dropout=classifier_dropout,
                                  **labels)
    config = copy.deepcopy(encoder_config)
    for key in ("architectures", "problem_type", "finetuning_task"):
        if hasattr(config, key):
            setattr(config, key, None)
    config.id2label, config.label2id = labels["id2label"], labels["label2id"]
    if classifier_dropout is not None:
        # BERT reads `classifier_dropout`; DeBERTa-v2 reads `cls_dropout` (both fall back to hidden_dropout_prob).
        config.classifier_dropout = classifier_dropout
        config.cls_dropout = classifier_dropout
    return config


def _load_encoder(source: str):
    """The bare encoder (BertModel, DebertaV2Model, ...) of a model folder, safetensors only."""
    from transformers import AutoConfig, AutoModel

    register_auto_classes()
    config = AutoConfig.from_pretrained(source)
    if isinstance(config, KorchPoolingConfig):
        return load_pretrained(source, KorchPoolingForSequenceClassification).encoder
    # AutoModel reads the encoder out of any head's folder (BertForMaskedLM's `bert.*`, ...); heads are dropped.
    return load_pretrained(source, AutoModel)


def _copy_encoder(encoder: Any, target: Any, source: str) -> None:
    """Copy encoder weights; only a BERT CLS pooler may be missing on either side (MLM folders have none)."""
    result = target.load_state_dict(encoder.state_dict(), strict=False)
    bad = [k for k in result.missing_keys + result.unexpected_keys if not k.startswith("pooler.")]
    if bad:
        raise ValueError(f"the encoder in {source} does not fit the classifier's encoder; mismatched weights: "
                         f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")
