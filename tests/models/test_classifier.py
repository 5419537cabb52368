"""Sequence classifiers: padding-safe pooling, builders, and saved folders that load with and without korch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import korch  # noqa: F401  (registers korch-pooling with transformers' Auto classes, lazily)
from korch.config import ModelConfig
from korch.models import build_mlm_model
from toy_inputs import VOCAB, logits_of, toy_batch
from korch.models.classifier import (
    KorchPoolingConfig,
    KorchPoolingForSequenceClassification,
    build_classifier,
    classifier_from_config,
    masked_max,
    masked_mean,
    register_auto_classes,
    save_classifier,
)

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
ARCHS = ["bert", "deberta-v2"]
POOLINGS = ["cls", "mean", "max"]


def _build(arch="bert", pooling="mean", seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_labels", 3)
    kw.setdefault("id2label", LABELS)
    net = build_classifier(ModelConfig(arch=arch), pooling=pooling, vocab_size=len(VOCAB), seq_len=32,
                           pad_token_id=0, **kw)
    return net.eval()


def _save_with_tokenizer(net, folder):
    from transformers import BertTokenizerFast

    save_classifier(net, str(folder))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # do_lower_case=False: BERT's lower-casing strips accents, which splits Hangul syllables into jamo.
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=False).save_pretrained(str(folder))


# ---- pooling -------------------------------------------------------------------------------------------------


def test_masked_pooling_ignores_padding():
    torch.manual_seed(0)
    real = torch.randn(1, 3, 4) - 5.0  # all negative: a pad counted as 0 (or a large pad) would win a max
    padded = torch.cat([real, torch.full((1, 2, 4), 1e4)], dim=1)
    hidden = torch.cat([padded, torch.randn(1, 5, 4)], dim=0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    torch.testing.assert_close(masked_mean(hidden, mask)[0], masked_mean(real, torch.ones(1, 3))[0])
    torch.testing.assert_close(masked_mean(hidden, mask)[0], real[0].mean(dim=0))  # divides by 3, not 5
    torch.testing.assert_close(masked_max(hidden, mask)[0], real[0].max(dim=0).values)
    # The unpadded row is untouched, and no mask means every position counts.
    torch.testing.assert_close(masked_mean(hidden, mask)[1], hidden[1].mean(dim=0))
    torch.testing.assert_close(masked_max(hidden, None), hidden.max(dim=1).values)


def test_masked_pooling_of_an_all_padding_row_is_zero_not_nan():
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert torch.equal(masked_mean(hidden, mask)[1], torch.zeros(4))
    assert torch.equal(masked_max(hidden, mask)[1], torch.zeros(4))


def test_masked_max_in_bf16():
    hidden = torch.tensor([[[-3.0], [-2.0], [100.0]]], dtype=torch.bfloat16)
    assert masked_max(hidden, torch.tensor([[1, 1, 0]])).item() == -2.0


# ---- builders ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_build_from_config_and_padding_changes_nothing(arch, pooling):
    net = _build(arch, pooling)
    native = {"bert": "BertForSequenceClassification", "deberta-v2": "DebertaV2ForSequenceClassification"}[arch]
    assert type(net).__name__ == (native if pooling == "cls" else "KorchPoolingForSequenceClassification")
    assert net.config.num_labels == 3 and net.config.id2label == LABELS
    assert net.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}

    ids, mask = toy_batch()
    batched = logits_of(net, ids, mask)
    alone = logits_of(net, ids[1:, :4], mask[1:, :4])
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=1e-4)

    net.train()
    out = net(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and net.base_model.get_input_embeddings().weight.grad is not None


def test_pooled_encoder_has_no_unused_cls_pooler():
    # Every parameter gets a gradient: DDP would otherwise need find_unused_parameters.
    net = _build("bert", "max").train()
    ids, mask = toy_batch()
    net(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


def test_gradient_checkpointing_and_dropout():
    net = build_classifier(ModelConfig(gradient_checkpointing=True), num_labels=2, id2label={0: "neg", 1: "pos"},
                           pooling="mean", vocab_size=len(VOCAB), seq_len=32, pad_token_id=0, classifier_dropout=0.3)
    # transformers 5 renamed gradient checkpointing to activation checkpointing (the old name still warns).
    assert getattr(net, "is_activation_checkpointing", None) or net.is_gradient_checkpointing
    assert net.dropout.p == 0.3
    ids, mask = toy_batch()
    net.train()(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
    cls = build_classifier(ModelConfig(arch="deberta-v2"), num_labels=2, id2label={0: "neg", 1: "pos"},
                           pooling="cls", vocab_size=len(VOCAB), seq_len=32, pad_token_id=0, classifier_dropout=0.3)
    assert cls.config.cls_dropout == 0.3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="pooling must be one of cls, mean, max"):
        _build(pooling="attention")
    with pytest.raises(ValueError, match="id2label must name every id 0..2"):
        _build(id2label={0: "a", 1: "b"})
    with pytest.raises(ValueError, match="distinct"):
        _build(id2label={0: "a", 1: "a", 2: "b"})
    with pytest.raises(ValueError, match="pooling must be one of mean, max"):
        KorchPoolingConfig(pooling="cls")


# ---- saved folders -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,pooling", [("bert", "cls"), ("bert", "mean"), ("bert", "max"), ("deberta-v2", "cls"),
                                          ("deberta-v2", "mean")])
def test_save_then_auto_load_restores_exactly(tmp_path, arch, pooling):
    from transformers import AutoModelForSequenceClassification

    net = _build(arch, pooling)
    save_classifier(net, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    if pooling == "cls":  # Hugging Face's own class: nothing korch-specific in the folder
        assert "auto_map" not in config and not (tmp_path / "modeling_korch_pooling.py").exists()
    else:
        assert config["model_type"] == "korch-pooling" and config["encoder"]["model_type"] == arch
        assert config["auto_map"] == {
            "AutoConfig": "configuration_korch_pooling.KorchPoolingConfig",
            "AutoModelForSequenceClassification": "modeling_korch_pooling.KorchPoolingForSequenceClassification"}
        for name in ("modeling_korch_pooling.py", "configuration_korch_pooling.py"):
            source = (tmp_path / name).read_text()
            assert not re.search(r"^\s*(from|import)\s+korch\b", source, re.MULTILINE), name

    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert type(loaded) is type(net)  # korch's own class (registered), not a remote-code copy
    assert loaded.config.id2label == LABELS
    ids, mask = toy_batch()
    torch.testing.assert_close(logits_of(loaded, ids, mask), logits_of(net, ids, mask), atol=0, rtol=0)

    # classifier_from_config: the same class, fresh weights, from the saved config (the export path).
    fresh = classifier_from_config(loaded.config)
    assert type(fresh) is type(net) and fresh.config.id2label == LABELS


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pipeline_returns_label_names(tmp_path, pooling):
    from transformers import pipeline

    _save_with_tokenizer(_build("bert", pooling), tmp_path)
    classify = pipeline("text-classification", model=str(tmp_path), device="cpu")
    results = classify(["정말 재밌다 최고", "지루 했다"])
    assert [r["label"] in LABELS.values() for r in results] == [True, True]


def test_pooled_folder_loads_with_trust_remote_code_where_korch_is_missing(tmp_path):
    folder = tmp_path / "model"
    net = _build("deberta-v2", "max")
    _save_with_tokenizer(net, folder)
    ids, mask = toy_batch()
    torch.save({"ids": ids, "mask": mask, "logits": logits_of(net, ids, mask)}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["korch"] = None  # any `import korch` now raises ImportError
        import torch
        from transformers import AutoModelForSequenceClassification, pipeline
        folder = {str(folder)!r}
        net = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(net).__module__.startswith("transformers_modules"), type(net).__module__
        assert not [m for m in sys.modules if m.startswith("korch.")]
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = net(input_ids=expected["ids"], attention_mask=expected["mask"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=0, rtol=0)
        label = pipeline("text-classification", model=folder, trust_remote_code=True, device="cpu")("정말 최고")[0]
        assert label["label"] in {set(LABELS.values())!r}, label
        print("ok")
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_import_korch_stays_light_and_registers_when_transformers_loads():
    # `import korch` must not pull in torch/transformers; registration follows once the Auto modules load.
    script = textwrap.dedent("""
        import sys
        import korch
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        from transformers import AutoConfig, AutoModelForSequenceClassification
        config = AutoConfig.for_model("korch-pooling", pooling="max")
        assert type(config).__name__ == "KorchPoolingConfig"
        assert type(config) in AutoModelForSequenceClassification._model_mapping
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_install_registers_at_once_when_transformers_came_first(monkeypatch):
    # transformers imported before korch: install() finds the Auto modules loaded and registers right away.
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from korch import _hf_auto

    monkeypatch.setattr(_hf_auto, "_registered", set())
    monkeypatch.delitem(CONFIG_MAPPING._extra_content, "korch-pooling")
    monkeypatch.delitem(AutoModelForSequenceClassification._model_mapping._extra_content, KorchPoolingConfig)
    _hf_auto.install()
    assert _hf_auto._registered == {"config", "model"}
    mapping = AutoModelForSequenceClassification._model_mapping
    assert mapping[KorchPoolingConfig] is KorchPoolingForSequenceClassification


def test_register_auto_classes_is_idempotent():
    from transformers import AutoConfig

    register_auto_classes()
    register_auto_classes()
    assert isinstance(AutoConfig.for_model("korch-pooling"), KorchPoolingConfig)


# ---- starting from folders -----------------------------------------------------------------------------------


def _encoder_weight(net):
    """The first layer's query projection (`query` in BERT, `query_proj` in DeBERTa-v2)."""
    weights = dict(net.base_model.named_parameters())
    return next(w for name, w in weights.items() if name.startswith("encoder.layer.0.attention.self.query"))


@pytest.mark.parametrize("arch,pooling", [("bert", "mean"), ("bert", "cls"), ("deberta-v2", "max"),
                                          ("deberta-v2", "cls")])
def test_build_from_mlm_folder_keeps_encoder_weights(tmp_path, arch, pooling):
    torch.manual_seed(3)
    mlm = build_mlm_model(ModelConfig(arch=arch), vocab_size=len(VOCAB), seq_len=32)
    mlm.save_pretrained(str(tmp_path))
    net = _build(arch, pooling, start_from=str(tmp_path))
    assert net.config.id2label == LABELS and net.num_labels == 3
    mlm_encoder = mlm.base_model
    torch.testing.assert_close(net.base_model.get_input_embeddings().weight, mlm_encoder.get_input_embeddings().weight)
    torch.testing.assert_close(_encoder_weight(net), _encoder_weight(mlm))
    # and model.pretrained is the same as start_from
    again = build_classifier(ModelConfig(arch=arch, pretrained=str(tmp_path)), num_labels=2, id2label={0: "n", 1: "p"},
                             pooling=pooling, vocab_size=len(VOCAB), seq_len=32, pad_token_id=0)
    torch.testing.assert_close(_encoder_weight(again), _encoder_weight(mlm))


def test_build_from_classifier_folder_keeps_encoder_with_a_fresh_head(tmp_path):
    first = _build("bert", "max")
    save_classifier(first, str(tmp_path))
    second = _build("bert", "cls", num_labels=2, id2label={0: "neg", 1: "pos"}, start_from=str(tmp_path))
    torch.testing.assert_close(_encoder_weight(second), _encoder_weight(first))
    assert second.classifier.out_features == 2 and second.config.id2label == {0: "neg", 1: "pos"}
    third = _build("bert", "mean", seed=1, start_from=str(tmp_path))  # same labels, still a fresh head
    torch.testing.assert_close(_encoder_weight(third), _encoder_weight(first))
    assert not torch.equal(third.classifier.weight, first.classifier.weight)


def test_pickle_only_folder_is_refused(tmp_path):
    from safetensors.torch import load_file

    mlm = build_mlm_model(ModelConfig(), vocab_size=len(VOCAB), seq_len=32)
    mlm.save_pretrained(str(tmp_path))
    torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        _build("bert", "mean", start_from=str(tmp_path))
