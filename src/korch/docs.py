"""Generate the README's job-spec reference from the field docstrings (`python -m korch.docs --write README.md`)."""

from __future__ import annotations

import argparse
import re
import sys
import typing

from pydantic import BaseModel

from korch import config

BEGIN, END = "<!-- spec-reference:begin -->", "<!-- spec-reference:end -->"
SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("job", config.JobConfig), ("stages[]", config.StageConfig), ("model", config.ModelConfig),
    ("tokenizer", config.TokenizerConfig), ("data", config.DataConfig), ("train", config.TrainConfig),
    ("eval", config.EvalConfig), ("eval.embed", config.EmbedEvalConfig), ("eval.guard", config.GuardConfig), ("distributed", config.DistributedConfig), ("distributed.deepspeed", config.DeepSpeedConfig),
]


def _type_name(annotation) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"typing\.|korch\.(?:\w+\.)+|<class '|'>", "", text)
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    return f"`{text}`".replace("|", "\\|")


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`".replace("|", "\\|")


def render_reference() -> str:
    lines = []
    task_sections = [(f"{name} (options of task {name})", options) for name, options in config.TASK_SECTIONS.items()]
    for title, model in SECTIONS + task_sections:
        lines += [f"#### `{title}`", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            doc = (field.description or "").replace("\n", " ").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {doc} |")
        lines.append("")
    from korch.tasks import TASKS

    lines += ["#### tasks", "", "| task | what it does |", "|---|---|"]
    lines += [f"| `{t.name}` | {t.description} |" for t in TASKS.values()]
    return "\n".join(lines).rstrip() + "\n"


def splice(readme: str, reference: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + reference + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", metavar="README", help="replace the reference section of this file in place")
    args = parser.parse_args(argv)
    reference = render_reference()
    if args.write:
        with open(args.write, encoding="utf-8") as handle:
            text = handle.read()
        with open(args.write, "w", encoding="utf-8") as handle:
            handle.write(splice(text, reference))
    else:
        sys.stdout.write(reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
