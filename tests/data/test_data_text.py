"""Pure text rules: normalisation, cleaning reasons, stable hashing and the validation split."""

import unicodedata

from korch.data.text import clean_document, is_validation, normalize_text, text_hash


def test_normalize_composes_hangul_and_drops_controls():
    decomposed = unicodedata.normalize("NFD", "한국어")
    assert decomposed != "한국어"
    assert normalize_text(decomposed + "\x00\x07\u200b 문장\r\n다음\ufeff") == "한국어 문장\n다음"


def test_normalize_drops_lone_surrogates():
    assert normalize_text("가\ud800나") == "가나"


def test_clean_document_reasons():
    assert clean_document(" \n\x00\n", normalize=True, min_chars=0) == ("", "empty")
    assert clean_document("짧다", normalize=True, min_chars=5) == ("", "too_short")
    assert clean_document("첫 줄\n\n  둘째 줄 ", normalize=True, min_chars=0) == ("첫 줄\n둘째 줄", None)
    # Without normalisation a lone surrogate cannot be written as UTF-8: the record is dropped, not the run.
    assert clean_document("가\ud800", normalize=False, min_chars=0) == ("", "undecodable_record")


def test_hash_is_stable_and_split_follows_fraction():
    assert text_hash("한국어") == text_hash("한국어") != text_hash("한국어 ")
    hashes = [text_hash(f"문서 {i}") for i in range(2000)]
    held = sum(is_validation(h, 0.1) for h in hashes)
    assert 120 < held < 280
    assert not any(is_validation(h, 0.0) for h in hashes)
