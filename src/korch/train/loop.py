"""The per-worker training loop for masked-LM stages (runs inside Ray Train workers).

Reads top to bottom: config → rank/device → model (+ resume weights) → DeepSpeed → resume optimizer/position →
micro-batch loop with logging, checkpoints, the failure test hook and evaluation → final export.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from korch.config import EvalConfig, ModelConfig, TrainConfig

FAIL_ENV = "KORCH_FAIL_AT_STEP"


class TrainLoopConfig(BaseModel):
    """Everything a worker needs, as plain data: it crosses the Ray boundary as a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage_dir: str
    tokenizer_dir: str
    start_from: str | None = None
    resume_from: str | None = None
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig
    deepspeed_config: dict[str, Any]
    seq_len: int
    mlm_probability: float
    rows_per_worker: int
    has_validation: bool
    use_gpu: bool
    cpus_per_worker: float
    log_actor: str
    fail_at_step: int | None = None


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


def train_loop_per_worker(config: dict) -> dict | None:
    import deepspeed
    import ray
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from korch.data.stream import iter_worker_batches
    from korch.eval.mlm import evaluate_mlm
    from korch.models import build_mlm_model
    from korch.train import checkpoint as ckpt
    from korch.train.collate import mask_tokens, masking_generator, pad_blocks

    cfg = TrainLoopConfig.model_validate(config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    is_rank_zero = rank == 0
    log = ray.get_actor(cfg.log_actor)
    attempt = ray.get(log.worker_started.remote(rank))
    cuda = cfg.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", context.get_local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    special_ids = sorted(set(tokenizer.all_special_ids))
    train = cfg.train
    steps_per_epoch, total_steps = plan_steps(train, cfg.rows_per_worker)

    # Resume source: Ray's latest checkpoint after a worker-group restart, else an explicit one.
    resume_dir, ray_checkpoint = None, ray.train.get_checkpoint()
    if ray_checkpoint is not None:
        resume_dir = ray_checkpoint.to_directory()
    elif cfg.resume_from:
        resume_dir = cfg.resume_from
    weights = moments = None
    state: dict[str, Any] = {"step": 0}
    if resume_dir:
        weights, moments, state = ckpt.read_checkpoint(resume_dir)

    torch.manual_seed(train.seed)
    model = build_mlm_model(cfg.model, len(tokenizer), cfg.seq_len, tokenizer.pad_token_id, cfg.start_from)
    if weights is not None:
        ckpt.load_weights_into(model, weights)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=train.lr)
    scheduler_factory = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda s: lr_factor(s, total_steps, train.warmup_steps, train.lr_schedule))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler_factory, config=cfg.deepspeed_config)

    global_step = int(state["step"])
    if moments is not None:
        ckpt.restore_optimizer_state(engine.module, optimizer, moments, int(state.get("adam_step", global_step)))
        _restore_schedule(scheduler, global_step)
        if is_rank_zero:
            log.event.remote("resume", step=global_step, attempt=attempt, from_step=global_step,
                             source=str(cfg.resume_from if ray_checkpoint is None else "ray"))

    train_shard = ray.train.get_dataset_shard("train")
    fail_rank = min(1, world_size - 1)
    losses: list[float] = []
    window_start, window_samples = time.perf_counter(), 0
    last_loss = float("nan")
    engine.train()
    while global_step < total_steps:
        epoch, done_in_epoch = divmod(global_step, steps_per_epoch)
        micro_index = done_in_epoch * train.grad_accum
        # The planned steps use only full micro batches, so the loop leaves each epoch before a short tail batch.
        for batch in iter_worker_batches(train_shard, train.micro_batch_size, skip_batches=micro_index):
            input_ids, attention_mask = pad_blocks(batch["input_ids"], cfg.seq_len, tokenizer.pad_token_id)
            inputs, labels = mask_tokens(input_ids, attention_mask, special_ids, tokenizer.mask_token_id,
                                         len(tokenizer), cfg.mlm_probability,
                                         masking_generator(train.seed, epoch, micro_index, rank))
            # Dropout draws from global RNG: reseed per micro batch so a resumed run repeats it exactly.
            torch.manual_seed(train.seed + 7919 * (epoch * steps_per_epoch * train.grad_accum + micro_index) + rank)
            loss = engine(input_ids=inputs.to(device), attention_mask=attention_mask.to(device),
                          labels=labels.to(device)).loss
            engine.backward(loss)
            engine.step()
            micro_index += 1
            losses.append(float(loss.detach()))
            window_samples += len(input_ids)
            if micro_index % train.grad_accum:
                continue
            global_step += 1
            last_loss = sum(losses) / len(losses)
            losses.clear()
            if cfg.fail_at_step == global_step and rank == fail_rank and attempt == 1:
                log.event.remote("failure", step=global_step, attempt=attempt, rank=rank,
                                 reason=f"{FAIL_ENV}={cfg.fail_at_step}")
                ray.get(log.flush.remote())
                os._exit(1)
            if global_step % train.log_every_steps == 0 or global_step == total_steps:
                elapsed = time.perf_counter() - window_start
                if is_rank_zero:
                    log.metrics.remote({
                        "step": global_step, "epoch": epoch + micro_index / (steps_per_epoch * train.grad_accum),
                        "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": window_samples * world_size / max(elapsed, 1e-9),
                        "memory_mb_per_token": _memory_mb(device) / (train.micro_batch_size * cfg.seq_len),
                        "time": time.time(),
                    })
                window_start, window_samples = time.perf_counter(), 0
            epoch_end = global_step % steps_per_epoch == 0
            if epoch_end or global_step == total_steps or (train.checkpoint_every_steps and global_step % train.checkpoint_every_steps == 0):
                _save(engine, optimizer, scheduler, cfg, tokenizer, rank, attempt, log,
                      {"step": global_step, "epoch": epoch + (1 if epoch_end else 0), "loss": last_loss,
                       "world_size": world_size, "seed": train.seed},
                      export_hf=epoch_end)
            if epoch_end or global_step >= total_steps:
                break
        else:
            if global_step < total_steps and global_step % steps_per_epoch:
                raise RuntimeError("the data ran out before the planned steps of the epoch; the dataset changed?")

    ray.get(log.flush.remote())  # this rank's log rows are written before the driver stops the actor
    summary: dict[str, Any] = {"step": global_step, "loss": last_loss, **_optimizer_bytes(optimizer)}
    if cfg.has_validation and cfg.eval.every != "never":
        summary["eval"] = evaluate_mlm(engine, ray.train.get_dataset_shard("validation"), tokenizer, special_ids, rank, device,
                                       seq_len=cfg.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                                       max_batches=cfg.eval.max_batches, mlm_probability=cfg.mlm_probability)
    _export_final(engine, cfg, tokenizer, is_rank_zero)
    if is_rank_zero:
        summary["probe_logits"] = _probe_logits(engine, tokenizer, device)
        return summary
    _probe_logits(engine, tokenizer, device)  # ZeRO-3 forward is collective: every rank joins it
    return None


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


def _save(engine, optimizer, scheduler, cfg: TrainLoopConfig, tokenizer, rank: int, attempt: int, log, state: dict,
          export_hf: bool) -> None:
    import ray.train

    from korch.train import checkpoint as ckpt

    weights, moments, adam_step = ckpt.gather_full_state(engine.module, optimizer)
    state = dict(state, adam_step=adam_step, lr=scheduler.get_last_lr()[0])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            ckpt.write_checkpoint(tmp, weights, moments, state)
            if export_hf:
                target = Path(cfg.stage_dir) / f"checkpoint-{state['step']}"
                ckpt.atomic_publish(lambda d: _write_hf(engine.module, weights, tokenizer, d), target)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"step": state["step"], "loss": state["loss"]}, checkpoint=checkpoint)
    if rank == 0:
        log.event.remote("checkpoint", step=state["step"], attempt=attempt, epoch=state["epoch"],
                         hf_folder=f"checkpoint-{state['step']}" if export_hf else None)


def _write_hf(module, weights: dict, tokenizer, directory) -> None:
    """Save a from_pretrained-loadable folder from gathered full weights (works for partitioned ZeRO-3 modules)."""
    from transformers import AutoModelForMaskedLM

    from korch.train import checkpoint as ckpt

    fresh = AutoModelForMaskedLM.from_config(module.config)
    ckpt.load_weights_into(fresh, weights)
    fresh.tie_weights()
    fresh.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _export_final(engine, cfg: TrainLoopConfig, tokenizer, is_rank_zero: bool) -> None:
    from korch.train import checkpoint as ckpt

    weights, _, _ = ckpt.gather_full_state(engine.module, engine.optimizer)
    if is_rank_zero:
        ckpt.atomic_publish(lambda d: _write_hf(engine.module, weights, tokenizer, d), Path(cfg.stage_dir) / "final")


def _probe_logits(engine, tokenizer, device) -> list[float]:
    """Logits of the in-memory model on a fixed sentence: the export-parity test compares against them."""
    import torch

    engine.eval()
    encoded = tokenizer("한국어 문장으로 모델을 확인합니다.", return_tensors="pt")
    with torch.no_grad():
        logits = engine(input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)).logits
    return logits[0, :, :8].float().cpu().flatten().tolist()
