"""`load_encoder_folder`: a masked LM's folder loads as a bare encoder without transformers' report of the head it
drops on purpose, while a folder that lacks encoder weights still gets the report."""

from __future__ import annotations

import json
import logging

import pytest


@pytest.fixture
def reports():
    """Load reports transformers logs (its loggers do not propagate to pytest's caplog)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


def _save_masked_lm(folder, layers: int = 1) -> None:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertForMaskedLM(config).save_pretrained(folder)


def test_a_masked_lm_loads_as_an_encoder_without_the_head_report(tmp_path, reports):
    from korch.models.encoder import load_encoder_folder

    _save_masked_lm(tmp_path)
    encoder = load_encoder_folder(str(tmp_path))
    assert type(encoder).__name__ == "BertModel" and encoder.pooler is None
    assert not [r for r in reports if "LOAD REPORT" in r], reports


def test_missing_encoder_weights_are_still_reported(tmp_path, reports):
    from korch.models.encoder import load_encoder_folder

    _save_masked_lm(tmp_path, layers=1)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))  # layer 1 has no weights
    load_encoder_folder(str(tmp_path))
    assert any("LOAD REPORT" in r and "MISSING" in r for r in reports), reports
    assert not logging.getLogger("transformers.modeling_utils").filters  # the filter is gone after the call
