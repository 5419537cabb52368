"""Model builders: a generic `build_model_config` plus named sizes, and safe loading of pretrained folders.

Nothing is downloaded: from-scratch models are built from configs, pretrained ones load from local folders
(safetensors only, so a run folder can never smuggle in a pickle).
"""

from __future__ import annotations

from typing import Any

from korch.config import ModelConfig

# hidden, layers, heads, intermediate: the usual BERT ladder, plus a CPU-sized `tiny` for laptops and tests.
NAMED_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 2, 128),
    "mini": (256, 4, 4, 1024),
    "small": (512, 4, 8, 2048),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


# hidden size of `arch: ngram` (a bag of n-gram embeddings, no layers) per named size.
NGRAM_HIDDEN: dict[str, int] = {"tiny": 64, "mini": 128, "small": 256, "base": 512, "large": 1024}
# `arch: ngram` defaults, each overridable in `model.overrides`.
NGRAM_DEFAULTS: dict[str, int] = {"ngram_max": 3, "buckets": 2 ** 16}


def default_max_positions(seq_len: int) -> int:
    return max(128, -(-seq_len // 64) * 64)


def build_model_config(model: ModelConfig, vocab_size: int, seq_len: int, pad_token_id: int = 0) -> Any:
    """A Hugging Face config for from-scratch init: named size, then `max_position_embeddings`, then overrides."""
    from transformers import BertConfig, DebertaV2Config

    if model.arch == "ngram":
        raise ValueError("model.arch ngram has no encoder config: it is a classifier only (korch.models.classifier "
                         "builds it); use bert or deberta-v2 here")
    hidden, layers, heads, intermediate = NAMED_SIZES[model.size]
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, pad_token_id=pad_token_id,
        max_position_embeddings=model.max_position_embeddings or default_max_positions(seq_len),
    )
    if model.arch == "bert":
        config = BertConfig(**common)
    else:
        # DeBERTa-v2 with relative attention only: no absolute position cap on sequence length, which is what
        # long-sequence (1536/2048) coref training wants.
        config = DebertaV2Config(
            **common, relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
            max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
            type_vocab_size=0,
        )
    for key, value in model.overrides.items():
        setattr(config, key, value)
    return config


def build_mlm_model(model: ModelConfig, vocab_size: int, seq_len: int, pad_token_id: int = 0, start_from: str | None = None):
    """A masked-LM model: from `start_from` (an earlier stage's final/), `model.pretrained`, or fresh from config."""
    from transformers import AutoModelForMaskedLM

    source = start_from or model.pretrained
    if source:
        net = load_pretrained(source, AutoModelForMaskedLM)
    else:
        net = AutoModelForMaskedLM.from_config(build_model_config(model, vocab_size, seq_len, pad_token_id))
    return enable_checkpointing(net, model)


def enable_checkpointing(net, model: ModelConfig):
    """Turn on gradient checkpointing when `model.gradient_checkpointing` asks (long sequences: 1536/2048)."""
    if model.gradient_checkpointing:
        # transformers 5 renamed it to activation checkpointing; the old name still works there, with a warning.
        enable = getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable
        enable()
    return net


def load_pretrained(path: str, auto_class: Any):
    """Load a Hugging Face folder with safetensors only; a stray pickle (pytorch_model.bin) is never read."""
    return auto_class.from_pretrained(path, use_safetensors=True)
