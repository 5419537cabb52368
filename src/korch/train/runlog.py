"""A stage's `metrics.jsonl` and `events.jsonl`, written by one small actor on the driver's node.

Workers may run on other nodes; they send rows here instead of writing files the driver can't see. The actor
also counts how often each rank's train function started, which is how a restarted worker group knows it is a
retry (attempt 2, 3, ...).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from korch.train.tracking import TensorBoardSink


class RunLog:
    def __init__(self, stage_dir: str, echo: bool = True):
        self.stage_dir = Path(stage_dir)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.starts: dict[int, int] = {}
        self.last_step = 0
        self.tensorboard = TensorBoardSink(self.stage_dir)

    def _append(self, name: str, row: dict) -> None:
        with open(self.stage_dir / name, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def worker_started(self, rank: int) -> int:
        self.starts[rank] = self.starts.get(rank, 0) + 1
        return self.starts[rank]

    def event(self, event: str, step: int | None = None, attempt: int | None = None, **fields: Any) -> None:
        row = {"event": event, "step": step, "attempt": attempt, "time": time.time(), **fields}
        self._append("events.jsonl", row)
        if self.echo and event != "checkpoint":
            details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            where = "".join([f" at step {step}" if step is not None else "", f" (attempt {attempt})" if attempt else ""])
            print(f"[korch] {self.stage_dir.name}: {event}{where} {details}".rstrip(), flush=True)

    def metrics(self, row: dict) -> None:
        self.last_step = row.get("step", self.last_step)
        self._append("metrics.jsonl", row)
        self.tensorboard.write(row)
        if self.echo:
            print(f"[korch] {self.stage_dir.name}: step {row['step']} epoch {row['epoch']:.2f} loss {row['loss']:.4f} "
                  f"lr {row['lr']:.2e} {row['samples_per_s']:.1f} samples/s", flush=True)

    def evaluation(self, row: dict) -> None:
        """An evaluation during training: a metrics.jsonl row whose metric keys start with `val_`."""
        step, epoch = row.pop("step"), row.pop("epoch")
        self._append("metrics.jsonl", {"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in row.items()},
                                       "time": time.time()})
        self.tensorboard.write({"step": step, **row}, prefix="val/")
        if self.echo:
            shown = " ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
            print(f"[korch] {self.stage_dir.name}: eval at step {step} epoch {epoch:.2f} {shown}", flush=True)

    def flush(self) -> bool:
        self.tensorboard.flush()
        return True


def start_run_log(stage_dir: str, name: str):
    """The actor, pinned to this (the driver's) node so its files land in the driver's runs dir."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(RunLog)
    strategy = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    # The driver's ProgressView prints progress from the files; the actor's own prints would only reach a worker log.
    return actor_cls.options(name=name, scheduling_strategy=strategy, lifetime=None).remote(stage_dir, echo=False)
