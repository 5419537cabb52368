"""Masked-LM evaluation on the held-out split: masked-token loss, perplexity and accuracy, summed over ranks."""

from __future__ import annotations

import math
from typing import Sequence

# Evaluation masks with its own fixed seed, so every evaluation of every run scores the same positions.
EVAL_MASK_SEED = 12345


def evaluate_mlm(engine, shard, tokenizer, special_ids: Sequence[int], rank: int, device, *, seq_len: int,
                 micro_batch_size: int, max_batches: int, mlm_probability: float) -> dict:
    """Collective under torch.distributed: every rank must call it (ZeRO-3 forwards gather parameters)."""
    import torch
    import torch.distributed as dist

    from korch.data.stream import iter_worker_batches
    from korch.train.collate import mask_tokens, masking_generator, pad_blocks

    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, masked tokens
    with torch.no_grad():
        for index, batch in enumerate(iter_worker_batches(shard, micro_batch_size)):
            if index >= max_batches:
                break
            input_ids, attention_mask = pad_blocks(batch["input_ids"], seq_len, tokenizer.pad_token_id)
            inputs, labels = mask_tokens(input_ids, attention_mask, special_ids, tokenizer.mask_token_id, len(tokenizer),
                                         mlm_probability, masking_generator(EVAL_MASK_SEED, 0, index, rank))
            logits = engine(input_ids=inputs.to(device), attention_mask=attention_mask.to(device)).logits.float().cpu()
            chosen = labels != -100
            totals[0] += torch.nn.functional.cross_entropy(logits[chosen], labels[chosen], reduction="sum").item()
            totals[1] += (logits[chosen].argmax(-1) == labels[chosen]).sum().item()
            totals[2] += chosen.sum().item()
    if dist.is_initialized():
        dist.all_reduce(totals)
    engine.train()
    count = max(totals[2].item(), 1.0)
    loss = totals[0].item() / count
    return {"mlm_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "mlm_accuracy": totals[1].item() / count,
            "masked_tokens": int(totals[2].item())}
