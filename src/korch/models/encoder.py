"""Bare encoders (`AutoModel`, no task head) for embedding tasks: from a parent's folder, a pretrained one, or config.

BERT is built without its pooler: embedding tasks pool themselves, and a pooler whose weights never get a
gradient would only be dead weight in the optimizer and in every checkpoint.
"""

from __future__ import annotations

from typing import Any

from korch.config import ModelConfig


def _no_pooler(config: Any) -> dict:
    return {"add_pooling_layer": False} if getattr(config, "model_type", "") == "bert" else {}


def load_encoder_folder(source: str):
    """The bare encoder of a model folder (safetensors only), without a pooler: an exported embedding stage has
    none, and building one would only report its weights missing on every load."""
    import logging

    from transformers import AutoConfig, AutoModel

    # A masked LM's folder holds its head too: the encoder drops it on purpose, so transformers' load report
    # listing only those UNEXPECTED keys is noise. A report with MISSING or MISMATCHED weights still shows.
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_only_unexpected_keys)
    try:
        return AutoModel.from_pretrained(source, use_safetensors=True, **_no_pooler(AutoConfig.from_pretrained(source)))
    finally:
        report_logger.removeFilter(_only_unexpected_keys)


def _only_unexpected_keys(record) -> bool:
    """False (drop) for a load report whose only findings are unexpected keys."""
    message = record.getMessage()
    return "LOAD REPORT" not in message or "MISSING" in message or "MISMATCH" in message


def encoder_from_config(config: Any):
    from transformers import AutoModel

    return AutoModel.from_config(config, **_no_pooler(config))


def build_encoder(model: ModelConfig, vocab_size: int, seq_len: int, pad_token_id: int = 0,
                  start_from: str | None = None):
    """From `start_from` (a parent's final/, e.g. an mlm stage's masked LM: its encoder is kept, its head dropped),
    `model.pretrained`, or fresh from config."""
    from korch.models import build_model_config

    source = start_from or model.pretrained
    if source:
        return load_encoder_folder(source)
    return encoder_from_config(build_model_config(model, vocab_size, seq_len, pad_token_id))
