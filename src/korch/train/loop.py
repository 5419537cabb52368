"""The per-worker training loop, shared by every trained task (runs inside Ray Train workers).

Reads top to bottom: config → rank/device → task → model (+ resume weights) → DeepSpeed → resume optimizer,
schedule and position → epochs of micro batches with logging, checkpoints, the failure test hook, evaluation,
best-epoch export and early stopping → final export. The loop knows no task: what a batch is, what the loss
and the metrics are and how the model is exported come from the stage's `TrainTask` (`korch.tasks.base`).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from korch.config import EvalConfig, ModelConfig, TrainConfig

FAIL_ENV = "KORCH_FAIL_AT_STEP"

TRAIN_API: Any = None
"""Stand-in for `ray.train` (get_context, get_checkpoint, report, Checkpoint). None: Ray Train's own. A tuning
trial with one worker runs the loop in its own Tune process, without a nested Ray Train run, and puts its
stand-in here (`korch.tune.trial`)."""


def _train_api():
    import ray.train

    return TRAIN_API or ray.train


class TrainLoopConfig(BaseModel):
    """Everything a worker needs, as plain data: it crosses the Ray boundary as a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    options: dict[str, Any] = {}
    task_info: dict[str, Any] = {}
    stage_dir: str
    tokenizer_dir: str
    prepared_dir: str
    manifest: dict[str, Any]
    start_from: str | None = None
    resume_from: str | None = None
    latest_saved: str | None = None
    """The newest checkpoint this stage's Ray run wrote and logged, which Ray's own record may not hold yet."""
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig
    deepspeed_config: dict[str, Any]
    seq_len: int
    rows_per_worker: int
    has_validation: bool
    use_gpu: bool
    cpus_per_worker: float
    log_actor: str
    fail_at_step: int | None = None


def newest_checkpoint(candidates: list[str | None]) -> str | None:
    """The candidate checkpoint folder with the highest step (the first of equals); None when there is none."""
    from korch.train.checkpoint import checkpoint_step

    best, best_step = None, -1
    for folder in candidates:
        if folder:
            step = checkpoint_step(folder)
            if step > best_step:
                best, best_step = folder, step
    return best


def plan_steps(train: TrainConfig, rows_per_worker: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps). Pure, so the driver and tests agree with workers."""
    per_epoch = rows_per_worker // (train.micro_batch_size * train.grad_accum)
    if per_epoch < 1:
        raise ValueError(f"each worker gets {rows_per_worker} rows, fewer than one optimizer step needs "
                         f"({train.micro_batch_size} x {train.grad_accum}); lower train.micro_batch_size or add data")
    total = per_epoch * train.epochs if train.epochs else train.max_steps
    if train.max_steps:
        total = min(total, train.max_steps)
    return per_epoch, total


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def is_improvement(value: float, best: float | None, greater_is_better: bool) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if greater_is_better else value < best


SHM_COMM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.ShareMemCommBuilder.NAME


def skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed's comm start-up JIT-compiles a shared-memory all-reduce op (40 s on 2 cores, again for
    every new environment, and only with a C++ compiler) that only its inference all-reduce uses, never a
    training step. Marking the op incompatible skips the build: DeepSpeed keeps its probe's dict, and its comm
    builds the op only if that dict says compatible."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def import_deepspeed():
    """`import deepspeed`, without the `import mlflow` its autotuner makes at import time when MLflow is installed
    (korch's tracking installs it): 1.4-2.6 s of a worker's start-up, for an autotuner that only DeepSpeed's own
    launcher runs. MLflow is hidden during the import alone, so a later `import mlflow` works as usual."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def train_loop_per_worker(config: dict) -> dict | None:
    deepspeed = import_deepspeed()
    import ray
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from korch.data.pipeline import epoch_units
    from korch.data.stream import iter_rank_batches
    from korch.tasks import TASKS
    from korch.tasks.base import batch_generator
    from korch.train import checkpoint as ckpt
    from korch.train.swa import SwaWindow, load_full_weights

    cfg = TrainLoopConfig.model_validate(config)
    context = _train_api().get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    is_rank_zero = rank == 0
    log = ray.get_actor(cfg.log_actor)
    attempt = ray.get(log.worker_started.remote(rank))
    cuda = cfg.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", context.get_local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        skip_shm_comm_build()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    task_cls = TASKS[cfg.task].load_trainer()
    task = task_cls(task_cls.Options.model_validate(cfg.options), cfg.model, tokenizer, cfg.seq_len, cfg.task_info)
    train = cfg.train
    steps_per_epoch, total_steps = plan_steps(train, cfg.rows_per_worker)
    micro_per_epoch = steps_per_epoch * train.grad_accum

    # Resume source: the newest of Ray's latest checkpoint (after a worker-group restart or a re-run), an explicit
    # one, and the newest one this run wrote (Ray registers a reported checkpoint only on its controller's next
    # poll, so a run stopped in between would otherwise resume one checkpoint back).
    ray_checkpoint = _train_api().get_checkpoint()
    ray_dir = ray_checkpoint.to_directory() if ray_checkpoint is not None else None
    resume_dir = newest_checkpoint([ray_dir, cfg.resume_from, cfg.latest_saved])
    weights = moments = None
    state: dict[str, Any] = {"step": 0}
    if resume_dir:
        weights, moments, state = ckpt.read_checkpoint(resume_dir)
    swa = SwaWindow.read(resume_dir, train.swa_epochs, state)

    torch.manual_seed(train.seed)
    model = task.build_model(cfg.start_from)
    if weights is not None:
        ckpt.load_weights_into(model, weights)
    # Frozen weights (an adapter task's base) never reach the optimizer, so it holds no state for them.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=train.lr)
    scheduler_factory = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda s: lr_factor(s, total_steps, train.warmup_steps, train.lr_schedule))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler_factory, config=cfg.deepspeed_config)

    global_step = int(state["step"])
    selection = _Selection(cfg.eval, task_cls, state)
    if moments is not None:
        ckpt.restore_optimizer_state(engine.module, optimizer, moments, int(state.get("adam_step", global_step)))
        _restore_schedule(scheduler, global_step)
        if is_rank_zero:
            log.event.remote("resume", step=global_step, attempt=attempt, from_step=global_step,
                             source="ray" if resume_dir == ray_dir else str(resume_dir))

    def evaluate() -> dict[str, Any]:
        plan = epoch_units(cfg.manifest, cfg.prepared_dir, "validation", train.seed, 0, world_size)
        return _evaluate(engine, task, plan, rank, world_size, device, train.micro_batch_size, cfg.eval.max_batches)

    fail_rank = min(1, world_size - 1)
    losses: list[float] = []
    window_start, window_samples = time.perf_counter(), 0
    last_loss = float(state.get("loss", float("nan")))
    evaluation: dict[str, Any] = {}
    stopped_early = bool(state.get("stopped_early", False))
    engine.train()
    while global_step < total_steps and not stopped_early:
        epoch, done_in_epoch = divmod(global_step, steps_per_epoch)
        micro_index = done_in_epoch * train.grad_accum
        plan = epoch_units(cfg.manifest, cfg.prepared_dir, "train", train.seed, epoch, world_size)
        # Only full micro batches of the planned steps are trained: the loop leaves the epoch before its tail.
        for rows in iter_rank_batches(plan, rank, world_size, train.micro_batch_size,
                                      skip_rows=micro_index * train.micro_batch_size, columns=task_cls.columns):
            batch = task.collate(rows, batch_generator(train.seed, epoch, micro_index, rank))
            # Dropout draws from global RNG: reseed per micro batch so a resumed run repeats it exactly.
            torch.manual_seed(train.seed + 7919 * (epoch * micro_per_epoch + micro_index) + rank)
            loss = task.loss(engine, {k: v.to(device) for k, v in batch.items()})
            engine.backward(loss)
            engine.step()
            micro_index += 1
            losses.append(float(loss.detach()))
            window_samples += len(rows["row_id"])
            if micro_index % train.grad_accum:
                continue
            global_step += 1
            last_loss = sum(losses) / len(losses)
            losses.clear()
            if cfg.fail_at_step == global_step and rank == fail_rank and attempt == 1:
                log.event.remote("failure", step=global_step, attempt=attempt, rank=rank,
                                 reason=f"{FAIL_ENV}={cfg.fail_at_step}")
                ray.get(log.flush.remote())
                # Ray Train's controller collects reported checkpoints on its poll; dying within the same instant
                # as a report would test Ray's race, not korch's resume, so give it a few polls first.
                time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")))
                os._exit(1)
            epoch_end = global_step % steps_per_epoch == 0
            epoch_mark = epoch + micro_index / micro_per_epoch
            if global_step % train.log_every_steps == 0 or global_step == total_steps:
                elapsed = time.perf_counter() - window_start
                if is_rank_zero:
                    log.metrics.remote({
                        "step": global_step, "epoch": epoch_mark, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": window_samples * world_size / max(elapsed, 1e-9),
                        "memory_mb_per_token": _memory_mb(device) / (train.micro_batch_size * cfg.seq_len),
                        "time": time.time(),
                    })
                window_start, window_samples = time.perf_counter(), 0
            if epoch_end and cfg.has_validation and cfg.eval.every == "epoch":
                evaluation = evaluate()
                if is_rank_zero:
                    log.evaluation.remote({"step": global_step, "epoch": epoch_mark, **evaluation})
                if selection.offer(evaluation, global_step, epoch + 1):
                    _export(engine, task, Path(cfg.stage_dir) / "best", is_rank_zero)
                    if is_rank_zero:
                        log.event.remote("best", step=global_step, attempt=attempt, **selection.describe())
                stopped_early = selection.exhausted()
                engine.train()
            if epoch_end or global_step == total_steps or stopped_early or (
                    train.checkpoint_every_steps and global_step % train.checkpoint_every_steps == 0):
                _save(engine, optimizer, scheduler, task, cfg, rank, attempt, log, swa,
                      {"step": global_step, "epoch": epoch + (1 if epoch_end else 0), "loss": last_loss,
                       "world_size": world_size, "seed": train.seed, "stopped_early": stopped_early,
                       **selection.state()},
                      export_hf=epoch_end, metrics=evaluation if epoch_end else None)
            if stopped_early and is_rank_zero:
                log.event.remote("early_stop", step=global_step, attempt=attempt, **selection.describe())
            if epoch_end or global_step >= total_steps or stopped_early:
                break
        else:
            if global_step < total_steps and global_step % steps_per_epoch:
                raise RuntimeError("the data ran out before the planned steps of the epoch; the dataset changed?")

    ray.get(log.flush.remote())  # this rank's log rows are written before the driver stops the actor
    summary: dict[str, Any] = {"step": global_step, "loss": last_loss, "epochs": round(global_step / steps_per_epoch, 4),
                               **_optimizer_bytes(optimizer)}
    if cfg.has_validation and cfg.eval.every != "never":
        if not evaluation:  # `end`, or training stopped between epoch ends
            evaluation = evaluate()
        summary["eval"] = dict(evaluation, **({"best": selection.describe()} if selection.enabled else {}))
        if selection.history:  # each epoch's scores, and which checkpoint-<step>/ holds the best one
            summary["eval"]["epochs"] = selection.history
            if selection.enabled:
                summary["eval"]["best_checkpoint"] = selection.describe()["best_checkpoint"]
    if stopped_early:
        summary["stopped_early"] = True
    _export(engine, task, Path(cfg.stage_dir) / "final", is_rank_zero)
    engine.eval()
    probe = task.probe(engine, device)  # ZeRO-3 forward is collective: every rank joins it
    if swa.snapshots:
        averaged = swa.average()
        if is_rank_zero:
            ckpt.atomic_publish(lambda d: _write_hf(engine.module, task, averaged, d), Path(cfg.stage_dir) / "swa")
        if "eval" in summary:  # evaluated beside best/: the averaged weights go into the live engine last
            load_full_weights(engine.module, averaged)
            summary["eval"]["swa"] = dict(evaluate(), epochs=swa.epochs)
        if is_rank_zero:
            log.event.remote("swa", step=global_step, attempt=attempt, epochs=swa.epochs)
    if is_rank_zero:
        if probe is not None:
            summary["probe_logits"] = probe
        return summary
    return None


class _Selection:
    """Best-epoch bookkeeping for `eval.select_best` and `eval.patience`; its state rides in checkpoints."""

    def __init__(self, eval_cfg: EvalConfig, task_cls, state: dict):
        self.metric = eval_cfg.select_best
        self.enabled = self.metric is not None
        self.patience = eval_cfg.patience
        from korch.tasks.base import metric_greater_is_better

        self.greater = self.metric is not None and metric_greater_is_better(task_cls, self.metric,
                                                                            eval_cfg.greater_is_better)
        self.best = state.get("best_metric")
        self.best_step = state.get("best_step")
        self.best_epoch = state.get("best_epoch")
        self.misses = int(state.get("evals_without_improvement", 0))
        self.history: list[dict] = list(state.get("eval_history", []))
        """Every epoch's scores, in order (eval.json `epochs`)."""

    def offer(self, evaluation: dict, step: int, epoch: int) -> bool:
        """True when this evaluation is the new best (so the caller exports `best/`)."""
        self.history.append({"epoch": epoch, "step": step, "checkpoint": f"checkpoint-{step}",
                             **{k: v for k, v in evaluation.items() if isinstance(v, (int, float))}})
        if not self.enabled:
            return False
        if self.metric not in evaluation:
            raise ValueError(f"eval.select_best '{self.metric}' is not among the task's metrics: "
                             f"{', '.join(sorted(evaluation))}")
        value = float(evaluation[self.metric])
        if is_improvement(value, self.best, self.greater):
            self.best, self.best_step, self.best_epoch, self.misses = value, step, epoch, 0
            return True
        self.misses += 1
        return False

    def exhausted(self) -> bool:
        return self.patience is not None and self.misses >= self.patience

    def state(self) -> dict:
        return {"best_metric": self.best, "best_step": self.best_step, "best_epoch": self.best_epoch,
                "evals_without_improvement": self.misses, "eval_history": self.history}

    def describe(self) -> dict:
        return {"metric": self.metric, "value": self.best, "best_step": self.best_step, "best_epoch": self.best_epoch,
                "best_checkpoint": f"checkpoint-{self.best_step}" if self.best_step is not None else None}


