"""Train a BERT-style WordPiece tokenizer deterministically and save it as a Hugging Face fast tokenizer folder.

Why not `tokenizers.trainers.WordPieceTrainer`: its vocabulary changes from run to run on the same text
(huggingface/tokenizers#1794, fix not released as of tokenizers 0.23). The trainer counts words in a hash map
with a per-process random seed, gives the `##` continuation pieces ids in that map's iteration order, and breaks
ties between equally frequent pairs by those ids (and by the heap layout that map's order leaves): on the
quickstart corpus 3,096 of 8,000 ids moved between two runs and a few pieces differed, so every packed shard,
loss and weight after it differed too.

`learn_wordpiece_vocab` runs the same algorithm (BPE-style merges with a `##` continuation prefix, what
WordPieceTrainer does) in Python with a total order: pairs by count, ties by the two pieces' text. Words
are counted with the tokenizer's own normaliser and pre-tokeniser, so what is learned matches what is encoded.
The result is an ordinary `tokenizers` WordPiece model; tokenization does not use merges, only the vocabulary.
"""

from __future__ import annotations

import collections
import heapq
import os
from typing import Iterable, Iterator

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PREFIX = "##"


def load_tokenizer_json(folder: str):
    """`folder/tokenizer.json` as a `tokenizers.Tokenizer`; a `UserError` saying why when it cannot be loaded
    (missing, cut short, not a tokenizer), instead of the bare `Exception` that `tokenizers` raises."""
    from tokenizers import Tokenizer

    from korch.errors import UserError

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for bad JSON or a bad model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable tokenizer ({first})") from None


def tokenizer_problem(folder: str) -> str | None:
    """Why `folder`'s tokenizer.json cannot be loaded, or None if it loads."""
    from korch.errors import UserError

    try:
        load_tokenizer_json(folder)
    except UserError as exc:
        return str(exc)
    return None


def _morpheme_texts(texts: Iterable[str]) -> Iterator[str]:
    """Texts with Kiwi morphemes separated by spaces, so WordPiece learns pieces that respect morphemes."""
    from kiwipiepy import Kiwi

    kiwi = Kiwi(num_workers=1)
    for text in texts:
        yield " ".join(token.form for token in kiwi.tokenize(text))


def count_words(texts: Iterable[str], tokenizer) -> collections.Counter:
    """Word counts after `tokenizer`'s normaliser and pre-tokeniser (what `train_from_iterator` would count).

    Whitespace-separated chunks are counted first and each distinct chunk is pre-tokenised once: the same
    counts as pre-tokenising every text (BERT's pre-tokeniser splits on whitespace, then around punctuation),
    at a fraction of the cost. A chunk of letters and digits only has no punctuation to split off.
    """
    normalizer, pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
    chunks: collections.Counter = collections.Counter()
    for text in texts:
        chunks.update((normalizer.normalize_str(text) if normalizer is not None else text).split())
    counts: collections.Counter = collections.Counter()
    for chunk, n in chunks.items():
        if chunk.isalnum():
            counts[chunk] += n
        else:
            for word, _ in pre_tokenizer.pre_tokenize_str(chunk):
                counts[word] += n
    return counts


