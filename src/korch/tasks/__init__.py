"""The task registry: what a stage's `task:` may name, and each task's options section.

Kept free of heavy imports so `korch validate` stays fast: a task module declares its options and its
`TrainTask` class at the top level and imports torch/transformers inside methods only. Trained tasks share one
loop (`korch.train.loop`) through the `TrainTask` interface in `korch.tasks.base`; other tasks (data_prepare)
name a driver-side runner instead.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str
    runner: str
    """`module:function` taking (stage: StageConfig, ctx: StageContext) and returning the stage's summary dict."""
    needs_data: bool = True
    options: type[BaseModel] | None = None
    """The typed section a stage of this task may carry under the task's name (e.g. `classify: {...}`)."""
    trainer: str | None = None
    """`module:Class` of the task's `TrainTask`, for tasks that run through the shared training loop."""
    rows: str = "corpus"
    """What the task reads: `corpus` (packed blocks), `labelled` (text, label records) or `none`."""
    runs_in_driver: str | None = None
    """`module:function` taking the stage: True when, on a Ray korch would start on this machine alone, the stage
    runs in the driver and uses no Ray at all. `korch run` then starts no Ray for it (`korch.train.job.needs_ray`)."""

    def load_runner(self) -> Callable:
        return _load(self.runner)

    def needs_ray_locally(self, stage) -> bool:
        return self.runs_in_driver is None or not _load(self.runs_in_driver)(stage)

    def load_trainer(self) -> type:
        if self.trainer is None:
            raise ValueError(f"task {self.name} does not train")
        return _load(self.trainer)


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def always_in_driver(stage) -> bool:
    """`runs_in_driver` of a task that never uses Ray (it works in the driver process whatever the machine)."""
    return True


TASKS: dict[str, TaskInfo] = {}


def register_task(info: TaskInfo) -> None:
    TASKS[info.name] = info


def _register_builtin() -> None:
    from korch.tasks.adapter import AdapterOptions
    from korch.tasks.classify import ClassifyOptions
    from korch.tasks.ensemble import EnsembleOptions
    from korch.tasks.coref_mlm import CorefMlmOptions
    from korch.tasks.mlm import MlmOptions
    from korch.tasks.nsp_mlm import NspMlmOptions
    from korch.tasks.span_mlm import SpanMlmOptions
    from korch.tasks.simcse import SimcseOptions
    from korch.tasks.vocab_expand import VocabExpandOptions

    train_runner = "korch.train.runner:run_training_stage"
    register_task(TaskInfo(
        "mlm", "Masked-language-model pretraining (BERT-style 80/10/10 masking) on packed corpus blocks.",
        train_runner, options=MlmOptions, trainer="korch.tasks.mlm:MlmTask", rows="corpus"))
    register_task(TaskInfo(
        "nsp_mlm", "BERT pretraining: masked LM + next-sentence prediction on document-aware sentence pairs (bert only).",
        train_runner, options=NspMlmOptions, trainer="korch.tasks.nsp_mlm:NspMlmTask", rows="corpus"))
    register_task(TaskInfo(
        "span_mlm", "SpanBERT: whole-word spans of Geometric(0.2) length (max 10) up to 15% of tokens, optional "
        "span-boundary objective.", train_runner, options=SpanMlmOptions, trainer="korch.tasks.span_mlm:SpanMlmTask",
        rows="corpus"))
    register_task(TaskInfo(
        "coref_mlm", "Entity-coreference MLM: later mentions of repeated proper nouns masked whole (data from `korch "
        "data coref` or raw text); evaluates real1/real5.", train_runner, options=CorefMlmOptions,
        trainer="korch.tasks.coref_mlm:CorefMlmTask", rows="corpus"))
    register_task(TaskInfo(
        "classify", "Sequence classification on labelled records: cls/mean/max pooling, cross-entropy or focal "
        "loss, per-class F1, best-epoch selection; exports an AutoModelForSequenceClassification folder.",
        train_runner, options=ClassifyOptions, trainer="korch.tasks.classify:ClassifyTask", rows="labelled"))
    register_task(TaskInfo(
        "data_prepare", "Clean, sentence-split and pack a raw corpus into parquet shards plus manifest.json.",
        "korch.data.stage:run_prepare_stage", rows="none", runs_in_driver="korch.data.stage:prepares_in_driver"))
    register_task(TaskInfo(
        "ensemble", "Soft voting over trained classifiers (the stages in `needs`): each member's best of swa/best/"
        "final on the validation split, weights by score, uniform or fitted log-loss; writes an `ensemble/` folder "
        "that `korch predict` runs.",
        "korch.tasks.ensemble:run_ensemble_stage", options=EnsembleOptions, rows="labelled"))

    embed_runner = "korch.eval.guard:run_embedding_training_stage"
    register_task(TaskInfo(
        "vocab_expand", "Add frequent Korean morphemes (kiwipiepy counts over data.inputs) to the parent's WordPiece "
        "vocabulary; new embedding rows start as the mean of the old pieces they replace. No training.",
        "korch.tasks.vocab_expand:run_vocab_expand_stage", options=VocabExpandOptions, rows="none",
        runs_in_driver="korch.tasks:always_in_driver"))
    register_task(TaskInfo(
        "simcse", "Contrastive sentence embeddings: unsupervised (dropout positives) or supervised (KorNLI "
        "entailment positives, contradiction hard negatives), negatives gathered across workers; cls/mean/idf pooling; "
        "exports an HF encoder that loads in sentence-transformers.",
        embed_runner, options=SimcseOptions, trainer="korch.tasks.simcse:SimcseTask", rows="pairs"))
    register_task(TaskInfo(
        "adapter", "Bottleneck (hidden -> r -> hidden) or hierarchical (language under task) adapters on a frozen "
        "encoder, trained with the simcse objective; final/ holds adapter.safetensors and the merged HF encoder.",
        embed_runner, options=AdapterOptions, trainer="korch.tasks.adapter:AdapterTask", rows="pairs"))


_register_builtin()
