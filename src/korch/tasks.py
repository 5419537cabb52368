"""The task registry: what a stage's `task:` may name.

Kept free of heavy imports so `korch validate` stays fast; each task's runner is imported only when a stage
runs. A later task registers itself here with `register_task` and a `module:function` runner.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    runner: str
    """`module:function` taking (stage: StageConfig, ctx: StageContext) and returning the stage's summary dict."""
    needs_data: bool = True

    def load_runner(self) -> Callable:
        module, _, func = self.runner.partition(":")
        return getattr(importlib.import_module(module), func)


TASKS: dict[str, Task] = {}


def register_task(name: str, description: str, runner: str, needs_data: bool = True) -> None:
    TASKS[name] = Task(name, description, runner, needs_data)


register_task("mlm", "Masked-language-model pretraining (BERT-style 80/10/10 masking) with DeepSpeed ZeRO.",
              "korch.train.runner:run_training_stage")
register_task("data_prepare", "Clean, sentence-split and pack a raw corpus into parquet shards plus manifest.json.",
              "korch.data.stage:run_prepare_stage")