def learn_wordpiece_vocab(word_counts: dict[str, int], vocab_size: int, min_frequency: int,
                          special_tokens: list[str] = SPECIAL_TOKENS, prefix: str = PREFIX) -> list[str]:
    """The WordPiece vocabulary (index = id) that BPE-style merges learn from `word_counts`; a pure function.

    Order: special tokens, every character (by code point), `prefix + character` for characters seen inside a
    word (by code point), then merged pieces in the order learned. Each step merges the most frequent adjacent
    pair, ties broken by the pieces' text, until `vocab_size` pieces or no pair seen `min_frequency` times.
    Nothing depends on hash or dict iteration order, so the same counts give the same list in every process.
    """
    vocab: list[str] = []
    ids: dict[str, int] = {}

    def add(piece: str) -> int:
        if piece not in ids:
            ids[piece] = len(vocab)
            vocab.append(piece)
        return ids[piece]

    for token in special_tokens:
        add(token)
    items = sorted(word_counts.items())  # input order does not matter either
    for char in sorted({c for word, _ in items for c in word}):
        add(char)
    for char in sorted({c for word, _ in items for c in word[1:]}):
        add(prefix + char)

    # Single characters have no pairs to merge; they only shaped the alphabet above.
    multi = [(word, count) for word, count in items if len(word) > 1]
    cont = {c: ids[prefix + c] for c in {c for word, _ in multi for c in word[1:]}}
    words = [[ids[word[0]], *map(cont.__getitem__, word[1:])] for word, _ in multi]
    counts = [count for _, count in multi]
    pair_counts: dict[tuple[int, int], int] = {}
    pair_words: dict[tuple[int, int], list[int]] = {}  # may repeat or hold words that lost the pair: checked on use
    for index, word in enumerate(words):
        n = counts[index]
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + n
            pair_words.setdefault(pair, []).append(index)

    def entry(pair: tuple[int, int]) -> tuple:
        # heapq pops the smallest: most frequent first, then by text, so equal counts never tie on ids.
        return (-pair_counts[pair], vocab[pair[0]], vocab[pair[1]], pair)

    # A pair's count only rises when a merge creates it (it then gets an entry), so rarer pairs never qualify.
    heap = [entry(pair) for pair, count in pair_counts.items() if count >= min_frequency]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg_count, _, _, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:  # stale entry: the pair's count went down since it was pushed
            if count >= min_frequency:
                heapq.heappush(heap, entry(pair))
            continue
        if count < min_frequency:
            break
        right = vocab[pair[1]]
        new_id = add(vocab[pair[0]] + (right[len(prefix):] if right.startswith(prefix) else right))
        grown: set[tuple[int, int]] = set()
        for index in sorted(set(pair_words.pop(pair))):
            old = words[index]
            new = _merge(old, pair, new_id)
            if len(new) == len(old):  # this word lost the pair to an earlier merge
                continue
            n = counts[index]
            for p in zip(old, old[1:]):
                pair_counts[p] -= n
            for p in zip(new, new[1:]):
                pair_counts[p] = pair_counts.get(p, 0) + n
                if new_id in p:
                    pair_words.setdefault(p, []).append(index)
                    grown.add(p)
            words[index] = new
        del pair_counts[pair]
        for p in sorted(grown):  # counts that rose need a fresh entry; lowered ones are re-pushed lazily
            if pair_counts[p] >= min_frequency:
                heapq.heappush(heap, entry(p))
    return vocab


def _merge(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """`word` with every non-overlapping occurrence of `pair` (left to right) replaced by `new_id`."""
    out, i, last = [], 0, len(word) - 1
    while i <= last:
        if i < last and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_wordpiece(texts: Iterable[str], out_dir: str, vocab_size: int, min_frequency: int,
                    pre_tokenize: str = "whitespace") -> str:
    """Train on `texts` (streamed) and save into `out_dir`; returns `out_dir`, loadable with AutoTokenizer.

    Deterministic: the same texts give a byte-identical tokenizer.json in any process (see the module docstring).
    Normalisation is NFC without lowercasing or accent stripping: BERT's default `strip_accents` decomposes
    Hangul syllables into jamo. `pre_tokenize="morphemes"` only changes what the vocabulary is learned from;
    at encode time the saved tokenizer splits on whitespace and punctuation like the `whitespace` one.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if pre_tokenize not in ("whitespace", "morphemes"):
        raise ValueError(f"pre_tokenize must be 'whitespace' or 'morphemes', not {pre_tokenize!r}")
    counter = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    counter.normalizer = normalizers.NFC()
    counter.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    stream = _morpheme_texts(texts) if pre_tokenize == "morphemes" else texts
    counts = count_words(stream, counter)
    if not counts:  # special tokens alone would map every later text to [UNK]; never save such a tokenizer
        from korch.errors import NoTextError

        raise NoTextError(f"no text to learn a WordPiece vocabulary from for {out_dir}; check the inputs")
    vocab = learn_wordpiece_vocab(counts, vocab_size, min_frequency)

    tokenizer = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token="[UNK]",
                                           continuing_subword_prefix=PREFIX))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=PREFIX)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)  # as the trainer did: matched whole, never split
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=1_000_000,
                                   # BERT-style inputs: sentence-pair tasks need the segment ids the template sets.
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir
