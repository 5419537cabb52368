"""The four pretraining objectives train in-process (no Ray) on real kowiki blocks: their losses fall. Plus the
coref pieces as data: mentions, repeated-mention selection, masking and Real@k scoring, and epoch selection."""

from __future__ import annotations

import collections

import pytest
import torch

import pretrain_data as data
from korch.config import EvalConfig, ModelConfig


def _task(name: str, **options):
    from korch.tasks import TASKS

    cls = TASKS[name].load_trainer()
    return cls(cls.Options(**options), ModelConfig(size="tiny"), data.tokenizer(), 64, {})


def _falls(losses: list[float]) -> bool:
    """One micro batch of tiny blocks masks a few dozen tokens, so single losses are noisy: compare tens."""
    return sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3


@pytest.mark.parametrize("name,options,morphemes,lr", [
    ("mlm", {"whole_word": "morpheme"}, True, 3e-2),
    ("nsp_mlm", {}, True, 1e-2),
    ("span_mlm", {"boundary_objective": True}, False, 3e-2),
    ("coref_mlm", {"noise_probability": 0.1}, None, 3e-2),
], ids=["mlm-whole-morpheme", "nsp_mlm", "span_mlm-sbo", "coref_mlm"])
def test_each_objective_trains_and_its_loss_falls(name, options, morphemes, lr):
    blocks = list(data.coref_blocks() if morphemes is None else data.blocks(morphemes))
    if name == "nsp_mlm":  # the loop's rows come shuffled, so a micro batch mixes documents
        blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))]
    task = _task(name, **options)
    losses = data.train_losses(task, blocks, steps=50, lr=lr)
    assert _falls(losses), [round(x, 2) for x in losses]


def test_span_mlm_with_sbo_exports_a_plain_masked_lm_and_its_head(tmp_path):
    from transformers import AutoModelForMaskedLM

    from korch.tasks.span_mlm import SBO_FILE

    task = _task("span_mlm", boundary_objective=True)
    model = task.build_model(None)
    task.save(model, str(tmp_path))
    assert (tmp_path / SBO_FILE).exists()
    AutoModelForMaskedLM.from_pretrained(tmp_path)
    again = task.build_model(str(tmp_path))
    assert torch.equal(again.sbo["offset"].weight, model.sbo["offset"].weight)


Token = collections.namedtuple("Token", "form tag start len")


def test_mentions_are_proper_nouns_and_their_compounds():
    from korch.data.coref import find_mentions, repeated_mentions, token_span

    # 버락 오바마는 서울특별시에 갔다: NNP NNP (one space) and NNP+NNG (attached) are single mentions.
    tokens = [Token("버락", "NNP", 0, 2), Token("오바마", "NNP", 3, 3), Token("는", "JX", 6, 1),
              Token("서울", "NNP", 8, 2), Token("특별시", "NNG", 10, 3), Token("에", "JKB", 13, 1),
              Token("가", "VV", 15, 1)]
    assert find_mentions(tokens) == [(0, 6), (8, 13)]
    assert token_span([(0, 2), (3, 6), (6, 7)], 3, 7) == (1, 3)
    ids = [2, 10, 11, 5, 10, 11, 6, 10, 11, 7, 3]
    assert repeated_mentions(ids, [(1, 3), (4, 6), (7, 9), (3, 4)]) == ([1, 4, 7], [3, 6, 9], [False, True, True])


def test_later_mentions_are_masked_whole_and_scored_all_or_nothing():
    from korch.tasks.coref_mlm import mask_mentions, mention_hits

    ids = torch.tensor([[2, 10, 11, 5, 10, 11, 3]])
    inputs, labels, index = mask_mentions(ids, [[1, 4]], [[3, 6]], [[False, True]], mask_id=4)
    assert inputs.tolist() == [[2, 10, 11, 5, 4, 4, 3]]
    assert labels.tolist() == [[-100] * 4 + [10, 11, -100]]
    assert index.tolist() == [[-1, -1, -1, -1, 0, 0, -1]]
    logits = torch.zeros(1, 7, 20)
    logits[0, 4, 10] = 5  # first token right at rank 1
    logits[0, 5, 12], logits[0, 5, 11] = 5, 4  # second token's gold only second: real1 misses, real5 hits
    hits = mention_hits(logits, labels, index)
    assert (float(hits["mentions"]), float(hits["hit1"]), float(hits["hitk"])) == (1.0, 0.0, 1.0)
    logits[0, 5, 11] = 6
    assert float(mention_hits(logits, labels, index)["hit1"]) == 1.0


def test_selection_by_real1_picks_the_best_epoch_and_records_every_score():
    from korch.tasks.coref_mlm import CorefMlmTask
    from korch.train.loop import _Selection

    selection = _Selection(EvalConfig(every="epoch", select_best="real1"), CorefMlmTask, {})
    scores = [0.21, 0.35, 0.30, 0.41, 0.39]
    best = [selection.offer({"real1": s, "real5": s + 0.1}, step=10 * (i + 1), epoch=i + 1) for i, s in enumerate(scores)]
    assert best == [True, True, False, True, False]
    described = selection.describe()
    assert described["best_epoch"] == 4 and described["best_checkpoint"] == "checkpoint-40"
    assert [h["real1"] for h in selection.history] == scores and [h["epoch"] for h in selection.history] == [1, 2, 3, 4, 5]
    resumed = _Selection(EvalConfig(every="epoch", select_best="real1"), CorefMlmTask, selection.state())
    assert resumed.history == selection.history and resumed.describe() == described


def test_a_later_stage_starts_from_best_or_a_checkpoint_of_the_stage_it_needs(tmp_path):
    from pydantic import ValidationError

    from korch.config import JobConfig
    from korch.train.job import _stage_context

    stage = {"task": "coref_mlm", "data": {"inputs": [str(data.KOWIKI)]}, "train": {"max_steps": 1}}
    for folder in ("best", "checkpoint-40"):
        (tmp_path / "mlm" / folder).mkdir(parents=True)
        (tmp_path / "mlm" / folder / "config.json").write_text("{}")
    for start in ("best", "checkpoint-40"):
        job = JobConfig.model_validate({"name": "j", "stages": [{"name": "mlm", **stage},
                                                                {"name": "ft", "needs": "mlm", "start_from": start, **stage}]})
        assert _stage_context(job, tmp_path, job.stages[1], False, None).start_from == str(tmp_path / "mlm" / start)
    with pytest.raises(ValidationError, match="start_from best picks a model of the stage named in `needs`"):
        JobConfig.model_validate({"name": "j", "stages": [{"name": "mlm", "start_from": "best", **stage}]})
    with pytest.raises(ValidationError, match="start_from"):
        JobConfig.model_validate({"name": "j", "stages": [{"name": "mlm", **stage},
                                                          {"name": "ft", "needs": "mlm", "start_from": "last", **stage}]})
