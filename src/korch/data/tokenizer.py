"""Train a BERT-style WordPiece tokenizer with `tokenizers` and save it as a Hugging Face fast tokenizer folder."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _morpheme_texts(texts: Iterable[str]) -> Iterator[str]:
    """Texts with Kiwi morphemes separated by spaces, so WordPiece learns pieces that respect morphemes."""
    from kiwipiepy import Kiwi

    kiwi = Kiwi(num_workers=1)
    for text in texts:
        yield " ".join(token.form for token in kiwi.tokenize(text))


def train_wordpiece(texts: Iterable[str], out_dir: str, vocab_size: int, min_frequency: int,
                    pre_tokenize: str = "whitespace") -> str:
    """Train on `texts` (streamed) and save into `out_dir`; returns `out_dir`, loadable with AutoTokenizer.

    Normalisation is NFC without lowercasing or accent stripping: BERT's default `strip_accents` decomposes
    Hangul syllables into jamo. `pre_tokenize="morphemes"` only changes what the vocabulary is learned from;
    at encode time the saved tokenizer splits on whitespace and punctuation like the `whitespace` one.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if pre_tokenize not in ("whitespace", "morphemes"):
        raise ValueError(f"pre_tokenize must be 'whitespace' or 'morphemes', not {pre_tokenize!r}")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, continuing_subword_prefix="##")
    stream = _morpheme_texts(texts) if pre_tokenize == "morphemes" else texts
    tokenizer.train_from_iterator(stream, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=1_000_000)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir
