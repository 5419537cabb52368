"""The interface between the shared training loop and a task.

The loop (`korch.train.loop`) owns everything every task needs: rank and device, DeepSpeed, resume,
consolidated checkpoints, the failure hook, logging, evaluation scheduling, best-epoch selection and early
stopping. A task owns what differs: its options, the rows it reads, its model, how a micro batch is collated,
its loss, what evaluation sums and reports, and its export.

Driver side (classmethods, run in `korch run`'s process): `training_texts`, `prepare_data`, `data_info`.
Worker side (an instance per Ray Train worker, built from plain data): the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping

from pydantic import BaseModel

# Evaluation collates with its own fixed seed, so every evaluation of every run sees the same batches
# (for mlm: the same masked positions), whatever step it happens at.
EVAL_SEED = 12345

if TYPE_CHECKING:
    import torch

    from korch.config import ModelConfig, StageConfig


class TrainTask:
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]
    columns: ClassVar[tuple[str, ...]] = ("input_ids",)
    """Columns of the prepared rows the task's `collate` reads (only these are converted to Python lists)."""
    greater_is_better: ClassVar[dict[str, bool]] = {}
    """Direction of each metric `eval.select_best` may name; unlisted names ending in loss/perplexity are lower-better."""

    # --- driver side -----------------------------------------------------------------------------------
    @classmethod
    def training_texts(cls, stage: "StageConfig") -> Iterable[str]:
        """Texts to train a tokenizer on when the stage has none to reuse."""
        from korch.data.readers import vocabulary_texts

        return vocabulary_texts(list(stage.data.inputs), stage.data)

    @classmethod
    def prepare_data(cls, stage: "StageConfig", ctx: Any, tokenizer_dir: str) -> str:
        """Turn the stage's inputs into a prepared folder (parquet shards + manifest.json); returns its path."""
        raise NotImplementedError

    @classmethod
    def data_info(cls, manifest: Mapping[str, Any], options: BaseModel) -> dict[str, Any]:
        """Plain data the workers need from the prepared data (e.g. label names); crosses the Ray boundary."""
        return {}

    # --- worker side -----------------------------------------------------------------------------------
    def __init__(self, options: BaseModel, model: "ModelConfig", tokenizer: Any, seq_len: int, info: Mapping[str, Any]):
        self.options = options
        self.model_config = model
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.info = dict(info)

    def build_model(self, start_from: str | None) -> "torch.nn.Module":
        """The model to train: from `start_from` (a parent stage's final/), `model.pretrained`, or fresh from config."""
        raise NotImplementedError

    def collate(self, rows: Mapping[str, list], generator: "torch.Generator") -> dict[str, "torch.Tensor"]:
        """A micro batch of tensors from a batch of rows; randomness draws only from `generator`, which the loop
        seeds with (seed, epoch, micro batch, rank) so a resumed run collates exactly as before."""
        raise NotImplementedError

    def loss(self, model: Any, batch: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
        raise NotImplementedError

    def eval_sums(self, model: Any, batch: Mapping[str, "torch.Tensor"], weight: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        """Sums over the batch that the loop adds up over batches and ranks. `weight` is 0 for padding rows
        (repeats that make every rank's share equal) and 1 otherwise: multiply per-row terms by it."""
        raise NotImplementedError

    def eval_metrics(self, sums: Mapping[str, "torch.Tensor"]) -> dict[str, Any]:
        """Metrics from the summed `eval_sums` (identical on every rank)."""
        raise NotImplementedError

    def empty_model(self, config: Any) -> "torch.nn.Module":
        """A fresh model of the trained class for `config`; the loop loads gathered full weights into it to export."""
        raise NotImplementedError

    def save(self, model: "torch.nn.Module", folder: str) -> None:
        """Write a Hugging Face folder (safetensors) that the matching Auto class and `pipeline` load."""
        model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)

    def probe(self, model: Any, device: Any) -> list[float] | None:
        """Optional: numbers from the in-memory model that a test compares with the exported folder's."""
        return None


def metric_greater_is_better(task_cls: type, metric: str, configured: bool | None = None) -> bool:
    """Direction of a task metric: `configured` (eval.greater_is_better) if set, else the task's own, else lower is
    better for names with loss/perplexity and higher for the rest."""
    if configured is not None:
        return configured
    return task_cls.greater_is_better.get(metric, not any(word in metric for word in ("loss", "perplexity")))


def batch_generator(seed: int, epoch: int, micro_index: int, rank: int) -> "torch.Generator":
    """The generator a micro batch's randomness draws from: a pure function of where the batch is in the run."""
    import torch

    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch * 10_007 + micro_index * 101 + rank) % (2**63 - 1))
    return generator
