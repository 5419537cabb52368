"""The README's job-spec reference is generated from the field docstrings and must not drift from them."""

from pathlib import Path

from korch.config import DataConfig, JobConfig, StageConfig
from korch.docs import BEGIN, END, SECTIONS, render_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_is_current():
    text = README.read_text(encoding="utf-8")
    section = text[text.index(BEGIN) + len(BEGIN): text.index(END)]
    assert section.strip() == render_reference().strip(), "run `make docs` to regenerate the README reference"


def test_every_field_has_a_docstring():
    for _, model in SECTIONS:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
    assert "stages" in JobConfig.model_fields and "task" in StageConfig.model_fields and DataConfig.model_fields