def _evaluate(engine, task, plan, rank: int, world_size: int, device, micro_batch_size: int,
              max_batches: int | None) -> dict[str, Any]:
    """Collective under torch.distributed: every rank runs the same number of forwards (ZeRO-3 gathers
    parameters in each), which the equal per-rank shares of the padded plan guarantee."""
    import torch
    import torch.distributed as dist

    from korch.data.stream import iter_rank_batches
    from korch.tasks.base import EVAL_SEED, batch_generator

    engine.eval()
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index, rows in enumerate(iter_rank_batches(plan, rank, world_size, micro_batch_size, columns=task.columns)):
            if max_batches is not None and index >= max_batches:
                break
            batch = {k: v.to(device) for k, v in task.collate(rows, batch_generator(EVAL_SEED, 0, index, rank)).items()}
            weight = torch.tensor([0.0 if pad else 1.0 for pad in rows["is_padding"]], device=device)
            for key, value in task.eval_sums(engine, batch, weight).items():
                totals[key] = totals[key] + value.double().cpu() if key in totals else value.double().cpu().clone()
    if dist.is_initialized():
        for key in sorted(totals):
            dist.all_reduce(totals[key])
    return task.eval_metrics(totals)


def _restore_schedule(scheduler, step: int) -> None:
    """Put a LambdaLR at `step` without calling step() before the optimizer has stepped."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _optimizer_bytes(optimizer) -> dict[str, int]:
    """What this rank holds: Adam moments (what ZeRO-1+ partitions) and ZeRO's separate fp32 master partitions."""
    import torch

    from korch.train.checkpoint import _inner_torch_optimizer

    inner = _inner_torch_optimizer(optimizer)
    moments = sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
                  if torch.is_tensor(t) and t.ndim > 0)
    masters = [*(getattr(optimizer, "single_partition_of_fp32_groups", None) or []),
               *(getattr(optimizer, "fp32_partitioned_groups_flat", None) or [])]
    return {"optimizer_state_bytes": int(moments), "master_param_bytes": int(sum(t.numel() * t.element_size() for t in masters))}


def _memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save(engine, optimizer, scheduler, task, cfg: TrainLoopConfig, rank: int, attempt: int, log, swa, state: dict,
          export_hf: bool, metrics: dict | None = None) -> None:
    import tempfile

    from korch.train import checkpoint as ckpt

    weights, moments, adam_step = ckpt.gather_full_state(engine.module, optimizer)
    state = dict(state, adam_step=adam_step, lr=scheduler.get_last_lr()[0])
    if export_hf:  # an epoch end: the SWA window takes these weights (every rank, all hold them in full)
        swa.add(int(state["epoch"]), weights)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            state.update(swa.write(tmp))
            ckpt.write_checkpoint(tmp, weights, moments, state)
            if export_hf:
                target = Path(cfg.stage_dir) / f"checkpoint-{state['step']}"
                ckpt.atomic_publish(lambda d: _write_hf(engine.module, task, weights, d), target)
            checkpoint = _train_api().Checkpoint.from_directory(tmp)
        # An epoch end's evaluation rides along (numbers only, as eval_<name>), so a tuning campaign sees
        # per-epoch metrics.
        scalars = {f"eval_{k}": v for k, v in (metrics or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        _train_api().report({"step": state["step"], "loss": state["loss"], "epoch": state["epoch"], **scalars},
                         checkpoint=checkpoint)
    if rank == 0:
        log.event.remote("checkpoint", step=state["step"], attempt=attempt, epoch=state["epoch"],
                         hf_folder=f"checkpoint-{state['step']}" if export_hf else None)


def _write_hf(module, task, weights: dict, directory) -> None:
    """Save a from_pretrained-loadable folder from gathered full weights (works for partitioned ZeRO-3 modules)."""
    from korch.train import checkpoint as ckpt

    fresh = task.empty_model(module.config)
    ckpt.load_weights_into(fresh, weights)
    task.save(fresh, str(directory))


def _export(engine, task, target: Path, is_rank_zero: bool) -> None:
    """Collective: every rank gathers; rank 0 publishes the folder atomically."""
    from korch.train import checkpoint as ckpt

    weights, _, _ = ckpt.gather_full_state(engine.module, engine.optimizer)
    if is_rank_zero:
        ckpt.atomic_publish(lambda d: _write_hf(engine.module, task, weights, d), target)
