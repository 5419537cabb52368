"""Typed job specs: YAML plus `--set a.b=c` overrides in, a validated, frozen `JobConfig` out.

Every field carries a docstring; the CLI help and the README's field reference are generated from them
(`python -m korch.docs`). Numbers are strict: text such as `"two"` or `"100"` where a number belongs is an
error, not a silent conversion. The YAML loader reads `2e-5` as a float (plain PyYAML reads it as a string).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from korch.errors import UserError
from korch.spec import Section as _Strict
from korch.tasks import TASKS

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SpecError(UserError):
    """A job spec problem, already phrased for the user: one `problems` entry per line."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def is_uri(path: str) -> bool:
    return bool(_URI.match(path))


def _resolve_existing(value: str, what: str) -> str:
    """Resolve a local path against the current directory and insist it exists; URIs pass through."""
    if is_uri(value):
        return value
    resolved = os.path.abspath(os.path.expanduser(value))
    if glob.has_magic(resolved):
        if not glob.glob(resolved):
            raise ValueError(f"{what} '{value}' matches no file; check the pattern or the current directory")
        return resolved
    if not os.path.exists(resolved):
        raise ValueError(f"{what} '{value}' does not exist (resolved to {resolved}); fix the path, "
                         "relative paths resolve against the current directory")
    return resolved


class ModelConfig(_Strict):
    arch: Literal["bert", "deberta-v2", "ngram"] = "bert"
    """Architecture for from-scratch initialisation: `bert`, `deberta-v2` (relative positions, for long sequences) or, for `classify` only, `ngram`: a fastText-style bag of hashed token n-grams (no encoder; `size` sets its width, tiny 64 to large 1024; `overrides` take `ngram_max`, default 3, and `buckets`, default 65536). A few epochs over NSMC's 4,500 reviews take about a minute of one CPU core, and it makes a different ensemble member; it ignores `classify.pooling`, and with `needs:` it uses only the parent's tokenizer (a BERT parent's weights have nothing to continue; an ngram parent's n-gram table is kept)."""
    size: Literal["tiny", "mini", "small", "base", "large"] = "tiny"
    """Named size for from-scratch init. `tiny` (hidden 64, 2 layers) runs on a laptop CPU; `base`/`large` are the usual sizes."""
    pretrained: str | None = None
    """Start from this Hugging Face model folder (or hub id, which needs network) instead of a fresh init."""
    max_position_embeddings: int | None = Field(default=None, ge=8)
    """Position table size. Defaults to the data's `seq_len` rounded up to a multiple of 64 (at least 128); must be >= `seq_len`."""
    overrides: dict[str, Any] = {}
    """Extra keyword arguments for the Hugging Face config (e.g. `{num_attention_heads: 4}`), applied last."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for long sequences, ~30% more compute."""

    @field_validator("pretrained")
    @classmethod
    def _pretrained_path(cls, value: str | None) -> str | None:
        if value is None or is_uri(value):
            return value
        looks_local = value.startswith((".", "/", "~")) or os.path.exists(value) or value.count("/") > 1
        return _resolve_existing(value, "model folder") if looks_local else value


class TokenizerConfig(_Strict):
    path: str | None = None
    """An existing Hugging Face tokenizer folder. Unset: reuse the pretrained model's, else train one on the stage's corpus."""
    vocab_size: int = Field(default=8000, ge=100)
    """WordPiece vocabulary size when korch trains the tokenizer."""
    min_frequency: int = Field(default=2, ge=1)
    """Drop candidate word pieces seen fewer times than this."""
    pre_tokenize: Literal["whitespace", "morphemes"] = "whitespace"
    """`morphemes` splits text into kiwipiepy morphemes before WordPiece (better Korean vocabularies, slower)."""
    max_docs: int | None = Field(default=50_000, ge=1)
    """Train the tokenizer on at most this many documents (the first ones, in input order)."""

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None) -> str | None:
        return None if value is None else _resolve_existing(value, "tokenizer folder")


class DataConfig(_Strict):
    inputs: list[str] = []
    """Corpus files, folders, globs or pyarrow URIs (s3://, gs://): txt, jsonl, parquet, WikiExtractor `<doc>` files, or a folder written by `korch data prepare` (has manifest.json)."""
    format: Literal["auto", "txt", "lines", "jsonl", "parquet", "wiki", "tsv", "csv"] = "auto"
    """Input format; `auto` decides per file from its extension and first bytes (a headed TSV's text column feeds corpus tasks; a .txt without blank lines is one document per line). Labelled tasks read `tsv`, `csv`, `jsonl` or `parquet`."""
    text_fields: list[str] = ["text", "content", "document", "sentence"]
    """For jsonl/parquet: the first of these fields present in a record is its text."""
    seq_len: int = Field(default=128, ge=8, le=65536)
    """Tokens per packed training block."""
    normalize: bool = True
    """Unicode NFC normalisation and control-character removal."""
    split_sentences: bool = True
    """Split documents into sentences with kiwipiepy (packing keeps sentence boundaries)."""
    morphemes: bool = False
    """Record kiwipiepy morpheme boundaries for whole-word masking (slower)."""
    dedup: bool = True
    """Drop exact-duplicate documents."""
    min_doc_chars: int = Field(default=20, ge=0)
    """Skip documents shorter than this (counted as `too_short` in the manifest)."""
    max_line_chars: int = Field(default=100_000, ge=1)
    """Skip input lines longer than this (counted as `line_too_long`)."""
    max_docs: int | None = Field(default=None, ge=1)
    """Read at most this many documents (after skips), for quick runs."""
    validation_fraction: float = Field(default=0.02, ge=0.0, lt=1.0)
    """Share held out for evaluation: corpus documents chosen by a hash of the text (so stable); labelled rows by a seeded split stratified by class."""
    preprocess_actors: int | None = Field(default=None, ge=1)
    """Ray Data actors running Kiwi; each holds one ~260 MB `Kiwi`. Unset: one per free CPU of the cluster (less one for the driver from 4 CPUs up), capped by the work and by free memory; and none under 4 free CPUs on one local machine, where the driver runs Kiwi itself. Setting it (or `actor_cpus`) always uses actors."""
    actor_cpus: float | None = Field(default=None, gt=0)
    """Logical CPUs per preprocessing actor. Unset: 0.5 under 4 free CPUs (fractions keep small machines from deadlocking), else 1."""
    kiwi_threads: int | None = Field(default=None, ge=1)
    """Kiwi analyser threads per preprocessing actor (each actor hands Kiwi whole batches of documents), or in the driver when it preprocesses alone. Unset: see `korch.data.pool`."""
    train_on_validation: bool = False
    """Labelled tasks: train on the training rows plus the validation rows (`validation_inputs`, or what `validation_fraction` holds out) and hold nothing out, as a full-data retrain does."""
    validation_inputs: list[str] = []
    """Labelled tasks: validation files. Unset: a seeded, stratified `validation_fraction` split of `inputs`."""
    text_column: str | None = None
    """Labelled tasks: the column holding the text. Unset: the first of `text_fields` present."""
    text_pair_column: str | None = None
    """Labelled tasks: a second text column, for sentence-pair inputs."""
    label_column: str = "label"
    """Labelled tasks: the column holding the label."""
    columns: list[str] | None = None
    """Labelled TSV/CSV without a header row: the column names, in order (e.g. `[text, rating]`). Unset: the first row is the header."""
    labels: list[str] | None = None
    """Labelled tasks: label names in id order. Unset: inferred from the training file (sorted; numbers numerically). With `label_bins`: one name per bin."""
    label_bins: list[float] | None = None
    """Labelled tasks: put a numeric label into classes by ascending upper bounds: `<= bins[0]` is class 0, ..., above the last is class `len(bins)`. `[4, 6, 8]` makes 1-10 ratings 4 classes."""

    @field_validator("validation_inputs")
    @classmethod
    def _validation_inputs_exist(cls, value: list[str]) -> list[str]:
        return [_resolve_existing(item, "data validation input") for item in value]

    @field_validator("label_bins")
    @classmethod
    def _bins_ascend(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(b >= a for a, b in zip(value[1:], value))):
            raise ValueError("label_bins must be a non-empty list of strictly ascending upper bounds, e.g. [4, 6, 8]")
        return value

    @model_validator(mode="after")
    def _bin_names(self) -> "DataConfig":
        if self.label_bins is not None and self.labels is not None and len(self.labels) != len(self.label_bins) + 1:
            raise ValueError(f"labels names {len(self.labels)} classes but label_bins make {len(self.label_bins) + 1}; "
                             "give one name per bin (len(label_bins) + 1)")
        return self

    @field_validator("inputs")
    @classmethod
    def _inputs_exist(cls, value: list[str]) -> list[str]:
        return [_resolve_existing(item, "data input") for item in value]


class TrainConfig(_Strict):
    seed: int = 42
    """Seed for init, data order, masking and dropout. Two fresh runs of a job with the same seed give the same run: byte-identical tokenizer and shards, the same losses and (on CPU) weights."""
    epochs: int | None = Field(default=None, ge=1)
    """Passes over the training data. Set this, `max_steps`, `epochs_from`, or a combination (whichever ends first)."""
    epochs_from: str | None = None
    """An earlier stage whose best epoch count this stage trains for: the epoch its `eval.select_best` picked, else the epochs it ran. For a full-data retrain (with `data.train_on_validation`); overrides `epochs`."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Samples per worker per forward pass."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro batches accumulated per optimizer step. Global batch = micro_batch_size x grad_accum x num_workers."""
    lr: float = Field(default=5e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps before the schedule."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping norm (0 turns clipping off)."""
    swa_epochs: int | None = Field(default=None, ge=1)
    """Stochastic weight averaging: average the weights of the last K epoch ends (equal weights, as `torch.optim.swa_utils.AveragedModel`) into `swa/`, evaluated beside `best/` (`eval.json` key `swa`). Works under ZeRO 0-3 and survives resumes."""
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    """Checkpoint every N optimizer steps (one is also taken at each epoch end and at the end)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """How many recent checkpoints to keep."""
    log_every_steps: int = Field(default=10, ge=1)
    """Write a metrics.jsonl line every N optimizer steps."""


class EmbedEvalConfig(_Strict):
    pairs: str
    """Sentence pairs to score the stage's `final/` on (`korch eval embed`): a KorSTS TSV (score 0-5) or KorNLI TSV (gold_label)."""
    sim_min: float = 4.0
    """KorSTS scores at or above this count as similar pairs."""
    diff_max: float = 1.0
    """KorSTS scores at or below this count as different pairs."""
    limit: int | None = Field(default=None, ge=1)
    """Score only the first N pairs."""

    @model_validator(mode="after")
    def _thresholds_apart(self) -> "EmbedEvalConfig":
        if self.diff_max >= self.sim_min:
            raise ValueError(f"diff_max {self.diff_max:g} must be below sim_min {self.sim_min:g}")
        return self

    @field_validator("pairs")
    @classmethod
    def _pairs_exist(cls, value: str) -> str:
        return _resolve_existing(value, "eval.embed.pairs")


class GuardConfig(_Strict):
    metric: str = "gap"
    """The `eval.embed` metric compared with the parent stage's (`gap`, `spearman`, `sim_mean`; higher is better)."""
    min_delta: float = 0.0
    """The stage must score at least parent + min_delta; below that it is `regressed`."""
    on_regression: Literal["fail", "keep_parent"] = "fail"
    """`fail`: stop the job with exit 1. `keep_parent`: later stages start from the parent's model instead."""


class EvalConfig(_Strict):
    embed: EmbedEvalConfig | None = None
    """Embedding stages (vocab_expand, simcse, adapter): score `final/` on sentence pairs after training, as `korch eval embed` does; the result is the stage's `eval.json`."""
    guard: GuardConfig | None = None
    """Regression guard for embedding stages: compare `eval.embed`'s `metric` with the `needs` parent's; a stage below it is never silently promoted. Needs `eval.embed`."""
    every: Literal["end", "epoch", "never"] = "end"
    """When to evaluate on the held-out split: at the end, after every epoch (each result also goes to metrics.jsonl), or never. `eval.json` holds the last result."""
    max_batches: int | None = Field(default=None, ge=1)
    """Evaluate on at most this many micro batches per worker. Unset: the whole held-out split."""
    select_best: str | None = None
    """A metric of the task's evaluation (e.g. `macro_f1`, `accuracy`, `mlm_loss`): the best epoch's model is exported to `best/` beside `final/`. Needs `every: epoch`."""
    greater_is_better: bool | None = None
    """Direction of `select_best`. Unset: the task's own (losses and perplexity lower, others higher)."""
    patience: int | None = Field(default=None, ge=1)
    """Stop early after this many evaluations without a better `select_best`. Needs `select_best`."""

    @model_validator(mode="after")
    def _selection_needs_epochs(self) -> "EvalConfig":
        if self.select_best is not None and self.every != "epoch":
            raise ValueError("select_best compares epochs: set eval.every: epoch")
        if self.patience is not None and self.select_best is None:
            raise ValueError("patience counts evaluations without a better select_best metric: set eval.select_best")
        if self.guard is not None and self.embed is None:
            raise ValueError("eval.guard compares eval.embed scores: set eval.embed.pairs")
        return self


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(default=0, ge=0, le=3)
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO 1-3; needs DeepSpeed's CPU Adam build)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO 3 only)."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """`auto` is bf16 on GPU and fp32 on CPU; fp16/bf16 need `use_gpu: true`."""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class DistributedConfig(_Strict):
    num_workers: int = Field(default=1, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One or more GPUs per worker; when CUDA turns out to be absent the worker falls back to CPU (gloo)."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """Logical CPUs Ray reserves per worker (also its torch thread count)."""
    gpus_per_worker: float = Field(default=1.0, ge=0)
    """GPUs per worker when `use_gpu` is true."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: `auto` is nccl with `use_gpu`, gloo otherwise. Use gloo on GPU-less test nodes."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker-group restarts from the last checkpoint before the stage fails (-1: unlimited)."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed ZeRO settings."""

    @model_validator(mode="after")
    def _half_precision_needs_gpu(self) -> "DistributedConfig":
        if self.deepspeed.precision in ("fp16", "bf16") and not self.use_gpu:
            raise ValueError(f"deepspeed.precision {self.deepspeed.precision} needs use_gpu: true; "
                             "use precision: auto or fp32 on CPU")
        return self


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


class _StageBase(_Strict):
    name: str = Field(pattern=_NAME)
    """Stage name; outputs go to RUNS/<job>/<name>/ and `--set stages.<name>.x=y` addresses it."""
    task: str
    """What the stage does; see the task list in the README (`korch tasks`)."""
    needs: str | list[str] | None = None
    """Earlier stage(s) this stage builds on. A trained stage starts from the `final/` model (and tokenizer) of the one it names, or reads its shards if it is a data_prepare stage; a task that combines models (`ensemble`) names several."""
    start_from: str = Field(default="final", pattern=r"^(final|best|swa|checkpoint-[0-9]+)$")
    """Which model of the trained stage named in `needs` this stage starts from: `final`, `best` (the epoch its `eval.select_best` picked), `swa`, or `checkpoint-<step>` (an epoch end's export)."""
    retrain_of: str | list[str] | None = None
    """Full-data retrain: run the spec of this earlier stage (or of the best of these, by their `eval.select_best` value) on train + validation (`data.train_on_validation`) for its best epoch count, with no held-out evaluation. The stage's own `distributed` section applies when set; its other sections are ignored."""
    model: ModelConfig = ModelConfig()
    """Model to train."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """Tokenizer to use or train."""
    data: DataConfig = DataConfig()
    """Training corpus and preprocessing."""
    train: TrainConfig = TrainConfig(max_steps=100)
    """Optimisation and checkpointing."""
    eval: EvalConfig = EvalConfig()
    """Evaluation."""
    distributed: DistributedConfig = DistributedConfig()
    """Workers, resources, fault tolerance and DeepSpeed."""

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"unknown task '{value}'; allowed: {', '.join(sorted(TASKS))}")
        return value

    @model_validator(mode="after")
    def _cross_fields(self) -> "_StageBase":
        mpe = self.model.max_position_embeddings
        if mpe is not None and mpe < self.data.seq_len:
            raise ValueError(f"model.max_position_embeddings {mpe} is smaller than data.seq_len "
                             f"{self.data.seq_len}; raise it or lower seq_len")
        train = self.train
        if TASKS[self.task].trainer and train.epochs is None and train.max_steps is None and train.epochs_from is None \
                and self.retrain_of is None:
            raise ValueError("set train.epochs, train.max_steps or train.epochs_from so the stage has an end")
        if self.start_from != "final" and not (self.needs and TASKS[self.task].trainer):
            raise ValueError(f"start_from {self.start_from} picks a model of the stage named in `needs`; set needs, "
                             "or use model.pretrained / --from-checkpoint for a folder")
        if self.model.arch == "ngram" and self.task != "classify":
            raise ValueError(f"model.arch ngram is a classifier (a bag of n-grams, no encoder), but this stage runs "
                             f"task {self.task}; use it in a classify stage, or pick bert or deberta-v2")
        for name in TASK_SECTIONS:
            if name != self.task and getattr(self, name, None) is not None:
                raise ValueError(f"section '{name}' holds options of task {name}, but this stage runs task "
                                 f"{self.task}; remove the section or set task: {name}")
        return self

    @property
    def needed(self) -> list[str]:
        """`needs` as a list (empty when unset)."""
        return _as_list(self.needs)

    @property
    def retrained_from(self) -> list[str]:
        """`retrain_of` as a list (empty when unset)."""
        return _as_list(self.retrain_of)

    @property
    def options(self) -> BaseModel | None:
        """The stage's task options: its section under the task's name, else the task's defaults."""
        info = TASKS[self.task]
        if info.options is None:
            return None
        return getattr(self, self.task, None) or info.options()


TASK_SECTIONS: dict[str, type[BaseModel]] = {name: info.options for name, info in TASKS.items() if info.options}

# One optional section per task with options (e.g. `classify: {pooling: max}`), named after the task.
StageConfig = create_model(
    "StageConfig", __base__=_StageBase, __module__=__name__,
    **{name: (options | None, Field(default=None, description=f"Options of the `{name}` task (see `korch tasks`); "
                                    f"only a stage with `task: {name}` may carry it."))
       for name, options in TASK_SECTIONS.items()},
)
StageConfig.__doc__ = "One stage of a job: its task, model, tokenizer, data, training, evaluation and scale."


class TrackingConfig(_Strict):
    mlflow_uri: str | None = None
    """MLflow tracking server (e.g. `http://127.0.0.1:5000`); unset: `MLFLOW_TRACKING_URI` if set, else no MLflow. Each finished stage logs one run: the resolved spec as params, metrics.jsonl and eval.json as metrics, `final/` as an artifact. TensorBoard files (`<stage>/tb/`) are always written."""
    experiment: str | None = None
    """MLflow experiment name; unset: the job's name."""


class JobConfig(_Strict):
    name: str = Field(pattern=_NAME)
    """Job name; outputs go to RUNS/<name>/."""
    stages: list[StageConfig] = Field(min_length=1)
    """Stages, run in order."""
    tracking: TrackingConfig = TrackingConfig()
    """Where metrics go besides metrics.jsonl: TensorBoard always, MLflow when a server is named."""

    @model_validator(mode="after")
    def _stage_graph(self) -> "JobConfig":
        seen: set[str] = set()
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name '{stage.name}' is used twice; stage names must be unique")
            for needed in stage.needed + ([stage.train.epochs_from] if stage.train.epochs_from else []):
                if needed not in seen:
                    raise ValueError(f"stage '{stage.name}' needs '{needed}', which is not an earlier stage; "
                                     f"earlier stages: {', '.join(sorted(seen)) or 'none'}")
            for source in stage.retrained_from:
                if source not in seen:
                    raise ValueError(f"stage '{stage.name}' retrain_of '{source}', which is not an earlier stage; "
                                     f"earlier stages: {', '.join(sorted(seen)) or 'none'}")
                if self.stage(source).task != stage.task or not TASKS[stage.task].trainer:
                    raise ValueError(f"stage '{stage.name}' (task {stage.task}) retrain_of '{source}', a "
                                     f"{self.stage(source).task} stage; retrain a trained stage of the same task")
            if stage.retrained_from:
                seen.add(stage.name)
                continue
            if TASKS[stage.task].trainer and len(stage.needed) > 1:
                raise ValueError(f"stage '{stage.name}' (task {stage.task}) starts from one model, but needs names "
                                 f"{len(stage.needed)} stages; name one (tasks such as ensemble combine several)")
            feeds_data = len(stage.needed) == 1 and self.stage(stage.needed[0]).task == "data_prepare"
            if TASKS[stage.task].needs_data and not stage.data.inputs and not feeds_data:
                raise ValueError(f"stage '{stage.name}' (task {stage.task}) needs data.inputs (corpus files or "
                                 "folders), or `needs:` a data_prepare stage")
            seen.add(stage.name)
        return self

    def stage(self, name: str) -> StageConfig:
        return next(s for s in self.stages if s.name == name)


# --- loading ---------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `2e-5` and `1e4` as floats, as YAML 1.2 and every user does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, path: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(path, [f"{where}invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError(path, [f"invalid YAML: {exc}"]) from None


def apply_overrides(raw: dict, overrides: list[str], path: str) -> dict:
    """Apply `a.b=c` overrides to the raw dict; values are parsed as YAML. `stages.<name>` picks a stage by name,
    `stages.*` every stage."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item}: expected KEY=VALUE, e.g. stages.mlm.train.lr=1e-4")
            continue
        value = parse_yaml(text, f"--set {key}")
        try:
            _set_path(raw, key.split("."), value)
        except KeyError as exc:
            problems.append(f"--set {key}: {exc.args[0]}")
    if problems:
        raise SpecError(path, problems)
    return raw


def _set_path(node: Any, parts: list[str], value: Any) -> None:
    *parents, last = parts
    for i, part in enumerate(parents):
        if isinstance(node, list) and part == "*":  # `stages.*.x=y`: every stage
            for stage in node:
                if isinstance(stage, dict):
                    _set_path(stage, parts[i + 1:], value)
            return
        if isinstance(node, list):
            node = _stage_by_name(node, part)
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise KeyError(f"'{'.'.join(parts[:i + 1])}' is a value, not a section")
    if isinstance(node, list):
        raise KeyError("address a whole stage's field, e.g. stages.<name>.train.lr")
    node[last] = value


def _stage_by_name(stages: list, key: str) -> dict:
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name") == key:
            return stage
    if key.isdigit() and int(key) < len(stages):
        return stages[int(key)]
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    raise KeyError(f"no stage named '{key}'; stages: {', '.join(map(str, names))}")


def _unshare(node: Any) -> Any:
    """A copy in which YAML anchors' aliases are separate objects, so `--set stages.a.train.lr=...` changes stage
    a only, even where its `train:` is `*shared` (copy.deepcopy would keep the sharing)."""
    if isinstance(node, dict):
        return {key: _unshare(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshare(value) for value in node]
    return node


def read_yaml_mapping(path: str, missing_hint: str, top_level: str) -> dict:
    """A YAML file's top-level mapping; a missing, unreadable or non-mapping file is a one-line `SpecError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(path, [f"file does not exist; {missing_hint}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(path, [f"cannot read the file: {exc}"]) from None
    raw = _unshare(parse_yaml(text, path))
    if not isinstance(raw, dict):
        raise SpecError(path, [f"the top level must be a mapping with {top_level}"])
    return raw


def load_raw(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    path = str(path)
    raw = read_yaml_mapping(path, "give the path of a job YAML, e.g. jobs/quickstart.yaml", "`name` and `stages`")
    return apply_overrides(raw, list(overrides or []), path)


def load_job(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply `--set` overrides, validate. Raises `SpecError` with one line per problem."""
    raw = load_raw(path, overrides)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(str(path), format_validation_error(exc, raw)) from None


def format_validation_error(exc: ValidationError, raw: Any, root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem, located by stage name; `root` is the model validated (default: a job)."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = _readable_loc(err["loc"], raw)
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            message = _unknown_key_message(err["loc"], root or JobConfig)
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
            message += f" (got {err['input']!r})"
        lines.append(f"{loc or '(top level)'}: {message}")
    return lines


def _readable_loc(loc: tuple, raw: Any) -> str:
    parts, node = [], raw
    for item in loc:
        if isinstance(item, int) and isinstance(node, list):
            entry = node[item] if item < len(node) else None
            name = entry.get("name") if isinstance(entry, dict) else None
            parts.append(str(name) if isinstance(name, str) else str(item))
            node = entry
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The spec models a field can hold, through `| None`, lists, dict values, unions and `Annotated`."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _union_tag(model: type[BaseModel]) -> Any:
    """A discriminated union member's tag (`uniform` for `type: Literal["uniform"]`), else None."""
    import typing

    field = model.model_fields.get("type")
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 else None


def _model_at(root: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The model that `path` (a pydantic error location) leads to: a field name goes into its model, a list index
    or dict key stays, and a union's tag (`params.lr.uniform`) picks that member. None if ambiguous."""
    models = [root]
    for part in path:
        if not isinstance(part, str):
            continue
        tagged = [m for m in models if _union_tag(m) == part]
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if tagged:
            models = tagged
        elif fields:
            models = [model for f in fields for model in _models_in(f.annotation)]
    return models[0] if len(models) == 1 else None


def _unknown_key_message(loc: tuple, root: type[BaseModel]) -> str:
    import difflib

    key = str(loc[-1])
    model = _model_at(root, loc[:-1])
    if model is None:
        return f"unknown key '{key}'"
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key '{key}'; {hint}allowed: {', '.join(allowed)}"
