"""The classify task in-process (no Ray): its collate, loss wiring, evaluation arithmetic, option checks and
export; the real 2-worker runs are in tests/tasks/test_classify_runs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from korch.config import ModelConfig
from korch.errors import UserError
from korch.tasks.classify import ClassifyOptions, ClassifyTask

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from korch.data.labelled import iter_labelled_texts
    from korch.config import DataConfig
    from korch.data.tokenizer import train_wordpiece

    data = DataConfig(inputs=[str(DATA / "nsmc" / "ratings_train.head5000.txt")], max_docs=400)
    folder = train_wordpiece(iter_labelled_texts(data), str(tmp_path_factory.mktemp("tok")), vocab_size=800, min_frequency=1)
    return AutoTokenizer.from_pretrained(folder)


def _task(tokenizer, model=None, **options) -> ClassifyTask:
    info = ClassifyTask.data_info({"labels": ["negative", "positive"], "class_counts": {"train": {"negative": 30, "positive": 10}}},
                                  ClassifyOptions(**options))
    return ClassifyTask(ClassifyOptions(**options), model or ModelConfig(size="tiny"), tokenizer, 32, info)


def _rows(tokenizer, texts, labels):
    encoded = [tokenizer(text, truncation=True, max_length=32) for text in texts]
    return {"input_ids": [e["input_ids"] for e in encoded], "token_type_ids": [[0] * len(e["input_ids"]) for e in encoded],
            "label": labels, "row_id": list(range(len(texts))), "is_padding": [False] * len(texts)}


def test_collate_pads_to_the_longest_row_and_masks_padding(tokenizer):
    task = _task(tokenizer)
    rows = _rows(tokenizer, ["재밌다", "이 영화 정말 최고의 영화입니다 다시 보고 싶어요"], [1, 1])
    batch = task.collate(rows, torch.Generator())
    width = max(len(ids) for ids in rows["input_ids"])
    assert batch["input_ids"].shape == (2, width) and batch["labels"].tolist() == [1, 1]
    assert batch["attention_mask"][0].sum() == len(rows["input_ids"][0])
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_loss_falls_on_a_tiny_batch(tokenizer, pooling):
    torch.manual_seed(0)
    task = _task(tokenizer, pooling=pooling, loss="focal", gamma=2.0, alpha=[0.5, 0.5], label_smoothing=0.1)
    model = task.build_model(None)
    batch = task.collate(_rows(tokenizer, ["최고", "별로다 진짜", "좋아요", "지루함"], [1, 0, 1, 0]), torch.Generator())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = task.loss(model, batch).item()
    for _ in range(20):
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert task.loss(model, batch).item() < first


def test_eval_metrics_from_the_summed_confusion_matrix(tokenizer):
    task = _task(tokenizer)
    model = task.build_model(None).eval()
    rows = _rows(tokenizer, ["좋다", "나쁘다", "그저 그렇다", "최고"], [1, 0, 0, 1])
    batch = task.collate(rows, torch.Generator())
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last row is padding: it must not count
    with torch.no_grad():
        sums = task.eval_sums(model, batch, weight)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    predicted = logits.argmax(-1)[:3].tolist()
    metrics = task.eval_metrics(sums)
    assert metrics["rows"] == 3
    assert metrics["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, [1, 0, 0])) / 3)
    # Hand-made confusion matrix: 2 labels, true x predicted.
    sums = {"loss_sum": torch.tensor(3.0, dtype=torch.float64), "rows": torch.tensor(6.0, dtype=torch.float64),
            "confusion": torch.tensor([3.0, 1.0, 0.0, 2.0], dtype=torch.float64)}
    metrics = task.eval_metrics(sums)
    f1_negative = 2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4)
    f1_positive = 2 * (2 / 3) * (2 / 2) / (2 / 3 + 2 / 2)
    assert metrics["accuracy"] == pytest.approx(5 / 6) and metrics["loss"] == pytest.approx(0.5)
    assert metrics["per_class_f1"] == pytest.approx({"negative": f1_negative, "positive": f1_positive})
    assert metrics["macro_f1"] == pytest.approx((f1_negative + f1_positive) / 2)


def test_per_class_options_must_match_the_labels():
    manifest = {"labels": ["a", "b", "c"], "class_counts": {"train": {"a": 6, "b": 3, "c": 1}}}
    with pytest.raises(UserError, match=r"classify.alpha has 2 values but the data has 3 labels \(a, b, c\)"):
        ClassifyTask.data_info(manifest, ClassifyOptions(loss="focal", alpha=[0.5, 0.5]))
    info = ClassifyTask.data_info(manifest, ClassifyOptions(class_weights="balanced"))
    assert info["class_weights"] == pytest.approx([10 / 18, 10 / 9, 10 / 3])


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_export_loads_with_the_auto_class_and_pipeline(tokenizer, tmp_path, pooling):
    import korch  # noqa: F401  (registers the pooled class with the Auto classes)
    from transformers import AutoModelForSequenceClassification, pipeline

    task = _task(tokenizer, pooling=pooling)
    model = task.build_model(None).eval()
    fresh = task.empty_model(model.config)
    fresh.load_state_dict(model.state_dict())
    task.save(fresh, str(tmp_path))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, use_safetensors=True).eval()
    batch = task.collate(_rows(tokenizer, ["정말 재밌어요"], [1]), torch.Generator())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    result = pipeline("text-classification", model=str(tmp_path))("정말 재밌어요")
    assert result[0]["label"] in {"negative", "positive"}


def test_ngram_model_trains_and_exports_through_the_task(tokenizer, tmp_path):
    import korch  # noqa: F401  (registers korch-ngram with the Auto classes)
    from transformers import AutoModelForSequenceClassification, pipeline

    torch.manual_seed(0)
    task = _task(tokenizer, ModelConfig(arch="ngram", overrides={"buckets": 1024}), pooling="max", label_smoothing=0.1)
    model = task.build_model(None)
    assert type(model).__name__ == "KorchNgramForSequenceClassification"
    batch = task.collate(_rows(tokenizer, ["최고", "별로다 진짜", "좋아요", "지루함"], [1, 0, 1, 0]), torch.Generator())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = task.loss(model, batch).item()
    for _ in range(20):
        task.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert task.loss(model, batch).item() < first
    model.eval()
    fresh = task.empty_model(model.config)
    fresh.load_state_dict(model.state_dict())
    task.save(fresh, str(tmp_path))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, use_safetensors=True).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert pipeline("text-classification", model=str(tmp_path))("정말 재밌어요")[0]["label"] in {"negative", "positive"}
