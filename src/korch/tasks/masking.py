"""Masking for the pretraining tasks, as pure functions of (rows, generator): whole words, SpanBERT spans, noise.

A block is `[CLS] tokens... [SEP]` (`korch.data.packing`); its `word_starts` say where words begin. What a word
is depends on how the corpus was prepared: with `data.morphemes: true` a word is a Kiwi morpheme (a token that
begins at a morpheme's first character starts one), otherwise it is a whitespace word with punctuation split
off, as BERT's pre-tokenizer splits (an eojeol; a token that is not a `##` continuation starts one). Every
function draws only from the `torch.Generator` it is given, so a resumed run masks exactly as before.

The budget of a sequence is `floor(p * n + u)` tokens for its `n` content tokens and `u ~ U(0, 1)`: exactly
`p * n` in expectation, so the corpus-wide mask rate is `p` however short the blocks are. Whole words are added
while they fit, so the realised rate sits a little under the budget when words are long.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

GEOMETRIC_P = 0.2
MAX_SPAN_WORDS = 10


def word_spans(word_starts: Sequence[int], length: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of the words of a block of `length` tokens; [CLS] and [SEP] belong to none.
    A block that begins inside a word (a packed continuation) treats its first tokens as a word of their own."""
    starts = sorted({s for s in word_starts if 1 <= s < length - 1})
    if length <= 2:
        return []
    if not starts or starts[0] != 1:
        starts = [1] + starts
    return list(zip(starts, starts[1:] + [length - 1]))


def _budget(n_tokens: int, probability: float, generator: "torch.Generator") -> int:
    import torch

    return int(math.floor(probability * n_tokens + float(torch.rand((), generator=generator))))


def whole_word_positions(spans: list[tuple[int, int]], probability: float, generator: "torch.Generator") -> list[int]:
    """Token positions of whole words chosen in random order while they fit in the sequence's budget."""
    import torch

    n_tokens = sum(e - s for s, e in spans)
    budget = _budget(n_tokens, probability, generator)
    chosen: list[int] = []
    for index in torch.randperm(len(spans), generator=generator).tolist():
        if len(chosen) >= budget:
            break
        start, end = spans[index]
        if len(chosen) + end - start <= budget:
            chosen.extend(range(start, end))
    return sorted(chosen)


def sample_span_lengths(count: int, generator: "torch.Generator", p: float = GEOMETRIC_P,
                        max_len: int = MAX_SPAN_WORDS) -> list[int]:
    """SpanBERT's span lengths in words: Geometric(p) on 1..max_len, renormalised (mean 3.8 for p=0.2, max 10)."""
    import torch

    lengths = torch.arange(1, max_len + 1, dtype=torch.double)
    weights = p * (1 - p) ** (lengths - 1)
    return (torch.multinomial(weights, count, replacement=True, generator=generator) + 1).tolist()


def span_positions(spans: list[tuple[int, int]], probability: float, generator: "torch.Generator",
                   max_attempts: int = 64) -> list[tuple[int, int]]:
    """SpanBERT masking: [start, end) token ranges of spans of whole words until the budget is met.

    A span's length in words is drawn from `sample_span_lengths`, its first word uniformly; a span that overlaps
    one already chosen is drawn again, one that would overshoot the budget loses words from its end. The draws
    for all attempts are made up front (two generator calls per sequence, not two per span)."""
    import torch

    if not spans:
        return []
    n_tokens = sum(e - s for s, e in spans)
    budget = _budget(n_tokens, probability, generator)
    lengths = sample_span_lengths(max_attempts, generator)
    firsts = (torch.rand(max_attempts, generator=generator) * len(spans)).long().tolist()
    taken = [False] * len(spans)
    chosen: list[tuple[int, int]] = []
    masked = 0
    for words, first in zip(lengths, firsts):
        if masked >= budget:
            break
        last = min(first + words, len(spans))
        if any(taken[first:last]):
            continue
        while last > first and spans[last - 1][1] - spans[first][0] > budget - masked:
            last -= 1
        if last == first:
            continue
        for w in range(first, last):
            taken[w] = True
        chosen.append((spans[first][0], spans[last - 1][1]))
        masked += spans[last - 1][1] - spans[first][0]
    return sorted(chosen)


def replace_80_10_10(input_ids: "torch.Tensor", groups: list[list[int]], mask_id: int, vocab_size: int,
                     generator: "torch.Generator") -> "torch.Tensor":
    """One row's inputs with each group of positions (a word or a span, decided once per group as BERT and
    SpanBERT do) replaced: 80% by [MASK], 10% by random tokens, 10% left as they are."""
    import torch

    out = input_ids.clone()
    if not groups:
        return out
    rolls = torch.rand(len(groups), generator=generator).tolist()
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    to_mask = [p for group, roll in zip(groups, rolls) if roll < 0.8 for p in group]
    to_swap = [p for group, roll in zip(groups, rolls) if 0.8 <= roll < 0.9 for p in group]
    if to_mask:
        out[torch.as_tensor(to_mask)] = mask_id
    if to_swap:
        index = torch.as_tensor(to_swap)
        out[index] = random_tokens[index]
    return out


def mask_whole_words(input_ids: "torch.Tensor", lengths: Sequence[int], word_starts: Sequence[Sequence[int]],
                     mask_id: int, vocab_size: int, probability: float,
                     generator: "torch.Generator") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(masked inputs, labels) for padded rows: whole words masked, labels -100 outside them."""
    import torch

    masked, labels = input_ids.clone(), torch.full_like(input_ids, -100)
    for row, (length, starts) in enumerate(zip(lengths, word_starts)):
        spans = word_spans(starts, length)
        positions = whole_word_positions(spans, probability, generator)
        picked = set(positions)
        by_word = [list(range(s, e)) for s, e in spans if s in picked]
        if positions:
            index = torch.as_tensor(positions, dtype=torch.long)
            labels[row, index] = input_ids[row, index]
        masked[row] = replace_80_10_10(input_ids[row], by_word, mask_id, vocab_size, generator)
    return masked, labels


def mask_spans(input_ids: "torch.Tensor", lengths: Sequence[int], word_starts: Sequence[Sequence[int]], mask_id: int,
               vocab_size: int, probability: float, generator: "torch.Generator"
               ) -> tuple["torch.Tensor", "torch.Tensor", dict[str, "torch.Tensor"]]:
    """(masked inputs, labels, span-boundary tensors) for padded rows, SpanBERT style.

    The boundary tensors give, for each masked token, the positions of the tokens just outside its span
    (`sbo_left`, `sbo_right`) and its offset inside the span (`sbo_offset`); 0 elsewhere."""
    import torch

    masked, labels = input_ids.clone(), torch.full_like(input_ids, -100)
    boundary = {k: torch.zeros_like(input_ids) for k in ("sbo_left", "sbo_right", "sbo_offset")}
    for row, (length, starts) in enumerate(zip(lengths, word_starts)):
        chosen = span_positions(word_spans(starts, length), probability, generator)
        for start, end in chosen:
            labels[row, start:end] = input_ids[row, start:end]
            boundary["sbo_left"][row, start:end] = start - 1
            boundary["sbo_right"][row, start:end] = end
            boundary["sbo_offset"][row, start:end] = torch.arange(end - start)
        masked[row] = replace_80_10_10(input_ids[row], [list(range(s, e)) for s, e in chosen], mask_id, vocab_size,
                                       generator)
    return masked, labels, boundary
