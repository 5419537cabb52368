"""WordPiece training is deterministic: the same texts give the same vocabulary and a byte-identical tokenizer.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from korch.data.tokenizer import SPECIAL_TOKENS, learn_wordpiece_vocab

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SPECIALS = len(SPECIAL_TOKENS)


def test_vocab_breaks_count_ties_by_text_whatever_the_input_order():
    counts = {"cd": 4, "ab": 3, "abcd": 1, "ef": 2}
    vocab = learn_wordpiece_vocab(counts, vocab_size=100, min_frequency=1)
    assert vocab[:SPECIALS] == SPECIAL_TOKENS
    chars = vocab[SPECIALS:SPECIALS + 6]
    assert chars == ["a", "b", "c", "d", "e", "f"]
    assert vocab[SPECIALS + 6:SPECIALS + 10] == ["##b", "##c", "##d", "##f"]
    # "ab" and "cd" both occur 4 times: the tie goes to the smaller text, not to an id or hash order
    assert vocab[SPECIALS + 10:SPECIALS + 12] == ["ab", "cd"]
    assert "abcd" in vocab and "ef" in vocab
    assert learn_wordpiece_vocab(dict(reversed(list(counts.items()))), 100, 1) == vocab


def test_vocab_stops_at_size_and_min_frequency():
    counts = {"ab": 5, "cd": 1}
    assert learn_wordpiece_vocab(counts, vocab_size=100, min_frequency=2)[-1] == "ab"  # "cd" is too rare
    assert len(learn_wordpiece_vocab(counts, vocab_size=SPECIALS + 6, min_frequency=1)) == SPECIALS + 6


_TRAIN = """
import itertools, sys
from korch.config import DataConfig
from korch.data.readers import iter_documents
from korch.data.tokenizer import train_wordpiece
cfg = DataConfig(inputs=[sys.argv[1]])
train_wordpiece(itertools.islice(iter_documents(cfg.inputs, cfg), 300), sys.argv[2], 3000, 2)
"""


def test_train_wordpiece_is_byte_identical_across_processes(tmp_path):
    """tokenizers' own WordPieceTrainer gives a different tokenizer.json on most runs of this input
    (huggingface/tokenizers#1794)."""
    corpus = str(DATA / "korean_petitions")
    outs = []
    for seed in ("1", "2"):  # fresh interpreters with different string hashing, as two `korch run`s would be
        out = tmp_path / f"tok{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _TRAIN, corpus, str(out)], check=True, env=env, timeout=300)
        outs.append((out / "tokenizer.json").read_bytes())
    assert outs[0] == outs[1]
