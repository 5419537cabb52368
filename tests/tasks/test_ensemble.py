"""The ensemble task in-process (no Ray): weights as data, the stage on a job folder of tiny saved classifiers
(one member corrupt, one missing), the ensemble.json round trip, and `korch predict`'s ensemble branch with the
Ray part replaced by the same in-process inference."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from korch.errors import UserError
from korch.tasks.ensemble import (
    classification_metrics, combine, load_ensemble, log_loss, member_probs, normalise_weights, optimise_weights,
    run_ensemble_stage, sha256_of, write_ensemble_folder,
)

GOOD, BAD = ["좋다", "최고", "재밌다", "감동", "추천"], ["별로", "지루하다", "최악", "실망", "아깝다"]


# --- pure parts ------------------------------------------------------------------------------------------------

def _constructed_case(rows=300, classes=3, seed=0):
    """An accurate member (0.7 on the true class, 15% of rows confidently wrong) and a noisy one (random
    probabilities, half their mass on the true class in 60% of rows)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=rows)
    accurate = np.full((rows, classes), 0.3 / (classes - 1))
    accurate[np.arange(rows), labels] = 0.7
    flip = rng.random(rows) < 0.15  # and sometimes confidently wrong, so it is not perfect
    accurate[flip] = np.roll(accurate[flip], 1, axis=1)
    guess = np.where(rng.random(rows) < 0.6, labels, rng.integers(0, classes, size=rows))
    noisy = 0.5 * rng.dirichlet(np.ones(classes) * 0.5, size=rows)
    noisy[np.arange(rows), guess] += 0.5
    return [accurate, noisy], labels.tolist()


def test_optimised_weights_beat_uniform_on_an_accurate_plus_noisy_pair():
    probs, labels = _constructed_case()
    weights = optimise_weights(probs, labels)
    assert all(w >= 0 for w in weights) and sum(weights) == pytest.approx(1.0)
    assert 0.8 < weights[0] < 0.95  # most of the weight goes to the accurate member, some to the noisy one
    uniform = combine(probs, [0.5, 0.5])
    fitted = combine(probs, weights)
    assert log_loss(fitted, labels) < log_loss(uniform, labels) - 0.03
    names = ["a", "b", "c"]
    assert classification_metrics(fitted, labels, names)["accuracy"] >= classification_metrics(uniform, labels, names)["accuracy"]
    assert optimise_weights(probs, labels) == weights  # deterministic
    # The optimum: no weight on a grid does better.
    grid = [log_loss(combine(probs, [w, 1 - w]), labels) for w in np.linspace(0, 1, 101)]
    assert log_loss(fitted, labels) <= min(grid) + 1e-6
    assert log_loss(fitted, labels) < log_loss(probs[0], labels)  # the mix beats the accurate member alone
    assert optimise_weights(probs[:1], labels) == [1.0]


def test_score_weights_and_mixing_as_data():
    assert normalise_weights([0.9, 0.6, 0.0]) == pytest.approx([0.6, 0.4, 0.0])
    assert normalise_weights([-1.0, 0.0]) == [0.5, 0.5]  # nothing positive: uniform
    mix = combine([np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])], [3, 1])
    np.testing.assert_allclose(mix, [[0.75, 0.25]])
    metrics = classification_metrics(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), [0, 1, 1], ["n", "p"])
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["per_class_f1"] == pytest.approx({"n": 2 * 1 * 0.5 / 1.5, "p": 2 * 1 * 0.5 / 1.5})
    assert metrics["loss"] == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.4)) / 3)
    with pytest.raises(ValueError, match="one weight per member"):
        combine([np.zeros((1, 2))], [0.5, 0.5])


# --- saved models and a job folder -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_tsv(tmp_path_factory) -> Path:
    rng = random.Random(0)
    lines = ["document\tlabel"]
    for i in range(48):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(GOOD if label == "pos" else BAD, 2) + rng.sample(GOOD + BAD, 1)
        lines.append(f"이 영화 {' '.join(words)} 정말\t{label}")
    path = tmp_path_factory.mktemp("data") / "reviews.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(data_tsv, tmp_path_factory):
    from transformers import AutoTokenizer

    from korch.data.tokenizer import train_wordpiece

    texts = [line.split("\t")[0] for line in data_tsv.read_text(encoding="utf-8").splitlines()[1:]]
    return AutoTokenizer.from_pretrained(train_wordpiece(texts, str(tmp_path_factory.mktemp("tok")), 200, 1))


def _save_model(tokenizer, folder: Path, seed: int, pooling: str = "cls", labels=("neg", "pos")) -> Path:
    import torch

    from korch.config import ModelConfig
    from korch.models.classifier import build_classifier, save_classifier

    torch.manual_seed(seed)
    model = build_classifier(ModelConfig(size="tiny"), num_labels=2, id2label=dict(enumerate(labels)), pooling=pooling,
                             vocab_size=len(tokenizer), seq_len=32, pad_token_id=tokenizer.pad_token_id)
    save_classifier(model, str(folder))
    tokenizer.model_max_length = 32
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def job_dir(tokenizer, tmp_path_factory) -> Path:
    """cls_a: final/ and best/; cls_b: final/ (mean pooling, labels in the other id order); cls_c: corrupt
    final/; cls_d: never ran; cls_e: other labels."""
    job = tmp_path_factory.mktemp("runs") / "job"
    _save_model(tokenizer, job / "cls_a" / "final", seed=1)
    _save_model(tokenizer, job / "cls_a" / "best", seed=2)
    _save_model(tokenizer, job / "cls_b" / "final", seed=3, pooling="mean", labels=("pos", "neg"))
    shutil.copytree(job / "cls_a" / "final", job / "cls_c" / "final")
    (job / "cls_c" / "final" / "model.safetensors").write_bytes(b"not a safetensors file")
    _save_model(tokenizer, job / "cls_e" / "best", seed=4, labels=("bad", "good"))
    return job


def _run_stage(job: Path, data_tsv: Path, name: str, **options) -> tuple[dict, Path]:
    from korch.config import StageConfig
    from korch.train.runner import StageContext

    needs = ["cls_a", "cls_b", "cls_c", "cls_d", "cls_e"]
    stage = StageConfig.model_validate({
        "name": name, "task": "ensemble", "needs": needs, "ensemble": options,
        "data": {"inputs": [str(data_tsv)], "validation_fraction": 0.25}, "train": {"seed": 7, "max_steps": 1}})
    ctx = StageContext(stage_dir=job / name, needs={n: job / n for n in needs})
    return run_ensemble_stage(stage, ctx), job / name


@pytest.fixture(scope="module")
def scored(job_dir, data_tsv):
    with pytest.MonkeyPatch.context() as mp:
        lines: list[str] = []
        mp.setattr("korch.tasks.ensemble._log", lambda message: lines.append(message))
        summary, stage_dir = _run_stage(job_dir, data_tsv, "ens")
    return summary, stage_dir, lines


def _validation_rows(data_tsv):
    from korch.config import DataConfig
    from korch.data.labelled import build_splits

    return build_splits(DataConfig(inputs=[str(data_tsv)], validation_fraction=0.25), seed=7).validation


def test_stage_skips_the_corrupt_and_missing_members_and_reweights(scored, job_dir, data_tsv):
    summary, stage_dir, warnings = scored
    skipped = [w for w in warnings if w.startswith("skipping member")]
    assert len(skipped) == 3 and "cls_c: " in skipped[0] and "cls_d: no swa/, best/, final/" in skipped[1]
    assert "cls_e: best: ValueError: its labels [bad, good] differ from the data's [neg, pos]" in skipped[2]
    weights = json.loads((stage_dir / "weights.json").read_text())
    assert [s["name"] for s in weights["skipped"]] == ["cls_c", "cls_d", "cls_e"]
    assert [m["name"] for m in weights["members"]] == ["cls_a", "cls_b"]
    assert sum(m["weight"] for m in weights["members"]) == pytest.approx(1.0)
    assert summary["skipped"] == ["cls_c", "cls_d", "cls_e"] and set(summary["weights"]) == {"cls_a", "cls_b"}
    # score weights: the members' validation accuracy, normalised
    accuracies = [m["validation"]["accuracy"] for m in weights["members"]]
    assert [m["weight"] for m in weights["members"]] == pytest.approx(normalise_weights(accuracies))
    # cls_a had two candidates and took the better (the first on a tie: swa, best, final order)
    cls_a = weights["members"][0]
    assert set(cls_a["candidates"]) == {"best", "final"}
    assert cls_a["validation"]["accuracy"] == max(c["accuracy"] for c in cls_a["candidates"].values())
    assert weights["members"][1]["candidate"] == "final"


def test_stage_outputs_match_a_hand_made_mix(scored, job_dir, data_tsv):
    summary, stage_dir, _ = scored
    rows = _validation_rows(data_tsv)
    weights = json.loads((stage_dir / "weights.json").read_text())["members"]
    texts = [r.text for r in rows]
    a = member_probs(weights[0]["path"], texts)[1]
    b = member_probs(weights[1]["path"], texts)[1][:, [1, 0]]  # cls_b names its labels pos, neg: mapped by name
    expected = combine([a, b], [m["weight"] for m in weights])
    predictions = [json.loads(line) for line in (stage_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows) == 12
    assert [p["label"] for p in predictions] == [["neg", "pos"][r.label] for r in rows]
    np.testing.assert_allclose([[p["probabilities"]["neg"], p["probabilities"]["pos"]] for p in predictions],
                               expected, atol=1e-6)
    report = json.loads((stage_dir / "eval.json").read_text())
    by_hand = classification_metrics(expected, [r.label for r in rows], ["neg", "pos"])
    assert report["ensemble"]["per_class_f1"] == pytest.approx(by_hand.pop("per_class_f1"))
    assert {k: report["ensemble"][k] for k in by_hand} == pytest.approx(by_hand)
    assert set(report["members"]) == {"cls_a", "cls_b"} and summary["accuracy"] == report["ensemble"]["accuracy"]
    assert report["best_single"]["accuracy"] == max(m["accuracy"] for m in report["members"].values())
    assert set(report["by_weighting"]) == {"uniform", "score", "optimize"}
    assert report["by_weighting"][report["weights"]]["accuracy"] == report["ensemble"]["accuracy"]
    spec = json.loads((stage_dir / "ensemble" / "ensemble.json").read_text())
    assert spec["format"] == "korch-ensemble" and spec["labels"] == ["neg", "pos"]
    assert [m["path"] for m in spec["members"]] == [f"../../cls_a/{weights[0]['candidate']}", "../../cls_b/final"]
    assert not [p for p in stage_dir.iterdir() if ".tmp-" in p.name]


def test_optimize_weights_in_the_stage_and_no_usable_member_is_a_user_error(job_dir, data_tsv, capsys):
    summary, stage_dir = _run_stage(job_dir, data_tsv, "ens_opt", weights="optimize", candidates=["final"])
    weights = json.loads((stage_dir / "weights.json").read_text())["members"]
    assert sum(m["weight"] for m in weights) == pytest.approx(1.0) and all(m["weight"] >= 0 for m in weights)
    assert {m["candidate"] for m in weights} == {"final"}
    assert json.loads((stage_dir / "eval.json").read_text())["optimistic"] is True
    with pytest.raises(UserError, match="no ensemble member could be used"):
        _run_stage(job_dir, data_tsv, "ens_none", candidates=["swa"])
    assert "skipping member cls_a" in capsys.readouterr().err


# --- the ensemble folder: loading, verification, and korch predict ----------------------------------------------

def test_ensemble_json_round_trip_skips_a_tampered_member(scored, job_dir, tmp_path, capsys):
    _, stage_dir, _ = scored
    labels, members = load_ensemble(stage_dir / "ensemble")
    weights = json.loads((stage_dir / "weights.json").read_text())["members"]
    assert labels == ["neg", "pos"]
    assert [(m.name, m.path, m.weight) for m in members] == [(w["name"], w["path"], pytest.approx(w["weight"]))
                                                            for w in weights]
    assert members[1].order == [1, 0] and members[0].max_length == 32

    # Copies of the members, one tampered with after the folder was written.
    for name in ("x", "y", "z"):
        shutil.copytree(job_dir / "cls_a" / "final", tmp_path / name)
    write_ensemble_folder(tmp_path / "ens", ["neg", "pos"], [
        {"name": "x", "path": tmp_path / "x", "weight": 0.5}, {"name": "y", "path": tmp_path / "y", "weight": 0.3},
        {"name": "z", "path": tmp_path / "z", "weight": 0.2}])
    assert json.loads((tmp_path / "ens" / "ensemble.json").read_text())["members"][0]["sha256"] == \
        sha256_of(tmp_path / "x" / "model.safetensors")
    with open(tmp_path / "y" / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    shutil.rmtree(tmp_path / "z")
    labels, members = load_ensemble(tmp_path / "ens")
    err = capsys.readouterr().err
    assert "skipping member y" in err and "sha256 differs" in err and "skipping member z: no folder" in err
    assert [(m.name, m.weight) for m in members] == [("x", 1.0)]
    shutil.rmtree(tmp_path / "x")
    with pytest.raises(UserError, match="none of its 3 member"):
        load_ensemble(tmp_path / "ens")


def test_predict_with_an_ensemble_folder_mixes_members_like_the_stage(scored, data_tsv, tmp_path, monkeypatch):
    import korch.predict as predict_module

    _, stage_dir, _ = scored

    def in_process_run(model_dir, max_length, texts, pairs, workers, batch_size, probs, progress):
        probs[:] = member_probs(model_dir, texts, pairs, batch_size)[1]

    monkeypatch.setattr(predict_module, "_local_ray", lambda workers: contextlib.nullcontext())
    monkeypatch.setattr(predict_module, "_run", in_process_run)
    out = tmp_path / "pred.jsonl"
    assert predict_module.main_args(["--model", str(stage_dir / "ensemble"), "--input", str(data_tsv),
                                     "--output", str(out)]) == 0
    texts = [line.split("\t")[0] for line in data_tsv.read_text(encoding="utf-8").splitlines()[1:]]
    weights = json.loads((stage_dir / "weights.json").read_text())["members"]
    expected = combine([member_probs(weights[0]["path"], texts)[1], member_probs(weights[1]["path"], texts)[1][:, [1, 0]]],
                       [m["weight"] for m in weights])
    predictions = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [p["id"] for p in predictions] == list(range(len(texts)))
    np.testing.assert_allclose([[p["probabilities"]["neg"], p["probabilities"]["pos"]] for p in predictions],
                               expected, atol=1e-9)
    assert [p["label"] for p in predictions] == [["neg", "pos"][i] for i in expected.argmax(1)]
