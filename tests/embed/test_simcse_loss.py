"""The simcse loss as data: the rank offset of in-batch labels (sentence-transformers PR #3453), parity of two
ranks with one process holding the whole batch, hard-negative masking, and a real 2-process gloo gather whose
gradients match the single-process ones."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from korch.tasks.simcse import contrastive_loss, in_batch_labels, nli_triples

B, D, T = 3, 8, 0.05


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * B, D, generator=g) for _ in range(3)]  # anchors, positives, negatives of 2 ranks


def test_rank_k_anchors_point_at_their_own_positives():
    assert in_batch_labels(B, 0).tolist() == [0, 1, 2]
    assert in_batch_labels(B, 1).tolist() == [3, 4, 5]
    anchors, _, _ = _batch()
    positives = anchors.clone()  # each anchor's positive is itself: the right label is the most similar column
    for rank in range(2):
        local = anchors[rank * B:(rank + 1) * B]
        logits = F.normalize(local) @ F.normalize(positives).T
        assert logits.argmax(-1).tolist() == in_batch_labels(B, rank).tolist()


def test_two_ranks_average_to_the_whole_batch_loss_and_unshifted_labels_do_not():
    anchors, positives, negatives = _batch()
    valid = torch.tensor([1, 0, 1, 1, 1, 0])
    whole = contrastive_loss(anchors, positives, negatives, valid, T, rank=0)
    per_rank = [contrastive_loss(anchors[r * B:(r + 1) * B], positives, negatives, valid, T, rank=r) for r in range(2)]
    assert (per_rank[0] + per_rank[1]) / 2 == pytest.approx(float(whole), rel=1e-5)
    # The PR #3453 bug: rank 1 labelled 0..B-1 scores rank 0's positives as its own.
    logits = F.normalize(anchors[B:]) @ F.normalize(torch.cat([positives, negatives])).T / T
    buggy = F.cross_entropy(logits.masked_fill(~torch.cat([torch.ones(2 * B, dtype=torch.bool), valid.bool()]),
                                               float("-inf")), torch.arange(B))
    assert float(buggy) != pytest.approx(float(per_rank[1]), rel=1e-3)


def test_missing_hard_negatives_are_masked_out():
    anchors, positives, negatives = _batch()
    none_valid = contrastive_loss(anchors, positives, negatives, torch.zeros(2 * B), T, rank=0)
    assert float(none_valid) == pytest.approx(float(contrastive_loss(anchors, positives, None, None, T, 0)), rel=1e-6)


def test_nli_triples_pair_entailments_with_contradictions_of_the_same_premise():
    rows = nli_triples(["p", "p", "p", "q", "q"], ["e1", "c1", "n1", "e2", "n2"],
                       ["entailment", "contradiction", "neutral", "entailment", "neutral"])
    assert rows == [("p", "e1", "c1"), ("q", "e2", "")]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from korch.tasks.simcse import gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = torch.nn.Linear(D, D)
    anchors_in, positives_in, _ = _batch()
    local = slice(rank * B, (rank + 1) * B)
    anchors, positives = net(anchors_in[local]), net(positives_in[local])
    loss = contrastive_loss(anchors, gather_with_grad(positives), None, None, T, rank)
    loss.backward()
    grad = net.weight.grad.clone()
    dist.all_reduce(grad)  # what DeepSpeed does with each rank's gradients: average them
    torch.save({"loss": float(loss), "grad": grad / 2}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_positives_carry_gradients_across_two_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a fork after torch has started its thread pools can deadlock in the child.
    torch.multiprocessing.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(D, D)
    anchors_in, positives_in, _ = _batch()
    whole = contrastive_loss(net(anchors_in), net(positives_in), None, None, T, 0)
    whole.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(float(whole), rel=1e-5)
    # Without gradients through the gather, rank r's loss would not reach the other rank's positives.
    torch.testing.assert_close(ranks[0]["grad"], net.weight.grad, rtol=1e-4, atol=1e-6)


def test_cosent_rewards_cosines_ordered_like_the_gold_scores():
    from korch.tasks.simcse import cosent_loss

    scores = torch.tensor([5.0, 3.0, 0.0])
    ordered = cosent_loss(torch.tensor([0.9, 0.5, 0.1]), scores, 20.0)
    reversed_ = cosent_loss(torch.tensor([0.1, 0.5, 0.9]), scores, 20.0)
    assert float(ordered) < 0.01 < 10 < float(reversed_)
    # log(1 + 3 * exp(20 * 0.8))-ish for fully reversed; exactly log(1) when nothing is ordered (all ties)
    assert float(cosent_loss(torch.tensor([0.3, 0.2]), torch.tensor([1.0, 1.0]), 20.0)) == 0.0
