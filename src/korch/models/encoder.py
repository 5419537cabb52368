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
    from transformers import AutoConfig, AutoModel

    return AutoModel.from_pretrained(source, use_safetensors=True, **_no_pooler(AutoConfig.from_pretrained(source)))


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
