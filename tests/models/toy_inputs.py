"""A toy vocabulary and batch shared by the classifier tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "영화", "정말", "재밌다", "별로", "최고", "지루", "##했다", "배우"]


def toy_batch():
    """Row 0 is 7 real tokens; row 1 is 4 real tokens and 3 pads."""
    torch.manual_seed(1)
    ids = torch.randint(5, len(VOCAB), (2, 7))
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 0, 0
    return ids, mask


def logits_of(net, ids, mask):
    with torch.no_grad():
        return net(input_ids=ids, attention_mask=mask).logits
