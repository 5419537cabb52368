"""`korch tokenizer train` writes a Hugging Face tokenizer folder from a Korean corpus; no hub access."""

from __future__ import annotations

from pathlib import Path

import pytest

from korch.cli import main

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.parametrize("pre_tokenize", ["whitespace", "morphemes"])
def test_tokenizer_train_saves_a_loadable_wordpiece(tmp_path, pre_tokenize, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    code = main(["tokenizer", "train", str(DATA / "korean_petitions"), "--output", str(out), "--vocab-size", "1500",
                 "--pre-tokenize", pre_tokenize, "--max-docs", "150"])
    assert code == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer("대한민국 국민청원 게시판입니다.")
    assert encoded["input_ids"][0] == tokenizer.cls_token_id and encoded["input_ids"][-1] == tokenizer.sep_token_id
    # WordPiece keeps every syllable it saw on top of vocab_size, so Korean vocabularies run over it a little
    assert tokenizer.mask_token == "[MASK]" and 1000 <= len(tokenizer) <= 2500
    assert tokenizer.unk_token_id not in encoded["input_ids"][1:-1]


def test_tokenizer_train_missing_input_is_exit_2(tmp_path, capsys):
    assert main(["tokenizer", "train", str(tmp_path / "missing"), "--output", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert "missing' does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_tokenizer_train_bad_numbers_name_their_flags(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("한국어 문장입니다.\n")
    code = main(["tokenizer", "train", str(corpus), "--output", str(tmp_path / "tok"), "--vocab-size", "-5",
                 "--min-frequency", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--vocab-size: Input should be greater than or equal to 100" in err[0] and "--min-frequency:" in err[0]
