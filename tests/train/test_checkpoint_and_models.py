"""Checkpoint files, atomic publishing, model builders (incl. DeBERTa-v2 at 2048 tokens), all without Ray."""

from __future__ import annotations

import pytest
import torch

from korch.config import ModelConfig
from korch.models import build_mlm_model, build_model_config, default_max_positions
from korch.train import checkpoint as ckpt


def test_checkpoint_roundtrip_and_partial_folders_are_not_checkpoints(tmp_path):
    weights = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(4)}
    moments = {"a.weight::exp_avg": torch.randn(3, 4)}
    ckpt.write_checkpoint(tmp_path / "c", weights, moments, {"step": 7, "epoch": 1})
    assert ckpt.is_checkpoint(tmp_path / "c")
    loaded_weights, loaded_moments, state = ckpt.read_checkpoint(tmp_path / "c")
    assert state["step"] == 7 and torch.equal(loaded_weights["a.weight"], weights["a.weight"])
    assert torch.equal(loaded_moments["a.weight::exp_avg"], moments["a.weight::exp_avg"])
    (tmp_path / "c" / ckpt.STATE_FILE).unlink()  # state.json is written last: without it, not a checkpoint
    assert not ckpt.is_checkpoint(tmp_path / "c")


def test_atomic_publish_keeps_the_old_folder_when_the_build_fails(tmp_path):
    target = tmp_path / "final"
    ckpt.atomic_publish(lambda d: (d / "model.txt").write_text("v1"), target)

    def broken(directory):
        (directory / "model.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_publish(broken, target)
    assert (target / "model.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temp folders left behind
    ckpt.atomic_publish(lambda d: (d / "model.txt").write_text("v2"), target)
    assert (target / "model.txt").read_text() == "v2"


def test_load_weights_rejects_a_mismatched_checkpoint():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="does not match"):
        ckpt.load_weights_into(model, {"other.weight": torch.zeros(2, 2)})


def test_named_sizes_and_position_defaults():
    config = build_model_config(ModelConfig(size="base"), vocab_size=32000, seq_len=512)
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (768, 12, 512)
    assert default_max_positions(100) == 128 and default_max_positions(1536) == 1536 and default_max_positions(2000) == 2048
    tweaked = build_model_config(ModelConfig(overrides={"num_attention_heads": 4}), vocab_size=100, seq_len=64)
    assert tweaked.num_attention_heads == 4


def test_deberta_v2_trains_at_2048_tokens_with_gradient_checkpointing():
    torch.manual_seed(0)
    model = build_mlm_model(ModelConfig(arch="deberta-v2", gradient_checkpointing=True), vocab_size=500, seq_len=2048)
    assert model.config.model_type == "deberta-v2" and model.config.max_position_embeddings >= 2048
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    ids = torch.randint(5, 500, (1, 2048))
    labels = torch.full_like(ids, -100)
    labels[0, ::97] = ids[0, ::97]
    model.train()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.deberta.embeddings.word_embeddings.weight.grad is not None
