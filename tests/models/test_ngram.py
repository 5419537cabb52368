"""The bag-of-n-grams classifier (`arch: ngram`, `korch-ngram`): fixed hashing, padding that changes nothing, saved
folders that Auto classes and `pipeline` load after `import korch`, and builds that never take a parent's BERT."""

from __future__ import annotations

import json
import re

import pytest
import torch

import korch  # noqa: F401  (registers korch-ngram with transformers' Auto classes, lazily)
from korch.config import ModelConfig
from korch.models import build_mlm_model
from toy_inputs import VOCAB, logits_of, toy_batch
from korch.models.classifier import (
    KorchNgramConfig,
    KorchNgramForSequenceClassification,
    build_classifier,
    classifier_from_config,
    save_classifier,
)
from korch.models.modeling_korch_ngram import ngram_rows

LABELS = {0: "negative", 1: "positive"}


def _build(seed=0, size="tiny", overrides=None, **kw):
    torch.manual_seed(seed)
    model = ModelConfig(arch="ngram", size=size, overrides={"buckets": 512} if overrides is None else overrides)
    kw.setdefault("pooling", "cls")
    return build_classifier(model, num_labels=2, id2label=LABELS, vocab_size=len(VOCAB), seq_len=32,
                            pad_token_id=0, **kw).eval()


GOLDEN = [26040, 24218, 22319, 132493, 92378, 68022, 110876]  # bigrams then trigrams of [2, 5, 6, 7, 3]


def test_hashing_is_fixed_arithmetic():
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    rows, keep = ngram_rows(ids, None, vocab_size=13, ngram_max=3, buckets=1 << 18)
    again, _ = ngram_rows(ids.clone(), torch.ones_like(ids), vocab_size=13, ngram_max=3, buckets=1 << 18)
    assert torch.equal(rows, again)
    assert rows[0, :5].tolist() == [2, 5, 6, 7, 3]  # unigrams are their own rows
    # 4 bigrams and 3 trigrams: the last positions have no n-gram (counted 0, never a padded neighbour)
    assert keep[0].tolist() == [True] * 5 + [True] * 4 + [False] + [True] * 3 + [False] * 2
    hashed = rows[0, 5:][keep[0, 5:]]
    assert ((hashed >= 13) & (hashed < 13 + (1 << 18))).all()
    assert len(set(hashed.tolist())) == 7  # distinct n-grams, distinct rows here
    # order matters: (5, 6) and (6, 5) are different bigrams
    swapped, _ = ngram_rows(torch.tensor([[6, 5]]), None, vocab_size=13, ngram_max=2, buckets=1 << 18)
    assert swapped[0, 2] != rows[0, 6]
    # a golden value: the hash must not change between korch versions, or saved folders would predict differently
    assert hashed.tolist() == GOLDEN


def test_padding_changes_nothing_and_every_parameter_learns():
    net = _build()
    ids, mask = toy_batch()
    batched = logits_of(net, ids, mask)
    alone = logits_of(net, ids[1:, :4], mask[1:, :4])
    torch.testing.assert_close(batched[1:], alone, atol=1e-6, rtol=1e-5)
    # whatever sits in padded positions is ignored
    noisy = ids.clone()
    noisy[1, 4:] = torch.tensor([9, 10, 11])
    torch.testing.assert_close(logits_of(net, noisy, mask), batched, atol=0, rtol=0)

    net.train()
    out = net(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


def test_build_sizes_overrides_and_dropout():
    net = _build(size="mini", overrides={"ngram_max": 4, "buckets": 1000}, classifier_dropout=0.2)
    assert isinstance(net, KorchNgramForSequenceClassification)
    assert (net.config.hidden_size, net.config.ngram_max, net.config.buckets) == (128, 4, 1000)
    assert net.embeddings.weight.shape == (len(VOCAB) + 1000, 128) and net.dropout.p == 0.2
    assert net.config.id2label == LABELS and net.config.label2id == {"negative": 0, "positive": 1}
    assert _build(overrides={}).config.buckets == 2 ** 16  # the default
    assert _build(pooling="max").config.hidden_size == 64  # pooling does not apply to a bag
    with pytest.raises(ValueError, match="ngram_max must be at least 1"):
        _build(overrides={"ngram_max": 0})
    with pytest.raises(ValueError, match="no encoder config"):
        build_mlm_model(ModelConfig(arch="ngram"), vocab_size=len(VOCAB), seq_len=32)


def test_save_then_auto_load_restores_exactly(tmp_path):
    from transformers import AutoModelForSequenceClassification

    net = _build()
    save_classifier(net, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "korch-ngram" and (tmp_path / "model.safetensors").exists()
    assert config["auto_map"] == {
        "AutoConfig": "configuration_korch_ngram.KorchNgramConfig",
        "AutoModelForSequenceClassification": "modeling_korch_ngram.KorchNgramForSequenceClassification"}
    for name in ("modeling_korch_ngram.py", "configuration_korch_ngram.py"):
        assert not re.search(r"^\s*(from|import)\s+korch\b", (tmp_path / name).read_text(), re.MULTILINE), name
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert type(loaded) is KorchNgramForSequenceClassification and loaded.config.id2label == LABELS
    ids, mask = toy_batch()
    torch.testing.assert_close(logits_of(loaded, ids, mask), logits_of(net, ids, mask), atol=0, rtol=0)
    fresh = classifier_from_config(loaded.config)
    assert type(fresh) is KorchNgramForSequenceClassification and fresh.config.buckets == 512


def test_pipeline_on_korean_text(tmp_path):
    from transformers import BertTokenizerFast, pipeline

    save_classifier(_build(), str(tmp_path))
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=False).save_pretrained(str(tmp_path))
    classify = pipeline("text-classification", model=str(tmp_path), device="cpu")
    results = classify(["정말 재밌다 최고", "영화 지루 했다 별로"])
    assert [r["label"] in LABELS.values() for r in results] == [True, True]


def test_start_from_a_bert_folder_uses_none_of_its_weights(tmp_path, capsys):
    mlm = build_mlm_model(ModelConfig(), vocab_size=len(VOCAB), seq_len=32)
    mlm.save_pretrained(str(tmp_path))
    from_parent = _build(seed=5, start_from=str(tmp_path))
    assert "has no encoder to continue" in capsys.readouterr().out
    fresh = _build(seed=5)
    for (name, a), (_, b) in zip(from_parent.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name  # the same seed gives the same fresh model: nothing came from the parent
    assert from_parent.embeddings.weight.shape == (len(VOCAB) + 512, 64)


def test_start_from_an_ngram_folder_keeps_its_table_with_a_fresh_head(tmp_path):
    first = _build(seed=1)
    save_classifier(first, str(tmp_path))
    second = _build(seed=2, overrides={}, start_from=str(tmp_path))
    assert second.config.buckets == 512  # the folder's table shape, not the defaults
    torch.testing.assert_close(second.embeddings.weight, first.embeddings.weight)
    assert not torch.equal(second.classifier.weight, first.classifier.weight)
    # and the other way round: a BERT classifier cannot start from a bag
    with pytest.raises(ValueError, match="no encoder"):
        build_classifier(ModelConfig(), num_labels=2, id2label=LABELS, pooling="cls", vocab_size=len(VOCAB),
                         seq_len=32, pad_token_id=0, start_from=str(tmp_path))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="buckets must be at least 1"):
        KorchNgramConfig(ngram_max=2, buckets=0)
    assert KorchNgramConfig(ngram_max=1, buckets=0).buckets == 0
