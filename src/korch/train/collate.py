"""Batch collation for masked-LM: pad ragged packed blocks and apply BERT's 80/10/10 masking.

Masking draws from a generator seeded by (seed, epoch, micro-batch index, rank), not from global RNG, so a
resumed run masks exactly as the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Sequence

import torch


def masking_generator(seed: int, epoch: int, micro_index: int, rank: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch * 10_007 + micro_index * 101 + rank) % (2**63 - 1))
    return generator


def pad_blocks(blocks: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.full((len(blocks), seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(blocks), seq_len), dtype=torch.long)
    for row, block in enumerate(blocks):
        block = list(block)[:seq_len]
        input_ids[row, : len(block)] = torch.as_tensor(block, dtype=torch.long)
        attention_mask[row, : len(block)] = 1
    return input_ids, attention_mask


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int], mask_id: int,
                vocab_size: int, probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (masked inputs, labels); labels are -100 except at the chosen positions."""
    labels = input_ids.clone()
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=torch.long))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    labels[~chosen] = -100
    masked = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    masked[chosen & (roll < 0.8)] = mask_id
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_tokens[swap]
    return masked, labels
