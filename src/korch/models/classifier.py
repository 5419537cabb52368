"""Sequence classifiers on bert / deberta-v2 encoders, with `cls`, `mean` or `max` pooling, and a fastText-style
bag of hashed n-grams (`arch: ngram`, `KorchNgramForSequenceClassification`, `model_type: korch-ngram`).

`cls` is Hugging Face's own `XForSequenceClassification`, so its folder loads anywhere without korch. `mean` and
`max` use `KorchPoolingForSequenceClassification` (`model_type: korch-pooling`); its folder carries the two
korch-free source files it needs, so it loads with `import korch` (Auto registration) or, without korch, with
`trust_remote_code=True`. The n-gram classifier's folder works the same way (its own two source files).
"""

from __future__ import annotations

import copy
from typing import Any

from korch.config import ModelConfig
from korch.models import NGRAM_DEFAULTS, NGRAM_HIDDEN, build_model_config, load_pretrained
from korch.models.configuration_korch_pooling import POOLINGS as _POOLED
from korch.models.configuration_korch_pooling import KorchPoolingConfig
from korch.models.configuration_korch_ngram import KorchNgramConfig
from korch.models.modeling_korch_ngram import KorchNgramForSequenceClassification
from korch.models.modeling_korch_pooling import KorchPoolingForSequenceClassification, masked_max, masked_mean

POOLINGS = ("cls",) + _POOLED

__all__ = [
    "POOLINGS", "KorchNgramConfig", "KorchNgramForSequenceClassification", "KorchPoolingConfig", "KorchPoolingForSequenceClassification", "build_classifier",
    "classifier_from_config", "masked_max", "masked_mean", "register_auto_classes", "save_classifier",
]

# Encoder config keys that describe a previous head, not the encoder; dropped when a new classifier is built.
_HEAD_KEYS = ("architectures", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task")


def register_auto_classes() -> None:
    """AutoConfig and AutoModelForSequenceClassification learn `korch-pooling` and `korch-ngram`. Idempotent.

    `import korch` already arranges this lazily (korch._hf_auto); calling it again is harmless.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    for config_class, model_class in ((KorchPoolingConfig, KorchPoolingForSequenceClassification),
                                      (KorchNgramConfig, KorchNgramForSequenceClassification)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForSequenceClassification.register(config_class, model_class, exist_ok=True)


def build_classifier(model: ModelConfig, *, num_labels: int, id2label: dict[int, str], pooling: str,
                     vocab_size: int, seq_len: int, pad_token_id: int, start_from: str | None = None,
                     classifier_dropout: float | None = None):
    """A classifier with a fresh head of `num_labels` classes named by `id2label`.

    The encoder comes from `start_from` (an earlier stage's final/: MLM, classifier or any HF encoder folder),
    else `model.pretrained`, else a fresh init from `build_model_config`. From a folder only the encoder's weights
    are kept (safetensors only); a previous classification head is never reused.

    `model.arch == "ngram"` builds a bag of n-grams instead (`_build_ngram`); `pooling` then does not apply.
    """
    _check_labels(num_labels, id2label)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    if model.arch == "ngram":
        return _build_ngram(model, num_labels=num_labels, id2label=id2label, vocab_size=vocab_size,
                            pad_token_id=pad_token_id, start_from=start_from, classifier_dropout=classifier_dropout)
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
    """A freshly initialised classifier of the class `config` describes (pooled, n-gram or Hugging Face's own)."""
    if isinstance(config, KorchPoolingConfig):
        return KorchPoolingForSequenceClassification(config)
    if isinstance(config, KorchNgramConfig):
        return KorchNgramForSequenceClassification(config)
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
    if isinstance(config, KorchNgramConfig):
        raise ValueError(f"{source} holds an n-gram bag classifier (korch-ngram), which has no encoder to start a "
                         "bert or deberta-v2 classifier from; set model.arch: ngram to continue it, or start from "
                         "an encoder folder")
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


def _build_ngram(model: ModelConfig, *, num_labels: int, id2label: dict[int, str], vocab_size: int,
                 pad_token_id: int, start_from: str | None, classifier_dropout: float | None):
    """A bag-of-n-grams classifier with a fresh head.

    Fresh from config: `hidden_size` by `model.size` (NGRAM_HIDDEN), `ngram_max` and `buckets` (NGRAM_DEFAULTS),
    then `model.overrides`. From a folder (`start_from`, else `model.pretrained`) that holds an n-gram classifier,
    its n-gram table is kept; any other folder (a TAPT stage's BERT MLM, ...) has no weights an n-gram bag could
    continue: only its tokenizer is used (the runner already hands it over) and the bag starts fresh, with one line
    saying so.
    """
    labels = {"id2label": dict(id2label), "label2id": {name: i for i, name in id2label.items()}}
    source = start_from or model.pretrained
    previous = None
    if source:
        from transformers import AutoConfig

        register_auto_classes()
        if isinstance(AutoConfig.from_pretrained(source), KorchNgramConfig):
            previous = load_pretrained(source, KorchNgramForSequenceClassification)
        else:
            print(f"korch: model.arch ngram has no encoder to continue; {source} gives only its tokenizer, "
                  "the n-gram bag starts fresh", flush=True)
    if previous is not None:
        settings = previous.config.to_dict()
        for key in _HEAD_KEYS + ("transformers_version", "model_type", "auto_map", "classifier_dropout"):
            settings.pop(key, None)
        config = KorchNgramConfig(**{**settings, **model.overrides}, classifier_dropout=classifier_dropout, **labels)
        net = KorchNgramForSequenceClassification(config)
        # the n-gram table only: the head stays freshly initialised, never the previous one
        table = {k: v for k, v in previous.state_dict().items() if not k.startswith("classifier.")}
        result = net.load_state_dict(table, strict=False)
        bad = [k for k in result.missing_keys + result.unexpected_keys if not k.startswith("classifier.")]
        if bad:
            raise ValueError(f"the n-gram table in {source} does not fit this classifier: {bad[:5]}")
        return net
    settings = {"hidden_size": NGRAM_HIDDEN[model.size], **NGRAM_DEFAULTS, **model.overrides}
    config = KorchNgramConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, classifier_dropout=classifier_dropout,
                              **settings, **labels)
    return KorchNgramForSequenceClassification(config)
